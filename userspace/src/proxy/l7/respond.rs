//! What the proxy itself answers for a request the application does not see, and the
//! header edits on the way to the application.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

#[cfg(test)]
use crate::policy::authz::ACCESS_DENIED;

/// A response body: the application's, or one the proxy wrote.
pub type Body = Either<Incoming, Full<Bytes>>;

/// The proxy's answer with `status` and a text body. A gRPC client gets what Envoy sends:
/// HTTP 200 with the status in `grpc-status` and no body ("trailers-only").
pub fn answer(status: StatusCode, message: &str, grpc: bool) -> Response<Body> {
    if grpc {
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(grpc_status(status)));
        if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
            headers.insert("grpc-message", value);
        }
        response
    } else {
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "{message}\n"
        )))));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    }
}

/// Envoy's mapping of HTTP statuses to gRPC codes.
fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 protocol): everything outside
/// printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes what belongs to the client's hop only: the connection-level headers (and those
/// `Connection` names), except what an allowed upgrade needs; and any
/// `X-Forwarded-Client-Cert` the client sent, replaced by `forwarded_client_cert` (the
/// proxy's, on mutual TLS), so that no client can claim an identity.
pub fn prepare_headers(
    headers: &mut HeaderMap,
    upgrade: bool,
    forwarded_client_cert: Option<&HeaderValue>,
) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !(t.is_empty() || upgrade && t == "upgrade"))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        header::TRANSFER_ENCODING.as_str(),
    ] {
        headers.remove(name);
    }
    // gRPC requires `te: trailers`; any other TE is hop-by-hop.
    let trailers_only = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(FORWARDED_CLIENT_CERT);
    if let Some(value) = forwarded_client_cert {
        headers.insert(FORWARDED_CLIENT_CERT, value.clone());
    }
}

pub const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

/// Envoy's `X-Forwarded-Client-Cert` for a mutual TLS client:
/// `By=<this pod's SPIFFE ID>;Hash=<SHA-256 of the client's certificate>;URI=<its SPIFFE ID>`.
pub fn forwarded_client_cert(
    server: &impl std::fmt::Display,
    fingerprint: &[u8; 32],
    client: &impl std::fmt::Display,
) -> Option<HeaderValue> {
    let hash: String = fingerprint.iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("By={server};Hash={hash};URI={client}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_a_forged_client_cert_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(
            FORWARDED_CLIENT_CERT,
            HeaderValue::from_static("URI=spiffe://cluster.local/ns/admin/sa/root"),
        );
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        prepare_headers(&mut headers, false, None);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);

        let ours = HeaderValue::from_static("By=a;Hash=b;URI=c");
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.append(
            FORWARDED_CLIENT_CERT,
            HeaderValue::from_static("URI=forged"),
        );
        prepare_headers(&mut headers, false, Some(&ours));
        assert_eq!(headers.get_all(FORWARDED_CLIENT_CERT).iter().count(), 1);
        assert_eq!(headers[FORWARDED_CLIENT_CERT], ours);
        assert_eq!(headers[header::TE], "trailers");
    }

    #[test]
    fn an_upgrade_keeps_its_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&headers));
        prepare_headers(&mut headers, true, None);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "Upgrade");
    }

    #[test]
    fn grpc_denials_are_trailers_only_with_the_grpc_status() {
        let response = answer(StatusCode::FORBIDDEN, ACCESS_DENIED, true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "7");
        assert_eq!(response.headers()["grpc-message"], "RBAC: access denied");
        let response = answer(StatusCode::UNAUTHORIZED, "bad token: 100%", true);
        assert_eq!(response.headers()["grpc-status"], "16");
        assert_eq!(response.headers()["grpc-message"], "bad token: 100%25");
        let response = answer(StatusCode::FORBIDDEN, ACCESS_DENIED, false);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_client_cert_header_names_both_identities_and_the_hash() {
        let value = forwarded_client_cert(
            &"spiffe://td/ns/a/sa/b",
            &[0xab; 32],
            &"spiffe://td/ns/c/sa/d",
        )
        .unwrap();
        let text = value.to_str().unwrap();
        assert!(
            text.starts_with("By=spiffe://td/ns/a/sa/b;Hash=abab"),
            "{text}"
        );
        assert!(text.ends_with(";URI=spiffe://td/ns/c/sa/d"), "{text}");
    }
}
