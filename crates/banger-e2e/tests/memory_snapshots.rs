//! Memory snapshots (`vm snapshot create --memory`) on one real QEMU VM. A guest process
//! counts in a file; after a memory snapshot the VM runs on; once it is stopped, given more
//! memory and restored to the snapshot (which gives it the snapshot's CPUs and memory back),
//! `vm start` resumes it (no boot): the same process, its count continued
//! from where the snapshot caught it (not from where the VM was stopped), the guest clock
//! within 2 s of the host's, the files of that moment. A paused VM's memory snapshot leaves
//! it paused; a stopped VM's is refused; a memory clone is refused; a clone of the running
//! VM boots, and so does a clone of the memory snapshot's disks. Then every `snapshot.memory.*` fault point, the daemon killed there: the next
//! daemon leaves the VM running (the dead one had paused it), the snapshot undone, kept with
//! its disks only, or whole, and no unsealed state behind; and a restore killed after its
//! disks, finished by the next daemon, still resumes. A VM suspended on a snapshot's memory
//! can be restored to another snapshot; one suspended by `vm suspend` cannot. Last, QEMU
//! killed at every memory step while the daemon runs on (`kill-vmm`): the VM stopped, the
//! snapshot kept, the next boot with everything synced before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_e2e::{TestEnv, poll};
use serde_json::Value;

/// A shared 2-core host under load boots a TCG guest slowly: a generous start bound.
const CONFIG: &str = "[daemon]\nstart_timeout_secs = 900\n";

/// A counter in its own session: its pid in /root/counter.pid, its count in /root/count,
/// twenty a second.
const START_COUNTER: &str = "setsid -f sh -c 'echo $$ > /root/counter.pid; i=0; \
    while :; do i=$((i+1)); echo $i > /root/count.next; mv /root/count.next /root/count; \
    sleep 0.05; done' </dev/null >/dev/null 2>&1; \
    while [ ! -s /root/counter.pid ]; do sleep 0.05; done";

/// The memory points, killed there, and what the snapshot is afterwards.
const KILLS: &[(&str, Kept)] = &[
    ("snapshot.memory.after_pause", Kept::Nothing),
    ("snapshot.memory.after_switch", Kept::Disks),
    ("snapshot.memory.after_state", Kept::Disks),
    ("snapshot.memory.after_resume", Kept::Disks),
    ("snapshot.memory.after_seal", Kept::Memory),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Undone: the VMM had not switched.
    Nothing,
    /// Taken, without its memory (its state was not sealed).
    Disks,
    /// Taken whole.
    Memory,
}

fn count(env: &TestEnv) -> u64 {
    env.guest_sh("dev", "cat /root/count").parse().unwrap()
}

fn counter_pid(env: &TestEnv) -> String {
    env.guest_sh("dev", "cat /root/counter.pid")
}

/// Waits until the count passed `n`; returns it.
fn wait_count(env: &TestEnv, n: u64) -> u64 {
    poll(Duration::from_secs(120), "the counter counting", || {
        let now = count(env);
        (now > n).then_some(now)
    })
}

fn snapshot(env: &TestEnv, name: &str) -> Option<Value> {
    env.vm_snapshots("dev")
        .into_iter()
        .find(|s| s["name"] == name)
}

/// No state without its manifest in any snapshot directory, no overlay left beside the
/// VM's tops, no suspend state in the VM's directory unless it is suspended.
#[track_caller]
fn no_leftovers(env: &TestEnv, dir: &Path, what: &str) {
    let listed: Vec<String> = env
        .vm_snapshots("dev")
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    for entry in std::fs::read_dir(dir.join("snapshots")).unwrap().flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        assert!(
            listed.contains(&id),
            "{what}: directory {id} of no snapshot"
        );
        let state = entry.path().join("snapshot.state").exists();
        let sealed = entry.path().join("snapshot.json").exists();
        assert_eq!(
            state, sealed,
            "{what}: {id}: state {state}, manifest {sealed}"
        );
    }
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains("partial") && !name.contains(".live-"),
            "{what}: {name} left in the VM's directory"
        );
    }
    if env.vm_show("dev")["state"] != "suspended" {
        assert!(
            !dir.join("snapshot.state").exists(),
            "{what}: a suspend state"
        );
    }
}

/// Seconds since the epoch, as a float.
fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn memory_snapshots_resume_where_they_were_and_survive_faults() {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), CONFIG).unwrap();
    env.build_default_image();
    env.banger_or_dump(&["vm", "run", "dev", "--disk", "1G"]);
    let dir = env.vm_dir("dev");
    env.guest_sh("dev", START_COUNTER);
    let pid = counter_pid(&env);
    wait_count(&env, 10);
    env.guest_sh("dev", "echo before > /root/before");

    // The snapshot: the VM runs on, counting.
    let at_least = count(&env);
    let taken = env
        .banger(&[
            "vm", "snapshot", "create", "dev", "m1", "--memory", "--json",
        ])
        .ok()
        .json();
    let at_most = count(&env);
    assert_eq!(taken["memory"], true, "{taken}");
    assert_eq!(env.vm_show("dev")["state"], "running");
    let m1 = dir.join("snapshots").join(taken["id"].as_str().unwrap());
    assert!(m1.join("snapshot.state").is_file() && m1.join("snapshot.json").is_file());
    // Moved on past the snapshot: a resume from the stop's state would count from here.
    let stopped_at = wait_count(&env, at_most + 200);
    env.guest_sh("dev", "echo after > /root/after; sync");
    assert_eq!(counter_pid(&env), pid);
    let table = env.banger(&["vm", "snapshot", "ls", "dev"]).ok().stdout;
    assert!(table.contains("MEMORY") && table.contains("yes"), "{table}");

    // A paused VM: its memory snapshot leaves it paused.
    env.banger(&["vm", "pause", "dev"]).ok();
    let paused = env
        .banger(&[
            "vm", "snapshot", "create", "dev", "p1", "--memory", "--json",
        ])
        .ok()
        .json();
    assert_eq!(paused["memory"], true, "{paused}");
    assert_eq!(env.vm_show("dev")["state"], "paused");
    env.banger(&["vm", "resume", "dev"]).ok();
    wait_count(&env, stopped_at);

    // A memory clone is refused, nothing made.
    let clone = env.banger(&["vm", "clone", "dev", "twin", "--snapshot", "m1", "--memory"]);
    assert_ne!(clone.code, 0);
    assert!(
        clone.stderr.contains("--memory") && clone.stderr.contains("hint"),
        "{}",
        clone.stderr
    );
    assert_ne!(env.banger(&["vm", "show", "twin"]).code, 0);

    env.banger_within(Duration::from_secs(300), &["vm", "stop", "dev"])
        .ok();
    // A stopped VM has no memory to save.
    let refused = env.banger(&["vm", "snapshot", "create", "dev", "x", "--memory"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("running VM's memory") && refused.stderr.contains("hint"),
        "{}",
        refused.stderr
    );
    assert!(snapshot(&env, "x").is_none());
    // Resized since: its memory loads only into the machine it was taken from.
    let machine = |vm: &Value| (vm["spec"]["cpus"].clone(), vm["spec"]["memory_mib"].clone());
    let taken_on = machine(&env.vm_show("dev"));
    let bigger = taken_on.1.as_u64().unwrap() + 256;
    env.banger(&["vm", "set", "dev", "--memory", &format!("{bigger}M")])
        .ok();
    assert_eq!(env.vm_show("dev")["spec"]["memory_mib"], bigger);

    // Restore: suspended there, on the snapshot's machine; start resumes it.
    let restored = env
        .banger(&["vm", "snapshot", "restore", "dev", "m1", "--json"])
        .ok()
        .json();
    assert_eq!(restored["state"], "suspended", "{restored}");
    assert_eq!(machine(&restored), taken_on, "{restored}");
    let started = env
        .banger_within(Duration::from_secs(300), &["vm", "start", "dev", "--json"])
        .ok()
        .json();
    assert_eq!(started["restored"], true, "{started}");
    let resumed_at = count(&env);
    assert!(
        at_least <= resumed_at && resumed_at < stopped_at,
        "count {resumed_at} after the resume: {at_least}..{at_most} at the snapshot, {stopped_at} at the stop"
    );
    assert_eq!(counter_pid(&env), pid, "the same process");
    wait_count(&env, resumed_at);
    let before = host_now();
    let guest_now: f64 = env.guest_sh("dev", "date +%s.%N").parse().unwrap();
    let after = host_now();
    assert!(
        guest_now > before - 2.0 && guest_now < after + 2.0,
        "guest clock {guest_now}, host {before}..{after}"
    );
    assert_eq!(
        env.guest_sh(
            "dev",
            "cat /root/before; ls /root/after 2>/dev/null || echo none"
        ),
        "before\nnone"
    );
    no_leftovers(&env, &dir, "after the resume");

    // A clone of the running VM (a live snapshot first) boots as itself.
    env.banger(&["vm", "clone", "dev", "c2"]).ok();
    env.banger_within(Duration::from_secs(1000), &["vm", "start", "c2"])
        .ok();
    assert_eq!(
        env.guest_sh("c2", "cat /root/before; hostname"),
        "before\nc2"
    );
    env.banger(&["vm", "rm", "-f", "c2"]).ok();
    assert!(snapshot(&env, "clone-c2").is_some());
    // A memory snapshot's clone boots from its disks, which the snapshot's sync filled;
    // the snapshot is the second switch of dev's QEMU, which must have let go of its files
    // (a clone's QEMU cannot open them otherwise) while dev runs on.
    env.guest_sh("dev", "echo m2 > /root/m2");
    env.banger(&["vm", "snapshot", "create", "dev", "m2", "--memory"])
        .ok();
    env.banger(&["vm", "clone", "dev", "c3", "--snapshot", "m2"])
        .ok();
    env.banger_within(Duration::from_secs(1000), &["vm", "start", "c3"])
        .ok();
    assert_eq!(
        env.guest_sh(
            "c3",
            "cat /root/before /root/m2; ls /root/after 2>/dev/null || echo none"
        ),
        "before\nm2\nnone"
    );
    assert_eq!(env.vm_show("dev")["state"], "running");
    env.banger(&["vm", "rm", "-f", "c3"]).ok();

    // Every memory step, the daemon killed there.
    for (round, (step, kept)) in KILLS.iter().enumerate() {
        let name = format!("k{round}");
        let before = count(&env);
        env.banger(&["daemon", "stop"]).ok();
        let run = env.with_fault(
            step,
            &["vm", "snapshot", "create", "dev", &name, "--memory"],
        );
        assert_ne!(run.code, 0, "{step}: the command succeeded");
        assert!(env.daemon_gone(), "{step}: the daemon still runs");
        // The next daemon settles the snapshot and runs the VM on.
        assert_eq!(env.vm_show("dev")["state"], "running", "{step}");
        wait_count(&env, before);
        assert_eq!(counter_pid(&env), pid, "{step}");
        let found = snapshot(&env, &name);
        match kept {
            Kept::Nothing => assert!(found.is_none(), "{step}: {found:?}"),
            Kept::Disks => assert_eq!(found.unwrap()["memory"], Value::Null, "{step}"),
            Kept::Memory => assert_eq!(found.unwrap()["memory"], true, "{step}"),
        }
        no_leftovers(&env, &dir, step);
    }

    // A restore killed after its disks: the next daemon finishes it, suspended.
    env.banger_within(Duration::from_secs(300), &["vm", "stop", "dev"])
        .ok();
    env.banger(&["daemon", "stop"]).ok();
    let run = env.with_fault(
        "snapshot.restore_after_disks",
        &["vm", "snapshot", "restore", "dev", "k4"],
    );
    assert_ne!(run.code, 0);
    assert_eq!(env.vm_show("dev")["state"], "suspended");
    // Suspended on a snapshot's memory, which the snapshot keeps: another restore is
    // allowed; one to a disk snapshot leaves the VM stopped, without a suspend state.
    env.banger(&["vm", "snapshot", "restore", "dev", "clone-c2"])
        .ok();
    assert_eq!(env.vm_show("dev")["state"], "stopped");
    assert!(!dir.join("snapshot.state").exists());
    env.banger(&["vm", "snapshot", "restore", "dev", "k4"]).ok();
    assert_eq!(env.vm_show("dev")["state"], "suspended");
    let started = env
        .banger_within(Duration::from_secs(300), &["vm", "start", "dev", "--json"])
        .ok()
        .json();
    assert_eq!(started["restored"], true, "{started}");
    assert_eq!(counter_pid(&env), pid);
    no_leftovers(&env, &dir, "after the killed restore");
    // A VM suspended by `vm suspend` holds memory no snapshot has: a restore is refused.
    env.banger(&["vm", "suspend", "dev"]).ok();
    let refused = env.banger(&["vm", "snapshot", "restore", "dev", "m1"]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("suspended"), "{}", refused.stderr);
    env.banger_within(Duration::from_secs(300), &["vm", "start", "dev"])
        .ok();

    // QEMU killed at every memory step, the daemon running on: the VM ends stopped, the
    // snapshot kept (with its memory once QEMU had written it), and the VM boots again with
    // what was synced before.
    for (round, (step, _)) in KILLS.iter().enumerate() {
        let name = format!("q{round}");
        env.guest_sh("dev", &format!("echo {round} > /root/q{round}; sync"));
        env.banger(&["daemon", "stop"]).ok();
        let fault = format!("{step}=kill-vmm");
        let run = env.with_fault(
            &fault,
            &["vm", "snapshot", "create", "dev", &name, "--memory"],
        );
        let written = !matches!(
            *step,
            "snapshot.memory.after_pause" | "snapshot.memory.after_switch"
        );
        assert_eq!(run.code == 0, written, "{fault}: {}", run.stderr);
        assert_eq!(env.daemon_pids().len(), 1, "{fault}: the daemon runs on");
        assert_eq!(env.vm_show("dev")["state"], "stopped", "{fault}");
        assert!(env.qemu_pids().is_empty(), "{fault}");
        let kept = snapshot(&env, &name).unwrap_or_else(|| panic!("{fault}: no {name}"));
        assert_eq!(kept["memory"] == true, written, "{fault}: {kept}");
        no_leftovers(&env, &dir, &fault);
        env.banger(&["daemon", "stop"]).ok();
        env.banger_within(Duration::from_secs(1000), &["vm", "start", "dev"])
            .ok();
        assert_eq!(
            env.guest_sh("dev", &format!("cat /root/q{round}")),
            round.to_string(),
            "{fault}"
        );
    }

    env.banger(&["vm", "rm", "-f", "dev"]).ok();
    assert!(!dir.exists());
    assert!(env.qemu_pids().is_empty());
}
