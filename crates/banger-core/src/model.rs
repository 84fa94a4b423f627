//! The VM record and its lifecycle: which state may follow which, checked in one place. The
//! record holds domain enums ([`crate::domain`]); [`VmRecord::to_api`] turns them into the
//! proto's strings.

use banger_proto::{LastStop, StartFsck, StopKind, Vm, VmName, VmState};
use serde::{Deserialize, Serialize};

use crate::domain::{Accel, SystemDiskStrategy, VmmKind};

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM cannot go from {from} to {to}")]
pub struct TransitionError {
    pub from: VmState,
    pub to: VmState,
}

/// Checks that `from → to` is a legal lifecycle step.
///
/// Created/Stopped/Suspended/Error → Starting → Running (or back to where it came from when
/// the start is undone, or Error); Running → Stopping → Stopped (or Error); Running ⇄ Paused
/// (`vm pause`/`vm resume`, or what the VMM reports after a daemon restart); Running/Paused →
/// Stopping → Suspended (`vm suspend`: the snapshot is written while Stopping, so a daemon that
/// dies half-way leaves a Stopping VM that reconciliation stops); Running/Paused → Stopped when
/// the VMM was found dead; Error → Stopped once cleaned up; Stopped/Created → Suspended and
/// Suspended → Stopped when a restore of a named snapshot brings or takes a memory state.
pub fn check_transition(from: VmState, to: VmState) -> Result<(), TransitionError> {
    use VmState::*;
    let legal = matches!(
        (from, to),
        (Created | Stopped | Suspended | Error, Starting)
            // Restored to a memory snapshot (its next start resumes it), and from one to
            // a disk snapshot.
            | (Created | Stopped, Suspended)
            | (Suspended, Stopped)
            | (Starting, Running | Error | Created | Stopped | Suspended)
            | (Running, Stopping | Stopped | Error | Paused)
            | (Paused, Running | Stopping | Stopped | Error)
            | (Stopping, Stopped | Error | Running | Paused | Suspended)
            | (Error, Stopped)
    );
    if legal {
        Ok(())
    } else {
        Err(TransitionError { from, to })
    }
}

/// Whether a VM in `state` may be removed without stopping it first.
pub fn removable(state: VmState) -> bool {
    matches!(
        state,
        VmState::Created | VmState::Stopped | VmState::Suspended | VmState::Error
    )
}

/// Whether a VMM process belongs to a VM in `state` (it runs, paused or not).
pub fn has_process(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::Paused)
}

/// What a VM is made of, fixed at create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub cpus: u32,
    pub memory_mib: u64,
    /// Size of the work disk in bytes.
    pub disk_size_bytes: u64,
    /// Name of the image the system disk is made from.
    pub image: String,
    /// The VMM chosen at create.
    pub vmm: VmmKind,
    /// Why that VMM (e.g. `auto: qemu, because firecracker is not installed`).
    pub vmm_reason: String,
    /// How the system disk was made.
    pub system_disk: SystemDiskStrategy,
}

impl VmSpec {
    /// The API view of the spec.
    pub fn to_api(&self) -> banger_proto::VmSpec {
        banger_proto::VmSpec {
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_size_bytes: self.disk_size_bytes,
            image: self.image.clone(),
            vmm: self.vmm.as_str().into(),
            vmm_reason: self.vmm_reason.clone(),
            system_disk: self.system_disk.as_str().into(),
            system_disk_size_bytes: None,
        }
    }
}

/// Runtime facts of a VM that runs (or ran last), stored as JSON with the record (the same
/// document as the proto's `VmRuntime`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    pub vmm: VmmKind,
    pub accel: Accel,
    /// Why this backend and acceleration were chosen.
    pub reason: String,
    /// Process id of the VMM while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Host address and port of the guest's SSH server.
    pub ssh_host: String,
    pub ssh_port: u16,
    /// The jail's root directory on the host when Firecracker runs through its jailer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
}

impl VmRuntime {
    /// The API view of the runtime facts.
    pub fn to_api(&self) -> banger_proto::VmRuntime {
        banger_proto::VmRuntime {
            vmm: self.vmm.as_str().into(),
            accel: self.accel.as_str().into(),
            reason: self.reason.clone(),
            pid: self.pid,
            ssh_host: self.ssh_host.clone(),
            ssh_port: self.ssh_port,
            jail: self.jail.clone(),
            io_error: None,
            jailer: false,
        }
    }
}

/// A VM as stored durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub id: String,
    pub name: VmName,
    pub spec: VmSpec,
    pub state: VmState,
    pub created_at: String,
    pub updated_at: String,
    pub last_error: Option<String>,
    pub runtime: Option<VmRuntime>,
    /// How the VMM last ended; `None` until it ended once (the disks are as made).
    pub last_stop: Option<LastStop>,
    /// What the last start checked on the disks.
    pub start_fsck: Option<StartFsck>,
    /// The work disk's file was grown and its filesystem not yet (`vm set --disk` whose
    /// guest-side or host-side grow did not finish): the next start grows it on the host.
    pub grow_work_fs: bool,
}

impl VmRecord {
    /// A fresh record in state Created with a new random id.
    pub fn new(name: VmName, spec: VmSpec) -> Self {
        let now = crate::now_rfc3339();
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            name,
            spec,
            state: VmState::Created,
            created_at: now.clone(),
            updated_at: now,
            last_error: None,
            runtime: None,
            last_stop: None,
            start_fsck: None,
            grow_work_fs: false,
        }
    }

    /// Records how the VMM ended (see [`LastStop`]); persisted by the next store write.
    pub fn record_stop(&mut self, kind: StopKind, how: impl Into<String>) {
        self.last_stop = Some(LastStop {
            kind,
            how: how.into(),
            stop_method: None,
            at: crate::now_rfc3339(),
        });
    }

    /// Records that `method`, a step of the stop sequence, ended the VMM.
    pub fn record_stop_method(&mut self, method: banger_proto::StopMethod, how: impl Into<String>) {
        let kind = if method.guest_shut_down() {
            StopKind::Clean
        } else {
            StopKind::Unclean
        };
        self.record_stop(kind, how);
        if let Some(stop) = self.last_stop.as_mut() {
            stop.stop_method = Some(method);
        }
    }

    /// Forgets the VMM process (its pid and jail) once it ended; the rest of the runtime
    /// facts stay for `vm show`.
    pub fn clear_process(&mut self) {
        if let Some(runtime) = self.runtime.as_mut() {
            runtime.pid = None;
            runtime.jail = None;
        }
    }

    /// The API view of the record.
    pub fn to_api(&self) -> Vm {
        Vm {
            id: self.id.clone(),
            name: self.name.to_string(),
            state: self.state,
            spec: self.spec.to_api(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            last_error: self.last_error.clone(),
            runtime: self.runtime.as_ref().map(VmRuntime::to_api),
            network: None,
            last_stop: self.last_stop.clone(),
            start_fsck: self.start_fsck.clone(),
            snapshots: None,
            cloned_from: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    #[test]
    fn lifecycle_allows_the_documented_steps() {
        for (from, to) in [
            (Created, Starting),
            (Starting, Running),
            (Running, Stopping),
            (Stopping, Stopped),
            (Stopped, Starting),
            (Starting, Created),
            (Running, Stopped),
            (Error, Starting),
            (Running, Paused),
            (Paused, Running),
            (Paused, Stopping),
            (Stopping, Suspended),
            (Suspended, Starting),
            (Stopped, Suspended),
            (Suspended, Stopped),
        ] {
            assert!(check_transition(from, to).is_ok(), "{from} -> {to}");
        }
    }

    #[test]
    fn lifecycle_refuses_shortcuts() {
        for (from, to) in [
            (Created, Running),
            (Stopped, Running),
            (Running, Starting),
            (Stopped, Stopping),
            (Created, Stopped),
            (Stopped, Paused),
            (Suspended, Running),
            (Suspended, Paused),
            (Paused, Starting),
            (Running, Suspended),
        ] {
            assert!(check_transition(from, to).is_err(), "{from} -> {to}");
        }
    }
}
