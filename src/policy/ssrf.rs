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
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Prohibited::Documentation,
        [198, b, ..] if b == 18 || b == 19 => Prohibited::Documentation,
        [a, ..] if (224..=239).contains(&a) => Prohibited::Multicast,
        [255, 255, 255, 255] => Prohibited::Multicast,
        [a, ..] if a >= 240 => Prohibited::Reserved,
        _ => return None,
    };
    Some(p)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Prohibited> {
    let s = ip.segments();
    let p = if ip.is_unspecified() {
        Prohibited::Unspecified
    } else if ip.is_loopback() {
        Prohibited::Loopback
    } else if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (deprecated compatible)
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
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Prohibited::Documentation
    } else if s[0..4] == [0x100, 0, 0, 0] {
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
