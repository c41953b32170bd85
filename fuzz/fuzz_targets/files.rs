//! The files source on an arbitrary file: its objects or an error naming the file and the
//! document, never a panic. The objects it yields keep the invariants the data path
//! relies on.
#![no_main]

use std::path::Path;

use ambit::{destinations::Destinations, discovery::files::parse_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let snapshot = match parse_file(Path::new("fuzz.yaml"), &text) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    let destinations = Destinations::new(&snapshot, "cluster.local");
    for pod in snapshot.pods.values() {
        assert!(
            !(pod.host_network && snapshot.is_enrolled(pod)),
            "hostNetwork pod {} enrolled",
            pod.key()
        );
        let Some(ip) = pod.ip else { continue };
        let endpoint = destinations
            .pod(ip)
            .unwrap_or_else(|| panic!("pod {} at {ip} is no destination", pod.key()));
        if endpoint.conflict.is_some() {
            assert_eq!(endpoint.identity, None, "conflicting {ip} has an identity");
        }
        if pod.host_network {
            assert_eq!(
                endpoint.identity, None,
                "hostNetwork IP {ip} has an identity"
            );
        }
    }
});
