//! The netns test bed: a node (a network namespace holding a bridge) with pods (network
//! namespaces joined to the bridge by veth pairs), the Kubernetes YAML that describes them
//! to the agent, and the agent itself. Used by the end-to-end tests and `cargo xtask demo`.
//!
//! Every name (namespaces, cgroup, bpffs pins) carries an id unique to the process and the
//! node, so tests run in parallel. Links are created inside the node's namespace, so their
//! names never collide. Traffic only ever goes to addresses inside namespaces the node
//! created. Everything is torn down on drop, including on panic.

mod agent;
pub mod apiserver;
pub mod mesh;
mod node;
pub mod probe;
mod run;

pub use agent::Agent;
pub use apiserver::ApiServer;
pub use node::{AgentOptions, Capture, Family, GRPC_ECHO, Node, Pod, Stack, pcap_packets};
pub use run::{Binaries, CurlResult, check, command_line};

/// The [`Binaries`] of the running test: cargo builds them next to `ambit-httpbin`, whose
/// path only the test crate itself knows (`CARGO_BIN_EXE_*` expands at the call site).
#[macro_export]
macro_rules! test_binaries {
    () => {{
        let httpbin = ::std::path::Path::new(env!("CARGO_BIN_EXE_ambit-httpbin"));
        $crate::Binaries::in_dir(httpbin.parent().expect("binaries live in a directory"))
            .expect("ambit binaries are built")
    }};
}
