//! `vm suspend`: sync the guest, pause, write a memory snapshot, end the process, seal the
//! snapshot (fsync, checksums, the disks' identity: `crate::snapshot`); the next `vm start`
//! restores it. Also where the snapshot lives and its removal.

use std::path::PathBuf;
use std::time::Duration;

use banger_proto::{LifecycleResult, StopKind, VmState};
use tracing::{info, warn};

use super::stop::QUIT_GRACE;
use super::{Manager, result};
use crate::Error;
use crate::domain::SystemDiskStrategy;
use crate::model::VmRecord;
use crate::vmm::{Snapshot, StopTimings, process, stop_sequence};

/// Bound on the guest's `sync` before a suspend.
pub(super) const SUSPEND_SYNC: Duration = Duration::from_secs(15);

impl Manager {
    /// Suspends a VM to disk (backends with memory snapshots): `sync` in the guest over SSH,
    /// pause, snapshot (state and memory files in the VM's directory), end the process, seal
    /// the snapshot. The next `start` restores it. A suspended VM is left as it is.
    pub async fn suspend_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let current = self.observed_vm(name).await?;
        if current.state == VmState::Suspended {
            return Ok(result(current.to_api(), false));
        }
        let backend = self.backend(&current);
        if !backend.capabilities().supports_memory_snapshot {
            return Err(Error::Unsupported {
                message: format!(
                    "cannot suspend VM {name}: its VMM ({}) cannot save guest memory",
                    backend.display_name()
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
        let (mut record, vmm, control) = self.live_vm(name).await?;
        let was = record.state;
        // Stopping while the snapshot is written: a daemon that dies now leaves a VM that
        // reconciliation stops (and whose partial snapshot it deletes).
        self.transition(&mut record, VmState::Stopping).await?;
        crate::fault::point("suspend.after_stopping")?;
        let mut warnings = Vec::new();
        // 1. Data safety first: a paused guest cannot sync, so resume it for that.
        if was == VmState::Paused
            && let Err(e) = vmm.resume(&control).await
        {
            self.transition(&mut record, was).await?;
            return Err(Error::StepFailed {
                step: format!("cannot suspend VM {name}: resuming it to sync failed"),
                source: Box::new(Error::from(e)),
            });
        }
        // Through the VM's shared connection when it is up (a fresh SSH handshake is most of
        // a suspend's time under TCG). A master ignores the dial bound, so the whole sync is
        // bounded instead, and shorter than a stop's: a sync cut short only costs the
        // cold-boot fallback its unwritten pages; the snapshot holds them all the same.
        if let Err(why) = self.sync_guest(&record).await {
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
            self.remove_snapshot(&record.id);
            if !process::is_alive(control.pid, &record.id) {
                // The VMM died (crashed, killed): nothing to resume. Stopped, and unclean, so
                // the next start checks the disks (the guest's synced data is on them).
                warn!(vm = %name, "the VMM ended during the suspend: {e}");
                self.release_runtime_now(&record).await;
                record.clear_process();
                record.record_stop(StopKind::Unclean, "the VMM ended during a suspend");
                record.last_error = Some(format!("the VMM ended during a suspend: {e}"));
                self.transition(&mut record, VmState::Stopped).await?;
                return Err(Error::StepFailed {
                    step: format!("cannot suspend VM {name}: its VMM ended; the VM is stopped"),
                    source: Box::new(Error::from(e)),
                });
            }
            warn!(vm = %name, "snapshot failed, resuming: {e}");
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
            self.transition(&mut record, back).await?;
            return Err(Error::StepFailed {
                step: format!("cannot suspend VM {name}"),
                source: Box::new(Error::from(e)),
            });
        }
        crate::fault::point("suspend.after_snapshot")?;
        // 3. End the paused process (QMP quit / SIGTERM, then SIGKILL).
        let timings = StopTimings {
            poweroff: Duration::ZERO,
            signal: Duration::ZERO,
            quit: QUIT_GRACE,
        };
        let method = stop_sequence(vmm.as_ref(), &control, &record.id, false, true, timings).await;
        crate::fault::point("suspend.after_stop")?;
        self.release_runtime_now(&record).await;
        record.clear_process();
        record.last_error = None;
        // 4. Seal: the files and disks flushed, checksums and disk identities in the manifest
        // (written last: without it a start boots cold). A snapshot that cannot be sealed is
        // removed; the VM is then stopped, its guest synced.
        let files = vec![snapshot.state.clone(), snapshot.memory.clone()];
        let disks = self.snapshot_disks(&record);
        let manifest = self.layout.vm_snapshot_manifest(&record.id);
        let vmm_kind = record.spec.vmm.to_string();
        let machine = crate::snapshot::Machine::of(&record.spec);
        let sealed = tokio::task::spawn_blocking(move || {
            crate::snapshot::seal(&vmm_kind, machine, &files, &disks, &manifest)
        })
        .await
        .map_err(|e| Error::Failed(format!("sealing the snapshot panicked: {e}")))
        .and_then(|r| r.map_err(|e| Error::Failed(e.to_string())));
        let sealed = match sealed {
            Ok(sealed) => sealed,
            Err(e) => {
                warn!(vm = %name, "cannot seal the snapshot: {e}");
                self.remove_snapshot(&record.id);
                self.transition(&mut record, VmState::Stopped).await?;
                return Err(Error::StepFailed {
                    step: format!(
                        "cannot suspend VM {name}: the snapshot could not be written; the VM is \
                         stopped (its guest was synced)"
                    ),
                    source: Box::new(e),
                });
            }
        };
        self.transition(&mut record, VmState::Suspended).await?;
        info!(vm = %name, method = method.as_str(), snapshot = %snapshot.state.display(), bytes = sealed.size(), "VM suspended");
        Ok(LifecycleResult {
            warnings,
            ..result(record.to_api(), true)
        })
    }

    /// The disk files a snapshot of the VM pairs with (for the dm system disk: its COW store,
    /// the file that takes the guest's writes).
    pub(super) fn snapshot_disks(&self, record: &VmRecord) -> Vec<PathBuf> {
        let id = record.id.as_str();
        let system = match record.spec.system_disk {
            SystemDiskStrategy::Qcow2 => self.layout.vm_system_disk(id),
            SystemDiskStrategy::DmSnapshot => self.layout.vm_system_cow(id),
            SystemDiskStrategy::Reflink | SystemDiskStrategy::Copy => self.layout.vm_system_raw(id),
        };
        vec![system, self.work_disk(id).0]
    }

    /// Where the VM's suspend snapshot lives (in its durable directory).
    pub(super) fn snapshot_paths(&self, vm_id: &str) -> Snapshot {
        Snapshot {
            state: self.layout.vm_snapshot_state(vm_id),
            memory: self.layout.vm_snapshot_memory(vm_id),
        }
    }

    /// Deletes the VM's suspend snapshot, if any (the manifest first: a snapshot without it
    /// is never loaded).
    pub(super) fn remove_snapshot(&self, vm_id: &str) {
        let snapshot = self.snapshot_paths(vm_id);
        remove_state_files(&[
            self.layout.vm_snapshot_manifest(vm_id),
            snapshot.state,
            snapshot.memory,
        ]);
    }
}

/// Removes a memory snapshot's files, in order (those there; a failure is logged).
pub(super) fn remove_state_files(files: &[PathBuf]) {
    for file in files {
        match std::fs::remove_file(file) {
            Ok(()) => info!(file = %file.display(), "snapshot file removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %file.display(), "cannot remove snapshot file: {e}"),
        }
    }
}
