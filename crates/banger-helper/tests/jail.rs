//! `spawn_jailed` / `remove_jail` of the real helper (as root, owner uid 0) with the jailer and
//! Firecracker of its own configuration: the real binaries when `JAILER_BIN` and
//! `FIRECRACKER_BIN` are set (a line on stderr says so; their API answers here, only a guest
//! cannot boot), else the fake jailer (`banger-jailer-fake`, held to the real jailer's
//! behaviour) and the fake Firecracker (a visible SKIP line says the real ones were not run).
//! Refusals of a bad vm id, files outside the state dir or through a symlink, binaries others
//! may write (at the start and after it), a VM cgroup that exists already; a spawn + removal
//! that leaves nothing behind (no process, mount, jail dir or cgroup), the files bind-mounted
//! into a jail on the helper's own tmpfs (taken over by a restarted helper; a base with
//! another mount refused); a removal that unmounts only the helper's own names, through no
//! symlink; a failing start that leaves no live Firecracker; the shipped systemd units with the
//! jailer drop-in, emulated (socket activation, bounding set). Needs root and `cargo build --workspace --bins` (the fakes are another
//! crate's binaries).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use banger_proto::helper::{HelperOp, HelperReply, HelperResult, JailFiles};

/// A VM id unique to this test process and call (jails and cgroups are host-wide).
fn vm_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:08x}{:024x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

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

/// The jailer and Firecracker the helper runs: the real ones from `JAILER_BIN` and
/// `FIRECRACKER_BIN` when both are set, else the fakes (a wrapper named `firecracker` in a
/// root-owned dir of `dir`, since the jailer only runs an exec file of that name).
fn binaries(dir: &Path) -> (PathBuf, PathBuf, bool) {
    if let (Some(jailer), Some(firecracker)) = (
        std::env::var_os("JAILER_BIN"),
        std::env::var_os("FIRECRACKER_BIN"),
    ) {
        banger_shared::skip::announce_real(
            "helper jail tests",
            &format!(
                "the real jailer {} and Firecracker {}",
                jailer.to_string_lossy(),
                firecracker.to_string_lossy()
            ),
        );
        return (jailer.into(), firecracker.into(), true);
    }
    banger_shared::skip::report(
        "helper jail tests against the real jailer/Firecracker",
        "JAILER_BIN and FIRECRACKER_BIN are not set; the fakes ran instead",
    );
    let bin = dir.join("bin");
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
    (workspace_bin("banger-jailer-fake"), exec_file, false)
}

/// The common helper with a jail base (`--jail-base`, the helper's own tmpfs).
struct Helper {
    inner: common::Helper,
    base: PathBuf,
    exec_file: PathBuf,
    real: bool,
}

impl std::ops::Deref for Helper {
    type Target = common::Helper;
    fn deref(&self) -> &common::Helper {
        &self.inner
    }
}

fn start_helper() -> Helper {
    start_with(None)
}

/// The helper with the test's binaries, or with `jailer` instead of the chosen jailer.
fn start_with(jailer: Option<&Path>) -> Helper {
    start_in(common::temp_dir("bgj"), jailer)
}

/// [`start_with`] in `dir` (its jail base `<dir>/jail`).
fn start_in(dir: tempfile::TempDir, jailer: Option<&Path>) -> Helper {
    let base = dir.path().join("jail");
    let (chosen, exec_file, real) = binaries(dir.path());
    let jailer = jailer.map_or(chosen, Path::to_path_buf);
    let inner = common::start(
        dir,
        &[],
        &[
            "--jail-base".as_ref(),
            base.as_os_str(),
            "--jailer".as_ref(),
            jailer.as_os_str(),
            "--firecracker".as_ref(),
            exec_file.as_os_str(),
        ],
    );
    Helper {
        inner,
        base,
        exec_file,
        real,
    }
}

/// The VM's files in the state dir.
fn setup(helper: &Helper, vm_id: &str) -> JailFiles {
    let vm = helper.state.join("vms").join(vm_id);
    std::fs::create_dir_all(&vm).unwrap();
    for name in ["vmlinux", "system.raw", "work.ext4", "console.log"] {
        std::fs::write(vm.join(name), name).unwrap();
    }
    std::fs::write(vm.join("firecracker.log"), "").unwrap();
    let text = |n: &str| vm.join(n).display().to_string();
    JailFiles {
        kernel: text("vmlinux"),
        initrd: None,
        system_disk: text("system.raw"),
        work_disk: text("work.ext4"),
        console_log: text("console.log"),
        log: Some(text("firecracker.log")),
    }
}

fn spawn_op(files: &JailFiles, vm_id: &str) -> HelperOp {
    HelperOp::SpawnJailed {
        vm_id: vm_id.into(),
        files: files.clone(),
        cpus: 1,
        memory_mib: 256,
    }
}

/// The cgroup dirs a VM of owner 0 may have on this host (v1 cpu/memory or v2).
fn cgroup_dirs(vm_id: &str) -> Vec<PathBuf> {
    [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
    ]
    .iter()
    .map(|h| Path::new(h).join("banger-0").join(vm_id))
    .collect()
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
    let helper = start_helper();
    let id = vm_id();
    let files = setup(&helper, &id);
    let socket = &helper.socket;
    // VM ids outside banger's format (the jail path is built from it).
    for bad in ["../../etc", "ABCDEF0123456789abcdef0123456789", "abc", ""] {
        refused(request(socket, spawn_op(&files, bad)), "not a banger VM id");
        refused(
            request(socket, HelperOp::RemoveJail { vm_id: bad.into() }),
            "not a banger VM id",
        );
    }
    // A file outside the state dir, a symlink inside it (escaping or not), a directory.
    let outside = helper.dir.path().join("outside");
    std::fs::write(&outside, "secret").unwrap();
    let link = helper.state.join("vms").join(&id).join("escape");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let inner_link = helper.state.join("vms").join(&id).join("kernel-link");
    std::os::unix::fs::symlink("vmlinux", &inner_link).unwrap();
    for (path, needle) in [
        (outside.clone(), "outside the state dir"),
        (link, "not a regular file of the owner"),
        (inner_link, "not a regular file of the owner"),
        (helper.state.clone(), "not a regular file of the owner"),
        (helper.state.join("vms"), "not a regular file of the owner"),
    ] {
        let mut files = files.clone();
        files.system_disk = path.display().to_string();
        refused(request(socket, spawn_op(&files, &id)), needle);
    }
    // Limits that would wrap.
    refused(
        request(
            socket,
            HelperOp::SpawnJailed {
                vm_id: id.clone(),
                files: files.clone(),
                cpus: 1,
                memory_mib: u64::MAX,
            },
        ),
        "do not fit a cgroup limit",
    );
    if !helper.real {
        // The configured exec file made writable by others after the start: refused at use.
        std::fs::set_permissions(&helper.exec_file, std::fs::Permissions::from_mode(0o757))
            .unwrap();
        refused(
            request(socket, spawn_op(&files, &id)),
            "root-owned regular file",
        );
        std::fs::set_permissions(&helper.exec_file, std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    // A VM cgroup that exists already (e.g. made by someone else) is refused, not reused:
    // in the hierarchy the helper uses on this host (v2 with cpu+memory, else v1 memory).
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let hierarchy = if v2.exists() {
        let text = std::fs::read_to_string(v2).unwrap();
        let controllers: Vec<&str> = text.split_whitespace().collect();
        (controllers.contains(&"cpu") && controllers.contains(&"memory"))
            .then(|| PathBuf::from("/sys/fs/cgroup"))
    } else {
        Some(PathBuf::from("/sys/fs/cgroup/memory")).filter(|h| h.join("cgroup.procs").exists())
    };
    match hierarchy {
        Some(hierarchy) => {
            let dir = hierarchy.join("banger-0").join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            let reply = request(socket, spawn_op(&files, &id));
            // A wrong acceptance must not leave a Firecracker behind.
            let _guard = match &reply {
                HelperReply::Ok {
                    result: HelperResult::Jailed { pid, .. },
                } => Some(KillOnDrop(*pid)),
                _ => None,
            };
            let exists = dir.exists();
            let _ = std::fs::remove_dir(&dir);
            refused(reply, "exists already");
            assert!(exists, "the existing cgroup was left alone");
        }
        None => banger_shared::skip::report(
            "existing cgroup refused",
            "no cgroup hierarchy with the cpu and memory controllers here",
        ),
    }
    // Nothing was built, and the helper still serves.
    assert_eq!(
        std::fs::read_dir(&helper.base)
            .unwrap()
            .flatten()
            .filter(|e| e.path().join(&id).exists())
            .count(),
        0
    );
    assert!(matches!(
        request(socket, HelperOp::Hello),
        HelperReply::Ok { .. }
    ));
}

#[test]
fn a_helper_with_unsafe_binaries_does_not_start() {
    let dir = common::temp_dir("bgjb");
    let (jailer, exec_file, _) = binaries(dir.path());
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let exposed = open_dir.join("firecracker");
    std::fs::copy(&exec_file, &exposed).unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    let writable = dir.path().join("bin/firecracker-w");
    std::fs::copy(&exec_file, &writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o775)).unwrap();
    let renamed = dir.path().join("bin/vmm");
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::copy(&exec_file, &renamed).unwrap();
    for (jailer, exec, needle) in [
        (jailer.clone(), exposed, "not writable by group or others"),
        (jailer.clone(), writable, "root-owned regular file"),
        (jailer.clone(), renamed, "contains \"firecracker\""),
        (
            PathBuf::from("jailer"),
            exec_file.clone(),
            "not an absolute path",
        ),
        (
            exec_file.clone(),
            PathBuf::from("/nonexistent/firecracker"),
            "root-owned regular file",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_banger-helper"))
            .args(["--foreground", "--owner", "0", "--socket"])
            .arg(dir.path().join("h.sock"))
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--record-dir")
            .arg(dir.path().join("records"))
            .arg("--jailer")
            .arg(&jailer)
            .arg("--firecracker")
            .arg(&exec)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
        assert!(!dir.path().join("h.sock").exists());
    }
}

#[test]
fn spawn_jailed_leaves_nothing() {
    let helper = start_helper();
    let id = vm_id();
    let files = setup(&helper, &id);
    let reply = request(&helper.socket, spawn_op(&files, &id));
    let (pid, root) = match reply {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, root },
        } => (pid, PathBuf::from(root)),
        other => panic!("{other:?}\n{}", common::log(&helper)),
    };
    let _guard = KillOnDrop(pid);
    assert_eq!(root, helper.base.join("firecracker").join(&id).join("root"));
    assert!(is_alive(pid));
    // The pid is Firecracker's own (the jailer exec'd it in place), in its own session.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains(&id), "{cmdline}");
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
    assert_eq!(sid.as_raw(), pid as i32, "a session leader");
    // The files sit in the jail under their fixed names, bind-mounted (the jail base is the
    // helper's own tmpfs, so a hard link cannot cross).
    let kernel = std::fs::metadata(root.join("vmlinux")).unwrap();
    let source = std::fs::metadata(&files.kernel).unwrap();
    assert_eq!((kernel.dev(), kernel.ino()), (source.dev(), source.ino()));
    let mounts = mounts_under(&helper.base);
    assert_eq!(mounts.len(), 5, "{mounts:?}");
    // Nobody but root lists the VM ids.
    for dir in [
        helper.base.clone(),
        helper.base.join("firecracker"),
        helper.base.join("firecracker").join(&id),
    ] {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o711, "{}", dir.display());
        assert_eq!(meta.uid(), 0);
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
    let answer = http_get(&root.join("run/firecracker.socket"));
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(&id),
        "{answer}"
    );
    let cgroups: Vec<PathBuf> = cgroup_dirs(&id)
        .into_iter()
        .filter(|d| d.exists())
        .collect();
    if helper.real {
        // The real jailer placed it under the per-owner parent with the VM's limits.
        eprintln!("cgroups of the jailed VM: {cgroups:?}");
        assert!(!cgroups.is_empty() || !Path::new("/sys/fs/cgroup/memory").exists());
        for dir in &cgroups {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");
            for (file, want) in [
                ("memory.limit_in_bytes", ((256u64 + 128) << 20).to_string()),
                ("memory.max", ((256u64 + 128) << 20).to_string()),
                ("cpu.cfs_quota_us", "100000".to_owned()),
            ] {
                if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
                    assert_eq!(value.trim(), want, "{file}");
                }
            }
        }
    }

    // The daemon's stop: the process ends, then the jail goes.
    kill_and_remove_jail(&helper, pid, &id);
    // The sources are untouched.
    assert_eq!(std::fs::read_to_string(&files.kernel).unwrap(), "vmlinux");
    assert_eq!(
        std::fs::read_to_string(&files.work_disk).unwrap(),
        "work.ext4"
    );
    // Idempotent.
    let reply = request(&helper.socket, HelperOp::RemoveJail { vm_id: id });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
}

/// Kills a jailed Firecracker when the test ends early (a failed assertion).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if is_alive(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `GET /` on an API socket: the status line, headers and the body of its Content-Length
/// (Firecracker keeps the connection open).
fn http_get(socket: &Path) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            return String::from_utf8_lossy(&got).into_owned();
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// Live processes whose command line names `id`.
fn banger_processes(id: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(id) && is_alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// The topmost mount on `dir`: (fs type, source, options), from mountinfo.
fn mount_on(dir: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == dir))
        .map(|l| {
            let opts = l.split(' ').nth(5).unwrap().to_owned();
            let (_, tail) = l.split_once(" - ").unwrap();
            let mut f = tail.split(' ');
            (f.next().unwrap().into(), f.next().unwrap().into(), opts)
        })
        .collect()
}

/// The jail base is the helper's own tmpfs (nosuid, devices allowed); a restarted helper
/// takes it over with its live jails (no second mount on top); a base with any other mount
/// is refused at the start.
#[test]
fn the_jail_base_is_the_helpers_own_tmpfs() {
    let first = start_helper();
    let mounts = mount_on(&first.base);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let (fs, source, opts) = &mounts[0];
    assert_eq!((fs.as_str(), source.as_str()), ("tmpfs", "banger-jail-0"));
    assert!(opts.split(',').any(|o| o == "nosuid"), "{opts}");
    assert!(!opts.split(',').any(|o| o == "nodev"), "{opts}");
    let id = vm_id();
    let files = setup(&first, &id);
    let pid = match request(&first.socket, spawn_op(&files, &id)) {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, .. },
        } => pid,
        other => panic!("{other:?}\n{}", common::log(&first)),
    };
    let _guard = KillOnDrop(pid);
    // The helper restarts (its VM lives on): the same base, no mount on top.
    let mut first = first;
    first.inner.stop();
    assert!(is_alive(pid));
    let (jailer, exec_file, _) = binaries(first.dir.path());
    let second = common::start(
        common::temp_dir("bgj2"),
        &[],
        &[
            "--jail-base".as_ref(),
            first.base.as_os_str(),
            "--jailer".as_ref(),
            jailer.as_os_str(),
            "--firecracker".as_ref(),
            exec_file.as_os_str(),
        ],
    );
    assert_eq!(mount_on(&first.base).len(), 1);
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
    let reply = request(&second.socket, HelperOp::RemoveJail { vm_id: id.clone() });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(!first.base.join("firecracker").join(&id).exists());
    assert!(mounts_under(&first.base).is_empty());
    drop(second);
    drop(first);

    // A base with a mount that is not the helper's: refused, nothing mounted on top.
    let dir = common::temp_dir("bgjm");
    let base = dir.path().join("jail");
    mount_tmpfs("bgj-foreign", &base);
    let _unmount = Unmount(base.clone());
    let (jailer, exec_file, _) = binaries(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_banger-helper"))
        .args(["--foreground", "--owner", "0", "--socket"])
        .arg(dir.path().join("h.sock"))
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--record-dir")
        .arg(dir.path().join("records"))
        .arg("--jail-base")
        .arg(&base)
        .arg("--jailer")
        .arg(&jailer)
        .arg("--firecracker")
        .arg(&exec_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not the helper's own tmpfs (tmpfs from bgj-foreign)"),
        "{stderr}"
    );
    assert_eq!(mount_on(&base).len(), 1);
}

#[test]
fn a_failing_jailer_leaves_no_jail_and_no_firecracker() {
    // A jailer whose Firecracker exits at once.
    let helper = start_helper();
    let id = vm_id();
    let files = setup(&helper, &id);
    if !helper.real {
        std::fs::write(
            &helper.exec_file,
            "#!/bin/sh\necho 'fc: cannot start' >&2\nexit 3\n",
        )
        .unwrap();
        let message = refused(
            request(&helper.socket, spawn_op(&files, &id)),
            "the jailer failed",
        );
        assert!(message.contains("fc: cannot start"), "{message}");
        assert!(!helper.base.join("firecracker").join(&id).exists());
        assert!(mounts_under(&helper.base).is_empty());
    }
    drop(helper);

    // A jailer that fails before exec'ing: its last stderr line is the error.
    let dir = common::temp_dir("bgjf");
    let jailer = dir.path().join("jailer");
    std::fs::write(
        &jailer,
        "#!/bin/sh\necho 'Jailer error: boom' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).unwrap();
    let helper = start_with(Some(&jailer));
    let files = setup(&helper, &id);
    refused(
        request(&helper.socket, spawn_op(&files, &id)),
        "Jailer error: boom",
    );
    assert!(!helper.base.join("firecracker").join(&id).exists());

    // A jailer that daemonizes the old way (forks, exits 0 at once, Firecracker a
    // grandchild): refused, and the grandchild named by the pid file is killed.
    let forking = dir.path().join("jailer-forking");
    std::fs::write(
        &forking,
        format!(
            "#!/bin/sh\nexec {} --daemonize \"$@\"\n",
            workspace_bin("banger-jailer-fake").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&forking, std::fs::Permissions::from_mode(0o755)).unwrap();
    let helper = start_with(Some(&forking));
    let files = setup(&helper, &id);
    let reply = request(&helper.socket, spawn_op(&files, &id));
    refused(reply, "the jailer failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !banger_processes(&id).is_empty() {
        let left = banger_processes(&id);
        assert!(
            Instant::now() < deadline,
            "a Firecracker was left: {:?} {:?}\n{}",
            left,
            left.iter()
                .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default())
                .collect::<Vec<_>>(),
            common::log(&helper)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!helper.base.join("firecracker").join(&id).exists());
}

fn mount_tmpfs(source: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", source])
        .arg(dir)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs on {}", dir.display());
}

fn is_mount_point(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == dir)
}

/// The owner swaps one of the jail's placed names for a symlink to a mount elsewhere, and
/// mounts something of its own inside the jail (a FUSE mount in the review; a tmpfs here):
/// `remove_jail` unmounts neither the symlink's target nor the owner's mount (it refuses to
/// remove the jail while that is there), then removes the jail once it is gone.
#[test]
fn remove_jail_unmounts_only_its_own_names_and_follows_no_symlink() {
    let helper = start_helper();
    let id = vm_id();
    let files = setup(&helper, &id);
    let (pid, root) = match request(&helper.socket, spawn_op(&files, &id)) {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, root },
        } => (pid, PathBuf::from(root)),
        other => panic!("{other:?}\n{}", common::log(&helper)),
    };
    let _guard = KillOnDrop(pid);
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
    // A mount outside the jail that a redirected unmount would hit.
    let victim = helper.dir.path().join("victim");
    mount_tmpfs("bgj-victim", &victim);
    std::fs::write(victim.join("kept"), "kept").unwrap();
    let cleanup = scopeguard(&victim);
    // The placed system disk, once unmounted, swapped for a symlink to the victim.
    let placed = root.join("system.raw");
    assert!(is_mount_point(&placed), "system.raw is bind-mounted");
    let ok = Command::new("umount").arg(&placed).status().unwrap();
    assert!(ok.success());
    std::fs::remove_file(&placed).unwrap();
    std::os::unix::fs::symlink(&victim, &placed).unwrap();
    // The owner's own mount deep in the jail.
    let owners = root.join("a/b");
    mount_tmpfs("bgj-owner", &owners);
    let _owners_cleanup = scopeguard(&owners);

    refused(
        request(&helper.socket, HelperOp::RemoveJail { vm_id: id.clone() }),
        "a mount the helper did not make",
    );
    assert!(
        is_mount_point(&victim),
        "the symlink's target was unmounted"
    );
    assert!(victim.join("kept").is_file());
    assert!(is_mount_point(&owners), "the owner's mount was unmounted");
    assert!(helper.base.join("firecracker").join(&id).exists());

    let ok = Command::new("umount").arg(&owners).status().unwrap();
    assert!(ok.success());
    let reply = request(&helper.socket, HelperOp::RemoveJail { vm_id: id.clone() });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(!helper.base.join("firecracker").join(&id).exists());
    assert!(
        is_mount_point(&victim),
        "the symlink's target was unmounted"
    );
    assert!(victim.join("kept").is_file());
    drop(cleanup);
}

/// Lazily unmounts `dir` (every mount stacked there) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while is_mount_point(&self.0) {
            if !Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                break;
            }
        }
    }
}

fn scopeguard(dir: &Path) -> Unmount {
    Unmount(dir.to_path_buf())
}

/// The helper as systemd would run it from the shipped units with the jailer drop-in (the
/// paths substituted as `banger helper install --jailer --firecracker` writes them): the
/// merged `ExecStart`, socket activation (`systemd-socket-activate`, the sd_listen_fds
/// protocol of `banger-helper@.socket`), `NoNewPrivileges` and the union of the
/// `CapabilityBoundingSet` lines (`setpriv`). Under exactly that it jails a Firecracker whose
/// API answers and removes the jail, leaving nothing. What systemd adds beyond these
/// (`ProtectSystem`, which the drop-in turns off, and `KillMode`) is not emulated.
#[test]
fn the_shipped_units_with_the_jailer_drop_in_run_the_jailer() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let service = std::fs::read_to_string(units.join("banger-helper@.service")).unwrap();
    let drop_in = std::fs::read_to_string(units.join("banger-helper-jailer.conf")).unwrap();
    let unit = merged_service(&[&service, &drop_in]);

    let dir = common::temp_dir("bgu");
    let (jailer, exec_file, real) = binaries(dir.path());
    let helper_bin = env!("CARGO_BIN_EXE_banger-helper");
    let exec_start = unit.exec_start.expect("the units name an ExecStart");
    let mut args: Vec<String> = exec_start
        .split_whitespace()
        .map(|a| {
            a.replace("%i", "0")
                .replace("/usr/local/bin/banger-helper", helper_bin)
                .replace("/usr/local/bin/jailer", &jailer.display().to_string())
                .replace(
                    "/usr/local/bin/firecracker",
                    &exec_file.display().to_string(),
                )
        })
        .collect();
    assert_eq!(args[0], helper_bin, "{exec_start}");
    assert!(
        args.windows(2).any(|w| w[0] == "--jailer")
            && args.windows(2).any(|w| w[0] == "--firecracker"),
        "the drop-in pins the jailer and Firecracker: {exec_start}"
    );
    assert!(unit.no_new_privileges, "NoNewPrivileges=yes is lost");
    // The test's own locations (systemd's defaults are under /run and the owner's home).
    let state = dir.path().join("state");
    let base = dir.path().join("jail");
    std::fs::create_dir_all(&state).unwrap();
    for (flag, path) in [
        ("--state-dir", &state),
        ("--record-dir", &dir.path().join("records")),
        ("--jail-base", &base),
    ] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    let bounding: Vec<String> = unit
        .capabilities
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let socket = dir.path().join("helper.sock");
    let log = std::fs::File::create(dir.path().join("helper.log")).unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .args(["setpriv", "--no-new-privs", "--bounding-set"])
        .arg(format!("-all,{}", bounding.join(",")))
        .arg("--")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (package systemd) and setpriv (util-linux)");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let helper = Helper {
        inner: common::Helper {
            child,
            socket: socket.clone(),
            state: state.canonicalize().unwrap(),
            dir,
        },
        base,
        exec_file,
        real,
    };

    let id = vm_id();
    let files = setup(&helper, &id);
    // The first connection starts the helper (socket activation).
    let reply = request(&helper.socket, spawn_op(&files, &id));
    let (vm_pid, root) = match reply {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, root },
        } => (pid, PathBuf::from(root)),
        other => panic!("{other:?}\n{}", common::log(&helper)),
    };
    let _guard = KillOnDrop(vm_pid);
    // The helper runs with the units' bounding set, no more.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap_bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // Capped by what this process may hold (a container may lack some, as under systemd).
    let ours = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let want = unit
        .capabilities
        .iter()
        .fold(0u64, |mask, c| mask | 1 << capability_number(c));
    assert_eq!(cap_bnd, want & ours, "the helper's bounding set");
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    let answer = http_get(&root.join("run/firecracker.socket"));
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(&id),
        "{answer}"
    );

    kill_and_remove_jail(&helper, vm_pid, &id);
}

/// The daemon's stop of jailed VM `id`: its Firecracker `pid` killed and gone, then the jail
/// removed, leaving no jail dir, mount, cgroup or process.
fn kill_and_remove_jail(helper: &Helper, pid: u32, id: &str) {
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
    let reply = request(&helper.socket, HelperOp::RemoveJail { vm_id: id.into() });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(!helper.base.join("firecracker").join(id).exists());
    assert!(mounts_under(&helper.base).is_empty());
    for dir in cgroup_dirs(id) {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    assert!(banger_processes(id).is_empty());
}

/// What the test reads of a service unit and its drop-ins, merged as systemd merges them.
struct MergedService {
    /// The last `ExecStart`, after an empty assignment reset the list.
    exec_start: Option<String>,
    /// The union of every `CapabilityBoundingSet` line.
    capabilities: Vec<String>,
    no_new_privileges: bool,
}

fn merged_service(texts: &[&str]) -> MergedService {
    let mut merged = MergedService {
        exec_start: None,
        capabilities: Vec::new(),
        no_new_privileges: false,
    };
    for text in texts {
        // Continuation lines (a trailing backslash) join the next line.
        let joined = text.replace("\\\n", " ");
        for line in joined.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "ExecStart" if value.is_empty() => merged.exec_start = None,
                "ExecStart" => merged.exec_start = Some(value.to_owned()),
                "CapabilityBoundingSet" => {
                    for cap in value.split_whitespace() {
                        if !merged.capabilities.iter().any(|c| c == cap) {
                            merged.capabilities.push(cap.to_owned());
                        }
                    }
                }
                "NoNewPrivileges" => merged.no_new_privileges = value == "yes",
                _ => {}
            }
        }
    }
    merged
}

/// The bit of a capability named in a unit (linux/capability.h).
fn capability_number(name: &str) -> u32 {
    match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_FOWNER" => 3,
        "CAP_KILL" => 5,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_CHROOT" => 18,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_MKNOD" => 27,
        other => panic!("capability {other} is not in this test's table"),
    }
}
