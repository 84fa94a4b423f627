//! Harness shared by the helper's integration tests: the real `banger-helper` binary started
//! as root for an owner (uid 0 unless asked) on a socket in a fresh directory, its loop
//! records there too, its log in `<dir>/helper.log`; one request per connection, also as
//! another uid (through `banger-helper call`); and the test users.
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

    /// Lazily unmounts every mount under the helper's dir (its jail base's tmpfs, which
    /// outlives the helper as it would a restart), deepest first.
    pub fn unmount_all(&self) {
        let dir = self.dir.path();
        let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|m| m.starts_with(dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop();
        self.unmount_all();
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
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    start_for(dir, 0, &state, prefix, extra)
}

/// [`start`] for `owner` with the state dir `state` (made by the caller).
pub fn start_for(
    dir: tempfile::TempDir,
    owner: u32,
    state: &Path,
    prefix: &[&str],
    extra: &[&OsStr],
) -> Helper {
    let socket = dir.path().join("helper.sock");
    let log = std::fs::File::create(dir.path().join("helper.log")).unwrap();
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
        .args(["--foreground", "--owner", &owner.to_string()])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(state)
        .arg("--record-dir")
        .arg(dir.path().join("records"))
        .args(extra)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut child = child;
    while UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.path().join("helper.log")).unwrap_or_default();
            panic!("the helper exited ({status}): {log}");
        }
        assert!(Instant::now() < deadline, "helper did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Helper {
        child,
        socket,
        state: state.to_path_buf(),
        dir,
    }
}

/// The helper's log so far.
pub fn log(helper: &Helper) -> String {
    std::fs::read_to_string(helper.dir.path().join("helper.log")).unwrap_or_default()
}

/// One request sent as `uid` (through `banger-helper call`, run as that uid).
pub fn request_as(uid: u32, socket: &Path, op: &HelperOp) -> HelperReply {
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_banger-helper"))
        .args(["call", "--socket"])
        .arg(socket)
        .arg(serde_json::to_string(op).unwrap())
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next().unwrap_or_else(|| {
        panic!(
            "no reply as uid {uid}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap()
}

/// The uid (and same-numbered group) of a test user, created when missing (`bangertest`: the
/// owner; `bangerevil`: another local user). Concurrent creation by another test is retried.
pub fn test_user(name: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
            assert_eq!(
                user.uid.as_raw(),
                user.gid.as_raw(),
                "{name}: tests expect a user private group with the same number"
            );
            return user.uid.as_raw();
        }
        let _ = Command::new("useradd")
            .args(["--create-home", "--user-group", name])
            .status();
        assert!(Instant::now() < deadline, "cannot create user {name}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `chown -R uid:uid path`.
pub fn chown_tree(path: &Path, uid: u32) {
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
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
