//! The fake itself, against hand-written requests: what Firecracker's spec rejects is
//! rejected (400 + fault_message), what it accepts is accepted, and the state machine holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Fake {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
    /// The real Firecracker (`FIRECRACKER_BIN`): only statuses are compared, its messages
    /// are its own.
    real: bool,
}

/// The real Firecracker binary when `FIRECRACKER_BIN` names one; else a visible SKIP line.
fn real_firecracker() -> Option<PathBuf> {
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(path) if path.is_file() => {
            banger_shared::skip::announce_real(
                "contract replay",
                &format!("against the real Firecracker at {}", path.display()),
            );
            Some(path)
        }
        Some(path) => panic!("FIRECRACKER_BIN={} is not a file", path.display()),
        None => {
            banger_shared::skip::report(
                "contract replay against the real Firecracker",
                "FIRECRACKER_BIN is not set: the cases ran against the fake only",
            );
            None
        }
    }
}

/// `hlt; jmp hlt` as the smallest kernel Firecracker loads (the guest cannot run here anyway).
fn tiny_elf_kernel() -> Vec<u8> {
    banger_e2e::tiny_elf_kernel(&[0xf4, 0xeb, 0xfd])
}

impl Fake {
    fn start(extra: &[&str]) -> Self {
        Self::start_binary(
            Path::new(env!("CARGO_BIN_EXE_banger-fc-fake")),
            extra,
            false,
        )
    }

    fn start_binary(binary: &Path, extra: &[&str], real: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fc.sock");
        let child = Command::new(binary)
            .arg("--api-sock")
            .arg(&socket)
            .args(["--id", "t1"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the fake never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            socket,
            dir,
            real,
        }
    }

    fn file(&self, name: &str) -> String {
        let path = self.dir.path().join(name);
        if name == "vmlinux" && self.real {
            std::fs::write(&path, tiny_elf_kernel()).unwrap();
        } else {
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
        }
        path.display().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Sends one request; returns (status, fault_message or body).
    fn send(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Read the head, then Content-Length bytes: Firecracker keeps the connection open.
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            raw.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&raw).into_owned();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body_bytes = vec![0u8; length];
        stream.read_exact(&mut body_bytes).unwrap();
        let text = String::from_utf8_lossy(&body_bytes).into_owned();
        let text = text.as_str();
        let value = serde_json::from_str(text).unwrap_or(Value::Null);
        (status, value)
    }

    #[track_caller]
    fn ok(&self, method: &str, path: &str, body: Value) {
        let (status, reply) = self.send(method, path, &body.to_string());
        assert_eq!(status, 204, "{method} {path} {body}: {reply}");
    }

    /// Asserts a 400 whose fault_message contains `needle`.
    #[track_caller]
    fn refused(&self, method: &str, path: &str, body: &str, needle: &str) {
        let (status, reply) = self.send(method, path, body);
        assert_eq!(status, 400, "{method} {path} {body} was accepted: {reply}");
        if self.real {
            return;
        }
        let message = reply["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {reply}"));
        assert!(
            message.contains(needle),
            "{method} {path} {body}: {message:?} lacks {needle:?}"
        );
    }

    fn boot(&self) {
        self.ok(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256}),
        );
        self.ok(
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": self.file("vmlinux"), "boot_args": "console=ttyS0"}),
        );
        self.ok(
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": self.file("root.raw"), "is_root_device": false, "is_read_only": false}),
        );
        self.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn requests_the_spec_rejects_are_refused_with_a_fault_message() {
    spec_cases(&|| Fake::start(&[]));
}

#[test]
fn the_real_firecracker_answers_the_spec_cases_with_the_same_statuses() {
    if let Some(real) = real_firecracker() {
        spec_cases(&|| Fake::start_binary(&real, &[], true));
    }
}

fn spec_cases(start: &dyn Fn() -> Fake) {
    let fake = start();
    // Unknown path and wrong method.
    fake.refused(
        "PUT",
        "/nonsense",
        "{}",
        "Invalid request method and/or path",
    );
    fake.refused("DELETE", "/drives/x", "", "Invalid request method");
    // A method Firecracker's server does not know: 400 with an `error`, no fault_message.
    let (status, reply) = fake.send("POST", "/actions", "{}");
    assert_eq!(status, 400, "{reply}");
    assert!(reply.get("fault_message").is_none(), "{reply}");
    // Not JSON, an empty required body.
    fake.refused("PUT", "/boot-source", "{not json", "deserializing");
    fake.refused("PUT", "/boot-source", "", "Empty PUT request");
    // Missing required field, wrong types, enum, unknown field, bounds.
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2}"#,
        "missing field `mem_size_mib`",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "2", "mem_size_mib": 256}"#,
        "expected an integer",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2.5, "mem_size_mib": 256}"#,
        "expected an integer",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
        "minimum",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 33, "mem_size_mib": 256}"#,
        "maximum",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "1G"}"#,
        "unknown variant `1G`",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256, "cpu_template": "Z9"}"#,
        "unknown variant `Z9`",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256, "memory": 1}"#,
        "unknown field `memory`",
    );
    fake.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "Reboot"}"#,
        "unknown variant `Reboot`",
    );
    fake.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart", "now": true}"#,
        "unknown field `now`",
    );
    fake.refused(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": 7}"#,
        "expected a string",
    );
    fake.refused(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "is_root_device": "yes", "path_on_host": "/x"}"#,
        "expected a boolean",
    );
    fake.refused(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "is_root_device": false, "cache_type": "Fast", "path_on_host": "/x"}"#,
        "unknown variant `Fast`",
    );
    // Nested objects are closed too (RateLimiter), except the token buckets inside, which
    // Firecracker reads without deny_unknown_fields.
    fake.refused(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/x", "rate_limiter": {"bandwith": {"size": 1, "refill_time": 1}}}"#,
        "unknown field `bandwith`",
    );
    fake.ok(
        "PUT",
        "/drives/a",
        json!({"drive_id": "a", "is_root_device": false, "is_read_only": false, "path_on_host": fake.file("a.raw"), "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 2}}}),
    );
    fake.refused(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 20}"#,
        "minimum",
    );
    fake.refused(
        "PATCH",
        "/vm",
        r#"{"state": "Sleeping"}"#,
        "unknown variant `Sleeping`",
    );
    fake.refused(
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path": "/s"}"#,
        "missing field `mem_file_path`",
    );
    // The id in the path is the id in the body.
    fake.refused(
        "PUT",
        "/drives/a",
        &json!({"drive_id": "b", "is_root_device": false, "path_on_host": fake.file("d")})
            .to_string(),
        "does not match",
    );
    // Files Firecracker opens must exist.
    fake.refused(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/nonexistent/disk"}"#,
        "No such file",
    );
    fake.refused(
        "PUT",
        "/logger",
        r#"{"log_path": "/nonexistent/log"}"#,
        "No such file",
    );
    // Valid requests pass; metadata answers.
    fake.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "huge_pages": "None"}),
    );
    let (status, info) = fake.send("GET", "/", "");
    assert_eq!(status, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "t1");
    let (_, version) = fake.send("GET", "/version", "");
    assert_eq!(version["firecracker_version"], "1.17.0-dev");
}

#[test]
fn the_state_machine_holds() {
    state_cases(&|| Fake::start(&[]));
}

#[test]
fn the_real_firecracker_holds_the_same_state_machine() {
    if let Some(real) = real_firecracker() {
        state_cases(&|| Fake::start_binary(&real, &[], true));
    }
}

fn state_cases(start: &dyn Fn() -> Fake) {
    let fake = start();
    // Post-boot-only operations before boot.
    fake.refused("PATCH", "/vm", r#"{"state": "Paused"}"#, "before starting");
    fake.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        "before starting",
    );
    fake.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "without kernel configuration",
    );
    fake.ok(
        "PUT",
        "/logger",
        json!({"log_path": fake.file("fc.log"), "level": "Info"}),
    );
    // A second logger configuration replaces the first.
    fake.ok("PUT", "/logger", json!({"log_path": fake.file("fc.log")}));
    fake.ok(
        "PUT",
        "/metrics",
        json!({"metrics_path": fake.file("metrics")}),
    );
    fake.refused(
        "PUT",
        "/metrics",
        &json!({"metrics_path": fake.file("metrics")}).to_string(),
        "not allowed",
    );
    fake.ok(
        "PUT",
        "/drives/other",
        json!({"drive_id": "other", "path_on_host": fake.file("o"), "is_root_device": true}),
    );
    fake.refused(
        "PUT",
        "/drives/second",
        &json!({"drive_id": "second", "path_on_host": fake.file("s2"), "is_root_device": true})
            .to_string(),
        "root block device already exists",
    );
    fake.boot();
    // Pre-boot-only resources and a second start are refused after InstanceStart.
    fake.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "after starting",
    );
    fake.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        "after starting",
    );
    fake.refused(
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": fake.file("k2")}).to_string(),
        "after starting",
    );
    fake.refused(
        "PUT",
        "/drives/x",
        &json!({"drive_id": "x", "path_on_host": fake.file("x"), "is_root_device": false})
            .to_string(),
        "PCI is not enabled",
    );
    fake.refused(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        "PCI is not enabled",
    );
    fake.refused(
        "PUT",
        "/snapshot/load",
        &json!({"snapshot_path": fake.file("s")}).to_string(),
        "not allowed",
    );
    // Snapshots need a paused VM.
    let snap = fake.path("vm.snap");
    let mem = fake.path("vm.mem");
    let create =
        json!({"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem}).to_string();
    fake.refused("PUT", "/snapshot/create", &create, "must be paused");
    fake.ok("PATCH", "/vm", json!({"state": "Paused"}));
    assert_eq!(fake.send("GET", "/", "").1["state"], "Paused");
    fake.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem}),
    );
    fake.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    assert_eq!(fake.send("GET", "/", "").1["state"], "Running");

    // A fresh process loads the snapshot; not after configuring anything but logger/metrics.
    let fresh = start();
    fresh.ok("PUT", "/logger", json!({"log_path": fresh.file("fc.log")}));
    fresh.refused(
        "PUT",
        "/snapshot/load",
        &json!({"snapshot_path": snap}).to_string(),
        "Exactly one",
    );
    fresh.ok("PUT", "/snapshot/load", json!({"snapshot_path": snap, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}));
    assert_eq!(fresh.send("GET", "/", "").1["state"], "Running");
    fresh.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "after starting",
    );
    let configured = start();
    configured.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    configured.refused(
        "PUT",
        "/snapshot/load",
        &json!({"snapshot_path": snap, "mem_file_path": mem}).to_string(),
        "not allowed after configuring",
    );
}

#[test]
fn ctrl_alt_del_ends_the_process_only_when_the_guest_reacts() {
    let exits = Fake::start(&[]);
    exits.boot();
    exits.ok("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));
    wait_exit(exits);

    let mut ignores = Fake::start(&["--ctrl-alt-del", "ignore"]);
    ignores.boot();
    ignores.ok("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));
    assert!(ignores.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(ignores.send("GET", "/", "").1["state"], "Running");
}

fn wait_exit(mut fake: Fake) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = fake.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fake did not exit after Ctrl-Alt-Del"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const VENDORED_SPEC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/spec/firecracker-1.17.0-dev.yaml"
);

#[test]
fn the_vendored_spec_is_the_reference_copy() {
    // The project's reference copy lives beside the repository; a clone elsewhere (CI) has
    // only the vendored one, and then there is nothing to compare.
    let reference = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/firecracker-1.17.0-dev.yaml");
    let Ok(reference) = std::fs::read(&reference) else {
        banger_shared::skip::report(
            "the_vendored_spec_is_the_reference_copy",
            "no ../shared/reference beside the repository",
        );
        return;
    };
    assert!(
        std::fs::read(VENDORED_SPEC).unwrap() == reference,
        "crates/banger-fc-fake/spec differs from ../shared/reference: copy it again"
    );
}

#[test]
fn the_spec_is_read_at_run_time() {
    // A spec without /vm: the same binary then refuses PATCH /vm as an unknown path.
    let full = std::fs::read_to_string(VENDORED_SPEC).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trimmed = full.replace("\n  /vm:\n", "\n  /vm-renamed:\n");
    assert_ne!(trimmed, full);
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, trimmed).unwrap();
    let fake = Fake::start(&["--spec", spec.to_str().unwrap()]);
    fake.boot();
    fake.refused(
        "PATCH",
        "/vm",
        r#"{"state": "Paused"}"#,
        "Invalid request method and/or path",
    );
    let version = Command::new(env!("CARGO_BIN_EXE_banger-fc-fake"))
        .args(["--version", "--spec"])
        .arg(Path::new(&spec))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("Firecracker v1.17.0-dev"));
}
