//! What an HBONE `CONNECT` may ask for, on arbitrary request lines: a target is only ever
//! an application port of the pod itself.
//!
//! Input: one byte choosing the pod's IPs, then `<method> <uri>` (no space: the whole rest
//! is the URI of a `CONNECT`).
#![no_main]

use std::net::IpAddr;

use ambit::proxy::hbone::request::connect_target;
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;

/// Pod addresses as a configuration may give them: single-stack of either family, and
/// dual-stack.
const POD_IPS: [&[&str]; 5] = [
    &["10.0.0.5"],
    &["192.168.1.7"],
    &["fd00::5"],
    &["2001:db8::1"],
    &["10.0.0.5", "fd00::5"],
];
/// The proxy's own listeners.
const PROXY_PORTS: [u16; 3] = [15001, 15006, 15008];

fuzz_target!(|data: &[u8]| {
    let Some((&choice, line)) = data.split_first() else {
        return;
    };
    let pod_ips: Vec<IpAddr> = POD_IPS[usize::from(choice) % POD_IPS.len()]
        .iter()
        .map(|ip| ip.parse().expect("valid IP"))
        .collect();
    let (method, uri) = match line.iter().position(|&b| b == b' ') {
        Some(space) => (&line[..space], &line[space + 1..]),
        None => (&b"CONNECT"[..], line),
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(uri)) else {
        return;
    };
    if let Ok(target) = connect_target(&method, &uri, &pod_ips) {
        assert_eq!(method, Method::CONNECT);
        assert!(
            pod_ips.contains(&target.ip()),
            "{uri} reached another address"
        );
        assert!(
            !target.ip().is_loopback() && !target.ip().is_unspecified(),
            "{uri} reached {target}"
        );
        assert!(
            !PROXY_PORTS.contains(&target.port()),
            "{uri} reached the proxy's listener {target}"
        );
    }
});
