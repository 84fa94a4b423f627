//! `vm snapshot create` of a running or paused VM: the same external qcow2 overlays as a
//! stopped VM's snapshot, switched under the running VMM.
//!
//! 1. The VM's top files are linked into the snapshot's directory (hard links: the VMM
//!    keeps writing to them, under both names) and new empty overlays naming the snapshot's
//!    links as backing are made beside the tops (`Layout::vm_overlay_live`, a name per
//!    snapshot), without opening the backings (the VMM holds their locks). The tops' paths
//!    keep naming the VMM's files until the switch is done: QEMU reopens the image it
//!    switches away from read-only by the name it opened it with, and so drops its write
//!    lock on the snapshot's files (a clone's VMM could not open them otherwise); were
//!    another file at that name it would read that one instead.
//! 2. A running guest syncs and freezes `/root` and `/` (`fsfreeze`, over SSH): from then
//!    on its disks hold two clean filesystems and take no writes. A guest-side watchdog, and
//!    the end of the SSH session when the daemon dies, thaw it whatever happens. A paused VM
//!    is not frozen: its vCPUs do not run, and the VMM drained its disks when it paused.
//! 3. The VMM switches both disks to the new overlays at one instant (QEMU: one
//!    `transaction` of two `blockdev-snapshot-sync`; both or neither), behind
//!    `VmBackend::switch_disks`.
//! 4. The new overlays are renamed over the tops' paths (the VMM keeps their open files),
//!    the VM's other name of a file now in the snapshot (a raw `work.ext4`) goes; the guest
//!    thaws; the intent row is cleared.
//!
//! With `--memory` (`SnapshotRecord::memory_of`), the guest syncs and the VM pauses instead
//! of freezing (its disks then take no writes either, and hold what a power cut right after
//! the sync would leave), the switch happens while it is paused, and the VMM then writes its
//! memory and devices into the snapshot's directory (QEMU: the suspend's migration to a
//! file) before the VM runs on. The state is sealed (`crate::snapshot`, with no disk: a
//! restore pairs it with the new tops it makes) once the VM runs again; a snapshot without
//! its sealed manifest holds disks only. A VM paused by its owner stays paused.
//!
//! Crash safety: the intent row is written first, as for a stopped VM's snapshot. Until the
//! switch, undoing takes the files out of the snapshot again (the VMM writes on through the
//! same open files, whatever their names); after it, the snapshot is finished. Which of the two
//! applies is asked of the VMM ([`crate::vmm::VmBackend::disks_switched`], by the switch's
//! node names), by the daemon when a step failed and by the next daemon when this one died.
//! A VM whose VMM died meanwhile is finished as a stopped VM's snapshot is: every byte its
//! guest wrote is in the files either way.

use std::sync::Arc;
use std::time::Duration;

use banger_proto::VmState;
use tracing::{info, warn};

use super::Manager;
use super::snapshots::{MovedTops, has_memory, same_file, sync_dir};
use super::stop::STOP_DIAL;
use super::suspend::{SUSPEND_SYNC, remove_state_files};
use crate::Error;
use crate::guest::ssh;
use crate::layout::Layout;
use crate::model::{VmRecord, has_process};
use crate::qcow2;
use crate::store::{MemoryOf, SnapshotRecord};
use crate::vmm::{DiskSwitch, Snapshot, VmBackend, VmProcess, process};

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
        let settled = self.settle_live_create(snapshot, record).await;
        if let Err(why) = self.after_memory_snapshot(snapshot, record).await {
            warnings.push(why.to_api().message);
        }
        match settled {
            Ok(Settled::Taken)
                if snapshot.memory_of.is_some()
                    && !has_memory(
                        snapshot,
                        &self.layout.vm_named_snapshot(&snapshot.vm_id, &snapshot.id),
                    ) =>
            {
                Err(Error::StepFailed {
                    step: format!(
                        "snapshot {} of VM {} holds its disks but not its memory (remove it \
                         with `banger vm snapshot rm` once the VM is stopped, or keep it)",
                        snapshot.name, record.name
                    ),
                    source: Box::new(e),
                })
            }
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
        if snapshot.memory_of.is_some() {
            return self
                .switch_paused_with_memory(record, snapshot, vmm, control, &switch, warnings)
                .await;
        }
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

    /// A memory snapshot's steps after step 1 (module doc): sync, pause, switch, write the
    /// VMM's state, run on, seal, clear the intent.
    async fn switch_paused_with_memory(
        &self,
        record: &VmRecord,
        snapshot: &SnapshotRecord,
        vmm: &dyn VmBackend,
        control: &VmProcess,
        switch: &DiskSwitch,
        warnings: &mut Vec<String>,
    ) -> Result<(), Error> {
        if snapshot.memory_of == Some(MemoryOf::Running) {
            // What the guest has written reaches its disks: a cold boot of the snapshot (a
            // clone, or a restore whose state cannot be loaded) then finds it there.
            if let Err(why) = self.sync_guest(record).await {
                warn!(vm = %record.name, "sync before the memory snapshot failed: {why}");
                warnings.push(format!(
                    "cannot sync the guest ({why}): a cold boot of this snapshot's disks would \
                     miss its unwritten data"
                ));
            }
            vmm.pause(control).await?;
        }
        crate::fault::point("snapshot.memory.after_pause")?;
        vmm.switch_disks(control, switch).await?;
        crate::fault::point("snapshot.memory.after_switch")?;
        self.live_overlays_in_place(snapshot)?;
        let files = self.layout.vm_named_snapshot(&snapshot.vm_id, &snapshot.id);
        let state = Snapshot {
            state: files.state(),
            memory: files.memory(),
        };
        vmm.snapshot(control, &state).await?;
        crate::fault::point("snapshot.memory.after_state")?;
        self.run_on_after_memory(snapshot, record).await?;
        crate::fault::point("snapshot.memory.after_resume")?;
        let (vmm_kind, manifest) = (record.spec.vmm.to_string(), files.manifest());
        let machine = crate::snapshot::Machine::of(&record.spec);
        let sealed = tokio::task::spawn_blocking(move || {
            crate::snapshot::seal(
                &vmm_kind,
                machine,
                &[state.state, state.memory],
                &[],
                &manifest,
            )
        })
        .await
        .map_err(|e| Error::Failed(format!("sealing the snapshot panicked: {e}")))?
        .map_err(|e| Error::Failed(e.to_string()))?;
        crate::fault::point("snapshot.memory.after_seal")?;
        let id = snapshot.id.clone();
        self.db.run(move |s| s.finish_snapshot_step(&id)).await?;
        info!(vm = %record.name, snapshot = %snapshot.name, bytes = sealed.size(), "memory snapshot taken");
        Ok(())
    }

    /// `sync` in the guest through its shared connection, bounded.
    pub(super) async fn sync_guest(&self, record: &VmRecord) -> Result<(), String> {
        let target = self.ssh_target(record).map_err(|e| e.to_api().message)?;
        match ssh::run(&target, "sync", STOP_DIAL, SUSPEND_SYNC).await {
            Ok((Some(0), _, _)) => Ok(()),
            Ok((code, _, stderr)) => Err(format!("exit {code:?}: {}", stderr.trim())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// After a memory snapshot that did not go through (also by the next daemon): the VM
    /// runs on as before it, and a state file that was not sealed is removed.
    pub(super) async fn after_memory_snapshot(
        &self,
        snapshot: &SnapshotRecord,
        record: &VmRecord,
    ) -> Result<(), Error> {
        if snapshot.memory_of.is_none() {
            return Ok(());
        }
        let resumed = self.run_on_after_memory(snapshot, record).await;
        let files = self.layout.vm_named_snapshot(&snapshot.vm_id, &snapshot.id);
        if !files.manifest().exists() {
            remove_state_files(&[files.state(), files.memory()]);
        }
        resumed
    }

    /// The VM paused for a memory snapshot runs again as it did before it: a running VM
    /// resumes; one its owner paused pauses again after a resume that takes its disks back
    /// from the finished migration. `resume` first cancels a migration still under way.
    async fn run_on_after_memory(
        &self,
        snapshot: &SnapshotRecord,
        record: &VmRecord,
    ) -> Result<(), Error> {
        let Some(memory_of) = snapshot.memory_of else {
            return Ok(());
        };
        let Some((vmm, control)) = self.live_control(record) else {
            return Ok(());
        };
        let resumed = async {
            // `resume` first cancels a migration still under way, which then writes no more,
            // and takes the disks back from a finished one.
            if vmm.is_paused(&control).await? {
                vmm.resume(&control).await?;
            }
            if memory_of == MemoryOf::Paused {
                vmm.pause(&control).await?;
            }
            Ok::<(), crate::vmm::VmmError>(())
        }
        .await;
        if resumed.is_err()
            && let Ok(mut current) = self.db.get_vm(record.name.as_str()).await
            && has_process(current.state)
            && let Err(e) = self.follow_vmm_pause(&mut current, &*vmm, &control).await
        {
            warn!(vm = %record.name, "cannot record the VM as its VMM is: {e}");
        }
        resumed.map_err(|e| Error::StepFailed {
            step: format!(
                "VM {} may stay paused after its snapshot (`banger vm show {}` says; `banger vm resume {}` resumes it)",
                record.name, record.name, record.name
            ),
            source: Box::new(e.into()),
        })
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
        } = self.move_tops(snapshot, true, || {
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
            // Still the VMM's files: linked, not moved.
            system_now: system_top,
            work_now: self.work_disk(id).0,
            tag: switch_tag(&snapshot.id),
        })
    }

    /// Step 4's renames: the live overlays (those still beside the tops) become the tops,
    /// and the VM's names of the files now in the snapshot go. Also what finishing after a
    /// crash does first: a live overlay the VMM may have written to holds the guest's latest
    /// writes, and with the VMM gone the snapshot's files take no more writes.
    pub(super) fn live_overlays_in_place(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let id = &snapshot.vm_id;
        let files = self.layout.vm_named_snapshot(id, &snapshot.id);
        let system_top = self.layout.vm_system_disk(id);
        let work_top = self.layout.vm_work_overlay(id);
        for top in [&system_top, &work_top] {
            let next = Layout::vm_overlay_live(top, &snapshot.id);
            if next.exists() {
                std::fs::rename(&next, top).map_err(Error::io(format!(
                    "cannot rename {} to {}",
                    next.display(),
                    top.display()
                )))?;
            }
        }
        for (name, frozen) in [
            (system_top, files.system()),
            (work_top, files.work(true)),
            (self.layout.vm_work_disk(id), files.work(false)),
        ] {
            if same_file(&name, &frozen) {
                std::fs::remove_file(&name)
                    .map_err(Error::io(format!("cannot remove {}", name.display())))?;
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
