//! The fake jailer against Firecracker's documented jailer contract (docs/jailer.md):
//! argument set, id rule, exec file name, chroot layout, the pid file, the exec in place of
//! the copied binary with `--id`, `--daemonize` forking as the real one does since v1.6, and
//! paths resolved inside the jail by the exec'd fake.
//! Runs as root (CI does): the fake drops to the given uid/gid like the real one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ID: &str = "0123456789abcdef0123456789abcdef";

/// A `firecracker` wrapper exec'ing the fake, and a chroot base.
fn install(dir: &Path) -> std::path::PathBuf {
    let exec = dir.join("firecracker");
    std::fs::write(
        &exec,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_banger-fc-fake")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.join("base")).unwrap();
    exec
}

fn jailer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_banger-jailer-fake"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[track_caller]
fn refused(out: Output, needle: &str) {
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(needle), "{text:?} lacks {needle:?}");
}

#[test]
fn the_argument_set_is_the_real_one() {
    let dir = tempfile::tempdir().unwrap();
    let exec = install(dir.path());
    let exec = exec.to_str().unwrap();
    let base = dir.path().join("base");
    let base = base.to_str().unwrap();
    let good = |extra: &[&str]| {
        let mut args = vec![
            "--id",
            ID,
            "--exec-file",
            exec,
            "--uid",
            "0",
            "--gid",
            "0",
            "--chroot-base-dir",
            base,
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        jailer(&refs)
    };
    // Unknown flags are refused (not forwarded unless after `--`).
    refused(run(good(&["--api-sock", "/x"])), "wasn't expected");
    // --id, --exec-file, --uid and --gid are required.
    for flag in ["--id", "--exec-file", "--uid", "--gid"] {
        let mut args = good(&[]);
        let at = args.iter().position(|a| a == flag).unwrap();
        args.drain(at..at + 2);
        refused(run(args), &format!("'{}' required", &flag[2..]));
    }
    // The id: alphanumerics and hyphens, at most 64 characters.
    for bad in ["../escape", "a_b", &"a".repeat(65), ""] {
        let mut args = good(&[]);
        args[1] = bad.to_owned();
        refused(run(args), "Invalid instance ID");
    }
    // The exec file's name must contain "firecracker".
    let other = dir.path().join("vmm");
    std::fs::copy(exec, &other).unwrap();
    let mut args = good(&[]);
    args[3] = other.display().to_string();
    refused(run(args), "must contain \"firecracker\"");
    // cgroup values have the `<file>=<value>` form; versions are 1 or 2.
    refused(
        run(good(&["--cgroup-version", "2", "--cgroup", "cpu.max"])),
        "Invalid format for cgroups",
    );
    refused(
        run(good(&["--cgroup-version", "3"])),
        "Invalid cgroup version",
    );
    refused(
        run(good(&["--parent-cgroup", "../up"])),
        "Invalid parent cgroup path",
    );
    refused(
        run(good(&["--resource-limit", "cores=1"])),
        "Invalid resource argument",
    );
    // Nothing was built for refused invocations.
    assert_eq!(std::fs::read_dir(base).unwrap().count(), 0);
}

#[test]
fn the_jail_is_built_and_firecracker_sees_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let exec = install(dir.path());
    let base = dir.path().join("base");
    let root = base.join("firecracker").join(ID).join("root");
    // A file placed in the jail beforehand, as the helper does.
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_banger-jailer-fake"))
        .args(["--id", ID, "--exec-file"])
        .arg(&exec)
        .args(["--uid", "0", "--gid", "0", "--chroot-base-dir"])
        .arg(&base)
        .args(["--cgroup-version", "2", "--cgroup", "cpu.max=100000 100000"])
        .args(["--", "--api-sock", "/run/firecracker.socket"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let socket = root.join("run/firecracker.socket");
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the jailer exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "no API socket in the jail");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The layout: the exec file copied in, /dev, /dev/net, /run at 0700 for uid:gid.
    assert!(root.join("firecracker").is_file());
    for d in ["dev", "dev/net", "run"] {
        let meta = std::fs::metadata(root.join(d)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{d}");
        assert_eq!(meta.uid(), 0);
    }
    // Firecracker runs in place of the jailer (same pid, also in the pid file), with its --id.
    assert_eq!(
        std::fs::read_to_string(root.join("firecracker.pid")).unwrap(),
        pid.to_string()
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("banger-fc-fake") && cmdline.contains(ID),
        "{cmdline}"
    );
    // A host path is not found from inside the jail; the in-jail one is.
    let host = dir.path().join("vmlinux").display().to_string();
    let (status, body) = put(
        &socket,
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"{host}"}}"#),
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = put(&socket, "/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Cannot open kernel image"), "{body}");
    let (status, body) = put(
        &socket,
        "/boot-source",
        r#"{"kernel_image_path":"/vmlinux"}"#,
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = put(&socket, "/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(status, 204, "{body}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn daemonize_forks_and_the_jailer_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let exec = install(dir.path());
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    let root = base.join("firecracker").join(ID).join("root");
    let status = Command::new(env!("CARGO_BIN_EXE_banger-jailer-fake"))
        .args(["--id", ID, "--exec-file"])
        .arg(&exec)
        .args(["--uid", "0", "--gid", "0", "--chroot-base-dir"])
        .arg(&base)
        .args(["--daemonize", "--", "--api-sock", "/run/firecracker.socket"])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    // Exit 0 at once, Firecracker elsewhere: its pid is in the pid file.
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(root.join("firecracker.pid"))
        .unwrap()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(root.join("run/firecracker.socket")).is_err() {
        assert!(Instant::now() < deadline, "no API socket in the jail");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_eq!(
        sid.as_raw(),
        pid,
        "the daemonized Firecracker leads its session"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn put(socket: &Path, path: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}
