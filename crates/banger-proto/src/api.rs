//! Requests and responses of the daemon's `/v1` routes. The JSON shapes here are also the
//! CLI's `--json` output, so they are stable: fields may be added, never renamed or removed.

use serde::{Deserialize, Serialize};

/// Lifecycle state of a VM. Legal transitions are checked in `banger-core`'s model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded, disks made, never started.
    Created,
    /// A start is in progress.
    Starting,
    /// The VMM runs and the guest answered over SSH.
    Running,
    /// A stop (or a suspend) is in progress.
    Stopping,
    /// Not running; disks kept.
    Stopped,
    /// The VMM runs with its vCPUs paused (`vm pause`); `vm resume` continues it.
    Paused,
    /// Not running; guest memory and device state are saved in the VM's directory
    /// (`vm suspend`, Firecracker only) and the next `vm start` restores them.
    Suspended,
    /// A start or stop failed in a way that needs attention; `last_error` says why.
    Error,
}

impl VmState {
    /// The state's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Paused => "paused",
            Self::Suspended => "suspended",
            Self::Error => "error",
        }
    }

    /// Parses the wire name.
    pub fn from_wire(text: &str) -> Option<Self> {
        [
            Self::Created,
            Self::Starting,
            Self::Running,
            Self::Stopping,
            Self::Stopped,
            Self::Paused,
            Self::Suspended,
            Self::Error,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a VM is made of. Fixed at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmSpec {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Size of the work disk (mounted at /root in the guest) in bytes.
    pub disk_size_bytes: u64,
    /// Name of the image the system disk is made from.
    pub image: String,
    /// VMM backend chosen at create: `qemu` or `firecracker`.
    #[serde(default = "default_vmm")]
    pub vmm: String,
    /// Why that backend (e.g. `auto: qemu, because firecracker is not installed`).
    #[serde(default)]
    pub vmm_reason: String,
    /// How the system disk was made: `qcow2`, `reflink`, `dm` or `copy`.
    #[serde(default = "default_system_disk")]
    pub system_disk: String,
    /// Size of the system disk the guest sees, in bytes (read from the disk; absent when it
    /// cannot be read). The root filesystem grows into it at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk_size_bytes: Option<u64>,
}

fn default_vmm() -> String {
    "qemu".into()
}

fn default_system_disk() -> String {
    "qcow2".into()
}

/// Runtime facts of a VM that runs (or ran last). Absent for a VM that never started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmRuntime {
    /// VMM backend: `qemu` or `firecracker`.
    pub vmm: String,
    /// Acceleration in use: `kvm` or `tcg`.
    pub accel: String,
    /// Why this backend and acceleration were chosen.
    pub reason: String,
    /// Process id of the VMM while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Host address and port of the guest's SSH server.
    pub ssh_host: String,
    pub ssh_port: u16,
    /// The jail's root directory on the host when Firecracker runs through its jailer
    /// (`firecracker.jailer`); absent when it runs unjailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
    /// Set (by `vm show`) when the VMM paused the guest because a host read or write of a
    /// disk failed, e.g. "work disk: no space left on the host": nothing was written wrong;
    /// `banger vm resume NAME` continues it once the cause is fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_error: Option<String>,
    /// A Firecracker VM: the daemon starts it through the jailer (`firecracker.jailer` is
    /// set), whether or not it runs now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jailer: bool,
}

/// A VM as the daemon reports it (`GET /v1/vms/{name}`, `banger vm show --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Vm {
    /// Stable random id (32 hex digits).
    pub id: String,
    pub name: String,
    pub state: VmState,
    pub spec: VmSpec,
    /// RFC 3339 UTC timestamps.
    pub created_at: String,
    pub updated_at: String,
    /// The error of the last failed operation, cleared by the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<VmRuntime>,
    /// The VM's network (absent in replies that do not look it up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetwork>,
    /// How the VM's VMM last ended (absent until it stopped once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stop: Option<LastStop>,
    /// What the last start checked on the disks before booting (absent until it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_fsck: Option<StartFsck>,
    /// The VM's named snapshots, counted (absent when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotSummary>,
    /// The snapshot this VM was cloned from (`vm clone`), as `VM/SNAPSHOT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<String>,
}

/// How many named snapshots a VM has and what their files take on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotSummary {
    pub count: u32,
    /// Bytes allocated on the host by the snapshots' disk files.
    pub bytes: u64,
}

/// A named snapshot of a VM's two disks (`vm snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmSnapshot {
    /// Random id (32 hex digits): the snapshot's directory under the VM's.
    pub id: String,
    pub name: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Bytes allocated on the host by its disk files (what only it holds: the data written
    /// between it and the snapshot before it).
    pub bytes: u64,
    /// The snapshot the VM continued from when this one was taken, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Whether the VM's disks now continue from this snapshot (the last one taken or
    /// restored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub current: bool,
    /// VMs cloned from it (they depend on its files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<String>,
    /// Whether it also holds the VM's running state (`--memory`): a VM restored to it
    /// resumes there instead of booting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
    /// What the owner should know of how `vm snapshot create` went (a guest that did not
    /// sync or thaw); only in that answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `GET /v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotList {
    pub vm: String,
    /// Oldest first.
    pub snapshots: Vec<VmSnapshot>,
}

/// `POST /v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateSnapshotRequest {
    /// The snapshot's name (1-63 of a-z, 0-9, '.', '_', '-'); default `snap-YYYYMMDD-HHMMSS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Also save the running VM's memory and device state, so that a restore resumes it
    /// where it was (QEMU; the VM must be running or paused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
}

/// `POST /v1/vms/{name}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloneVmRequest {
    /// The new VM's name.
    pub name: String,
    /// The source's snapshot to clone; default: a new snapshot `clone-NAME` of the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Resume the clone from a memory snapshot instead of booting it: refused, since the
    /// clone would run with its source's identity (host key, machine-id, addresses) in
    /// memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
}

/// Checks a snapshot name: 1-63 characters of `a-z`, `0-9`, `.`, `_` and `-`, starting with a
/// letter or digit.
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "snapshot name {name:?} must have 1 to 63 characters"
        ));
    }
    if let Some(c) = name.chars().find(|c| !ok_char(*c)) {
        return Err(format!(
            "snapshot name {name:?} has {c:?}; use only a-z, 0-9, '.', '_' and '-'"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "snapshot name {name:?} must start with a letter or digit"
        ));
    }
    Ok(())
}

/// Whether a VM's disks were left consistent when its VMM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StopKind {
    /// The guest shut down by itself (power-off after `sync`, ACPI, reboot): its filesystems
    /// were unmounted.
    Clean,
    /// The VMM ended under a running guest (killed, quit, crashed, host crash): the next start
    /// checks the disks first.
    Unclean,
}

impl StopKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Unclean => "unclean",
        }
    }
}

/// Which step of `vm stop`'s sequence ended the VMM, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    /// The guest powered itself off after `sync` and `poweroff` over SSH.
    Poweroff,
    /// QEMU: the guest shut down after the ACPI power button (QMP `system_powerdown`).
    Acpi,
    /// Firecracker (and a guest without ACPI): the guest shut down after Ctrl-Alt-Del.
    CtrlAltDel,
    /// The VMM quit when asked (QMP `quit`, Firecracker SIGTERM) under a running guest.
    Quit,
    /// The VMM was killed (SIGKILL): nothing else ended it within its bound.
    Kill,
}

impl StopMethod {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poweroff => "poweroff",
            Self::Acpi => "acpi",
            Self::CtrlAltDel => "ctrl-alt-del",
            Self::Quit => "quit",
            Self::Kill => "kill",
        }
    }

    /// Whether the guest shut itself down (its filesystems unmounted): the stop is clean.
    pub fn guest_shut_down(self) -> bool {
        matches!(self, Self::Poweroff | Self::Acpi | Self::CtrlAltDel)
    }
}

impl std::fmt::Display for StopMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a VM's VMM last ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastStop {
    pub kind: StopKind,
    /// What ended it: a `vm stop` method (`poweroff`, `acpi`, `ctrl-alt-del`, `quit`, `kill`)
    /// or what the daemon found (e.g. `the VMM exited without the guest shutting down`).
    pub how: String,
    /// The step of `vm stop`'s sequence that ended it, when a stop sequence did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_method: Option<StopMethod>,
    /// RFC 3339 UTC.
    pub at: String,
}

/// What a start checked on a VM's disks before booting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartFsck {
    /// RFC 3339 UTC.
    pub at: String,
    /// Whether `e2fsck` ran on any disk.
    pub ran: bool,
    /// Why it ran or not (e.g. `the last stop was clean (poweroff)`).
    pub why: String,
    /// One entry per disk considered when it ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskFsck>,
}

/// The check of one disk at a start: `e2fsck -p` on the host before the boot, or the guest's
/// own fsck of `/` at boot (a disk the host cannot open, e.g. a qcow2 overlay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskFsck {
    /// `work` or `system`.
    pub disk: String,
    pub result: FsckResult,
    /// Who checked it (absent in records from before the guest's check: the host).
    #[serde(default, skip_serializing_if = "FsckBy::is_host")]
    pub checked_by: FsckBy,
    /// e2fsck's exit status, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// e2fsck's last line, or why the disk was not checked.
    pub detail: String,
}

/// Who checks a disk after an unclean stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FsckBy {
    /// The daemon, with `e2fsck -p` before the boot.
    #[default]
    Host,
    /// The guest's systemd-fsck-root at boot, before `/` is mounted read-write; the daemon
    /// reads its result over SSH once the guest is up.
    Guest,
}

impl FsckBy {
    /// Whether this is [`FsckBy::Host`] (left out of the JSON).
    pub fn is_host(&self) -> bool {
        *self == Self::Host
    }
}

/// Outcome of a disk's check (`e2fsck -p` on the host, or the guest's boot fsck).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FsckResult {
    /// Nothing to repair (exit 0).
    Clean,
    /// Repaired, journal replay included (exit 1 or 2).
    Repaired,
    /// Not repairable automatically (exit 4 or more): the start was refused.
    Failed,
    /// Not checked (e.g. a qcow2 system disk the guest did not check at boot; `detail` says why).
    Skipped,
}

impl FsckResult {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Repaired => "repaired",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// `PATCH /v1/vms/{name}` (`banger vm set`): the resources to change; omitted fields stay.
/// CPUs, memory and the system disk change only while the VM is stopped; the work disk also
/// grows while a QEMU VM runs. Disks only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetVmRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// New size of the work disk in bytes (at least its current size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_bytes: Option<u64>,
    /// New size of the system disk in bytes (at least its current size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk_size_bytes: Option<u64>,
}

/// What `PATCH /v1/vms/{name}` changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SetVmResult {
    /// The VM with its new spec.
    pub vm: Vm,
    /// What changed: `cpus`, `memory`, `disk`, `system_disk` (empty: nothing did).
    pub changed: Vec<String>,
    /// Whether the work disk was grown under the running guest (its /root grew at once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub online: bool,
    /// What did not happen as asked without failing the change (e.g. the guest could not
    /// grow /root now, so the next start grows it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A VM's network: `bridge` with its lease, `user` (QEMU user-mode networking with
/// outbound access) or `isolated` (user mode without outbound access).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmNetwork {
    /// `bridge`, `user` or `isolated`.
    pub mode: String,
    /// Published ports (`vm create -p`, `vm port add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::PortMapping>,
    /// Bridge mode: the leased address (`NAME.vm` resolves to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Bridge mode: the VM's tap device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// `POST /v1/vms`. Omitted fields take the daemon's configured defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_bytes: Option<u64>,
    /// VMM backend: `auto` (default from config), `firecracker` or `qemu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<String>,
    /// `bridge`, `user` (outbound network) or `isolated` (user mode, no outbound network);
    /// default: bridge when the root helper answers, else user (or isolated with
    /// `network.egress = false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Ports to publish (`[HOSTIP:]HOSTPORT:GUESTPORT[/udp]`), user and isolated modes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::PortMapping>,
    /// When `image` is a registry reference: whether to pull it (default `missing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullPolicy>,
    /// Id under which `GET /v1/transfers/{id}` reports an autopull's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
}

/// `vm create --pull`: when an image given as a registry reference is pulled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only use what is stored; fail when the image is not.
    Never,
    /// Pull when no image from this reference is stored.
    #[default]
    Missing,
    /// Pull every time (fetching only the blobs not stored yet).
    Always,
}

/// A VM's bridge lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseInfo {
    pub vm: String,
    pub ip: String,
    pub tap: String,
}

/// `GET /v1/network`: banger's bridge network as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkStatus {
    /// The configured mode: `auto`, `bridge` or `user`.
    pub mode: String,
    pub helper_socket: String,
    /// Whether the root helper answers.
    pub helper: bool,
    /// Why it does not, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The owner's bridge (`bg<uid>`), when the helper answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The owner's nftables table (`ip banger_<uid>`), when the helper answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    pub bridge_up: bool,
    pub nft_table: bool,
    pub taps: Vec<String>,
    /// Where the `NAME.vm` DNS server listens, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    pub leases: Vec<LeaseInfo>,
}

/// `POST /v1/ssh-config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SshConfigRequest {
    /// Also add one `Include` line to the user's ssh config (idempotent).
    #[serde(default)]
    pub install: bool,
}

/// What `POST /v1/ssh-config` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshConfigResult {
    /// The generated file.
    pub path: String,
    /// Hosts in it (`NAME.vm`).
    pub hosts: Vec<String>,
    /// The user's ssh config holding the Include (with `install`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_config: Option<String>,
    /// Whether the Include line was added now (false: it was there).
    pub include_added: bool,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub socket: String,
    pub data_dir: String,
    pub runtime_dir: String,
    pub log_file: String,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub uptime_secs: u64,
    /// The daemon's own resident memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// VMs whose VMM runs now (running or paused).
    #[serde(default)]
    pub running_vms: u32,
}

/// A kernel (+ optional initrd) in the store (`banger kernel ls --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Kernel {
    pub name: String,
    /// sha256 over the kernel and initrd; names the directory holding them.
    pub digest: String,
    /// `uname -r` of the kernel, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    pub has_initrd: bool,
    /// Where it came from: `build-default` or `import:<path>`.
    pub source: String,
    pub created_at: String,
    /// Warnings found at import (e.g. unusable under Firecracker); not stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What the kernel can boot, read from its configuration or ELF file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<KernelCapabilities>,
}

/// What a kernel can boot, read from its build configuration (a `config` file beside it, or
/// its embedded IKCONFIG) or, without one, from its ELF file (`from` says which).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KernelCapabilities {
    /// Finds virtio-mmio devices declared on its command line (`virtio_mmio.device=`), as
    /// Firecracker declares them: `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`, virtio-mmio built in.
    pub virtio_mmio_cmdline: bool,
    /// Finds virtio-mmio devices through ACPI (how QEMU microvm declares them by default).
    pub acpi_virtio: bool,
    /// Cannot mount a virtio-blk ext4 root by itself (drivers are modules): needs an initrd.
    pub needs_initrd: bool,
    /// Has a PVH entry point (QEMU boots an ELF vmlinux only through it).
    pub pvh: bool,
    /// `config` (a build configuration) or `elf` (strings and notes of the ELF file).
    pub from: String,
}

/// `POST /v1/kernels/build`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildKernelRequest {
    /// Kernel name (default `microvm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Rebuild even when a kernel of the same recipe is cached or stored.
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/kernels/build/progress`: the running kernel build, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KernelBuildProgress {
    pub running: bool,
    /// 0–100.
    pub percent: u8,
    /// What the build does now (`unpacking …`, `compiling (N steps)`).
    pub step: String,
}

/// An image: a root filesystem (raw ext4) plus the kernel it boots (`banger image ls --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Image {
    pub name: String,
    /// sha256 of the root filesystem file; names the directory holding it.
    pub digest: String,
    /// Name of the kernel it boots.
    pub kernel: String,
    pub size_bytes: u64,
    /// Where it came from: `build:<recipe digest>`, `import:<path>` or `pull:<ref>@<digest>`.
    pub source: String,
    pub created_at: String,
    /// The image's work-seed (what a new VM's /root starts with), by digest; none when the
    /// image has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_seed: Option<String>,
    /// What `vm exec` runs with in VMs of this image (an image built `--from` a container
    /// image keeps its ENV, WORKDIR and USER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecDefaults>,
}

/// Defaults of `vm exec` in VMs of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecDefaults {
    /// `NAME=VALUE` pairs set for the command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Where the command runs when no workspace was prepared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The guest user the command runs as (a name; root when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST /v1/images/import`: register local files as an image (and its kernel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImportImageRequest {
    pub name: String,
    /// Absolute path of a raw ext4 root filesystem.
    pub rootfs: String,
    /// Absolute path of the kernel (ELF vmlinux or bzImage), or the name of a stored kernel.
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Absolute path of a directory whose tree a new VM's /root starts with (symlinks kept
    /// as links; every file the guest root's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_seed: Option<String>,
}

/// `POST /v1/kernels/import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImportKernelRequest {
    pub name: String,
    /// Absolute path of the kernel (ELF vmlinux or bzImage).
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

/// `POST /v1/images/build`: build the default Debian image (and kernel when missing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    /// Image name (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Debian mirror URL (default: the host's apt configuration, or `images.mirror` in config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Rebuild even when an image of the same recipe exists.
    #[serde(default)]
    pub force: bool,
    /// Absolute path of a directory whose tree a new VM's /root starts with (symlinks kept
    /// as links; every file the guest root's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_seed: Option<String>,
    /// Build from this container image instead of the recipe: `HOST[:PORT]/REPO[:TAG]` in a
    /// registry, or `oci:/ABSOLUTE/DIR[:TAG]` (an OCI image layout). Debian-family images
    /// with apt only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Plain HTTP to a `from` registry that is not on loopback.
    #[serde(default)]
    pub insecure: bool,
    /// The kernel a recipe image boots (default: banger's microVM kernel).
    #[serde(default)]
    pub kernel: ImageKernel,
}

/// The kernel `image build` gives a recipe image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ImageKernel {
    /// banger's microVM kernel (`banger kernel build`): no initrd, no modules, faster boots;
    /// compiled once per recipe (minutes), then cached.
    #[default]
    Microvm,
    /// Debian's cloud kernel with its initrd and modules (stored under the image's name).
    Debian,
}

impl ImageKernel {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Microvm => "microvm",
            Self::Debian => "debian",
        }
    }
}

/// `GET /v1/images/build/progress`: the image build running now, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildProgress {
    /// Whether a build (or another image store operation) runs.
    pub running: bool,
    /// The build's latest progress line, e.g. `build-rootfs: step 3/4: mkfs.ext4 -d tarball
    /// (e2fsprogs 1.47.2) (165s)` or `build-rootfs: root filesystem tarball: 342M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// `POST /v1/vms/{name}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StopVmRequest {
    /// Skip the graceful power-off: a bounded `sync` over SSH, then kill the VMM.
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/vms/{name}/ssh`: how to reach a running guest with OpenSSH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// banger's private key.
    pub identity_file: String,
    /// The VM's pinned host key, under `host_key_alias`.
    pub known_hosts_file: String,
    pub host_key_alias: String,
    /// Where a connection-sharing master may put its socket.
    pub control_path: String,
    /// Where `vm exec` runs commands: /root/repo once a workspace was prepared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Where `vm exec` runs commands when no workspace was prepared: the image's working
    /// directory, if it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_workdir: Option<String>,
    /// `NAME=VALUE` pairs `vm exec` sets (the image's environment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The guest user `vm exec` runs commands as (the image's; root when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_user: Option<String>,
}

/// `GET /v1/vms/{name}/console?offset=N`: serial console output from byte `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConsoleChunk {
    /// The bytes from `offset` (lossy UTF-8), at most 1 MiB.
    pub data: String,
    /// Offset to ask for next.
    pub next_offset: u64,
    /// Whether the VM still runs (more output may come).
    pub running: bool,
    /// For a VM that is not running: why it last stopped or failed to start, when that was
    /// not `vm stop` (e.g. Firecracker's own reason for exiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Result of `POST /v1/vms/{name}/start|stop|pause|resume|suspend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LifecycleResult {
    pub vm: Vm,
    /// False when the VM already was in the requested state (the call was a no-op).
    pub changed: bool,
    /// `stop` only: which step of the stop sequence ended the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_method: Option<StopMethod>,
    /// `start` only: true when the VM was restored from its suspend snapshot instead of booted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restored: bool,
    /// Things that went wrong without failing the operation (e.g. a snapshot that could not
    /// be loaded, so the VM was booted from its disks instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Outcome of one `banger doctor` check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// Nothing to do.
    Ok,
    /// banger works, but something is slower or a secondary command (e.g. `image build`)
    /// will not.
    Warn,
    /// A core command (`vm create`, `vm start`) will fail until this is fixed.
    Fail,
}

impl CheckStatus {
    /// The status's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One row of `GET /v1/doctor` (`banger doctor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctorCheck {
    /// What was checked: `kvm`, `qemu`, `qemu-img`, `mkfs.ext4`, `ssh`, `ssh-keygen`,
    /// `debugfs`, `mmdebstrap`, `newuidmap`, `cpio`, `busybox`, `disk-space`, `tun`, `default-image`.
    pub name: String,
    pub status: CheckStatus,
    /// What was found (a path, a version, a reason).
    pub detail: String,
    /// How to fix it; present on every `warn` and `fail` row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `GET /v1/doctor`: the host checks of `banger doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctorReport {
    /// Every check, in a fixed order.
    pub checks: Vec<DoctorCheck>,
    /// True when no check has status `fail` (warnings allowed).
    pub ok: bool,
}

impl DoctorReport {
    /// A report over `checks`, with `ok` computed from them.
    pub fn from_checks(checks: Vec<DoctorCheck>) -> Self {
        let ok = checks.iter().all(|c| c.status != CheckStatus::Fail);
        Self { checks, ok }
    }
}

/// `POST /v1/vms/{name}/workspace/prepare`: copy a host directory into the guest's /root/repo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PrepareWorkspaceRequest {
    /// Absolute host path: the top level of a git repository (or any directory with `no_git`).
    pub path: String,
    /// Copy a plain directory (every file under it) instead of a git repository's file set.
    #[serde(default)]
    pub no_git: bool,
}

/// Result of a prepare: what was sent. The first prepare sends everything; later ones only
/// what changed since the manifest of the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrepareResult {
    /// Canonical host path prepared from.
    pub host_path: String,
    /// HEAD of the host repository at prepare (absent for `no_git` or an empty repo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Entries in the workspace (files, symlinks, and directories under `.git`).
    pub files_total: u64,
    /// Entries sent in this prepare.
    pub files_sent: u64,
    /// File content bytes sent.
    pub bytes_sent: u64,
    /// Bytes written to the guest (lists, tar headers and padding included).
    pub wire_bytes: u64,
    /// Paths deleted in the guest because they are gone (or changed kind) on the host.
    pub files_deleted: u64,
    pub elapsed_ms: u64,
    /// How the tar reached the guest.
    #[serde(default)]
    pub channel: TransferChannel,
}

/// How a prepare's tar reached the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum TransferChannel {
    /// The SSH session's stdin (small transfers, Firecracker, images without the port).
    #[default]
    Ssh,
    /// The VM's virtio-serial workspace port (QEMU): unencrypted, local to the host user.
    VirtioSerial,
}

/// How one side differs from the last prepare. Lists hold at most 100 paths each; the
/// counts are complete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkspaceDiff {
    pub added: Vec<String>,
    pub modified: Vec<String>,
    pub removed: Vec<String>,
    pub added_count: u64,
    pub modified_count: u64,
    pub removed_count: u64,
}

impl WorkspaceDiff {
    /// Number of paths that differ.
    pub fn total(&self) -> u64 {
        self.added_count + self.modified_count + self.removed_count
    }
}

/// `GET /v1/vms/{name}/workspace`: what was prepared and what differs now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkspaceStatus {
    /// Whether a workspace was ever prepared in this VM.
    pub prepared: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    pub git: bool,
    /// HEAD at the last prepare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// HEAD of the host repository now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_now: Option<String>,
    /// RFC 3339 UTC time of the last prepare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared_at: Option<String>,
    /// Host files (outside `.git`) that differ from what was prepared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<WorkspaceDiff>,
    /// Guest files (outside `.git`) that differ from what was prepared, by size and mtime
    /// (only when asked with `guest=true`; needs a running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<WorkspaceDiff>,
    /// Whether the host differs: HEAD moved or files differ.
    pub host_dirty: bool,
}

/// `POST /v1/vms/{name}/workspace/export`: the guest's changes since the last prepare, as a
/// patch file (`patch`) or as files under a directory (`to`). Exactly one is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExportWorkspaceRequest {
    /// Absolute host path of the patch file to write (`git apply` takes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Absolute host directory to write added and modified files into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Result of an export.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExportResult {
    /// The patch file or directory written.
    pub written: String,
    /// Bytes written (patch size, or file bytes).
    pub bytes: u64,
    /// Files written (`to`); 0 for a patch.
    pub files: u64,
    /// Paths deleted in the guest since prepare (with `to`, listed, not deleted on the host).
    pub deleted: Vec<String>,
}

/// Which way a `vm cp` goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum CopyDirection {
    /// From `host_path` on the host into `guest_path` in the guest.
    #[default]
    ToGuest,
    /// From `guest_path` in the guest to `host_path` on the host (through the guest-tar
    /// checks of `workspace export`).
    FromGuest,
}

/// `POST /v1/vms/{name}/cp`: copies a file, symlink or directory between the host and the
/// guest. The destination works like `cp -r`/`docker cp`: an existing directory receives the
/// source under its own name; otherwise the destination becomes the copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    pub direction: CopyDirection,
    /// Absolute host path (source or destination).
    pub host_path: String,
    /// Guest path (source or destination); relative paths are under /root.
    pub guest_path: String,
}

/// Result of a `vm cp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CopyResult {
    /// The path written (host or guest).
    pub written: String,
    /// Entries copied (files, directories, symlinks).
    pub entries: u64,
    /// File content bytes copied.
    pub bytes: u64,
    /// Guest entries not written on the host, with why (first 100): `.git` paths, special
    /// files, symlinks pointing outside the copy.
    #[serde(default)]
    pub skipped: Vec<String>,
    #[serde(default)]
    pub skipped_count: u64,
    /// How the tar reached the guest (to the guest only).
    #[serde(default)]
    pub channel: TransferChannel,
    pub elapsed_ms: u64,
}

/// `GET /v1/vms/{name}/workspace/progress`: the prepare running now, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrepareProgress {
    /// Whether a prepare runs (all counters are 0 otherwise).
    pub running: bool,
    pub files_sent: u64,
    /// Files this prepare sends (0 while the host is still being scanned).
    pub files_total: u64,
    pub bytes_sent: u64,
    pub bytes_total: u64,
}

/// Credentials and transport for one registry operation (`--username/--password-stdin`,
/// `--insecure`). Without a username the daemon's user's `~/.docker/config.json` is used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegistryAccess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/images/push` and `POST /v1/kernels/push`: send a stored image or kernel to
/// `reference` (`REGISTRY/REPOSITORY:TAG`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    pub name: String,
    pub reference: String,
    #[serde(default)]
    pub access: RegistryAccess,
    /// Id under which `GET /v1/transfers/{id}` reports progress (chosen by the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
}

/// `POST /v1/images/pull` and `POST /v1/kernels/pull`: fetch `reference` and store it as
/// `name` (default: the repository's last component and the tag, `dev-1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub access: RegistryAccess,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
}

/// What a push or pull did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TransferResult {
    /// The local image or kernel name.
    pub name: String,
    pub reference: String,
    /// Digest of the manifest pushed or pulled.
    pub manifest_digest: String,
    /// Blobs sent or fetched.
    pub blobs: u64,
    /// Blobs skipped (already in the registry, or already stored locally).
    pub skipped: u64,
    /// Compressed bytes sent or fetched.
    pub bytes: u64,
}

/// `GET /v1/transfers/{id}`: counters of a running push or pull.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TransferProgress {
    /// Whether the transfer runs (all counters are 0 otherwise).
    pub running: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub blobs: u64,
    pub skipped: u64,
}

/// Answer of `POST /v1/images/pull` and `POST /v1/kernels/pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PullResult {
    pub transfer: TransferResult,
    /// The image stored (image pulls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// The kernel stored (an image pull stores its kernel under the image's name).
    pub kernel: Kernel,
}

/// What a VM costs right now (`GET /v1/stats`, `banger vm stats --json`). Figures that cannot be
/// known (no process for a stopped VM, no guest answer) are absent, never zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmStats {
    pub name: String,
    pub state: VmState,
    /// Seconds since the VMM process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<f64>,
    /// CPU time the VMM process used (user + system), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_secs: Option<f64>,
    /// The VMM's CPU use in percent of one core: over the time since the daemon's previous
    /// sample of this VM (at least 0.1 s ago), else the average since the process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the VMM process (guest memory it touched plus its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The VM's disks on the host: virtual size and the bytes actually allocated.
    pub disks: Vec<DiskUsage>,
    /// Network counters, from the guest's point of view (`rx` = received by the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetCounters>,
    /// Figures from inside the guest (`--guest`), one SSH round trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestStats>,
}

/// One disk of a VM on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskUsage {
    /// `system` or `work`.
    pub disk: String,
    /// Size the guest sees.
    pub virtual_bytes: u64,
    /// Bytes allocated on the host (sparse and copy-on-write aware: blocks, not length).
    pub allocated_bytes: u64,
}

/// Network counters of a VM's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetCounters {
    /// Where they were read: `tap` (the host side of a bridge VM's tap) or `guest` (the
    /// guest's eth0, user-mode VMs with `--guest`).
    pub source: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Figures read inside the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestStats {
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Use of the root filesystem.
    pub root_fs: FsUsage,
    /// Use of /root (the work disk).
    pub work_fs: FsUsage,
}

/// A filesystem's size and use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FsUsage {
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}
