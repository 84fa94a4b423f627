//! Foundation guarantees, against the real binaries and a real SQLite file: concurrent
//! creates, autostart races, crash durability, raw-request hygiene and op_id logging.

use std::thread;

use banger_e2e::{TestEnv, poll};

#[test]
fn parallel_creates_and_autostart_race_end_with_one_daemon() {
    let env = TestEnv::new();
    env.import_stub_image();
    // Start the race from no daemon at all.
    env.banger(&["daemon", "stop"]).ok();
    assert!(env.daemon_pids().is_empty());
    // No daemon runs yet: every one of these CLIs may try to start one.
    let (distinct, same) = thread::scope(|s| {
        let distinct: Vec<_> = (0..50)
            .map(|i| {
                let env = &env;
                s.spawn(move || env.banger(&["vm", "create", &format!("vm-{i}")]))
            })
            .collect();
        let same: Vec<_> = (0..10)
            .map(|_| {
                let env = &env;
                s.spawn(move || env.banger(&["vm", "create", "same"]))
            })
            .collect();
        (
            distinct
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
            same.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
        )
    });
    for run in &distinct {
        assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    }
    let winners = same.iter().filter(|r| r.code == 0).count();
    assert_eq!(winners, 1, "exactly one create of the same name succeeds");
    for loser in same.iter().filter(|r| r.code != 0) {
        assert_eq!(loser.code, 1);
        assert!(loser.stderr.contains("already exists"), "{}", loser.stderr);
        assert_eq!(
            loser.stderr.trim().lines().count(),
            1,
            "one line: {}",
            loser.stderr
        );
    }
    let listed = env.banger(&["vm", "ls", "--json"]).ok().json();
    assert_eq!(listed.as_array().unwrap().len(), 51);
    env.wait_for_daemon();
    assert_eq!(
        env.daemon_pids().len(),
        1,
        "exactly one daemon serves the instance"
    );
}

#[test]
fn sigkill_of_the_daemon_loses_no_record() {
    let env = TestEnv::new();
    env.import_stub_image();
    for i in 0..20 {
        env.banger(&["vm", "create", &format!("keep-{i}"), "--cpus", "3"])
            .ok();
    }
    let before = env.banger(&["vm", "ls", "--json"]).ok().json();
    env.wait_for_daemon();
    env.kill_daemon();
    // The next command restarts the daemon, which reopens the database after the crash.
    let after = env.banger(&["vm", "ls", "--json"]).ok().json();
    assert_eq!(before, after);
    assert_eq!(after.as_array().unwrap().len(), 20);
    let integrity = std::process::Command::new("sqlite3")
        .arg(env.home().join("state.db"))
        .arg("PRAGMA integrity_check;")
        .output();
    match integrity {
        Ok(out) => {
            assert!(
                out.status.success(),
                "sqlite3: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        }
        Err(e) => banger_shared::skip::report(
            "SQLite integrity check after a daemon SIGKILL",
            &format!("sqlite3 cannot run ({e}; scripts/install-deps installs it)"),
        ),
    }
}

#[test]
fn raw_bad_requests_get_the_error_body_and_the_daemon_keeps_serving() {
    let env = TestEnv::new();
    env.banger(&["daemon", "start"]).ok();
    let cases: &[(&str, &str, &[u8], u16, &str)] = &[
        (
            "POST",
            "/v1/vms",
            br#"{"name":"Bad_Name"}"#,
            400,
            "invalid_name",
        ),
        ("POST", "/v1/vms", br#"{"name":"-x"}"#, 400, "invalid_name"),
        ("POST", "/v1/vms", br#"{"name": "a""#, 400, "invalid_json"),
        ("POST", "/v1/vms", b"\xff\xfe", 400, "invalid_json"),
        (
            "POST",
            "/v1/vms",
            br#"{"name":"ok","colour":"red"}"#,
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/vms",
            br#"{"name":"ok","cpus":"two"}"#,
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/vms",
            br#"{"name":"ok","cpus":0}"#,
            400,
            "invalid_request",
        ),
        ("GET", "/v1/vms/UPPER", b"", 400, "invalid_name"),
        ("GET", "/v1/vms/nosuch", b"", 404, "not_found"),
        ("GET", "/v1/nosuch", b"", 404, "not_found"),
        ("PATCH", "/v1/vms", b"", 400, "invalid_request"),
    ];
    for (method, path, body, status, code) in cases {
        let (got_status, got_body) = env.raw_request(method, path, body);
        let what = format!("{method} {path} {}", String::from_utf8_lossy(body));
        assert_eq!(got_status, *status, "{what}: {got_body}");
        let parsed: serde_json::Value = serde_json::from_str(&got_body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {got_body}"));
        assert_eq!(parsed["error"]["code"], *code, "{what}: {got_body}");
        assert!(
            parsed["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (_, body) = env.raw_request("POST", "/v1/vms", br#"{"name":"ok","colour":"red"}"#);
    assert!(body.contains("colour"), "unknown field is named: {body}");
    // Refused before any work: no VM directory was made.
    assert!(
        !env.home().join("vms").exists()
            || std::fs::read_dir(env.home().join("vms"))
                .unwrap()
                .next()
                .is_none()
    );
    // Still serving, and nothing was created by the bad requests.
    let (status, body) = env.raw_request("GET", "/v1/vms", b"");
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "[]");
}

#[test]
fn op_id_of_a_command_appears_in_the_daemon_log() {
    let env = TestEnv::new();
    env.import_stub_image();
    let op_id = "e2e-op-7f3a9";
    let run = env
        .command(&["vm", "create", "traced"])
        .env("BANGER_OP_ID", op_id)
        .output()
        .unwrap();
    assert!(run.status.success());
    let log = poll(std::time::Duration::from_secs(5), "log lines", || {
        let log = std::fs::read_to_string(env.log_file()).ok()?;
        log.contains("VM created").then_some(log)
    });
    let tagged: Vec<&str> = log.lines().filter(|l| l.contains(op_id)).collect();
    assert!(tagged.iter().any(|l| l.contains("VM created")), "{log}");
    assert!(tagged.iter().any(|l| l.contains("status=201")), "{log}");
    // Another command's lines do not carry it.
    env.banger(&["vm", "ls"]).ok();
    let log = std::fs::read_to_string(env.log_file()).unwrap();
    assert!(log.lines().filter(|l| l.contains(op_id)).count() == tagged.len());
}

#[test]
fn cli_errors_are_one_line_with_documented_exit_codes() {
    let env = TestEnv::new();
    let run = env.banger(&["vm", "create", "Bad_Name"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("hint"), "{}", run.stderr);
    assert!(
        env.daemon_pids().is_empty(),
        "usage errors never start the daemon"
    );

    let run = env.banger(&["vm", "create", "x", "--disk", "8"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("needs a unit"), "{}", run.stderr);

    let run = env.banger(&["vm", "show", "nosuch"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("not found"));

    let run = env.banger(&["daemon", "stop"]).ok();
    assert!(run.stdout.contains("stopped"));
    let run = env
        .command(&["vm", "ls"])
        .env("BANGER_NO_AUTOSTART", "1")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&run.stderr).contains("BANGER_NO_AUTOSTART"));
    let run = env.banger(&["daemon", "status"]);
    assert_eq!(run.code, 3);
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_the_key() {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), "[defaults]\ncpu = 4\n").unwrap();
    let run = env.banger(&["vm", "ls"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("cpu"), "{}", run.stderr);
    assert!(env.daemon_pids().is_empty());

    std::fs::write(env.config_file(), "[defaults]\ncpus = 4\nmemory = \"2G\"\n").unwrap();
    env.import_stub_image();
    let vm = env.banger(&["vm", "create", "cfg", "--json"]).ok().json();
    assert_eq!(vm["spec"]["cpus"], 4);
    assert_eq!(vm["spec"]["memory_mib"], 2048);
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let env = TestEnv::new();
    let bash = env.banger(&["completions", "bash"]).ok();
    assert!(bash.stdout.contains("banger") && bash.stdout.contains("create"));
    let man = env.banger(&["man"]).ok();
    assert!(
        man.stdout.contains(".TH banger"),
        "{}",
        &man.stdout[..200.min(man.stdout.len())]
    );
}
