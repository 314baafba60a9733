//! Where a webhook may go (SSRF): one classifier of addresses, used when an Endpoint is
//! applied (its URL's host) and when a request connects (every address its name resolves
//! to, through [`GuardedResolver`], and an address written in the URL itself).
//!
//! Only public unicast addresses are allowed unless `allowPrivateUrls` is set. Refused:
//! - IPv4: `0.0.0.0/8`, `10/8`, `100.64/10` (carrier-grade NAT), `127/8`, `169.254/16`,
//!   `172.16/12`, `192.0.0.0/24` (IETF protocol assignments), `192.0.2/24`,
//!   `198.51.100/24` and `203.0.113/24` (documentation), `192.88.99/24` (6to4 relays),
//!   `192.168/16`, `198.18/15` (benchmarking), `224/4` (multicast) and `240/4`
//!   (reserved, the broadcast address included): every block of IANA's special-purpose
//!   registry that is not globally reachable.
//! - IPv6: anything outside global unicast `2000::/3` (loopback, unspecified, the rest of
//!   `::/8`, `64:ff9b:1::/48` local NAT64, `100::/64` discard, unique local `fc00::/7`,
//!   link-local `fe80::/10`, the deprecated site-local `fec0::/10`, multicast `ff00::/8`)
//!   and, inside it, `2001::/23` (IETF protocol assignments, Teredo included),
//!   `2001:db8::/32` and `3fff::/20` (documentation).
//! - An IPv6 address that embeds an IPv4 address is judged by the IPv4 address:
//!   IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`
//!   and 6to4 `2002:aabb:ccdd::/48`. `[::127.0.0.1]` is loopback; `[64:ff9b::808:808]` is
//!   as public as `8.8.8.8`.
//! - Host names `localhost`, `*.localhost`, `*.local` and `*.internal` at apply time;
//!   other names are judged by what they resolve to, at every connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether a URL host is loopback, private, link-local or otherwise not public.
pub fn is_private_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost"
                || name.ends_with(".localhost")
                || name.ends_with(".internal")
                || name.ends_with(".local")
        }
        url::Host::Ipv4(ip) => is_private_ip(IpAddr::V4(*ip)),
        url::Host::Ipv6(ip) => is_private_ip(IpAddr::V6(*ip)),
    }
}

/// Addresses a webhook must not reach unless explicitly allowed (see the module docs).
pub fn is_private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_private_v4(v4),
            None => is_private_v6(v6),
        },
    }
}

/// `(network, prefix length)`: the IPv4 blocks that are not globally reachable.
const PRIVATE_V4: [(u32, u32); 15] = [
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network"
    (0x0a00_0000, 8),  // 10.0.0.0/8
    (0x6440_0000, 10), // 100.64.0.0/10 carrier-grade NAT
    (0x7f00_0000, 8),  // 127.0.0.0/8 loopback
    (0xa9fe_0000, 16), // 169.254.0.0/16 link-local
    (0xac10_0000, 12), // 172.16.0.0/12
    (0xc000_0000, 24), // 192.0.0.0/24 IETF protocol assignments
    (0xc000_0200, 24), // 192.0.2.0/24 documentation
    (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay anycast
    (0xc0a8_0000, 16), // 192.168.0.0/16
    (0xc612_0000, 15), // 198.18.0.0/15 benchmarking
    (0xc633_6400, 24), // 198.51.100.0/24 documentation
    (0xcb00_7100, 24), // 203.0.113.0/24 documentation
    (0xe000_0000, 4),  // 224.0.0.0/4 multicast
    (0xf000_0000, 4),  // 240.0.0.0/4 reserved, 255.255.255.255 included
];

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let bits = u32::from(ip);
    PRIVATE_V4.iter().any(|&(network, length)| bits >> (32 - length) == network >> (32 - length))
}

/// Whether `ip` lies in `network/length`.
fn in_v6(ip: Ipv6Addr, network: u128, length: u32) -> bool {
    u128::from(ip) >> (128 - length) == network >> (128 - length)
}

/// The IPv4 address an IPv6 address stands for or tunnels to, if it embeds one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low = Ipv4Addr::from(bits as u32);
    if in_v6(ip, 0, 96) && bits > 1 {
        // IPv4-compatible `::a.b.c.d` (`::` and `::1` are IPv6's own).
        return Some(low);
    }
    if in_v6(ip, 0xffff_0000_0000, 96) || in_v6(ip, 0x0064_ff9b << 96, 96) {
        // IPv4-mapped, and the well-known NAT64 prefix.
        return Some(low);
    }
    if in_v6(ip, 0x2002 << 112, 16) {
        // 6to4: the relay's IPv4 address follows the prefix.
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    !in_v6(ip, 0x2000 << 112, 3)
        || in_v6(ip, 0x2001 << 112, 23)
        || in_v6(ip, 0x2001_0db8 << 96, 32)
        || in_v6(ip, 0x3fff << 112, 20)
}

/// What the resolver hands the connector: the addresses a webhook may reach, all of them
/// when private ones are allowed. An empty answer refuses the name.
pub fn allowed_addresses(found: impl IntoIterator<Item = SocketAddr>, allow_private: bool) -> Vec<SocketAddr> {
    found.into_iter().filter(|a| allow_private || !is_private_ip(a.ip())).collect()
}

/// Resolves host names for the delivery client, keeping only [`allowed_addresses`], so a
/// name that resolves to a private address is refused at the connection itself, whatever
/// it resolved to when the Endpoint was applied.
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let allowed = allowed_addresses(found, allow_private);
            if allowed.is_empty() {
                return Err(format!("{} resolves only to private or loopback addresses", name.as_str()).into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(host: &str) -> bool {
        let url = url::Url::parse(&format!("http://{host}/")).unwrap();
        is_private_host(&url.host().unwrap())
    }

    #[test]
    fn every_address_that_is_not_public_is_refused() {
        for host in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "192.168.0.1",
            "172.31.255.255",
            "100.100.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.254",
            "198.51.100.7",
            "203.0.113.9",
            "192.88.99.1",
            "224.0.0.251",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "[::1]",
            "[::]",
            "[::127.0.0.1]",
            "[::10.0.0.1]",
            "[::ffff:127.0.0.1]",
            "[::ffff:169.254.169.254]",
            "[64:ff9b::7f00:1]",
            "[64:ff9b::a9fe:a9fe]",
            "[64:ff9b:1::808:808]",
            "[2002:7f00:1::1]",
            "[2002:a00:1::]",
            "[2002:c0a8:101::1]",
            "[fc00::1]",
            "[fd00::1]",
            "[fe80::1]",
            "[fec0::1]",
            "[feff::1]",
            "[ff02::1]",
            "[ff05::1:3]",
            "[100::1]",
            "[2001::1]",
            "[2001:db8::1]",
            "[3fff::1]",
            "[::1:0:0:1]",
            "localhost",
            "api.localhost",
            "metadata.google.internal",
            "printer.local",
        ] {
            assert!(private(host), "{host} must be refused");
        }
    }

    #[test]
    fn public_addresses_and_names_are_allowed() {
        for host in [
            "example.com",
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.254",
            "[2606:4700:4700::1111]",
            "[2a00:1450:4001::1]",
            "[2001:4860:4860::8888]",
            "[::ffff:8.8.8.8]",
            "[64:ff9b::808:808]",
            "[2002:808:808::1]",
        ] {
            assert!(!private(host), "{host} is public");
        }
    }

    #[test]
    fn the_resolver_keeps_only_public_addresses_unless_private_ones_are_allowed() {
        let found: Vec<SocketAddr> =
            ["[::127.0.0.1]:443", "[64:ff9b::7f00:1]:443", "198.18.0.1:443", "93.184.215.14:443"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        assert_eq!(allowed_addresses(found.clone(), false), vec!["93.184.215.14:443".parse().unwrap()]);
        assert_eq!(allowed_addresses(found.clone(), true), found);
        assert!(
            allowed_addresses(found[..3].to_vec(), false).is_empty(),
            "a name with only private answers is refused"
        );
    }
}
