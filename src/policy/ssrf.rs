//! The SSRF address classifier and the egress policy built on it.
//!
//! Pure: the upstream connector resolves names and asks [`EgressPolicy::check`]
//! about every address before it connects to exactly that address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is not a public unicast destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prohibited {
    Unspecified,
    Loopback,
    Private,
    SharedCgnat,
    LinkLocal,
    Multicast,
    Reserved,
    Documentation,
    UniqueLocal,
    /// An IPv6 form that embeds or tunnels IPv4 (mapped, compatible, NAT64,
    /// 6to4, Teredo): refused outright, it is how guards get bypassed.
    Ipv4Embedding,
}

impl Prohibited {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedCgnat => "shared address space (CGNAT)",
            Self::LinkLocal => "link-local",
            Self::Multicast => "multicast or broadcast",
            Self::Reserved => "reserved",
            Self::Documentation => "documentation or benchmarking",
            Self::UniqueLocal => "unique local",
            Self::Ipv4Embedding => "IPv6 embedding of IPv4",
        }
    }
}

impl fmt::Display for Prohibited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `None` for a public unicast address; otherwise why it is prohibited.
pub fn classify(ip: IpAddr) -> Option<Prohibited> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// IPv4: the IANA special-purpose registry (RFC 6890 and updates) and
/// multicast. Stricter than the registry where it helps: the anycast
/// addresses inside 192.0.0.0/24 that the registry calls globally reachable
/// (PCP, TURN) are refused with the block, as is the deprecated 6to4 relay
/// anycast 192.88.99.0/24. AS112 and AMT blocks are ordinary destinations.
fn classify_v4(ip: Ipv4Addr) -> Option<Prohibited> {
    let o = ip.octets();
    let p = match o {
        [0, ..] => Prohibited::Unspecified,
        [127, ..] => Prohibited::Loopback,
        [10, ..] => Prohibited::Private,
        [172, b, ..] if (16..=31).contains(&b) => Prohibited::Private,
        [192, 168, ..] => Prohibited::Private,
        [100, b, ..] if (64..=127).contains(&b) => Prohibited::SharedCgnat,
        [169, 254, ..] => Prohibited::LinkLocal,
        [192, 0, 0, _] => Prohibited::Reserved,
        [192, 88, 99, _] => Prohibited::Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Prohibited::Documentation,
        [198, b, ..] if b == 18 || b == 19 => Prohibited::Documentation,
        [a, ..] if (224..=239).contains(&a) => Prohibited::Multicast,
        [255, 255, 255, 255] => Prohibited::Multicast,
        [a, ..] if a >= 240 => Prohibited::Reserved,
        _ => return None,
    };
    Some(p)
}

/// IPv6: only global unicast (2000::/3) is a destination, minus the IANA
/// special-purpose blocks in it; every form that embeds or translates an
/// IPv4 address is refused outright (the IPv4 address inside is what a
/// guard would have to check, and translation happens out of our sight).
/// Stricter than the registry: 64:ff9b::/96 (which it calls globally
/// reachable) and the anycast and ORCHID blocks inside 2001::/23 are refused.
fn classify_v6(ip: Ipv6Addr) -> Option<Prohibited> {
    let s = ip.segments();
    let p = if ip.is_unspecified() {
        Prohibited::Unspecified
    } else if ip.is_loopback() {
        Prohibited::Loopback
    } else if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (deprecated compatible)
        Prohibited::Ipv4Embedding
    } else if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        // ::ffff:0:a.b.c.d, IPv4-translated (SIIT, RFC 2765 / 7915)
        Prohibited::Ipv4Embedding
    } else if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1) {
        // 64:ff9b::/96 well-known NAT64 and 64:ff9b:1::/48 local-use NAT64
        Prohibited::Ipv4Embedding
    } else if s[0] == 0x2002 || (s[0] == 0x2001 && s[1] == 0) {
        // 6to4 2002::/16, Teredo 2001::/32
        Prohibited::Ipv4Embedding
    } else if s[0] & 0xfe00 == 0xfc00 {
        Prohibited::UniqueLocal
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        Prohibited::LinkLocal
    } else if s[0] & 0xff00 == 0xff00 {
        Prohibited::Multicast
    } else if (s[0] == 0x2001 && (s[1] == 0xdb8 || (s[1] == 2 && s[2] == 0))) || (s[0] == 0x3fff && s[1] < 0x1000) {
        // 2001:db8::/32 and 3fff::/20 documentation, 2001:2::/48 benchmarking
        Prohibited::Documentation
    } else if s[0] == 0x2001 && s[1] < 0x200 {
        // 2001::/23, IETF protocol assignments
        Prohibited::Reserved
    } else if s[0] & 0xe000 != 0x2000 {
        // Outside global unicast: 100::/64 discard, 5f00::/16 SRv6 SIDs, the
        // unassigned rest of ::/8 and of the IETF-reserved space.
        Prohibited::Reserved
    } else {
        return None;
    };
    Some(p)
}

/// Destination policy: public unicast addresses, plus the configured
/// `egress.allow_cidrs` exceptions.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
}

impl EgressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Prohibited> {
        match classify(ip) {
            None => Ok(()),
            Some(_) if self.allow.iter().any(|n| n.contains(&ip)) => Ok(()),
            Some(why) => Err(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Prohibited::*;

    #[test]
    fn classify_table() {
        let cases: &[(&str, Option<Prohibited>)] = &[
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("140.82.112.5", None),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(SharedCgnat)),
            ("100.127.255.255", Some(SharedCgnat)),
            ("100.128.0.1", None),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("255.255.255.255", Some(Multicast)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.0.8", Some(Reserved)),
            ("192.0.2.1", Some(Documentation)),
            ("198.18.0.1", Some(Documentation)),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Ipv4Embedding)),
            ("::ffff:169.254.169.254", Some(Ipv4Embedding)),
            ("::127.0.0.1", Some(Ipv4Embedding)),
            ("::ffff:0:7f00:1", Some(Ipv4Embedding)),
            ("::ffff:0:a9fe:a9fe", Some(Ipv4Embedding)),
            ("64:ff9b::a9fe:a9fe", Some(Ipv4Embedding)),
            ("64:ff9b:1::1", Some(Ipv4Embedding)),
            ("2002:7f00:1::1", Some(Ipv4Embedding)),
            ("2001:0:4136:e378::1", Some(Ipv4Embedding)),
            ("fc00::1", Some(UniqueLocal)),
            ("fd12:3456::1", Some(UniqueLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("100::1", Some(Reserved)),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001::1", None),
            ("2001:4860:4860::8888", None),
        ];
        for (ip, want) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(classify(ip), *want, "{ip}");
        }
    }

    /// The IANA IPv4 and IPv6 special-purpose address registries
    /// (iana-ipv4-special-registry, iana-ipv6-special-registry, as of
    /// 2025), every entry, plus multicast: the first, a middle and the last
    /// address of each block. `refused` is the classifier's answer; where it
    /// differs from the registry's "globally reachable" column the row says why.
    #[test]
    fn iana_special_purpose_registries() {
        // (block, name, registry says globally reachable, refused here)
        let rows: &[(&str, &str, Option<bool>, bool)] = &[
            ("0.0.0.0/8", "this network", Some(false), true),
            ("0.0.0.0/32", "this host on this network", Some(false), true),
            ("10.0.0.0/8", "private-use", Some(false), true),
            ("100.64.0.0/10", "shared address space", Some(false), true),
            ("127.0.0.0/8", "loopback", Some(false), true),
            ("169.254.0.0/16", "link local", Some(false), true),
            ("172.16.0.0/12", "private-use", Some(false), true),
            ("192.0.0.0/24", "IETF protocol assignments", Some(false), true),
            ("192.0.0.0/29", "IPv4 service continuity prefix", Some(false), true),
            ("192.0.0.8/32", "IPv4 dummy address", Some(false), true),
            // Globally reachable anycast, refused with its /24: no credential goes there.
            ("192.0.0.9/32", "port control protocol anycast", Some(true), true),
            ("192.0.0.10/32", "TURN anycast", Some(true), true),
            ("192.0.0.170/32", "NAT64/DNS64 discovery", Some(false), true),
            ("192.0.0.171/32", "NAT64/DNS64 discovery", Some(false), true),
            ("192.0.2.0/24", "documentation (TEST-NET-1)", Some(false), true),
            ("192.31.196.0/24", "AS112-v4", Some(true), false),
            ("192.52.193.0/24", "AMT", Some(true), false),
            // Deprecated 6to4 relay anycast: an IPv6 tunnel entry point.
            ("192.88.99.0/24", "deprecated (6to4 relay anycast)", None, true),
            ("192.88.99.2/32", "6a44-relay anycast address", None, true),
            ("192.168.0.0/16", "private-use", Some(false), true),
            ("192.175.48.0/24", "direct delegation AS112 service", Some(true), false),
            ("198.18.0.0/15", "benchmarking", Some(false), true),
            ("198.51.100.0/24", "documentation (TEST-NET-2)", Some(false), true),
            ("203.0.113.0/24", "documentation (TEST-NET-3)", Some(false), true),
            ("240.0.0.0/4", "reserved", Some(false), true),
            ("255.255.255.255/32", "limited broadcast", Some(false), true),
            ("224.0.0.0/4", "multicast (own registry)", Some(false), true),
            ("::1/128", "loopback address", Some(false), true),
            ("::/128", "unspecified address", Some(false), true),
            ("::ffff:0:0/96", "IPv4-mapped address", Some(false), true),
            ("::ffff:0:0:0/96", "IPv4-translated (SIIT, RFC 2765)", None, true),
            // Translates to an IPv4 address this guard cannot see.
            ("64:ff9b::/96", "IPv4-IPv6 translation", Some(true), true),
            ("64:ff9b:1::/48", "IPv4-IPv6 translation (local use)", Some(false), true),
            ("100::/64", "discard-only address block", Some(false), true),
            ("100:0:0:1::/64", "dummy IPv6 prefix", Some(false), true),
            ("2001::/23", "IETF protocol assignments", Some(false), true),
            ("2001::/32", "TEREDO", None, true),
            // Globally reachable blocks inside 2001::/23, refused with it.
            ("2001:1::1/128", "port control protocol anycast", Some(true), true),
            ("2001:1::2/128", "TURN anycast", Some(true), true),
            ("2001:1::3/128", "DNS-SD service registration protocol anycast", Some(true), true),
            ("2001:2::/48", "benchmarking", Some(false), true),
            ("2001:3::/32", "AMT", Some(true), true),
            ("2001:4:112::/48", "AS112-v6", Some(true), true),
            ("2001:10::/28", "deprecated (previously ORCHID)", None, true),
            ("2001:20::/28", "ORCHIDv2", Some(true), true),
            ("2001:30::/28", "drone remote ID protocol entity tags", Some(true), true),
            ("2001:db8::/32", "documentation", Some(false), true),
            ("2002::/16", "6to4", None, true),
            ("2620:4f:8000::/48", "direct delegation AS112 service", Some(true), false),
            ("3fff::/20", "documentation", Some(false), true),
            ("5f00::/16", "segment routing (SRv6) SIDs", Some(false), true),
            ("fc00::/7", "unique-local", Some(false), true),
            ("fe80::/10", "link-local unicast", Some(false), true),
            ("ff00::/8", "multicast (own registry)", Some(false), true),
        ];
        for (block, name, global, refused) in rows {
            let net: IpNet = block.parse().unwrap();
            let (first, last) = (net.network(), net.broadcast());
            let middle = match (first, last) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    IpAddr::V4(Ipv4Addr::from((u32::from(a) as u64 / 2 + u32::from(b) as u64 / 2) as u32))
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => IpAddr::V6(Ipv6Addr::from(u128::from(a) / 2 + u128::from(b) / 2)),
                _ => unreachable!(),
            };
            for ip in [first, middle, last] {
                assert_eq!(
                    classify(ip).is_some(),
                    *refused,
                    "{ip} in {block} ({name}, globally reachable: {global:?}) -> {:?}",
                    classify(ip)
                );
            }
        }
        // Just outside some blocks: ordinary public addresses.
        for ip in [
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.88.98.255",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2001:200::1",
            "2001:db7:ffff::1",
            "2001:db9::1",
            "3fff:1000::1",
            "2003::1",
            "3ffe:ffff::1",
        ] {
            assert_eq!(classify(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn allow_cidrs_make_exceptions() {
        let p = EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("127.0.0.2".parse().unwrap()).is_ok());
        assert_eq!(p.check("::1".parse().unwrap()), Err(Loopback));
        assert_eq!(p.check("169.254.169.254".parse().unwrap()), Err(LinkLocal));
        assert!(p.check("8.8.8.8".parse().unwrap()).is_ok());
        assert_eq!(EgressPolicy::default().check("127.0.0.1".parse().unwrap()), Err(Loopback));
    }
}
