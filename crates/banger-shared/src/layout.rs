//! Every on-disk path banger uses, in one place (like Lima's filenames.go): the names here;
//! other code joins them, never a literal of its own.
//!
//! - data dir (`$BANGER_HOME`, default `$XDG_DATA_HOME/banger` or `~/.local/share/banger`):
//!   durable state: `state.db`, `logs/`, `vms/<id>/`, `images/`, `kernels/`, `keys/`.
//! - runtime dir (`$BANGER_RUNTIME_DIR`; else `$BANGER_HOME/run` when `BANGER_HOME` is set, so
//!   two instances with separate homes never share a socket; else `$XDG_RUNTIME_DIR/banger`;
//!   else `<data dir>/run`): sockets, lock and pid files, per-VM transient files.
//! - config file: `$BANGER_CONFIG`, default `$XDG_CONFIG_HOME/banger/config.toml` or
//!   `~/.config/banger/config.toml`.

use std::path::{Path, PathBuf};

/// Why the layout could not be derived from the environment.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Neither `BANGER_HOME`, `XDG_DATA_HOME` nor `HOME` is set.
    #[error("cannot find a data directory: set BANGER_HOME or HOME")]
    NoHome,
}

/// The directories and files of one banger instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    data_dir: PathBuf,
    runtime_dir: PathBuf,
    config_file: PathBuf,
    /// `$HOME`, for the ssh configuration files.
    home: Option<PathBuf>,
}

/// Reads one environment variable, treating an empty value as unset.
fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Layout {
    /// Derives the layout from the process environment (see the module docs).
    pub fn from_env() -> Result<Self, LayoutError> {
        Self::from_lookup(env_path)
    }

    /// Derives the layout from `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<PathBuf>) -> Result<Self, LayoutError> {
        let home = lookup("HOME");
        let banger_home = lookup("BANGER_HOME");
        let data_dir = match (&banger_home, lookup("XDG_DATA_HOME"), &home) {
            (Some(dir), _, _) => dir.clone(),
            (None, Some(xdg), _) => xdg.join("banger"),
            (None, None, Some(home)) => home.join(".local/share/banger"),
            (None, None, None) => return Err(LayoutError::NoHome),
        };
        let runtime_dir = match (lookup("BANGER_RUNTIME_DIR"), &banger_home) {
            (Some(dir), _) => dir,
            (None, Some(_)) => data_dir.join("run"),
            (None, None) => lookup("XDG_RUNTIME_DIR")
                .map(|d| d.join("banger"))
                .unwrap_or_else(|| data_dir.join("run")),
        };
        let config_file = match (lookup("BANGER_CONFIG"), lookup("XDG_CONFIG_HOME"), &home) {
            (Some(file), _, _) => file,
            (None, Some(xdg), _) => xdg.join("banger/config.toml"),
            (None, None, Some(home)) => home.join(".config/banger/config.toml"),
            (None, None, None) => data_dir.join("config.toml"),
        };
        Ok(Self {
            data_dir,
            runtime_dir,
            config_file,
            home,
        })
    }

    /// A layout rooted at explicit directories (tests).
    pub fn new(data_dir: PathBuf, runtime_dir: PathBuf, config_file: PathBuf) -> Self {
        Self {
            data_dir,
            runtime_dir,
            config_file,
            home: None,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }
    /// Held (flock) by the one running daemon.
    pub fn daemon_lock(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.lock")
    }
    /// SQLite database with all durable state.
    pub fn state_db(&self) -> PathBuf {
        self.data_dir.join("state.db")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }
    /// The daemon's log file.
    pub fn daemon_log(&self) -> PathBuf {
        self.logs_dir().join("bangerd.log")
    }
    /// Where the CLI sends a daemon's stderr when it spawns one (what it printed before its
    /// log was open).
    pub fn daemon_stderr(&self) -> PathBuf {
        self.logs_dir().join("bangerd.stderr")
    }
    /// Durable per-VM files (disks, keys), keyed by VM id so a reused name never sees old data.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.data_dir.join("vms").join(vm_id)
    }
    /// The VM's system disk (qcow2 overlay over its image).
    pub fn vm_system_disk(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("system.qcow2")
    }
    /// The VM's raw system disk (reflink clone or sparse copy of its image).
    pub fn vm_system_raw(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("system.raw")
    }
    /// The copy-on-write store of the VM's device-mapper snapshot system disk.
    pub fn vm_system_cow(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("system.cow")
    }
    /// The loop devices and mapping of the VM's dm system disk (JSON), for teardown.
    pub fn vm_system_dm(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("system.dm.json")
    }
    /// The device-mapper name of `owner`'s VM's system disk: `banger-<owner uid>-<vm id>`
    /// (`banger_proto::helper::dm_name`; dm names are host-wide, and the helper makes only its
    /// owner's).
    pub fn vm_dm_name(&self, owner: u32, vm_id: &str) -> String {
        format!("banger-{owner}-{vm_id}")
    }
    /// Where the host sees one of the VM's qcow2 disks as a raw file while it checks it
    /// (`disk`: "system" or "work"; an empty file, mounted over only during the check).
    pub fn vm_disk_view(&self, vm_id: &str, disk: &str) -> PathBuf {
        self.vm_dir(vm_id).join(format!("{disk}.fsck-view.raw"))
    }
    /// The VM's work disk (ext4, mounted at /root in the guest).
    pub fn vm_work_disk(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("work.ext4")
    }
    /// The VM's work disk once it has a named snapshot: a qcow2 overlay over the work file of
    /// the snapshot it continues from (`work.ext4` is then gone from the VM's directory).
    pub fn vm_work_overlay(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("work.qcow2")
    }
    /// Where a new top overlay of the VM is made before it is renamed over `top` (one of
    /// [`Layout::vm_system_disk`], [`Layout::vm_work_overlay`]), or a snapshot's manifest
    /// before it is renamed into place; a `.partial` left by a crash is removed at daemon
    /// start.
    pub fn vm_overlay_partial(top: &Path) -> PathBuf {
        let mut name = top.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        top.with_file_name(name)
    }
    /// Where a live snapshot (`snapshot_id`) makes the VM's new top overlay for `top`, which
    /// the running VMM opens there and which is renamed over `top` once the VMM switched to it.
    /// A name of its own per snapshot: the VMM may reopen a node by the name it opened it
    /// with, which must never be another file.
    pub fn vm_overlay_live(top: &Path, snapshot_id: &str) -> PathBuf {
        let mut name = top.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".live-{snapshot_id}"));
        top.with_file_name(name)
    }
    /// The VM's named snapshots (`vm snapshot`), one directory each.
    pub fn vm_snapshots_dir(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("snapshots")
    }
    /// The files of the VM's named snapshot `snapshot_id`: the disk files the VM had when
    /// it was taken, read-only members of the backing chains of the disks made from it.
    pub fn vm_named_snapshot(&self, vm_id: &str, snapshot_id: &str) -> NamedSnapshotFiles {
        NamedSnapshotFiles(self.vm_snapshots_dir(vm_id).join(snapshot_id))
    }
    /// The VM's pinned SSH host key.
    pub fn vm_known_hosts(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("known_hosts")
    }
    /// The VM's serial console output (kept across restarts for `vm logs`).
    pub fn vm_console_log(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("console.log")
    }
    /// Firecracker's own log of the VM's last boot (its reason when it exits), see
    /// [`VM_FIRECRACKER_LOG`].
    pub fn vm_firecracker_log(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join(VM_FIRECRACKER_LOG)
    }
    /// The VM state file of the VM's suspend snapshot (Firecracker `snapshot_path`; QEMU's
    /// migration stream, devices and memory in one file).
    pub fn vm_snapshot_state(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join(SNAPSHOT_STATE)
    }
    /// The guest memory file of the VM's suspend snapshot (Firecracker `mem_file_path`; QEMU
    /// writes none).
    pub fn vm_snapshot_memory(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join(SNAPSHOT_MEMORY)
    }
    /// What makes the VM's suspend snapshot complete (JSON): its files' sizes and checksums
    /// and the identity of the disks it pairs with. Written last, atomically.
    pub fn vm_snapshot_manifest(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join(SNAPSHOT_MANIFEST)
    }
    /// Scratch space for building and importing (same file system as the stores, so results
    /// are renamed into place atomically).
    pub fn tmp_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }
    /// Directory of the kernel with `digest`: `vmlinux`, optional `initrd.img`, `modules/`.
    pub fn kernel_dir(&self, digest: &str) -> PathBuf {
        self.kernels_dir().join(digest)
    }
    /// The uncompressed kernel image of the kernel with `digest`.
    pub fn kernel_vmlinux(&self, digest: &str) -> PathBuf {
        self.kernel_dir(digest).join(KERNEL_VMLINUX)
    }
    /// The initrd of the kernel with `digest` (when it has one).
    pub fn kernel_initrd(&self, digest: &str) -> PathBuf {
        self.kernel_dir(digest).join(KERNEL_INITRD)
    }
    /// The build configuration of the kernel with `digest`, when known (built or imported
    /// with a `config` beside it).
    pub fn kernel_config(&self, digest: &str) -> PathBuf {
        self.kernel_dir(digest).join(KERNEL_CONFIG)
    }
    /// What the kernel with `digest` can boot (JSON `KernelCapabilities`), read once from its
    /// configuration or ELF file and kept beside it (the directory is content-addressed).
    pub fn kernel_capabilities(&self, digest: &str) -> PathBuf {
        self.kernel_dir(digest).join(KERNEL_CAPABILITIES)
    }
    /// Where `banger kernel build` logs the build (make's output).
    pub fn kernel_build_log(&self) -> PathBuf {
        self.logs_dir().join(KERNEL_BUILD_LOG)
    }
    /// Raw root filesystem of the image with `digest`.
    pub fn image_rootfs(&self, digest: &str) -> PathBuf {
        self.images_dir().join(digest).join("rootfs.ext4")
    }
    /// banger's SSH private key (public key beside it, `.pub`).
    pub fn client_key(&self) -> PathBuf {
        self.keys_dir().join("id_ed25519")
    }
    /// What a new VM's work disk is made from (removed once it is): a directory whose
    /// [`VmSeed`] paths become the guest's /root.
    pub fn vm_seed(&self, vm_id: &str) -> VmSeed {
        VmSeed(self.vm_dir(vm_id).join("seed"))
    }
    /// Transient per-VM files (sockets, pid file).
    pub fn vm_runtime_dir(&self, vm_id: &str) -> PathBuf {
        self.runtime_dir.join("vms").join(vm_id)
    }
    /// The host end of the VM's workspace channel (a virtio-serial port, QEMU only), see
    /// [`WORKSPACE_CHANNEL_SOCKET`].
    pub fn vm_workspace_channel(&self, vm_id: &str) -> PathBuf {
        self.vm_runtime_dir(vm_id).join(WORKSPACE_CHANNEL_SOCKET)
    }
    /// The shared SSH connection's socket (daemon and CLI use the same one).
    pub fn vm_ssh_control(&self, vm_id: &str) -> PathBuf {
        self.vm_runtime_dir(vm_id).join("ssh-control")
    }
    /// Content-addressed image store.
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
    /// Content-addressed kernel store.
    pub fn kernels_dir(&self) -> PathBuf {
        self.data_dir.join("kernels")
    }
    /// Content-addressed work-seed store: each seed is a directory tree (owned by the daemon's
    /// user; the guest's root owns it on the work disk).
    pub fn work_seeds_dir(&self) -> PathBuf {
        self.data_dir.join(WORK_SEEDS)
    }
    /// The tree of the work-seed with `digest` (sha256 over the length and the bytes of its
    /// canonical tar, as the other stores' digests): a new VM's /root starts with it.
    pub fn work_seed(&self, digest: &str) -> PathBuf {
        self.work_seeds_dir().join(digest)
    }
    /// The root helper's socket for `uid` when the config names none.
    pub fn default_helper_socket(uid: u32) -> PathBuf {
        PathBuf::from(format!("/run/banger-helper/{uid}.sock"))
    }
    /// The generated OpenSSH config: `configured`, else `~/.ssh/config.d/banger`.
    pub fn ssh_config_file(&self, configured: &str) -> PathBuf {
        self.home_file(configured, ".ssh/config.d/banger")
    }
    /// The user's own OpenSSH config: `configured`, else `~/.ssh/config`.
    pub fn ssh_user_config(&self, configured: &str) -> PathBuf {
        self.home_file(configured, ".ssh/config")
    }
    fn home_file(&self, configured: &str, default: &str) -> PathBuf {
        if !configured.is_empty() {
            return PathBuf::from(configured);
        }
        match &self.home {
            Some(home) => home.join(default),
            None => self.data_dir.join(default.trim_start_matches(".ssh/")),
        }
    }
    /// ControlPath sockets of the generated ssh config.
    pub fn ssh_control_dir(&self) -> PathBuf {
        self.runtime_dir.join("ssh")
    }
    /// The user's Docker client config, where registry credentials are read from.
    pub fn docker_config(&self) -> Option<PathBuf> {
        env_path("DOCKER_CONFIG")
            .map(|dir| dir.join("config.json"))
            .or_else(|| self.home.as_ref().map(|h| h.join(".docker/config.json")))
    }
    /// banger's own SSH client key pair.
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }
}

/// A VM's seed directory: the files its work disk starts with (its /root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSeed(PathBuf);

impl VmSeed {
    pub fn root(&self) -> &Path {
        &self.0
    }
    /// `/root/.ssh`.
    pub fn ssh_dir(&self) -> PathBuf {
        self.0.join(".ssh")
    }
    /// `/root/.ssh/authorized_keys`: banger's client key.
    pub fn authorized_keys(&self) -> PathBuf {
        self.ssh_dir().join("authorized_keys")
    }
    /// `/root/.banger`: what the guest's boot scripts read.
    pub fn banger_dir(&self) -> PathBuf {
        self.0.join(".banger")
    }
    /// `/root/.banger/ssh_host_ed25519_key`: the guest's SSH host key.
    pub fn host_key(&self) -> PathBuf {
        self.banger_dir().join("ssh_host_ed25519_key")
    }
    /// `/root/repo`: where workspaces go.
    pub fn repo_dir(&self) -> PathBuf {
        self.0.join("repo")
    }
}

/// The directory of one named snapshot of a VM (see [`Layout::vm_named_snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSnapshotFiles(PathBuf);

impl NamedSnapshotFiles {
    pub fn dir(&self) -> &Path {
        &self.0
    }
    /// The system disk: the qcow2 overlay the VM had (its backing chain ends at the image).
    pub fn system(&self) -> PathBuf {
        self.0.join("system.qcow2")
    }
    /// The work disk: the VM's raw `work.ext4` (its first snapshot) or its qcow2 overlay.
    pub fn work(&self, qcow2: bool) -> PathBuf {
        self.0.join(if qcow2 { "work.qcow2" } else { "work.ext4" })
    }
    /// A memory snapshot's VM state (QEMU's migration stream), named as the VM's suspend
    /// state: a restore links it there.
    pub fn state(&self) -> PathBuf {
        self.0.join(SNAPSHOT_STATE)
    }
    /// A memory snapshot's guest memory file (Firecracker's; QEMU writes none).
    pub fn memory(&self) -> PathBuf {
        self.0.join(SNAPSHOT_MEMORY)
    }
    /// A memory snapshot's manifest (`banger_core::snapshot`): the state's size and checksum.
    /// Without it the snapshot holds only disks.
    pub fn manifest(&self) -> PathBuf {
        self.0.join(SNAPSHOT_MANIFEST)
    }
}

/// The VM state file of a memory snapshot (a suspend's, or a named snapshot's `--memory`).
pub const SNAPSHOT_STATE: &str = "snapshot.state";
/// The guest memory file of a memory snapshot (Firecracker's; QEMU writes none).
pub const SNAPSHOT_MEMORY: &str = "snapshot.mem";
/// The manifest that makes a memory snapshot complete.
pub const SNAPSHOT_MANIFEST: &str = "snapshot.json";

/// Directory of the work-seed store under the data dir.
pub const WORK_SEEDS: &str = "work-seeds";
/// The kernel image in a kernel directory.
pub const KERNEL_VMLINUX: &str = "vmlinux";
/// The optional initrd in a kernel directory.
pub const KERNEL_INITRD: &str = "initrd.img";
/// The kernel modules tree (`lib/modules/<version>`) of a kernel directory, when it has one.
pub const KERNEL_MODULES: &str = "modules";
/// The log of `banger image build`, in the logs dir.
pub const IMAGE_BUILD_LOG: &str = "image-build.log";
/// A kernel's build configuration, beside it in its store directory.
pub const KERNEL_CONFIG: &str = "config";
/// What a kernel can boot (JSON), beside it in its store directory.
pub const KERNEL_CAPABILITIES: &str = "capabilities.json";
/// The log of `banger kernel build`, in the logs dir.
pub const KERNEL_BUILD_LOG: &str = "kernel-build.log";

/// Files a backend keeps in a VM's runtime dir (it is given the directory, not a [`Layout`]).
pub mod vm_runtime {
    /// QEMU's QMP socket.
    pub const QMP_SOCKET: &str = "qmp.sock";
    /// QEMU's pid file (`-daemonize -pidfile`).
    pub const QEMU_PID: &str = "qemu.pid";
    /// Firecracker's API socket (a symlink into the jail when jailed).
    pub const FIRECRACKER_API_SOCKET: &str = "fc.sock";
    /// Firecracker's metrics (its log and stderr are in the VM's data dir:
    /// [`super::VM_FIRECRACKER_LOG`]).
    pub const FIRECRACKER_METRICS: &str = "firecracker.metrics";
}

/// Firecracker's log (`--log-path`), in the VM's data dir beside `console.log`: it outlives
/// the runtime dir, a failed start's undo and the jail, so the reason Firecracker gave for
/// exiting can be shown afterwards. Recreated at each start; the daemon keeps it under a cap.
pub const VM_FIRECRACKER_LOG: &str = "firecracker.log";
/// Firecracker's stderr (unjailed; the jailer's is the helper's), beside its log; the daemon
/// adds the exit status of a Firecracker it reaped.
pub const VM_FIRECRACKER_STDERR: &str = "firecracker.stderr";

/// File name, in a VM's runtime dir, of the Unix socket QEMU listens on for the workspace
/// channel: a plain byte pipe into the guest that carries a prepare's tar without SSH's
/// encryption (which the guest has to undo, slowly under TCG).
pub const WORKSPACE_CHANNEL_SOCKET: &str = "workspace.sock";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn layout(vars: &[(&str, &str)]) -> Layout {
        let map: HashMap<String, PathBuf> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        Layout::from_lookup(|k| map.get(k).cloned()).unwrap()
    }

    #[test]
    fn defaults_follow_xdg() {
        let l = layout(&[("HOME", "/h"), ("XDG_RUNTIME_DIR", "/run/user/1")]);
        assert_eq!(l.data_dir(), Path::new("/h/.local/share/banger"));
        assert_eq!(l.socket(), Path::new("/run/user/1/banger/bangerd.sock"));
        assert_eq!(l.config_file(), Path::new("/h/.config/banger/config.toml"));
    }

    #[test]
    fn runtime_falls_back_under_data_dir() {
        let l = layout(&[("HOME", "/h")]);
        assert_eq!(
            l.socket(),
            Path::new("/h/.local/share/banger/run/bangerd.sock")
        );
    }

    #[test]
    fn banger_home_isolates_the_socket() {
        let l = layout(&[("BANGER_HOME", "/b"), ("XDG_RUNTIME_DIR", "/run/user/1")]);
        assert_eq!(l.socket(), Path::new("/b/run/bangerd.sock"));
        let l = layout(&[("BANGER_HOME", "/b"), ("BANGER_RUNTIME_DIR", "/r")]);
        assert_eq!(l.socket(), Path::new("/r/bangerd.sock"));
    }

    #[test]
    fn no_home_is_an_error() {
        assert!(Layout::from_lookup(|_| None).is_err());
    }
}
