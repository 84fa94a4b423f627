//! The default image's kernel (banger's microVM kernel) has what a developer's sandbox needs,
//! in one real VM: it runs that kernel, an nftables ruleset with
//! conntrack and NAT loads and lists, an overlay mounts, network and user namespaces work,
//! IPv6 runs on lo, /dev/fuse and TUN/TAP exist, a veth pair joins a bridge, loop devices
//! attach, and cgroup v2 offers the container controllers. Traffic stays inside the guest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use banger_e2e::TestEnv;

/// The host's `nft` and the libraries it needs that a minimal guest lacks (Debian 12 on
/// both sides), copied into `dir`: the image does not ship nftables.
fn stage_nft(dir: &Path) -> bool {
    let Some(nft) = ["/usr/sbin/nft", "/sbin/nft"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        return false;
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(nft, dir.join("nft")).unwrap();
    let ldd = std::process::Command::new("ldd").arg(nft).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)"; the C library and the
        // loader are the guest's own.
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        let path = rest.split_whitespace().next().unwrap_or_default();
        if name.starts_with("libc.so") || name.starts_with("ld-linux") || path.is_empty() {
            continue;
        }
        std::fs::copy(path, dir.join(name)).unwrap();
    }
    true
}

#[test]
fn the_default_kernel_has_what_a_developer_sandbox_needs() {
    let env = TestEnv::new();
    env.build_default_image();
    env.banger(&["vm", "run", "dev", "--memory", "1G"]).ok();
    let exec = |script: &str| {
        env.banger(&["vm", "exec", "dev", "--", "sh", "-c", script])
            .ok()
            .stdout
            .trim()
            .to_owned()
    };

    // banger's microVM kernel, its devices declared on the command line.
    assert!(
        exec("uname -r").ends_with("-banger"),
        "not the microVM kernel"
    );
    let cmdline = exec("cat /proc/cmdline");
    assert!(cmdline.contains("virtio_mmio.device="), "{cmdline}");

    // nftables: a filter chain with conntrack, NAT with masquerade, listed back.
    let staged = env.home().join("nft-stage");
    if stage_nft(&staged) {
        env.banger(&["vm", "cp", staged.to_str().unwrap(), "dev:/root/nft"])
            .ok();
        let ruleset = exec(
            "export LD_LIBRARY_PATH=/root/nft; N=/root/nft/nft; \
             $N add table inet t && \
             $N add chain inet t in '{ type filter hook input priority 0; policy accept; }' && \
             $N add rule inet t in ct state established,related counter accept && \
             $N add rule inet t in ip6 saddr ::1 tcp dport 9 counter drop && \
             $N add table ip nat && \
             $N add chain ip nat post '{ type nat hook postrouting priority 100; }' && \
             $N add rule ip nat post oifname br0 masquerade && \
             $N add chain ip nat pre '{ type nat hook prerouting priority -100; }' && \
             $N add rule ip nat pre tcp dport 8080 dnat to 10.99.0.2:80 && \
             $N list ruleset",
        );
        for want in [
            "ct state established,related",
            "masquerade",
            "dnat to 10.99.0.2:80",
            "hook postrouting",
        ] {
            assert!(ruleset.contains(want), "{want} missing from:\n{ruleset}");
        }
    } else {
        banger_shared::skip::report(
            "the_default_kernel_has_what_a_developer_sandbox_needs (nftables part)",
            "the host has no nft to copy into the guest (package nftables; scripts/install-deps)",
        );
    }

    // overlayfs.
    assert_eq!(
        exec(
            "mkdir -p /tmp/o/l /tmp/o/u /tmp/o/w /tmp/o/m && echo low > /tmp/o/l/f && \
             mount -t overlay overlay -o lowerdir=/tmp/o/l,upperdir=/tmp/o/u,workdir=/tmp/o/w /tmp/o/m && \
             echo up >> /tmp/o/m/f && cat /tmp/o/m/f /tmp/o/l/f | tr '\\n' ' ' && umount /tmp/o/m"
        ),
        "low up low"
    );

    // Namespaces: a new network namespace has only lo; a user namespace maps root.
    assert_eq!(exec("unshare -n ip -o link | wc -l"), "1");
    assert_eq!(
        exec("unshare -U -r -p -f --mount-proc -m -i -u sh -c 'id -u; echo $$'"),
        "0\n1"
    );
    assert!(
        !exec("ls /proc/self/ns").is_empty() && exec("ls /proc/self/ns").contains("time"),
        "time namespace missing"
    );

    // IPv6 on lo.
    assert!(exec("ip -6 addr show dev lo").contains("::1/128"));
    assert!(exec("ping -6 -c 1 -W 5 ::1").contains("1 received"));

    // FUSE and TUN/TAP devices, loop devices.
    assert_eq!(exec("test -c /dev/fuse && echo fuse"), "fuse");
    assert_eq!(exec("test -c /dev/net/tun && echo tun"), "tun");
    exec("ip tuntap add dev tap9 mode tap && ip link del tap9");
    assert_eq!(
        exec(
            "truncate -s 8M /tmp/loop.img && d=$(losetup -f --show /tmp/loop.img) && \
             echo ${d%%[0-9]*} && losetup -d $d"
        ),
        "/dev/loop"
    );

    // A veth pair on a bridge, addressed and answering inside the guest (a namespace).
    let bridged = exec(
        "ip link add br9 type bridge && ip link add v9a type veth peer name v9b && \
         ip link set v9a master br9 && ip addr add 10.99.0.1/24 dev br9 && \
         ip link set br9 up && ip link set v9a up && ip netns add n9 && \
         ip link set v9b netns n9 && ip -n n9 addr add 10.99.0.2/24 dev v9b && \
         ip -n n9 link set v9b up && ip -n n9 link set lo up && \
         ping -c 1 -W 10 10.99.0.2 | grep -c '1 received'; \
         ip netns del n9; ip link del br9",
    );
    assert_eq!(bridged, "1");

    // cgroup v2 with the controllers containers use.
    let controllers = exec("cat /sys/fs/cgroup/cgroup.controllers");
    for controller in ["cpuset", "cpu", "io", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|c| c == controller),
            "{controller} missing: {controllers}"
        );
    }
    // A child cgroup with limits (BPF-based device control needs the BPF syscall).
    assert_eq!(
        exec(
            "echo +memory +pids > /sys/fs/cgroup/cgroup.subtree_control && \
             mkdir /sys/fs/cgroup/t9 && echo 64M > /sys/fs/cgroup/t9/memory.max && \
             echo 10 > /sys/fs/cgroup/t9/pids.max && cat /sys/fs/cgroup/t9/pids.max && \
             rmdir /sys/fs/cgroup/t9"
        ),
        "10"
    );
    assert_eq!(exec("test -d /sys/fs/bpf && echo bpf"), "bpf");

    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "rm", "dev"]).ok();
}
