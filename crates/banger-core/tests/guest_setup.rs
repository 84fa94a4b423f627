//! The guest image's `guest-setup` script (guest/rootfs/usr/local/lib/banger/guest-setup)
//! run on the host in mount and UTS namespaces of its own: tmpfs over /etc and /run, a
//! command line of the test's over /proc/cmdline. With room it writes the network file and
//! the /etc files; on a full root filesystem it still writes the network file (in /run) and
//! exits 0, leaving /etc/hostname whole: a VM whose `/` filled up stays reachable. Needs
//! root (namespaces and mounts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../guest/rootfs/usr/local/lib/banger/guest-setup")
}

/// Runs the script with /etc a 64 KiB tmpfs holding `hostname` = `old` (filled up when
/// `full`); returns (exit code of the script, what it logged, /etc/hostname, the network
/// file, /etc's entries).
fn run(full: bool) -> (String, String, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cmdline = dir.path().join("cmdline");
    std::fs::write(
        &cmdline,
        "console=ttyS0 root=/dev/vda rw banger.hostname=checked banger.ip=10.0.2.15/24 \
         banger.gw=10.0.2.2 banger.dns=10.0.2.3\n",
    )
    .unwrap();
    let fill = if full {
        "dd if=/dev/zero of=/etc/fill bs=4k 2>/dev/null || true"
    } else {
        "true"
    };
    let out = Command::new("unshare")
        .args(["-mu", "sh", "-c"])
        .arg(format!(
            "set -e; mount --make-rprivate /; mount -t tmpfs -o size=64k tmpfs /etc; \
             echo old > /etc/hostname; {fill}; mount -t tmpfs tmpfs /run; \
             mount --bind {cmdline} /proc/cmdline; \
             set +e; {script} 2>/run/log; echo \"rc=$?\"; set -e; \
             echo '--log'; cat /run/log; echo '--hostname'; cat /etc/hostname; \
             echo '--network'; cat /run/systemd/network/10-banger.network || true; \
             echo '--etc'; ls /etc",
            cmdline = cmdline.display(),
            script = script().display(),
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unshare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let part = |from: &str, to: &str| {
        let start = text.find(from).unwrap() + from.len();
        let end = text[start..].find(to).map_or(text.len(), |e| start + e);
        text[start..end].trim().to_owned()
    };
    (
        part("rc=", "--log"),
        part("--log", "--hostname"),
        part("--hostname", "--network"),
        part("--network", "--etc"),
        part("--etc", "\u{0}"),
    )
}

#[test]
fn guest_setup_brings_the_network_up_even_on_a_full_root() {
    if !nix::unistd::geteuid().is_root() {
        banger_shared::skip::report(
            "guest_setup_brings_the_network_up_even_on_a_full_root",
            "needs root (mount and UTS namespaces)",
        );
        return;
    }
    let (rc, log, hostname, network, etc) = run(false);
    assert_eq!(rc, "0", "{log}");
    assert_eq!(hostname, "checked");
    assert!(network.contains("Address=10.0.2.15/24"), "{network}");
    assert!(
        etc.contains("hosts") && etc.contains("resolv.conf") && !etc.contains("banger-tmp"),
        "{etc}"
    );

    let (rc, log, hostname, network, etc) = run(true);
    assert_eq!(rc, "0", "{log}");
    assert!(
        network.contains("Address=10.0.2.15/24") && network.contains("Gateway=10.0.2.2"),
        "{network}"
    );
    assert_eq!(hostname, "old", "a full /etc keeps the old file whole");
    assert!(log.contains("cannot write /etc/hostname"), "{log}");
    assert!(!etc.contains("banger-tmp"), "{etc}");
}
