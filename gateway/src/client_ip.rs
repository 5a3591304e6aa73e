//! Who the client is when the gateway sits behind load balancers or reverse proxies.
//!
//! `X-Forwarded-For` is only believed when the connection comes from a configured trusted proxy,
//! and then read from the right: each trusted hop appends the address it saw, so the right-most
//! address that is not itself a trusted proxy is the client. Anything a client writes into the
//! header itself stands further left and is never used, so a client cannot pick its own address
//! (and with it, its own `{client.ip}` rate-limit counter).

use std::net::IpAddr;

use http::HeaderMap;

/// An address block, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| format!("not an IP address: {address:?}"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("not a prefix length 0-{max}: {p:?}"))?,
        };
        Ok(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(blocks: Vec<Cidr>) -> Self {
        Self(blocks)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Every X-Forwarded-For header line, as one list, read from the right.
        let hops = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
        let hops: Vec<&str> = hops.collect();
        for hop in hops.iter().rev() {
            let Ok(address) = hop.trim().parse::<IpAddr>() else { break };
            client = address;
            if !self.trusts(address) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn forwarded(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn blocks_match_their_addresses() {
        let block = Cidr::parse("10.1.0.0/16").expect("valid");
        assert!(block.contains(ip("10.1.255.3")) && !block.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("127.0.0.1").expect("valid").contains(ip("::ffff:127.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").expect("valid").contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").expect("valid").contains(ip("fd12::1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten/8").is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::new(vec![Cidr::parse("10.0.0.0/8").expect("valid")]);
        let headers = forwarded(&["203.0.113.7"]);
        // From an untrusted peer the header is ignored: anyone can write it.
        assert_eq!(proxies.client_ip(ip("198.51.100.1"), &headers), ip("198.51.100.1"));
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &headers), ip("203.0.113.7"));
        // A client-written entry stands left of what the proxy appended: the proxy's entry wins.
        let spoofed = forwarded(&["1.2.3.4, 203.0.113.7"]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &spoofed), ip("203.0.113.7"));
        // Chains of trusted proxies are walked; several header lines count as one list.
        let chain = forwarded(&["203.0.113.7, 10.0.0.9", "10.0.0.8"]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &chain), ip("203.0.113.7"));
        // Garbage ends the walk at the last good hop.
        let garbage = forwarded(&["203.0.113.7, nonsense"]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &garbage), ip("10.0.0.5"));
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &HeaderMap::new()), ip("10.0.0.5"));
        assert_eq!(TrustedProxies::default().client_ip(ip("10.0.0.5"), &headers), ip("10.0.0.5"));
    }
}
