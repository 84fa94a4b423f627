//! `vm suspend`: sync the guest, pause, write a memory snapshot, end the process; the next
//! `vm start` restores it. Also where the snapshot lives and its removal.

use std::time::Duration;

use banger_proto::{LifecycleResult, VmState};
use tracing::{info, warn};

use super::stop::{QUIT_GRACE, STOP_DIAL, STOP_SYNC};
use super::{Manager, result};
use crate::Error;
use crate::guest::ssh;
use crate::vmm::{Snapshot, StopTimings, stop_sequence};

impl Manager {
    /// Suspends a VM to disk (backends with memory snapshots: Firecracker): `sync` in the
    /// guest over SSH, pause, snapshot (state + memory files in the VM's directory), end the
    /// process. The next `start` restores it. A suspended VM is left as it is.
    pub async fn suspend_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let current = self.observed_vm(name)?;
        if current.state == VmState::Suspended {
            return Ok(result(current.to_api(), false));
        }
        if !self
            .backend(&current)
            .capabilities()
            .supports_memory_snapshot
        {
            return Err(Error::Unsupported {
                message: format!(
                    "cannot suspend VM {name}: suspend needs the Firecracker backend (it runs on {})",
                    current.spec.vmm
                ),
                hint: "use `banger vm pause NAME` or `banger vm stop NAME`".into(),
            });
        }
        if current.runtime.as_ref().is_some_and(|r| r.jail.is_some()) {
            return Err(Error::Unsupported {
                message: format!(
                    "cannot suspend VM {name}: it runs through Firecracker's jailer, whose chroot \
                     cannot take the snapshot files"
                ),
                hint: "use `banger vm pause NAME` or `banger vm stop NAME`".into(),
            });
        }
        let (mut record, vmm, control) = self.live_vm(name)?;
        let was = record.state;
        // Stopping while the snapshot is written: a daemon that dies now leaves a VM that
        // reconciliation stops (and whose partial snapshot it deletes).
        self.transition(&mut record, VmState::Stopping)?;
        crate::fault::point("suspend.after_stopping")?;
        let mut warnings = Vec::new();
        // 1. Data safety first: a paused guest cannot sync, so resume it for that.
        if was == VmState::Paused
            && let Err(e) = vmm.resume(&control).await
        {
            self.transition(&mut record, was)?;
            return Err(Error::StepFailed {
                step: format!("cannot suspend VM {name}: resuming it to sync failed"),
                source: Box::new(Error::from(e)),
            });
        }
        // Dialled directly: STOP_DIAL then bounds a hung guest (not so through a master).
        let synced = match self.ssh_target(&record) {
            Ok(target) => match ssh::run(&target.direct(), "sync", STOP_DIAL, STOP_SYNC).await {
                Ok((Some(0), _, _)) => Ok(()),
                Ok((code, _, stderr)) => Err(format!("exit {code:?}: {}", stderr.trim())),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_api().message),
        };
        if let Err(why) = synced {
            warn!(vm = %name, "sync before suspend failed: {why}");
            warnings.push(format!(
                "cannot sync the guest ({why}): its unwritten data is only in the snapshot; \
                 a cold boot would lose it"
            ));
        }
        // 2. Pause and snapshot; on failure the VM runs on as it was.
        let snapshot = self.snapshot_paths(&record.id);
        self.remove_snapshot(&record.id);
        let taken = async {
            vmm.pause(&control).await?;
            vmm.snapshot(&control, &snapshot).await
        }
        .await;
        if let Err(e) = taken {
            warn!(vm = %name, "snapshot failed, resuming: {e}");
            self.remove_snapshot(&record.id);
            // Back to what it was: a paused VM was resumed for the sync, so pause it again.
            let back = if was == VmState::Paused {
                match vmm.is_paused(&control).await {
                    Ok(true) => VmState::Paused,
                    _ => match vmm.pause(&control).await {
                        Ok(()) => VmState::Paused,
                        Err(_) => VmState::Running,
                    },
                }
            } else {
                match vmm.resume(&control).await {
                    Ok(()) => VmState::Running,
                    Err(_) => VmState::Paused,
                }
            };
            self.transition(&mut record, back)?;
            return Err(Error::StepFailed {
                step: format!("cannot suspend VM {name}"),
                source: Box::new(Error::from(e)),
            });
        }
        crate::fault::point("suspend.after_snapshot")?;
        // 3. End the paused process (SIGTERM, then SIGKILL) and make the snapshot durable.
        let timings = StopTimings {
            poweroff: Duration::ZERO,
            signal: Duration::ZERO,
            quit: QUIT_GRACE,
        };
        let method = stop_sequence(vmm.as_ref(), &control, &record.id, false, true, timings).await;
        for file in [&snapshot.state, &snapshot.memory] {
            if let Err(e) = std::fs::File::open(file).and_then(|f| f.sync_all()) {
                warn!(vm = %name, file = %file.display(), "cannot flush snapshot file: {e}");
            }
        }
        if let Some(dir) = snapshot.state.parent()
            && let Err(e) = std::fs::File::open(dir).and_then(|f| f.sync_all())
        {
            warn!(vm = %name, "cannot flush {}: {e}", dir.display());
        }
        crate::fault::point("suspend.after_stop")?;
        self.release_runtime_now(&record).await;
        record.clear_process();
        record.last_error = None;
        self.transition(&mut record, VmState::Suspended)?;
        info!(vm = %name, method, snapshot = %snapshot.state.display(), "VM suspended");
        Ok(LifecycleResult {
            warnings,
            ..result(record.to_api(), true)
        })
    }

    /// Where the VM's suspend snapshot lives (in its durable directory).
    pub(super) fn snapshot_paths(&self, vm_id: &str) -> Snapshot {
        Snapshot {
            state: self.layout.vm_snapshot_state(vm_id),
            memory: self.layout.vm_snapshot_memory(vm_id),
        }
    }

    /// Deletes the VM's suspend snapshot, if any.
    pub(super) fn remove_snapshot(&self, vm_id: &str) {
        let snapshot = self.snapshot_paths(vm_id);
        for file in [&snapshot.state, &snapshot.memory] {
            match std::fs::remove_file(file) {
                Ok(()) => info!(file = %file.display(), "snapshot file removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(file = %file.display(), "cannot remove snapshot file: {e}"),
            }
        }
    }
}
