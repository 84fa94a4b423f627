//! `vm snapshot create|ls|restore|rm`: named snapshots of a stopped VM's two disks, as
//! external qcow2 overlays. Taking one moves the VM's disk files (its top overlays, or the
//! raw work disk the first time) into `snapshots/<id>/`, where they stay read-only, and gives
//! the VM new empty qcow2 overlays over them: no data is copied, whatever the disks' sizes.
//! Restoring discards the VM's tops and makes new empty ones over the snapshot's files.
//! Removing one that others continue from (its child snapshots, the VM's tops) first rebases
//! them onto its own backing (`qemu-img rebase`, which copies into them only what it alone
//! held), then deletes its files; a snapshot a clone continues from is not removed.
//!
//! Crash safety: every operation records its intent in the state database first (one
//! transaction), then does file steps that can each be redone, and clears the intent last; a
//! daemon that died in between finishes the steps at its next start
//! ([`Manager::recover_snapshots`]). A restore commits when the VM's head moves to the
//! snapshot; before that the VM keeps its disks, after it the restore is finished, never a
//! mix of the two.

use std::path::{Path, PathBuf};

use banger_proto::{CreateSnapshotRequest, SnapshotList, SnapshotSummary, Vm, VmSnapshot, VmState};
use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::domain::{DiskFormat, SystemDiskStrategy};
use crate::layout::Layout;
use crate::model::VmRecord;
use crate::qcow2::{self, Backing};
use crate::store::{MemoryOf, SnapshotPending, SnapshotRecord};

impl Manager {
    /// The VM's work disk as its VMM opens it: the qcow2 overlay once it has had a named
    /// snapshot, else the raw `work.ext4`.
    pub(super) fn work_disk(&self, vm_id: &str) -> (PathBuf, DiskFormat) {
        let overlay = self.layout.vm_work_overlay(vm_id);
        if overlay.exists() {
            (overlay, DiskFormat::Qcow2)
        } else {
            (self.layout.vm_work_disk(vm_id), DiskFormat::Raw)
        }
    }

    /// Refuses a VM whose disks cannot be snapshotted: one whose VMM cannot open qcow2, or
    /// whose system disk is not a qcow2 overlay.
    pub(super) fn check_snapshottable(&self, record: &VmRecord) -> Result<(), Error> {
        let backend = self.backend(record);
        if !backend.capabilities().supports_qcow2 {
            return Err(Error::Unsupported {
                message: format!(
                    "VM {} runs on {}, which cannot open qcow2 overlays: named snapshots and clones need a QEMU VM",
                    record.name,
                    backend.display_name()
                ),
                hint: "create the VM with `--vmm qemu` to snapshot it".into(),
            });
        }
        if record.spec.system_disk != SystemDiskStrategy::Qcow2 {
            return Err(Error::Unsupported {
                message: format!(
                    "VM {} has a {} system disk: named snapshots need a qcow2 system disk",
                    record.name, record.spec.system_disk
                ),
                hint: "create the VM with defaults.system_disk = \"auto\" (qcow2 under QEMU)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Settles what a snapshot step left half done on `record`'s disks (a live snapshot whose
    /// settling failed, a restore not finished) before an operation uses them, or refuses the
    /// operation: until then which files are the VM's disks is not decided. Returns whether
    /// there was anything to settle (the VM's record may have changed then).
    pub(super) async fn settle_disks(&self, record: &VmRecord) -> Result<bool, Error> {
        let vm_id = record.id.clone();
        let (creates, head) = self
            .db
            .run(move |s| {
                let creates: Vec<SnapshotRecord> = s
                    .pending_snapshots()?
                    .into_iter()
                    .filter(|p| p.vm_id == vm_id && p.pending == Some(SnapshotPending::Create))
                    .collect();
                let head = match s.disk_head(&vm_id)? {
                    Some(h) if h.restoring => s.snapshot_by_id(&h.snapshot_id)?,
                    _ => None,
                };
                Ok::<_, crate::store::StoreError>((creates, head))
            })
            .await?;
        let unsettled = |what: String, e: Error| Error::NotNow {
            message: format!(
                "VM {}'s {what} is half done and cannot be finished now: {}",
                record.name,
                e.to_api().message
            ),
            hint: "see the daemon's log; `banger daemon stop` (the next command starts it \
                   again) retries"
                .into(),
        };
        let settled = !creates.is_empty() || head.is_some();
        for snapshot in creates {
            self.recover_create(&snapshot)
                .await
                .map_err(|e| unsettled(format!("snapshot {}", snapshot.name), e))?;
        }
        if let Some(snapshot) = head {
            self.finish_restore(&record.id, &snapshot)
                .await
                .map_err(|e| unsettled(format!("restore to snapshot {}", snapshot.name), e))?;
        }
        Ok(settled)
    }

    /// The VM's snapshot called `snapshot`, with no step half done.
    pub(super) async fn named_snapshot(
        &self,
        record: &VmRecord,
        snapshot: &str,
    ) -> Result<SnapshotRecord, Error> {
        let (vm_id, name) = (record.id.clone(), snapshot.to_owned());
        let found = self.db.run(move |s| s.find_snapshot(&vm_id, &name)).await?;
        let found = found.ok_or_else(|| Error::AssetNotFound {
            kind: "snapshot",
            name: format!("{}/{snapshot}", record.name),
        })?;
        if found.pending.is_some() {
            return Err(Error::NotNow {
                message: format!(
                    "snapshot {snapshot} of VM {} is being created or removed",
                    record.name
                ),
                hint: "try again once that finishes (a daemon restart finishes it)".into(),
            });
        }
        Ok(found)
    }

    /// Takes a named snapshot of a VM's disks: stopped, or running or paused (QEMU, see
    /// `live_snapshots`).
    pub async fn create_named_snapshot(
        &self,
        name: &str,
        request: CreateSnapshotRequest,
    ) -> Result<VmSnapshot, Error> {
        let vm = self.locked(name).await?;
        let record = self.observed_vm(&vm.name).await?;
        let snapshot_name = match request.name {
            Some(n) => n,
            None => default_name(std::time::SystemTime::now()),
        };
        let (done, warnings) = self
            .take_snapshot(&record, snapshot_name, request.memory)
            .await?;
        Ok(VmSnapshot {
            warnings,
            ..self.snapshot_api(&record, &done, Some(&done.id)).await
        })
    }

    /// Takes snapshot `snapshot_name` of `record` (its lock held), with its memory when
    /// `memory`; also returns what the owner should know (a guest that did not sync or
    /// thaw).
    pub(super) async fn take_snapshot(
        &self,
        record: &VmRecord,
        snapshot_name: String,
        memory: bool,
    ) -> Result<(SnapshotRecord, Vec<String>), Error> {
        self.check_snapshottable(record)?;
        self.settle_disks(record).await?;
        let live = matches!(record.state, VmState::Running | VmState::Paused);
        if !live {
            must_be_stopped(record, "snapshot")?;
        }
        let memory_of = match (memory, record.state) {
            (false, _) => None,
            (true, VmState::Running) => Some(MemoryOf::Running),
            (true, VmState::Paused) => Some(MemoryOf::Paused),
            (true, state) => {
                return Err(Error::NotNow {
                    message: format!(
                        "VM {} is {state}: a memory snapshot saves a running VM's memory",
                        record.name
                    ),
                    hint: format!(
                        "start it first (`banger vm start {}`), or snapshot its disks without --memory",
                        record.name
                    ),
                });
            }
        };
        if memory_of.is_some() && !self.backend(record).capabilities().supports_memory_snapshot {
            return Err(Error::Unsupported {
                message: format!("VM {}'s VMM cannot save its memory", record.name),
                hint: "snapshot its disks without --memory".into(),
            });
        }
        banger_proto::check_snapshot_name(&snapshot_name).map_err(Error::InvalidRequest)?;
        let (vm_id, name) = (record.id.clone(), snapshot_name.clone());
        if self
            .db
            .run(move |s| s.find_snapshot(&vm_id, &name))
            .await?
            .is_some()
        {
            return Err(Error::Refused {
                message: format!("VM {} already has a snapshot {snapshot_name}", record.name),
                hint: "choose another name, or remove it first with `banger vm snapshot rm`".into(),
            });
        }
        let (_, work_format) = self.work_disk(&record.id);
        let snapshot = SnapshotRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            vm_id: record.id.clone(),
            name: snapshot_name,
            work_format,
            parent: {
                let vm_id = record.id.clone();
                self.db
                    .run(move |s| s.disk_head(&vm_id))
                    .await?
                    .map(|h| h.snapshot_id)
            },
            created_at: crate::now_rfc3339(),
            pending: Some(SnapshotPending::Create),
            memory_of,
        };
        let begun = snapshot.clone();
        self.db.run(move |s| s.begin_snapshot(&begun)).await?;
        let mut warnings = Vec::new();
        if live {
            warnings = self.take_live_snapshot(record, &snapshot).await?;
            for warning in &warnings {
                warn!(vm = %record.name, snapshot = %snapshot.name, "{warning}");
            }
        } else if let Err(e) = self.finish_create(&snapshot).await {
            warn!(vm = %record.name, snapshot = %snapshot.name, "snapshot failed, undoing: {e}");
            if let Err(undo) = self.undo_create(&snapshot).await {
                warn!(vm = %record.name, "cannot undo the snapshot now (the daemon's next start finishes it): {undo}");
            }
            return Err(Error::StepFailed {
                step: format!(
                    "cannot snapshot VM {}; its disks are as they were",
                    record.name
                ),
                source: Box::new(e),
            });
        }
        // The VM's suspend state (if any) paired with the files now in the snapshot.
        self.remove_snapshot(&record.id);
        info!(vm = %record.name, snapshot = %snapshot.name, id = %snapshot.id, "snapshot taken");
        Ok((
            SnapshotRecord {
                pending: None,
                ..snapshot
            },
            warnings,
        ))
    }

    /// The file steps of taking `snapshot` (each done only when not done yet): the VM's tops
    /// move into the snapshot's directory, new empty overlays over them become the tops.
    pub(super) async fn finish_create(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        crate::fault::point("snapshot.after_record")?;
        let id = &snapshot.vm_id;
        let tops = self.move_tops(snapshot, false, || {
            crate::fault::point("snapshot.after_system_moved")
        })?;
        crate::fault::point("snapshot.after_work_moved")?;
        let (system_top, work_top) = (&tops.system_top, &tops.work_top);
        for (backing, top) in [(&tops.system, system_top), (&tops.work, work_top)] {
            if !top.exists() {
                qcow2::create_overlay(backing, &Layout::vm_overlay_partial(top), top).await?;
            }
        }
        sync_dir(&self.layout.vm_dir(id))?;
        crate::fault::point("snapshot.after_overlays")?;
        let id = snapshot.id.clone();
        self.db.run(move |s| s.finish_snapshot_step(&id)).await?;
        Ok(())
    }

    /// The first file step of taking `snapshot`, stopped or live: the VM's tops move into the
    /// snapshot's directory (each only when not moved yet; `after_system` runs the fault point
    /// between the two moves), and both directories are synced. A live snapshot links them
    /// there instead (`live`): its VMM reopens them by their names at the switch.
    pub(super) fn move_tops(
        &self,
        snapshot: &SnapshotRecord,
        live: bool,
        after_system: impl FnOnce() -> Result<(), crate::fault::Injected>,
    ) -> Result<MovedTops, Error> {
        let id = &snapshot.vm_id;
        let files = self.layout.vm_named_snapshot(id, &snapshot.id);
        let work_qcow2 = snapshot.work_format == DiskFormat::Qcow2;
        std::fs::create_dir_all(files.dir()).map_err(Error::io(format!(
            "cannot create {}",
            files.dir().display()
        )))?;
        let system_top = self.layout.vm_system_disk(id);
        let work_top = self.layout.vm_work_overlay(id);
        let work_before = if work_qcow2 {
            work_top.clone()
        } else {
            self.layout.vm_work_disk(id)
        };
        let step = if live { link_once } else { move_once };
        step(&system_top, &files.system())?;
        after_system()?;
        step(&work_before, &files.work(work_qcow2))?;
        sync_dir(files.dir())?;
        sync_dir(&self.layout.vm_dir(id))?;
        Ok(MovedTops {
            system: Backing {
                path: files.system(),
                format: DiskFormat::Qcow2,
            },
            work: Backing {
                path: files.work(work_qcow2),
                format: snapshot.work_format,
            },
            system_top,
            work_top,
        })
    }

    /// Puts the VM's disk files back where `snapshot`'s create found them and forgets it.
    pub(super) async fn undo_create(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let id = &snapshot.vm_id;
        let files = self.layout.vm_named_snapshot(id, &snapshot.id);
        let work_qcow2 = snapshot.work_format == DiskFormat::Qcow2;
        let system_top = self.layout.vm_system_disk(id);
        let work_top = self.layout.vm_work_overlay(id);
        let work_before = if work_qcow2 {
            work_top.clone()
        } else {
            self.layout.vm_work_disk(id)
        };
        // A file still in the snapshot means the top beside it (if any) is a new, empty one.
        for (frozen, new_top, original) in [
            (files.system(), &system_top, &system_top),
            (files.work(work_qcow2), &work_top, &work_before),
        ] {
            if frozen.exists() {
                remove_if_there(new_top)?;
                std::fs::rename(&frozen, original).map_err(Error::io(format!(
                    "cannot move {} back to {}",
                    frozen.display(),
                    original.display()
                )))?;
            }
        }
        sync_dir(&self.layout.vm_dir(id))?;
        remove_dir_if_there(files.dir())?;
        // The snapshots directory goes with the last snapshot (fails harmlessly otherwise).
        let _ = std::fs::remove_dir(self.layout.vm_snapshots_dir(id));
        let abandoned = snapshot.clone();
        self.db.run(move |s| s.abandon_snapshot(&abandoned)).await?;
        Ok(())
    }

    /// The VM's named snapshots, oldest first.
    pub async fn list_named_snapshots(&self, name: &str) -> Result<SnapshotList, Error> {
        let name = banger_proto::VmName::parse(name)?;
        let record = self.db.get_vm(name.as_str()).await?;
        let vm_id = record.id.clone();
        let (snapshots, head) = self
            .db
            .run(move |s| {
                Ok::<_, crate::store::StoreError>((s.snapshots_of(&vm_id)?, s.disk_head(&vm_id)?))
            })
            .await?;
        let head = head.map(|h| h.snapshot_id);
        let mut list = Vec::new();
        for s in snapshots
            .iter()
            .filter(|s| s.pending != Some(SnapshotPending::Create))
        {
            list.push(self.snapshot_api(&record, s, head.as_deref()).await);
        }
        Ok(SnapshotList {
            vm: record.name.to_string(),
            snapshots: list,
        })
    }

    async fn snapshot_api(
        &self,
        record: &VmRecord,
        s: &SnapshotRecord,
        head: Option<&str>,
    ) -> VmSnapshot {
        let (parent_id, id) = (s.parent.clone(), s.id.clone());
        let (parent, clones) = self
            .db
            .run(move |st| {
                let parent = match parent_id {
                    Some(p) => st.snapshot_by_id(&p)?.map(|p| p.name),
                    None => None,
                };
                Ok::<_, crate::store::StoreError>((parent, st.clones_of(&id)?))
            })
            .await
            .unwrap_or_default();
        let files = self.layout.vm_named_snapshot(&record.id, &s.id);
        VmSnapshot {
            id: s.id.clone(),
            name: s.name.clone(),
            created_at: s.created_at.clone(),
            bytes: dir_allocated(files.dir()),
            parent,
            current: head == Some(s.id.as_str()),
            clones,
            memory: has_memory(s, &files),
            warnings: Vec::new(),
        }
    }

    /// Puts a stopped VM's disks back to snapshot `snapshot`: what was written since is gone.
    pub async fn restore_named_snapshot(&self, name: &str, snapshot: &str) -> Result<Vm, Error> {
        let vm = self.locked(name).await?;
        let record = self.observed_vm(&vm.name).await?;
        self.check_snapshottable(&record)?;
        let mut record = if self.settle_disks(&record).await? {
            self.observed_vm(&vm.name).await?
        } else {
            record
        };
        // Suspended by a restore of a memory snapshot: its memory is that snapshot's, which
        // keeps it; another restore loses nothing.
        if !self.suspended_on_snapshot(&record).await? {
            must_be_stopped(&record, "restore a snapshot of")?;
        }
        let found = self.named_snapshot(&record, snapshot).await?;
        // The commit point: from here the restore is finished, now or at the next start.
        let (vm_id, snapshot_id) = (record.id.clone(), found.id.clone());
        self.db
            .run(move |s| s.begin_restore(&vm_id, &snapshot_id))
            .await?;
        crate::fault::point("snapshot.restore_after_record")?;
        match self.finish_restore(&record.id, &found).await {
            Ok(_) => {}
            Err(e) => {
                return Err(Error::StepFailed {
                    step: format!(
                        "cannot finish restoring VM {} to snapshot {snapshot} (the daemon's next start finishes it)",
                        record.name
                    ),
                    source: Box::new(e),
                });
            }
        }
        // The disks are the snapshot's now, with its sizes (and a memory snapshot's machine).
        if let Some(restored) = self.db.find_vm_by_id(&record.id).await? {
            record = restored;
        }
        let (work, _) = self.work_disk(&record.id);
        if let Some(bytes) = crate::usage::virtual_bytes(&work) {
            record.spec.disk_size_bytes = bytes;
        }
        record.grow_work_fs = false;
        record.updated_at = crate::now_rfc3339();
        self.db.update_spec(&record).await?;
        info!(vm = %record.name, snapshot, "restored to snapshot");
        Ok(self.vm_api(&record).await)
    }

    /// New empty tops over `snapshot`'s files, each renamed over the VM's top, and for a
    /// memory snapshot its state linked in as the VM's suspend state, sealed with the new
    /// tops, the VM then suspended; a VM suspended on another snapshot's memory is stopped
    /// otherwise (the new state returned). Redone whole after a crash: the new tops are
    /// empty either way, and the VM's suspend state goes first.
    async fn finish_restore(
        &self,
        vm_id: &str,
        snapshot: &SnapshotRecord,
    ) -> Result<Option<VmState>, Error> {
        self.remove_snapshot(vm_id);
        let files = self.layout.vm_named_snapshot(vm_id, &snapshot.id);
        let work_qcow2 = snapshot.work_format == DiskFormat::Qcow2;
        let system_top = self.layout.vm_system_disk(vm_id);
        let work_top = self.layout.vm_work_overlay(vm_id);
        let system = Backing {
            path: files.system(),
            format: DiskFormat::Qcow2,
        };
        qcow2::create_overlay(
            &system,
            &Layout::vm_overlay_partial(&system_top),
            &system_top,
        )
        .await?;
        crate::fault::point("snapshot.restore_after_system")?;
        let work = Backing {
            path: files.work(work_qcow2),
            format: snapshot.work_format,
        };
        qcow2::create_overlay(&work, &Layout::vm_overlay_partial(&work_top), &work_top).await?;
        sync_dir(&self.layout.vm_dir(vm_id))?;
        let state = if has_memory(snapshot, &files) {
            crate::fault::point("snapshot.restore_after_disks")?;
            match self.restore_memory(vm_id, snapshot).await {
                Ok(state) => Some(state),
                // The disks are restored all the same: the VM boots from them.
                Err(e) => {
                    warn!(vm_id, snapshot = %snapshot.name, "cannot restore the snapshot's memory; the VM will boot from its disks: {e}");
                    self.remove_snapshot(vm_id);
                    self.unsuspend(vm_id).await?
                }
            }
        } else {
            self.unsuspend(vm_id).await?
        };
        let id = vm_id.to_owned();
        self.db.run(move |s| s.finish_restore(&id)).await?;
        Ok(state)
    }

    /// Whether `record` is suspended on the memory of the snapshot its disks continue from
    /// (a restore of it left it so): its suspend state is that snapshot's file.
    async fn suspended_on_snapshot(&self, record: &VmRecord) -> Result<bool, Error> {
        if record.state != VmState::Suspended {
            return Ok(false);
        }
        let vm_id = record.id.clone();
        let head = self.db.run(move |s| s.head_snapshot(&vm_id)).await?;
        Ok(head.is_some_and(|head| {
            same_file(
                &self.layout.vm_named_snapshot(&record.id, &head.id).state(),
                &self.layout.vm_snapshot_state(&record.id),
            )
        }))
    }

    /// A VM restored to a disk snapshot from a suspend on another snapshot's memory (its
    /// suspend state already gone) is stopped.
    async fn unsuspend(&self, vm_id: &str) -> Result<Option<VmState>, Error> {
        let record = self.db.find_vm_by_id(vm_id).await?;
        match record {
            Some(mut record) if record.state == VmState::Suspended => {
                self.transition(&mut record, VmState::Stopped).await?;
                Ok(Some(VmState::Stopped))
            }
            _ => Ok(None),
        }
    }

    /// A memory snapshot's state becomes the VM's suspend state: linked (not copied) into
    /// the VM's directory, sealed for the VM's new tops; the VM is then suspended.
    async fn restore_memory(
        &self,
        vm_id: &str,
        snapshot: &SnapshotRecord,
    ) -> Result<VmState, Error> {
        let mut record = self
            .db
            .find_vm_by_id(vm_id)
            .await?
            .ok_or_else(|| Error::Failed(format!("the VM with id {vm_id} is gone")))?;
        let files = self.layout.vm_named_snapshot(vm_id, &snapshot.id);
        let disks = self.snapshot_disks(&record);
        let links = [
            (files.state(), self.layout.vm_snapshot_state(vm_id)),
            (files.memory(), self.layout.vm_snapshot_memory(vm_id)),
        ];
        let manifest = (files.manifest(), self.layout.vm_snapshot_manifest(vm_id));
        let resealed = tokio::task::spawn_blocking(move || {
            for (from, to) in &links {
                if from.exists() {
                    std::fs::hard_link(from, to).map_err(Error::io(format!(
                        "cannot link {} to {}",
                        from.display(),
                        to.display()
                    )))?;
                }
            }
            let sealed =
                crate::snapshot::read(&manifest.0).map_err(|e| Error::Failed(e.to_string()))?;
            crate::snapshot::reseal(&sealed, &disks, &manifest.1)
                .map_err(|e| Error::Failed(e.to_string()))
        })
        .await
        .map_err(|e| Error::Failed(format!("linking the snapshot's state panicked: {e}")))??;
        // Its memory loads only into the machine it was taken from: a `vm set` since is undone.
        if let Some(machine) = resealed.machine
            && machine != crate::snapshot::Machine::of(&record.spec)
        {
            info!(vm = %record.name, snapshot = %snapshot.name, %machine, "the VM's CPUs and memory are the snapshot's again");
            record.spec.cpus = machine.cpus;
            record.spec.memory_mib = machine.memory_mib;
            record.updated_at = crate::now_rfc3339();
            self.db.update_spec(&record).await?;
        }
        if record.state != VmState::Suspended {
            self.transition(&mut record, VmState::Suspended).await?;
        }
        Ok(VmState::Suspended)
    }

    /// Removes a named snapshot: what continues from it is rebased off it first.
    pub async fn remove_named_snapshot(&self, name: &str, snapshot: &str) -> Result<(), Error> {
        let vm = self.locked(name).await?;
        let record = self.observed_vm(&vm.name).await?;
        self.settle_disks(&record).await?;
        let found = self.named_snapshot(&record, snapshot).await?;
        let id = found.id.clone();
        let clones = self.db.run(move |s| s.clones_of(&id)).await?;
        if !clones.is_empty() {
            return Err(Error::Refused {
                message: format!(
                    "snapshot {snapshot} of VM {} is the base of {} {}",
                    record.name,
                    if clones.len() == 1 { "clone" } else { "clones" },
                    clones.join(", ")
                ),
                hint: format!("remove them first (`banger vm rm {}`)", clones.join(" ")),
            });
        }
        let dependents = self.dependents(&record, &found).await?;
        if !dependents.is_empty() && !matches!(record.state, VmState::Stopped | VmState::Created) {
            return Err(Error::NotNow {
                message: format!(
                    "VM {} is {}: removing snapshot {snapshot} merges it into the disks that continue from it, which needs the VM stopped",
                    record.name, record.state
                ),
                hint: if record.state == VmState::Suspended {
                    format!(
                        "start it and stop it first (`banger vm start {0}; banger vm stop {0}`)",
                        record.name
                    )
                } else {
                    format!("stop it first (`banger vm stop {}`)", record.name)
                },
            });
        }
        let id = found.id.clone();
        self.db.run(move |s| s.begin_snapshot_removal(&id)).await?;
        crate::fault::point("snapshot.rm_after_record")?;
        self.finish_remove(&found).await.map_err(|e| Error::StepFailed {
            step: format!(
                "cannot finish removing snapshot {snapshot} of VM {} (the daemon's next start finishes it)",
                record.name
            ),
            source: Box::new(e),
        })?;
        info!(vm = %record.name, snapshot, merged_into = dependents.len(), "snapshot removed");
        Ok(())
    }

    /// The disk files that continue from `snapshot`'s: its children's and, when the VM's
    /// head is it, the VM's tops, as (system, work) pairs.
    async fn dependents(
        &self,
        record: &VmRecord,
        snapshot: &SnapshotRecord,
    ) -> Result<Vec<(PathBuf, PathBuf)>, Error> {
        let vm_id = record.id.clone();
        let (all, head) = self
            .db
            .run(move |s| {
                Ok::<_, crate::store::StoreError>((s.snapshots_of(&vm_id)?, s.disk_head(&vm_id)?))
            })
            .await?;
        let mut pairs: Vec<(PathBuf, PathBuf)> = all
            .into_iter()
            .filter(|s| s.parent.as_deref() == Some(snapshot.id.as_str()))
            .map(|s| {
                let files = self.layout.vm_named_snapshot(&record.id, &s.id);
                (
                    files.system(),
                    files.work(s.work_format == DiskFormat::Qcow2),
                )
            })
            .collect();
        if head.is_some_and(|h| h.snapshot_id == snapshot.id) {
            pairs.push((
                self.layout.vm_system_disk(&record.id),
                self.layout.vm_work_overlay(&record.id),
            ));
        }
        Ok(pairs)
    }

    /// The file steps of removing `snapshot`: every file backed by one of its files is
    /// rebased onto that file's own backing, then its directory goes, then its row.
    async fn finish_remove(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let record = self
            .db
            .find_vm_by_id(&snapshot.vm_id)
            .await?
            .ok_or_else(|| Error::Failed(format!("no VM has snapshot {}", snapshot.id)))?;
        let files = self.layout.vm_named_snapshot(&record.id, &snapshot.id);
        let own = [
            files.system(),
            files.work(snapshot.work_format == DiskFormat::Qcow2),
        ];
        // Files are deleted only once every rebase is done: both there means rebases may remain.
        if own.iter().all(|f| f.exists()) {
            let backings = [
                qcow2::backing_of(&own[0]).await?,
                qcow2::backing_of(&own[1]).await?,
            ];
            for (system, work) in self.dependents(&record, snapshot).await? {
                for (i, dependent) in [system, work].iter().enumerate() {
                    let current = qcow2::backing_of(dependent).await?;
                    if current.is_some_and(|b| b.path == own[i]) {
                        qcow2::rebase(dependent, backings[i].as_ref()).await?;
                    }
                }
            }
            crate::fault::point("snapshot.rm_after_rebase")?;
        }
        remove_dir_if_there(files.dir())?;
        let _ = std::fs::remove_dir(self.layout.vm_snapshots_dir(&record.id));
        let deleted = snapshot.clone();
        self.db.run(move |s| s.delete_snapshot(&deleted)).await?;
        Ok(())
    }

    /// At daemon start: finishes the snapshot steps a dead daemon left half done (creates,
    /// restores, removes), and removes snapshot directories no row names.
    pub(super) async fn recover_snapshots(&self) -> Result<(), Error> {
        let pending = self.db.run(|s| s.pending_snapshots()).await?;
        for snapshot in pending {
            let finished = match snapshot.pending {
                Some(SnapshotPending::Create) => self.recover_create(&snapshot).await,
                Some(SnapshotPending::Remove) => self.finish_remove(&snapshot).await,
                None => Ok(()),
            };
            match finished {
                Ok(()) => {
                    info!(snapshot = %snapshot.name, vm_id = %snapshot.vm_id, "finished a snapshot step a dead daemon left")
                }
                Err(e) => {
                    warn!(snapshot = %snapshot.name, vm_id = %snapshot.vm_id, "cannot finish a half-done snapshot step: {e}")
                }
            }
        }
        let restoring = self.db.run(|s| s.restoring_vms()).await?;
        for vm_id in restoring {
            let id = vm_id.clone();
            let snapshot = self.db.run(move |s| s.head_snapshot(&id)).await?;
            let Some(snapshot) = snapshot else { continue };
            match self.finish_restore(&vm_id, &snapshot).await {
                Ok(_) => {
                    info!(vm_id = %vm_id, snapshot = %snapshot.name, "finished a restore a dead daemon left")
                }
                Err(e) => warn!(vm_id = %vm_id, "cannot finish a half-done restore: {e}"),
            }
        }
        let vms = self.db.list_vms().await?;
        for vm in vms {
            let vm_id = vm.id.clone();
            let known: Vec<String> = self
                .db
                .run(move |s| s.snapshots_of(&vm_id))
                .await?
                .into_iter()
                .map(|s| s.id)
                .collect();
            let dir = self.layout.vm_snapshots_dir(&vm.id);
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit());
                if ours && !known.contains(&name) {
                    warn!(path = %entry.path().display(), "removing a snapshot directory no record names");
                    let _ = std::fs::remove_dir_all(entry.path());
                } else if ours {
                    super::recover::remove_partials(&entry.path());
                }
            }
            self.remove_reopen_aliases(&vm.id);
        }
        Ok(())
    }

    /// Removes the names a QEMU disk switch gave a top for the switch only
    /// (`<top>.live-<id>` linked to the top, `vmm::qemu`) and a dead daemon left. Run once
    /// the pending creates are settled: a live overlay not renamed yet is another file.
    fn remove_reopen_aliases(&self, vm_id: &str) {
        let dir = self.layout.vm_dir(vm_id);
        for top in [
            self.layout.vm_system_disk(vm_id),
            self.layout.vm_work_overlay(vm_id),
            self.layout.vm_work_disk(vm_id),
        ] {
            let prefix = Layout::vm_overlay_live(&top, "");
            let prefix = prefix.file_name().unwrap_or_default().to_string_lossy();
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix.as_ref()) && same_file(&entry.path(), &top) {
                    warn!(path = %entry.path().display(), "removing a disk switch's alias a dead daemon left");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// A create a dead daemon left: a VM whose VMM still runs was being snapshotted live
    /// (settled by what the VMM says); any other is finished as a stopped VM's.
    async fn recover_create(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let record = self.db.find_vm_by_id(&snapshot.vm_id).await?;
        match record {
            Some(record) if self.live_control(&record).is_some() => {
                let settled = self.settle_live_create(snapshot, &record).await.map(drop);
                // A VM the dead daemon had paused for a memory snapshot runs on.
                self.after_memory_snapshot(snapshot, &record).await?;
                settled
            }
            record => {
                // A live snapshot's overlays, if the VMM died too: they hold its last writes.
                self.live_overlays_in_place(snapshot)?;
                if let Some(record) = record {
                    self.after_memory_snapshot(snapshot, &record).await?;
                }
                self.finish_create(snapshot).await
            }
        }
    }

    /// Refuses to remove a VM whose snapshots other VMs were cloned from.
    pub(super) async fn check_no_clones(&self, record: &VmRecord) -> Result<(), Error> {
        let vm_id = record.id.clone();
        let clones = self
            .db
            .run(move |s| {
                let mut clones = Vec::new();
                for snapshot in s.snapshots_of(&vm_id)? {
                    clones.extend(s.clones_of(&snapshot.id)?);
                }
                Ok::<_, crate::store::StoreError>(clones)
            })
            .await?;
        if clones.is_empty() {
            return Ok(());
        }
        Err(Error::Refused {
            message: format!(
                "VM {} has snapshots that {} {} continue from",
                record.name,
                if clones.len() == 1 { "clone" } else { "clones" },
                clones.join(", ")
            ),
            hint: format!(
                "remove the clones first (`banger vm rm {}`)",
                clones.join(" ")
            ),
        })
    }
}

/// Whether `snapshot` holds the VM's memory: asked to, and its state sealed.
pub(super) fn has_memory(
    snapshot: &SnapshotRecord,
    files: &crate::layout::NamedSnapshotFiles,
) -> bool {
    snapshot.memory_of.is_some() && files.manifest().exists()
}

/// Refuses an operation on a VM that is not stopped (or never started).
pub(super) fn must_be_stopped(record: &VmRecord, what: &str) -> Result<(), Error> {
    match record.state {
        VmState::Stopped | VmState::Created => Ok(()),
        VmState::Suspended => Err(Error::NotNow {
            message: format!(
                "VM {} is suspended: its saved memory belongs with its disks as they are",
                record.name
            ),
            hint: format!(
                "start it and stop it (`banger vm start {0}; banger vm stop {0}`), then {what} it",
                record.name
            ),
        }),
        state => Err(Error::NotNow {
            message: format!(
                "VM {} is {state}: cannot {what} it unless it is stopped",
                record.name
            ),
            hint: format!("stop it first (`banger vm stop {}`)", record.name),
        }),
    }
}

/// `snap-YYYYMMDD-HHMMSS` (UTC) of `time`.
pub fn default_name(time: std::time::SystemTime) -> String {
    let text = crate::format_rfc3339(time); // 2026-11-30T01:17:00Z
    let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
    format!(
        "snap-{}-{}",
        &digits[..8.min(digits.len())],
        &digits[8.min(digits.len())..]
    )
}

/// Where [`Manager::move_tops`] put a snapshot's files, and the VM's tops (to be made over
/// them).
pub(super) struct MovedTops {
    pub system: Backing,
    pub work: Backing,
    pub system_top: PathBuf,
    pub work_top: PathBuf,
}

/// Renames `from` to `to` unless `to` is there already (the step was done).
pub(super) fn move_once(from: &Path, to: &Path) -> Result<(), Error> {
    if to.exists() {
        // Linked there by a live snapshot that ended before its switch: the move's second
        // half is the old name's removal.
        if same_file(from, to) {
            remove_if_there(from)?;
        }
        return Ok(());
    }
    std::fs::rename(from, to).map_err(Error::io(format!(
        "cannot move {} to {}",
        from.display(),
        to.display()
    )))
}

/// Links `from` at `to` unless `to` exists: a live snapshot's first step, which leaves the
/// VMM's file at its name until the switch (see `live_snapshots`).
pub(super) fn link_once(from: &Path, to: &Path) -> Result<(), Error> {
    if to.exists() {
        return Ok(());
    }
    std::fs::hard_link(from, to).map_err(Error::io(format!(
        "cannot link {} to {}",
        from.display(),
        to.display()
    )))
}

/// Whether `a` and `b` both exist and are one file (hard links of it).
pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn remove_if_there(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("cannot remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn remove_dir_if_there(path: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("cannot remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// fsyncs directory `dir`, so the renames in it survive a power loss.
pub(super) fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(format!("cannot sync {}", dir.display())))
}

/// Bytes allocated by the files under `dir` (recursively).
/// A VM's snapshots counted, for `vm show` and `vm ls` (`None` without any). Blocking: sums
/// the files' allocation.
pub(super) fn snapshot_summary_in(
    store: &mut crate::store::Store,
    layout: &crate::layout::Layout,
    vm_id: &str,
) -> Result<Option<SnapshotSummary>, crate::store::StoreError> {
    let snapshots = store.snapshots_of(vm_id)?;
    if snapshots.is_empty() {
        return Ok(None);
    }
    Ok(Some(SnapshotSummary {
        count: snapshots.len() as u32,
        bytes: dir_allocated(&layout.vm_snapshots_dir(vm_id)),
    }))
}

fn dir_allocated(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => total += dir_allocated(&path),
            Ok(_) => total += crate::usage::allocated_bytes(&path).unwrap_or(0),
            Err(_) => {}
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_utc_timestamps() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000);
        let name = default_name(t);
        assert_eq!(name, "snap-20261130-005320");
        assert!(banger_proto::check_snapshot_name(&name).is_ok());
    }

    #[test]
    fn a_move_done_once_is_not_done_again() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "x").unwrap();
        move_once(&a, &b).unwrap();
        // Redone after a crash: the destination is there, the source gone: nothing to do.
        move_once(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "x");
        assert!(!a.exists());
        // A live snapshot's link, finished as a move: the old name goes, the file stays.
        let (c, d) = (dir.path().join("c"), dir.path().join("d"));
        std::fs::write(&c, "y").unwrap();
        link_once(&c, &d).unwrap();
        link_once(&c, &d).unwrap();
        assert!(same_file(&c, &d));
        move_once(&c, &d).unwrap();
        assert!(!c.exists());
        assert_eq!(std::fs::read_to_string(&d).unwrap(), "y");
        // Another file at the destination is not the same file: the source stays.
        std::fs::write(&c, "z").unwrap();
        move_once(&c, &d).unwrap();
        assert!(c.exists() && !same_file(&c, &d));
    }

    #[test]
    fn snapshot_names_are_checked() {
        for ok in ["a", "before-upgrade", "v1.2_rc", "2026"] {
            assert!(banger_proto::check_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a/b", "a b", &"x".repeat(64)] {
            assert!(banger_proto::check_snapshot_name(bad).is_err(), "{bad}");
        }
    }
}
