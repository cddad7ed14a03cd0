//! W3C Trace Context (`traceparent`, `tracestate`) for upstream requests.
//!
//! A valid `traceparent` from the client goes upstream unchanged (with its
//! `tracestate`), whatever `forward_headers` says, so a backend's spans join
//! the caller's trace. Without one (or with an invalid one) Backstop starts
//! a trace: a random trace id and parent id, flagged sampled so backends
//! record it. Only when Backstop exports the request's spans (the `otlp`
//! feature, `[otlp] enabled`, and the trace sampled) does an attempt's
//! `traceparent` name Backstop's own span as the parent (`otel::spans`);
//! otherwise the parent id is never replaced, as a span that is not exported
//! would point backends at a span that exists nowhere.
//!
//! This module never fails a request: a malformed header is replaced.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use rand::Rng;

use crate::headers::RequestNames;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace context of one request.
#[derive(Debug, Clone)]
pub struct TraceContext {
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
    /// Whether the context came from the client (else Backstop started it).
    incoming: bool,
}

/// The fields of a `traceparent` as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceContext {
    /// The client's context if its `traceparent` is valid, else a new one
    /// (also for two `traceparent` lines, which may name two traces).
    /// `headers` are the client's, of which `client` was found.
    pub fn from_client(client: &RequestNames<'_>, headers: &HeaderMap) -> TraceContext {
        let incoming = client
            .traceparent
            .filter(|v| client.traceparent_lines == 1 && v.to_str().is_ok_and(is_valid));
        match incoming {
            Some(tp) => TraceContext {
                traceparent: tp.clone(),
                tracestate: match client.tracestate_lines {
                    0 | 1 => client.tracestate.cloned(),
                    _ => joined_lines(headers),
                },
                incoming: true,
            },
            None => TraceContext::new_root(),
        }
    }

    fn new_root() -> TraceContext {
        // All-zero ids are invalid; a random u128/u64 is zero with
        // negligible odds, and `max(1)` removes even those.
        let (trace_id, parent_id) =
            crate::ids::with_rng(|rng| (rng.random::<u128>().max(1), rng.random::<u64>().max(1)));
        TraceContext {
            traceparent: encode(TraceIds {
                trace_id,
                parent_id,
                flags: SAMPLED,
            }),
            tracestate: None,
            incoming: false,
        }
    }

    /// A trace Backstop started with these ids (the OTLP exporter's root
    /// span, whose trace id the SDK chose).
    pub fn started(ids: TraceIds) -> TraceContext {
        TraceContext {
            traceparent: encode(ids),
            tracestate: None,
            incoming: false,
        }
    }

    /// Whether the client sent this context (else Backstop started it).
    pub fn is_incoming(&self) -> bool {
        self.incoming
    }

    /// The trace id, parent id and flags as numbers.
    pub fn ids(&self) -> TraceIds {
        let b = self.traceparent.as_bytes();
        // Validated (or written) on creation: 55 bytes or more, lowercase hex.
        let hex = |r: std::ops::Range<usize>| {
            b.get(r)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u128::from_str_radix(d, 16).ok())
                .unwrap_or(0)
        };
        TraceIds {
            trace_id: hex(3..35),
            parent_id: hex(36..52) as u64,
            flags: hex(53..55) as u8,
        }
    }

    /// The client's `tracestate`, if it sent one with a valid `traceparent`.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }

    /// The 32-hex-digit trace id (for logs).
    pub fn trace_id(&self) -> &str {
        self.traceparent
            .to_str()
            .ok()
            .and_then(|s| s.get(3..35))
            .unwrap_or("")
    }

    /// The `traceparent` sent upstream.
    pub fn traceparent(&self) -> &HeaderValue {
        &self.traceparent
    }
}

/// The `sampled` trace flag.
pub const SAMPLED: u8 = 0x01;

/// `00-{trace_id:032x}-{parent_id:016x}-{flags:02x}`, written by hand: this
/// runs for most requests and `format!` costs several times more.
pub fn encode(ids: TraceIds) -> HeaderValue {
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
    write_hex(&ids.trace_id.to_be_bytes(), &mut value[3..35]);
    write_hex(&ids.parent_id.to_be_bytes(), &mut value[36..52]);
    write_hex(&[ids.flags], &mut value[53..55]);
    // Hex digits and dashes are always a valid header value. Owned this
    // way the bytes are shared from the start: the value is cloned for
    // the upstream request, and a copied `Vec` would be moved into a
    // shared allocation at its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(value))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Writes `bytes` as lowercase hex into `out`, two digits per byte, a
/// byte at a time from a table (a digit at a time, shifting a `u128`, cost
/// about 150 more instructions per new trace context).
fn write_hex(bytes: &[u8], out: &mut [u8]) {
    for (digits, byte) in out.chunks_exact_mut(2).zip(bytes) {
        digits.copy_from_slice(&HEX_PAIRS[usize::from(*byte)]);
    }
}

/// The two lowercase hex digits of every byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let digits = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [digits[i >> 4], digits[i & 0xf]];
        i += 1;
    }
    pairs
};

/// `version-traceid-parentid-flags`, lowercase hex, non-zero ids, version
/// not `ff`. Later versions may append fields after the flags.
fn is_valid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 55 || (b.len() > 55 && b[55] != b'-') {
        return false;
    }
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    hex(0..2)
        && &b[0..2] != b"ff"
        && (&b[0..2] != b"00" || b.len() == 55)
        && b[2] == b'-'
        && hex(3..35)
        && !zero(3..35)
        && b[35] == b'-'
        && hex(36..52)
        && !zero(36..52)
        && b[52] == b'-'
        && hex(53..55)
}

/// Several `tracestate` lines as the one list they make (W3C Trace Context
/// §3.3.1.2: combined as HTTP combines fields, with commas, in order);
/// none when the result is not a header value.
fn joined_lines(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut list = Vec::new();
    for line in headers.get_all(TRACESTATE) {
        if !list.is_empty() {
            list.push(b',');
        }
        list.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&list).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn validates_traceparent() {
        for (value, ok) in [
            (VALID, true),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                true,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                false,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                false,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                true,
            ),
            ("", false),
        ] {
            assert_eq!(is_valid(value), ok, "{value}");
        }
    }

    #[test]
    fn writes_zero_padded_lowercase_hex() {
        let mut out = [0u8; 16];
        write_hex(&0xab_cdef_u64.to_be_bytes(), &mut out);
        assert_eq!(&out, b"0000000000abcdef");
        let mut out = [0u8; 32];
        write_hex(&u128::MAX.to_be_bytes(), &mut out);
        assert_eq!(&out, b"ffffffffffffffffffffffffffffffff");
        let mut out = [0u8; 32];
        write_hex(
            &0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128.to_be_bytes(),
            &mut out,
        );
        assert_eq!(&out, b"0123456789abcdeffedcba9876543210");
        for byte in 0..=255u8 {
            let mut out = [0u8; 2];
            write_hex(&[byte], &mut out);
            assert_eq!(out, *format!("{byte:02x}").as_bytes());
        }
    }

    #[test]
    fn keeps_a_valid_context_and_creates_one_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let ctx = TraceContext::from_client(&RequestNames::find(&h), &h);
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(ctx.is_incoming());
        let ids = ctx.ids();
        assert_eq!(ids.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ids.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(ids.flags, SAMPLED);
        assert_eq!(encode(ids), VALID, "encode is the inverse of ids");
        assert_eq!(ctx.traceparent(), VALID);
        assert_eq!(ctx.tracestate().unwrap(), "k=v");
        h.append(TRACESTATE, HeaderValue::from_static("a=1,b=2"));
        let ctx = TraceContext::from_client(&RequestNames::find(&h), &h);
        assert_eq!(
            ctx.tracestate().unwrap(),
            "k=v,a=1,b=2",
            "every line, in order"
        );

        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        let ctx = TraceContext::from_client(&RequestNames::find(&h), &h);
        let tp = ctx.traceparent().to_str().unwrap();
        assert!(is_valid(tp), "{tp}");
        assert!(!ctx.is_incoming());
        assert_eq!(ctx.ids().flags, SAMPLED, "a new trace is flagged sampled");
        assert!(ctx.tracestate().is_none(), "no tracestate with a new trace");

        // Two lines may name two traces: neither is taken.
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        let ctx = TraceContext::from_client(&RequestNames::find(&h), &h);
        assert!(!ctx.is_incoming());
        assert_ne!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(ctx.tracestate().is_none());
    }
}
