//! Hung and hostile guests, on real QEMU VMs: `vm stop` ends within its documented bound
//! (docs/cli.md, "Stop") through the fallbacks, reports which step ended it (`stop_method` in
//! `vm stop --json` and `vm show`), data synced before is intact, and the daemon answers for
//! another VM meanwhile. Three guests: one whose power-off hangs, which ignores the ACPI
//! button, whose work disk is full and which floods its console (ended by QMP `quit`); one
//! without sshd (ended by the ACPI button); one whose QEMU is frozen (SIGSTOP: ended by
//! SIGKILL).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use banger_e2e::{TestEnv, poll, system_tool};
use serde_json::Value;

/// `daemon.stop_timeout_secs` in this test: how long a stop waits for the guest's power-off.
const POWEROFF_GRACE: u64 = 5;

/// The documented bound of `vm stop` (docs/cli.md, "Stop"): `daemon.stop_timeout_secs` +
/// 100 s, plus slack for a loaded host.
fn stop_bound() -> Duration {
    Duration::from_secs(POWEROFF_GRACE + 100 + 20)
}

/// Writes 1 MiB of random data to `path` in `vm`, syncs, returns its checksum.
fn write_synced(env: &TestEnv, vm: &str, path: &str) -> String {
    env.guest_sh(
        vm,
        &format!("head -c 1048576 /dev/urandom > {path} && sync && sha256sum < {path}"),
    )
}

/// `vm stop VM --json` within the bound; returns the result and how long it took.
fn stop_within_bound(env: &TestEnv, vm: &str) -> (Value, Duration) {
    let began = Instant::now();
    let stop = env
        .banger_within(stop_bound(), &["vm", "stop", vm, "--json"])
        .ok()
        .json();
    (stop, began.elapsed())
}

#[test]
fn hung_and_hostile_guests_stop_within_the_bound() {
    let env = TestEnv::new();
    std::fs::write(
        env.config_file(),
        format!("[daemon]\nstop_timeout_secs = {POWEROFF_GRACE}\n"),
    )
    .unwrap();
    env.build_default_image();
    let small = ["--cpus", "1", "--memory", "512M", "--disk", "1G"];
    let run = |name: &str| {
        let mut args = vec!["vm", "run", name];
        args.extend_from_slice(&small);
        env.banger(&args).ok();
    };
    run("other");
    run("hung");

    // 1. Power-off hangs (a unit whose stop never ends), the ACPI button is ignored (no
    // logind), the work disk is full and the console floods: QMP `quit` ends it. (Runtime
    // changes only: the next boot is an ordinary one.)
    let kept = write_synced(&env, "hung", "/root/kept");
    env.guest_sh(
        "hung",
        "printf '[Service]\\nType=oneshot\\nRemainAfterExit=yes\\nExecStart=/bin/true\\n\
         ExecStop=/bin/sleep infinity\\nTimeoutStopSec=infinity\\n' \
         > /run/systemd/system/hang-stop.service && systemctl daemon-reload && \
         systemctl start hang-stop.service && \
         systemctl mask --runtime --now systemd-logind.service && \
         fallocate -l $(df -B1 --output=avail /root | tail -n 1) /root/fill; \
         setsid sh -c 'while :; do echo flood flood flood flood flood > /dev/ttyS0; done' \
           </dev/null >/dev/null 2>&1 &",
    );
    let avail = env.guest_sh("hung", "df -B1 --output=avail /root | tail -n 1");
    assert!(
        avail.parse::<u64>().unwrap() < 1 << 20,
        "/root still has {avail} bytes free"
    );
    let stopping = std::thread::scope(|scope| {
        let stop = scope.spawn(|| stop_within_bound(&env, "hung"));
        // Meanwhile the daemon answers for the other VM: `vm ls` and `vm exec`.
        let mut answered = 0;
        while !stop.is_finished() {
            let began = Instant::now();
            let ls = env.banger(&["vm", "ls", "--json"]).ok().json();
            assert!(
                began.elapsed() < Duration::from_secs(3),
                "vm ls took {:?} during the hung stop",
                began.elapsed()
            );
            assert!(ls.to_string().contains("other"), "{ls}");
            assert_eq!(env.guest_sh("other", "echo alive"), "alive");
            answered += 1;
        }
        (stop.join().unwrap(), answered)
    });
    let ((stop, took), answered) = stopping;
    assert!(answered > 0, "the stop ended before the other VM was asked");
    assert_eq!(stop["stop_method"], "quit", "{stop}");
    assert!(
        took > Duration::from_secs(POWEROFF_GRACE),
        "stopped in {took:?}: the power-off grace was not waited"
    );
    eprintln!("hung power-off: stopped by quit in {took:?}; other VM answered {answered} times");
    let vm = env.vm_show("hung");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(vm["last_stop"]["stop_method"], "quit", "{vm}");
    assert_eq!(vm["last_stop"]["kind"], "unclean", "{vm}");
    assert!(
        env.qemu_pids().len() == 1,
        "only the other VM's QEMU is left"
    );

    // Synced data is intact after the next (checked) start.
    env.banger(&["vm", "start", "hung"]).ok();
    assert_eq!(env.guest_sh("hung", "sha256sum < /root/kept"), kept);
    env.guest_sh("hung", "rm /root/fill");

    // 2. No sshd: the stop cannot sync or power off over SSH; the ACPI button ends it.
    let second = write_synced(&env, "hung", "/root/second");
    env.guest_sh(
        "hung",
        "setsid sh -c 'systemctl stop ssh.service' </dev/null >/dev/null 2>&1 &",
    );
    poll(Duration::from_secs(60), "sshd gone in the guest", || {
        let vm = env.vm_show("hung");
        let port = vm["runtime"]["ssh_port"].as_u64().unwrap() as u16;
        let mut banner = [0u8; 4];
        let gone = std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                std::io::Read::read(&mut s, &mut banner)
            })
            .map_or(true, |n| n == 0 || &banner[..n.min(4)] != b"SSH-");
        gone.then_some(())
    });
    let (stop, took) = stop_within_bound(&env, "hung");
    assert_eq!(stop["stop_method"], "acpi", "{stop}");
    eprintln!("no sshd: stopped by the ACPI button in {took:?}");
    let vm = env.vm_show("hung");
    assert_eq!(vm["last_stop"]["stop_method"], "acpi", "{vm}");
    assert_eq!(vm["last_stop"]["kind"], "clean", "{vm}");
    env.banger(&["vm", "start", "hung"]).ok();
    assert_eq!(env.guest_sh("hung", "sha256sum < /root/second"), second);
    env.banger(&["vm", "stop", "hung"]).ok();
    env.banger(&["vm", "rm", "hung"]).ok();

    // 3. A frozen VMM (SIGSTOP): neither SSH nor QMP answers; SIGKILL ends it.
    let frozen = write_synced(&env, "other", "/root/frozen");
    let vm = env.vm_show("other");
    let pid = nix::unistd::Pid::from_raw(vm["runtime"]["pid"].as_u64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (stop, took) = stop_within_bound(&env, "other");
    assert_eq!(stop["stop_method"], "kill", "{stop}");
    eprintln!("frozen QEMU: stopped by SIGKILL in {took:?}");
    assert!(env.qemu_pids().is_empty());
    let vm = env.vm_show("other");
    assert_eq!(vm["last_stop"]["stop_method"], "kill", "{vm}");
    // The synced file is on the work disk: what the next start's e2fsck would do, then read.
    let disk = env
        .home()
        .join("vms")
        .join(vm["id"].as_str().unwrap())
        .join("work.ext4");
    let fsck = std::process::Command::new(system_tool("e2fsck"))
        .arg("-fy")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "e2fsck -fy: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let read = std::process::Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg("cat /frozen")
        .arg(&disk)
        .output()
        .unwrap();
    let sum = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&read.stdout)?;
            child.wait_with_output()
        })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sum.stdout).trim(), frozen);
    env.banger(&["vm", "rm", "other"]).ok();
}
