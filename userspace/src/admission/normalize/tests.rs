//! Tables of hostile request targets and header sets, and what hyper 1's HTTP/1 server
//! does with smuggling shapes before a service sees them (raw bytes over a duplex pipe).

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;

/// (request target, normalized path, query) or the error.
type PathCase = (
    &'static str,
    Result<(&'static str, Option<&'static str>), PathError>,
);

#[test]
fn normalize_path_table() {
    use PathError::*;
    let cases: &[PathCase] = &[
        ("/", Ok(("/", None))),
        ("/admin", Ok(("/admin", None))),
        ("/admin/", Ok(("/admin/", None))),
        // Merged slashes.
        ("//admin", Ok(("/admin", None))),
        ("/a//b///c", Ok(("/a/b/c", None))),
        // Dot segments.
        ("/./admin", Ok(("/admin", None))),
        ("/a/../admin", Ok(("/admin", None))),
        ("/a/b/../../admin", Ok(("/admin", None))),
        ("/..", Ok(("/", None))),
        ("/../admin", Ok(("/admin", None))),
        ("/../../../admin", Ok(("/admin", None))),
        ("/admin/.", Ok(("/admin/", None))),
        ("/admin/x/..", Ok(("/admin/", None))),
        ("/a..b/.c/..d", Ok(("/a..b/.c/..d", None))),
        // Envoy removes dot segments before merging slashes: `..` eats the empty segment.
        ("/a//../b", Ok(("/a/b", None))),
        // Percent-decoding of unreserved characters, once.
        ("/%2e%2e/admin", Ok(("/admin", None))),
        ("/a/%2E%2E/admin", Ok(("/admin", None))),
        ("/%2e/admin", Ok(("/admin", None))),
        ("/%61dmin", Ok(("/admin", None))),
        ("/%41%44MIN", Ok(("/ADMIN", None))),
        ("/%7euser/%2d%5f", Ok(("/~user/-_", None))),
        ("/a%252e%252e/b", Ok(("/a%252e%252e/b", None))),
        ("/a%3bb/%c3%a9", Ok(("/a%3Bb/%C3%A9", None))),
        // Encoded and literal slashes and backslashes.
        ("/a%2Fadmin", Ok(("/a/admin", None))),
        ("/%2fadmin", Ok(("/admin", None))),
        ("/%2F%2Fadmin", Ok(("/admin", None))),
        ("/a/..%2Fadmin", Ok(("/admin", None))),
        ("/a%5Cadmin", Ok(("/a/admin", None))),
        ("/a%5c..%5cadmin", Ok(("/admin", None))),
        ("/a\\..\\admin", Ok(("/admin", None))),
        ("/\\admin", Ok(("/admin", None))),
        // The query is kept as is and never normalized.
        ("/admin?x=1", Ok(("/admin", Some("x=1")))),
        ("/public?/admin", Ok(("/public", Some("/admin")))),
        ("/a/../b?%2e%2e=//", Ok(("/b", Some("%2e%2e=//")))),
        ("/admin?", Ok(("/admin", Some("")))),
        ("/?a?b", Ok(("/", Some("a?b")))),
        // Refused.
        ("", Err(NotOriginForm)),
        ("*", Err(NotOriginForm)),
        ("admin", Err(NotOriginForm)),
        ("http://a/admin", Err(NotOriginForm)),
        ("%2Fadmin", Err(NotOriginForm)),
        ("/admin#x", Err(Fragment { at: 6 })),
        ("/public?q#/admin", Err(Fragment { at: 9 })),
        ("/a%23b", Ok(("/a%23b", None))),
        ("/ad min", Err(InvalidByte { at: 3, byte: b' ' })),
        ("/admin\t", Err(InvalidByte { at: 6, byte: b'\t' })),
        ("/admin\0", Err(InvalidByte { at: 6, byte: 0 })),
        ("/a\x7f", Err(InvalidByte { at: 2, byte: 0x7f })),
        ("/é", Err(InvalidByte { at: 1, byte: 0xc3 })),
        ("/x?a\nb", Err(InvalidByte { at: 4, byte: b'\n' })),
        ("/a%2", Err(InvalidPercentEncoding { at: 2 })),
        ("/a%zz", Err(InvalidPercentEncoding { at: 2 })),
        ("/a%", Err(InvalidPercentEncoding { at: 2 })),
        ("/a%00b", Err(EncodedNul { at: 2 })),
    ];
    let mut failures = Vec::new();
    for (target, want) in cases {
        let got = normalize_path(target);
        let got_parts = got
            .as_ref()
            .map(|n| (n.path(), n.query()))
            .map_err(Clone::clone);
        if got_parts != *want {
            failures.push(format!("{target:?}: got {got_parts:?}, want {want:?}"));
        }
        if let Ok(n) = &got {
            // Normalizing twice changes nothing, so the application and a second check
            // (a re-authorization) see the same path.
            let again = normalize_path(n.path_and_query()).expect("normalized path re-parses");
            if again != *n {
                failures.push(format!("{target:?}: not idempotent: {n:?} then {again:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn normalized_forwards_the_query_untouched() {
    let n = normalize_path("/a/./b//c?x=%2e%2E&y=/../").unwrap();
    assert_eq!(n.path_and_query(), "/a/b/c?x=%2e%2E&y=/../");
}

fn headers(lines: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in lines {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

/// (case name, header lines, expectation).
type FramingCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    Result<(), FramingError>,
);

#[test]
fn check_framing_table() {
    use FramingError::*;
    let te = |v: &str| UnsupportedTransferEncoding { value: v.into() };
    let cases: &[FramingCase] = &[
        ("no body", &[("host", "a")], Ok(())),
        ("content-length", &[("content-length", "12")], Ok(())),
        ("chunked", &[("transfer-encoding", "chunked")], Ok(())),
        (
            "chunked any case",
            &[("transfer-encoding", " Chunked ")],
            Ok(()),
        ),
        (
            "te: trailers is not transfer-encoding",
            &[("te", "trailers"), ("content-length", "5")],
            Ok(()),
        ),
        (
            "CL+TE",
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            Err(ContentLengthAndTransferEncoding),
        ),
        (
            "TE+CL",
            &[("transfer-encoding", "chunked"), ("content-length", "0")],
            Err(ContentLengthAndTransferEncoding),
        ),
        (
            "two equal CL lines",
            &[("content-length", "5"), ("content-length", "5")],
            Err(RepeatedContentLength { count: 2 }),
        ),
        (
            "two different CL lines",
            &[("content-length", "5"), ("content-length", "6")],
            Err(RepeatedContentLength { count: 2 }),
        ),
        (
            "CL list",
            &[("content-length", "5, 5")],
            Err(RepeatedContentLength { count: 2 }),
        ),
        (
            "signed CL",
            &[("content-length", "+5")],
            Err(InvalidContentLength { value: "+5".into() }),
        ),
        (
            "hex CL",
            &[("content-length", "0x5")],
            Err(InvalidContentLength {
                value: "0x5".into(),
            }),
        ),
        (
            "empty CL",
            &[("content-length", "")],
            Err(InvalidContentLength { value: "".into() }),
        ),
        (
            "gzip, chunked",
            &[("transfer-encoding", "gzip, chunked")],
            Err(te("gzip, chunked")),
        ),
        (
            "chunked, gzip",
            &[("transfer-encoding", "chunked, gzip")],
            Err(te("chunked, gzip")),
        ),
        (
            "identity",
            &[("transfer-encoding", "identity")],
            Err(te("identity")),
        ),
        (
            "chunked twice",
            &[("transfer-encoding", "chunked, chunked")],
            Err(te("chunked, chunked")),
        ),
        (
            "two TE lines",
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            Err(te("chunked, chunked")),
        ),
        (
            "xchunked",
            &[("transfer-encoding", "xchunked")],
            Err(te("xchunked")),
        ),
        (
            "two hosts",
            &[("host", "a"), ("host", "b")],
            Err(RepeatedHost { count: 2 }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, lines, want) in cases {
        let got = check_framing(&headers(lines));
        if got != *want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// What hyper 1's HTTP/1 server hands a service for the raw bytes `raw` on one
/// connection: each request it served (path, headers, body), and everything it answered.
async fn through_hyper(raw: &[u8]) -> (Vec<(String, HeaderMap, Vec<u8>)>, String) {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper::{Response, body::Incoming, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes().to_vec());
            let _ = seen_tx.send((
                parts.uri.to_string(),
                parts.headers,
                body.unwrap_or_default(),
            ));
            let empty = http_body_util::Empty::<bytes::Bytes>::new();
            Ok::<_, std::convert::Infallible>(Response::new(empty))
        }
    });
    let conn = tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(server), service));
    client.write_all(raw).await.unwrap();
    // The client keeps its side open (hyper drops requests on a half-closed connection)
    // and reads until hyper closes or goes quiet: a duplex pipe answers at once.
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    while let Ok(Ok(n @ 1..)) =
        tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await
    {
        answer.extend_from_slice(&buf[..n]);
    }
    drop(client);
    let _ = conn.await;
    let mut seen = Vec::new();
    while let Ok(request) = seen_rx.try_recv() {
        seen.push(request);
    }
    (seen, String::from_utf8_lossy(&answer).into_owned())
}

/// hyper follows RFC 9112 §6.1 for CL+TE: it frames the body as chunked, removes
/// `Content-Length` before the service sees the request, and closes the connection
/// after answering, so a request smuggled behind it is never read. The service cannot
/// tell such a request from a plain chunked one, so `check_framing` cannot answer 400
/// for it behind hyper; the desynchronisation itself is impossible.
#[tokio::test]
async fn hyper_frames_cl_and_te_as_chunked_strips_content_length_and_closes() {
    let (seen, answer) = through_hyper(
        b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(seen.len(), 1, "only the first request is served: {seen:?}");
    let (path, headers, body) = &seen[0];
    assert_eq!((path.as_str(), body.as_slice()), ("/one", &b"abc"[..]));
    assert!(!headers.contains_key("content-length"), "{headers:?}");
    assert_eq!(headers.get_all("transfer-encoding").iter().count(), 1);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

#[tokio::test]
async fn hyper_merges_repeated_equal_content_lengths() {
    let (seen, _) = through_hyper(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    let (_, headers, body) = &seen[0];
    assert_eq!(body, b"abc");
    assert_eq!(headers.get_all("content-length").iter().count(), 1);
    assert_eq!(check_framing(headers), Ok(()));
}

#[tokio::test]
async fn hyper_refuses_ambiguous_lengths_and_codings_itself() {
    let cases: &[(&str, &[u8])] = &[
        (
            "different CL",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        ("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc"),
        ("signed CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc"),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
        ),
        (
            "TE in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    for (name, raw) in cases {
        let (seen, answer) = through_hyper(raw).await;
        assert!(
            seen.is_empty(),
            "{name}: the service must not see it: {seen:?}"
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "{name}: {answer}");
    }
}

/// Shapes hyper serves and hands on with their headers; `check_framing` refuses them.
#[tokio::test]
async fn hyper_passes_on_what_check_framing_refuses() {
    let cases: &[(&str, &[u8])] = &[
        (
            "gzip, chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "two TE lines",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let (seen, _) = through_hyper(raw).await;
        let [(_, headers, _)] = seen.as_slice() else {
            panic!("{name}: hyper should serve exactly one request: {seen:?}");
        };
        assert!(check_framing(headers).is_err(), "{name}: {headers:?}");
    }
}
