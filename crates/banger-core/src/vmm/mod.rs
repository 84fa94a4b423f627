//! VMM backends behind one trait. Callers never switch on the backend: what differs is in
//! [`Capabilities`]. Firecracker (API socket) and QEMU `-M microvm` (QMP) implement it; [`Vmm`]
//! is the closed set of both (the trait's native async fns are not dyn-compatible), and
//! [`stop_sequence`] is the backend-neutral part of the §5 stop.

pub mod accel;
pub mod cgroup;
pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod select;

use std::path::PathBuf;
use std::time::Duration;

pub use accel::Accel;

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

/// What a backend can do, so callers decide by capability, not by backend name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Needs a tap device (no user-mode networking).
    pub needs_tap: bool,
    /// Can use qcow2 overlays for the system disk.
    pub supports_qcow2: bool,
    /// Can save and restore guest memory.
    pub supports_memory_snapshot: bool,
    /// Can pause and resume the vCPUs.
    pub supports_pause: bool,
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
    /// The work disk (raw ext4, mounted at /root).
    pub work_disk: PathBuf,
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

/// Where a memory snapshot lives: the VM state file and the guest memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// How a VM's NIC reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetAttach {
    /// QEMU user-mode networking; `ssh_port` on 127.0.0.1 forwards to the guest's port 22.
    User { ssh_port: u16 },
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

/// A VMM backend.
pub trait Hypervisor: Send + Sync {
    /// Short name stored with the VM: `qemu` or `firecracker`.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

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
    fn shutdown_signal(&self) -> &'static str;

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
}

/// One of banger's backends.
#[derive(Debug, Clone)]
pub enum Vmm {
    Qemu(qemu::Qemu),
    Firecracker(firecracker::Firecracker),
}

impl Hypervisor for Vmm {
    fn name(&self) -> &'static str {
        match self {
            Self::Qemu(q) => q.name(),
            Self::Firecracker(f) => f.name(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        match self {
            Self::Qemu(q) => q.capabilities(),
            Self::Firecracker(f) => f.capabilities(),
        }
    }

    fn shutdown_signal(&self) -> &'static str {
        match self {
            Self::Qemu(q) => q.shutdown_signal(),
            Self::Firecracker(f) => f.shutdown_signal(),
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<VmProcess, VmmError> {
        match self {
            Self::Qemu(q) => q.launch(spec).await,
            Self::Firecracker(f) => f.launch(spec).await,
        }
    }

    async fn request_shutdown(&self, process: &VmProcess) -> Result<(), VmmError> {
        match self {
            Self::Qemu(q) => q.request_shutdown(process).await,
            Self::Firecracker(f) => f.request_shutdown(process).await,
        }
    }

    async fn quit(&self, process: &VmProcess) -> Result<(), VmmError> {
        match self {
            Self::Qemu(q) => q.quit(process).await,
            Self::Firecracker(f) => f.quit(process).await,
        }
    }

    async fn pause(&self, process: &VmProcess) -> Result<(), VmmError> {
        match self {
            Self::Qemu(q) => q.pause(process).await,
            Self::Firecracker(f) => f.pause(process).await,
        }
    }

    async fn resume(&self, process: &VmProcess) -> Result<(), VmmError> {
        match self {
            Self::Qemu(q) => q.resume(process).await,
            Self::Firecracker(f) => f.resume(process).await,
        }
    }

    async fn is_paused(&self, process: &VmProcess) -> Result<bool, VmmError> {
        match self {
            Self::Qemu(q) => q.is_paused(process).await,
            Self::Firecracker(f) => f.is_paused(process).await,
        }
    }

    async fn snapshot(&self, process: &VmProcess, snapshot: &Snapshot) -> Result<(), VmmError> {
        match self {
            Self::Qemu(q) => q.snapshot(process, snapshot).await,
            Self::Firecracker(f) => f.snapshot(process, snapshot).await,
        }
    }

    async fn restore(&self, spec: &LaunchSpec, snapshot: &Snapshot) -> Result<VmProcess, VmmError> {
        match self {
            Self::Qemu(q) => q.restore(spec, snapshot).await,
            Self::Firecracker(f) => f.restore(spec, snapshot).await,
        }
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
/// process ended: `poweroff`, the backend's [`Hypervisor::shutdown_signal`], `quit`, `kill`.
pub async fn stop_sequence<H: Hypervisor>(
    vmm: &H,
    process: &VmProcess,
    marker: &str,
    synced: bool,
    force: bool,
    timings: StopTimings,
) -> &'static str {
    let pid = process.pid;
    if synced && !force && process::wait_gone(pid, marker, timings.poweroff).await {
        return "poweroff";
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
        return "quit";
    }
    process::kill(pid, marker).await;
    "kill"
}
