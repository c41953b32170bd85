//! The return path for connections the proxy makes to a local application with the
//! client's IP (transparent bind).
//!
//! The application answers to the client's IP, which is not local to the pod, so by
//! default its replies would leave through the pod's interface. Two settings inside the
//! pod's namespace bring them back to the proxy, with no iptables and no conntrack:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1`: an accepted socket takes the mark of the SYN that
//!   created it, so the application's socket carries the proxy's
//!   [`marks::PROXY_TRANSPARENT`] mark;
//! - `net.ipv4.fwmark_reflect = 1`: replies the kernel sends without a socket (the reset
//!   for a port nobody listens on) carry the mark too, so a refused connect fails at once
//!   instead of timing out;
//! - a policy rule sends packets with that mark to a table whose only route is
//!   `local 0.0.0.0/0 dev lo`, so the replies loop back to the proxy's socket.

use std::net::Ipv4Addr;

use ambit_common::marks;
use netlink_packet_route::{
    route::{RouteScope, RouteType},
    rule::RuleAction,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::netns::{NetnsError, PodNetns};

/// Routing table for marked packets. Chosen away from the tables CNIs commonly use.
const TABLE: u32 = 0xa3b;
/// Rule priority: before the `main` table (32766).
const RULE_PRIORITY: u32 = 100;
const SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/tcp_fwmark_accept",
    "/proc/sys/net/ipv4/fwmark_reflect",
];
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot open netlink socket in {pod}: {source}")]
    Netlink { pod: String, source: std::io::Error },
    #[error("cannot set {sysctl} in {pod}: {source}")]
    Sysctl {
        sysctl: &'static str,
        pod: String,
        source: std::io::Error,
    },
    #[error("cannot {action} in {pod}: {source}")]
    Request {
        action: &'static str,
        pod: String,
        source: rtnetlink::Error,
    },
}

/// Installs the return path in the pod's namespace. Idempotent.
pub async fn install(netns: &PodNetns) -> Result<(), RoutingError> {
    let pod = netns.path().display().to_string();
    let handle = connect(netns, &pod, true).await?;
    let request = |action| request_failed(action, &pod);
    handle
        .route()
        .add(local_route())
        .replace()
        .execute()
        .await
        .map_err(request("add the local route"))?;
    let added = mark_rule(&handle).execute().await;
    ignore_errno(added, EEXIST).map_err(request("add the mark rule"))
}

/// Removes the return path from the pod's namespace. Missing pieces are not an error.
pub async fn remove(netns: &PodNetns) -> Result<(), RoutingError> {
    let pod = netns.path().display().to_string();
    let handle = connect(netns, &pod, false).await?;
    let mut rule = mark_rule(&handle);
    let deleted = handle
        .rule()
        .del(rule.message_mut().clone())
        .execute()
        .await;
    let request = |action| request_failed(action, &pod);
    ignore_errno(deleted, ENOENT).map_err(request("delete the mark rule"))?;
    let deleted = handle.route().del(local_route()).execute().await;
    ignore_errno(deleted, ESRCH).map_err(request("delete the local route"))
}

const ESRCH: i32 = 3;

/// Opens a netlink socket inside the pod's namespace (and sets the sysctl there when
/// `set_sysctl`); the returned handle may then be used from any task.
async fn connect(netns: &PodNetns, pod: &str, set_sysctl: bool) -> Result<Handle, RoutingError> {
    let (connection, handle) = netns
        .run(move || -> Result<_, RoutingError> {
            if set_sysctl {
                for sysctl in SYSCTLS {
                    std::fs::write(sysctl, "1").map_err(|source| RoutingError::Sysctl {
                        sysctl,
                        pod: String::new(),
                        source,
                    })?;
                }
            }
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|source| RoutingError::Netlink {
                    pod: String::new(),
                    source,
                })?;
            Ok((connection, handle))
        })
        .await?
        .map_err(|e| name_pod(e, pod))?;
    tokio::spawn(connection);
    Ok(handle)
}

fn request_failed(
    action: &'static str,
    pod: &str,
) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let pod = pod.to_owned();
    move |source| RoutingError::Request {
        action,
        pod,
        source,
    }
}

fn name_pod(error: RoutingError, pod: &str) -> RoutingError {
    match error {
        RoutingError::Sysctl { sysctl, source, .. } => RoutingError::Sysctl {
            sysctl,
            pod: pod.to_owned(),
            source,
        },
        RoutingError::Netlink { source, .. } => RoutingError::Netlink {
            pod: pod.to_owned(),
            source,
        },
        other => other,
    }
}

fn local_route() -> netlink_packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(1)
        .table_id(TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build()
}

fn mark_rule(handle: &Handle) -> rtnetlink::RuleAddRequest<Ipv4Addr> {
    handle
        .rule()
        .add()
        .v4()
        .fw_mark(marks::PROXY_TRANSPARENT)
        .table_id(TABLE)
        .priority(RULE_PRIORITY)
        .action(RuleAction::ToTable)
}

fn ignore_errno(result: Result<(), rtnetlink::Error>, errno: i32) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(message))
            if message.code.is_some_and(|c| c.get() == -errno) =>
        {
            Ok(())
        }
        other => other,
    }
}
