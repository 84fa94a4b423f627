//! Firecracker's jailer, run as root for the owner: the jail's layout under the helper's own
//! base dir (`<base>/<exec file name>/<vm id>/root`, never a path from a request), the VM's
//! files placed in it, the `jailer` command line, and the removal of a jail (bind mounts
//! first) and of its cgroup. The jailer and Firecracker binaries are the helper's own
//! configuration (`--jailer`, `--firecracker`), checked root-owned and not writable by
//! anyone else (nor any directory above them) at every start; a request never names them.
//!
//! The jailer contract followed is Firecracker's docs/jailer.md as the real jailer (v1.17)
//! behaves: it creates (or reuses) the chroot dir, copies the exec file into it, creates
//! `/dev`, `/dev/net`, `/run` owned by uid:gid, writes `<chroot>/<exec name>.pid`, places
//! itself in the `--cgroup` cgroups under `--parent-cgroup`, then execs Firecracker in place
//! (same pid) after dropping to uid:gid. `--daemonize` is not used: since Firecracker v1.6 it
//! forks (the jailer's pid exits at once and Firecracker runs as a grandchild). The helper
//! starts the jailer in a new session itself (`setsid()` before exec), stdin/stdout on
//! /dev/null and stderr on `<base>/<exec name>/<vm id>/jailer.stderr` (outside the chroot,
//! root's), whose last line is the error when the start fails.
//!
//! cgroups: the version is what the host has (`/sys/fs/cgroup/cgroup.controllers` → v2,
//! else the v1 hierarchies mounted for cpu and memory; the real jailer needs a cgroup2 mount
//! for `--cgroup-version 2` even without `--cgroup` values), and every VM's cgroup sits under
//! a per-owner parent `banger-<owner uid>` that must be root's; a VM cgroup that still exists
//! when a VM starts (after its stale jail was removed) is refused, never reused.
//!
//! The jail base is a tmpfs of the helper's own ([`prepare_base`]), so nothing the jailer
//! makes for the owner there (the jail's device nodes) can be hard-linked out. Every file
//! placed in the jail is opened once beneath the state dir's descriptor (`confine`), checked
//! through the descriptor (a regular file, the owner's), and bind-mounted from that
//! descriptor, so swapping a path component after the check changes nothing. Removal
//! unmounts only those placements, by their fixed names, following no symlink.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_proto::helper::{
    JAIL_API_SOCKET, JAIL_CONSOLE, JAIL_INITRD, JAIL_KERNEL, JAIL_LOG, JAIL_METRICS,
    JAIL_SYSTEM_DISK, JAIL_WORK_DISK, JailFiles, is_vm_id,
};
use nix::fcntl::OFlag;
use tracing::{info, warn};

use crate::confine::OpenRoot;
use crate::validate::Invalid;

/// Memory the VMM needs beyond guest RAM (same figure as the daemon's own cgroup leaf).
const VMM_OVERHEAD_MIB: u64 = 128;
/// Bound on the API socket appearing in the jail.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// The jailer's stderr (and Firecracker's, before its logger is set), next to the chroot.
const STDERR_FILE: &str = "jailer.stderr";

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
    #[error("{0:?}: the jailer only runs an exec file whose name contains \"firecracker\"")]
    ExecName(String),
    #[error(
        "this helper has no jailer configured; hint: start it with --jailer PATH --firecracker PATH \
         (contrib/systemd/banger-helper-jailer.conf)"
    )]
    NotConfigured,
    #[error("{cpus} vCPUs and {memory_mib} MiB do not fit a cgroup limit")]
    Limits { cpus: u32, memory_mib: u64 },
    #[error(
        "the cgroup {0:?} exists already: refused (a VM's cgroup is never reused); hint: stop \
         the VM (its remove_jail removes it), or rmdir it if no process is in it"
    )]
    CgroupExists(String),
    #[error("the parent cgroup {0:?} must be root's")]
    CgroupParent(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the jailer failed: {0}")]
    Jailer(String),
    #[error(
        "the jail base {base:?} has a mount that is not the helper's own tmpfs ({found}); hint: \
         unmount it, or pick another --jail-base"
    )]
    ForeignBase { base: String, found: String },
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Io { context, source }
}

/// The cgroup hierarchy the jailer is told to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v2 at `root`; `limits` when it offers the cpu and memory controllers.
    V2 { root: PathBuf, limits: bool },
    /// cgroup v1 hierarchies of the cpu and memory controllers, where mounted.
    V1 {
        cpu: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
}

impl Cgroups {
    /// What this host has: pure cgroup v2 at /sys/fs/cgroup, else the v1 cpu/memory
    /// hierarchies (a hybrid host's cgroup2 mount has no controllers to limit with), else a
    /// bare cgroup2 mount, else v1 without controllers (the jailer then writes nothing).
    pub fn detect() -> Self {
        let unified = Path::new("/sys/fs/cgroup");
        if let Ok(text) = std::fs::read_to_string(unified.join("cgroup.controllers")) {
            let c: Vec<&str> = text.split_whitespace().collect();
            return Self::V2 {
                root: unified.to_owned(),
                limits: c.contains(&"cpu") && c.contains(&"memory"),
            };
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut cpu = None;
        let mut memory = None;
        let mut v2 = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let (Some(dir), Some(kind), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
                continue;
            };
            let dir = unescape_mount_path(dir);
            match *kind {
                "cgroup" => {
                    let opts: Vec<&str> = opts.split(',').collect();
                    if opts.contains(&"cpu") && cpu.is_none() {
                        cpu = Some(dir.clone());
                    }
                    if opts.contains(&"memory") && memory.is_none() {
                        memory = Some(dir);
                    }
                }
                "cgroup2" if v2.is_none() => v2 = Some(dir),
                _ => {}
            }
        }
        match (cpu, memory, v2) {
            (None, None, Some(root)) => Self::V2 {
                root,
                limits: false,
            },
            (cpu, memory, _) => Self::V1 { cpu, memory },
        }
    }

    fn version(&self) -> &'static str {
        match self {
            Self::V2 { .. } => "2",
            Self::V1 { .. } => "1",
        }
    }

    /// The hierarchies the jailer places a VM in (where its cgroup dirs appear).
    fn hierarchies(&self) -> Vec<&Path> {
        match self {
            Self::V2 { root, limits: true } => vec![root.as_path()],
            Self::V2 { limits: false, .. } => vec![],
            Self::V1 { cpu, memory } => cpu
                .iter()
                .chain(memory.iter())
                .map(PathBuf::as_path)
                .collect(),
        }
    }
}

/// The helper's jail settings (its own configuration, never a request's).
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// `--chroot-base-dir`, root-owned, made by the helper.
    pub base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// The jailer and the Firecracker binary it execs (`None`: jailed VMs refused).
    pub binaries: Option<(PathBuf, PathBuf)>,
    pub cgroups: Cgroups,
}

impl JailConfig {
    /// The per-owner parent cgroup (`--parent-cgroup`).
    pub fn parent_cgroup(&self) -> String {
        format!("banger-{}", self.uid)
    }

    /// The source of the helper's own tmpfs on the jail base, as mountinfo shows it.
    fn base_source(&self) -> String {
        format!("banger-jail-{}", self.uid)
    }
}

/// The topmost mount on `dir` (the last mountinfo line for it): (fs type, source).
fn mount_on(dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter(|l| l.split(' ').nth(4).map(unescape_mount_path).as_deref() == Some(dir))
        .filter_map(|l| {
            let (_, tail) = l.split_once(" - ")?;
            let mut f = tail.split(' ');
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .next_back()
}

/// Refuses a jail base whose topmost mount is not the helper's own tmpfs: a jail on a file
/// system shared with a dir the owner can write would let the owner hard-link the jail's
/// device nodes (`/dev/kvm`, ...) out and keep them after the jail is gone.
fn own_base(config: &JailConfig) -> Result<(), JailError> {
    match mount_on(&config.base) {
        Some((fs, source)) if fs == "tmpfs" && source == config.base_source() => Ok(()),
        found => Err(JailError::ForeignBase {
            base: config.base.display().to_string(),
            found: found.map_or_else(
                || "no mount".to_owned(),
                |(fs, source)| format!("{fs} from {source}"),
            ),
        }),
    }
}

/// Makes the jail base a file system of the helper's own at its start: a tmpfs (`nosuid`,
/// devices allowed: the jailer makes `/dev/kvm` there; `mode=0711`: nobody lists the VM ids)
/// on a root-owned dir, or the one an earlier run of the helper left (with its live jails).
/// A base with any other mount on it is refused. The owner's files are bind-mounted into a
/// jail (a hard link cannot cross), and no jail node can be hard-linked out of it.
pub fn prepare_base(config: &JailConfig) -> Result<(), JailError> {
    let base = &config.base;
    if !base.is_absolute() {
        return Err(Invalid::PathShape(base.display().to_string()).into());
    }
    std::fs::create_dir_all(base).map_err(io(format!("cannot create {}", base.display())))?;
    for dir in base.ancestors() {
        let meta =
            std::fs::symlink_metadata(dir).map_err(io(format!("cannot stat {}", dir.display())))?;
        let sticky = meta.permissions().mode() & 0o1000 != 0;
        if !meta.is_dir() || meta.uid() != 0 || (dir != base && !sticky && !root_controlled(&meta))
        {
            return Err(JailError::UnsafeDir(dir.display().to_string()));
        }
    }
    if mount_on(base).is_none() {
        nix::mount::mount(
            Some(config.base_source().as_str()),
            base,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID,
            Some("mode=0711,uid=0,gid=0"),
        )
        .map_err(|e| JailError::Io {
            context: format!("cannot mount a tmpfs on the jail base {}", base.display()),
            source: e.into(),
        })?;
        info!(base = %base.display(), "mounted the jail base");
    }
    own_base(config)
}

/// A root-owned regular file nobody else may write, in directories only root may change;
/// returns it resolved.
pub fn trusted_binary(path: &Path) -> Result<PathBuf, JailError> {
    let text = path.display().to_string();
    let unsafe_binary = || JailError::UnsafeBinary(text.clone());
    if !path.is_absolute() {
        return Err(Invalid::PathShape(text.clone()).into());
    }
    let resolved = path.canonicalize().map_err(|_| unsafe_binary())?;
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

/// Opens a file of the owner beneath the state dir for placing in a jail.
fn owners_file(text: &str, root: &OpenRoot) -> Result<File, JailError> {
    let opened = root.open_file(text, OFlag::O_RDONLY)?;
    Ok(File::from(opened.fd))
}

/// The chroot dir the jailer builds for `exec_name` and `vm_id`.
pub fn chroot_dir(config: &JailConfig, exec_name: &str, vm_id: &str) -> PathBuf {
    config.base.join(exec_name).join(vm_id).join("root")
}

/// Places the opened `file` at `target`: a hard link when on the same file system (never, on
/// the helper's own tmpfs), else an empty file with the source bind-mounted on it.
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

/// A file the jailed process writes, made new by the helper (never an existing file: no
/// symlink or hard link is followed) and given to uid:gid through its descriptor.
fn owned_empty(config: &JailConfig, path: &Path) -> Result<(), JailError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(io(format!("cannot create {}", path.display())))?;
    nix::unistd::fchown(
        &file,
        Some(nix::unistd::Uid::from_raw(config.uid)),
        Some(nix::unistd::Gid::from_raw(config.gid)),
    )
    .map_err(|e| JailError::Io {
        context: format!("cannot chown {}", path.display()),
        source: e.into(),
    })
}

/// What the helper was asked for.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub vm_id: &'a str,
    pub files: &'a JailFiles,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The configured binaries, checked now (they could have been replaced since the start).
fn binaries(config: &JailConfig) -> Result<(PathBuf, PathBuf, String), JailError> {
    let (jailer, exec_file) = config.binaries.as_ref().ok_or(JailError::NotConfigured)?;
    let jailer = trusted_binary(jailer)?;
    let exec_text = exec_file.display().to_string();
    let exec_file = trusted_binary(exec_file)?;
    let exec_name = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.contains("firecracker"))
        .ok_or(JailError::ExecName(exec_text))?
        .to_owned();
    Ok((jailer, exec_file, exec_name))
}

/// Checks the configuration at the helper's start (a bad one is an error then, not at the
/// first VM).
pub fn check(config: &JailConfig) -> Result<(), JailError> {
    if config.binaries.is_some() {
        binaries(config)?;
    }
    Ok(())
}

/// Builds the jail, runs the jailer and waits for the API socket. Returns the pid and the
/// jail's root. On error nothing is left behind (no process, jail dir, mount or cgroup).
pub fn spawn(
    config: &JailConfig,
    root: &OpenRoot,
    request: &SpawnRequest<'_>,
) -> Result<(u32, PathBuf), JailError> {
    let vm_id = request.vm_id;
    if !is_vm_id(vm_id) {
        return Err(JailError::VmId(vm_id.to_owned()));
    }
    let (jailer, exec_file, exec_name) = binaries(config)?;
    let limits = limits(request)?;
    let files = request.files;
    let mut placed = vec![
        (owners_file(&files.kernel, root)?, JAIL_KERNEL),
        (owners_file(&files.system_disk, root)?, JAIL_SYSTEM_DISK),
        (owners_file(&files.work_disk, root)?, JAIL_WORK_DISK),
        (owners_file(&files.console_log, root)?, JAIL_CONSOLE),
    ];
    if let Some(initrd) = &files.initrd {
        placed.push((owners_file(initrd, root)?, JAIL_INITRD));
    }
    if let Some(log) = &files.log {
        placed.push((owners_file(log, root)?, JAIL_LOG));
    }
    // A jail left by a crash is removed first: the jailer reuses an existing dir. Its cgroup
    // is not: one that exists is refused (only `remove_jail` removes a VM's cgroup).
    remove_jails(config, vm_id)?;
    check_cgroups(config, vm_id)?;
    let chroot = chroot_dir(config, &exec_name, vm_id);
    let built = build(config, &chroot, &placed).and_then(|()| {
        let args = jailer_args(config, vm_id, &exec_file, limits);
        run_jailer(config, &jailer, &args, &chroot, &exec_name, vm_id)
    });
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

/// cpu quota (µs per 100 ms period) and memory limit (bytes) of a VM, checked arithmetic.
fn limits(request: &SpawnRequest<'_>) -> Result<(u64, u64), JailError> {
    let bad = || JailError::Limits {
        cpus: request.cpus,
        memory_mib: request.memory_mib,
    };
    if request.cpus == 0 {
        return Err(bad());
    }
    let quota = u64::from(request.cpus)
        .checked_mul(100_000)
        .ok_or_else(bad)?;
    let bytes = request
        .memory_mib
        .checked_add(VMM_OVERHEAD_MIB)
        .and_then(|m| m.checked_mul(1 << 20))
        .ok_or_else(bad)?;
    Ok((quota, bytes))
}

/// The VM's cgroup dirs (one per hierarchy the jailer uses).
fn cgroup_dirs(config: &JailConfig, vm_id: &str) -> Vec<PathBuf> {
    config
        .cgroups
        .hierarchies()
        .into_iter()
        .map(|h| h.join(config.parent_cgroup()).join(vm_id))
        .collect()
}

/// Refuses a VM cgroup that exists already, and a per-owner parent that is not root's.
fn check_cgroups(config: &JailConfig, vm_id: &str) -> Result<(), JailError> {
    for dir in cgroup_dirs(config, vm_id) {
        if let Some(parent) = dir.parent()
            && let Ok(meta) = std::fs::symlink_metadata(parent)
            && (!meta.is_dir() || meta.uid() != 0)
        {
            return Err(JailError::CgroupParent(parent.display().to_string()));
        }
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(JailError::CgroupExists(dir.display().to_string()));
        }
    }
    Ok(())
}

fn build(config: &JailConfig, chroot: &Path, placed: &[(File, &str)]) -> Result<(), JailError> {
    // Root builds the jail on its own file system, where nobody else placed anything.
    own_base(config)?;
    std::fs::create_dir_all(chroot).map_err(io(format!("cannot create {}", chroot.display())))?;
    // `<exec name>/` and `<vm id>/` stay root's and unlistable (the VM ids are nobody's
    // business); the owner only passes through to its `root/`.
    for dir in chroot.ancestors().skip(1).take(2) {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io(format!("cannot chmod {}", dir.display())))?;
    }
    for (file, name) in placed {
        place(file, &chroot.join(name.trim_start_matches('/')))?;
    }
    for name in [JAIL_LOG, JAIL_METRICS] {
        if !placed.iter().any(|(_, placed)| *placed == name) {
            owned_empty(config, &chroot.join(name.trim_start_matches('/')))?;
        }
    }
    Ok(())
}

/// The jailer's arguments (pure; the test reads it). `limits`: cpu quota per 100 ms period
/// (µs) and memory (bytes).
pub fn jailer_args(
    config: &JailConfig,
    vm_id: &str,
    exec_file: &Path,
    (quota, bytes): (u64, u64),
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
        config.cgroups.version().into(),
    ];
    let mut cgroups = Vec::new();
    match &config.cgroups {
        Cgroups::V2 { limits: true, .. } => {
            cgroups.push(format!("cpu.max={quota} 100000"));
            cgroups.push(format!("memory.max={bytes}"));
        }
        Cgroups::V2 { limits: false, .. } => {}
        Cgroups::V1 { cpu, memory } => {
            if cpu.is_some() {
                cgroups.push("cpu.cfs_period_us=100000".into());
                cgroups.push(format!("cpu.cfs_quota_us={quota}"));
            }
            if memory.is_some() {
                cgroups.push(format!("memory.limit_in_bytes={bytes}"));
            }
        }
    }
    if !cgroups.is_empty() {
        args.extend(["--parent-cgroup".into(), config.parent_cgroup()]);
        for cgroup in cgroups {
            args.extend(["--cgroup".into(), cgroup]);
        }
    }
    args.extend(["--".into(), "--api-sock".into(), JAIL_API_SOCKET.into()]);
    // Its log from the first line, levels shown (the daemon reads its exit reason there).
    args.extend(["--log-path".into(), JAIL_LOG.into()]);
    args.extend(FIRECRACKER_LOG_ARGS.map(String::from));
    args
}

/// Firecracker's log settings after `--log-path` (as the daemon passes them unjailed:
/// `banger_core::vmm::firecracker::LOG_ARGS`).
const FIRECRACKER_LOG_ARGS: [&str; 3] = ["--level", "Info", "--show-level"];

/// The last non-empty line of a file (the jailer's error), at most 4 KiB read from its end.
fn last_line(path: &Path) -> String {
    use std::io::{Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = file.take(4096).read_to_string(&mut text);
    }
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// Runs the jailer in a new session; returns the pid once the API socket answers. The jailer
/// execs Firecracker in place, so its pid is Firecracker's; it stays this helper's child,
/// reaped by a thread. On failure the process is killed (and a Firecracker named by the
/// jailer's pid file, should it differ) before returning.
fn run_jailer(
    config: &JailConfig,
    jailer: &Path,
    args: &[String],
    chroot: &Path,
    exec_name: &str,
    vm_id: &str,
) -> Result<u32, JailError> {
    let uid = config.uid;
    info!(jailer = %jailer.display(), args = ?args, "running the jailer");
    let stderr_path = chroot
        .parent()
        .map(|p| p.join(STDERR_FILE))
        .ok_or_else(|| JailError::Jailer("the jail has no parent dir".into()))?;
    let stderr = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(&stderr_path)
        .map_err(io(format!("cannot create {}", stderr_path.display())))?;
    let mut command = Command::new(jailer);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec and calls only setsid(2),
    // which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .map_err(io(format!("cannot run {}", jailer.display())))?;
    let pid = child.id();
    let socket = chroot.join(JAIL_API_SOCKET.trim_start_matches('/'));
    let deadline = Instant::now() + SOCKET_WAIT;
    let failure = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = last_line(&stderr_path);
            break if text.is_empty() {
                status.to_string()
            } else {
                text
            };
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break format!(
                "no API socket {} within {}s",
                socket.display(),
                SOCKET_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    kill_pid_file(chroot, exec_name, pid, vm_id, uid);
    Err(JailError::Jailer(failure))
}

/// Kills the process the jailer's `<chroot>/<exec name>.pid` names when it is not `child`
/// and is this VM's Firecracker: a jailer that forked after all must not leak a live VMM.
/// The chroot's root dir belongs to the owner, so the pid file counts only when root wrote it
/// (a regular file of uid 0, not a symlink), and the process only when it runs as the owner
/// with this VM's id on its command line: an owner who plants a pid file can at most make the
/// helper kill one of the owner's own processes. Retried for a moment (the file and the exec
/// may trail the jailer's exit).
fn kill_pid_file(chroot: &Path, exec_name: &str, child: u32, vm_id: &str, uid: u32) {
    let pid_file = chroot.join(format!("{exec_name}.pid"));
    let deadline = Instant::now() + Duration::from_millis(300);
    loop {
        let named = pid_from(&pid_file);
        // The jailer's own pid (exec'd in place) or a process already gone: nothing left.
        if named.is_some_and(|p| p as u32 == child || !Path::new(&format!("/proc/{p}")).exists()) {
            return;
        }
        if let Some(pid) = named.filter(|&p| p > 1)
            && kill_if(pid, |pid| is_vm_process(pid, uid, vm_id))
        {
            warn!(pid, vm_id, "killed a Firecracker the failed jailer left");
            return;
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `/proc/<pid>` runs as `uid` (real uid) with `vm_id` on its command line.
fn is_vm_process(pid: i32, uid: u32, vm_id: &str) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let owner = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|real| real.parse::<u32>().ok());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    owner == Some(uid) && String::from_utf8_lossy(&cmdline).contains(vm_id)
}

/// SIGKILLs the process `pid` names now when `check(pid)` holds: a pidfd is opened first and
/// the signal goes through it, so a process that exits after the check (and a new process
/// given the same pid) is never signalled. Returns whether the signal was delivered.
pub fn kill_if(pid: i32, check: impl FnOnce(i32) -> bool) -> bool {
    // SAFETY: pidfd_open(2) takes a pid and flags (0) and returns a new descriptor or -1; no
    // memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return false;
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // The pidfd pins the process: what /proc says now is about it while it lives, and a
    // signal through the pidfd reaches it or nothing.
    if !check(pid) {
        return false;
    }
    // SAFETY: pidfd_send_signal(2) with a pidfd open for the call, SIGKILL, a null siginfo
    // (allowed: the kernel fills it as for kill(2)) and flags 0.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    sent == 0
}

/// The pid in a root-written pid file (regular, uid 0, not a symlink), if any.
fn pid_from(path: &Path) -> Option<i32> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.uid() != 0 || meta.len() > 32 {
        return None;
    }
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes every jail of `vm_id` under the base (any exec file name): unmounts what is
/// mounted inside, deletes the tree, and removes the VM's cgroups (this owner's only).
pub fn remove(config: &JailConfig, vm_id: &str) -> Result<(), JailError> {
    if !is_vm_id(vm_id) {
        return Err(JailError::VmId(vm_id.to_owned()));
    }
    remove_jails(config, vm_id)?;
    for dir in cgroup_dirs(config, vm_id) {
        // A VMM that just ended stays in its cgroup until it is reaped (the helper's reaper
        // thread, a moment later): busy is retried for a bounded time.
        let deadline = std::time::Instant::now() + CGROUP_BUSY_WAIT;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(nix::libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    warn!(cgroup = %dir.display(), "cannot remove the VM's cgroup: {e}");
                    break;
                }
            }
        }
    }
    Ok(())
}

/// How long `remove` retries the rmdir of a VM cgroup whose last process is still exiting.
const CGROUP_BUSY_WAIT: Duration = Duration::from_secs(3);

/// The names the helper may have bind-mounted in a jail's root (see [`place`]).
const PLACED: [&str; 6] = [
    JAIL_KERNEL,
    JAIL_INITRD,
    JAIL_SYSTEM_DISK,
    JAIL_WORK_DISK,
    JAIL_CONSOLE,
    JAIL_LOG,
];

/// Removes every jail dir of `vm_id` under the base (any exec file name), unmounting first.
/// Only the helper's own placements are unmounted: the fixed `JAIL_*` names directly in the
/// jail's root, with `UMOUNT_NOFOLLOW` (the root dir is the owner's: a name there may have
/// been swapped for a symlink). Any other mount under the jail (one the owner made) makes the
/// removal fail, never an unmount by a path the owner could redirect.
fn remove_jails(config: &JailConfig, vm_id: &str) -> Result<(), JailError> {
    if let Ok(entries) = std::fs::read_dir(&config.base) {
        for entry in entries.flatten() {
            let dir = entry.path().join(vm_id);
            if std::fs::symlink_metadata(&dir).is_err() {
                continue;
            }
            let root = dir.join("root");
            for name in PLACED {
                unmount_placed(&root.join(name.trim_start_matches('/')))?;
            }
            if let Some(foreign) = mounts_under(&dir).first() {
                return Err(JailError::Io {
                    context: format!(
                        "cannot remove {}: {} is a mount the helper did not make; hint: \
                         unmount it",
                        dir.display(),
                        foreign.display()
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
                });
            }
            std::fs::remove_dir_all(&dir)
                .map_err(io(format!("cannot remove {}", dir.display())))?;
            info!(jail = %dir.display(), "jail removed");
        }
    }
    Ok(())
}

/// Unmounts every mount stacked on `path` without following a symlink there; a path that is
/// missing or no mount point is left alone.
fn unmount_placed(path: &Path) -> Result<(), JailError> {
    use nix::mount::MntFlags;
    // Bounded: a name holds the helper's one bind mount; more would be stacked by others.
    for _ in 0..16 {
        match nix::mount::umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(JailError::Io {
                    context: format!("cannot unmount {}", path.display()),
                    source: e.into(),
                });
            }
        }
    }
    Ok(())
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect()
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
        let mut config = JailConfig {
            base: "/srv/banger-jail/1000".into(),
            uid: 1000,
            gid: 100,
            binaries: None,
            cgroups: Cgroups::V2 {
                root: "/sys/fs/cgroup".into(),
                limits: false,
            },
        };
        let request = SpawnRequest {
            vm_id: "0123456789abcdef0123456789abcdef",
            files: &JailFiles {
                kernel: "/k".into(),
                initrd: None,
                system_disk: "/s".into(),
                work_disk: "/w".into(),
                console_log: "/c".into(),
                log: None,
            },
            cpus: 2,
            memory_mib: 1024,
        };
        let limits = limits(&request).unwrap();
        let exec = Path::new("/usr/bin/firecracker");
        let args = jailer_args(&config, request.vm_id, exec, limits).join(" ");
        assert_eq!(
            args,
            "--id 0123456789abcdef0123456789abcdef --exec-file /usr/bin/firecracker \
             --uid 1000 --gid 100 --chroot-base-dir /srv/banger-jail/1000 --cgroup-version 2 \
             -- --api-sock /run/firecracker.socket --log-path /firecracker.log --level Info \
             --show-level"
        );
        assert!(!args.contains("--daemonize"));
        config.cgroups = Cgroups::V2 {
            root: "/sys/fs/cgroup".into(),
            limits: true,
        };
        let args = jailer_args(&config, request.vm_id, exec, limits).join(" ");
        assert!(
            args.contains(
                "--parent-cgroup banger-1000 --cgroup cpu.max=200000 100000 --cgroup memory.max=1207959552"
            ),
            "{args}"
        );
        config.cgroups = Cgroups::V1 {
            cpu: Some("/sys/fs/cgroup/cpu".into()),
            memory: Some("/sys/fs/cgroup/memory".into()),
        };
        let args = jailer_args(&config, request.vm_id, exec, limits).join(" ");
        assert!(
            args.contains(
                "--cgroup-version 1 --parent-cgroup banger-1000 --cgroup cpu.cfs_period_us=100000 \
                 --cgroup cpu.cfs_quota_us=200000 --cgroup memory.limit_in_bytes=1207959552"
            ),
            "{args}"
        );
        assert_eq!(
            cgroup_dirs(&config, request.vm_id),
            [
                PathBuf::from("/sys/fs/cgroup/cpu/banger-1000/0123456789abcdef0123456789abcdef"),
                PathBuf::from("/sys/fs/cgroup/memory/banger-1000/0123456789abcdef0123456789abcdef"),
            ]
        );
    }

    #[test]
    fn limits_never_wrap() {
        let files = JailFiles {
            kernel: "/k".into(),
            initrd: None,
            system_disk: "/s".into(),
            work_disk: "/w".into(),
            console_log: "/c".into(),
            log: None,
        };
        for (cpus, memory_mib) in [(1, u64::MAX), (1, u64::MAX >> 20), (0, 128)] {
            let request = SpawnRequest {
                vm_id: "x",
                files: &files,
                cpus,
                memory_mib,
            };
            assert!(
                matches!(limits(&request), Err(JailError::Limits { .. })),
                "{cpus} {memory_mib}"
            );
        }
    }

    /// A process that ends after the check and whose pid a new process takes is never
    /// signalled (the new process stays alive); a live process that passes is killed.
    #[test]
    fn kill_if_never_signals_a_process_that_took_the_checked_pid() {
        use std::process::Command;
        let mut target = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = target.id() as i32;
        let mut victim = None;
        let killed = kill_if(pid, |p| {
            target.kill().unwrap();
            target.wait().unwrap();
            // Hand the pid to a new process (ns_last_pid, as root), retried since other
            // processes fork meanwhile.
            for _ in 0..100 {
                let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (p - 1).to_string());
                let mut child = Command::new("sleep").arg("30").spawn().unwrap();
                if child.id() as i32 == p {
                    victim = Some(child);
                    break;
                }
                child.kill().unwrap();
                child.wait().unwrap();
            }
            true
        });
        assert!(
            !killed,
            "a signal was delivered after the checked process ended"
        );
        match victim {
            Some(mut victim) => {
                assert!(
                    victim.try_wait().unwrap().is_none(),
                    "the process that took the pid was killed"
                );
                victim.kill().unwrap();
                victim.wait().unwrap();
            }
            None => banger_shared::skip::report(
                "pid reuse check",
                &format!("could not hand pid {pid} to a new process (ns_last_pid)"),
            ),
        }
        let mut live = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = live.id() as i32;
        assert!(!kill_if(pid, |_| false));
        assert!(live.try_wait().unwrap().is_none());
        assert!(kill_if(pid, |_| true));
        let status = live.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
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
