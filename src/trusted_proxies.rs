//! `server.trusted_proxies`: the peers whose word about the client is
//! believed. What a request says of its client (`X-Forwarded-For`,
//! `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto` and their kin, see
//! [`crate::headers::strip_client_claims`]) is a claim any client can
//! make: Backstop passes it on only from a peer listed here (the load
//! balancer in front of it), and only then reads the client's address from
//! it. From every other peer Backstop is the edge: the claims are dropped
//! and the client is the connection's peer (Traefik's `forwardedHeaders`
//! does the same; nginx's `real_ip` module reads the address alike).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

use crate::headers::X_FORWARDED_FOR;

/// The networks whose peers are trusted; none by default.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(networks)
    }

    /// One entry of the setting: an IP address (`10.0.0.7`, `::1`) or a
    /// CIDR block (`10.0.0.0/8`, `fd00::/8`; host bits are ignored).
    pub fn parse_entry(text: &str) -> Option<IpNet> {
        let text = text.trim();
        let network = match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => text.parse::<IpNet>().ok()?,
        };
        Some(network.trunc())
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
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',').map(str::trim) {
                if entry.is_empty() {
                    continue;
                }
                let Some(ip) = node_address(entry) else {
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

/// The address of one `X-Forwarded-For` entry: an IP address, or one with
/// a port (`192.0.2.1:5678`, `[2001:db8::1]:5678`, as Azure's load balancers
/// write them), or a bracketed IPv6 address.
fn node_address(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
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

    #[test]
    fn entries_are_addresses_or_blocks() {
        for good in ["10.0.0.7", "10.0.0.0/8", "::1", "fd00::/8", "10.1.2.3/8"] {
            assert!(TrustedProxies::parse_entry(good).is_some(), "{good}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0",
            "[::1]",
            "host.example",
            "10.0.0.0/",
        ] {
            assert!(TrustedProxies::parse_entry(bad).is_none(), "{bad}");
        }
        let list = trusted(&["10.1.2.3/8", "2001:db8::/32"]);
        assert!(list.trusts(ip("10.200.0.1")), "host bits ignored");
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
    }
}
