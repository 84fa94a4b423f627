//! Suspend and resume of real QEMU VMs (TCG here, booted from the real default image): a
//! guest process keeps running across `vm suspend` → `vm start` (same process, its counter
//! continued, the same boot), the guest clock is the host's again, files are there; a damaged
//! state file or a disk written since boots cold with a warning; a daemon or QEMU killed
//! mid-suspend, QEMU killed at each step of a suspend and of the start restoring one while
//! the daemon runs on, and the daemon killed at each of those steps, loses nothing and leaks
//! nothing; a state QEMU refuses to load boots cold; the state file stays well under the
//! guest's memory. QEMU 7.2 (`exec:` migration) when `BANGER_QEMU_7_2` names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use banger_e2e::leaks::Snapshot;
use banger_e2e::{Run, TestEnv, poll, poll_or_none};

/// Starts a guest process (its own session, so the SSH session may end) that writes its pid
/// to /root/counter.pid and then counts in /root/counter, ten times a second.
const START_COUNTER: &str = "setsid -f sh -c 'echo $$ > /root/counter.pid; i=0; \
    while :; do i=$((i+1)); echo $i > /root/counter.new; mv /root/counter.new /root/counter; \
    sleep 0.1; done' </dev/null >/dev/null 2>&1";

/// The snapshot files in the VM's directory.
fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot"))
        .collect()
}

fn boot_id(env: &TestEnv) -> String {
    env.guest_sh("dev", "cat /proc/sys/kernel/random/boot_id")
}

fn counter(env: &TestEnv) -> (u32, u64) {
    let out = env.guest_sh("dev", "cat /root/counter.pid; cat /root/counter");
    let mut lines = out.lines();
    let pid = lines.next().unwrap().trim().parse().unwrap();
    let count = lines.next().unwrap().trim().parse().unwrap();
    (pid, count)
}

/// A shared 2-core host under load boots a TCG guest slowly: a generous start bound.
const CONFIG: &str = "[daemon]\nstart_timeout_secs = 900\n";

/// A fresh instance with [`CONFIG`] (plus `extra`) and the default image.
fn instance(extra: &str) -> TestEnv {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), format!("{CONFIG}{extra}")).unwrap();
    env.build_default_image();
    env
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Runs a VM, starts the counter and writes a file on each disk; returns the counter's pid.
fn run_with_counter(env: &TestEnv) -> u32 {
    let run = env.banger(&["vm", "run", "dev"]);
    if run.code != 0 {
        env.dump_diagnostics();
    }
    run.ok();
    env.guest_sh("dev", START_COUNTER);
    env.guest_sh(
        "dev",
        "echo work-disk > /root/before.txt && echo system-disk > /var/tmp/before.txt",
    );
    poll(Duration::from_secs(30), "the counter running", || {
        let (pid, count) = counter(env);
        (count > 2).then_some(pid)
    })
}

fn assert_files_there(env: &TestEnv) {
    assert_eq!(
        env.guest_sh("dev", "cat /root/before.txt /var/tmp/before.txt"),
        "work-disk\nsystem-disk"
    );
}

/// Exactly one QEMU runs and no snapshot file is left in the VM's directory.
fn assert_one_vmm_and_no_snapshot(env: &TestEnv, dir: &std::path::Path) {
    let left = snapshot_files(dir);
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(env.qemu_pids().len(), 1, "one QEMU");
}

/// The suspended VM's state file (shown as `shown`, `vm show --json`) is well under its
/// guest's memory: free pages are not saved (free-page reporting), only what the guest uses.
fn assert_state_small(dir: &std::path::Path, shown: &serde_json::Value) {
    let state = std::fs::metadata(dir.join("snapshot.state")).unwrap().len();
    let memory = shown["spec"]["memory_mib"].as_u64().unwrap() * 1024 * 1024;
    eprintln!("state file: {state} bytes, guest memory {memory} bytes");
    assert!(
        state < memory / 2,
        "state file {state} bytes, not well under the guest's {memory} bytes of memory"
    );
}

/// Suspends and restores `dev` and checks what a restore must keep.
fn suspend_and_restore(env: &TestEnv, pid: u32) {
    let dir = env.vm_dir("dev");
    let boot = boot_id(env);
    let (_, before) = counter(env);
    let started = Instant::now();
    let suspended = env.banger(&["vm", "suspend", "dev", "--json"]).ok().json();
    eprintln!("suspend took {:?}", started.elapsed());
    assert_eq!(suspended["vm"]["state"], "suspended", "{suspended}");
    assert!(env.qemu_pids().is_empty(), "QEMU ended");
    assert!(dir.join("snapshot.json").is_file(), "sealed");
    let shown = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
    assert_eq!(shown["state"], "suspended");
    assert_state_small(&dir, &shown);

    // Time off, so a guest clock that stood still would be more than 2 s behind.
    std::thread::sleep(Duration::from_secs(5));
    let started = Instant::now();
    let restored = env.banger(&["vm", "start", "dev", "--json"]).ok().json();
    eprintln!("restore took {:?}", started.elapsed());
    assert_eq!(restored["restored"], true, "{restored}");
    assert!(restored.get("warnings").is_none(), "{restored}");
    assert_eq!(restored["vm"]["state"], "running");

    let host_before = now_secs();
    let guest_now: f64 = env.guest_sh("dev", "date +%s.%N").parse().unwrap();
    let host_after = now_secs();
    assert!(
        guest_now > host_before - 2.0 && guest_now < host_after + 2.0,
        "guest clock {guest_now}, host {host_before}..{host_after}"
    );
    assert_eq!(boot_id(env), boot, "the same boot, not a new one");
    let (same_pid, first) = counter(env);
    assert_eq!(same_pid, pid, "the counting process survived");
    assert!(first >= before, "counter continued: {before} then {first}");
    env.guest_sh("dev", &format!("kill -0 {pid}"));
    poll(Duration::from_secs(30), "the counter counting on", || {
        (counter(env).1 > first).then_some(())
    });
    assert_files_there(env);
    assert_one_vmm_and_no_snapshot(env, &dir);
}

/// `vm start` of a suspended `dev` whose snapshot cannot be used: a warning naming `why`, a
/// cold boot, the files there, the snapshot gone.
fn assert_cold_boot(env: &TestEnv, boot: &str, why: &str) {
    let dir = env.vm_dir("dev");
    let run = env.banger(&["vm", "start", "dev", "--json"]).ok();
    let started = run.json();
    // `restored` is left out when false.
    assert_ne!(started["restored"], true, "{started}");
    assert_eq!(started["vm"]["state"], "running", "{started}");
    let warnings = started["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{started}");
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.contains("cannot restore VM dev from its snapshot")
            && warning.contains(why)
            && warning.contains("booted it from its disks"),
        "{warning}"
    );
    // The user sees it too, on stderr, even with --json.
    let shown: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("banger: warning: "))
        .collect();
    assert_eq!(shown.len(), 1, "{}", run.stderr);
    assert!(
        shown[0].contains("cannot restore VM dev from its snapshot") && shown[0].contains(why),
        "{}",
        run.stderr
    );
    assert_ne!(boot_id(env), boot, "a new boot");
    assert_files_there(env);
    assert_one_vmm_and_no_snapshot(env, &dir);
}

#[test]
fn qemu_suspend_and_start_resume_the_running_guest() {
    let env = instance("");
    let pid = run_with_counter(&env);
    suspend_and_restore(&env, pid);
    // Twice: a restored VM suspends again.
    suspend_and_restore(&env, pid);

    // A state file damaged after the suspend: checked before loading, a cold boot.
    let dir = env.vm_dir("dev");
    let boot = boot_id(&env);
    env.banger(&["vm", "suspend", "dev"]).ok();
    let state = dir.join("snapshot.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&state, &bytes).unwrap();
    assert_cold_boot(&env, &boot, "checksum");

    // A disk written since the suspend (here only its mtime): the memory would not match it.
    let boot = boot_id(&env);
    env.banger(&["vm", "suspend", "dev"]).ok();
    let work = dir.join("work.ext4");
    let file = std::fs::File::options().write(true).open(&work).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(1))
        .unwrap();
    drop(file);
    assert_cold_boot(&env, &boot, "changed since");

    // A state QEMU cannot load, sealed as it is so that banger's own checks (sizes,
    // checksums, disks) pass and only QEMU can tell: a warning, a cold boot, no QEMU left
    // from the failed load.
    let boot = boot_id(&env);
    env.banger(&["vm", "suspend", "dev"]).ok();
    let manifest = dir.join("snapshot.json");
    let sealed = banger_core::snapshot::read(&manifest).unwrap();
    std::fs::write(&state, b"not a QEMU migration stream\n".repeat(4096)).unwrap();
    let disks: Vec<std::path::PathBuf> = sealed.disks.iter().map(|d| d.path.clone()).collect();
    banger_core::snapshot::seal(
        &sealed.vmm,
        sealed.machine.unwrap(),
        &[state.clone(), dir.join("snapshot.mem")],
        &disks,
        &manifest,
    )
    .unwrap();
    assert_cold_boot(&env, &boot, "cannot load the saved state");

    // A plain stop after all that, for a clean file system.
    env.banger(&["vm", "stop", "dev"]).ok();
}

/// Round `round` of the kill loops at `step`: a file on each disk (`sync`ed when `sync`),
/// then, for a step of the restoring start, the VM suspended. Returns the command that
/// reaches `step` (`suspend` or `start`).
fn begin_round(env: &TestEnv, round: usize, step: &str, sync: bool) -> &'static str {
    let sync = if sync { " && sync" } else { "" };
    env.guest_sh(
        "dev",
        &format!(
            "echo round {round} > /root/round{round} && echo sys {round} > /var/tmp/round{round}{sync}"
        ),
    );
    if step.starts_with("start.") {
        env.banger(&["vm", "suspend", "dev"]).ok();
        "start"
    } else {
        "suspend"
    }
}

/// The files rounds `0..=round` wrote on each disk are all there (one `vm exec`).
fn assert_rounds_there(env: &TestEnv, round: usize, what: &str) {
    let script: Vec<String> = (0..=round)
        .map(|r| format!("cat /root/round{r} /var/tmp/round{r}"))
        .collect();
    let expected: Vec<String> = (0..=round).map(|r| format!("round {r}\nsys {r}")).collect();
    assert_eq!(
        env.guest_sh("dev", &script.join(" && ")),
        expected.join("\n"),
        "{what}"
    );
}

/// Where a suspend is interrupted.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// The daemon, while the record says `stopping` (the guest's sync, before the VMM pauses).
    DaemonWhileSyncing,
    /// The daemon, once QEMU writes the state file.
    DaemonWhileWriting,
    /// QEMU, once it writes the state file.
    QemuWhileWriting,
}

/// The steps of a suspend, and of the start that restores one once it restored, at which
/// QEMU is killed while the daemon runs on (`BANGER_FAULT=<step>=kill-vmm`), and separately
/// the daemon (`BANGER_FAULT=<step>`: it SIGKILLs itself there).
const KILL_STEPS: &[&str] = &[
    "suspend.after_stopping",
    "suspend.after_snapshot",
    "suspend.after_stop",
    "start.after_restore",
    "start.after_record",
];

/// Fails when `after` holds anything `before` did not (`banger_e2e::leaks`), where both are
/// taken with `dev` running: a process counts by its program only, as a new boot's QEMU (and
/// its SSH master) has other arguments (ports, `-incoming`) than the one before.
fn assert_nothing_leaked(before: &Snapshot, after: &Snapshot, what: &str) {
    let added = after.added_since(before);
    for kind in [
        "link",
        "nft table",
        "loop device",
        "mount",
        "runtime file",
        "temp file",
        "stored dir",
    ] {
        let items = added.items(kind);
        assert!(items.is_empty(), "{what}: left behind: {kind}: {items:?}");
    }
    let programs = |s: &Snapshot| {
        let mut count = std::collections::BTreeMap::<String, usize>::new();
        for p in s.items("process") {
            *count
                .entry(p.split(' ').next().unwrap().to_owned())
                .or_default() += 1;
        }
        count
    };
    let (old, new) = (programs(before), programs(after));
    for (program, n) in &new {
        assert!(
            *n <= old.get(program).copied().unwrap_or(0),
            "{what}: more {program} processes than before: {:?} then {:?}",
            before.items("process"),
            after.items("process")
        );
    }
}

/// `banger ARGS` served by a fresh daemon whose environment carries `fault`; returns the run
/// and that daemon's pid, after checking it still runs (a `kill-vmm` fault kills only QEMU).
fn with_vmm_fault(env: &TestEnv, fault: &str, args: &[&str]) -> (Run, u32) {
    env.banger(&["daemon", "stop"]).ok();
    let run = env.with_fault(fault, args);
    let daemons = env.daemon_pids();
    assert_eq!(daemons.len(), 1, "{fault}: the daemon died: {daemons:?}");
    (run, daemons[0])
}

#[test]
fn a_daemon_or_qemu_killed_mid_suspend_loses_nothing_and_leaks_nothing() {
    let env = instance("");
    let run = env.banger(&["vm", "run", "dev"]);
    if run.code != 0 {
        env.dump_diagnostics();
    }
    run.ok();
    let dir = env.vm_dir("dev");
    let state = dir.join("snapshot.state");
    for (round, kill) in [
        Kill::DaemonWhileSyncing,
        Kill::DaemonWhileWriting,
        Kill::QemuWhileWriting,
    ]
    .into_iter()
    .enumerate()
    {
        // Written (not synced) right before the suspend: the suspend's sync must keep it.
        env.guest_sh("dev", &format!(
                "echo round {round} > /root/round{round} && echo sys {round} > /var/tmp/round{round}"
            ),
        );
        let mut suspend = env
            .command(&["vm", "suspend", "dev"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let hit = poll_or_none(Duration::from_secs(60), || {
            let now = match kill {
                Kill::DaemonWhileSyncing => {
                    let shown = env.banger(&["vm", "show", "dev", "--json"]);
                    shown.code == 0 && shown.json()["state"] == "stopping"
                }
                Kill::DaemonWhileWriting | Kill::QemuWhileWriting => state.exists(),
            };
            if now {
                return Some(true);
            }
            // Finished before the moment came: nothing was interrupted.
            suspend.try_wait().unwrap().map(|_| false)
        })
        .expect("the suspend neither reached the moment nor finished");
        if hit {
            match kill {
                Kill::DaemonWhileSyncing | Kill::DaemonWhileWriting => env.kill_daemon(),
                Kill::QemuWhileWriting => {
                    for pid in env.qemu_pids() {
                        nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        )
                        .unwrap();
                    }
                }
            }
        }
        eprintln!("round {round}: {kill:?}: interrupted: {hit}");
        let _ = suspend.wait();
        // The next command starts a daemon that reconciles; the VM then starts (from the
        // snapshot when the suspend finished, else cold) with everything written before.
        let started = env.banger(&["vm", "start", "dev", "--json"]).ok().json();
        eprintln!(
            "round {round}: restored: {}, warnings: {}",
            started["restored"], started["warnings"]
        );
        assert_eq!(started["vm"]["state"], "running", "{started}");
        assert_rounds_there(&env, round, &format!("round {round}: {kill:?}"));
        assert_one_vmm_and_no_snapshot(&env, &dir);
        assert_eq!(env.daemon_pids().len(), 1, "one daemon");
    }
    // QEMU killed (`kill-vmm`: the daemon runs on) at each step of a suspend and of the start
    // that restores one. Each step runs on a daemon started with its fault, which then boots
    // the VM again itself.
    for (round, step) in KILL_STEPS.iter().enumerate() {
        let round = round + 3;
        let before = env.leak_snapshot();
        // Written and synced before the command: a VMM crash may only lose unsynced data.
        let command = begin_round(&env, round, step, true);
        let restoring = command == "start";
        let fault = format!("{step}=kill-vmm");
        let (run, daemon) = with_vmm_fault(&env, &fault, &["vm", command, "dev", "--json"]);
        eprintln!("{fault}: exit {}: {}{}", run.code, run.stdout, run.stderr);
        let shown = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
        // Past the point of no return (the snapshot written): the suspend goes through.
        let suspended = matches!(*step, "suspend.after_snapshot" | "suspend.after_stop");
        if suspended {
            assert_eq!(run.code, 0, "{fault}: {}", run.stderr);
            assert_eq!(shown["state"], "suspended", "{fault}: {shown}");
            assert!(dir.join("snapshot.json").is_file(), "{fault}: sealed");
        } else {
            assert_ne!(run.code, 0, "{fault}: the command succeeded");
            let error = run.stderr.trim();
            assert_eq!(error.lines().count(), 1, "{fault}: {error}");
            let why = if restoring {
                "VMM ended right after its restore from the snapshot; the VM is stopped"
            } else {
                "its VMM ended; the VM is stopped"
            };
            assert!(error.contains(why), "{fault}: {error}");
            assert_eq!(shown["state"], "stopped", "{fault}: {shown}");
            assert_eq!(shown["last_stop"]["kind"], "unclean", "{fault}: {shown}");
            let left = snapshot_files(&dir);
            assert!(left.is_empty(), "{fault}: {left:?}");
        }
        assert!(env.qemu_pids().is_empty(), "{fault}: QEMU left");
        assert_eq!(env.daemon_pids(), vec![daemon], "{fault}: the same daemon");
        // The same daemon starts it: from the snapshot when the suspend went through, else
        // cold (after checking the disks), with every synced file there.
        let started = env
            .banger_within(Duration::from_secs(1000), &["vm", "start", "dev", "--json"])
            .ok()
            .json();
        assert_eq!(started["restored"] == true, suspended, "{fault}: {started}");
        assert_eq!(started["vm"]["state"], "running", "{fault}: {started}");
        assert_rounds_there(&env, round, &fault);
        assert_one_vmm_and_no_snapshot(&env, &dir);
        assert_eq!(env.daemon_pids(), vec![daemon], "{fault}: the same daemon");
        assert_nothing_leaked(&before, &env.leak_snapshot(), &fault);
    }
    // The daemon killed (SIGKILL) at the same steps. The next command's daemon finds the VM
    // mid-operation and must report a state its QEMU and files agree with; the VM then
    // starts (from the snapshot if that daemon kept one, else cold) with everything written
    // before the command, nothing left over.
    for (round, step) in KILL_STEPS.iter().enumerate() {
        let round = round + 3 + KILL_STEPS.len();
        let before = env.leak_snapshot();
        // Written, not synced, right before the command (for a restore: before the suspend,
        // whose own sync must keep it).
        let command = begin_round(&env, round, step, false);
        // A fresh daemon, started by this command, carries the fault.
        env.banger(&["daemon", "stop"]).ok();
        let run = env.with_fault(step, &["vm", command, "dev", "--json"]);
        eprintln!(
            "daemon killed at {step}: exit {}: {}{}",
            run.code, run.stdout, run.stderr
        );
        assert_ne!(run.code, 0, "{step}: the command succeeded: {}", run.stdout);
        assert!(env.daemon_gone(), "{step}: the daemon did not die there");

        let shown = env.vm_show("dev");
        let state = shown["state"].as_str().unwrap().to_owned();
        eprintln!("daemon killed at {step}: then {state}");
        let qemus = env.qemu_pids().len();
        let left = snapshot_files(&dir);
        match state.as_str() {
            "running" => assert!(
                qemus == 1 && left.is_empty(),
                "{step}: {qemus} QEMU, {left:?}"
            ),
            "stopped" => assert!(
                qemus == 0 && left.is_empty(),
                "{step}: {qemus} QEMU, {left:?}"
            ),
            "suspended" => assert!(
                qemus == 0 && dir.join("snapshot.json").is_file(),
                "{step}: {qemus} QEMU, {left:?}"
            ),
            _ => panic!("{step}: the next daemon reports {shown}"),
        }
        let started = env
            .banger_within(Duration::from_secs(1000), &["vm", "start", "dev", "--json"])
            .ok()
            .json();
        assert_eq!(
            started["restored"] == true,
            state == "suspended",
            "{step}: {started}"
        );
        assert_eq!(started["vm"]["state"], "running", "{step}: {started}");
        assert_rounds_there(&env, round, step);
        assert_one_vmm_and_no_snapshot(&env, &dir);
        assert_eq!(env.daemon_pids().len(), 1, "{step}: one daemon");
        assert_nothing_leaked(&before, &env.leak_snapshot(), step);
    }
    env.banger(&["vm", "stop", "dev"]).ok();
    let fsck = std::process::Command::new(banger_e2e::system_tool("e2fsck"))
        .args(["-fn"])
        .arg(dir.join("work.ext4"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn qemu_7_2_suspends_and_resumes_through_exec_migration() {
    let Ok(binary) = std::env::var("BANGER_QEMU_7_2") else {
        banger_shared::skip::report(
            "qemu_7_2_suspends_and_resumes_through_exec_migration",
            "BANGER_QEMU_7_2 is not set (scripts/fetch-qemu-7.2 prints the path; .ci/run sets it)",
        );
        return;
    };
    let env = instance(&format!("[qemu]\nbinary = {binary:?}\naccel = \"tcg\"\n"));
    let pid = run_with_counter(&env);
    suspend_and_restore(&env, pid);
    env.banger(&["vm", "stop", "dev"]).ok();
}
