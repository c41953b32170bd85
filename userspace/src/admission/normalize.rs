//! What a request must look like before it is authorized: its path normalized the way
//! Istio's strictest `meshConfig.pathNormalization` (`DECODE_AND_MERGE_SLASHES`) does, and
//! its HTTP/1 framing free of request-smuggling shapes. The HTTP proxy calls both on every
//! request before authorization and forwards the normalized request, so what the policy
//! matched is what the application sees (as Envoy forwards its normalized path).
//!
//! Pure functions over strings and header maps: no I/O, no allocation beyond the
//! normalized path, and no regular expression anywhere.

use http::{HeaderMap, header};

/// A request target reduced to what policies match: the normalized path, and the query
/// string kept byte for byte (policies never match it).
///
/// Invariant (enforced by [`normalize_path`], the only constructor): `text[..path_len]` is
/// a normalized absolute path, and `text[path_len..]` is empty or `?` plus the query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized {
    text: String,
    path_len: usize,
}

impl Normalized {
    /// The path policies match (`paths`, `notPaths`): never empty, starts with `/`.
    pub fn path(&self) -> &str {
        &self.text[..self.path_len]
    }

    /// The query string without its `?`, as received.
    pub fn query(&self) -> Option<&str> {
        self.text[self.path_len..].strip_prefix('?')
    }

    /// The request target to forward to the application: the normalized path and the
    /// untouched query.
    pub fn path_and_query(&self) -> &str {
        &self.text
    }
}

/// Why a request target is refused (the proxy answers 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not origin-form (`/path?query`): asterisk-form (`OPTIONS *`) and anything else
    /// name no path a policy could match.
    #[error("request target does not start with '/' (only origin-form is accepted)")]
    NotOriginForm,
    /// A `#`: user agents never send fragments, so one on the wire is an evasion attempt.
    #[error("request target has a fragment ('#' at byte {at})")]
    Fragment { at: usize },
    /// A control character, space, DEL or non-ASCII byte, none of which is valid in a
    /// request target (RFC 3986 §2).
    #[error("request target has invalid byte 0x{byte:02x} at byte {at}")]
    InvalidByte { at: usize, byte: u8 },
    /// A `%` not followed by two hexadecimal digits.
    #[error("request target has an invalid percent-encoding at byte {at}")]
    InvalidPercentEncoding { at: usize },
    /// `%00`: Istio always rejects it, as C-string applications would truncate there.
    #[error("request target has an encoded NUL (%00) at byte {at}")]
    EncodedNul { at: usize },
}

impl PathError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotOriginForm => "not_origin_form",
            Self::Fragment { .. } => "fragment",
            Self::InvalidByte { .. } => "invalid_byte",
            Self::InvalidPercentEncoding { .. } => "invalid_percent_encoding",
            Self::EncodedNul { .. } => "encoded_nul",
        }
    }
}

/// Normalizes the path of `path_and_query` (a request's origin-form target) as Istio's
/// `DECODE_AND_MERGE_SLASHES` does, in Envoy's order:
///
/// 1. percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded
///    (`%2e` is `.`, `%41` is `A`), and so are `%2F` and `%5C`; every other encoding is
///    kept with its hex digits in upper case, so `%3b` and `%3B` match alike. Decoding
///    happens once: `%252e` stays `%252E`.
/// 2. `\` becomes `/` (Envoy's `normalize_path`, and what Windows-minded servers do);
/// 3. dot segments are removed per RFC 3986 §5.2.4 (`/a/../b` is `/b`, `/./b` is `/b`,
///    and `..` above the root stays at the root);
/// 4. runs of `/` are merged (`//admin` is `/admin`).
///
/// `%2F` and `%5C` are decoded and merged, as Istio documents for this mode, rather than
/// refused: the proxy forwards the normalized path, so the application sees exactly
/// what was authorized and an encoded slash can no longer name a path that a policy did
/// not see. The cost, shared with Istio, is that an application which puts encoded
/// slashes inside one segment (object keys, say) sees them as separators.
///
/// The query string is validated (no invalid bytes, no `#`) but never changed or matched.
///
/// Sources: istio.io "Authorization Policy Normalization" (the `%HH` table, `%00`
/// rejected) and the Red Hat OpenShift Service Mesh "path normalization" page (the
/// `NONE`/`BASE`/`MERGE_SLASHES`/`DECODE_AND_MERGE_SLASHES` order of steps).
pub fn normalize_path(path_and_query: &str) -> Result<Normalized, PathError> {
    let bytes = path_and_query.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let path_end = bytes.iter().position(|&b| b == b'?').unwrap_or(bytes.len());
    for (at, &byte) in bytes.iter().enumerate() {
        if byte == b'#' {
            return Err(PathError::Fragment { at });
        }
        if !byte.is_ascii_graphic() {
            return Err(PathError::InvalidByte { at, byte });
        }
    }
    let decoded = decode(&bytes[..path_end])?;
    let mut text = remove_dot_segments_and_merge(&decoded);
    let path_len = text.len();
    text.push_str(&path_and_query[path_end..]);
    Ok(Normalized { text, path_len })
}

/// Step 1 and 2: percent-decoding of unreserved characters and slashes, backslashes to
/// slashes. `path` holds only graphic ASCII (checked by the caller).
fn decode(path: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let byte = path[i];
        if byte == b'%' {
            let (Some(hi), Some(lo)) = (
                path.get(i + 1).and_then(|&b| hex(b)),
                path.get(i + 2).and_then(|&b| hex(b)),
            ) else {
                return Err(PathError::InvalidPercentEncoding { at: i });
            };
            match hi << 4 | lo {
                0 => return Err(PathError::EncodedNul { at: i }),
                b'/' | b'\\' => out.push(b'/'),
                c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                    out.push(c)
                }
                c => {
                    out.push(b'%');
                    out.extend_from_slice(&[
                        HEX_UPPER[usize::from(c >> 4)],
                        HEX_UPPER[usize::from(c & 0xf)],
                    ]);
                }
            }
            i += 3;
        } else {
            out.push(if byte == b'\\' { b'/' } else { byte });
            i += 1;
        }
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Steps 3 and 4 on a decoded path that starts with `/`. Working on segments makes both
/// one pass: `.` and empty segments are dropped (which also merges slashes), `..` drops
/// the previous kept segment. Envoy removes dot segments before merging, so in
/// `/a//../b` the `..` removes the empty segment and the result is `/a/b`; this keeps
/// that order by tracking empty segments until the `..` that may consume them.
fn remove_dot_segments_and_merge(path: &[u8]) -> String {
    // Every segment is a slice of `path`, which is graphic ASCII, so each is valid UTF-8.
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut segments = path[1..].split(|&b| b == b'/').peekable();
    let mut trailing_slash = false;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            b"." => trailing_slash = last,
            b".." => {
                kept.pop();
                trailing_slash = last;
            }
            _ => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in kept.iter().filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(std::str::from_utf8(segment).unwrap_or_default());
    }
    // A trailing slash (an empty last segment, or a last `.`/`..`) is kept: `/a/` and
    // `/a` are different resources to most applications.
    if out.is_empty() || trailing_slash || kept.last().is_some_and(|s| s.is_empty()) {
        out.push('/');
    }
    out
}

/// A request framing that a proxy and an application could read differently (request
/// smuggling): the proxy answers 400 and forwards nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Both headers: RFC 9112 §6.1 lets a server reject it, and it is the classic
    /// CL.TE/TE.CL desynchronisation.
    #[error("request has both Content-Length and Transfer-Encoding")]
    ContentLengthAndTransferEncoding,
    /// More than one `Content-Length` line or value, even equal ones: a proxy that
    /// re-frames the body gains nothing from accepting them.
    #[error("request has {count} Content-Length values")]
    RepeatedContentLength { count: usize },
    /// A `Content-Length` that is not a plain decimal number.
    #[error("request has an invalid Content-Length {value:?}")]
    InvalidContentLength { value: String },
    /// Any `Transfer-Encoding` other than exactly one `chunked` (several lines, other
    /// codings, `chunked` not last): as Envoy, only chunked is supported.
    #[error("request has Transfer-Encoding {value:?}; only \"chunked\" is accepted")]
    UnsupportedTransferEncoding { value: String },
    /// More than one `Host` line: which one names the authority is ambiguous.
    #[error("request has {count} Host headers")]
    RepeatedHost { count: usize },
}

impl FramingError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ContentLengthAndTransferEncoding => "content_length_and_transfer_encoding",
            Self::RepeatedContentLength { .. } => "repeated_content_length",
            Self::InvalidContentLength { .. } => "invalid_content_length",
            Self::UnsupportedTransferEncoding { .. } => "unsupported_transfer_encoding",
            Self::RepeatedHost { .. } => "repeated_host",
        }
    }
}

/// Refuses request headers whose framing is ambiguous (HTTP/1.x request smuggling), as
/// they reach the service after the HTTP server parsed them.
///
/// What hyper 1's HTTP/1 server already does (the `hyper_*` tests of this module):
/// - it answers 400 itself for differing or non-numeric `Content-Length`s, a
///   `Content-Length` list, `chunked` not last, and `Transfer-Encoding` in HTTP/1.0;
/// - for `Content-Length` with `Transfer-Encoding: chunked` it reads the body as chunked,
///   **removes `Content-Length`** and closes the connection after answering (RFC 9112
///   §6.1), so the request reaches the service as a plain chunked one: this function
///   cannot see it behind hyper, and no request can be smuggled behind it either;
/// - it merges repeated equal `Content-Length` lines into one;
/// - it serves, and hands on, a coding list ending in `chunked` (`gzip, chunked`),
///   repeated `Transfer-Encoding` lines and repeated `Host` lines, which this refuses.
///
/// The checks do not rely on hyper: the same rules hold for any parser in front.
pub fn check_framing(headers: &HeaderMap) -> Result<(), FramingError> {
    let lengths = headers.get_all(header::CONTENT_LENGTH);
    let codings = headers.get_all(header::TRANSFER_ENCODING);
    let has_coding = codings.iter().next().is_some();
    let mut length_values = 0;
    for line in lengths {
        if has_coding {
            return Err(FramingError::ContentLengthAndTransferEncoding);
        }
        for value in line.as_bytes().split(|&b| b == b',') {
            length_values += 1;
            let value = value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(FramingError::InvalidContentLength {
                    value: String::from_utf8_lossy(line.as_bytes()).into_owned(),
                });
            }
        }
    }
    if length_values > 1 {
        return Err(FramingError::RepeatedContentLength {
            count: length_values,
        });
    }
    let mut coding_lines = codings.iter();
    if let Some(first) = coding_lines.next() {
        let chunked_only = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !chunked_only || coding_lines.next().is_some() {
            let all: Vec<_> = codings
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            return Err(FramingError::UnsupportedTransferEncoding {
                value: all.join(", "),
            });
        }
    }
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(FramingError::RepeatedHost { count: hosts });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
