//! Real VMs under QEMU (TCG here, KVM where usable), booted from the real default image:
//! exec semantics, durability across stop/start, daemon crash and reattach, isolation, and a
//! failed launch that leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use banger_e2e::{TestEnv, poll};

/// A shell script writing 1,000 small files with distinct contents under /root/repo/durable.
const WRITE_FILES: &str = "mkdir -p /root/repo/durable && cd /root/repo/durable && \
    i=0; while [ $i -lt 1000 ]; do echo \"content of file $i\" > f$i; i=$((i+1)); done";
/// Prints one line per file: its name and checksum.
const HASH_FILES: &str = "cd /root/repo/durable && md5sum f* | sort -k2";

#[test]
fn exec_semantics_and_a_stop_that_never_loses_data() {
    let env = TestEnv::new();
    env.build_default_image();
    env.banger(&["vm", "run", "dev"]).ok();

    // uname -r in the guest is the release of the default image's kernel banger built.
    let kernel = env
        .banger(&["kernel", "show", "default", "--json"])
        .ok()
        .json();
    let release = kernel["release"].as_str().unwrap().to_owned();
    let uname = env.banger(&["vm", "exec", "dev", "--", "uname", "-r"]).ok();
    assert_eq!(uname.stdout.trim(), release);

    // Exit codes and stdin pass through; arguments keep their boundaries.
    let exit7 = env.banger(&["vm", "exec", "dev", "--", "sh", "-c", "exit 7"]);
    assert_eq!(exit7.code, 7, "{}", exit7.stderr);
    let mut child = env
        .command(&["vm", "exec", "dev", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = "piped into the guest\n".repeat(1000);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let host_sum = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(input.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.stdout, host_sum.stdout);
    let spaced = env
        .banger(&["vm", "exec", "dev", "--", "printf", "%s|", "a b", "it's"])
        .ok();
    assert_eq!(spaced.stdout, "a b|it's|");

    // Starting a running VM is a no-op that succeeds.
    let again = env.banger(&["vm", "start", "dev"]).ok();
    assert!(again.stdout.contains("already running"), "{}", again.stdout);

    // 1,000 small writes, then stop at once: the sync before power-off keeps them all.
    env.banger(&["vm", "exec", "dev", "--", "sh", "-c", WRITE_FILES])
        .ok();
    let stop = env.banger(&["vm", "stop", "dev", "--json"]).ok().json();
    assert_eq!(stop["vm"]["state"], "stopped");
    assert!(env.qemu_pids().is_empty(), "QEMU is gone after stop");

    // Stopped: exec is refused with exit 4, stop again is a no-op.
    let refused = env.banger(&["vm", "exec", "dev", "--", "true"]);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(refused.stderr.contains("stopped") && refused.stderr.contains("vm start"));
    let noop = env.banger(&["vm", "stop", "dev"]).ok();
    assert!(noop.stdout.contains("not running"), "{}", noop.stdout);

    env.banger(&["vm", "start", "dev"]).ok();
    let hashes = env
        .banger(&["vm", "exec", "dev", "--", "sh", "-c", HASH_FILES])
        .ok();
    assert_eq!(
        hashes.stdout,
        env.md5_lines(1000, |i| format!("content of file {i}\n"))
    );

    // The serial console is kept and readable.
    let logs = env.banger(&["vm", "logs", "dev"]).ok();
    assert!(
        logs.stdout.contains("Linux version"),
        "console: {}",
        logs.stdout
    );

    // A running VM is not removed without --force; with it, it is stopped and removed.
    let refused = env.banger(&["vm", "rm", "dev"]);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    env.banger(&["vm", "exec", "dev", "--", "true"]).ok();
    let removed = env.banger(&["vm", "rm", "-f", "dev"]).ok();
    assert!(
        removed.stdout.contains("Removed VM dev"),
        "{}",
        removed.stdout
    );
    assert!(env.qemu_pids().is_empty());
}

#[test]
fn vms_are_isolated_and_survive_a_daemon_crash() {
    let env = TestEnv::new();
    env.build_default_image();
    env.banger(&["vm", "create", "a"]).ok();
    env.banger(&["vm", "create", "b"]).ok();
    // Both boot at once.
    std::thread::scope(|s| {
        let a = s.spawn(|| env.banger(&["vm", "start", "a"]));
        let b = s.spawn(|| env.banger(&["vm", "start", "b"]));
        a.join().unwrap().ok();
        b.join().unwrap().ok();
    });
    assert_eq!(env.qemu_pids().len(), 2);

    env.banger(&[
        "vm",
        "exec",
        "a",
        "--",
        "sh",
        "-c",
        "echo only-in-a > /root/repo/marker && sync",
    ])
    .ok();
    let in_b = env.banger(&["vm", "exec", "b", "--", "test", "-e", "/root/repo/marker"]);
    assert_eq!(in_b.code, 1, "the file written in a is absent in b");
    let hostname = env.banger(&["vm", "exec", "b", "--", "hostname"]).ok();
    assert_eq!(hostname.stdout.trim(), "b");

    // SIGKILL the daemon: the VMs keep running and the next daemon reattaches.
    env.wait_for_daemon();
    let pids_before = env.qemu_pids();
    env.kill_daemon();
    assert_eq!(env.qemu_pids(), pids_before, "VMs outlive the daemon");
    let listed = env.banger(&["vm", "ls", "--json"]).ok().json();
    for vm in listed.as_array().unwrap() {
        assert_eq!(vm["state"], "running", "{vm}");
    }
    let marker = env
        .banger(&["vm", "exec", "a", "--", "cat", "/root/repo/marker"])
        .ok();
    assert_eq!(marker.stdout.trim(), "only-in-a");
    // b's VMM dies behind banger's back: every command sees it stopped, none hangs.
    let b_pid = env.banger(&["vm", "show", "b", "--json"]).ok().json()["runtime"]["pid"]
        .as_u64()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    poll(Duration::from_secs(10), "b's QEMU gone", || {
        (env.qemu_pids().len() == 1).then_some(())
    });
    let refused = env.banger_within(Duration::from_secs(30), &["vm", "exec", "b", "--", "true"]);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    let noop = env
        .banger_within(Duration::from_secs(30), &["vm", "stop", "b"])
        .ok();
    assert!(noop.stdout.contains("not running"), "{}", noop.stdout);
    env.banger(&["vm", "stop", "a"]).ok();
    poll(Duration::from_secs(10), "QEMU gone", || {
        env.qemu_pids().is_empty().then_some(())
    });
    let listed = env.banger(&["vm", "ls", "--json"]).ok().json();
    for vm in listed.as_array().unwrap() {
        assert_eq!(vm["state"], "stopped", "{vm}");
    }
}

/// What QEMU itself says about the VM's vCPUs (QMP `query-status`): `running`, `paused`, ...
fn qmp_status(env: &TestEnv, name: &str) -> String {
    let vm = env.banger(&["vm", "show", name, "--json"]).ok().json();
    let socket = env
        .home()
        .join("run/vms")
        .join(vm["id"].as_str().unwrap())
        .join("qmp.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime
        .block_on(banger_core::vmm::qmp::execute(&socket, "query-status"))
        .unwrap();
    status["status"].as_str().unwrap().to_owned()
}

#[test]
fn pause_resume_survive_a_daemon_crash() {
    let env = TestEnv::new();
    env.build_default_image();
    // A client that goes away mid-start (Ctrl-C, a killed agent) does not cancel the start:
    // the daemon finishes it, the VM ends up running, not stuck in `starting`.
    env.banger(&["vm", "create", "p"]).ok();
    let mut client = env
        .command(&["vm", "start", "p"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(Duration::from_secs(60), "the start to begin", || {
        let vm = env.banger(&["vm", "show", "p", "--json"]).ok().json();
        (vm["state"] == "starting").then_some(())
    });
    client.kill().unwrap();
    client.wait().unwrap();
    poll(
        Duration::from_secs(300),
        "the abandoned start to finish",
        || {
            let vm = env.banger(&["vm", "show", "p", "--json"]).ok().json();
            assert_ne!(vm["state"], "stopped", "the start was undone: {vm}");
            (vm["state"] == "running").then_some(())
        },
    );
    env.banger(&[
        "vm",
        "exec",
        "p",
        "--",
        "sh",
        "-c",
        "echo written-before-pause > /root/repo/before",
    ])
    .ok();

    let vm = env.banger(&["vm", "show", "p", "--json"]).ok().json();
    assert_eq!(vm["state"], "running");
    assert_eq!(qmp_status(&env, "p"), "running");
    let pids = env.qemu_pids();
    assert_eq!(pids.len(), 1);

    // Resume on a running VM is a no-op; pause stops the vCPUs (QMP says so too).
    let noop = env.banger(&["vm", "resume", "p"]).ok();
    assert!(noop.stdout.contains("not paused"), "{}", noop.stdout);
    let paused = env.banger(&["vm", "pause", "p"]).ok();
    assert!(paused.stdout.contains("Paused VM p"), "{}", paused.stdout);
    let vm = env.banger(&["vm", "show", "p", "--json"]).ok().json();
    assert_eq!(vm["state"], "paused");
    let shown = env.banger(&["vm", "ls"]).ok();
    assert!(shown.stdout.contains("paused"), "{}", shown.stdout);
    assert_eq!(qmp_status(&env, "p"), "paused");
    let again = env.banger(&["vm", "pause", "p"]).ok();
    assert!(again.stdout.contains("already paused"), "{}", again.stdout);

    // exec on a paused VM: refused at once, one line, the resume hint, exit 4.
    let refused = env.banger_within(Duration::from_secs(30), &["vm", "exec", "p", "--", "true"]);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert_eq!(
        refused.stderr.trim().lines().count(),
        1,
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("paused") && refused.stderr.contains("banger vm resume"),
        "{}",
        refused.stderr
    );

    // SIGKILL the daemon while paused: the next daemon reattaches, still paused.
    env.wait_for_daemon();
    env.kill_daemon();
    assert_eq!(env.qemu_pids(), pids, "the VM outlives the daemon");
    let vm = env.banger(&["vm", "show", "p", "--json"]).ok().json();
    assert_eq!(vm["state"], "paused", "{vm}");
    assert_eq!(qmp_status(&env, "p"), "paused");

    // Resume: exec works and what was written before the pause is there.
    let resumed = env.banger(&["vm", "resume", "p"]).ok();
    assert!(
        resumed.stdout.contains("Resumed VM p"),
        "{}",
        resumed.stdout
    );
    assert_eq!(qmp_status(&env, "p"), "running");
    let before = env
        .banger(&["vm", "exec", "p", "--", "cat", "/root/repo/before"])
        .ok();
    assert_eq!(before.stdout.trim(), "written-before-pause");

    // Stop of a paused VM resumes it first, so the guest syncs and powers itself off.
    env.banger(&["vm", "pause", "p"]).ok();
    let stop = env.banger(&["vm", "stop", "p", "--json"]).ok().json();
    assert_eq!(stop["vm"]["state"], "stopped");
    assert_eq!(stop["stop_method"], "poweroff", "{stop}");
    assert!(env.qemu_pids().is_empty());
    let refused = env.banger(&["vm", "pause", "p"]);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    env.banger(&["vm", "rm", "p"]).ok();
}

#[test]
fn a_vmm_that_fails_to_launch_leaves_nothing_behind() {
    let env = TestEnv::new();
    // A kernel file with an ELF header and garbage after it: QEMU refuses to load it.
    env.import_stub_image();
    env.banger(&["vm", "create", "broken"]).ok();
    let vm_dir = env.home().join("vms");
    let files_before = list_tree(&vm_dir);

    let run = env.banger(&["vm", "start", "broken"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot start VM broken"),
        "{}",
        run.stderr
    );
    eprintln!("launch failure as the user sees it: {}", run.stderr.trim());

    let vm = env.banger(&["vm", "show", "broken", "--json"]).ok().json();
    assert_eq!(vm["state"], "created", "back to its previous state");
    assert!(vm["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(env.qemu_pids().is_empty(), "no QEMU process left");
    // Only the console log may be new: `vm logs` shows why the boot failed.
    let files_after: Vec<String> = list_tree(&vm_dir)
        .into_iter()
        .filter(|f| !f.contains("/console.log"))
        .collect();
    assert_eq!(
        files_after, files_before,
        "no disk or other file added or removed"
    );
    let runtime_vms = env.home().join("run/vms");
    assert!(
        list_tree(&runtime_vms).is_empty(),
        "no runtime files left: {:?}",
        list_tree(&runtime_vms)
    );
    // And it can still be removed cleanly.
    env.banger(&["vm", "rm", "broken"]).ok();
    assert!(list_tree(&vm_dir).is_empty());
}

#[test]
fn images_in_use_cannot_be_removed() {
    let env = TestEnv::new();
    env.import_stub_image();
    env.banger(&["vm", "create", "user"]).ok();
    let refused = env.banger(&["image", "rm", "default"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("used by VM user"),
        "{}",
        refused.stderr
    );
    let refused = env.banger(&["kernel", "rm", "default"]);
    assert!(
        refused.stderr.contains("used by image default"),
        "{}",
        refused.stderr
    );
    env.banger(&["vm", "rm", "user"]).ok();
    env.banger(&["image", "rm", "default"]).ok();
    env.banger(&["kernel", "rm", "default"]).ok();
    assert!(list_tree(&env.home().join("images")).is_empty());
    assert!(list_tree(&env.home().join("kernels")).is_empty());
    let missing = env.banger(&["vm", "create", "orphan"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("image build"), "{}", missing.stderr);
}

/// Every file path below `dir`, sorted (empty when `dir` does not exist).
fn list_tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out.sort();
    out
}
