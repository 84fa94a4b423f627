//! VMM backends behind one trait. Callers never switch on the backend: what differs is in
//! [`Capabilities`]. QEMU (`-M microvm`) is implemented; Firecracker comes next.

pub mod accel;
pub mod process;
pub mod qemu;
pub mod qmp;

use std::path::PathBuf;

pub use accel::Accel;

/// Why a VMM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary is not installed.
    #[error("{0} is not installed")]
    MissingBinary(String),
    /// The VMM exited before the VM ran.
    #[error("{binary} did not start: {message}")]
    LaunchFailed { binary: String, message: String },
    /// The control socket (QMP / API) refused or broke.
    #[error("control socket {path}: {message}")]
    Control { path: String, message: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
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
}
