//! Live named snapshots (`vm snapshot create` of a running or paused QEMU VM) on one real
//! VM. A guest loop writes numbered files (each by an atomic rename); a snapshot taken while
//! it runs holds an exact prefix 1..k of them, every file whole, k at least what the loop had
//! written (and synced) before the command, and both of its disks pass `e2fsck -fn` on the
//! host: the guest's filesystems were frozen when the VMM switched to new overlays. The loop
//! keeps writing through the snapshot. Then every `snapshot.live.*` fault point: the daemon
//! killed there (and, before the switch, the step failed), and QEMU killed there while the
//! daemon runs on (`kill-vmm`). Afterwards the VM runs (or starts), its guest is not frozen,
//! nothing written and synced before the command is lost, and no QEMU, suspend state, overlay
//! or snapshot directory is left that no snapshot names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use banger_e2e::{TestEnv, assert_fsck_clean, disk_as_raw, poll, system_tool};

/// A shared 2-core host under load boots a TCG guest slowly: a generous start bound.
const CONFIG: &str = "[daemon]\nstart_timeout_secs = 900\n";

/// Starts a guest loop (its own session) that continues the numbering in /root/nums: file N
/// holds N, written beside and renamed into place, twenty a second.
const START_WRITER: &str = "mkdir -p /root/nums && setsid -f sh -c 'cd /root/nums; \
    i=$(ls | sort -n | tail -n 1); i=${i:-0}; \
    while :; do i=$((i+1)); echo $i > .next; mv .next $i; sleep 0.05; done' \
    </dev/null >/dev/null 2>&1";

/// Every live snapshot step: the daemon killed there, and (separately, the daemon running on)
/// QEMU killed there; the first four (before the VMM switches) also failed there.
const KILLS: &[&str] = &[
    "snapshot.live.after_record",
    "snapshot.live.after_system_moved",
    "snapshot.live.after_overlays",
    "snapshot.live.after_freeze",
    "snapshot.live.after_switch",
    "snapshot.live.after_thaw",
];
const FAILS: &[&str] = &[
    "snapshot.live.after_record",
    "snapshot.live.after_system_moved",
    "snapshot.live.after_overlays",
    "snapshot.live.after_freeze",
];

/// The number of files the writer had made (the highest name), then synced to disk.
fn written_synced(env: &TestEnv) -> u64 {
    env.guest_sh(
        "dev",
        "n=$(ls /root/nums | sort -n | tail -n 1); sync; echo $n",
    )
    .parse()
    .unwrap_or(0)
}

/// Waits until the writer passed `n`.
fn wait_written(env: &TestEnv, n: u64) -> u64 {
    poll(Duration::from_secs(120), "the writer writing", || {
        let now: u64 = env
            .guest_sh("dev", "ls /root/nums | sort -n | tail -n 1")
            .parse()
            .unwrap_or(0);
        (now > n).then_some(now)
    })
}

/// The numbered files as the guest sees them: the highest, and how many of 1..=`upto` are
/// missing or do not hold their number.
fn guest_prefix(env: &TestEnv, upto: u64) -> (u64, u64) {
    let script = format!(
        "cd /root/nums; n=$(ls | sort -n | tail -n 1); bad=0; \
             for i in $(seq 1 {upto}); do [ \"$(cat $i 2>/dev/null)\" = \"$i\" ] || \
             {{ bad=$((bad+1)); ls -l $i >&2; }}; done; echo $n $bad"
    );
    let run = env
        .banger(&["vm", "exec", "dev", "--", "sh", "-c", &script])
        .ok();
    eprintln!("guest files: {}{}", run.stdout, run.stderr);
    let out = run.stdout;
    let mut words = out.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
    (words.next().unwrap(), words.next().unwrap())
}

/// The guest's filesystems are not frozen: `fsfreeze -u` of a thawed filesystem fails
/// (EINVAL), of a frozen one succeeds (and would say so); then both take a write.
#[track_caller]
fn not_frozen(env: &TestEnv, why: &str) {
    let run = env.banger_within(
        Duration::from_secs(120),
        &[
            "vm",
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "fsfreeze -u /root 2>/dev/null && echo FROZEN /root; \
             fsfreeze -u / 2>/dev/null && echo FROZEN /; touch /root/.probe /.probe && sync",
        ],
    );
    assert_eq!(run.code, 0, "{why}: {}", run.stderr);
    assert!(!run.stdout.contains("FROZEN"), "{why}: {}", run.stdout);
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

/// The stopped VM's disks as the host reads them: both pass `e2fsck -fn`; returns the
/// numbered files' exact prefix M.
#[track_caller]
fn host_view(env: &TestEnv, scratch: &Path, what: &str) -> u64 {
    let dir = env.vm_dir("dev");
    let system = disk_as_raw(&dir.join("system.qcow2"), "qcow2", scratch);
    assert_fsck_clean(&system, what);
    std::fs::remove_file(system).unwrap();
    let (top, format) = if dir.join("work.qcow2").exists() {
        (dir.join("work.qcow2"), "qcow2")
    } else {
        (dir.join("work.ext4"), "raw")
    };
    let work = disk_as_raw(&top, format, scratch);
    assert_fsck_clean(&work, what);
    let m = exact_prefix(&files_in(&work, "/nums", scratch));
    std::fs::remove_file(work).unwrap();
    m
}

/// Nothing orphaned: the snapshot directories are exactly the listed snapshots', each with
/// its two files; no partial or live overlay and no suspend state in the VM's directory; the
/// VM's tops are there.
#[track_caller]
fn no_orphans(env: &TestEnv, what: &str) -> BTreeSet<String> {
    let dir = env.vm_dir("dev");
    let listed: BTreeMap<String, String> = env
        .vm_snapshots("dev")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        on_disk,
        listed.keys().cloned().collect::<BTreeSet<_>>(),
        "{what}: snapshot directories"
    );
    for id in &on_disk {
        let files = std::fs::read_dir(dir.join("snapshots").join(id))
            .unwrap()
            .count();
        assert_eq!(files, 2, "{what}: snapshot {id} holds {files} files");
    }
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains("partial") && !name.contains(".live-"),
            "{what}: {name} left in the VM's directory"
        );
        // No suspend state (`snapshot.state`, its memory, its manifest).
        assert!(
            !name.starts_with("snapshot."),
            "{what}: {name} left in the VM's directory"
        );
    }
    assert!(dir.join("system.qcow2").is_file(), "{what}");
    assert!(
        dir.join("work.qcow2").is_file() || dir.join("work.ext4").is_file(),
        "{what}"
    );
    listed.into_values().collect()
}

#[test]
fn live_snapshots_are_consistent_and_survive_faults() {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), CONFIG).unwrap();
    env.build_default_image();
    let scratch = tempfile::tempdir().unwrap();
    let scratch = scratch.path();
    let run = env.banger(&["vm", "run", "dev", "--disk", "1G"]);
    if run.code != 0 {
        env.dump_diagnostics();
    }
    run.ok();
    env.guest_sh("dev", START_WRITER);
    wait_written(&env, 10);

    // A snapshot while the writer runs; the VM runs on, the writer keeps writing.
    let before = written_synced(&env);
    let taken = env
        .banger(&["vm", "snapshot", "create", "dev", "s1", "--json"])
        .ok()
        .json();
    let after = wait_written(&env, 0);
    assert_eq!(taken["current"], true, "{taken}");
    assert_eq!(env.vm_show("dev")["state"], "running");
    let dir = env.vm_dir("dev");
    let s1_dir = dir.join("snapshots").join(taken["id"].as_str().unwrap());
    // No copy: the raw work disk itself moved into the snapshot; the VM writes to overlays.
    assert!(s1_dir.join("work.ext4").is_file() && s1_dir.join("system.qcow2").is_file());
    assert!(dir.join("work.qcow2").is_file() && !dir.join("work.ext4").exists());
    not_frozen(&env, "after s1");
    wait_written(&env, after + 10);
    // The snapshot's files, read on the host while the VM runs on over them: two clean
    // filesystems, an exact prefix holding at least what was synced before the command.
    let system = disk_as_raw(&s1_dir.join("system.qcow2"), "qcow2", scratch);
    assert_fsck_clean(&system, "s1 system disk");
    std::fs::remove_file(system).unwrap();
    let work = disk_as_raw(&s1_dir.join("work.ext4"), "raw", scratch);
    assert_fsck_clean(&work, "s1 work disk");
    let k1 = exact_prefix(&files_in(&work, "/nums", scratch));
    std::fs::remove_file(work).unwrap();
    assert!(
        before <= k1 && k1 <= after,
        "s1 holds {k1} files; {before} before, {after} after"
    );

    // A paused VM: no freeze (its vCPUs do not run), and it stays paused.
    env.banger(&["vm", "pause", "dev"]).ok();
    env.banger(&["vm", "snapshot", "create", "dev", "p1"]).ok();
    assert_eq!(env.vm_show("dev")["state"], "paused");
    env.banger(&["vm", "resume", "dev"]).ok();
    not_frozen(&env, "after p1");
    let mut names = no_orphans(&env, "p1");
    assert_eq!(
        names,
        ["p1", "s1"].map(String::from).into_iter().collect(),
        "{names:?}"
    );

    // Every step faulted.
    let mut round = 0;
    let mut last_before = 0;
    for step in KILLS {
        let mut faults = vec![(*step).to_owned(), format!("{step}=kill-vmm")];
        if FAILS.contains(step) {
            faults.push(format!("{step}=fail"));
        }
        for fault in faults {
            round += 1;
            let name = format!("f{round}");
            let failed = fault.ends_with("=fail");
            let kill_qemu = fault.ends_with("=kill-vmm");
            let switched = matches!(
                *step,
                "snapshot.live.after_switch" | "snapshot.live.after_thaw"
            );
            let before = written_synced(&env);
            // The fault reaches only a daemon started with it (the VM keeps running; the
            // next daemon reattaches it).
            env.banger(&["daemon", "stop"]).ok();
            let run = env.with_fault(&fault, &["vm", "snapshot", "create", "dev", &name]);
            if kill_qemu {
                eprintln!("{fault}: exit {}: {}", run.code, run.stderr.trim());
                // The daemon runs on; past the switch the snapshot is taken.
                let daemons = env.daemon_pids();
                assert_eq!(daemons.len(), 1, "{fault}: the daemon died");
                if switched {
                    assert_eq!(run.code, 0, "{fault}: {}", run.stderr);
                } else {
                    assert_ne!(run.code, 0, "{fault}: the command succeeded");
                    let error = run.stderr.trim();
                    assert_eq!(error.lines().count(), 1, "{fault}: {error}");
                    assert!(
                        error.contains("VMM ended during its snapshot: the VM is stopped"),
                        "{fault}: {error}"
                    );
                }
                assert!(env.qemu_pids().is_empty(), "{fault}: QEMU left");
                assert_eq!(env.vm_show("dev")["state"], "stopped", "{fault}");
                assert_eq!(
                    env.vm_show("dev")["last_stop"]["kind"],
                    "unclean",
                    "{fault}"
                );
                assert_eq!(env.daemon_pids(), daemons, "{fault}: the same daemon");
            } else if failed {
                assert_ne!(run.code, 0, "{fault}: the command succeeded");
                assert!(
                    run.stderr.contains("injected fault at"),
                    "{fault}: {}",
                    run.stderr
                );
                env.banger(&["daemon", "stop"]).ok();
            } else {
                assert_ne!(run.code, 0, "{fault}: the command succeeded");
                assert!(env.daemon_gone(), "{fault}: the daemon still runs");
            }
            // A daemon killed: the next one (without the fault) settles the snapshot at its
            // start.
            let now = no_orphans(&env, &fault);
            // Taken when the VMM had switched; undone when it had not and still runs; kept
            // (every byte is in its files) when it died.
            assert_eq!(
                now.contains(&name),
                switched || kill_qemu,
                "{fault}: {now:?}"
            );
            if kill_qemu {
                // Killed, not stopped: the guest's journal is replayed at the next boot,
                // where every file synced before the command must be whole (later ones may
                // be empty: ext4 had not allocated their data when QEMU died).
                env.banger_within(Duration::from_secs(1000), &["vm", "start", "dev"])
                    .ok();
                let (m, torn) = guest_prefix(&env, before);
                assert_eq!(torn, 0, "{fault}: {torn} of 1..{before} missing or torn");
                assert!(m >= before, "{fault}: {m} files, {before} synced before");
                // The files after those go (they may be empty), and the writer goes on.
                env.guest_sh("dev", &format!(
                        "cd /root/nums; for f in *; do [ \"$f\" -gt {before} ] && rm -f \"$f\"; done; sync"
                    ),
                );
                env.guest_sh("dev", START_WRITER);
            } else {
                assert_eq!(env.vm_show("dev")["state"], "running", "{fault}");
            }
            not_frozen(&env, &fault);
            wait_written(&env, before);
            names = now;
            last_before = before;
        }
    }
    assert!(names.contains("s1") && names.contains("p1"), "{names:?}");

    // Stopped: the VM's own disks are clean and lost nothing.
    env.banger_within(Duration::from_secs(300), &["vm", "stop", "dev"])
        .ok();
    let m = host_view(&env, scratch, "after the faults");
    assert!(
        m > last_before,
        "{m} files, {last_before} before the last fault"
    );

    // Restore s1, start: exactly its files.
    env.banger(&["vm", "snapshot", "restore", "dev", "s1"]).ok();
    assert_eq!(host_view(&env, scratch, "restored s1"), k1);
    env.banger_within(Duration::from_secs(1000), &["vm", "start", "dev"])
        .ok();
    let seen: u64 = env
        .guest_sh("dev", "ls /root/nums | wc -l")
        .parse()
        .unwrap();
    assert_eq!(seen, k1, "the guest after restoring s1");
    env.banger_within(Duration::from_secs(300), &["vm", "stop", "dev"])
        .ok();
    env.banger(&["vm", "rm", "dev"]).ok();
    assert!(!dir.exists());
    assert!(env.qemu_pids().is_empty());
}
