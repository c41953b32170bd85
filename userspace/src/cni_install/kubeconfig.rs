//! The kubeconfig the plugin asks the API server with when the agent cannot answer: this
//! pod's service account (CA and token, copied in, since the plugin runs on the host where
//! the pod's files are not), rewritten whenever the projected token rotates.

use std::{fs, net::Ipv6Addr, path::Path};

use base64::Engine as _;
use serde_json::json;

use super::{InstallError, same_file};

/// `https://HOST:PORT`, with an IPv6 host in brackets.
pub fn server_url(host: &str, port: u16) -> String {
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// Writes the kubeconfig (mode 0600: it holds a token) unless it is there as it should be;
/// whether it wrote.
pub fn install(path: &Path, server: &str, service_account: &Path) -> Result<bool, InstallError> {
    let bytes = render(server, service_account)?;
    if same_file(path, &bytes, 0o600) {
        return Ok(false);
    }
    crate::state_file::write(path, &bytes, 0o600).map_err(|source| {
        InstallError::KubeconfigWrite {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(true)
}

/// A standard kubeconfig, in JSON (which every kubeconfig reader takes, YAML being a
/// superset), so that the plugin needs no YAML parser.
fn render(server: &str, service_account: &Path) -> Result<Vec<u8>, InstallError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        |source| InstallError::ServiceAccount { path, source }
    };
    let (ca_path, token_path) = (
        service_account.join("ca.crt"),
        service_account.join("token"),
    );
    let ca = fs::read(&ca_path).map_err(read_error(&ca_path))?;
    let token = fs::read_to_string(&token_path).map_err(read_error(&token_path))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(InstallError::EmptyToken { path: token_path });
    }
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "local",
            "cluster": {
                "server": server,
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
            },
        }],
        "users": [{"name": "ambit-cni", "user": {"token": token}}],
        "contexts": [{"name": "ambit-cni", "context": {"cluster": "local", "user": "ambit-cni"}}],
        "current-context": "ambit-cni",
    });
    let mut bytes = serde_json::to_vec_pretty(&kubeconfig).expect("a JSON value serializes");
    bytes.push(b'\n');
    Ok(bytes)
}
