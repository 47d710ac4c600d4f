//! Address and port sets of a rule header, after variable expansion.
//!
//! Snort list semantics: a list matches when (it has no positive element, or some positive
//! element matches) and no negated element matches. `[10.0.0.0/8,!10.1.0.0/16]` is "in 10/8 but
//! not in 10.1/16"; `[!1.2.3.4]` is "anything but 1.2.3.4".

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 network (address + prefix length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    /// Network address (host bits are kept as written; matching masks them).
    pub addr: IpAddr,
    /// Prefix length: 0..=32 for IPv4, 0..=128 for IPv6.
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies in this network. IPv4 networks never match IPv6 addresses and vice versa.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                (u32::from(net) & mask) == (u32::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                (u128::from(net) & mask) == (u128::from(ip) & mask)
            }
            _ => false,
        }
    }

    /// Parses `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or `v6/n`.
    pub fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = if let Ok(v4) = a.parse::<Ipv4Addr>() {
            IpAddr::V4(v4)
        } else {
            IpAddr::V6(a.parse::<Ipv6Addr>().ok()?)
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
            None => max,
        };
        if prefix > max {
            return None;
        }
        Some(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// A set of addresses from a rule header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrSet {
    /// `any`.
    Any,
    /// One network.
    Net(IpNet),
    /// `!x`.
    Not(Box<AddrSet>),
    /// `[a,b,!c]`.
    List(Vec<AddrSet>),
}

impl AddrSet {
    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            AddrSet::Any => true,
            AddrSet::Net(n) => n.contains(ip),
            AddrSet::Not(inner) => !inner.contains(ip),
            AddrSet::List(items) => list_contains(items, |i| i.contains(ip)),
        }
    }
}

/// Snort list rule shared by addresses and ports: negated items exclude, positive items include,
/// and a list of only negated items starts from "everything".
fn list_contains<T>(items: &[T], contains: impl Fn(&T) -> bool) -> bool
where
    T: AsNegation,
{
    let mut any_pos = false;
    let mut pos_hit = false;
    for item in items {
        match item.negated_inner() {
            Some(inner) => {
                if contains(inner) {
                    return false;
                }
            }
            None => {
                any_pos = true;
                if !pos_hit && contains(item) {
                    pos_hit = true;
                }
            }
        }
    }
    !any_pos || pos_hit
}

/// Lets [`list_contains`] see through a `Not` element.
trait AsNegation {
    fn negated_inner(&self) -> Option<&Self>;
}

impl AsNegation for AddrSet {
    fn negated_inner(&self) -> Option<&Self> {
        match self {
            AddrSet::Not(inner) => Some(inner),
            _ => None,
        }
    }
}

impl AsNegation for PortSet {
    fn negated_inner(&self) -> Option<&Self> {
        match self {
            PortSet::Not(inner) => Some(inner),
            _ => None,
        }
    }
}

impl fmt::Display for AddrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSet::Any => f.write_str("any"),
            AddrSet::Net(n) => write!(f, "{n}"),
            AddrSet::Not(inner) => write!(f, "!{inner}"),
            AddrSet::List(items) => write_list(f, items),
        }
    }
}

fn write_list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    f.write_str("[")?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{item}")?;
    }
    f.write_str("]")
}

/// A set of ports from a rule header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSet {
    /// `any`.
    Any,
    /// `a`, `a:b`, `:b`, `a:` (inclusive).
    Range(u16, u16),
    /// `!x`.
    Not(Box<PortSet>),
    /// `[a,b:c,!d]`.
    List(Vec<PortSet>),
}

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::Any => true,
            PortSet::Range(lo, hi) => (*lo..=*hi).contains(&port),
            PortSet::Not(inner) => !inner.contains(port),
            PortSet::List(items) => list_contains(items, |i| i.contains(port)),
        }
    }

    /// The explicit ports when the set is a plain positive union of at most `limit` ports
    /// (used to place a rule in per-port groups); `None` for `any`, negations or wide ranges.
    pub fn enumerate(&self, limit: usize) -> Option<Vec<u16>> {
        let mut out = Vec::new();
        if self.collect(&mut out, limit) {
            out.sort_unstable();
            out.dedup();
            Some(out)
        } else {
            None
        }
    }

    fn collect(&self, out: &mut Vec<u16>, limit: usize) -> bool {
        match self {
            PortSet::Any | PortSet::Not(_) => false,
            PortSet::Range(lo, hi) => {
                if usize::from(hi - lo) + out.len() >= limit {
                    return false;
                }
                out.extend(*lo..=*hi);
                true
            }
            PortSet::List(items) => items.iter().all(|i| i.collect(out, limit)),
        }
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSet::Any => f.write_str("any"),
            PortSet::Range(lo, hi) if lo == hi => write!(f, "{lo}"),
            PortSet::Range(lo, hi) => write!(f, "{lo}:{hi}"),
            PortSet::Not(inner) => write!(f, "!{inner}"),
            PortSet::List(items) => write_list(f, items),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_v4_v6() {
        let n = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(!n.contains(ip("::1")));
        let n6 = IpNet::parse("2001:db8::/32").unwrap();
        assert!(n6.contains(ip("2001:db8:1::5")));
        assert!(!n6.contains(ip("2001:db9::1")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(IpNet::parse("1.2.3.4/33").is_none());
        assert!(IpNet::parse("1.2.3/8").is_none());
    }

    #[test]
    fn list_negation() {
        let s = AddrSet::List(alloc::vec![
            AddrSet::Net(IpNet::parse("10.0.0.0/8").unwrap()),
            AddrSet::Not(Box::new(AddrSet::Net(IpNet::parse("10.1.0.0/16").unwrap()))),
        ]);
        assert!(s.contains(ip("10.2.0.1")));
        assert!(!s.contains(ip("10.1.0.1")));
        assert!(!s.contains(ip("11.0.0.1")));
        let only_neg = AddrSet::List(alloc::vec![AddrSet::Not(Box::new(AddrSet::Net(
            IpNet::parse("1.2.3.4").unwrap()
        )))]);
        assert!(only_neg.contains(ip("1.2.3.5")));
        assert!(!only_neg.contains(ip("1.2.3.4")));
    }

    #[test]
    fn ports() {
        let p = PortSet::List(alloc::vec![
            PortSet::Range(80, 80),
            PortSet::Range(8000, 8100),
            PortSet::Not(Box::new(PortSet::Range(8080, 8080))),
        ]);
        assert!(p.contains(80));
        assert!(p.contains(8001));
        assert!(!p.contains(8080));
        assert!(!p.contains(81));
        assert_eq!(
            PortSet::Range(1, 3).enumerate(10),
            Some(alloc::vec![1, 2, 3])
        );
        assert_eq!(PortSet::Range(1, 3000).enumerate(10), None);
        assert_eq!(p.enumerate(1000), None);
        assert_eq!(p.to_string(), "[80,8000:8100,!8080]");
    }
}
