//! `banger doctor` against the real binaries: the rows it reports on this host, the JSON
//! shape, the fix texts and the exit code when a check fails.

use std::path::Path;

use banger_e2e::TestEnv;
use serde_json::Value;

/// The check named `name` in a `doctor --json` report.
#[track_caller]
fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    let Some(checks) = report["checks"].as_array() else {
        panic!("checks is not an array: {report:#}");
    };
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"))
}

#[test]
fn doctor_reports_every_check_with_fixes_for_problems() {
    let env = TestEnv::new();
    let run = env.banger(&["doctor", "--json"]);
    let report = run.json();
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "kvm",
            "qemu",
            "qemu-img",
            "mkfs.ext4",
            "ssh",
            "ssh-keygen",
            "debugfs",
            "mmdebstrap",
            "newuidmap",
            "cpio",
            "busybox",
            "disk-space",
            "tun",
            "default-image",
            "firecracker",
            "jailer",
            "system-disk",
            "helper"
        ]
    );
    // No Firecracker and no root helper on the test machines: both say what to do.
    let firecracker = check(&report, "firecracker");
    assert_eq!(firecracker["status"], "warn", "{firecracker}");
    assert!(firecracker["detail"].as_str().unwrap().contains("QEMU"));
    // No firecracker.jailer: VMs run unjailed, which is fine.
    let jailer = check(&report, "jailer");
    assert_eq!(jailer["status"], "ok", "{jailer}");
    assert!(
        jailer["detail"]
            .as_str()
            .unwrap()
            .contains("not configured")
    );
    let helper = check(&report, "helper");
    assert_eq!(helper["status"], "warn", "{helper}");
    assert!(helper["fix"].as_str().unwrap().contains("helper install"));
    // The dm strategy needs the helper and device-mapper (neither here): the row says so.
    let disk = check(&report, "system-disk");
    let detail = disk["detail"].as_str().unwrap();
    assert!(
        detail.contains("need banger-helper and /dev/mapper/control"),
        "{detail}"
    );
    for row in report["checks"].as_array().unwrap() {
        let status = row["status"].as_str().unwrap();
        assert!(["ok", "warn", "fail"].contains(&status), "{row}");
        if status != "ok" {
            assert!(
                row["fix"].as_str().is_some_and(|f| !f.is_empty()),
                "a {status} row without a fix: {row}"
            );
        }
    }
    let any_fail = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["status"] == "fail");
    assert_eq!(report["ok"], !any_fail, "{report:#}");
    assert_eq!(run.code, if any_fail { 1 } else { 0 }, "{}", run.stderr);

    let qemu = check(&report, "qemu");
    assert_eq!(qemu["status"], "ok", "{qemu}");
    let detail = qemu["detail"].as_str().unwrap();
    assert!(detail.starts_with("QEMU "), "{detail}");
    assert!(
        detail[5..].starts_with(|c: char| c.is_ascii_digit()),
        "no version in {detail:?}"
    );

    // This host's /dev/kvm is nested PVM: KVM is ruled out and VMs fall back to TCG (for a
    // user who may not open /dev/kvm, already for that).
    let kvm = check(&report, "kvm");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(kvm["status"], "warn", "{kvm}");
        let detail = kvm["detail"].as_str().unwrap();
        assert!(
            detail.contains("PVM") || detail.contains("Permission denied"),
            "{kvm}"
        );
    } else {
        assert_ne!(kvm["status"], "fail", "{kvm}");
    }

    // A fresh instance has no image yet.
    let image = check(&report, "default-image");
    assert_eq!(image["status"], "warn", "{image}");
    assert!(
        image["fix"]
            .as_str()
            .unwrap()
            .contains("banger image build"),
        "{image}"
    );

    let disk = check(&report, "disk-space");
    assert!(
        disk["detail"].as_str().unwrap().contains("GiB free"),
        "{disk}"
    );
}

#[test]
fn doctor_text_output_has_one_row_per_check_and_fix_lines() {
    let env = TestEnv::new();
    let run = env.banger(&["doctor"]);
    assert!(run.code == 0 || run.code == 1, "stderr: {}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let rows: Vec<&&str> = lines.iter().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(rows.len(), 18, "{}", run.stdout);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok    qemu ") && l.contains("QEMU")),
        "{}",
        run.stdout
    );
    let image_row = lines
        .iter()
        .position(|l| l.starts_with("WARN  default-image"))
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(
        lines[image_row + 1].trim_start().starts_with("fix: ")
            && lines[image_row + 1].contains("banger image build"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_missing_qemu_fails_with_exit_1_and_a_fix() {
    let env = TestEnv::new();
    std::fs::write(
        env.config_file(),
        "[qemu]\nbinary = \"/nonexistent/qemu\"\n",
    )
    .unwrap();
    let run = env.banger(&["doctor", "--json"]);
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    let report = run.json();
    assert_eq!(report["ok"], false);
    let qemu = check(&report, "qemu");
    assert_eq!(qemu["status"], "fail", "{qemu}");
    assert!(
        qemu["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/qemu"),
        "{qemu}"
    );
    let fix = qemu["fix"].as_str().unwrap();
    assert!(
        fix.contains("qemu-system-x86") && fix.contains("qemu.binary"),
        "{fix}"
    );

    let text = env.banger(&["doctor"]);
    assert_eq!(text.code, 1, "stderr: {}", text.stderr);
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("FAIL  qemu ") && l.contains("/nonexistent/qemu")),
        "{}",
        text.stdout
    );
}

#[test]
fn a_configured_but_missing_jailer_fails_with_a_fix() {
    let env = TestEnv::new();
    std::fs::write(
        env.config_file(),
        "[firecracker]\njailer = \"/nonexistent/jailer\"\n",
    )
    .unwrap();
    let run = env.banger(&["doctor", "--json"]);
    assert_eq!(run.code, 1, "stderr: {}", run.stderr);
    let report = run.json();
    let jailer = check(&report, "jailer");
    assert_eq!(jailer["status"], "fail", "{jailer}");
    assert!(
        jailer["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/jailer"),
        "{jailer}"
    );
    assert!(
        jailer["fix"]
            .as_str()
            .unwrap()
            .contains("remove firecracker.jailer"),
        "{jailer}"
    );
}
