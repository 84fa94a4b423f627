//! Validation of every argument the helper receives: tap names from banger's own pattern,
//! addresses inside the configured subnet, pool sizes; and the refusals of paths (resolved
//! beneath the state dir's descriptor in `confine`), loop devices and device-mapper names
//! (checked in `disk`). Nothing reaches a command line or a syscall without passing through
//! here.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use banger_proto::helper::parse_tap_name;
use ipnet::Ipv4Net;

/// Why an argument was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    #[error("{0:?} is not a banger tap name (bg<uid>t<N>)")]
    TapName(String),
    #[error("{name:?} is a tap of uid {owner}, not of this helper's owner")]
    TapNotOwned { name: String, owner: u32 },
    #[error("{0:?} is not an IPv4 address")]
    Address(String),
    #[error("{addr} is outside the subnet {subnet}")]
    OutsideSubnet { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("{addr} is reserved in {subnet} (network, gateway or broadcast)")]
    Reserved { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("{0:?} is not an absolute path without `..`")]
    PathShape(String),
    #[error("{path:?} is outside the state dir {root:?}")]
    PathEscapes { path: String, root: PathBuf },
    #[error(
        "{0:?} is not a regular file of the owner beneath the state dir (missing, not \
         accessible, through a symlink or mount point, or another's)"
    )]
    NotOwnersFile(String),
    /// The state dir cannot serve as the confinement root (`confine::RootError`).
    #[error("{0}")]
    StateDir(String),
    #[error("{0:?} is not a valid interface name")]
    IfName(String),
    #[error("pool size {0} is above the limit of {1}")]
    PoolSize(u32, u32),
    #[error("{0:?} is not a loop device (/dev/loopN)")]
    LoopDevice(String),
    #[error("{0} was not attached by this helper for this owner (or is detached)")]
    LoopNotOwned(String),
    #[error("{device} is backed by another file now, not {expected:?}: left attached")]
    LoopReused { device: String, expected: String },
    #[error("{0} cannot be both the origin and the copy-on-write store")]
    SameLoop(String),
    #[error("the snapshot origin {0} is not read-only")]
    OriginWritable(String),
    #[error("{0:?} is not a banger device-mapper name (banger-<owner uid>-<vm id>)")]
    DmName(String),
    #[error("{0} is not a device-mapper mapping banger made for this owner")]
    DmNotOwned(String),
}

/// A tap name of `owner`'s: `bg<owner>t<N>`. Another owner's tap is refused by name, before
/// anything looks at the interface.
pub fn tap(name: &str, owner: u32) -> Result<&str, Invalid> {
    match parse_tap_name(name) {
        None => Err(Invalid::TapName(name.to_owned())),
        Some((o, _)) if o != owner => Err(Invalid::TapNotOwned {
            name: name.to_owned(),
            owner: o,
        }),
        Some(_) => Ok(name),
    }
}

/// An address a guest may hold: inside `subnet`, not its network, gateway or broadcast.
pub fn guest_address(text: &str, subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<Ipv4Addr, Invalid> {
    let addr: Ipv4Addr = text
        .parse()
        .map_err(|_| Invalid::Address(text.to_owned()))?;
    if !subnet.contains(&addr) {
        return Err(Invalid::OutsideSubnet { addr, subnet });
    }
    if addr == subnet.network() || addr == subnet.broadcast() || addr == gateway {
        return Err(Invalid::Reserved { addr, subnet });
    }
    Ok(addr)
}

/// A network interface name as the kernel accepts it (for names the helper reads from the
/// kernel, e.g. the default route's device, before they go into an nftables rule).
pub fn ifname(name: &str) -> Result<&str, Invalid> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(name)
        .ok_or_else(|| Invalid::IfName(name.to_owned()))
}

/// Largest tap pool the helper creates at once.
pub const MAX_POOL: u32 = 256;

/// A pool size.
pub fn pool_size(size: u32) -> Result<u32, Invalid> {
    if size > MAX_POOL {
        return Err(Invalid::PoolSize(size, MAX_POOL));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn subnet() -> Ipv4Net {
        "172.30.0.0/24".parse().unwrap()
    }

    #[test]
    fn addresses_must_be_inside_and_not_reserved() {
        let gw: Ipv4Addr = "172.30.0.1".parse().unwrap();
        assert!(guest_address("172.30.0.2", subnet(), gw).is_ok());
        assert!(guest_address("172.30.0.254", subnet(), gw).is_ok());
        for bad in [
            "172.30.1.2",
            "10.0.0.1",
            "172.30.0.0",
            "172.30.0.1",
            "172.30.0.255",
        ] {
            assert!(guest_address(bad, subnet(), gw).is_err(), "{bad}");
        }
        assert!(matches!(
            guest_address("1.2.3", subnet(), gw),
            Err(Invalid::Address(_))
        ));
    }

    #[test]
    fn taps_of_another_owner_are_refused() {
        assert_eq!(tap("bg1000t3", 1000), Ok("bg1000t3"));
        assert!(matches!(
            tap("bg1001t3", 1000),
            Err(Invalid::TapNotOwned { owner: 1001, .. })
        ));
        assert!(matches!(tap("bg-tap-3", 1000), Err(Invalid::TapName(_))));
    }

    #[test]
    fn interface_names() {
        assert!(ifname("eth0").is_ok());
        assert!(ifname("veth-out.1").is_ok());
        for bad in ["", "a b", "x\"y", "abcdefghijklmnop", "a;b"] {
            assert!(ifname(bad).is_err(), "{bad}");
        }
    }
}
