//! `vm stats` against a real VM: host-side figures of a running VM (CPU, RSS, disks that grow
//! when the guest writes, network counters that grow with a transfer), guest figures in one
//! round trip, and a stopped VM that keeps its disk figures and loses the rest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use banger_e2e::TestEnv;
use serde_json::Value;

fn stats(env: &TestEnv, extra: &[&str]) -> Value {
    let mut args = vec!["vm", "stats", "dev", "--json"];
    args.extend_from_slice(extra);
    let all = env.banger(&args).ok().json();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    all[0].clone()
}

fn allocated(vm: &Value, disk: &str) -> u64 {
    vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap_or_else(|| panic!("no {disk} disk in {vm}"))["allocated_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn stats_show_what_a_vm_costs_and_leave_out_what_is_unknown() {
    let env = TestEnv::new();
    env.build_default_image();
    env.banger(&["vm", "run", "dev"]).ok();

    let before = stats(&env, &["--guest"]);
    assert_eq!(before["state"], "running");
    assert!(before["cpu_percent"].as_f64().unwrap() > 0.0, "{before}");
    assert!(before["cpu_secs"].as_f64().unwrap() > 0.0, "{before}");
    assert!(before["rss_bytes"].as_u64().unwrap() > 50 << 20, "{before}");
    assert!(before["uptime_secs"].as_f64().unwrap() > 0.0, "{before}");
    let work_virtual = before["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == "work")
        .unwrap()["virtual_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        work_virtual,
        8 << 30,
        "the default work disk is 8 GiB: {before}"
    );
    let guest = &before["guest"];
    assert!(
        guest["mem_total_bytes"].as_u64().unwrap() > 500 << 20,
        "{before}"
    );
    assert!(
        guest["work_fs"]["size_bytes"].as_u64().unwrap() > 7 << 30,
        "{before}"
    );
    let rx_before = before["network"]["rx_bytes"].as_u64().unwrap();
    assert_eq!(before["network"]["source"], "guest");

    // The guest writes and syncs 100 MiB of incompressible data to /root (the work disk).
    env.banger(&[
        "vm",
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "head -c 104857600 /dev/urandom > /root/blob && sync",
    ])
    .ok();
    // And receives ~5 MiB over its network (the SSH session's stdin).
    let mut child = env
        .command(&["vm", "exec", "dev", "--", "sh", "-c", "cat > /dev/null"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![7u8; 5 << 20]).unwrap();
    }
    assert!(child.wait().unwrap().success());

    let after = stats(&env, &["--guest"]);
    let grown = allocated(&after, "work") - allocated(&before, "work");
    assert!(
        (95 << 20..200 << 20).contains(&grown),
        "the work disk grew by {grown} bytes on the host, expected ~100 MiB"
    );
    let rx_after = after["network"]["rx_bytes"].as_u64().unwrap();
    assert!(
        rx_after - rx_before > 5 << 20,
        "the guest received {} bytes, expected more than 5 MiB",
        rx_after - rx_before
    );

    // Without --guest, nothing is asked of the guest.
    let host_only = stats(&env, &[]);
    assert!(host_only.get("guest").is_none(), "{host_only}");

    // The daemon reports its own memory and the running VM count.
    let status = env.banger(&["daemon", "status", "--json"]).ok().json();
    assert!(status["rss_bytes"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["running_vms"], 1, "{status}");

    // Stopped: disk figures stay, process and guest figures are absent (not zero).
    env.banger(&["vm", "stop", "dev"]).ok();
    let stopped = stats(&env, &["--guest"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(allocated(&stopped, "work"), allocated(&after, "work"));
    assert!(allocated(&stopped, "system") > 0, "{stopped}");
    for absent in [
        "cpu_percent",
        "cpu_secs",
        "rss_bytes",
        "uptime_secs",
        "guest",
        "network",
    ] {
        assert!(stopped.get(absent).is_none(), "{absent} in {stopped}");
    }
    let table = env.banger(&["vm", "stats"]).ok().stdout;
    assert!(
        table.contains("dev") && table.contains("stopped"),
        "{table}"
    );

    // A name that does not exist is a clear error.
    let missing = env.banger(&["vm", "stats", "nosuch"]);
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("nosuch"), "{}", missing.stderr);
    env.banger(&["vm", "rm", "dev"]).ok();
}
