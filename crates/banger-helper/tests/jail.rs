//! `spawn_jailed` / `remove_jail` of the real helper (as root, owner uid 0) with the fake
//! jailer (`banger-jailer-fake`, held to Firecracker's jailer contract) and the fake
//! Firecracker: refusals of a bad vm id, files outside the state dir or escaping it through
//! a symlink, exec files others may write; and a spawn + removal that leaves nothing behind,
//! both with hard links (same file system) and bind mounts (the jail base on a tmpfs).
//! Needs root and `cargo build --workspace --bins` (the fakes are another crate's binaries).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_proto::helper::{HelperOp, HelperReply, HelperResult, JailFiles};

const ID: &str = "0123456789abcdef0123456789abcdef";

/// A binary of the workspace built next to this test's binary.
fn workspace_bin(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

mod common;

use common::{refused, request};

/// The common helper with a jail base (`--jail-base`), a tmpfs when asked (unmounted on drop).
struct Helper {
    inner: common::Helper,
    base: PathBuf,
    tmpfs: bool,
}

impl std::ops::Deref for Helper {
    type Target = common::Helper;
    fn deref(&self) -> &common::Helper {
        &self.inner
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.inner.stop();
        if self.tmpfs {
            let _ = Command::new("umount").arg(&self.base).status();
        }
    }
}

fn start_helper(tmpfs_base: bool) -> Helper {
    let dir = common::temp_dir("bgj");
    let base = dir.path().join("jail");
    std::fs::create_dir(&base).unwrap();
    if tmpfs_base {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "bgj-test"])
            .arg(&base)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
    }
    let inner = common::start(dir, &[], &["--jail-base".as_ref(), base.as_os_str()]);
    Helper {
        inner,
        base,
        tmpfs: tmpfs_base,
    }
}

/// The VM's files in the state dir, a root-owned `firecracker` wrapper and the op.
struct Setup {
    files: JailFiles,
    exec_file: PathBuf,
}

fn setup(helper: &Helper) -> Setup {
    let vm = helper.state.join("vms").join(ID);
    std::fs::create_dir_all(&vm).unwrap();
    for name in ["vmlinux", "system.raw", "work.ext4", "console.log"] {
        std::fs::write(vm.join(name), name).unwrap();
    }
    let bin = helper.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exec_file = bin.join("firecracker");
    std::fs::write(
        &exec_file,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            workspace_bin("banger-fc-fake").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&exec_file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = |n: &str| vm.join(n).display().to_string();
    Setup {
        files: JailFiles {
            kernel: text("vmlinux"),
            initrd: None,
            system_disk: text("system.raw"),
            work_disk: text("work.ext4"),
            console_log: text("console.log"),
        },
        exec_file,
    }
}

fn spawn_op(setup: &Setup, vm_id: &str, exec_file: &Path) -> HelperOp {
    HelperOp::SpawnJailed {
        vm_id: vm_id.into(),
        jailer: workspace_bin("banger-jailer-fake").display().to_string(),
        exec_file: exec_file.display().to_string(),
        files: setup.files.clone(),
        cpus: 1,
        memory_mib: 256,
    }
}

fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir) && Path::new(m) != dir)
        .map(str::to_owned)
        .collect()
}

#[test]
fn spawn_jailed_refuses_what_it_must() {
    let helper = start_helper(false);
    let setup = setup(&helper);
    let socket = &helper.socket;
    // VM ids outside banger's format (the jail path is built from it).
    for bad in ["../../etc", "ABCDEF0123456789abcdef0123456789", "abc", ""] {
        refused(
            request(socket, spawn_op(&setup, bad, &setup.exec_file)),
            "not a banger VM id",
        );
        refused(
            request(socket, HelperOp::RemoveJail { vm_id: bad.into() }),
            "not a banger VM id",
        );
    }
    // A file outside the state dir, and a symlink inside it escaping.
    let outside = helper.dir.path().join("outside");
    std::fs::write(&outside, "secret").unwrap();
    let mut op = spawn_op(&setup, ID, &setup.exec_file);
    if let HelperOp::SpawnJailed { files, .. } = &mut op {
        files.kernel = outside.display().to_string();
    }
    refused(request(socket, op), "outside the state dir");
    let link = helper.state.join("vms").join(ID).join("escape");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let mut op = spawn_op(&setup, ID, &setup.exec_file);
    if let HelperOp::SpawnJailed { files, .. } = &mut op {
        files.system_disk = link.display().to_string();
    }
    refused(request(socket, op), "outside the state dir");
    // A directory is not a file to place.
    let mut op = spawn_op(&setup, ID, &setup.exec_file);
    if let HelperOp::SpawnJailed { files, .. } = &mut op {
        files.work_disk = helper.state.display().to_string();
    }
    refused(request(socket, op), "must be a regular file");
    // An exec file group or others may write, and one whose name lacks "firecracker".
    for mode in [0o775, 0o757] {
        std::fs::set_permissions(&setup.exec_file, std::fs::Permissions::from_mode(mode)).unwrap();
        refused(
            request(socket, spawn_op(&setup, ID, &setup.exec_file)),
            "root-owned regular file",
        );
    }
    std::fs::set_permissions(&setup.exec_file, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A root-owned exec file in a directory others may write (it could be swapped).
    let open_dir = helper.dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let exposed = open_dir.join("firecracker");
    std::fs::copy(&setup.exec_file, &exposed).unwrap();
    refused(
        request(socket, spawn_op(&setup, ID, &exposed)),
        "not writable by group or others",
    );
    let renamed = setup.exec_file.with_file_name("vmm");
    std::fs::copy(&setup.exec_file, &renamed).unwrap();
    refused(
        request(socket, spawn_op(&setup, ID, &renamed)),
        "contains \"firecracker\"",
    );
    // A relative jailer path.
    let mut op = spawn_op(&setup, ID, &setup.exec_file);
    if let HelperOp::SpawnJailed { jailer, .. } = &mut op {
        *jailer = "jailer".into();
    }
    refused(request(socket, op), "not an absolute path");
    // Nothing was built, and the helper still serves.
    assert_eq!(std::fs::read_dir(&helper.base).unwrap().count(), 0);
    assert!(matches!(
        request(socket, HelperOp::Hello),
        HelperReply::Ok { .. }
    ));
}

fn spawn_and_remove(tmpfs_base: bool) {
    let helper = start_helper(tmpfs_base);
    let setup = setup(&helper);
    let reply = request(&helper.socket, spawn_op(&setup, ID, &setup.exec_file));
    let (pid, root) = match reply {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, root },
        } => (pid, PathBuf::from(root)),
        other => panic!("{other:?}"),
    };
    assert_eq!(root, helper.base.join("firecracker").join(ID).join("root"));
    assert!(is_alive(pid));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(ID));
    // The files sit in the jail under their fixed names: the same inode (hard link) on
    // one file system, a bind mount across.
    let kernel = std::fs::metadata(root.join("vmlinux")).unwrap();
    let source = std::fs::metadata(&setup.files.kernel).unwrap();
    assert_eq!((kernel.dev(), kernel.ino()), (source.dev(), source.ino()));
    let mounts = mounts_under(&helper.base);
    if tmpfs_base {
        assert_eq!(mounts.len(), 4, "{mounts:?}");
    } else {
        assert!(mounts.is_empty(), "{mounts:?}");
    }
    for name in [
        "firecracker.log",
        "firecracker.metrics",
        "console.log",
        "system.raw",
        "work.ext4",
    ] {
        assert!(root.join(name).is_file(), "{name}");
    }
    // The API answers inside the jail.
    let mut stream = UnixStream::connect(root.join("run/firecracker.socket")).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(ID),
        "{answer}"
    );

    // The daemon's stop: the process ends, then the jail goes.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(pid) {
        assert!(Instant::now() < deadline, "still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
    let reply = request(&helper.socket, HelperOp::RemoveJail { vm_id: ID.into() });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(!helper.base.join("firecracker").join(ID).exists());
    assert!(mounts_under(&helper.base).is_empty());
    // The sources are untouched.
    assert_eq!(
        std::fs::read_to_string(&setup.files.kernel).unwrap(),
        "vmlinux"
    );
    assert_eq!(
        std::fs::read_to_string(&setup.files.work_disk).unwrap(),
        "work.ext4"
    );
    // Idempotent.
    let reply = request(&helper.socket, HelperOp::RemoveJail { vm_id: ID.into() });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
}

#[test]
fn spawn_jailed_with_hard_links_leaves_nothing() {
    spawn_and_remove(false);
}

#[test]
fn spawn_jailed_with_bind_mounts_leaves_nothing() {
    spawn_and_remove(true);
}

#[test]
fn a_failing_jailer_leaves_no_jail() {
    let helper = start_helper(false);
    let setup = setup(&helper);
    // The wrapper names a Firecracker that does not exist: the exec in the jail fails.
    std::fs::write(&setup.exec_file, "#!/bin/sh\nexit 3\n").unwrap();
    let reply = request(&helper.socket, spawn_op(&setup, ID, &setup.exec_file));
    refused(reply, "the jailer failed");
    assert_eq!(
        std::fs::read_dir(&helper.base)
            .unwrap()
            .flatten()
            .filter(|e| e.path().join(ID).exists())
            .count(),
        0
    );
    assert!(mounts_under(&helper.base).is_empty());

    // A jailer that fails before daemonizing: its last stderr line is the error.
    let jailer = setup.exec_file.with_file_name("jailer");
    std::fs::write(
        &jailer,
        "#!/bin/sh\necho 'Jailer error: boom' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut op = spawn_op(&setup, ID, &setup.exec_file);
    if let HelperOp::SpawnJailed { jailer: j, .. } = &mut op {
        *j = jailer.display().to_string();
    }
    refused(request(&helper.socket, op), "Jailer error: boom");
    assert!(!helper.base.join("firecracker").join(ID).exists());
}
