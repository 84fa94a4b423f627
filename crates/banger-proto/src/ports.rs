//! Published ports: a host address and port forwarded to a guest port, written
//! `[HOSTIP:]HOSTPORT:GUESTPORT[/udp]` as docker does (default host address 127.0.0.1,
//! default protocol TCP).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PortProto {
    Tcp,
    Udp,
}

impl PortProto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    pub proto: PortProto,
    /// The host address it listens on (127.0.0.1 unless given).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

/// Why a port spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{spec:?} is not a port mapping: {why}; hint: write [HOSTIP:]HOSTPORT:GUESTPORT[/udp], e.g. 8080:80 or 127.0.0.1:5353:53/udp"
)]
pub struct PortSpecError {
    pub spec: String,
    pub why: &'static str,
}

impl PortMapping {
    /// Parses `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`.
    pub fn parse(spec: &str) -> Result<Self, PortSpecError> {
        let err = |why| PortSpecError {
            spec: spec.to_owned(),
            why,
        };
        let (ports, proto) = match spec.rsplit_once('/') {
            Some((ports, proto)) => (
                ports,
                PortProto::parse(proto).ok_or_else(|| err("the protocol is not tcp or udp"))?,
            ),
            None => (spec, PortProto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts.as_slice() {
            [host, guest] => (Ipv4Addr::LOCALHOST, *host, *guest),
            [ip, host, guest] => (
                ip.parse()
                    .map_err(|_| err("the host address is not an IPv4 address"))?,
                *host,
                *guest,
            ),
            _ => return Err(err("expected two or three `:`-separated parts")),
        };
        let port = |text: &str| {
            text.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("a port is not a number from 1 to 65535"))
        };
        Ok(Self {
            proto,
            host_ip,
            host_port: port(host_port)?,
            guest_port: port(guest_port)?,
        })
    }

    /// The host side, `ip:port` (with the protocol, what identifies the mapping on the host).
    pub fn host_side(&self) -> String {
        format!("{}:{}", self.host_ip, self.host_port)
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_ip,
            self.host_port,
            self.guest_port,
            self.proto.as_str()
        )
    }
}

/// `POST /v1/vms/{name}/ports`: published ports to add and to remove (applied to a running
/// VM at once, and kept with the VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortChangeRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<PortMapping>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<PortMapping>,
}

/// A VM's published ports (`GET /v1/vms/{name}/ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortList {
    pub vm: String,
    /// Whether the VM runs (its ports are live) or not (applied at its next start).
    pub live: bool,
    pub ports: Vec<PortMapping>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn docker_syntax() {
        let p = PortMapping::parse("8080:80").unwrap();
        assert_eq!(
            p,
            PortMapping {
                proto: PortProto::Tcp,
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: 8080,
                guest_port: 80
            }
        );
        assert_eq!(p.to_string(), "127.0.0.1:8080:80/tcp");
        let p = PortMapping::parse("0.0.0.0:5353:53/udp").unwrap();
        assert_eq!(p.proto, PortProto::Udp);
        assert_eq!(p.host_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(PortMapping::parse(&p.to_string()).unwrap(), p);
        for bad in [
            "80",
            "a:80",
            "0:80",
            "8080:70000",
            "1.2.3:80:80",
            "80:80/sctp",
            "1:2:3:4",
            "",
            "::1:80:80",
        ] {
            let e = PortMapping::parse(bad).unwrap_err();
            assert!(e.to_string().contains("hint:"), "{bad}");
        }
    }
}
