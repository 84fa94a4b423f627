//! Every QEMU from 7.2 (Debian 12) to 10.x (bookworm-backports, Debian 13) boots banger's VMs:
//! one VM under each, with the TCG threading chosen by the version (a thread per vCPU from 8.1
//! on, one thread before), and resumes it from a memory snapshot (the live disk switch, the
//! migration to a file, `cont` after it: `exec:cat` before 8.2, `file:` from 8.2). QEMU 7.2 comes from `scripts/fetch-qemu-7.2` (its path in
//! `BANGER_QEMU_7_2`; .ci/run sets it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use banger_e2e::{TestEnv, processes_with_cmdline};

/// Boots `dev` with `binary` as the QEMU and checks it answers; returns the accel argument the
/// running QEMU was given.
fn boot_and_exec(binary: &str) -> String {
    let env = TestEnv::new();
    std::fs::write(
        env.config_file(),
        format!("[qemu]\nbinary = {binary:?}\naccel = \"tcg\"\n"),
    )
    .unwrap();
    env.build_default_image();
    env.banger_or_dump(&["vm", "run", "dev"]);
    let out = env
        .banger(&["vm", "exec", "dev", "--", "cat", "/proc/version"])
        .ok();
    assert!(out.stdout.contains("Linux version"), "{}", out.stdout);
    // TCG: the kernel skips its IO-APIC timer check, which a busy host fails at random.
    assert_eq!(
        env.guest_sh("dev", "grep -ow no_timer_check /proc/cmdline"),
        "no_timer_check"
    );
    let id = env.banger(&["vm", "show", "dev", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pids = processes_with_cmdline("qemu-system-x86", &id);
    assert_eq!(pids.len(), 1, "one QEMU for the VM: {pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "-accel").unwrap();
    let accel = args[at + 1].clone();
    // A memory snapshot of the running VM, which runs on; restored, it resumes (the same
    // process alive).
    let sleeper = env.guest_sh(
        "dev",
        "setsid -f sleep 100000 </dev/null >/dev/null 2>&1; sleep 0.5; pgrep -x -n sleep",
    );
    let taken = env
        .banger(&["vm", "snapshot", "create", "dev", "m", "--memory", "--json"])
        .ok()
        .json();
    assert_eq!(taken["memory"], true, "{taken}");
    env.guest_sh("dev", "true");
    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "snapshot", "restore", "dev", "m"]).ok();
    let started = env.banger(&["vm", "start", "dev", "--json"]).ok().json();
    assert_eq!(started["restored"], true, "{started}");
    env.guest_sh("dev", &format!("kill -0 {sleeper}"));
    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "rm", "dev"]).ok();
    accel
}

fn installed_qemu_is_at_least_8_1() -> bool {
    let out = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.split("version ").nth(1).unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (8, 1)
}

#[test]
fn the_installed_qemu_boots_with_the_threading_its_version_allows() {
    let accel = boot_and_exec("qemu-system-x86_64");
    let expected = if installed_qemu_is_at_least_8_1() {
        "tcg,thread=multi"
    } else {
        "tcg,thread=single"
    };
    assert_eq!(accel, expected);
}

#[test]
fn qemu_7_2_boots_single_threaded() {
    let Ok(binary) = std::env::var("BANGER_QEMU_7_2") else {
        banger_shared::skip::report(
            "qemu_7_2_boots_single_threaded",
            "BANGER_QEMU_7_2 is not set (scripts/fetch-qemu-7.2 prints the path; .ci/run sets it)",
        );
        return;
    };
    assert_eq!(boot_and_exec(&binary), "tcg,thread=single");
}
