//! Published ports: docker's `-p [IP:][HOST:]CTR[/PROTO]` syntax.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The name iptables and docker use: `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `-p` flag: traffic to `host_ip:host_port` (any local address when `host_ip` is
/// `0.0.0.0`) goes to the container's `container_port`. `host_port == 0` asks for a
/// free port, chosen when the container is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    /// The host address to publish on; `0.0.0.0` means every local address.
    pub host_ip: Ipv4Addr,
    /// The host port; 0 = pick a free one.
    pub host_port: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

/// Why a `-p` value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port publication `{spec}`: {reason}")]
pub struct PortSpecError {
    /// The text given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| PortSpecError {
            spec: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (rest, proto) = match s.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Proto::Tcp),
            Some((rest, "udp")) => (rest, Proto::Udp),
            Some((_, other)) => {
                return Err(fail(&format!(
                    "unsupported protocol `{other}` (tcp or udp)"
                )));
            }
            None => (s, Proto::Tcp),
        };
        if rest.starts_with('[') {
            return Err(fail("IPv6 host addresses are not supported"));
        }
        let parts: Vec<&str> = rest.split(':').collect();
        let (ip, host, ctr) = match parts.as_slice() {
            [ctr] => (None, "", *ctr),
            [host, ctr] => (None, *host, *ctr),
            [ip, host, ctr] => (Some(*ip), *host, *ctr),
            _ => return Err(fail("expected [IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]")),
        };
        let port = |text: &str, what: &str| -> Result<u16, PortSpecError> {
            if text.contains('-') {
                return Err(fail("port ranges are not supported"));
            }
            match text.parse::<u16>() {
                Ok(0) | Err(_) => Err(fail(&format!(
                    "the {what} `{text}` is not a port number (1-65535)"
                ))),
                Ok(p) => Ok(p),
            }
        };
        let host_ip = match ip {
            None | Some("") => Ipv4Addr::UNSPECIFIED,
            Some(ip) => ip
                .parse()
                .map_err(|_| fail(&format!("`{ip}` is not an IPv4 address")))?,
        };
        let host_port = if host.is_empty() {
            0
        } else {
            port(host, "host port")?
        };
        Ok(PortSpec {
            host_ip,
            host_port,
            container_port: port(ctr, "container port")?,
            proto,
        })
    }
}

impl fmt::Display for PortSpec {
    /// Docker's `docker port` form: `0.0.0.0:8080->80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}->{}/{}",
            self.host_ip, self.host_port, self.container_port, self.proto
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PortSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_docker_forms() {
        assert_eq!(
            p("80"),
            PortSpec {
                host_ip: Ipv4Addr::UNSPECIFIED,
                host_port: 0,
                container_port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!(p("8080:80").host_port, 8080);
        assert_eq!(p("8080:80").container_port, 80);
        let q = p("127.0.0.1:8080:80/udp");
        assert_eq!(q.host_ip, Ipv4Addr::LOCALHOST);
        assert_eq!(q.proto, Proto::Udp);
        let r = p("127.0.0.1::53/udp");
        assert_eq!((r.host_port, r.container_port), (0, 53));
        assert_eq!(p(":8080:80").host_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(p("1.2.3.4:1:2/tcp").to_string(), "1.2.3.4:1->2/tcp");
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "",
            "0",
            "x",
            "80/sctp",
            "1:2:3:4",
            "70000",
            "8080:0",
            "[::1]:80:80",
            "a.b:1:2",
            "8000-8001:80",
            ":",
            "80/",
        ] {
            let err = bad.parse::<PortSpec>().expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
