//! The ambit node agent as a library: discovery, redirection, identity, policy and the
//! proxy, wired together by `ambit run` in `main.rs`.

pub mod discovery;
pub mod identity;
pub mod policy;
pub mod tls;
