//! Fuzzes the daemon's request parsing through its real socket: proptest generates raw
//! HTTP/1.1 requests (methods, every route with odd names and queries, random headers,
//! lying or missing Content-Length, chunked bodies, random and near-valid JSON bodies, pure
//! garbage). After every case the daemon must still answer `GET /v1/status` within a few
//! seconds, and at the end it must not have panicked. Bounded: a fixed number of cases
//! (`BANGER_FUZZ_CASES`, default 1000, a few seconds) with short read deadlines. Routes that would stop the
//! daemon or start an image build are left out; nothing else can succeed without an image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let stderr = dir.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_bangerd"))
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("BANGER_RUNTIME_DIR")
            .env("BANGER_HOME", &home)
            .env("BANGER_CONFIG", dir.path().join("config.toml"))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let socket = home.join("run/bangerd.sock");
        let deadline = Instant::now() + Duration::from_secs(60);
        while status_code(&socket).is_none() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            dir,
            socket,
            stderr,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `request` and reads what comes back until the response looks complete, the
/// connection closes, or `limit` passes (the daemon may be waiting for a body we lied about).
fn exchange(socket: &Path, request: &[u8], limit: Duration) -> Option<Vec<u8>> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_write_timeout(Some(limit)).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    let _ = stream.write_all(request);
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if complete(&got) {
            break;
        }
    }
    Some(got)
}

/// Whether `got` holds a whole response (headers and Content-Length bytes of body).
fn complete(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    got.len() >= end + 4 + length
}

/// The status code of `GET /v1/status`, if the daemon answers within 10 s.
fn status_code(socket: &Path) -> Option<u16> {
    let got = exchange(
        socket,
        b"GET /v1/status HTTP/1.1\r\nhost: bangerd\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    )?;
    let line = String::from_utf8_lossy(&got);
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

const ROUTES: &[&str] = &[
    "/v1/status",
    "/v1/doctor",
    "/v1/vms",
    "/v1/vms/{name}",
    "/v1/vms/{name}/start",
    "/v1/vms/{name}/stop",
    "/v1/vms/{name}/pause",
    "/v1/vms/{name}/resume",
    "/v1/vms/{name}/suspend",
    "/v1/vms/{name}/ssh",
    "/v1/vms/{name}/console?offset={n}",
    "/v1/vms/{name}/workspace?guest={name}",
    "/v1/vms/{name}/workspace/prepare",
    "/v1/vms/{name}/workspace/export",
    "/v1/vms/{name}/workspace/progress",
    "/v1/vms/{name}/cp",
    "/v1/images",
    "/v1/images/import",
    "/v1/images/{name}",
    "/v1/kernels",
    "/v1/kernels/import",
    "/v1/kernels/{name}",
    "/v1/network",
    "/v1/ssh-config",
];

const FIELDS: &[&str] = &[
    "name",
    "path",
    "image",
    "cpus",
    "memory_mib",
    "disk_size_bytes",
    "vmm",
    "network",
    "patch",
    "to",
    "no_git",
    "rootfs",
    "kernel",
    "guest_path",
    "host_path",
    "direction",
];

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,20}",
        Just("..".to_owned()),
        Just("%2e%2e%2f%2e%2e".to_owned()),
        Just("a".repeat(5000)),
        "[^/?# ]{0,40}",
        "%[0-9a-fA-F]{2}%[0-9A-Za-z]{0,3}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (proptest::sample::select(ROUTES), name(), any::<i64>()).prop_map(|(r, n, i)| {
            r.replace("{name}", &n).replace("{n}", &i.to_string())
        }),
        1 => "/[ -~]{0,80}",
        1 => "[^ \r\n]{0,40}",
    ]
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,30}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("/")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,12}",
                    proptest::sample::select(FIELDS).prop_map(str::to_owned),
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        proptest::collection::vec(any::<u8>(), 0..512),
        "\\{\"[a-z]{1,8}\":[ -~]{0,40}".prop_map(String::into_bytes),
    ]
}

#[derive(Debug, Clone)]
enum Length {
    Right,
    Wrong(u64),
    Missing,
    Chunked,
    Garbage(String),
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        6 => Just(Length::Right),
        1 => (0u64..100_000).prop_map(Length::Wrong),
        1 => Just(Length::Missing),
        1 => Just(Length::Chunked),
        1 => "[ -~]{0,20}".prop_map(Length::Garbage),
    ]
}

fn render(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    length: &Length,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: bangerd\r\n").into_bytes();
    for (k, v) in headers {
        let lower = k.to_ascii_lowercase();
        if lower == "content-length" || lower == "transfer-encoding" {
            continue;
        }
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"content-type: application/json\r\n");
    match length {
        Length::Right => {
            out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes())
        }
        Length::Wrong(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Length::Missing => {}
        Length::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Length::Garbage(g) => out.extend_from_slice(format!("content-length: {g}\r\n").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    if matches!(length, Length::Chunked) {
        for chunk in body.chunks(7) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(body);
    }
    out
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        4 => proptest::sample::select(&["GET", "POST", "DELETE"][..]).prop_map(str::to_owned),
        1 => proptest::sample::select(&["PUT", "PATCH", "HEAD", "OPTIONS"][..])
            .prop_map(str::to_owned),
        1 => "[A-Za-z]{1,12}",
    ];
    let header_name = prop_oneof![
        8 => "[a-z][a-z0-9-]{0,15}",
        1 => proptest::sample::select(&["x-banger-op-id", "accept", "connection", "expect"][..])
            .prop_map(str::to_owned),
        1 => "[!-9;-~]{1,20}",
    ];
    let headers = proptest::collection::vec((header_name, "[!-~][ -~]{0,60}"), 0..4);
    let structured = (method, path(), headers, body(), length()).prop_filter_map(
        "stops the daemon or builds an image",
        |(method, path, headers, body, length)| {
            let dangerous = method == "POST"
                && ["/v1/shutdown", "/v1/images/build"]
                    .iter()
                    .any(|p| path.starts_with(p));
            (!dangerous).then(|| render(&method, &path, &headers, &body, &length))
        },
    );
    prop_oneof![
        9 => structured,
        1 => proptest::collection::vec(any::<u8>(), 0..2048),
    ]
}

#[test]
fn the_daemon_survives_arbitrary_requests() {
    let daemon = Daemon::start();
    let cases = std::env::var("BANGER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let socket = daemon.socket.clone();
    proptest!(config, |(request in request())| {
        let _ = exchange(&socket, &request, Duration::from_millis(300));
        prop_assert!(status_code(&socket) == Some(200), "the daemon stopped answering");
    });
    let stderr = std::fs::read_to_string(&daemon.stderr).unwrap_or_default();
    assert!(
        !stderr.contains("panicked"),
        "the daemon panicked:\n{stderr}"
    );
    let logs = daemon.dir.path().join("home/logs");
    let log: String = std::fs::read_dir(logs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(!log.contains("panicked"), "the daemon logged a panic");
}
