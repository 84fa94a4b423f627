//! VMM backends behind one trait. Firecracker (API socket) and QEMU `-M microvm` (QMP)
//! implement [`Hypervisor`] (native async fns); callers hold a backend as
//! `Arc<dyn VmBackend>` (the same methods with boxed futures) and never switch on which one it
//! is: what differs is in the backend's methods and its [`Capabilities`] (only the backend
//! choice, `select`, weighs them by name). [`stop_sequence`] is the backend-neutral part of the
//! §5 stop.

pub mod accel;
pub mod cgroup;
pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod select;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use accel::Accel;
pub use banger_proto::StopMethod;

use crate::domain::{SystemDiskStrategy, VmmKind};

/// Why a VMM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary is not installed.
    #[error("{0} is not installed")]
    MissingBinary(String),
    /// `firecracker.jailer` names no executable file.
    #[error("Firecracker's jailer {0:?} (firecracker.jailer) is not installed")]
    MissingJailer(String),
    /// The root helper could not remove a VM's jail.
    #[error("cannot remove the VM's jail: {0}")]
    JailRemoval(String),
    /// The host port forwarded to the guest's SSH server was taken before the VMM bound it
    /// (user-mode networking picks a free port, which another process can take first).
    #[error("{binary} did not start: port {port} on 127.0.0.1 is taken: {message}")]
    PortTaken {
        binary: String,
        port: u16,
        message: String,
    },
    /// The VMM exited before the VM ran.
    #[error("{binary} did not start: {message}")]
    LaunchFailed { binary: String, message: String },
    /// The control socket (QMP / API) refused or broke.
    #[error("control socket {path}: {message}")]
    Control { path: String, message: String },
    /// Firecracker answered a request with an error (its `fault_message`).
    #[error("firecracker refused {request} ({status}): {fault}")]
    Api {
        request: String,
        status: u16,
        fault: String,
    },
    /// The VMM binary is older than banger supports.
    #[error("{binary} is version {found}; banger needs {minimum} or newer")]
    TooOld {
        binary: String,
        found: String,
        minimum: String,
    },
    /// The backend needs a tap device and none was given.
    #[error("Firecracker needs a tap device (bridge networking), and none is set up")]
    NeedsTap,
    /// The backend cannot do this.
    #[error("this VMM backend cannot {0}")]
    Unsupported(&'static str),
    /// A disk resize that would shrink the disk (never sent to the VMM).
    #[error("refusing to shrink the {disk} disk from {current} to {requested} bytes")]
    WouldShrink {
        disk: &'static str,
        current: u64,
        requested: u64,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// Maps a failure to spawn `binary`: not found means not installed.
    pub fn spawn(binary: &str) -> impl FnOnce(std::io::Error) -> Self {
        let binary = binary.to_owned();
        move |e| match e.kind() {
            std::io::ErrorKind::NotFound => Self::MissingBinary(binary),
            _ => Self::LaunchFailed {
                binary,
                message: e.to_string(),
            },
        }
    }
}

/// Which way [`Hypervisor::forward_port`] changes a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortForward {
    Add,
    Remove,
}

/// What a backend can do, so callers decide by capability, not by backend name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Needs a tap device (no user-mode networking).
    pub needs_tap: bool,
    /// Can use qcow2 overlays for the system disk (then its default system disk).
    pub supports_qcow2: bool,
    /// Runs only under KVM (no software emulation).
    pub requires_kvm: bool,
    /// Can save and restore guest memory.
    pub supports_memory_snapshot: bool,
    /// Can pause and resume the vCPUs.
    pub supports_pause: bool,
    /// Declares its virtio-mmio devices only on the kernel command line (no ACPI): boots only
    /// kernels with `virtio_mmio_cmdline` and no need of an initrd it lacks.
    pub cmdline_devices_only: bool,
    /// Takes its tap as a queue the root helper opened ([`LaunchSpec::tap_fd`]) instead of
    /// opening `/dev/net/tun` itself (which is root's only on hosts without udev's rule).
    pub tap_fd: bool,
}

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub vm_id: String,
    pub vm_name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The system disk (qcow2 overlay or raw).
    pub system_disk: PathBuf,
    pub system_disk_format: &'static str,
    /// The work disk (ext4, mounted at /root): raw, or (QEMU, once the VM has a named
    /// snapshot) a qcow2 overlay.
    pub work_disk: PathBuf,
    pub work_disk_format: &'static str,
    /// Directory for sockets and the pid file.
    pub runtime_dir: PathBuf,
    /// File receiving the serial console.
    pub console_log: PathBuf,
    /// How the guest's NIC is attached.
    pub net: NetAttach,
    /// Guest MAC address.
    pub mac: String,
    /// Host tap device for the NIC (bridge networking); `None` means user-mode networking.
    pub tap: Option<String>,
    /// An open queue of the tap (from the root helper) for a backend with
    /// [`Capabilities::tap_fd`]; the VMM inherits it.
    pub tap_fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// How the guest kernel finds its virtio-mmio devices (QEMU declares them either way;
    /// Firecracker only on the command line).
    pub devices: DeviceDiscovery,
}

/// How a kernel finds its virtio-mmio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDiscovery {
    /// Through ACPI tables (Debian's cloud kernel, whose virtio drivers are modules).
    Acpi,
    /// From `virtio_mmio.device=` entries on the kernel command line, no ACPI: Firecracker's
    /// way, and banger's microVM kernel's.
    CommandLine,
}

/// One of a VM's two disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmDisk {
    /// The system disk (the guest's `/`).
    System,
    /// The work disk (the guest's `/root`).
    Work,
}

impl VmDisk {
    /// `system` or `work`, as `vm stats` and `vm show` name them.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Work => "work",
        }
    }
}

/// Where a memory snapshot lives: the VM state file and the guest memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// New top files for a running VM's two disks ([`Hypervisor::switch_disks`]): each an empty
/// qcow2 overlay over the file the VMM writes now; `tag` names the switch, so whether it
/// happened can be asked later ([`Hypervisor::disks_switched`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSwitch {
    pub system: PathBuf,
    pub work: PathBuf,
    /// The files the VMM writes now, by their current names (the VMM may know them by a
    /// name they had when it opened them).
    pub system_now: PathBuf,
    pub work_now: PathBuf,
    /// Letters and digits, at most 24 of them.
    pub tag: String,
}

/// How a VM's NIC reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetAttach {
    /// QEMU user-mode networking; `ssh_port` on 127.0.0.1 forwards to the guest's port 22,
    /// `ports` are the VM's published ports; `isolated`: no outbound network
    /// (`restrict=on`, only the forwards reach the guest).
    User {
        ssh_port: u16,
        isolated: bool,
        ports: Vec<banger_proto::PortMapping>,
    },
    /// A tap device (made by the root helper, owned by the user, attached to the bridge).
    Tap { name: String },
}

/// A launched VMM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProcess {
    pub pid: u32,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control_socket: PathBuf,
    /// The jail's root on the host when Firecracker runs through the jailer.
    pub jail: Option<PathBuf>,
}

/// Why a backend cannot use a system disk strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskRefusal {
    /// The backend cannot open such a disk at all (the request is wrong).
    Format(String),
    /// How the backend is set up here excludes it (e.g. the jailer's chroot).
    Setup { message: String, hint: String },
}

/// Boot arguments of a kernel that finds its devices on the command line, without ACPI
/// (Firecracker's guests, and banger's microVM kernel under QEMU): `reboot=k` + `panic=1` so
/// a guest reboot or panic ends the VMM; the i8042 ones skip probing for devices such a VM
/// does not have (tens of ms) while keeping the keyboard controller Ctrl-Alt-Del needs;
/// `acpi=off` so a kernel that also reads ACPI (banger's microVM kernel) takes its devices
/// from the command line only, whatever tables the VMM has.
pub const NO_ACPI_BOOT_ARGS: &str =
    "acpi=off reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// A VMM backend.
pub trait Hypervisor: Send + Sync {
    /// The kind stored with the VM.
    fn kind(&self) -> VmmKind;

    /// The name users know it by (`QEMU`, `Firecracker`).
    fn display_name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Kernel arguments this backend's guests need (before banger's own).
    fn boot_args(&self) -> &'static str;

    /// What the guest runs over SSH to flush its disks and end the VMM by itself.
    fn guest_stop_script(&self) -> &'static str;

    /// Where a VM's control socket lives, given its runtime directory (so a running VMM can
    /// be reattached by pid).
    fn control_socket(&self, runtime_dir: &Path) -> PathBuf;

    /// Refuses before anything is made when the backend, as configured, cannot work (e.g. a
    /// configured jailer that is not installed).
    fn preflight(&self) -> Result<(), VmmError> {
        Ok(())
    }

    /// Whether device-mapper system disks can reach this backend's VMs, or why not.
    fn dm_disks(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether this backend starts its VMMs confined by a jailer (chroot, own uid, cgroup).
    fn jailed(&self) -> bool {
        false
    }

    /// Whether this backend can run a VM on a `strategy` system disk.
    fn check_system_disk(&self, _strategy: SystemDiskStrategy) -> Result<(), DiskRefusal> {
        Ok(())
    }

    /// Removes what the backend keeps outside the VM's directories for a VM that no longer
    /// runs (Firecracker's jail); idempotent. Blocking (it may ask the root helper, which
    /// logs `op_id`: the daemon operation it serves).
    fn remove_jail(&self, _op_id: &str, _vm_id: &str) -> Result<(), VmmError> {
        Ok(())
    }

    /// Why the VMM of the VM whose data dir is `vm_dir` ended, in its own words, when it left
    /// them there (Firecracker's log); `None` when it says nothing. Blocking (small reads).
    fn exit_reason(&self, _vm_dir: &Path) -> Option<String> {
        None
    }

    /// Starts the VMM detached from the daemon (it survives a daemon restart) and returns once
    /// the VMM runs the guest. Leaves nothing behind on error.
    fn launch(
        &self,
        spec: &LaunchSpec,
    ) -> impl std::future::Future<Output = Result<VmProcess, VmmError>> + Send;

    /// Asks the guest to shut down through the VMM (ACPI power button / Ctrl-Alt-Del).
    fn request_shutdown(
        &self,
        process: &VmProcess,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send;

    /// Ends the VMM process through its control socket without the guest's help.
    fn quit(
        &self,
        process: &VmProcess,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send;

    /// How [`Hypervisor::request_shutdown`] asks, as reported by `vm stop`: `acpi` or
    /// `ctrl-alt-del`.
    fn shutdown_signal(&self) -> StopMethod;

    /// Pauses the vCPUs (capability `supports_pause`).
    fn pause(
        &self,
        _process: &VmProcess,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported("pause a VM")))
    }

    /// Resumes paused vCPUs (capability `supports_pause`).
    fn resume(
        &self,
        _process: &VmProcess,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported("resume a VM")))
    }

    /// Whether the vCPUs are paused now, as the VMM itself reports it (capability
    /// `supports_pause`). The daemon's record can lag behind (it died between the VMM's pause
    /// and its own write), so reattaching asks this.
    fn is_paused(
        &self,
        _process: &VmProcess,
    ) -> impl std::future::Future<Output = Result<bool, VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported("report whether a VM is paused")))
    }

    /// Why the VMM paused the guest on a host I/O error (a full data dir), if it did.
    fn io_error(
        &self,
        _process: &VmProcess,
    ) -> impl std::future::Future<Output = Result<Option<String>, VmmError>> + Send {
        std::future::ready(Ok(None))
    }

    /// Adds or removes one published port's forward on a running VM's user-mode network
    /// (capability: not `needs_tap`), without a restart.
    fn forward_port(
        &self,
        _process: &VmProcess,
        _port: &banger_proto::PortMapping,
        _change: PortForward,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported(
            "publish ports on a running VM's user-mode network",
        )))
    }

    /// Writes a memory snapshot of a paused VM (capability `supports_memory_snapshot`).
    fn snapshot(
        &self,
        _process: &VmProcess,
        _snapshot: &Snapshot,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported("snapshot guest memory")))
    }

    /// Starts a VMM from a snapshot instead of booting (capability `supports_memory_snapshot`).
    fn restore(
        &self,
        _spec: &LaunchSpec,
        _snapshot: &Snapshot,
    ) -> impl std::future::Future<Output = Result<VmProcess, VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported("restore a snapshot")))
    }

    /// Makes a running (or paused) VM write to new top files, both disks at one instant
    /// (either both switch or neither): what it wrote before stays in the files it had open.
    /// `Unsupported` when the backend cannot switch disks under a running VM.
    fn switch_disks(
        &self,
        _process: &VmProcess,
        _switch: &DiskSwitch,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported(
            "switch a running VM's disks to new files",
        )))
    }

    /// Whether the VM writes to the tops of the switch tagged `tag` (a daemon that died
    /// around [`Hypervisor::switch_disks`] asks at its next start).
    fn disks_switched(
        &self,
        _process: &VmProcess,
        _tag: &str,
    ) -> impl std::future::Future<Output = Result<bool, VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported(
            "switch a running VM's disks to new files",
        )))
    }

    /// Grows `disk` of the running VM to `size_bytes`; the guest sees the new size at once
    /// (growing its filesystem is the caller's). A size below the disk's current one is
    /// refused ([`VmmError::WouldShrink`]) before the VMM is asked to resize; the same size
    /// changes nothing. `Unsupported` when the backend cannot do it while the VM runs.
    fn grow_disk(
        &self,
        _process: &VmProcess,
        _disk: VmDisk,
        _size_bytes: u64,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send {
        std::future::ready(Err(VmmError::Unsupported("grow a disk while the VM runs")))
    }
}

/// A boxed future: what makes [`VmBackend`] usable as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend as the service holds it (`Arc<dyn VmBackend>`): [`Hypervisor`] with its futures
/// boxed. Every [`Hypervisor`] is one.
pub trait VmBackend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> VmmKind;
    fn display_name(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    fn boot_args(&self) -> &'static str;
    fn guest_stop_script(&self) -> &'static str;
    fn shutdown_signal(&self) -> StopMethod;
    fn control_socket(&self, runtime_dir: &Path) -> PathBuf;
    fn preflight(&self) -> Result<(), VmmError>;
    fn dm_disks(&self) -> Result<(), String>;
    fn jailed(&self) -> bool;
    fn check_system_disk(&self, strategy: SystemDiskStrategy) -> Result<(), DiskRefusal>;
    fn remove_jail(&self, op_id: &str, vm_id: &str) -> Result<(), VmmError>;
    fn exit_reason(&self, vm_dir: &Path) -> Option<String>;
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<VmProcess, VmmError>>;
    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<VmProcess, VmmError>>;
    fn request_shutdown<'a>(
        &'a self,
        process: &'a VmProcess,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
    fn quit<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<(), VmmError>>;
    fn pause<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<(), VmmError>>;
    fn resume<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<(), VmmError>>;
    fn is_paused<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<bool, VmmError>>;
    fn io_error<'a>(
        &'a self,
        process: &'a VmProcess,
    ) -> BoxFuture<'a, Result<Option<String>, VmmError>>;
    fn forward_port<'a>(
        &'a self,
        process: &'a VmProcess,
        port: &'a banger_proto::PortMapping,
        change: PortForward,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
    fn snapshot<'a>(
        &'a self,
        process: &'a VmProcess,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
    fn grow_disk<'a>(
        &'a self,
        process: &'a VmProcess,
        disk: VmDisk,
        size_bytes: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
    fn switch_disks<'a>(
        &'a self,
        process: &'a VmProcess,
        switch: &'a DiskSwitch,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
    fn disks_switched<'a>(
        &'a self,
        process: &'a VmProcess,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<bool, VmmError>>;
}

impl<H: Hypervisor + std::fmt::Debug> VmBackend for H {
    fn kind(&self) -> VmmKind {
        Hypervisor::kind(self)
    }
    fn display_name(&self) -> &'static str {
        Hypervisor::display_name(self)
    }
    fn capabilities(&self) -> Capabilities {
        Hypervisor::capabilities(self)
    }
    fn boot_args(&self) -> &'static str {
        Hypervisor::boot_args(self)
    }
    fn guest_stop_script(&self) -> &'static str {
        Hypervisor::guest_stop_script(self)
    }
    fn shutdown_signal(&self) -> StopMethod {
        Hypervisor::shutdown_signal(self)
    }
    fn control_socket(&self, runtime_dir: &Path) -> PathBuf {
        Hypervisor::control_socket(self, runtime_dir)
    }
    fn preflight(&self) -> Result<(), VmmError> {
        Hypervisor::preflight(self)
    }
    fn dm_disks(&self) -> Result<(), String> {
        Hypervisor::dm_disks(self)
    }
    fn jailed(&self) -> bool {
        Hypervisor::jailed(self)
    }
    fn check_system_disk(&self, strategy: SystemDiskStrategy) -> Result<(), DiskRefusal> {
        Hypervisor::check_system_disk(self, strategy)
    }
    fn remove_jail(&self, op_id: &str, vm_id: &str) -> Result<(), VmmError> {
        Hypervisor::remove_jail(self, op_id, vm_id)
    }
    fn exit_reason(&self, vm_dir: &Path) -> Option<String> {
        Hypervisor::exit_reason(self, vm_dir)
    }
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<VmProcess, VmmError>> {
        Box::pin(Hypervisor::launch(self, spec))
    }
    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<VmProcess, VmmError>> {
        Box::pin(Hypervisor::restore(self, spec, snapshot))
    }
    fn request_shutdown<'a>(
        &'a self,
        process: &'a VmProcess,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::request_shutdown(self, process))
    }
    fn quit<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::quit(self, process))
    }
    fn pause<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::pause(self, process))
    }
    fn resume<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::resume(self, process))
    }
    fn is_paused<'a>(&'a self, process: &'a VmProcess) -> BoxFuture<'a, Result<bool, VmmError>> {
        Box::pin(Hypervisor::is_paused(self, process))
    }
    fn io_error<'a>(
        &'a self,
        process: &'a VmProcess,
    ) -> BoxFuture<'a, Result<Option<String>, VmmError>> {
        Box::pin(Hypervisor::io_error(self, process))
    }
    fn forward_port<'a>(
        &'a self,
        process: &'a VmProcess,
        port: &'a banger_proto::PortMapping,
        change: PortForward,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::forward_port(self, process, port, change))
    }
    fn snapshot<'a>(
        &'a self,
        process: &'a VmProcess,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::snapshot(self, process, snapshot))
    }
    fn grow_disk<'a>(
        &'a self,
        process: &'a VmProcess,
        disk: VmDisk,
        size_bytes: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::grow_disk(self, process, disk, size_bytes))
    }
    fn switch_disks<'a>(
        &'a self,
        process: &'a VmProcess,
        switch: &'a DiskSwitch,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(Hypervisor::switch_disks(self, process, switch))
    }
    fn disks_switched<'a>(
        &'a self,
        process: &'a VmProcess,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<bool, VmmError>> {
        Box::pin(Hypervisor::disks_switched(self, process, tag))
    }
}

/// The backends this daemon can run, by kind: the one place that turns a [`VmmKind`] into a
/// backend.
#[derive(Debug, Clone)]
pub struct Backends {
    qemu: Arc<qemu::Qemu>,
    firecracker: Arc<firecracker::Firecracker>,
}

impl Backends {
    /// The backends as configured; `helper` is where a configured jailer's privileged steps
    /// go.
    pub fn from_config(
        config: &crate::config::Config,
        helper: Arc<dyn crate::host::HostOps>,
    ) -> Self {
        let qemu = qemu::Qemu::new(config.qemu.binary.clone().into())
            .with_tcg_threads(config.qemu.tcg_threads)
            .with_devices(config.qemu.devices);
        let mut firecracker =
            firecracker::Firecracker::new(config.firecracker.binary.clone().into());
        if !config.firecracker.jailer.is_empty() {
            firecracker = firecracker.with_jailer(firecracker::Jailer {
                binary: config.firecracker.jailer.clone().into(),
                host: helper,
            });
        }
        Self {
            qemu: Arc::new(qemu),
            firecracker: Arc::new(firecracker),
        }
    }

    /// The backend of `kind`.
    pub fn get(&self, kind: VmmKind) -> Arc<dyn VmBackend> {
        match kind {
            VmmKind::Qemu => self.qemu.clone(),
            VmmKind::Firecracker => self.firecracker.clone(),
        }
    }

    /// QEMU, which also runs the KVM probe boot.
    pub fn qemu(&self) -> &qemu::Qemu {
        &self.qemu
    }

    /// Firecracker, whose version decides whether `auto` may pick it.
    pub fn firecracker(&self) -> &firecracker::Firecracker {
        &self.firecracker
    }
}

/// Bounds of the stop sequence's waits.
#[derive(Debug, Clone, Copy)]
pub struct StopTimings {
    /// For the guest to power off by itself after the SSH `sync; poweroff`.
    pub poweroff: Duration,
    /// After the backend's shutdown signal (ACPI / Ctrl-Alt-Del).
    pub signal: Duration,
    /// After the backend's quit.
    pub quit: Duration,
}

/// Steps 2–4 of the §5 stop, after step 1 (`sync` and `poweroff` over SSH, whose success is
/// `synced`) was attempted by the caller: wait for the guest's own power-off; the backend's
/// shutdown signal; its quit; SIGKILL. `force` skips the graceful waits. Returns how the
/// process ended: `poweroff`, the backend's [`VmBackend::shutdown_signal`], `quit`, `kill`.
pub async fn stop_sequence(
    vmm: &dyn VmBackend,
    process: &VmProcess,
    marker: &str,
    synced: bool,
    force: bool,
    timings: StopTimings,
) -> StopMethod {
    let pid = process.pid;
    if synced && !force && process::wait_gone(pid, marker, timings.poweroff).await {
        return StopMethod::Poweroff;
    }
    if !force {
        match vmm.request_shutdown(process).await {
            Err(e) => tracing::warn!(pid, "{} request failed: {e}", vmm.shutdown_signal()),
            Ok(()) => {
                if process::wait_gone(pid, marker, timings.signal).await {
                    return vmm.shutdown_signal();
                }
            }
        }
    }
    if process::is_alive(pid, marker)
        && vmm.quit(process).await.is_ok()
        && process::wait_gone(pid, marker, timings.quit).await
    {
        return StopMethod::Quit;
    }
    process::kill(pid, marker).await;
    StopMethod::Kill
}
