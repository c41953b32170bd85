//! W3C Trace Context on HBONE `CONNECT` requests: like ztunnel, the client proxy starts a
//! trace per tunnelled connection and sends it as `traceparent`; both proxies log its trace
//! ID, so the two access-log lines of one connection can be joined. Telemetry only: a
//! peer's `traceparent` is never a reason for a decision.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Serialize, Serializer};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The only version of the format there is; a later one must still begin like it.
const VERSION: u8 = 0;

/// A `traceparent`: `version-traceid-parentid-flags`, lowercase hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: u64,
    pub flags: u8,
}

/// A trace's 16-byte ID; never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId(u128);

impl TraceParent {
    /// A new trace, not sampled (the proxy records no spans).
    pub fn random() -> Self {
        let rng = SystemRandom::new();
        let mut bytes = [0u8; 24];
        loop {
            // The system's generator only fails when it is not there at all.
            rng.fill(&mut bytes).expect("the system's random generator");
            let trace_id = u128::from_be_bytes(bytes[..16].try_into().expect("16 bytes"));
            let parent_id = u64::from_be_bytes(bytes[16..].try_into().expect("8 bytes"));
            if trace_id != 0 && parent_id != 0 {
                return Self {
                    trace_id: TraceId(trace_id),
                    parent_id,
                    flags: 0,
                };
            }
        }
    }

    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.to_string()).expect("hex digits are a valid header value")
    }

    /// The request's `traceparent`, if it has exactly one that is well formed.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => Self::parse(value.to_str().ok()?),
            _ => None,
        }
    }

    /// Parses as the specification asks: version 00 is exactly four fields; a later
    /// version may append fields after a dash; all-zero IDs and version `ff` are invalid.
    pub fn parse(text: &str) -> Option<Self> {
        let mut fields = text.splitn(5, '-');
        let version = hex_field(fields.next()?, 2)?;
        let trace_id = hex_field(fields.next()?, 32)?;
        let parent_id = hex_field(fields.next()?, 16)?;
        let flags = hex_field(fields.next()?, 2)?;
        let rest_ok = match fields.next() {
            None => true,
            Some(_) => version > u128::from(VERSION),
        };
        (rest_ok && version != 0xff && trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id: TraceId(trace_id),
            parent_id: parent_id as u64,
            flags: flags as u8,
        })
    }
}

/// A field of exactly `len` lowercase hex digits.
fn hex_field(field: &str, len: usize) -> Option<u128> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    (field.len() == len && field.bytes().all(lower_hex))
        .then(|| u128::from_str_radix(field, 16).ok())
        .flatten()
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERSION:02x}-{}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// As the 32 hex digits tracing systems show.
impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_trace_is_sent_as_ztunnel_formats_it_and_reads_back() {
        let trace = TraceParent::random();
        let text = trace.to_string();
        assert_eq!(text.len(), 55, "{text}");
        assert!(text.starts_with("00-") && text.ends_with("-00"), "{text}");
        assert_eq!(TraceParent::parse(&text), Some(trace));
        assert_ne!(TraceParent::random(), trace);
    }

    #[test]
    fn only_well_formed_values_are_read() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(good).unwrap();
        assert_eq!(
            parsed.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!((parsed.parent_id, parsed.flags), (0x00f0_67aa_0ba9_02b7, 1));
        assert_eq!(parsed.to_string(), good);
        // A later version may carry more fields; version 00 may not.
        assert!(TraceParent::parse(&format!("01{}-extra", &good[2..])).is_some());
        for bad in [
            &format!("{good}-extra"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn two_traceparents_are_none() {
        let mut headers = HeaderMap::new();
        assert_eq!(TraceParent::from_headers(&headers), None);
        headers.append(TRACEPARENT, TraceParent::random().header());
        assert!(TraceParent::from_headers(&headers).is_some());
        headers.append(TRACEPARENT, TraceParent::random().header());
        assert_eq!(TraceParent::from_headers(&headers), None);
    }
}
