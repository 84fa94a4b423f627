//! The privileged network work: bridge `banger0` with the gateway address, taps owned by the
//! owner uid, the nftables table `banger` (masquerade + forward accept), IP forwarding, and
//! systemd-resolved routing of `~vm`. Every command runs as an argument vector (never a shell)
//! built from validated values; the nftables ruleset is fed to `nft -f -` on stdin.
//! Every operation is idempotent.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use banger_proto::helper::{BRIDGE_NAME, NFT_TABLE, NetworkState, parse_tap_name, tap_name};
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
}

/// The helper's fixed network settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub owner: u32,
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

/// Bridge, forwarding, nftables and the tap pool.
pub fn up(config: &NetConfig, pool_size: u32) -> Result<(), NetError> {
    if !link_exists(BRIDGE_NAME) {
        run("ip", &["link", "add", BRIDGE_NAME, "type", "bridge"], None)?;
        info!(bridge = BRIDGE_NAME, "bridge created");
    }
    let address = format!("{}/{}", config.gateway, config.subnet.prefix_len());
    run(
        "ip",
        &["addr", "replace", &address, "dev", BRIDGE_NAME],
        None,
    )?;
    run("ip", &["link", "set", BRIDGE_NAME, "up"], None)?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| NetError::Io {
        context: "cannot enable IPv4 forwarding".into(),
        source,
    })?;
    let ruleset = ruleset(config.subnet, default_route_device().as_deref());
    run("nft", &["-f", "-"], Some(&ruleset))?;
    for index in 0..pool_size {
        ensure_tap(config, &tap_name(index))?;
    }
    Ok(())
}

/// The nftables table: masquerade of the subnet out of `out_device` (the default route's
/// interface; any interface but the bridge when there is none), and forward accept for the
/// bridge. Replaced atomically (create-if-missing, delete, create in one transaction).
pub fn ruleset(subnet: Ipv4Net, out_device: Option<&str>) -> String {
    let out = match out_device {
        Some(dev) => format!("oifname \"{dev}\""),
        None => format!("oifname != \"{BRIDGE_NAME}\""),
    };
    format!(
        "table ip {NFT_TABLE} {{}}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} {out} masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{BRIDGE_NAME}\" accept\n\
         \t\toifname \"{BRIDGE_NAME}\" ct state established,related accept\n\
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

/// The tap exists, belongs to the owner, is attached to the bridge and up.
pub fn ensure_tap(config: &NetConfig, name: &str) -> Result<(), NetError> {
    let sys = Path::new("/sys/class/net").join(name);
    if sys.exists() {
        let owner = std::fs::read_to_string(sys.join("owner")).unwrap_or_default();
        if owner.trim() != config.owner.to_string() {
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
    run("ip", &["link", "set", name, "master", BRIDGE_NAME], None)?;
    run("ip", &["link", "set", name, "up"], None)?;
    Ok(())
}

/// Removes the tap when it exists.
pub fn delete_tap(name: &str) -> Result<(), NetError> {
    if link_exists(name) {
        run("ip", &["link", "del", name], None)?;
        info!(tap = name, "tap deleted");
    }
    Ok(())
}

/// Every link named like a banger tap.
fn taps() -> Vec<String> {
    let mut names: Vec<(u32, String)> = std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter_map(|name| parse_tap_name(&name).map(|i| (i, name)))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(|(_, name)| name).collect()
}

fn nft_table_exists() -> bool {
    run("nft", &["list", "table", "ip", NFT_TABLE], None).is_ok()
}

/// What exists now.
pub fn status() -> NetworkState {
    let flags =
        std::fs::read_to_string(Path::new("/sys/class/net").join(BRIDGE_NAME).join("flags"))
            .ok()
            .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok());
    NetworkState {
        bridge_up: flags.is_some_and(|f| f & 1 == 1),
        taps: taps(),
        nft_table: nft_table_exists(),
    }
}

/// Removes every tap, the bridge and the table.
pub fn down() -> Result<(), NetError> {
    for tap in taps() {
        delete_tap(&tap)?;
    }
    if link_exists(BRIDGE_NAME) {
        run("ip", &["link", "del", BRIDGE_NAME], None)?;
        info!(bridge = BRIDGE_NAME, "bridge deleted");
    }
    let drop = format!("table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n");
    run("nft", &["-f", "-"], Some(&drop))?;
    Ok(())
}

/// Routes `~vm` to the gateway on the bridge through systemd-resolved; `false` when
/// systemd-resolved does not run here.
pub fn route_dns(config: &NetConfig) -> Result<bool, NetError> {
    if !Path::new("/run/systemd/resolve/io.systemd.Resolve").exists() {
        return Ok(false);
    }
    let gateway = config.gateway.to_string();
    run("resolvectl", &["dns", BRIDGE_NAME, &gateway], None)?;
    run("resolvectl", &["domain", BRIDGE_NAME, "~vm"], None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ruleset_names_the_subnet_and_devices() {
        let subnet: Ipv4Net = "172.30.0.0/24".parse().unwrap();
        let rules = ruleset(subnet, Some("eth0"));
        assert!(rules.contains("ip saddr 172.30.0.0/24 oifname \"eth0\" masquerade"));
        assert!(rules.starts_with("table ip banger {}\ndelete table ip banger\n"));
        let rules = ruleset(subnet, None);
        assert!(rules.contains("oifname != \"banger0\" masquerade"));
    }
}
