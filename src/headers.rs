//! Header rules of the request path: hop-by-hop removal (both ways), the
//! `forward_headers` filter, `X-Forwarded-*` / `Forwarded`, and the request id.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue, HOST};

use crate::config::ForwardHeaders;
use crate::traceparent::{TRACEPARENT, TRACESTATE};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers that frame a message or describe one connection: the proxy
/// writes or removes them itself, so configuration may not set them (a
/// configured value would be dropped on one way to the backend and misframe
/// the request on another). `Proxy-Authorization` and `-Authenticate`,
/// hop-by-hop too, stay configurable.
pub const PER_MESSAGE: [HeaderName; 8] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Headers kept even with `forward_headers = false`: those that describe
/// the body, without which the backend cannot read what it is sent, and
/// `TE`, which only ever gets this far as the `te: trailers` that gRPC
/// servers require (see [`strip_hop_by_hop_but_trailers`]). The four
/// forwarding headers are kept too ([`FORWARDING_NAMES`]): only a trusted
/// proxy's get this far, and Backstop appends to them.
const ALWAYS_FORWARDED: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::TE,
];

/// Makes the `cookie` fields of an HTTP/2 request one, joined with "; ":
/// HTTP/2 clients may send each cookie as a field of its own, and before
/// they go into an HTTP/1.1 request they must be one (RFC 9113 §8.2.3;
/// many HTTP/1.1 servers read only the first).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for more in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(more.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether the client's `TE` lists `trailers` (it takes an answer's
/// trailers), as gRPC clients always send.
fn offers_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .flat_map(|line| line.as_bytes().split(|b| *b == b','))
        .any(|item| {
            let coding = item.split(|b| *b == b';').next().unwrap_or_default();
            coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
}

/// Removes hop-by-hop headers as [`strip_hop_by_hop`] does, but for a `TE`
/// that offers trailers, which goes on as `te: trailers` when `keep` (the
/// route's backends answer through hyper's client, which passes trailers
/// on): gRPC servers refuse a request without it. It is the one `TE` an
/// HTTP/2 request may carry.
pub fn strip_hop_by_hop_but_trailers(headers: &mut HeaderMap, keep: bool) {
    let offered = keep && offers_trailers(headers);
    strip_hop_by_hop(headers);
    if offered {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether `name` is one of Backstop's own headers (`X-Backstop-Error`,
/// `-Capture-Id`, `-Replay-Attempt`), which only Backstop sets: a
/// backend's would reach the client as Backstop's word (a capture that
/// never happened), a client's the backend as a replay's.
pub fn is_own(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-backstop-")
}

/// Removes hop-by-hop headers, including those that `Connection` names,
/// and Backstop's own ([`is_own`]). `Connection` may not name away what a
/// trusted load balancer in front says of the client ([`is_client_claim`]):
/// a client that names them (`Connection: X-Forwarded-Prefix`, passed on by
/// a front proxy that set its own) would have Backstop drop the front
/// proxy's word after the cache key was made with it, and the backend
/// would see only the front proxy's own address.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (HTTP/1.1 keeps connections alive without
    // `Connection`): one pass over the few names present is cheaper than
    // nine removals, each hashing a name.
    // (Two passes: one closure with both tests made the array of names a
    // temporary built and dropped per header, +150 instructions a request.)
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) && !headers.keys().any(is_own) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        // Nor `Host`, which says where the request goes, not how this
        // connection works (and is read after this, on caching routes).
        .filter(|name| !is_client_claim(name) && name != HOST)
        .chain(headers.keys().filter(|name| is_own(name)).cloned())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// A `Content-Length` number: digits only (RFC 9110 §8.6, so no sign),
/// with the optional whitespace around them. Read as bytes: `str::trim`
/// and `str::parse` cost several times more on a value this short.
pub fn decimal(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// A `Content-Length` that states its length more than once (`5, 5`, or
/// two lines), which RFC 9110 §8.6 lets a recipient take as the one
/// number, is sent on as that number: a stricter client (or an HTTP/2 one)
/// would refuse the list. Lists that disagree are left as they are: the
/// reader refused them before this, but for answers that have no body
/// whatever their length says (to HEAD, 204, 304).
pub fn one_content_length(headers: &mut HeaderMap) {
    let mut length = None;
    let mut items = 0;
    for line in headers.get_all(header::CONTENT_LENGTH) {
        for item in line.as_bytes().split(|b| *b == b',') {
            items += 1;
            match (length, decimal(item)) {
                (None, Some(n)) => length = Some(n),
                (Some(before), Some(n)) if before == n => {}
                _ => return,
            }
        }
    }
    if let (Some(n), 2..) = (length, items) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// The length a message's `Content-Length` declares, if it is a number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    decimal(headers.get(header::CONTENT_LENGTH)?.as_bytes())
}

/// Whether an answer's `Transfer-Encoding` lines name `chunked` alone: the
/// one transfer coding a proxy can take off and frame anew. Another
/// (`gzip, chunked`) would reach the client unlabelled once the hop-by-hop
/// header is dropped; nginx refuses such an answer too. Codings over
/// several lines are a list: more than chunked.
pub fn only_chunked<'a>(mut lines: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let only = lines
        .next()
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"));
    only && lines.next().is_none()
}

/// Whether a comma-separated header value (`Connection`) lists `token`,
/// in any case.
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Where a field's name and value are in an HTTP/1 head, as byte ranges
/// from the head's start (name start and end, value start and end). Both
/// HTTP/1 readers (the server side's and `h1_client`) note fields this way
/// while the parser borrows the read buffer, then cut names and values
/// from the head's shared bytes once it is split off ([`field_in`]).
pub type FieldAt = (usize, usize, usize, usize);

/// Where `part`, a slice of `head`, starts in it.
#[inline]
pub fn offset_in(head: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - head.as_ptr() as usize
}

/// Where `name` and `value`, slices of `head`, are in it.
#[inline]
pub fn field_at(head: &[u8], name: &[u8], value: &[u8]) -> FieldAt {
    let name_at = offset_in(head, name);
    let value_at = offset_in(head, value);
    (
        name_at,
        name_at + name.len(),
        value_at,
        value_at + value.len(),
    )
}

/// The field noted at `at` in `head`: its value shares the head's bytes.
/// `None` for a name or value the `http` crate does not take. Inlined into
/// both readers: called, its result (a name and a value, ~70 bytes) went
/// through memory, about 100 instructions more per request (callgrind).
#[inline(always)]
pub fn field_in(head: &Bytes, at: FieldAt) -> Option<(HeaderName, HeaderValue)> {
    let (name_start, name_end, value_start, value_end) = at;
    let name = HeaderName::from_bytes(&head[name_start..name_end]).ok()?;
    let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end)).ok()?;
    Some((name, value))
}

/// `name: value` and the line end, as an HTTP/1 head carries a field.
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Applies `forward_headers`: which of the client's headers may go upstream.
pub fn filter_forwarded(headers: &mut HeaderMap, rule: &ForwardHeaders) {
    if *rule != ForwardHeaders::All {
        headers.keep_only(|name| forwards(rule, name));
    }
}

/// Whether `forward_headers` lets the client's header `name` go upstream.
fn forwards(rule: &ForwardHeaders, name: &HeaderName) -> bool {
    match rule {
        ForwardHeaders::All => true,
        ForwardHeaders::None => ALWAYS_FORWARDED.contains(name) || FORWARDING_NAMES.contains(name),
        ForwardHeaders::Only(allowed) => {
            ALWAYS_FORWARDED.contains(name)
                || FORWARDING_NAMES.contains(name)
                || allowed.contains(name)
        }
    }
}

/// Extension trait: keep only the headers whose name passes `keep`.
trait KeepOnly {
    fn keep_only(&mut self, keep: impl Fn(&HeaderName) -> bool);
}

impl KeepOnly for HeaderMap {
    fn keep_only(&mut self, keep: impl Fn(&HeaderName) -> bool) {
        let drop: Vec<HeaderName> = self.keys().filter(|n| !keep(n)).cloned().collect();
        for name in drop {
            self.remove(name);
        }
    }
}

/// What the proxy knows about the client side of a request. Made once per
/// connection (and shared by its requests), with the forwarding header
/// values it implies already rendered, so requests only clone them.
#[derive(Debug)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// `"http"` or `"https"`: the scheme the client used to reach Backstop.
    pub proto: &'static str,
    /// The client's IP, as `X-Forwarded-For` names it.
    ip: HeaderValue,
    /// `for=IP;proto=SCHEME`, this hop's `Forwarded` element without a host.
    forwarded: HeaderValue,
    /// The first host asked for on this connection and this hop's
    /// `Forwarded` element for it (naming it, if it can be named): a
    /// connection's requests nearly always ask for one host, so the element
    /// is rendered once, not per request. Set once and then only read (a
    /// plain load), where a lock was two locked instructions per request.
    forwarded_to_host: OnceLock<(HeaderValue, HeaderValue)>,
}

impl ClientInfo {
    pub fn new(addr: SocketAddr, proto: &'static str) -> ClientInfo {
        // An IPv4 client of a dual-stack listener is named by its IPv4
        // address, not the IPv6 one it is mapped to.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let ip = addr.ip().to_string();
        let forwarded = format!("for={};proto={proto}", for_node(addr.ip()));
        ClientInfo {
            addr,
            proto,
            // An IP address and these fixed words are always valid values.
            ip: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded: HeaderValue::from_str(&forwarded)
                .unwrap_or(HeaderValue::from_static("for=unknown")),
            forwarded_to_host: OnceLock::new(),
        }
    }

    /// This hop's `Forwarded` element, naming `host` when there is one it
    /// can name. Rendered, and `host` checked, once for the first host a
    /// connection asks for, not per request.
    fn forwarded_element(&self, host: Option<&HeaderValue>) -> HeaderValue {
        let Some(host) = host else {
            return self.forwarded.clone();
        };
        let (first_host, element) = self
            .forwarded_to_host
            .get_or_init(|| (host.clone(), self.render_forwarded(host)));
        if first_host == host {
            element.clone()
        } else {
            self.render_forwarded(host)
        }
    }

    fn render_forwarded(&self, host: &HeaderValue) -> HeaderValue {
        // Every part is valid in a header value: the join cannot fail.
        match forwarded_host(host.as_bytes()) {
            ForwardedHost::Token => {
                joined(&[self.forwarded.as_bytes(), b";host=", host.as_bytes()])
            }
            ForwardedHost::Quoted => joined(&[
                self.forwarded.as_bytes(),
                b";host=\"",
                host.as_bytes(),
                b"\"",
            ]),
            ForwardedHost::Unfit => None,
        }
        .unwrap_or_else(|| self.forwarded.clone())
    }
}

/// How `Forwarded` can carry a host (RFC 7239 §4: a parameter's value is a
/// token or a quoted string): as it is when it is a token, in quotes when
/// it also has a port's `:` or an IPv6 literal's brackets, and not at all
/// otherwise. A host with `;`, `,`, `=` or a quote is left out rather than
/// quoted: it is no real host, and a reader that splits the header without
/// minding quotes would take its parts for elements of their own.
#[derive(Debug, PartialEq)]
enum ForwardedHost {
    Token,
    Quoted,
    Unfit,
}

fn forwarded_host(host: &[u8]) -> ForwardedHost {
    if host.is_empty() {
        ForwardedHost::Unfit
    } else if host.iter().copied().all(is_tchar) {
        ForwardedHost::Token
    } else if host
        .iter()
        .all(|&b| is_tchar(b) || matches!(b, b':' | b'[' | b']'))
    {
        ForwardedHost::Quoted
    } else {
        ForwardedHost::Unfit
    }
}

/// A trusted peer's `Forwarded` line as this hop passes it on: whole (but
/// for empty elements at its ends), if it is a list of elements; else left
/// out, since an unbalanced quote would swallow this hop's element.
fn prior_elements(line: &[u8]) -> Option<&[u8]> {
    let mut pairs = 0;
    if !scan_forwarded(line, |_, _, _| pairs += 1) || pairs == 0 {
        return None;
    }
    without_empty_ends(line)
}

/// `Forwarded` elements for what a trusted proxy said only in
/// `X-Forwarded-*` (it sent no `Forwarded`): `for=` each address of its
/// `X-Forwarded-For`, the first element also with its `-Proto` and `-Host`
/// (the first request's scheme and host, RFC 7239 §4). Without them a
/// backend that reads `Forwarded` before `X-Forwarded-*` (Spring's
/// `ForwardedHeaderFilter`) would find this hop's element first, and take
/// the scheme and host the proxy reached Backstop with for the client's.
fn forwarded_from_x(
    prior_for: &[&[u8]],
    proto: Option<&HeaderValue>,
    host: Option<&HeaderValue>,
) -> Option<Vec<u8>> {
    let first_item = |value: &HeaderValue| {
        let item = value.as_bytes().split(|&b| b == b',').next()?.trim_ascii();
        Some(item.to_vec()).filter(|item| !item.is_empty())
    };
    let proto = proto
        .and_then(first_item)
        .filter(|p| p.iter().copied().all(is_tchar));
    let host = host
        .and_then(first_item)
        .and_then(|h| match forwarded_host(&h) {
            ForwardedHost::Token => Some(h),
            ForwardedHost::Quoted => Some([&b"\""[..], &h, b"\""].concat()),
            ForwardedHost::Unfit => None,
        });
    let claims = [(&b"proto="[..], proto), (&b"host="[..], host)]
        .into_iter()
        .filter_map(|(name, value)| Some([name, &value?].concat()));
    let mut elements: Vec<Vec<u8>> = prior_for
        .iter()
        .flat_map(|line| line.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let address = std::str::from_utf8(entry)
                .ok()
                .and_then(forwarded_for_address);
            let node = address.map_or_else(|| "unknown".to_string(), for_node);
            format!("for={node}").into_bytes()
        })
        .collect();
    // The claims are the first element's: with no address, all of it.
    if elements.is_empty() {
        elements.push(Vec::new());
    }
    let first = &mut elements[0];
    for claim in claims {
        if !first.is_empty() {
            first.push(b';');
        }
        first.extend(claim);
    }
    (!elements[0].is_empty()).then(|| elements.join(&b", "[..]))
}

/// An address as a `Forwarded` node (RFC 7239 §6): an IPv6 one quoted in
/// brackets.
fn for_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// The address of one `X-Forwarded-For` entry: an IP address, or one with
/// a port (`192.0.2.1:5678`, `[2001:db8::1]:5678`, as Azure's load balancers
/// write them), or a bracketed IPv6 address; an IPv4 address mapped to
/// IPv6 as the IPv4 one.
pub fn forwarded_for_address(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

/// A list's line without empty elements at either end, which would leave
/// `, ,` before this hop's element; `None` if nothing is left.
fn without_empty_ends(line: &[u8]) -> Option<&[u8]> {
    let edge = |b: &u8| matches!(b, b',' | b' ' | b'\t');
    let start = line.iter().position(|b| !edge(b))?;
    let end = line.iter().rposition(|b| !edge(b))?;
    Some(&line[start..=end])
}

/// The claims of a `Forwarded` line (`host`, `proto`: every parameter but
/// the nodes `for` and `by`), each `name=value` as written with the index
/// of its element; none from a line that does not parse, which is never
/// passed on.
pub fn forwarded_claims(line: &[u8]) -> Vec<(usize, &[u8])> {
    let mut claims = Vec::new();
    let parsed = scan_forwarded(line, |element, name, pair| {
        if !name.eq_ignore_ascii_case(b"for") && !name.eq_ignore_ascii_case(b"by") {
            claims.push((element, pair));
        }
    });
    if !parsed {
        claims.clear();
    }
    claims
}

/// Walks the pairs of a `Forwarded` line: `visit(element, name, pair)` for
/// each, `element` counting the line's elements from 0 and `pair` being
/// `name=value` as written. `false` if the line does not parse (then some
/// pairs may have been visited): a name is a token, a value a token or a
/// quoted string, pairs are split by `;` and elements by `,`.
fn scan_forwarded<'l>(line: &'l [u8], mut visit: impl FnMut(usize, &'l [u8], &'l [u8])) -> bool {
    let skip_blanks = |mut i: usize| {
        while line.get(i).is_some_and(|&b| b == b' ' || b == b'\t') {
            i += 1;
        }
        i
    };
    let token_end = |mut i: usize| {
        while line.get(i).copied().is_some_and(is_tchar) {
            i += 1;
        }
        i
    };
    let (mut element, mut i) = (0, skip_blanks(0));
    while i < line.len() {
        match line[i] {
            b',' => {
                element += 1;
                i = skip_blanks(i + 1);
                continue;
            }
            b';' => {
                i = skip_blanks(i + 1);
                continue;
            }
            _ => {}
        }
        let start = i;
        let name_end = token_end(i);
        if name_end == start || line.get(name_end) != Some(&b'=') {
            return false;
        }
        i = name_end + 1;
        if line.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match line.get(i) {
                    None => return false,
                    Some(b'\\') => i += 2,
                    Some(b'"') => break,
                    Some(_) => i += 1,
                }
            }
            i += 1;
        } else {
            let value_end = token_end(i);
            if value_end == i {
                return false;
            }
            i = value_end;
        }
        visit(element, &line[start..name_end], &line[start..i]);
        i = skip_blanks(i);
        if !matches!(line.get(i), None | Some(b',') | Some(b';')) {
            return false;
        }
    }
    true
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` (see
/// [`Forwarding::after_the_proxys`]). `original_host` is the host the client asked for.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: &ClientInfo,
    original_host: Option<&HeaderValue>,
) {
    Forwarding::new(client, original_host)
        .after_the_proxys(headers)
        .apply_to(headers);
}

/// This hop's forwarding headers for one request: `X-Forwarded-For` and
/// `Forwarded` naming the peer (appended to the lists a trusted peer
/// sent), and `X-Forwarded-Proto` and `-Host` (a trusted peer's, else
/// what this hop saw; `-Host` only when a host is known).
#[derive(Debug, Clone)]
pub struct Forwarding {
    forwarded_for: HeaderValue,
    forwarded_proto: HeaderValue,
    /// The host the client asked this hop for.
    forwarded_host: Option<HeaderValue>,
    /// A trusted peer's `X-Forwarded-Host`, which wins over this hop's.
    passed_host: Option<HeaderValue>,
    forwarded: HeaderValue,
}

impl Forwarding {
    /// This hop's values for a request from `client`; `original_host` is
    /// the host the client asked for.
    pub fn new(client: &ClientInfo, original_host: Option<&HeaderValue>) -> Forwarding {
        Forwarding {
            forwarded_for: client.ip.clone(),
            forwarded_proto: HeaderValue::from_static(client.proto),
            forwarded_host: original_host.cloned(),
            passed_host: None,
            forwarded: client.forwarded_element(original_host),
        }
    }

    /// With the values of the proxy in front taken in. Whatever forwarding
    /// headers are left in `client_headers` are a trusted proxy's (an
    /// untrusted peer's were removed on arrival, see
    /// [`strip_client_claims`]): its `X-Forwarded-For` and `Forwarded`
    /// lists are appended to, its `X-Forwarded-Proto` and `-Host` pass.
    /// Found in one pass over the request's few headers rather than a
    /// hashed lookup each; every line counts (RFC 9110 §5.3: repeated lines
    /// are one list). Out of line: most requests have no proxy in front.
    #[inline(never)]
    pub fn after_the_proxys(mut self, client_headers: &HeaderMap) -> Forwarding {
        let (mut prior_for, mut prior_forwarded) = (Vec::new(), Vec::new());
        let (mut proto, mut host) = (Vec::new(), Vec::new());
        for (name, value) in client_headers {
            let line = value.as_bytes();
            if name == X_FORWARDED_FOR {
                prior_for.extend(without_empty_ends(line));
            } else if name == header::FORWARDED {
                prior_forwarded.extend(prior_elements(line));
            } else if name == X_FORWARDED_PROTO {
                proto.extend(without_empty_ends(line));
            } else if name == X_FORWARDED_HOST {
                host.extend(without_empty_ends(line));
            }
        }
        let (proto, host) = (listed(&proto), listed(&host));
        let told_in_x = if prior_forwarded.is_empty() {
            forwarded_from_x(&prior_for, proto.as_ref(), host.as_ref())
        } else {
            None
        };
        prior_forwarded.extend(told_in_x.as_deref());
        self.forwarded_for = appended(&prior_for, self.forwarded_for.clone());
        self.forwarded = appended(&prior_forwarded, self.forwarded.clone());
        if let Some(proto) = proto {
            self.forwarded_proto = proto;
        }
        self.passed_host = host;
        self
    }

    /// The host the client asked this hop for, if it named one.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.forwarded_host.as_ref()
    }

    /// Each header with its value, in the order they are set.
    fn each(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let values = [
            Some(&self.forwarded_for),
            Some(&self.forwarded_proto),
            self.passed_host.as_ref().or(self.forwarded_host.as_ref()),
            Some(&self.forwarded),
        ];
        those_set(&FORWARDING_NAMES, values)
    }

    fn apply_to(&self, headers: &mut HeaderMap) {
        for (name, value) in self.each() {
            headers.insert(name.clone(), value.clone());
        }
        // No host known (an HTTP/1.0 request without `Host`): nothing
        // else may pass for one.
        if self.forwarded_host.is_none() && self.passed_host.is_none() {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// Whether `name` is one in which a request says something of its
/// client, the scheme, or the host and path it first asked for: the four
/// forwarding headers this hop sets, and those Rack, Rails, Spring, Django
/// (and `django-ipware`), Tornado, Werkzeug's `ProxyFix`, Express, IIS's
/// URL rewriting and nginx's `real_ip` read besides. From a peer that is
/// not a trusted proxy these are the client's word about itself: a
/// plain-HTTP client's `X-Forwarded-Ssl: on` would have a Rack backend
/// believe it came over HTTPS, its `X-Forwarded-For` would name whomever
/// it liked, its `X-Original-URL` would route a Symfony backend past the
/// path a rule was written for. A name spelled with `_` for `-` counts too:
/// servers that read both alike into one variable (CGI's `HTTP_*`, Puma
/// before 6.4.3, Gunicorn before 22) would take `X_Forwarded_Ssl` for the
/// real one.
pub fn is_client_claim(name: &HeaderName) -> bool {
    CLAIM_NAMES
        .iter()
        .any(|claim| read_alike(claim, name.as_str()))
}

/// The names [`is_client_claim`] knows, as the standards spell them.
pub const CLAIM_NAMES: [&str; 32] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded",
    "forwarded-for",
    "x-original-forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-arr-clientcert",
];

/// Whether the lower-case header name `name` is `spelled`, or reads alike
/// with `_` for `-` (as CGI's `HTTP_*` variables and the servers that fill
/// them read both). Compared in place: a name is seldom the length of one.
pub fn read_alike(spelled: &str, name: &str) -> bool {
    spelled.len() == name.len()
        && spelled
            .bytes()
            .zip(name.bytes())
            .all(|(s, n)| s == n || (s == b'-' && n == b'_'))
}

/// Removes from a request's trailers the fields no trailer may carry: those
/// that frame the message or describe the connection, `Host`, what Backstop
/// sets itself, and any claim about the client, whoever sent it (a trusted
/// proxy says what it knows in the headers; a trailer could only bring in
/// what the headers were cleared of). RFC 9110 §6.5.1: a recipient may not
/// merge such trailers into the headers, but servers that expose request
/// trailers in one map with the headers (gRPC metadata, Go's
/// `Request.Trailer` read as headers) would.
pub fn strip_from_request_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, |name| {
        never_trailing(name) || set_by_backstop(name) || is_client_claim(name)
    });
}

/// Removes from an answer's trailers the fields no trailer may carry (a
/// hop-by-hop one makes an HTTP/2 client's stream fail after the whole
/// body) and Backstop's own (a backend's would reach the client as
/// Backstop's word).
pub fn strip_from_response_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, never_trailing);
}

/// Whether `name` frames a message, describes a connection, or is
/// Backstop's own: never a trailer that passes.
fn never_trailing(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || PER_MESSAGE.contains(name) || name == HOST || is_own(name)
}

fn remove_where(headers: &mut HeaderMap, refused: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| refused(name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Removes what a request from a peer that is not a trusted proxy claims
/// of its client ([`is_client_claim`]), on arrival: neither the cache key,
/// nor a capture, nor the backend sees it.
pub fn strip_client_claims(headers: &mut HeaderMap) {
    remove_where(headers, is_client_claim);
}

/// The headers the proxy sets on an upstream request, kept apart from the
/// client's until the request is written: Backstop's own HTTP/1 exchange
/// writes them straight into the request head, other ways insert them into
/// the request's header map ([`ProxySet::apply_to`]). Inserted into the
/// client's map (which first had to grow to take them) they cost a hashed
/// map operation each, about 1,000 instructions per request (callgrind).
///
/// What wins, as if inserted in this order: the forwarding headers, then
/// the route's `headers`, then the request id and the trace context. The
/// client's `Host` is never sent: the route's is, or else the target's.
#[derive(Debug, Clone)]
pub struct ProxySet {
    pub forwarding: Forwarding,
    /// The route's configured `headers`.
    pub route: Arc<[(HeaderName, HeaderValue)]>,
    pub request_id: HeaderValue,
    pub traceparent: HeaderValue,
    /// The client's, kept with its `traceparent`; `None` removes the
    /// client's (a trace Backstop started).
    pub tracestate: Option<HeaderValue>,
}

/// The forwarding headers' names, in the order they are set. Names the
/// proxy sets are lent from statics rather than made per request: a
/// `HeaderName` of a non-standard header is a `Bytes`, whose clone and drop
/// are calls through its vtable.
static FORWARDING_NAMES: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::FORWARDED,
];

/// What a `ProxySet` sets after the route's headers, so a route cannot
/// replace them.
static SET_LAST: [HeaderName; 3] = [X_REQUEST_ID, TRACEPARENT, TRACESTATE];

/// The `names` whose value is set, each with its value.
fn those_set<'a, const N: usize>(
    names: &'a [HeaderName; N],
    values: [Option<&'a HeaderValue>; N],
) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> {
    names
        .iter()
        .zip(values)
        .filter_map(|(name, value)| Some((name, value?)))
}

/// Whether every request Backstop sends upstream carries its own `name`
/// (the client's never passes): `Host`, every forwarding header (also one
/// the proxy leaves out, a host it does not know), the request id and
/// trace context, and Backstop's own headers.
pub fn set_by_backstop(name: &HeaderName) -> bool {
    name == HOST || FORWARDING_NAMES.contains(name) || SET_LAST.contains(name) || is_own(name)
}

impl ProxySet {
    /// Whether the client's header `name` gives way to this set.
    pub fn covers(&self, name: &HeaderName) -> bool {
        set_by_backstop(name) || self.by_route(name)
    }

    fn by_route(&self, name: &HeaderName) -> bool {
        self.route.iter().any(|(set, _)| set == name)
    }

    /// The headers to send after the client's uncovered ones, each name
    /// once, `Host` aside (see [`ProxySet::host`]).
    pub fn each(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let forwarding = self
            .forwarding
            .each()
            .filter(|(name, _)| !self.by_route(name));
        let route = self
            .route
            .iter()
            .filter(|(name, _)| name != HOST && !SET_LAST.contains(name))
            .map(|(name, value)| (name, value));
        let own_values = [
            Some(&self.request_id),
            Some(&self.traceparent),
            self.tracestate.as_ref(),
        ];
        let own = those_set(&SET_LAST, own_values);
        forwarding.chain(route).chain(own)
    }

    /// The `Host` the route sets, if it sets one.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.route
            .iter()
            .rev()
            .find(|(name, _)| name == HOST)
            .map(|(_, value)| value)
    }

    /// Sets the headers in the client's `headers` (the ways to the backend
    /// other than the own exchange).
    pub fn apply_to(&self, headers: &mut HeaderMap) {
        headers.remove(HOST);
        // Room for everything inserted below at once.
        headers.reserve(4 + self.route.len() + SET_LAST.len());
        self.forwarding.apply_to(headers);
        for (name, value) in self.route.iter() {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(X_REQUEST_ID, self.request_id.clone());
        headers.insert(TRACEPARENT, self.traceparent.clone());
        match &self.tracestate {
            Some(tracestate) => headers.insert(TRACESTATE, tracestate.clone()),
            None => headers.remove(TRACESTATE),
        };
    }
}

/// One value of the list that `lines` make, if they make one.
fn listed(lines: &[&[u8]]) -> Option<HeaderValue> {
    let (last, rest) = lines.split_last()?;
    let mut parts = Vec::with_capacity(lines.len() * 2);
    for line in rest {
        parts.extend([*line, b", "]);
    }
    parts.push(last);
    // Header values joined by a comma are a header value.
    joined(&parts)
}

/// `ours` appended to the list the client's `prior` lines make.
fn appended(prior: &[&[u8]], ours: HeaderValue) -> HeaderValue {
    if prior.is_empty() {
        return ours;
    }
    let lines: Vec<&[u8]> = prior.iter().copied().chain([ours.as_bytes()]).collect();
    let value = listed(&lines);
    value.unwrap_or(ours)
}

/// The concatenation of `parts` as a header value (without `format!`: this
/// runs for every proxied request).
fn joined(parts: &[&[u8]]) -> Option<HeaderValue> {
    let mut value = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        value.extend_from_slice(part);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
}

/// The client's headers that name its request: its id, its trace context
/// (each the first value of its name) and its `Host` lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestNames<'a> {
    pub request_id: Option<&'a HeaderValue>,
    pub traceparent: Option<&'a HeaderValue>,
    /// How many `traceparent` lines there are (several are invalid).
    pub traceparent_lines: usize,
    pub tracestate: Option<&'a HeaderValue>,
    /// How many `tracestate` lines there are (several make one list).
    pub tracestate_lines: usize,
    pub host: Option<&'a HeaderValue>,
    /// How many `Host` lines there are (one is right).
    pub host_lines: usize,
    /// Whether it says anything of its client ([`is_client_claim`]).
    pub claims: bool,
}

impl<'a> RequestNames<'a> {
    /// Found in one pass over the client's few headers: a hashed lookup
    /// for each costs about 120 instructions, for every request (and 110
    /// for `Host`'s lines).
    pub fn find(headers: &'a HeaderMap) -> RequestNames<'a> {
        let mut found = RequestNames::default();
        for (name, value) in headers {
            let slot = if name == X_REQUEST_ID {
                &mut found.request_id
            } else if name == TRACEPARENT {
                found.traceparent_lines += 1;
                &mut found.traceparent
            } else if name == TRACESTATE {
                found.tracestate_lines += 1;
                &mut found.tracestate
            } else if name == HOST {
                found.host_lines += 1;
                &mut found.host
            } else {
                found.claims |= is_client_claim(name);
                continue;
            };
            slot.get_or_insert(value);
        }
        found
    }
}

/// The client's `X-Request-Id` (`client_id`, from [`RequestNames`]) when
/// it is reasonable (visible ASCII, 1 to 128 bytes, so it is also text: see
/// [`request_id_text`]), else a new UUIDv7.
pub fn request_id(client_id: Option<&HeaderValue>) -> HeaderValue {
    let client_id = client_id.filter(|v| {
        let id = v.as_bytes();
        (1..=128).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic)
    });
    if let Some(value) = client_id {
        return value.clone();
    }
    let mut buffer = uuid::Uuid::encode_buffer();
    let len = encode_id(new_uuid(), &mut buffer).len();
    // The value is cloned twice (upstream and back): bytes owned this way
    // are shared from the start, where a copied `Vec` would be moved into a
    // shared allocation at its first clone. A UUID's text is always a valid
    // header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buffer).slice(..len))
        .unwrap_or(HeaderValue::from_static("invalid"))
}

/// A request id from [`request_id`] as text.
pub fn request_id_text(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("invalid")
}

/// A new time-ordered id (UUIDv7) as text.
pub fn new_id() -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    encode_id(new_uuid(), &mut buffer).to_owned()
}

/// A new UUIDv7. Its random part comes from the thread's fast generator
/// (`ids`): `Uuid::now_v7` would ask the kernel (`getrandom`) once per
/// request, a syscall on the hot path.
fn new_uuid() -> uuid::Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = crate::ids::random_bytes();
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Encodes into a stack buffer: `to_string` pads through the formatting
/// machinery.
fn encode_id(uuid: uuid::Uuid, buffer: &mut [u8]) -> &str {
    uuid.hyphenated().encode_lower(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_is_digits_only() {
        assert_eq!(decimal(b"13"), Some(13));
        assert_eq!(decimal(b" 0\t"), Some(0));
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b" ",
            b"+13",
            b"-1",
            b"1 3",
            b"0x10",
            b"18446744073709551616",
        ] {
            assert_eq!(decimal(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_listed_content_length_is_sent_on_as_one_number() {
        // (lines, what is sent on)
        let cases: [(&[&str], &[&str]); 6] = [
            (&["5"], &["5"]),
            (&["5, 5"], &["5"]),
            (&["5", " 5 "], &["5"]),
            (&["5,5", "5"], &["5"]),
            (&["5, 6"], &["5, 6"]),
            (&["5", "x"], &["5", "x"]),
        ];
        for (lines, want) in cases {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(header::CONTENT_LENGTH, HeaderValue::from_static(line));
            }
            one_content_length(&mut headers);
            let got: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(got, want, "{lines:?}");
        }
    }

    #[test]
    fn new_ids_are_version_7_and_time_ordered() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        let parsed = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert!(a < b, "{a} < {b}");
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // A front proxy's word on the client cannot be named away.
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Forwarded, x-forwarded-for, X-Forwarded-Prefix"),
        );
        h.insert(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-prefix", HeaderValue::from_static("/shop"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 4, "{h:?}");
        // Nor where the request goes.
        h.insert(header::CONNECTION, HeaderValue::from_static("host"));
        h.insert(HOST, HeaderValue::from_static("shop.example"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[HOST], "shop.example");
    }

    #[test]
    fn trailers_are_offered_by_their_te_item_alone() {
        let offers = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(header::TE, HeaderValue::from_static(line));
            }
            offers_trailers(&h)
        };
        assert!(offers(&["trailers"]));
        assert!(offers(&["gzip;q=0.5, Trailers"]));
        assert!(offers(&["gzip", "trailers;q=1"]));
        assert!(!offers(&[]));
        assert!(!offers(&["gzip, trailersx"]));
    }

    #[test]
    fn te_trailers_alone_survives_the_hop_by_hop_strip_when_kept() {
        let stripped = |keep: bool| {
            let mut h = HeaderMap::new();
            h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
            h.insert(header::CONNECTION, HeaderValue::from_static("te"));
            strip_hop_by_hop_but_trailers(&mut h, keep);
            h
        };
        let kept = stripped(true);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[header::TE], "trailers");
        assert!(stripped(false).is_empty());
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        set_forwarded(
            &mut h,
            &client,
            Some(&HeaderValue::from_static("example.com")),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        // The proxy in front named its client only in `X-Forwarded-For`.
        assert_eq!(
            h[header::FORWARDED],
            "for=10.0.0.1, for=127.0.0.1;proto=http;host=example.com"
        );
    }

    #[test]
    fn forwarded_is_appended_quotes_ipv6_and_skips_unsafe_hosts() {
        let mut h = HeaderMap::new();
        h.insert(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        let client = ClientInfo::new("[::1]:5000".parse().unwrap(), "https");
        set_forwarded(&mut h, &client, Some(&HeaderValue::from_static("a;b")));
        assert_eq!(
            h[header::FORWARDED],
            "for=10.0.0.1, for=\"[::1]\";proto=https"
        );
        assert_eq!(h[&X_FORWARDED_FOR], "::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "a;b");

        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &client, None);
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=https");
        assert!(h.get(&X_FORWARDED_HOST).is_none());
    }

    #[test]
    fn an_ipv4_client_mapped_to_ipv6_is_named_by_its_ipv4_address() {
        let client = ClientInfo::new("[::ffff:203.0.113.5]:5000".parse().unwrap(), "http");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &client, None);
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.5");
        assert_eq!(h[header::FORWARDED], "for=203.0.113.5;proto=http");
        assert_eq!(client.addr.to_string(), "203.0.113.5:5000");
    }

    #[test]
    fn every_prior_forwarding_line_is_kept() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static(" "));
        h.append(
            X_FORWARDED_FOR,
            // Empty elements at the ends are dropped.
            HeaderValue::from_static(", 10.0.0.2, 10.0.0.3,"),
        );
        h.append(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        h.append(header::FORWARDED, HeaderValue::from_static("for=10.0.0.2"));
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        set_forwarded(&mut h, &client, None);
        assert_eq!(
            h.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        );
        assert_eq!(
            h.get_all(header::FORWARDED).iter().collect::<Vec<_>>(),
            ["for=10.0.0.1, for=10.0.0.2, for=127.0.0.1;proto=http"]
        );
    }

    #[test]
    fn a_trusted_peers_forwarded_elements_are_kept_whole_and_no_one_elses() {
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        let ours = "for=127.0.0.1;proto=http;host=shop.example";
        let cases = [
            (
                "for=10.0.0.1;host=public.example;proto=https, For=\"[2001:db8::1]:80\";by=lb",
                format!(
                    "for=10.0.0.1;host=public.example;proto=https, \
                     For=\"[2001:db8::1]:80\";by=lb, {ours}"
                ),
            ),
            // Quoted commas and semicolons are the value's.
            (
                "for=\"a,b;c\";host=x, for=10.0.0.2",
                format!("for=\"a,b;c\";host=x, for=10.0.0.2, {ours}"),
            ),
            (
                "for=\"esc\\\"aped\"",
                format!("for=\"esc\\\"aped\", {ours}"),
            ),
            // Not a list of elements: left out whole.
            ("for=1.2.3.4;host=\"x", ours.to_string()),
            ("for=1.2.3.4 junk", ours.to_string()),
            ("=x", ours.to_string()),
            ("for=", ours.to_string()),
            // Empty elements at the ends are dropped; no elements, no line.
            (", for=10.0.0.1 ,", format!("for=10.0.0.1, {ours}")),
            (" , ", ours.to_string()),
            ("", ours.to_string()),
        ];
        for (prior, want) in cases {
            for trusted in [true, false] {
                let mut h = HeaderMap::new();
                h.insert(header::FORWARDED, HeaderValue::from_str(prior).unwrap());
                if !trusted {
                    strip_client_claims(&mut h);
                }
                let host = HeaderValue::from_static("shop.example");
                set_forwarded(&mut h, &client, Some(&host));
                let want = if trusted { want.as_str() } else { ours };
                assert_eq!(h[header::FORWARDED], want, "{prior} {trusted}");
            }
        }
    }

    /// From a peer that is not trusted (its claims stripped), the lists
    /// start with the peer and this hop's own scheme and host win; a
    /// trusted peer's pass.
    #[test]
    fn an_untrusted_peers_forwarding_headers_are_replaced() {
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        let mut peers = HeaderMap::new();
        for (name, value) in [
            (X_FORWARDED_FOR, "198.51.100.7"),
            (X_FORWARDED_PROTO, "https"),
            (X_FORWARDED_HOST, "public.example"),
            (header::FORWARDED, "for=198.51.100.7;proto=https"),
        ] {
            peers.insert(name, HeaderValue::from_static(value));
        }
        let asked = HeaderValue::from_static("shop.internal");
        let sent = |trusted: bool| {
            let mut h = peers.clone();
            if !trusted {
                strip_client_claims(&mut h);
            }
            set_forwarded(&mut h, &client, Some(&asked));
            [
                X_FORWARDED_FOR,
                X_FORWARDED_PROTO,
                X_FORWARDED_HOST,
                header::FORWARDED,
            ]
            .map(|name| h[&name].to_str().unwrap().to_string())
        };
        assert_eq!(
            sent(false),
            [
                "127.0.0.1",
                "http",
                "shop.internal",
                "for=127.0.0.1;proto=http;host=shop.internal"
            ]
        );
        assert_eq!(
            sent(true),
            [
                "198.51.100.7, 127.0.0.1",
                "https",
                "public.example",
                "for=198.51.100.7;proto=https, for=127.0.0.1;proto=http;host=shop.internal"
            ]
        );
        let mut h = HeaderMap::new();
        for claim in [
            "x-real-ip",
            "x-forwarded-ssl",
            "x_forwarded_ssl",
            "X_Real_IP",
            "x-forwarded-prefix",
            "x-original-url",
            "cf-connecting-ip",
            "x-kept",
            "x_kept",
        ] {
            let name = HeaderName::from_bytes(claim.as_bytes()).unwrap();
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_client_claims(&mut h);
        let mut kept: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["x-kept", "x_kept"]);
    }

    /// A trusted proxy that sent only `X-Forwarded-*` has its word put in
    /// `Forwarded` elements too, before this hop's, for backends that read
    /// `Forwarded` first.
    #[test]
    fn a_trusted_proxys_x_forwarded_headers_become_forwarded_elements() {
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        let ours = "for=127.0.0.1;proto=http;host=shop.internal";
        let cases: [(&[(&str, &str)], String); 5] = [
            (
                &[
                    ("x-forwarded-for", "203.0.113.9, 10.0.0.2"),
                    ("x-forwarded-proto", "https, http"),
                    ("x-forwarded-host", "public.example:8443"),
                ],
                format!(
                    "for=203.0.113.9;proto=https;host=\"public.example:8443\", for=10.0.0.2, {ours}"
                ),
            ),
            (
                &[("x-forwarded-for", "[2001:db8::1]:443, junk")],
                format!("for=\"[2001:db8::1]\", for=unknown, {ours}"),
            ),
            (
                &[("x-forwarded-proto", "https"), ("x-forwarded-host", "a;b")],
                format!("proto=https, {ours}"),
            ),
            // Its own `Forwarded` is its word: nothing is made up.
            (
                &[
                    ("x-forwarded-proto", "https"),
                    ("forwarded", "for=10.0.0.1"),
                ],
                format!("for=10.0.0.1, {ours}"),
            ),
            (&[("x-other", "1")], ours.to_string()),
        ];
        for (sent, want) in cases {
            let mut h = HeaderMap::new();
            for (name, value) in sent {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                h.append(name, HeaderValue::from_str(value).unwrap());
            }
            set_forwarded(
                &mut h,
                &client,
                Some(&HeaderValue::from_static("shop.internal")),
            );
            assert_eq!(h[header::FORWARDED], want.as_str(), "{sent:?}");
        }
    }

    /// Every claim is noted in the one pass that finds the request's names
    /// (stripping hangs on it), spelled with `-` or `_`; nothing else is.
    #[test]
    fn the_request_names_note_every_claim() {
        let claims = |name: &str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static("shop.example"));
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
            RequestNames::find(&h).claims
        };
        for name in CLAIM_NAMES {
            assert!(claims(name), "{name}");
            assert!(claims(&name.replace('-', "_")), "{name} with _");
            assert!(claims(&name.to_ascii_uppercase()), "{name} in capitals");
        }
        for other in [
            "x-kept",
            "x_kept",
            "x-forwarded-forx",
            "accept",
            "x-forwarded",
        ] {
            let want = other == "x-forwarded";
            assert_eq!(claims(other), want, "{other}");
        }
    }

    #[test]
    fn forwarded_quotes_a_host_that_is_not_a_token() {
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        let element = |host: &'static str| {
            let mut h = HeaderMap::new();
            set_forwarded(&mut h, &client, Some(&HeaderValue::from_static(host)));
            h[header::FORWARDED].to_str().unwrap().to_string()
        };
        assert_eq!(
            element("example.com"),
            "for=127.0.0.1;proto=http;host=example.com"
        );
        assert_eq!(
            element("example.com:8080"),
            "for=127.0.0.1;proto=http;host=\"example.com:8080\""
        );
        assert_eq!(
            element("[2001:db8::1]:443"),
            "for=127.0.0.1;proto=http;host=\"[2001:db8::1]:443\""
        );
        for unfit in ["a;b", "a,for=10.9.9.9", "a=b", "a\"b", "a\\b", "a b"] {
            assert_eq!(element(unfit), "for=127.0.0.1;proto=http", "{unfit:?}");
        }
    }

    #[test]
    fn request_id_is_kept_when_reasonable() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
        let client_id = RequestNames::find(&h).request_id;
        assert_eq!(request_id_text(&request_id(client_id)), "abc-123");
        for unreasonable in ["", "a b", "a\tb", "caf\u{e9}"] {
            let value = HeaderValue::from_bytes(unreasonable.as_bytes()).unwrap();
            h.insert(X_REQUEST_ID, value);
            let created = request_id(RequestNames::find(&h).request_id);
            let parsed = uuid::Uuid::parse_str(request_id_text(&created)).unwrap();
            assert_eq!(parsed.get_version_num(), 7, "{unreasonable:?}");
        }
    }
}
