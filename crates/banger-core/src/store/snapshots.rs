//! Named snapshots of VMs' disks (`vm snapshot`), the snapshot each VM's disks continue from
//! (its head), and the operations on their files that a crash may leave half done (finished
//! at daemon start). The files themselves are in `vms/<vm id>/snapshots/<id>/`.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::domain::DiskFormat;

/// A file step of a snapshot that may be half done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotPending {
    /// Its files are being moved out of the VM's top and new tops made over them.
    Create,
    /// Its dependents are being rebased off it, then its files deleted.
    Remove,
}

impl SnapshotPending {
    fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Remove => "remove",
        }
    }
    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "create" => Ok(Self::Create),
            "remove" => Ok(Self::Remove),
            other => Err(StoreError::Corrupt(format!("snapshot step {other:?}"))),
        }
    }
}

/// The state of a VM whose memory a snapshot was asked to hold (`--memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryOf {
    /// Running: the daemon pauses it for the snapshot and resumes it after.
    Running,
    /// Paused by its owner: it stays paused.
    Paused,
}

impl MemoryOf {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
        }
    }
    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "running" => Ok(Self::Running),
            "paused" => Ok(Self::Paused),
            other => Err(StoreError::Corrupt(format!("snapshot memory of {other:?}"))),
        }
    }
}

/// One named snapshot's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub vm_id: String,
    pub name: String,
    /// The format of its work file (`work.ext4` raw, or `work.qcow2`).
    pub work_format: DiskFormat,
    /// The snapshot the VM continued from when this one was taken.
    pub parent: Option<String>,
    pub created_at: String,
    pub pending: Option<SnapshotPending>,
    /// Set when it was asked to hold the VM's memory too (whether it does: its manifest).
    pub memory_of: Option<MemoryOf>,
}

/// The snapshot a VM's disks continue from now, and whether a restore of it is half done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHead {
    pub snapshot_id: String,
    pub restoring: bool,
}

const COLUMNS: &str = "id, vm_id, name, work_format, parent, created_at, pending, memory_of";

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<[Option<String>; 8]> {
    Ok([
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ])
}

fn to_record(raw: [Option<String>; 8]) -> Result<SnapshotRecord, StoreError> {
    let [
        id,
        vm_id,
        name,
        format,
        parent,
        created_at,
        pending,
        memory_of,
    ] = raw;
    let text = |v: Option<String>| v.ok_or_else(|| StoreError::Corrupt("snapshot row".into()));
    let format = text(format)?;
    Ok(SnapshotRecord {
        id: text(id)?,
        vm_id: text(vm_id)?,
        name: text(name)?,
        work_format: format
            .parse()
            .map_err(|e: crate::domain::ParseError| StoreError::Corrupt(e.to_string()))?,
        parent,
        created_at: text(created_at)?,
        pending: pending.as_deref().map(SnapshotPending::parse).transpose()?,
        memory_of: memory_of.as_deref().map(MemoryOf::parse).transpose()?,
    })
}

impl Store {
    /// The VM's snapshots, oldest first.
    pub fn snapshots_of(&self, vm_id: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM vm_snapshots WHERE vm_id = ?1 ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([vm_id], read_row)?;
        rows.map(|r| to_record(r?)).collect()
    }

    /// Every snapshot with a half-done file step.
    pub fn pending_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM vm_snapshots WHERE pending IS NOT NULL ORDER BY rowid"
        ))?;
        let rows = stmt.query_map([], read_row)?;
        rows.map(|r| to_record(r?)).collect()
    }

    /// The VM's snapshot called `name`.
    pub fn find_snapshot(
        &self,
        vm_id: &str,
        name: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vm_snapshots WHERE vm_id = ?1 AND name = ?2"),
                params![vm_id, name],
                read_row,
            )
            .optional()?;
        raw.map(to_record).transpose()
    }

    /// The snapshot with `id`.
    pub fn snapshot_by_id(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vm_snapshots WHERE id = ?1"),
                [id],
                read_row,
            )
            .optional()?;
        raw.map(to_record).transpose()
    }

    /// The snapshot the VM's disks continue from now, if any.
    pub fn disk_head(&self, vm_id: &str) -> Result<Option<DiskHead>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT snapshot_id, restoring FROM vm_disk_heads WHERE vm_id = ?1",
                [vm_id],
                |r| {
                    Ok(DiskHead {
                        snapshot_id: r.get(0)?,
                        restoring: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// The snapshot the VM's disks continue from now, if any.
    pub fn head_snapshot(&self, vm_id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        match self.disk_head(vm_id)? {
            Some(head) => self.snapshot_by_id(&head.snapshot_id),
            None => Ok(None),
        }
    }

    /// Every VM whose restore is half done.
    pub fn restoring_vms(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT vm_id FROM vm_disk_heads WHERE restoring = 1")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a snapshot about to be taken (pending `create`) and makes it the VM's head, in
    /// one transaction. Fails with a constraint error when the name is taken.
    pub fn begin_snapshot(&mut self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            &format!(
                "INSERT INTO vm_snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                snapshot.id,
                snapshot.vm_id,
                snapshot.name,
                snapshot.work_format.as_str(),
                snapshot.parent,
                snapshot.created_at,
                SnapshotPending::Create.as_str(),
                snapshot.memory_of.map(MemoryOf::as_str),
            ],
        )?;
        set_head(&tx, &snapshot.vm_id, Some(&snapshot.id), false)?;
        tx.commit()?;
        Ok(())
    }

    /// Marks a snapshot's file step done.
    pub fn finish_snapshot_step(&self, id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE vm_snapshots SET pending = NULL WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Forgets a snapshot whose create was undone: the VM's head goes back to its parent.
    pub fn abandon_snapshot(&mut self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        set_head(&tx, &snapshot.vm_id, snapshot.parent.as_deref(), false)?;
        tx.execute("DELETE FROM vm_snapshots WHERE id = ?1", [&snapshot.id])?;
        tx.commit()?;
        Ok(())
    }

    /// Makes `snapshot_id` the VM's head with its restore marked half done (the commit point
    /// of `vm snapshot restore`).
    pub fn begin_restore(&mut self, vm_id: &str, snapshot_id: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        set_head(&tx, vm_id, Some(snapshot_id), true)?;
        tx.commit()?;
        Ok(())
    }

    /// Marks the VM's restore done.
    pub fn finish_restore(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE vm_disk_heads SET restoring = 0 WHERE vm_id = ?1",
            [vm_id],
        )?;
        Ok(())
    }

    /// Marks a snapshot as being removed.
    pub fn begin_snapshot_removal(&self, id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE vm_snapshots SET pending = ?2 WHERE id = ?1",
            params![id, SnapshotPending::Remove.as_str()],
        )?;
        Ok(())
    }

    /// Deletes a removed snapshot's row: its children and the VM's head (when it was the
    /// head) continue from its parent now.
    pub fn delete_snapshot(&mut self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE vm_snapshots SET parent = ?2 WHERE parent = ?1",
            params![snapshot.id, snapshot.parent],
        )?;
        let head: Option<String> = tx
            .query_row(
                "SELECT snapshot_id FROM vm_disk_heads WHERE vm_id = ?1",
                [&snapshot.vm_id],
                |r| r.get(0),
            )
            .optional()?;
        if head.as_deref() == Some(snapshot.id.as_str()) {
            set_head(&tx, &snapshot.vm_id, snapshot.parent.as_deref(), false)?;
        }
        tx.execute("DELETE FROM vm_snapshots WHERE id = ?1", [&snapshot.id])?;
        tx.commit()?;
        Ok(())
    }

    /// Records `vm_id` as a clone of snapshot `snapshot_id` (its host key still to replace).
    pub fn add_clone(&self, vm_id: &str, snapshot_id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO vm_clones (vm_id, snapshot_id) VALUES (?1, ?2)",
            params![vm_id, snapshot_id],
        )?;
        Ok(())
    }

    /// The snapshot the VM was cloned from and whether its host key is still the source's.
    pub fn clone_source(&self, vm_id: &str) -> Result<Option<(String, bool)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT snapshot_id, fresh FROM vm_clones WHERE vm_id = ?1",
                [vm_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Marks the clone's host key as its own.
    pub fn clone_identity_done(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE vm_clones SET fresh = 0 WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// The names of the VMs cloned from snapshot `id`.
    pub fn clones_of(&self, snapshot_id: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT vms.name FROM vm_clones JOIN vms ON vms.id = vm_clones.vm_id
             WHERE vm_clones.snapshot_id = ?1 ORDER BY vms.name",
        )?;
        let rows = stmt.query_map([snapshot_id], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Sets (or clears, with `None`) the VM's head on `conn`.
fn set_head(
    conn: &rusqlite::Connection,
    vm_id: &str,
    snapshot_id: Option<&str>,
    restoring: bool,
) -> Result<(), StoreError> {
    match snapshot_id {
        Some(id) => conn.execute(
            "INSERT INTO vm_disk_heads (vm_id, snapshot_id, restoring) VALUES (?1, ?2, ?3)
             ON CONFLICT (vm_id) DO UPDATE SET snapshot_id = ?2, restoring = ?3",
            params![vm_id, id, restoring],
        )?,
        None => conn.execute("DELETE FROM vm_disk_heads WHERE vm_id = ?1", [vm_id])?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{VmRecord, VmSpec};

    fn store_with_vm() -> (tempfile::TempDir, Store, VmRecord) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        let spec = VmSpec {
            cpus: 1,
            memory_mib: 512,
            disk_size_bytes: 1 << 30,
            image: "default".into(),
            vmm: crate::domain::VmmKind::Qemu,
            vmm_reason: "test".into(),
            system_disk: crate::domain::SystemDiskStrategy::Qcow2,
        };
        let vm = VmRecord::new(banger_proto::VmName::parse("a").unwrap(), spec);
        store.insert_vm_with_lease(&vm, None).unwrap();
        (dir, store, vm)
    }

    fn snap(vm: &VmRecord, id: &str, name: &str, parent: Option<&str>) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            vm_id: vm.id.clone(),
            name: name.into(),
            work_format: DiskFormat::Raw,
            parent: parent.map(str::to_owned),
            created_at: format!("2026-01-01T00:00:0{id}Z"),
            pending: None,
            memory_of: None,
        }
    }

    #[test]
    fn a_memory_snapshot_keeps_the_state_it_was_asked_of() {
        let (_dir, mut store, vm) = store_with_vm();
        let s1 = SnapshotRecord {
            memory_of: Some(MemoryOf::Running),
            ..snap(&vm, "1", "one", None)
        };
        store.begin_snapshot(&s1).unwrap();
        let found = store.find_snapshot(&vm.id, "one").unwrap().unwrap();
        assert_eq!(found.memory_of, Some(MemoryOf::Running));
        let s2 = SnapshotRecord {
            memory_of: Some(MemoryOf::Paused),
            ..snap(&vm, "2", "two", Some("1"))
        };
        store.begin_snapshot(&s2).unwrap();
        assert_eq!(
            store.snapshot_by_id("2").unwrap().unwrap().memory_of,
            Some(MemoryOf::Paused)
        );
    }

    #[test]
    fn snapshots_move_the_head_and_removal_relinks_children() {
        let (_dir, mut store, vm) = store_with_vm();
        let s1 = snap(&vm, "1", "one", None);
        store.begin_snapshot(&s1).unwrap();
        assert_eq!(store.pending_snapshots().unwrap().len(), 1);
        store.finish_snapshot_step("1").unwrap();
        assert!(store.pending_snapshots().unwrap().is_empty());
        let s2 = snap(&vm, "2", "two", Some("1"));
        store.begin_snapshot(&s2).unwrap();
        store.finish_snapshot_step("2").unwrap();
        assert_eq!(store.disk_head(&vm.id).unwrap().unwrap().snapshot_id, "2");
        // A taken name is refused.
        assert!(store.begin_snapshot(&snap(&vm, "3", "two", None)).is_err());
        // Restore 1: head 1, half done until finished.
        store.begin_restore(&vm.id, "1").unwrap();
        assert_eq!(store.restoring_vms().unwrap(), vec![vm.id.clone()]);
        store.finish_restore(&vm.id).unwrap();
        assert!(store.restoring_vms().unwrap().is_empty());
        // Removing 1: 2's parent becomes none, and the head (1) goes to 1's parent (none).
        store.delete_snapshot(&s1).unwrap();
        let left = store.snapshots_of(&vm.id).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].parent, None);
        assert_eq!(store.disk_head(&vm.id).unwrap(), None);
        // An abandoned create puts the head back.
        let s4 = snap(&vm, "4", "four", Some("2"));
        store.begin_restore(&vm.id, "2").unwrap();
        store.begin_snapshot(&s4).unwrap();
        store.abandon_snapshot(&s4).unwrap();
        assert_eq!(store.disk_head(&vm.id).unwrap().unwrap().snapshot_id, "2");
        assert!(store.find_snapshot(&vm.id, "four").unwrap().is_none());
        // A clone (another VM) of snapshot 2: listed, fresh until its key is its own, and
        // the snapshot cannot be deleted under it.
        let clone = VmRecord::new(banger_proto::VmName::parse("b").unwrap(), vm.spec.clone());
        store.insert_vm_with_lease(&clone, None).unwrap();
        store.add_clone(&clone.id, "2").unwrap();
        assert_eq!(store.clones_of("2").unwrap(), vec!["b".to_owned()]);
        assert_eq!(
            store.clone_source(&clone.id).unwrap(),
            Some(("2".into(), true))
        );
        store.clone_identity_done(&clone.id).unwrap();
        assert_eq!(
            store.clone_source(&clone.id).unwrap(),
            Some(("2".into(), false))
        );
        let s2 = store.snapshot_by_id("2").unwrap().unwrap();
        assert!(store.delete_snapshot(&s2).is_err());
        store.delete_vm("b").unwrap();
        assert!(store.clones_of("2").unwrap().is_empty());
        // The VM's rows go with it.
        store.delete_vm("a").unwrap();
        assert!(store.snapshots_of(&vm.id).unwrap().is_empty());
    }
}
