//! `vm snapshot create` of a running or paused VM: the same external qcow2 overlays as a
//! stopped VM's snapshot, switched under the running VMM.
//!
//! 1. The VM's top files move into the snapshot's directory (the VMM keeps writing to them
//!    through the files it has open) and new empty overlays naming them as backing are made
//!    beside the tops (`Layout::vm_overlay_live`, a name per snapshot), without opening the
//!    backings (the VMM holds their locks). Nothing is at the tops' paths until the switch is
//!    done: QEMU reopens the image it switches away from read-only by the name it opened it
//!    with, which then fails (and is ignored) instead of opening another file.
//! 2. A running guest syncs and freezes `/root` and `/` (`fsfreeze`, over SSH): from then
//!    on its disks hold two clean filesystems and take no writes. A guest-side watchdog, and
//!    the end of the SSH session when the daemon dies, thaw it whatever happens. A paused VM
//!    is not frozen: its vCPUs do not run, and the VMM drained its disks when it paused.
//! 3. The VMM switches both disks to the new overlays at one instant (QEMU: one
//!    `transaction` of two `blockdev-snapshot-sync`; both or neither), behind
//!    `VmBackend::switch_disks`.
//! 4. The new overlays are renamed to the tops' paths (the VMM keeps their open files); the
//!    guest thaws; the intent row is cleared.
//!
//! Crash safety: the intent row is written first, as for a stopped VM's snapshot. Until the
//! switch, undoing puts the files back where they were (the VMM writes on through the same
//! open files, whatever their names); after it, the snapshot is finished. Which of the two
//! applies is asked of the VMM ([`crate::vmm::VmBackend::disks_switched`], by the switch's
//! node names), by the daemon when a step failed and by the next daemon when this one died.
//! A VM whose VMM died meanwhile is finished as a stopped VM's snapshot is: every byte its
//! guest wrote is in the files either way.

use std::sync::Arc;
use std::time::Duration;

use banger_proto::VmState;
use tracing::{info, warn};

use super::Manager;
use super::snapshots::{MovedTops, sync_dir};
use super::stop::STOP_DIAL;
use crate::Error;
use crate::guest::ssh;
use crate::layout::Layout;
use crate::model::{VmRecord, has_process};
use crate::qcow2;
use crate::store::SnapshotRecord;
use crate::vmm::{DiskSwitch, VmBackend, VmProcess, process};

/// After this long a frozen guest thaws by itself (the switch takes well under a second).
const FREEZE_WATCHDOG: Duration = Duration::from_secs(30);
/// Bound on the guest's sync and freeze.
const FREEZE_LIMIT: Duration = Duration::from_secs(60);
/// Bound on the guest's thaw.
const THAW_LIMIT: Duration = Duration::from_secs(15);

/// How a live snapshot that did not go through ended.
pub(super) enum Settled {
    /// The VMM had switched: the snapshot is taken.
    Taken,
    /// The VMM had not switched: the files are back, the snapshot forgotten.
    Undone,
    /// The VMM is gone: finished as a stopped VM's snapshot (nothing its guest wrote lost).
    FinishedStopped,
}

impl Manager {
    /// The live VMM of `record` when it has one.
    pub(super) fn live_control(
        &self,
        record: &VmRecord,
    ) -> Option<(Arc<dyn VmBackend>, VmProcess)> {
        let pid = record
            .runtime
            .as_ref()
            .and_then(|r| r.pid)
            .filter(|pid| has_process(record.state) && process::is_alive(*pid, &record.id))?;
        Some(self.control(record, pid))
    }

    /// Takes `snapshot` (its row begun) of the running or paused VM `record`. Returns the
    /// warnings (a thaw that did not answer). On error the snapshot is settled: undone, or
    /// taken after all when the VMM had switched (then `Ok`).
    pub(super) async fn take_live_snapshot(
        &self,
        record: &VmRecord,
        snapshot: &SnapshotRecord,
    ) -> Result<Vec<String>, Error> {
        let Some((vmm, control)) = self.live_control(record) else {
            return Err(Error::Failed(format!(
                "VM {} stopped before its snapshot was taken",
                record.name
            )));
        };
        let mut warnings = Vec::new();
        let taken = self
            .switch_live(record, snapshot, &*vmm, &control, &mut warnings)
            .await;
        let Err(e) = taken else {
            if self.live_control(record).is_none() {
                // The VMM ended after the switch: the snapshot is taken; the VM is stopped
                // (unclean: its next start checks the disks).
                self.observe(record.clone()).await;
                warnings = vec![format!(
                    "VM {}'s VMM ended during its snapshot: the VM is stopped, the snapshot taken",
                    record.name
                )];
            }
            return Ok(warnings);
        };
        warn!(vm = %record.name, snapshot = %snapshot.name, "live snapshot failed, settling: {e}");
        match self.settle_live_create(snapshot, record).await {
            Ok(Settled::Taken) => {
                warnings.push(format!(
                    "the snapshot was taken, but a step after it failed: {e}"
                ));
                Ok(warnings)
            }
            Ok(Settled::Undone) => Err(Error::StepFailed {
                step: format!(
                    "cannot snapshot VM {}; its disks are as they were",
                    record.name
                ),
                source: Box::new(e),
            }),
            Ok(Settled::FinishedStopped) => {
                // Stopped (unclean: its next start checks the disks), as the VMM is.
                self.observe(record.clone()).await;
                Err(Error::StepFailed {
                    step: format!(
                        "VM {}'s VMM ended during its snapshot: the VM is stopped, snapshot {} kept",
                        record.name, snapshot.name
                    ),
                    source: Box::new(e),
                })
            }
            Err(settle) => {
                warn!(vm = %record.name, "cannot settle the snapshot now (the daemon's next start does): {settle}");
                Err(Error::StepFailed {
                    step: format!(
                        "cannot snapshot VM {} (the daemon's next start finishes or undoes it)",
                        record.name
                    ),
                    source: Box::new(e),
                })
            }
        }
    }

    /// The steps of a live snapshot (module doc), up to the cleared intent.
    async fn switch_live(
        &self,
        record: &VmRecord,
        snapshot: &SnapshotRecord,
        vmm: &dyn VmBackend,
        control: &VmProcess,
        warnings: &mut Vec<String>,
    ) -> Result<(), Error> {
        crate::fault::point("snapshot.live.after_record")?;
        let switch = self.prepare_live_files(snapshot).await?;
        let frozen = if record.state == VmState::Running {
            let target = self.ssh_target(record)?;
            let frozen = ssh::freeze(&target, STOP_DIAL, FREEZE_WATCHDOG, FREEZE_LIMIT)
                .await
                .map_err(|e| Error::StepFailed {
                    step: "cannot freeze the guest's filesystems".into(),
                    source: Box::new(e.into()),
                })?;
            Some(frozen)
        } else {
            None
        };
        let switched = async {
            crate::fault::point("snapshot.live.after_freeze")?;
            vmm.switch_disks(control, &switch).await?;
            crate::fault::point("snapshot.live.after_switch")?;
            self.live_overlays_in_place(snapshot)?;
            Ok::<(), Error>(())
        }
        .await;
        if let Some(frozen) = frozen
            && let Err(e) = frozen.thaw(THAW_LIMIT).await
        {
            // Its watchdog thaws it within FREEZE_WATCHDOG.
            warn!(vm = %record.name, "the guest did not confirm its thaw: {e}");
            warnings.push(format!(
                "the guest did not confirm its thaw ({e}); it thaws by itself within {}s",
                FREEZE_WATCHDOG.as_secs()
            ));
        }
        switched?;
        crate::fault::point("snapshot.live.after_thaw")?;
        let id = snapshot.id.clone();
        self.db.run(move |s| s.finish_snapshot_step(&id)).await?;
        Ok(())
    }

    /// Step 1: the VM's tops into the snapshot's directory, new overlays over them at the
    /// tops' paths (each done only when not done yet).
    async fn prepare_live_files(&self, snapshot: &SnapshotRecord) -> Result<DiskSwitch, Error> {
        let id = &snapshot.vm_id;
        let MovedTops {
            system,
            work,
            system_top,
            work_top,
        } = self.move_tops(snapshot, || {
            crate::fault::point("snapshot.live.after_system_moved")
        })?;
        let system_next = Layout::vm_overlay_live(&system_top, &snapshot.id);
        let work_next = Layout::vm_overlay_live(&work_top, &snapshot.id);
        for (backing, top) in [(&system, &system_next), (&work, &work_next)] {
            if top.exists() {
                continue;
            }
            let size = crate::usage::virtual_bytes(&backing.path).ok_or_else(|| {
                Error::Failed(format!(
                    "cannot read the size of {}",
                    backing.path.display()
                ))
            })?;
            qcow2::create_overlay_unopened(backing, size, &Layout::vm_overlay_partial(top), top)
                .await?;
        }
        sync_dir(&self.layout.vm_dir(id))?;
        crate::fault::point("snapshot.live.after_overlays")?;
        Ok(DiskSwitch {
            system: system_next,
            work: work_next,
            tag: switch_tag(&snapshot.id),
        })
    }

    /// Step 4's renames: the live overlays (those still beside the tops) become the tops.
    /// Also what finishing after a crash does first: a live overlay the VMM may have written
    /// to holds the guest's latest writes.
    pub(super) fn live_overlays_in_place(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let id = &snapshot.vm_id;
        for top in [
            self.layout.vm_system_disk(id),
            self.layout.vm_work_overlay(id),
        ] {
            let next = Layout::vm_overlay_live(&top, &snapshot.id);
            if next.exists() {
                std::fs::rename(&next, &top).map_err(Error::io(format!(
                    "cannot rename {} to {}",
                    next.display(),
                    top.display()
                )))?;
            }
        }
        sync_dir(&self.layout.vm_dir(id))
    }

    /// Removes the live overlays of `snapshot` the VMM never switched to (an undo).
    fn remove_live_overlays(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let id = &snapshot.vm_id;
        for top in [
            self.layout.vm_system_disk(id),
            self.layout.vm_work_overlay(id),
        ] {
            let next = Layout::vm_overlay_live(&top, &snapshot.id);
            match std::fs::remove_file(&next) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("cannot remove {}", next.display()))(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Ends a live snapshot that did not go through (module doc): taken when the VMM had
    /// switched, undone when it had not, finished as a stopped VM's when it is gone.
    pub(super) async fn settle_live_create(
        &self,
        snapshot: &SnapshotRecord,
        record: &VmRecord,
    ) -> Result<Settled, Error> {
        let Some((vmm, control)) = self.live_control(record) else {
            self.live_overlays_in_place(snapshot)?;
            self.finish_create(snapshot).await?;
            return Ok(Settled::FinishedStopped);
        };
        match vmm
            .disks_switched(&control, &switch_tag(&snapshot.id))
            .await
        {
            Ok(true) => {
                self.live_overlays_in_place(snapshot)?;
                let id = snapshot.id.clone();
                self.db.run(move |s| s.finish_snapshot_step(&id)).await?;
                info!(vm = %record.name, snapshot = %snapshot.name, "live snapshot taken (the VMM had switched)");
                Ok(Settled::Taken)
            }
            Ok(false) => {
                self.remove_live_overlays(snapshot)?;
                self.undo_create(snapshot).await?;
                Ok(Settled::Undone)
            }
            // Asked as the VMM ended: settled as a stopped VM's once it is gone.
            Err(e) if self.live_control(record).is_none() => {
                warn!(vm = %record.name, "the VMM ended during the snapshot: {e}");
                self.live_overlays_in_place(snapshot)?;
                self.finish_create(snapshot).await?;
                Ok(Settled::FinishedStopped)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The switch's tag for snapshot `id` (the VMM's node names: letters and digits, short).
fn switch_tag(id: &str) -> String {
    format!("snap{}", &id[..id.len().min(20)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_tags_are_short_node_names() {
        let tag = switch_tag("0123456789abcdef0123456789abcdef");
        assert_eq!(tag, "snap0123456789abcdef0123");
        // QEMU's node names: a letter first, then letters, digits, `-`, `_`; under 32 bytes
        // with the disk's suffix.
        assert!(tag.len() + 1 < 32);
        assert!(tag.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
