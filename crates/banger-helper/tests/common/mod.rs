//! Harness shared by the helper's integration tests: the real `banger-helper` binary started
//! as root for owner uid 0 on a socket in a fresh directory, and one request per connection.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_proto::helper::{HelperOp, HelperReply, HelperRequest, read_frame, write_frame};

/// A running helper; killed on drop (also when the test fails).
pub struct Helper {
    pub child: Child,
    pub socket: PathBuf,
    /// `<dir>/state`, the helper's `--state-dir` (canonical).
    pub state: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Helper {
    /// Kills the helper and reaps it; idempotent.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh directory under /tmp, readable by all (the helper checks ownership of its paths).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Starts the helper with its socket and state dir in `dir`: run through `prefix` (e.g.
/// `ip netns exec NS`) when not empty, `extra` flags after the common ones. Returns once the
/// socket accepts connections.
pub fn start(dir: tempfile::TempDir, prefix: &[&str], extra: &[&OsStr]) -> Helper {
    let socket = dir.path().join("helper.sock");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let binary = env!("CARGO_BIN_EXE_banger-helper");
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let child = command
        .args(["--foreground", "--owner", "0"])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "helper did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Helper {
        child,
        socket,
        state: state.canonicalize().unwrap(),
        dir,
    }
}

/// One request on a fresh connection.
pub fn request(socket: &Path, op: HelperOp) -> HelperReply {
    let mut stream = UnixStream::connect(socket).unwrap();
    write_frame(
        &mut stream,
        &HelperRequest {
            op_id: "test-op".into(),
            op,
        },
    )
    .unwrap();
    read_frame(&mut stream).unwrap()
}

/// Asserts a one-line refusal containing `needle`; returns the message.
#[track_caller]
pub fn refused(reply: HelperReply, needle: &str) -> String {
    match reply {
        HelperReply::Error { message, .. } => {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            assert!(!message.contains('\n'), "one line: {message:?}");
            message
        }
        other => panic!("expected a refusal ({needle}), got {other:?}"),
    }
}
