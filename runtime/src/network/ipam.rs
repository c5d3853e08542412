//! IPv4 subnets and the address allocator kept in each network's state.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 subnet `ADDR/PREFIX` whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why a subnet does not parse or cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subnet `{text}`: {reason}")]
pub struct SubnetError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Subnet {
    /// A subnet from its network address and prefix length (8..=30).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, SubnetError> {
        let fail = |reason: String| SubnetError {
            text: format!("{addr}/{prefix}"),
            reason,
        };
        if !(8..=30).contains(&prefix) {
            return Err(fail("the prefix length must be between 8 and 30".into()));
        }
        let s = Subnet { addr, prefix };
        if s.network() != addr {
            return Err(fail(format!("it should be {}/{prefix}", s.network())));
        }
        Ok(s)
    }

    /// The network address.
    pub fn addr(self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two subnets share an address.
    pub fn overlaps(self, other: Subnet) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// Whether `ip` is a usable host address (not the network or broadcast address).
    pub fn is_host(self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network() && ip != self.broadcast()
    }

    /// The first host address: the gateway (bridge address) by default.
    pub fn first_host(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }

    /// The lowest host address that is not `gateway` nor in `used`.
    pub fn allocate(self, gateway: Ipv4Addr, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (u32::from(self.addr) + 1..u32::from(self.broadcast()))
            .map(Ipv4Addr::from)
            .find(|ip| *ip != gateway && !used.contains(ip))
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| SubnetError {
            text: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| fail("expected ADDRESS/PREFIX, e.g. 10.89.0.0/24"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| fail("the address is not IPv4"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| fail("the prefix length is not a number"))?;
        Subnet::new(addr, prefix).map_err(|e| SubnetError {
            text: s.to_owned(),
            reason: e.reason,
        })
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The subnets of the host's IPv4 routes (from `/proc/net/route`), default routes
/// left out: a network must not shadow any of them.
pub(crate) fn host_routes() -> Vec<Subnet> {
    let text = fs_err::read_to_string("/proc/net/route").unwrap_or_default();
    parse_proc_route(&text)
}

fn parse_proc_route(text: &str) -> Vec<Subnet> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // The kernel prints the big-endian words as host-order numbers.
            let dest = Ipv4Addr::from(hex(f.get(1)?)?.to_ne_bytes());
            let mask = u32::from_be_bytes(hex(f.get(7)?)?.to_ne_bytes());
            let prefix = u8::try_from(mask.leading_ones()).ok()?;
            (prefix > 0).then_some(Subnet { addr: dest, prefix })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_subnets() {
        let s: Subnet = "10.89.3.0/24".parse().expect("parses");
        assert_eq!(s.first_host(), Ipv4Addr::new(10, 89, 3, 1));
        assert!(s.contains(Ipv4Addr::new(10, 89, 3, 255)));
        assert!(!s.is_host(Ipv4Addr::new(10, 89, 3, 255)));
        assert!(!s.contains(Ipv4Addr::new(10, 89, 4, 0)));
        let err = "10.89.3.1/24".parse::<Subnet>().expect_err("host bits");
        assert!(err.to_string().contains("10.89.3.0/24"), "{err}");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/31",
            "x/24",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        let big: Subnet = "10.0.0.0/8".parse().expect("parses");
        assert!(big.overlaps(s) && s.overlaps(big));
        assert!(!s.overlaps("10.89.4.0/24".parse().expect("parses")));
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"10.89.3.0/24\"");
    }

    #[test]
    fn allocates_lowest_free_host() {
        let s: Subnet = "10.1.0.0/30".parse().expect("parses");
        let gw = s.first_host();
        let mut used = BTreeSet::new();
        let a = s.allocate(gw, &used).expect("one");
        assert_eq!(a, Ipv4Addr::new(10, 1, 0, 2));
        used.insert(a);
        assert_eq!(s.allocate(gw, &used), None, "a /30 has two hosts");
    }

    #[test]
    fn reads_proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_route(text),
                vec!["192.0.2.0/24".parse::<Subnet>().expect("parses")]
            );
        }
    }
}
