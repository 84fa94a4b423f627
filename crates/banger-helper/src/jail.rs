//! Firecracker's jailer, run as root for the owner: the jail's layout under the helper's own
//! base dir (`<base>/<exec file name>/<vm id>/root`, never a path from a request), the VM's
//! files placed in it, the `jailer` command line, and the removal of a jail (bind mounts
//! first). The jailer contract followed is Firecracker's docs/jailer.md: it creates (or reuses)
//! the chroot dir, copies the exec file into it, creates `/dev`, `/dev/net`, `/run` owned by
//! uid:gid, writes the `--cgroup` values, `--daemonize` makes it `setsid()` and point stdio at
//! /dev/null, then it execs Firecracker in place (same pid) after dropping to uid:gid.
//!
//! Every file placed in the jail is opened once (no final symlink followed), checked through
//! the opened descriptor (inside the state dir, a regular file, the owner's), and linked or
//! mounted from that descriptor, so swapping a path component after the check changes nothing.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_proto::helper::{
    JAIL_API_SOCKET, JAIL_CONSOLE, JAIL_INITRD, JAIL_KERNEL, JAIL_LOG, JAIL_METRICS,
    JAIL_SYSTEM_DISK, JAIL_WORK_DISK, JailFiles, is_vm_id,
};
use tracing::{info, warn};

use crate::validate::{self, Invalid};

/// cgroup v2 parent of every VM's cgroup (`--parent-cgroup`).
const PARENT_CGROUP: &str = "banger";
/// Memory the VMM needs beyond guest RAM (same figure as the daemon's own cgroup leaf).
const VMM_OVERHEAD_MIB: u64 = 128;
/// Bound on the API socket appearing in the jail.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Why a jail operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0:?} is not a banger VM id (32 lowercase hex digits)")]
    VmId(String),
    #[error(
        "{0:?} must be a root-owned regular file that group and others cannot write (the jailer runs it as root)"
    )]
    UnsafeBinary(String),
    #[error("{0:?} must be root-owned and not writable by group or others (or sticky)")]
    UnsafeDir(String),
    #[error("{0:?} must be a regular file owned by the helper's owner")]
    NotOwnersFile(String),
    #[error("{0:?}: the jailer only runs an exec file whose name contains \"firecracker\"")]
    ExecName(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the jailer failed: {0}")]
    Jailer(String),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Io { context, source }
}

/// The helper's jail settings.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// `--chroot-base-dir`, root-owned, made by the helper.
    pub base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// The cgroup v2 hierarchy when it offers cpu and memory (limits via `--cgroup`).
    pub cgroup_root: Option<PathBuf>,
}

/// The cgroup v2 hierarchy with the cpu and memory controllers, if any.
pub fn cgroup_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            std::fs::read_to_string(p.join("cgroup.controllers")).is_ok_and(|c| {
                let c: Vec<&str> = c.split_whitespace().collect();
                c.contains(&"cpu") && c.contains(&"memory")
            })
        })
}

/// A root-owned regular file nobody else may write; returns it resolved.
pub fn trusted_binary(text: &str) -> Result<PathBuf, JailError> {
    let unsafe_binary = || JailError::UnsafeBinary(text.to_owned());
    if !Path::new(text).is_absolute() {
        return Err(Invalid::PathShape(text.to_owned()).into());
    }
    let resolved = Path::new(text)
        .canonicalize()
        .map_err(|_| Invalid::PathMissing(text.to_owned()))?;
    let meta = std::fs::metadata(&resolved).map_err(|_| unsafe_binary())?;
    if !meta.is_file() || !root_controlled(&meta) {
        return Err(unsafe_binary());
    }
    // Nobody else may swap it either: every directory above is root's (or sticky, like /tmp,
    // where only a file's owner may rename it).
    for dir in resolved.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|_| unsafe_binary())?;
        let sticky = meta.permissions().mode() & 0o1000 != 0;
        if meta.uid() != 0 || (!sticky && !root_controlled(&meta)) {
            return Err(JailError::UnsafeDir(dir.display().to_string()));
        }
    }
    Ok(resolved)
}

/// Owned by root and not writable by group or others.
fn root_controlled(meta: &std::fs::Metadata) -> bool {
    meta.uid() == 0 && meta.permissions().mode() & 0o022 == 0
}

/// Opens a file of the owner inside the state dir `root` (canonical) for placing in a jail.
fn owners_file(text: &str, root: &Path, owner: u32) -> Result<File, JailError> {
    let resolved = validate::state_path(text, root)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&resolved)
        .map_err(io(format!("cannot open {}", resolved.display())))?;
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io(format!("cannot check {}", resolved.display())))?;
    validate::inside(text, &opened, root)?;
    let meta = file
        .metadata()
        .map_err(io(format!("cannot stat {}", resolved.display())))?;
    if !meta.is_file() || meta.uid() != owner {
        return Err(JailError::NotOwnersFile(text.to_owned()));
    }
    Ok(file)
}

/// The chroot dir the jailer builds for `exec_name` and `vm_id`.
pub fn chroot_dir(config: &JailConfig, exec_name: &str, vm_id: &str) -> PathBuf {
    config.base.join(exec_name).join(vm_id).join("root")
}

/// Places the opened `file` at `target`: a hard link when on the same file system, else an
/// empty file with the source bind-mounted on it.
fn place(file: &File, target: &Path) -> Result<(), JailError> {
    let source = format!("/proc/self/fd/{}", file.as_raw_fd());
    match nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        source.as_str(),
        nix::fcntl::AT_FDCWD,
        target,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    ) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EXDEV) => {}
        Err(e) => {
            return Err(JailError::Io {
                context: format!("cannot link into {}", target.display()),
                source: e.into(),
            });
        }
    }
    File::create(target).map_err(io(format!("cannot create {}", target.display())))?;
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| JailError::Io {
        context: format!("cannot bind-mount onto {}", target.display()),
        source: e.into(),
    })
}

/// A file the jailed process writes, made by the helper and given to uid:gid.
fn owned_empty(config: &JailConfig, path: &Path) -> Result<(), JailError> {
    File::create(path).map_err(io(format!("cannot create {}", path.display())))?;
    std::os::unix::fs::chown(path, Some(config.uid), Some(config.gid))
        .map_err(io(format!("cannot chown {}", path.display())))
}

/// What the helper was asked for, validated.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub vm_id: &'a str,
    pub jailer: &'a str,
    pub exec_file: &'a str,
    pub files: &'a JailFiles,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// Builds the jail, runs the jailer and waits for the API socket. Returns the pid and the
/// jail's root. On error nothing is left behind.
pub fn spawn(
    config: &JailConfig,
    state_dir: &Path,
    request: &SpawnRequest<'_>,
) -> Result<(u32, PathBuf), JailError> {
    let vm_id = request.vm_id;
    if !is_vm_id(vm_id) {
        return Err(JailError::VmId(vm_id.to_owned()));
    }
    let jailer = trusted_binary(request.jailer)?;
    let exec_file = trusted_binary(request.exec_file)?;
    let exec_name = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.contains("firecracker"))
        .ok_or_else(|| JailError::ExecName(request.exec_file.to_owned()))?
        .to_owned();
    let root = state_dir
        .canonicalize()
        .map_err(|_| Invalid::PathMissing(state_dir.display().to_string()))?;
    let files = request.files;
    let mut placed = vec![
        (owners_file(&files.kernel, &root, config.uid)?, JAIL_KERNEL),
        (
            owners_file(&files.system_disk, &root, config.uid)?,
            JAIL_SYSTEM_DISK,
        ),
        (
            owners_file(&files.work_disk, &root, config.uid)?,
            JAIL_WORK_DISK,
        ),
        (
            owners_file(&files.console_log, &root, config.uid)?,
            JAIL_CONSOLE,
        ),
    ];
    if let Some(initrd) = &files.initrd {
        placed.push((owners_file(initrd, &root, config.uid)?, JAIL_INITRD));
    }
    // A jail left by a crash is removed first: the jailer reuses an existing dir.
    remove(config, vm_id)?;
    let chroot = chroot_dir(config, &exec_name, vm_id);
    let built = build(config, &chroot, &placed)
        .and_then(|()| run_jailer(config, &jailer, &exec_file, &chroot, request));
    match built {
        Ok(pid) => Ok((pid, chroot)),
        Err(e) => {
            if let Err(cleanup) = remove(config, vm_id) {
                warn!(vm_id, "cannot remove the failed jail: {cleanup}");
            }
            Err(e)
        }
    }
}

fn build(config: &JailConfig, chroot: &Path, placed: &[(File, &str)]) -> Result<(), JailError> {
    std::fs::create_dir_all(&config.base)
        .map_err(io(format!("cannot create {}", config.base.display())))?;
    std::fs::set_permissions(&config.base, std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("cannot chmod {}", config.base.display())))?;
    // Root builds the jail in it: nobody else may have placed or may swap anything there.
    let meta = std::fs::symlink_metadata(&config.base)
        .map_err(io(format!("cannot stat {}", config.base.display())))?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(JailError::UnsafeDir(config.base.display().to_string()));
    }
    std::fs::create_dir_all(chroot).map_err(io(format!("cannot create {}", chroot.display())))?;
    for (file, name) in placed {
        place(file, &chroot.join(name.trim_start_matches('/')))?;
    }
    for name in [JAIL_LOG, JAIL_METRICS] {
        owned_empty(config, &chroot.join(name.trim_start_matches('/')))?;
    }
    Ok(())
}

/// The jailer's arguments (pure; the test reads it).
pub fn jailer_args(
    config: &JailConfig,
    vm_id: &str,
    exec_file: &Path,
    request: &SpawnRequest<'_>,
) -> Vec<String> {
    let mut args = vec![
        "--id".to_owned(),
        vm_id.to_owned(),
        "--exec-file".into(),
        exec_file.display().to_string(),
        "--uid".into(),
        config.uid.to_string(),
        "--gid".into(),
        config.gid.to_string(),
        "--chroot-base-dir".into(),
        config.base.display().to_string(),
        "--cgroup-version".into(),
        "2".into(),
    ];
    if config.cgroup_root.is_some() {
        args.extend([
            "--parent-cgroup".into(),
            PARENT_CGROUP.into(),
            "--cgroup".into(),
            format!("cpu.max={} 100000", u64::from(request.cpus) * 100_000),
            "--cgroup".into(),
            format!(
                "memory.max={}",
                (request.memory_mib + VMM_OVERHEAD_MIB) << 20
            ),
        ]);
    }
    args.extend([
        "--daemonize".into(),
        "--".into(),
        "--api-sock".into(),
        JAIL_API_SOCKET.into(),
    ]);
    args
}

/// Runs the jailer; returns the pid once the API socket exists. The jailer execs Firecracker
/// in place, so its pid is Firecracker's; it stays this helper's child, reaped by a thread.
fn run_jailer(
    config: &JailConfig,
    jailer: &Path,
    exec_file: &Path,
    chroot: &Path,
    request: &SpawnRequest<'_>,
) -> Result<u32, JailError> {
    let args = jailer_args(config, request.vm_id, exec_file, request);
    info!(jailer = %jailer.display(), args = ?args, "running the jailer");
    // Not a process group leader: `--daemonize` calls setsid(), which a leader cannot.
    // The jailer clears the environment itself before exec'ing Firecracker.
    let mut child = Command::new(jailer)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("cannot run {}", jailer.display())))?;
    let pid = child.id();
    // The pipe ends when the jailer daemonizes (stderr → /dev/null) or exits; read on a
    // thread so a jailer that hangs cannot hold this one past the deadline.
    let (sender, receiver) = std::sync::mpsc::channel();
    if let Some(mut pipe) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = sender.send(text);
        });
    }
    let socket = chroot.join(JAIL_API_SOCKET.trim_start_matches('/'));
    let deadline = Instant::now() + SOCKET_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = receiver
                .recv_timeout(Duration::from_secs(1))
                .unwrap_or_default();
            let text = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned();
            return Err(JailError::Jailer(if text.is_empty() {
                status.to_string()
            } else {
                text
            }));
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(JailError::Jailer(format!(
                "no API socket {} within {}s",
                socket.display(),
                SOCKET_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// Removes every jail of `vm_id` under the base (any exec file name): unmounts what is
/// mounted inside, deletes the tree, and removes the VM's cgroup.
pub fn remove(config: &JailConfig, vm_id: &str) -> Result<(), JailError> {
    if !is_vm_id(vm_id) {
        return Err(JailError::VmId(vm_id.to_owned()));
    }
    let Ok(entries) = std::fs::read_dir(&config.base) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let dir = entry.path().join(vm_id);
        if std::fs::symlink_metadata(&dir).is_err() {
            continue;
        }
        for mount in mounts_under(&dir) {
            nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                JailError::Io {
                    context: format!("cannot unmount {}", mount.display()),
                    source: e.into(),
                }
            })?;
        }
        std::fs::remove_dir_all(&dir).map_err(io(format!("cannot remove {}", dir.display())))?;
        info!(jail = %dir.display(), "jail removed");
    }
    if let Some(root) = &config.cgroup_root {
        let _ = std::fs::remove_dir(root.join(PARENT_CGROUP).join(vm_id));
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(Ok(v)) = field.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_jailer_gets_the_documented_arguments() {
        let files = JailFiles {
            kernel: "/k".into(),
            initrd: None,
            system_disk: "/s".into(),
            work_disk: "/w".into(),
            console_log: "/c".into(),
        };
        let request = SpawnRequest {
            vm_id: "0123456789abcdef0123456789abcdef",
            jailer: "/usr/bin/jailer",
            exec_file: "/usr/bin/firecracker",
            files: &files,
            cpus: 2,
            memory_mib: 1024,
        };
        let mut config = JailConfig {
            base: "/srv/banger-jail/1000".into(),
            uid: 1000,
            gid: 100,
            cgroup_root: None,
        };
        let exec = Path::new("/usr/bin/firecracker");
        let args = jailer_args(&config, request.vm_id, exec, &request).join(" ");
        assert_eq!(
            args,
            "--id 0123456789abcdef0123456789abcdef --exec-file /usr/bin/firecracker \
             --uid 1000 --gid 100 --chroot-base-dir /srv/banger-jail/1000 --cgroup-version 2 \
             --daemonize -- --api-sock /run/firecracker.socket"
        );
        config.cgroup_root = Some("/sys/fs/cgroup".into());
        let args = jailer_args(&config, request.vm_id, exec, &request).join(" ");
        assert!(
            args.contains(
                "--parent-cgroup banger --cgroup cpu.max=200000 100000 --cgroup memory.max=1207959552"
            ),
            "{args}"
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path("/srv/a\\040b/root"),
            PathBuf::from("/srv/a b/root")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }
}
