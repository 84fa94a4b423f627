//! Requests and responses of the daemon's `/v1` routes. The JSON shapes here are also the
//! CLI's `--json` output, so they are stable: fields may be added, never renamed or removed.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Lifecycle state of a VM. Legal transitions are checked in `banger-core`'s model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded, disks made, never started.
    Created,
    /// A start is in progress.
    Starting,
    /// The VMM runs and the guest answered over SSH.
    Running,
    /// A stop is in progress.
    Stopping,
    /// Not running; disks kept.
    Stopped,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Size of the work disk (mounted at /root in the guest) in bytes.
    pub disk_size_bytes: u64,
    /// Name of the image the system disk is made from.
    pub image: String,
}

/// Runtime facts of a VM that runs (or ran last). Absent for a VM that never started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
}

/// A VM as the daemon reports it (`GET /v1/vms/{name}`, `banger vm show --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
}

/// `POST /v1/vms`. Omitted fields take the daemon's configured defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
}
