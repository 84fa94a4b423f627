//! The privileged network work of one owner: the owner's bridge `bg<uid>` with the gateway
//! address of the owner's subnet, taps `bg<uid>t<N>` owned by the owner uid, the owner's
//! nftables table `ip banger_<uid>` (masquerade out of the uplink; a firewall for everything
//! that touches the bridge), forwarding on the bridge and the uplink only, and
//! systemd-resolved routing of `~vm`. Every name carries the owner, so this helper never
//! names, lists or removes another owner's objects. Every command runs as an argument vector
//! (never a shell) built from validated values; the nftables ruleset is fed to `nft -f -` on
//! stdin. Every operation is idempotent.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use banger_proto::helper::{NetworkState, bridge_name, nft_table, parse_tap_name, tap_name};
use ipnet::Ipv4Net;
use tracing::{debug, info};

use crate::validate;

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the subnet {subnet} overlaps {address} on {device}; hint: give this owner's helper another --subnet"
    )]
    SubnetInUse {
        subnet: Ipv4Net,
        address: String,
        device: String,
    },
    #[error("tap {0} cannot be named for this owner (index too high for the uid's length)")]
    TapIndex(u32),
}

/// The helper's fixed network settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub owner: u32,
}

impl NetConfig {
    /// The owner's bridge.
    pub fn bridge(&self) -> String {
        bridge_name(self.owner)
    }

    /// The owner's nftables table.
    pub fn table(&self) -> String {
        nft_table(self.owner)
    }
}

/// The default subnet of `owner`'s VMs: `172.30.<uid mod 256>.0/24`, so owners get distinct
/// subnets without configuration (uid 0 keeps `172.30.0.0/24`). Two uids equal modulo 256
/// collide; the second helper's `network_up` then refuses (see [`NetError::SubnetInUse`]).
pub fn default_subnet(owner: u32) -> Ipv4Net {
    // The prefix length 24 is valid for IPv4: the constructor cannot fail.
    Ipv4Net::new(Ipv4Addr::new(172, 30, (owner % 256) as u8, 0), 24)
        .unwrap_or_else(|_| unreachable!("24 is a valid IPv4 prefix length"))
}

/// Runs `program args...`, optionally with `stdin`, failing with its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let command_line = format!("{program} {}", args.join(" "));
    debug!(command = %command_line, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn {
            program: program.into(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| NetError::Io {
                context: format!("cannot write to {program}"),
                source,
            })?;
    }
    let output = child.wait_with_output().map_err(|source| NetError::Io {
        context: format!("cannot wait for {program}"),
        source,
    })?;
    if !output.status.success() {
        return Err(NetError::Command {
            command: command_line,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Sets `net.ipv4.conf.<device>.forwarding`: forwarding for packets arriving on that
/// interface only (never the global `ip_forward`, which would route between all interfaces).
fn enable_forwarding(device: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv4/conf/{device}/forwarding");
    std::fs::write(&path, "1").map_err(|source| NetError::Io {
        context: format!("cannot enable IPv4 forwarding on {device}"),
        source,
    })
}

/// Refuses a subnet that overlaps an address on any interface but the owner's bridge
/// (another owner's bridge, the LAN): two routes for one subnet would mix owners' traffic.
fn check_subnet_free(config: &NetConfig) -> Result<(), NetError> {
    let out = run("ip", &["-j", "-4", "addr", "show"], None)?;
    let links: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let bridge = config.bridge();
    for link in links.as_array().into_iter().flatten() {
        let device = link.get("ifname").and_then(|n| n.as_str()).unwrap_or("");
        if device == bridge {
            continue;
        }
        for info in link
            .get("addr_info")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            let (Some(local), Some(prefix)) = (
                info.get("local").and_then(|l| l.as_str()),
                info.get("prefixlen").and_then(|p| p.as_u64()),
            ) else {
                continue;
            };
            let Ok(net) = format!("{local}/{prefix}").parse::<Ipv4Net>() else {
                continue;
            };
            if net.contains(&config.subnet.network()) || config.subnet.contains(&net.network()) {
                return Err(NetError::SubnetInUse {
                    subnet: config.subnet,
                    address: format!("{local}/{prefix}"),
                    device: device.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// The owner's bridge, forwarding, nftables table and tap pool.
pub fn up(config: &NetConfig, pool_size: u32) -> Result<(), NetError> {
    check_subnet_free(config)?;
    let bridge = config.bridge();
    if !link_exists(&bridge) {
        run("ip", &["link", "add", &bridge, "type", "bridge"], None)?;
        info!(bridge, "bridge created");
    }
    let address = format!("{}/{}", config.gateway, config.subnet.prefix_len());
    run("ip", &["addr", "replace", &address, "dev", &bridge], None)?;
    run("ip", &["link", "set", &bridge, "up"], None)?;
    let uplink = default_route_device();
    enable_forwarding(&bridge)?;
    if let Some(uplink) = &uplink {
        // Replies from the outside arrive on the uplink and are forwarded to the bridge.
        enable_forwarding(uplink)?;
    }
    let ruleset = ruleset(config, uplink.as_deref());
    run("nft", &["-f", "-"], Some(&ruleset))?;
    for index in 0..pool_size {
        let name = tap_name(config.owner, index).ok_or(NetError::TapIndex(index))?;
        ensure_tap(config, &name)?;
    }
    Ok(())
}

/// The owner's nftables table, replaced atomically (create-if-missing, delete, create in one
/// transaction):
/// - nat: masquerade of the subnet out of `uplink` (the default route's interface; any
///   interface but the bridge when there is none);
/// - forward: from the bridge only the subnet's own source addresses, VM to VM on the bridge,
///   VM to the uplink; to the bridge only replies; everything else touching the bridge
///   dropped. The chains' policy stays `accept` and every drop names the bridge: a hook-wide
///   drop policy in this table would also drop the host's and every other owner's traffic;
/// - input: from the bridge only the subnet's own addresses, replies, and DNS (UDP 53) to the
///   gateway; the gateway address answers nobody off the bridge but the host itself (no open
///   resolver).
pub fn ruleset(config: &NetConfig, uplink: Option<&str>) -> String {
    let table = config.table();
    let bridge = config.bridge();
    let subnet = config.subnet;
    let gateway = config.gateway;
    let out = match uplink {
        Some(dev) => format!("oifname \"{dev}\""),
        None => format!("oifname != \"{bridge}\""),
    };
    format!(
        "table ip {table} {{}}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} {out} masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" ip saddr != {subnet} drop\n\
         \t\tiifname \"{bridge}\" ip saddr {gateway} drop\n\
         \t\tiifname \"{bridge}\" oifname \"{bridge}\" accept\n\
         \t\tiifname \"{bridge}\" {out} accept\n\
         \t\toifname \"{bridge}\" ct state established,related accept\n\
         \t\tiifname \"{bridge}\" drop\n\
         \t\toifname \"{bridge}\" drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" ip saddr != {subnet} drop\n\
         \t\tiifname \"{bridge}\" ip saddr {gateway} drop\n\
         \t\tiifname \"{bridge}\" ct state established,related accept\n\
         \t\tiifname \"{bridge}\" ip daddr {gateway} udp dport 53 accept\n\
         \t\tiifname \"{bridge}\" drop\n\
         \t\tip daddr {gateway} iifname != {{ \"lo\", \"{bridge}\" }} drop\n\
         \t}}\n\
         }}\n"
    )
}

/// The interface of the IPv4 default route, when there is one and its name is sane.
fn default_route_device() -> Option<String> {
    let out = run("ip", &["-j", "-4", "route", "show", "default"], None).ok()?;
    let routes: serde_json::Value = serde_json::from_str(&out).ok()?;
    let dev = routes.as_array()?.first()?.get("dev")?.as_str()?;
    validate::ifname(dev).ok().map(str::to_owned)
}

/// The tap (a name of this owner's, checked by the caller) exists, belongs to the owner, is
/// attached to the owner's bridge and up.
pub fn ensure_tap(config: &NetConfig, name: &str) -> Result<(), NetError> {
    let sys = Path::new("/sys/class/net").join(name);
    if sys.exists() {
        let owner = std::fs::read_to_string(sys.join("owner")).unwrap_or_default();
        if owner.trim() != config.owner.to_string() {
            // Only this helper makes names with this owner's uid: a tap of another owner
            // cannot carry one. Whatever this is, it is not used by anyone we serve.
            info!(
                tap = name,
                owner = owner.trim(),
                "tap has another owner; recreating"
            );
            run("ip", &["link", "del", name], None)?;
        }
    }
    if !sys.exists() {
        let uid = config.owner.to_string();
        run(
            "ip",
            &["tuntap", "add", "dev", name, "mode", "tap", "user", &uid],
            None,
        )?;
        info!(tap = name, owner = config.owner, "tap created");
    }
    run(
        "ip",
        &["link", "set", name, "master", &config.bridge()],
        None,
    )?;
    run("ip", &["link", "set", name, "up"], None)?;
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the union's first member),
/// padded to the kernel's 40 bytes.
#[repr(C)]
struct TunIfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, TunIfReq);

/// TUNSETIFF flags: a tap, without packet information, with virtio-net headers (what QEMU
/// asks for itself when it opens a tap by name).
const TAP_FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000;

/// [`ensure_tap`], then a queue of it opened here (`/dev/net/tun` + TUNSETIFF) for the
/// owner's VMM to use as its NIC (`-netdev tap,fd=N`). The owner could open their own tap
/// themselves where `/dev/net/tun` is 0666 (the kernel lets a tap's owner attach to it); the
/// descriptor gives them exactly that and nothing more, on hosts where the node is root's
/// only (no udev).
pub fn open_tap(config: &NetConfig, name: &str) -> Result<std::os::fd::OwnedFd, NetError> {
    use std::os::fd::AsRawFd;
    ensure_tap(config, name)?;
    let io = |context: String| move |source| NetError::Io { context, source };
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io("cannot open /dev/net/tun".into()))?;
    let mut request = TunIfReq {
        name: [0; 16],
        flags: TAP_FLAGS,
        _pad: [0; 22],
    };
    // The name was validated (at most 15 bytes), so a NUL always follows it.
    let bytes = name.as_bytes();
    request.name[..bytes.len().min(15)].copy_from_slice(&bytes[..bytes.len().min(15)]);
    // SAFETY: TUNSETIFF reads one `struct ifreq`, which `TunIfReq` lays out (40 bytes); the
    // descriptor is open for the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &request) }.map_err(|errno| NetError::Io {
        context: format!("cannot attach to tap {name}"),
        source: std::io::Error::from(errno),
    })?;
    Ok(tun.into())
}

/// Removes the tap (a name of this owner's, checked by the caller) when it exists.
pub fn delete_tap(name: &str) -> Result<(), NetError> {
    if link_exists(name) {
        run("ip", &["link", "del", name], None)?;
        info!(tap = name, "tap deleted");
    }
    Ok(())
}

/// Every link named like one of `owner`'s taps.
fn taps(owner: u32) -> Vec<String> {
    let mut names: Vec<(u32, String)> = std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter_map(|name| match parse_tap_name(&name) {
                    Some((o, i)) if o == owner => Some((i, name)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(|(_, name)| name).collect()
}

fn nft_table_exists(table: &str) -> bool {
    run("nft", &["list", "table", "ip", table], None).is_ok()
}

/// What exists of the owner's network now.
pub fn status(config: &NetConfig) -> NetworkState {
    let flags = std::fs::read_to_string(
        Path::new("/sys/class/net")
            .join(config.bridge())
            .join("flags"),
    )
    .ok()
    .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok());
    NetworkState {
        bridge_up: flags.is_some_and(|f| f & 1 == 1),
        taps: taps(config.owner),
        nft_table: nft_table_exists(&config.table()),
    }
}

/// Removes the owner's taps, bridge and table; nothing of anyone else's.
pub fn down(config: &NetConfig) -> Result<(), NetError> {
    for tap in taps(config.owner) {
        delete_tap(&tap)?;
    }
    let bridge = config.bridge();
    if link_exists(&bridge) {
        run("ip", &["link", "del", &bridge], None)?;
        info!(bridge, "bridge deleted");
    }
    let table = config.table();
    let drop = format!("table ip {table} {{}}\ndelete table ip {table}\n");
    run("nft", &["-f", "-"], Some(&drop))?;
    Ok(())
}

/// Routes `~vm` to the gateway on the owner's bridge through systemd-resolved; `false` when
/// systemd-resolved does not run here.
pub fn route_dns(config: &NetConfig) -> Result<bool, NetError> {
    if !Path::new("/run/systemd/resolve/io.systemd.Resolve").exists() {
        return Ok(false);
    }
    let gateway = config.gateway.to_string();
    let bridge = config.bridge();
    run("resolvectl", &["dns", &bridge, &gateway], None)?;
    run("resolvectl", &["domain", &bridge, "~vm"], None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> NetConfig {
        NetConfig {
            subnet: "172.30.232.0/24".parse().unwrap(),
            gateway: "172.30.232.1".parse().unwrap(),
            owner: 1000,
        }
    }

    #[test]
    fn ruleset_is_the_owners_and_drops_what_is_not_allowed() {
        let rules = ruleset(&config(), Some("eth0"));
        assert!(rules.starts_with("table ip banger_1000 {}\ndelete table ip banger_1000\n"));
        for line in [
            "ip saddr 172.30.232.0/24 oifname \"eth0\" masquerade",
            "iifname \"bg1000\" ip saddr != 172.30.232.0/24 drop",
            "iifname \"bg1000\" oifname \"eth0\" accept",
            "oifname \"bg1000\" ct state established,related accept",
            "iifname \"bg1000\" ip daddr 172.30.232.1 udp dport 53 accept",
            "ip daddr 172.30.232.1 iifname != { \"lo\", \"bg1000\" } drop",
        ] {
            assert!(rules.contains(line), "{line} missing:\n{rules}");
        }
        // Both filter chains end with drops for the bridge, and nothing accepts new
        // connections towards it.
        assert_eq!(rules.matches("oifname \"bg1000\" drop").count(), 1);
        assert_eq!(rules.matches("iifname \"bg1000\" drop").count(), 2);
        assert!(!rules.contains("policy drop"));
        let rules = ruleset(&config(), None);
        assert!(rules.contains("oifname != \"bg1000\" masquerade"));
    }

    #[test]
    fn default_subnets_differ_by_owner() {
        assert_eq!(default_subnet(0).to_string(), "172.30.0.0/24");
        assert_eq!(default_subnet(1000).to_string(), "172.30.232.0/24");
        assert_eq!(default_subnet(1001).to_string(), "172.30.233.0/24");
    }
}
