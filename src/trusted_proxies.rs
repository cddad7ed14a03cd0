//! `server.trusted_proxies`: the peers whose word about the client is
//! believed. What a request says of its client (`X-Forwarded-For`,
//! `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto` and their kin, see
//! [`crate::headers::strip_client_claims`]) is a claim any client can
//! make: Backstop passes it on only from a peer listed here (the load
//! balancer in front of it), and only then reads the client's address from
//! it. From every other peer Backstop is the edge: the claims are dropped
//! and the client is the connection's peer (Traefik's `forwardedHeaders`
//! does the same; nginx's `real_ip` module reads the address alike).

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::{IpNet, Ipv4Net};

use crate::headers::{forwarded_for_address, X_FORWARDED_FOR};

/// The networks whose peers are trusted; none by default.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(networks)
    }

    /// One entry of the setting: an IP address (`10.0.0.7`, `::1`) or a
    /// CIDR block (`10.0.0.0/8`, `fd00::/8`). A block with host bits set
    /// (`10.0.0.1/8`) is refused, as the typo it usually is: it would
    /// trust the whole block. An IPv4 address mapped to IPv6
    /// (`::ffff:10.0.0.7`) is read as the IPv4 one, as peers are.
    pub fn parse_entry(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        let expected = || {
            format!("expected an IP address or a CIDR block such as \"10.0.0.0/8\", found {text:?}")
        };
        let network = match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip.to_canonical()),
            Err(_) => text.parse::<IpNet>().map_err(|_| expected())?,
        };
        if network.trunc() != network {
            return Err(format!(
                "{text:?} has host bits set: the block is {}",
                network.trunc()
            ));
        }
        Ok(mapped_to_ipv4(network))
    }

    /// Whether `peer` is a trusted proxy (an IPv4 peer of a dual-stack
    /// listener by its IPv4 address).
    #[inline]
    pub fn trusts(&self, peer: IpAddr) -> bool {
        // Empty, as it is by default: no address canonicalised.
        !self.0.is_empty() && {
            let peer = peer.to_canonical();
            self.0.iter().any(|network| network.contains(&peer))
        }
    }

    /// The client behind the trusted `peer`: `X-Forwarded-For`'s
    /// addresses (every line one list) read from the right, past each one
    /// that is itself trusted, as nginx's `real_ip_recursive` does. Every
    /// address left of the first untrusted one was written by the client
    /// (or a proxy nobody vouches for), so it is never read: a client
    /// cannot name itself. When every address is trusted, the leftmost; an
    /// entry that is not an address stops the walk at the last one read.
    pub fn client_behind(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let mut client = peer;
        for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            // Read entry by entry: a byte beyond ASCII in the client's
            // part must not hide the addresses the proxies appended.
            for entry in line.as_bytes().rsplit(|&b| b == b',') {
                let entry = entry.trim_ascii();
                if entry.is_empty() {
                    continue;
                }
                let Some(ip) = std::str::from_utf8(entry)
                    .ok()
                    .and_then(forwarded_for_address)
                else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// A block of IPv4 addresses mapped to IPv6 (`::ffff:10.0.0.0/104`) as
/// the IPv4 block (`10.0.0.0/8`), which peers and entries are compared as.
fn mapped_to_ipv4(network: IpNet) -> IpNet {
    match network {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(network, IpNet::V4),
            None => network,
        },
        _ => network,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            entries
                .iter()
                .map(|e| TrustedProxies::parse_entry(e).unwrap())
                .collect(),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn parsed(entry: &str) -> String {
        match TrustedProxies::parse_entry(entry) {
            Ok(network) => network.to_string(),
            Err(message) => message,
        }
    }

    #[test]
    fn entries_are_addresses_or_blocks() {
        for (entry, read) in [
            ("10.0.0.7", "10.0.0.7/32"),
            (" 10.0.0.0/8 ", "10.0.0.0/8"),
            ("::1", "::1/128"),
            ("fd00::/8", "fd00::/8"),
            ("::ffff:10.0.0.7", "10.0.0.7/32"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            (
                "10.0.0.1/8",
                "\"10.0.0.1/8\" has host bits set: the block is 10.0.0.0/8",
            ),
        ] {
            assert_eq!(parsed(entry), read, "{entry}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0",
            "[::1]",
            "host.example",
            "10.0.0.0/",
        ] {
            assert!(parsed(bad).starts_with("expected an IP address"), "{bad}");
        }
        let list = trusted(&["10.0.0.0/8", "2001:db8::/32", "::ffff:192.0.2.0/120"]);
        assert!(list.trusts(ip("10.200.0.1")));
        assert!(list.trusts(ip("192.0.2.9")), "a mapped block, as IPv4");
        assert!(list.trusts(ip("::ffff:10.0.0.1")), "a mapped IPv4 peer");
        assert!(list.trusts(ip("2001:db8::5")));
        assert!(!list.trusts(ip("11.0.0.1")));
        assert!(!TrustedProxies::default().trusts(ip("127.0.0.1")));
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_address() {
        let list = trusted(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        let behind = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(X_FORWARDED_FOR, HeaderValue::from_str(line).unwrap());
            }
            list.client_behind(&headers, peer).to_string()
        };
        assert_eq!(behind(&[]), "127.0.0.1", "no header: the peer");
        assert_eq!(behind(&["198.51.100.7"]), "198.51.100.7");
        // The client's own claim (left) is never read.
        assert_eq!(behind(&["1.1.1.1, 198.51.100.7, 10.0.0.3"]), "198.51.100.7");
        assert_eq!(
            behind(&["1.1.1.1", "198.51.100.7, 10.0.0.3"]),
            "198.51.100.7"
        );
        assert_eq!(behind(&["10.0.0.9, 10.0.0.3"]), "10.0.0.9", "all trusted");
        assert_eq!(behind(&["junk, 10.0.0.3"]), "10.0.0.3", "stops at junk");
        assert_eq!(behind(&["198.51.100.7:5678"]), "198.51.100.7");
        assert_eq!(behind(&["[2001:db8::7]:5678"]), "2001:db8::7");
        assert_eq!(behind(&["[2001:db8::7]"]), "2001:db8::7");
        assert_eq!(behind(&["198.51.100.7, , 10.0.0.3"]), "198.51.100.7");
        // A client's byte beyond ASCII does not hide what proxies appended.
        let mut headers = HeaderMap::new();
        let line = HeaderValue::from_bytes(b"caf\xe9, 198.51.100.7, 10.0.0.3").unwrap();
        headers.insert(X_FORWARDED_FOR, line);
        assert_eq!(
            list.client_behind(&headers, peer).to_string(),
            "198.51.100.7"
        );
    }
}
