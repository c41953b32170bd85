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
//! - `net.ipv4.fwmark_reflect = 1` (and `net.ipv6.fwmark_reflect` for a pod with an IPv6
//!   address): replies the kernel sends without a socket (the reset for a port nobody
//!   listens on) carry the mark too, so a refused connect fails at once instead of timing
//!   out;
//! - a policy rule sends packets with that mark to a table whose only route is
//!   `local 0.0.0.0/0 dev lo`, so the replies loop back to the proxy's socket; for a pod
//!   with an IPv6 address, the same for IPv6 (`local ::/0 dev lo`).
//!
//! The sysctls are the pod's own settings: their values from before the first install
//! are saved ([`SavedSettings`]) and put back when the pod leaves the mesh.

mod saved;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_common::marks;
use netlink_packet_route::{
    route::{RouteScope, RouteType},
    rule::{RuleAction, RuleMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use saved::Sysctls;
pub use saved::{Recorded, SavedError, SavedSettings};

use crate::netns::{NetnsError, PodNetns};

/// Routing table for marked packets. Chosen away from the tables CNIs commonly use.
const TABLE: u32 = 0xa3b;
/// Rule priority: before the `main` table (32766).
const RULE_PRIORITY: u32 = 100;
/// The sysctls the return path needs on, by name; the last one for IPv6 only
/// (`tcp_fwmark_accept` covers IPv6 TCP too).
const SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.fwmark_reflect",
    "net.ipv6.fwmark_reflect",
];
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const EAFNOSUPPORT: i32 = 97;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot open netlink socket in {pod}: {source}")]
    Netlink { pod: String, source: std::io::Error },
    #[error("cannot {action} {sysctl} in {pod}: {source}")]
    Sysctl {
        action: &'static str,
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
    #[error("{pod}: {source}")]
    Saved { pod: String, source: SavedError },
}

/// Installs the return path in the pod's namespace, for the families of the pod's
/// addresses `ips` (a pod without an IPv6 address may have no IPv6 at all). Idempotent:
/// the sysctls' original values are saved by the first install only, as a later one (by
/// a restarted agent) would read back ambit's own.
pub async fn install(
    netns: &PodNetns,
    saved: &SavedSettings,
    ips: &[IpAddr],
) -> Result<(), RoutingError> {
    let ipv6 = ips.iter().any(IpAddr::is_ipv6);
    let sysctls = sysctls(ipv6);
    let pod = netns.path().display().to_string();
    let saved_error = |source| RoutingError::Saved {
        pod: pod.clone(),
        source,
    };
    let cookie = netns.cookie().await?;
    // Saved before anything changes: a crash in between must not lose the originals.
    if saved.load(cookie).map_err(saved_error)?.is_none() {
        let originals = in_netns(netns, &pod, move || read_sysctls(sysctls)).await?;
        saved
            .save(cookie, netns.path(), &originals)
            .map_err(saved_error)?;
    }
    let enabled: Sysctls = sysctls.iter().map(|name| ((*name).to_owned(), 1)).collect();
    in_netns(netns, &pod, move || write_sysctls(&enabled)).await?;

    let handle = connect(netns, &pod).await?;
    let request = |action| request_failed(action, &pod);
    let families: &[Family] = if ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        handle
            .route()
            .add(local_route(family))
            .replace()
            .execute()
            .await
            .map_err(request(family.action(ADD_ROUTE)))?;
        let mut add = handle.rule().add();
        *add.message_mut() = mark_rule(&handle, family);
        ignore_errno(add.execute().await, EEXIST).map_err(request(family.action(ADD_RULE)))?;
    }
    Ok(())
}

/// The sysctls for a pod with (or without) an IPv6 address.
fn sysctls(ipv6: bool) -> &'static [&'static str] {
    if ipv6 { &SYSCTLS } else { &SYSCTLS[..2] }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// Of the two wordings of an action (IPv4, IPv6), this family's.
    fn action(self, [v4, v6]: [&'static str; 2]) -> &'static str {
        match self {
            Self::V4 => v4,
            Self::V6 => v6,
        }
    }
}

const ADD_ROUTE: [&str; 2] = ["add the local route", "add the IPv6 local route"];
const ADD_RULE: [&str; 2] = ["add the mark rule", "add the IPv6 mark rule"];
const DELETE_ROUTE: [&str; 2] = ["delete the local route", "delete the IPv6 local route"];
const DELETE_RULE: [&str; 2] = ["delete the mark rule", "delete the IPv6 mark rule"];

/// Removes the return path from the pod's namespace and puts the saved sysctl values
/// back; sysctls with nothing saved (set by an agent that kept no record) stay as they
/// are. Missing pieces are not an error, and a failure to remove one piece does not
/// keep the others in place.
pub async fn remove(netns: &PodNetns, saved: &SavedSettings) -> Result<(), RoutingError> {
    let pod = netns.path().display().to_string();
    let routes = remove_routes(netns, &pod).await;
    let sysctls = restore_sysctls(netns, &pod, saved).await;
    routes.and(sysctls)
}

/// Removes both families' pieces, whichever the pod had: absent ones, and IPv6 where the
/// kernel has none, are not an error.
async fn remove_routes(netns: &PodNetns, pod: &str) -> Result<(), RoutingError> {
    let handle = connect(netns, pod).await?;
    let request = |action| request_failed(action, pod);
    for family in [Family::V4, Family::V6] {
        let deleted = handle
            .rule()
            .del(mark_rule(&handle, family))
            .execute()
            .await;
        let deleted = ignore_errno(deleted, EAFNOSUPPORT);
        ignore_errno(deleted, ENOENT).map_err(request(family.action(DELETE_RULE)))?;
        let deleted = handle.route().del(local_route(family)).execute().await;
        let deleted = ignore_errno(deleted, EAFNOSUPPORT);
        ignore_errno(deleted, ESRCH).map_err(request(family.action(DELETE_ROUTE)))?;
    }
    Ok(())
}

async fn restore_sysctls(
    netns: &PodNetns,
    pod: &str,
    saved: &SavedSettings,
) -> Result<(), RoutingError> {
    let saved_error = |source| RoutingError::Saved {
        pod: pod.to_owned(),
        source,
    };
    let cookie = netns.cookie().await?;
    let Some(originals) = saved.load(cookie).map_err(saved_error)? else {
        return Ok(());
    };
    in_netns(netns, pod, move || write_sysctls(&originals)).await?;
    saved.forget(cookie).map_err(saved_error)
}

/// A sysctl that could not be read or set, before the caller names the pod.
struct SysctlFailure {
    action: &'static str,
    sysctl: &'static str,
    source: std::io::Error,
}

/// Runs a sysctl operation on the namespace's thread: `/proc/sys/net` shows the network
/// namespace of whoever opens it.
async fn in_netns<R: Send + 'static>(
    netns: &PodNetns,
    pod: &str,
    f: impl FnOnce() -> Result<R, SysctlFailure> + Send + 'static,
) -> Result<R, RoutingError> {
    netns.run(f).await?.map_err(|failure| RoutingError::Sysctl {
        action: failure.action,
        sysctl: failure.sysctl,
        pod: pod.to_owned(),
        source: failure.source,
    })
}

fn read_sysctls(sysctls: &[&'static str]) -> Result<Sysctls, SysctlFailure> {
    sysctls
        .iter()
        .map(|&sysctl| {
            let failure = |source| SysctlFailure {
                action: "read",
                sysctl,
                source,
            };
            let text = std::fs::read_to_string(proc_path(sysctl)).map_err(failure)?;
            let value = text
                .trim()
                .parse()
                .map_err(|e| failure(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
            Ok((sysctl.to_owned(), value))
        })
        .collect()
}

/// Sets the sysctls of [`SYSCTLS`] found in `values`; other names are ignored, so a saved
/// file can only ever touch these.
fn write_sysctls(values: &Sysctls) -> Result<(), SysctlFailure> {
    for sysctl in SYSCTLS {
        if let Some(value) = values.get(sysctl) {
            std::fs::write(proc_path(sysctl), value.to_string()).map_err(|source| {
                SysctlFailure {
                    action: "set",
                    sysctl,
                    source,
                }
            })?;
        }
    }
    Ok(())
}

fn proc_path(sysctl: &str) -> String {
    format!("/proc/sys/{}", sysctl.replace('.', "/"))
}

/// Opens a netlink socket inside the pod's namespace; the returned handle may then be
/// used from any task.
async fn connect(netns: &PodNetns, pod: &str) -> Result<Handle, RoutingError> {
    let (connection, handle, _) =
        netns
            .run(rtnetlink::new_connection)
            .await?
            .map_err(|source| RoutingError::Netlink {
                pod: pod.to_owned(),
                source,
            })?;
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

/// `local 0.0.0.0/0 dev lo` (`local ::/0 dev lo`) in [`TABLE`].
fn local_route(family: Family) -> netlink_packet_route::route::RouteMessage {
    match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(1)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(1)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .build(),
    }
}

/// Packets with the transparent mark go to [`TABLE`].
fn mark_rule(handle: &Handle, family: Family) -> RuleMessage {
    let rule = handle
        .rule()
        .add()
        .fw_mark(marks::PROXY_TRANSPARENT)
        .table_id(TABLE)
        .priority(RULE_PRIORITY)
        .action(RuleAction::ToTable);
    match family {
        Family::V4 => rule.v4().message_mut().clone(),
        Family::V6 => rule.v6().message_mut().clone(),
    }
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
