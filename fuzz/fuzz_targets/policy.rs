//! The policy parser on arbitrary documents: any input is a policy object or an error
//! naming the problem, never a panic or a hang.
#![no_main]

use ambit::policy::PolicyObject;
use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 3] = [
    "PeerAuthentication",
    "RequestAuthentication",
    "AuthorizationPolicy",
];

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_yaml::from_slice::<serde_yaml::Value>(data) else {
        return;
    };
    // The document's own kind when it names one, as the files source does; otherwise
    // every kind, so that a body is tried against each parser.
    let kinds: &[&str] = match doc["kind"].as_str() {
        Some(kind) if KINDS.contains(&kind) => &[kind],
        _ => &KINDS,
    };
    for kind in kinds {
        if let Err(error) = PolicyObject::from_yaml(kind, doc.clone()) {
            // Messages are built from the input too.
            let _ = error.to_string();
        }
    }
});
