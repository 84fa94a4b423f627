//! Named snapshots (`vm snapshot create|ls|restore|rm`) of one real QEMU VM (three boots, to
//! keep TCG time down). A guest loop writes numbered files (each by an atomic rename, so the
//! writer itself never leaves a torn one); snapshots are taken with the VM stopped, the loop
//! keeps writing after the next start, and a restore gives back exactly the files of the
//! snapshot: an exact prefix 1..M, every file whole, nothing written later. The disks'
//! content is read on the host without booting (`qemu-img convert` of the chain to a raw
//! file, then `e2fsck -fn` and `debugfs`), so only what needs a guest boots one. Also: a
//! restore of a running VM and a snapshot of a suspended one are refused with a hint (a
//! running VM is snapshotted live: tests/live_snapshots.rs), the work disk (a qcow2 overlay once
//! snapshotted) still grows online, removing a snapshot that the VM and a later snapshot
//! continue from merges it without changing what they hold, and `vm rm` takes the snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use banger_e2e::{TestEnv, assert_fsck_clean, disk_as_raw, poll, system_tool};

const GIB: u64 = 1 << 30;

/// A shared 2-core host under load boots a TCG guest slowly: a generous start bound.
const CONFIG: &str = "[daemon]\nstart_timeout_secs = 900\n";

/// Starts a guest loop (its own session) that continues the numbering in /root/nums: file N
/// holds N, written beside and renamed into place, twenty a second.
const START_WRITER: &str = "mkdir -p /root/nums && setsid -f sh -c 'cd /root/nums; \
    i=$(ls | sort -n | tail -n 1); i=${i:-0}; \
    while :; do i=$((i+1)); echo $i > .next; mv .next $i; sleep 0.05; done' \
    </dev/null >/dev/null 2>&1";

/// The number of files the writer made (the highest name).
fn written(env: &TestEnv) -> u64 {
    env.guest_sh("dev", "ls /root/nums | sort -n | tail -n 1")
        .parse()
        .unwrap_or(0)
}

/// Waits until the writer passed `n`.
fn wait_written(env: &TestEnv, n: u64) -> u64 {
    poll(Duration::from_secs(120), "the writer writing", || {
        let now = written(env);
        (now > n).then_some(now)
    })
}

/// `vm snapshot ARGS` fails with exit `code`, one line saying `says` and a hint.
#[track_caller]
fn refused(env: &TestEnv, args: &[&str], code: i32, says: &str) {
    let mut all = vec!["vm", "snapshot"];
    all.extend_from_slice(args);
    let run = env.banger(&all);
    assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
    assert!(
        run.stderr.contains(says) && run.stderr.contains("hint"),
        "{args:?}: {}",
        run.stderr
    );
}

/// The files of directory `dir` in the ext4 image `image`, name → content (`debugfs rdump`).
fn files_in(image: &Path, dir: &str, scratch: &Path) -> BTreeMap<String, String> {
    let out = scratch.join("rdump");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let run = Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg(format!("rdump {dir} {}", out.display()))
        .arg(image)
        .output()
        .unwrap();
    assert!(run.status.success(), "debugfs rdump {dir}");
    let base = out.join(dir.trim_start_matches('/'));
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        files.insert(name, std::fs::read_to_string(entry.path()).unwrap());
    }
    files
}

/// Whether `path` exists in the ext4 image `image`.
fn exists_in(image: &Path, path: &str) -> bool {
    let run = Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .output()
        .unwrap();
    !String::from_utf8_lossy(&run.stderr).contains("File not found")
}

/// The numbered files are exactly 1..=M, each holding its number; returns M.
#[track_caller]
fn exact_prefix(files: &BTreeMap<String, String>) -> u64 {
    let mut numbers: Vec<u64> = files
        .keys()
        .filter(|n| !n.starts_with('.'))
        .map(|n| n.parse().unwrap_or_else(|_| panic!("unexpected file {n}")))
        .collect();
    numbers.sort_unstable();
    let m = numbers.len() as u64;
    assert_eq!(numbers, (1..=m).collect::<Vec<_>>(), "not a prefix");
    for n in &numbers {
        assert_eq!(
            files[&n.to_string()].trim(),
            n.to_string(),
            "file {n} is torn"
        );
    }
    m
}

/// The VM's work disk on the host (the raw file, or its qcow2 overlay) as a checked raw
/// image: its numbered files, and whether `marker` is on it.
fn host_view(env: &TestEnv, scratch: &Path, marker: &str) -> (BTreeMap<String, String>, bool) {
    let dir = env.vm_dir("dev");
    let (top, format) = if dir.join("work.qcow2").exists() {
        (dir.join("work.qcow2"), "qcow2")
    } else {
        (dir.join("work.ext4"), "raw")
    };
    let raw = disk_as_raw(&top, format, scratch);
    assert_fsck_clean(&raw, "the work disk");
    let files = files_in(&raw, "/nums", scratch);
    let has = exists_in(&raw, marker);
    std::fs::remove_file(raw).unwrap();
    (files, has)
}

/// Whether `path` is on the VM's system disk (read on the host).
fn on_system_disk(env: &TestEnv, scratch: &Path, path: &str) -> bool {
    let raw = disk_as_raw(&env.vm_dir("dev").join("system.qcow2"), "qcow2", scratch);
    let has = exists_in(&raw, path);
    std::fs::remove_file(raw).unwrap();
    has
}

#[test]
fn snapshots_restore_exact_prefixes_and_merge_on_removal() {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), CONFIG).unwrap();
    env.build_default_image();
    let scratch = tempfile::tempdir().unwrap();
    let scratch = scratch.path();

    // Boot 1: the writer runs, the VM stops cleanly, a first snapshot is taken.
    env.banger_or_dump(&["vm", "run", "dev", "--disk", "2G"]);
    env.guest_sh("dev", START_WRITER);
    wait_written(&env, 10);
    env.banger(&["vm", "stop", "dev"]).ok();
    let dir = env.vm_dir("dev");
    let taken = env
        .banger(&["vm", "snapshot", "create", "dev", "s1", "--json"])
        .ok()
        .json();
    assert_eq!(taken["name"], "s1", "{taken}");
    assert_eq!(taken["current"], true, "{taken}");
    let s1_dir = dir.join("snapshots").join(taken["id"].as_str().unwrap());
    // No copy: the VM's raw work disk itself moved into the snapshot, the VM continues on
    // qcow2 overlays.
    assert!(s1_dir.join("work.ext4").is_file());
    assert!(s1_dir.join("system.qcow2").is_file());
    assert!(!dir.join("work.ext4").exists());
    assert!(dir.join("work.qcow2").is_file() && dir.join("system.qcow2").is_file());
    refused(
        &env,
        &["create", "dev", "s1"],
        1,
        "already has a snapshot s1",
    );
    let (s1_files, _) = host_view(&env, scratch, "/after-s1");
    let m1 = exact_prefix(&s1_files);
    assert!(m1 > 10, "{m1} files");
    let shown = env.vm_show("dev");
    assert_eq!(shown["snapshots"]["count"], 1, "{shown}");
    assert!(shown["snapshots"]["bytes"].as_u64().unwrap() > 0, "{shown}");
    let listed = env.banger(&["vm", "ls"]).ok().stdout;
    assert!(
        listed.contains("SNAPSHOTS") && listed.lines().any(|l| l.contains(" 1 (")),
        "{listed}"
    );

    // Boot 2: the guest sees the same files, keeps writing; the qcow2 work disk grows online.
    env.banger(&["vm", "start", "dev"]).ok();
    assert_eq!(written(&env), m1);
    refused(&env, &["restore", "dev", "s1"], 4, "stop");
    env.guest_sh("dev", "touch /root/after-s1 /var/tmp/after-s1 && sync");
    env.guest_sh("dev", START_WRITER);
    wait_written(&env, m1 + 10);
    let spec = env
        .banger(&["vm", "set", "dev", "--disk", "3G", "--json"])
        .ok()
        .json();
    assert_eq!(spec["disk_size_bytes"], 3 * GIB, "{spec}");
    let df: u64 = env
        .guest_sh("dev", "df -B1 --output=size /root | tail -n 1")
        .parse()
        .unwrap();
    assert!(df > 2 * GIB + GIB / 2, "df /root: {df}");
    // Suspended: its saved memory pairs with the disks, so no snapshot.
    env.banger(&["vm", "suspend", "dev"]).ok();
    refused(&env, &["create", "dev", "s2"], 4, "suspended");
    env.banger(&["vm", "start", "dev"]).ok();
    env.banger(&["vm", "stop", "dev"]).ok();

    // A second snapshot with the default name, continuing from the first.
    let s2 = env
        .banger(&["vm", "snapshot", "create", "dev", "--json"])
        .ok()
        .json();
    let s2_name = s2["name"].as_str().unwrap().to_owned();
    assert!(s2_name.starts_with("snap-"), "{s2}");
    assert_eq!(s2["parent"], "s1", "{s2}");
    let (s2_files, after) = host_view(&env, scratch, "/after-s1");
    let m2 = exact_prefix(&s2_files);
    assert!(
        m2 > m1 + 10 && after,
        "{m2} files after {m1}; marker {after}"
    );

    // Restore s1 (stopped): exactly its files, nothing written later, on both disks.
    let restored = env
        .banger(&["vm", "snapshot", "restore", "dev", "s1", "--json"])
        .ok()
        .json();
    assert_eq!(restored["spec"]["disk_size_bytes"], 2 * GIB, "{restored}");
    let (files, after) = host_view(&env, scratch, "/after-s1");
    assert_eq!(files, s1_files);
    assert!(!after, "a file written after s1 survived its restore");
    assert!(!on_system_disk(&env, scratch, "/var/tmp/after-s1"));
    let listed = env.vm_snapshots("dev");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["current"], true, "{listed:?}");

    // Removing s1, which the VM and s2 continue from: merged into both, nothing changes.
    refused(&env, &["rm", "dev", "nope"], 2, "not found");
    env.banger(&["vm", "snapshot", "rm", "dev", "s1"]).ok();
    assert!(!s1_dir.exists());
    let listed = env.vm_snapshots("dev");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], s2_name.as_str());
    assert!(listed[0].get("parent").is_none(), "{listed:?}");
    let (files, after) = host_view(&env, scratch, "/after-s1");
    assert_eq!(files, s1_files, "the VM's disk changed when s1 was merged");
    assert!(!after);

    // Restore s2 and boot 3: its files, its marker, its disk size.
    env.banger(&["vm", "snapshot", "restore", "dev", &s2_name])
        .ok();
    let (files, after) = host_view(&env, scratch, "/after-s1");
    assert_eq!(files, s2_files);
    assert!(after);
    assert!(on_system_disk(&env, scratch, "/var/tmp/after-s1"));
    env.banger(&["vm", "start", "dev"]).ok();
    assert_eq!(written(&env), m2);
    assert_eq!(
        env.guest_sh("dev", "ls /root/after-s1 /var/tmp/after-s1 | wc -l"),
        "2"
    );
    let df: u64 = env
        .guest_sh("dev", "df -B1 --output=size /root | tail -n 1")
        .parse()
        .unwrap();
    assert!(df > 2 * GIB + GIB / 2, "df /root after restoring s2: {df}");
    env.banger(&["vm", "stop", "dev"]).ok();

    // `vm rm` takes the snapshots with the VM.
    env.banger(&["vm", "rm", "dev"]).ok();
    assert!(!dir.exists());
}

/// What tells a guest apart: hostname, machine-id, SSH host key, MAC of its NIC.
fn identity(env: &TestEnv, vm: &str) -> [String; 4] {
    [
        env.guest_sh(vm, "hostname"),
        env.guest_sh(vm, "cat /etc/machine-id"),
        env.guest_sh(vm, "cut -d' ' -f1,2 /root/.banger/ssh_host_ed25519_key.pub"),
        env.guest_sh(
            vm,
            "for d in /sys/class/net/*; do [ \"${d##*/}\" = lo ] || cat $d/address; done",
        ),
    ]
}

/// A clone (more boots, both VMs running at once): its own name, machine-id, host key and
/// MAC, the source's files and none of what either writes afterwards, also when the daemon
/// died at each step of its first start; the source and its snapshot cannot go while the
/// clone exists.
#[test]
fn clones_boot_with_their_own_identity() {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), CONFIG).unwrap();
    env.build_default_image();
    env.banger_or_dump(&["vm", "run", "src", "--memory", "512M"]);
    env.guest_sh("src", "echo before > /root/shared && sync");
    env.banger(&["vm", "stop", "src"]).ok();
    // A memory clone is refused: it would resume as a twin.
    let memory = env.banger(&["vm", "clone", "src", "cl", "--memory"]);
    assert_eq!(memory.code, 1, "{}", memory.stderr);
    assert!(memory.stderr.contains("hint"), "{}", memory.stderr);
    let cloned = env
        .banger(&["vm", "clone", "src", "cl", "--json"])
        .ok()
        .json();
    assert_eq!(cloned["cloned_from"], "src/clone-cl", "{cloned}");
    assert_eq!(cloned["state"], "created", "{cloned}");
    // The source and the snapshot the clone continues from stay while it exists.
    let rm = env.banger(&["vm", "rm", "src"]);
    assert_eq!(rm.code, 1, "{}", rm.stderr);
    assert!(
        rm.stderr.contains("cl") && rm.stderr.contains("hint"),
        "{}",
        rm.stderr
    );
    let rm = env.banger(&["vm", "snapshot", "rm", "src", "clone-cl"]);
    assert_eq!(rm.code, 1, "{}", rm.stderr);
    assert!(rm.stderr.contains("clone cl"), "{}", rm.stderr);

    env.banger(&["vm", "start", "src"]).ok();
    // The daemon killed at each step of the clone's first start (its new host key pinned
    // beside the old, then the guest switched to it): the next start still connects.
    let cl_dir = env.vm_dir("cl");
    for fault in ["clone.after_pin_both", "clone.after_guest_key"] {
        env.banger(&["daemon", "stop"]).ok();
        let run = env.with_fault(fault, &["vm", "start", "cl"]);
        assert_ne!(run.code, 0, "{fault}: the start succeeded");
        assert!(env.daemon_gone(), "{fault}: the daemon still runs");
        let pinned = std::fs::read_to_string(cl_dir.join("known_hosts")).unwrap();
        assert_eq!(pinned.lines().count(), 2, "{fault}: {pinned}");
        assert_eq!(env.vm_show("cl")["state"], "stopped", "{fault}");
        assert_eq!(env.vm_show("src")["state"], "running", "{fault}");
    }
    let started = env.banger(&["vm", "start", "cl"]);
    if started.code != 0 {
        env.dump_diagnostics();
    }
    started.ok();
    let (src, cl) = (identity(&env, "src"), identity(&env, "cl"));
    assert_eq!(cl[0], "cl");
    for (what, (a, b)) in ["hostname", "machine-id", "host key", "MAC"]
        .iter()
        .zip(src.iter().zip(cl.iter()))
    {
        assert_ne!(a, b, "{what}: the clone has its source's");
    }
    let cl_id = env.banger(&["vm", "show", "cl", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cl[1], cl_id, "the clone's machine-id is its id");
    // The pinned key is the one the clone's sshd serves now (a new connection checks it).
    let pinned =
        std::fs::read_to_string(env.home().join("vms").join(&cl_id).join("known_hosts")).unwrap();
    assert!(pinned.contains(&cl[2]), "{pinned}");
    assert_eq!(
        pinned.lines().count(),
        1,
        "only the clone's own key: {pinned}"
    );
    let ssh_control = env.home().join("run/vms").join(&cl_id).join("ssh-control");
    let _ = std::fs::remove_file(ssh_control);
    assert_eq!(env.guest_sh("cl", "cat /root/shared"), "before");
    // Written in one, absent in the other.
    env.guest_sh("cl", "echo cl > /root/only-cl && sync");
    env.guest_sh("src", "echo src > /root/only-src && sync");
    assert_eq!(
        env.guest_sh("src", "ls /root/only-cl 2>/dev/null | wc -l"),
        "0"
    );
    assert_eq!(
        env.guest_sh("cl", "ls /root/only-src 2>/dev/null | wc -l"),
        "0"
    );
    assert_eq!(env.guest_sh("cl", "cat /root/only-cl"), "cl");

    env.banger(&["vm", "stop", "cl"]).ok();
    env.banger(&["vm", "stop", "src"]).ok();
    env.banger(&["vm", "rm", "cl"]).ok();
    env.banger(&["vm", "snapshot", "rm", "src", "clone-cl"])
        .ok();
    env.banger(&["vm", "rm", "src"]).ok();
}
