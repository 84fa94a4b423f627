//! Many VMs on one daemon, with real QEMU guests: 100 VM records of which 10 run at once
//! (small memory, TCG), made by a storm of 20 parallel `vm create`s and started 5 at a time;
//! 10 concurrent operations on one VM, which the daemon serializes without a deadlock; and
//! the daemon answering `vm ls` throughout (a probe lists every 50 ms, each answer bounded
//! far above any latency goal: a hang fails, a slow answer is the benchmark's business —
//! bench/scale.sh reports p99 and the daemon's RSS). Ends with every VM removed and
//! nothing left behind.
//!
//! `BANGER_SCALE_RECORDS` and `BANGER_SCALE_RUNNING` (default 100 and 10) size it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use banger_e2e::TestEnv;
use banger_e2e::leaks::assert_no_leaks;

/// Far above any latency goal: only a daemon that stopped answering takes this long.
const ANSWER_BOUND: Duration = Duration::from_secs(10);

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lists VMs every 50 ms while `busy` holds; every answer's latency, in order.
fn probe_listing(env: &TestEnv, busy: &AtomicBool, latencies: &Mutex<Vec<Duration>>) {
    while busy.load(Ordering::SeqCst) {
        let started = Instant::now();
        let (status, body) = env.raw_request("GET", "/v1/vms", b"");
        let took = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(
            took < ANSWER_BOUND,
            "vm ls took {took:?} while other work ran"
        );
        latencies.lock().unwrap().push(took);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(latencies: &[Duration], p: f64) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or_default()
}

/// Runs `work` on every item with at most `width` at once, while a probe lists VMs; returns
/// the probe's latencies.
fn storm<T: Sync>(
    env: &TestEnv,
    items: &[T],
    width: usize,
    work: impl Fn(&T) + Sync,
) -> Vec<Duration> {
    let busy = AtomicBool::new(true);
    let latencies = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let probe = scope.spawn(|| probe_listing(env, &busy, &latencies));
        for chunk in items.chunks(width) {
            std::thread::scope(|inner| {
                for item in chunk {
                    inner.spawn(|| work(item));
                }
            });
        }
        busy.store(false, Ordering::SeqCst);
        probe.join().unwrap();
    });
    latencies.into_inner().unwrap()
}

fn report(what: &str, latencies: &[Duration]) {
    eprintln!(
        "scale: vm ls during {what}: {} answers, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies.iter().max().copied().unwrap_or_default()
    );
}

fn vm_list(env: &TestEnv) -> Vec<serde_json::Value> {
    env.banger(&["vm", "ls", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_hundred_records_ten_running_and_a_daemon_that_keeps_answering() {
    let records = count("BANGER_SCALE_RECORDS", 100);
    let running = count("BANGER_SCALE_RUNNING", 10).min(records);
    let env = TestEnv::new();
    env.build_default_image();
    // The daemon is up (the build started it): what exists now is the baseline.
    let before = env.leak_snapshot();
    let names: Vec<String> = (0..records).map(|i| format!("s{i:03}")).collect();

    // The create storm: 20 at a time.
    let create = |name: &String| {
        env.banger(&[
            "vm", "create", name, "--memory", "256M", "--cpus", "1", "--disk", "1G",
        ])
        .ok();
    };
    let latencies = storm(&env, &names, 20, create);
    report(&format!("{records} creates, 20 at a time"), &latencies);
    let listed = vm_list(&env);
    assert_eq!(listed.len(), records, "every create made one record");
    let states: Vec<String> = listed
        .iter()
        .map(|vm| format!("{}={}", vm["name"], vm["state"]))
        .collect();
    assert!(
        listed.iter().all(|vm| vm["state"] == "created"),
        "{states:?}"
    );

    // 5 starts at a time, until `running` run.
    let started = &names[..running];
    let latencies = storm(&env, started, 5, |name| {
        env.banger(&["vm", "start", name]).ok();
    });
    report(&format!("{running} starts, 5 at a time"), &latencies);
    let listed = vm_list(&env);
    let live: Vec<&str> = listed
        .iter()
        .filter(|vm| vm["state"] == "running")
        .map(|vm| vm["name"].as_str().unwrap())
        .collect();
    assert_eq!(live.len(), running, "running: {live:?}");
    assert_eq!(env.qemu_pids().len(), running, "one QEMU per running VM");
    // Each one answers: a command in every guest.
    let latencies = storm(&env, started, 5, |name| {
        let out = env.banger(&["vm", "exec", name, "--", "hostname"]).ok();
        assert_eq!(out.stdout.trim(), name.as_str());
    });
    report(&format!("exec in {running} VMs"), &latencies);
    let daemon = env.wait_for_daemon();
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?");
    eprintln!("scale: daemon with {records} records and {running} running: {rss}");

    // 10 concurrent operations on one VM: each either succeeds or is refused with a clear
    // error for the state it found; none hangs, and the VM ends in a state its process agrees
    // with.
    let target = names[0].as_str();
    let operations: Vec<Vec<&str>> = vec![
        vec!["vm", "show", target, "--json"],
        vec!["vm", "stop", target],
        vec!["vm", "start", target],
        vec!["vm", "exec", target, "--", "true"],
        vec!["vm", "stats", target, "--json"],
        vec!["vm", "set", target, "--cpus", "1"],
        vec!["vm", "pause", target],
        vec!["vm", "resume", target],
        vec!["vm", "port", "ls", target],
        vec!["vm", "stop", target],
    ];
    let outcomes = Mutex::new(Vec::new());
    let latencies = storm(&env, &operations, operations.len(), |args| {
        let run = env.banger_within(Duration::from_secs(600), args);
        if run.code != 0 {
            // A refusal is one line that says why.
            assert!(
                !run.stderr.trim().is_empty() && !run.stderr.contains("panicked"),
                "`banger {}`: {run:?}",
                args.join(" ")
            );
        }
        outcomes
            .lock()
            .unwrap()
            .push(format!("{} -> {}", args.join(" "), run.code));
    });
    report("10 operations on one VM", &latencies);
    eprintln!("scale: outcomes: {:#?}", outcomes.into_inner().unwrap());
    let shown = env.banger(&["vm", "show", target, "--json"]).ok().json();
    let state = shown["state"].as_str().unwrap().to_owned();
    let pid = shown["runtime"]["pid"].as_u64();
    match state.as_str() {
        "stopped" | "created" => assert!(pid.is_none(), "{shown}"),
        "running" | "paused" => {
            let pid = pid.unwrap_or_else(|| panic!("{state} without a pid: {shown}"));
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "{shown}"
            );
        }
        other => panic!("unexpected state {other}: {shown}"),
    }
    // And it still works afterwards.
    if state == "paused" {
        env.banger(&["vm", "resume", target]).ok();
    }
    if state == "stopped" || state == "created" {
        env.banger(&["vm", "start", target]).ok();
    }
    env.banger(&["vm", "exec", target, "--", "true"]).ok();

    // The running ones stopped, 5 at a time; then every VM removed, 20 names per `vm rm`.
    let latencies = storm(&env, started, 5, |name| {
        env.banger(&["vm", "stop", name]).ok();
    });
    report(&format!("{running} stops, 5 at a time"), &latencies);
    let batches: Vec<&[String]> = names.chunks(20).collect();
    let latencies = storm(&env, &batches, batches.len(), |batch| {
        let mut args = vec!["vm", "rm"];
        args.extend(batch.iter().map(String::as_str));
        env.banger(&args).ok();
    });
    report(&format!("{records} removals"), &latencies);
    assert!(vm_list(&env).is_empty());
    assert!(env.qemu_pids().is_empty());
    assert_no_leaks(&before, &env.leak_snapshot(), "removing every VM");
}
