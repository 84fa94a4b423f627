//! `vm set` and the fsck after an unclean stop, on one real QEMU VM (to keep TCG time down):
//! its work disk grows from 2 GiB to 4 GiB while it runs (`df /root` shows it at once, files
//! intact) and a smaller size is refused with nothing changed; CPUs, memory and the system
//! disk change while it is stopped and its next boot has them; a clean stop skips the fsck
//! (its boot mounts `/` read-write at once); a QEMU SIGKILLed while the guest writes to both
//! disks is recorded unclean and the next start runs e2fsck on the host on both disks (the
//! qcow2 system disk through its raw view; in the log under its op_id, and in `vm show`), so
//! the guest boots once, read-write; with `qemu.check_qcow2_on_host` off the guest checks its
//! qcow2 `/` itself instead (systemd-fsck-root, whose result `vm show` and the log tell; `/`
//! ends up read-write); and both disks check clean on the host afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use banger_e2e::{TestEnv, poll, system_tool};
use serde_json::Value;

const GIB: u64 = 1 << 30;

fn guest_number(env: &TestEnv, script: &str) -> u64 {
    let out = env.guest_sh("dev", script);
    out.parse()
        .unwrap_or_else(|e| panic!("{script}: {out:?}: {e}"))
}

/// Size of /root's filesystem as the guest's `df` sees it, in bytes.
fn root_df(env: &TestEnv) -> u64 {
    guest_number(env, "df -B1 --output=size /root | tail -n 1")
}

/// `vm set dev ARGS` fails with exit `code`, one line saying `says` and a hint.
#[track_caller]
fn refused(env: &TestEnv, args: &[&str], code: i32, says: &str) {
    let mut all = vec!["vm", "set", "dev"];
    all.extend_from_slice(args);
    let run = env.banger(&all);
    assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(says) && run.stderr.contains("hint"),
        "{args:?}: {}",
        run.stderr
    );
}

/// Kills QEMU with SIGKILL while the guest writes to both disks; the VM is then recorded
/// stopped, uncleanly.
fn kill_while_writing(env: &TestEnv) {
    env.guest_sh(
        "dev",
        "rm -rf /root/stream /var/tmp/stream; mkdir -p /root/stream /var/tmp/stream && \
         setsid sh -c 'i=0; while :; do \
         dd if=/dev/urandom of=/root/stream/f$i bs=64k count=8 2>/dev/null; \
         dd if=/dev/urandom of=/var/tmp/stream/f$i bs=64k count=8 2>/dev/null; \
         i=$((i+1)); done' </dev/null >/dev/null 2>&1 &",
    );
    poll(Duration::from_secs(120), "the guest writing", || {
        (guest_number(env, "ls /var/tmp/stream | wc -l") > 20).then_some(())
    });
    let pid = env.vm_show("dev")["runtime"]["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    poll(Duration::from_secs(10), "QEMU gone", || {
        env.qemu_pids().is_empty().then_some(())
    });
    let killed = env.vm_show("dev");
    assert_eq!(killed["state"], "stopped", "{killed}");
    assert_eq!(killed["last_stop"]["kind"], "unclean", "{killed}");
}

/// `vm start dev` under operation id `op_id` (to find its lines in the daemon's log).
fn start_as(env: &TestEnv, op_id: &str) {
    let started = env
        .command(&["vm", "start", "dev"])
        .env("BANGER_OP_ID", op_id)
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
}

fn work_disk(env: &TestEnv, vm: &Value) -> PathBuf {
    env.home()
        .join("vms")
        .join(vm["id"].as_str().unwrap())
        .join("work.ext4")
}

#[test]
fn disks_grow_resources_change_and_an_unclean_stop_is_checked() {
    let env = TestEnv::new();
    env.build_default_image();
    env.banger(&[
        "vm", "run", "dev", "--disk", "2G", "--cpus", "2", "--memory", "768M",
    ])
    .ok();
    let vm = env.vm_show("dev");
    let disk = work_disk(&env, &vm);
    assert_eq!(vm["spec"]["system_disk_size_bytes"], 8 * GIB, "{vm}");
    // A fresh VM was never stopped, so its first start checked nothing.
    assert!(vm.get("last_stop").is_none(), "{vm}");
    assert_eq!(vm["start_fsck"]["ran"], false, "{vm}");

    // Files the rest must keep.
    let sum = env.guest_sh(
        "dev",
        "head -c 33554432 /dev/urandom > /root/keep && sync && sha256sum /root/keep",
    );
    assert!(root_df(&env) < 2 * GIB);

    // 1. Grown under the running guest: /root has the room at once, the file is intact.
    let spec = env
        .banger(&["vm", "set", "dev", "--disk", "4G", "--json"])
        .ok()
        .json();
    assert_eq!(spec["disk_size_bytes"], 4 * GIB, "{spec}");
    let grown = root_df(&env);
    assert!(
        (3 * GIB + GIB / 2..4 * GIB).contains(&grown),
        "df /root says {grown} bytes after growing to 4 GiB"
    );
    assert_eq!(env.guest_sh("dev", "sha256sum /root/keep"), sum);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 4 * GIB);

    // 2. A smaller disk is refused; the file, the record and the guest keep 4 GiB.
    refused(&env, &["--disk", "1G"], 1, "cannot shrink");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 4 * GIB);
    assert_eq!(env.vm_show("dev")["spec"]["disk_size_bytes"], 4 * GIB);
    assert_eq!(root_df(&env), grown);
    // CPUs and memory wait for a stop; more than the host has is refused outright.
    refused(&env, &["--cpus", "1"], 4, "stop it first");
    refused(&env, &["--cpus", "200"], 1, "this host has");
    assert_eq!(guest_number(&env, "nproc"), 2);
    let mem_before = guest_number(&env, "awk '/^MemTotal:/ {print $2}' /proc/meminfo");
    assert!(mem_before > 600 << 10, "MemTotal {mem_before} kB with 768M");

    // 3. Stopped cleanly: new CPUs, memory and system disk; the next boot has them, and the
    // clean stop skips the fsck.
    env.banger(&["vm", "stop", "dev"]).ok();
    let stopped = env.vm_show("dev");
    assert_eq!(stopped["last_stop"]["kind"], "clean", "{stopped}");
    let set = env
        .banger(&[
            "vm",
            "set",
            "dev",
            "--cpus",
            "1",
            "--memory",
            "512M",
            "--system-disk",
            "10G",
        ])
        .ok();
    assert!(set.stdout.contains("next start"), "{}", set.stdout);
    env.banger(&["vm", "start", "dev"]).ok();
    assert_eq!(guest_number(&env, "nproc"), 1);
    let mem = guest_number(&env, "awk '/^MemTotal:/ {print $2}' /proc/meminfo");
    assert!(
        (400 << 10..=512 << 10).contains(&mem),
        "MemTotal {mem} kB with 512M"
    );
    let root = guest_number(&env, "df -B1 --output=size / | tail -n 1");
    assert!(root > 9 * GIB, "/ is {root} bytes on a 10 GiB system disk");
    let vm = env.vm_show("dev");
    assert_eq!(
        (
            &vm["spec"]["cpus"],
            &vm["spec"]["memory_mib"],
            &vm["spec"]["system_disk_size_bytes"]
        ),
        (&Value::from(1), &Value::from(512), &Value::from(10 * GIB)),
        "{vm}"
    );
    assert_eq!(vm["start_fsck"]["ran"], false, "{vm}");
    assert!(
        vm["start_fsck"]["why"]
            .as_str()
            .unwrap()
            .contains("clean (poweroff)"),
        "{vm}"
    );
    // No check of / in the guest after a clean stop: / is mounted read-write at once.
    let cmdline = env.guest_sh("dev", "cat /proc/cmdline");
    assert!(
        cmdline.contains(" rw ") && !cmdline.contains("fsck.mode"),
        "{cmdline}"
    );

    // 4. QEMU killed while the guest writes to both disks: recorded unclean; the next start
    // runs e2fsck on both disks on the host, the qcow2 system disk through its raw view.
    kill_while_writing(&env);
    let op_id = "e2e-host-fsck-after-kill";
    start_as(&env, op_id);
    let checked = env.vm_show("dev");
    let disks = checked["start_fsck"]["disks"].as_array().unwrap().clone();
    assert_eq!(checked["start_fsck"]["ran"], true, "{checked}");
    for (disk, name) in disks.iter().zip(["work", "system"]) {
        assert_eq!(disk["disk"], name, "{checked}");
        // `checked_by` is left out when it is the host.
        assert_ne!(disk["checked_by"], "guest", "{checked}");
        assert!(
            ["clean", "repaired"].contains(&disk["result"].as_str().unwrap()),
            "{checked}"
        );
    }
    let log = std::fs::read_to_string(env.log_file()).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(op_id) && l.contains("e2fsck -p before start"))
            .count(),
        2,
        "two host checks under op {op_id} in the daemon log"
    );
    // Checked before the boot, so the guest neither checks / nor boots twice.
    let cmdline = env.guest_sh("dev", "cat /proc/cmdline");
    assert!(
        cmdline.contains(" rw ") && !cmdline.contains("fsck.mode"),
        "{cmdline}"
    );
    let vm_dir = work_disk(&env, &checked).parent().unwrap().to_path_buf();
    assert!(
        !std::fs::read_dir(&vm_dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("view")),
        "a raw view is left in {}",
        vm_dir.display()
    );
    assert_eq!(env.guest_sh("dev", "sha256sum /root/keep"), sum);

    // 5. The same with the host's check of qcow2 disks off: the guest checks its qcow2 `/`
    // itself at boot.
    std::fs::write(env.config_file(), "[qemu]\ncheck_qcow2_on_host = false\n").unwrap();
    env.chown_to_owner(&env.config_file());
    env.banger(&["daemon", "stop"]).ok();
    kill_while_writing(&env);
    let op_id = "e2e-fsck-after-kill";
    start_as(&env, op_id);
    let log = std::fs::read_to_string(env.log_file()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(op_id) && l.contains("e2fsck -p before start")),
        "no e2fsck line under op {op_id} in the daemon log"
    );
    let checked = env.vm_show("dev");
    let fsck = &checked["start_fsck"];
    assert_eq!(fsck["ran"], true, "{checked}");
    let disks = fsck["disks"].as_array().unwrap();
    assert_eq!(disks[0]["disk"], "work", "{checked}");
    assert!(
        ["clean", "repaired"].contains(&disks[0]["result"].as_str().unwrap()),
        "{checked}"
    );
    assert_eq!(disks[1]["disk"], "system", "{checked}");
    assert_eq!(disks[1]["checked_by"], "guest", "qcow2: {checked}");
    let system = disks[1]["result"].as_str().unwrap();
    assert!(["clean", "repaired"].contains(&system), "{checked}");
    assert!(
        log.lines().any(|l| l.contains(op_id)
            && l.contains(&format!(
                "system disk: checked by the guest at boot: {system}"
            ))),
        "no guest check of / under op {op_id} in the daemon log"
    );
    let shown = env.banger(&["vm", "show", "dev"]).ok().stdout;
    assert!(
        shown.contains("last stop:")
            && shown.contains("unclean")
            && shown.contains("ran: the last stop was unclean")
            && shown.contains(&format!(
                "system disk: checked by the guest at boot: {system}"
            )),
        "{shown}"
    );
    // The guest's check ran in this boot (or, when it repaired /, in the boot before, which
    // restarted), and / is read-write.
    let unit = env.guest_sh(
        "dev",
        "systemctl show -p ExecMainStartTimestampMonotonic -p ExecMainStatus systemd-fsck-root",
    );
    let restarted = disks[1]["detail"].as_str().unwrap().contains("restarted");
    if !restarted {
        assert!(
            unit.contains("ExecMainStatus=0")
                && !unit.contains("ExecMainStartTimestampMonotonic=0"),
            "{unit}"
        );
    }
    let root_options = env.guest_sh(
        "dev",
        "awk '$2 == \"/\" { o = $4 } END { print o }' /proc/mounts",
    );
    assert!(
        root_options.starts_with("rw"),
        "/ is mounted {root_options}"
    );
    assert_eq!(env.guest_sh("dev", "touch /var/tmp/after && echo ok"), "ok");
    assert_eq!(env.guest_sh("dev", "sha256sum /root/keep"), sum);

    // 6. Stopped cleanly: the work disk checks clean on the host.
    env.banger(&["vm", "stop", "dev"]).ok();
    let check = std::process::Command::new(system_tool("e2fsck"))
        .arg("-fn")
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "e2fsck -fn of the work disk: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(env.vm_show("dev")["last_stop"]["kind"], "clean");
    // The qcow2 system disk, through a raw copy e2fsck can open.
    let raw = env.home().join("system-check.raw");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(disk.with_file_name("system.qcow2"))
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        converted.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let check = std::process::Command::new(system_tool("e2fsck"))
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "e2fsck -fn of the system disk: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::remove_file(&raw).unwrap();
    env.banger(&["vm", "rm", "dev"]).ok();
}
