//! Durable state in SQLite (WAL, foreign keys on, `synchronous=FULL`): VM records now; leases,
//! images and manifests as later migrations. Every write is one transaction, so a SIGKILL at any
//! point leaves either the old or the new row, never a torn one.

mod assets;
mod blobs;
mod leases;
mod migrations;
mod ports;
mod snapshots;
mod workspace;

pub use workspace::WorkspaceRecord;

pub use assets::AssetTable;
pub use blobs::BlobRecord;
pub use leases::{Lease, LeasePool};
pub use snapshots::{DiskHead, MemoryOf, SnapshotPending, SnapshotRecord};

use std::path::Path;

use banger_proto::{VmName, VmState};
use rusqlite::{Connection, OptionalExtension, params};

use crate::model::{VmRecord, VmSpec};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A VM with that name exists.
    #[error("VM {0:?} already exists")]
    VmExists(String),
    /// No VM with that name.
    #[error("VM {0:?} not found")]
    VmNotFound(String),
    /// The database refused or failed.
    #[error("state database")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row holds a value this version cannot read.
    #[error("state database holds an unreadable value: {0}")]
    Corrupt(String),
    /// No free address (or tap name) is left.
    #[error("no free address left in {0}")]
    PoolExhausted(String),
    /// The database was written by a newer banger.
    #[error("state database schema version {found} is newer than this banger ({known})")]
    TooNew { found: i64, known: i64 },
}

/// The open state database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

/// The columns of a VM row up to schema 8 (what migration 6 checks), then the later ones.
const VM_COLUMNS_V8: &str = "id, name, cpus, memory_mib, disk_size_bytes, image, state, created_at, updated_at, last_error, runtime_json, vmm, vmm_reason, system_disk";
const VM_COLUMNS: &str = "id, name, cpus, memory_mib, disk_size_bytes, image, state, created_at, updated_at, last_error, runtime_json, vmm, vmm_reason, system_disk, last_stop, start_fsck, grow_work_fs";

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Self { conn };
        migrations::apply(&mut store.conn)?;
        leases::rename_legacy_taps(&store.conn, nix::unistd::geteuid().as_raw())?;
        Ok(store)
    }

    /// Inserts a new VM; fails with [`StoreError::VmExists`] when the name is taken.
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        insert_vm_on(&self.conn, vm)
    }

    /// Writes the mutable fields (state, error, runtime, how it last stopped, what its last
    /// start checked, updated_at) of an existing VM.
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let runtime = runtime_json(vm)?;
        let last_stop = to_json(&vm.last_stop)?;
        let start_fsck = to_json(&vm.start_fsck)?;
        let changed = self.conn.execute(
            "UPDATE vms SET state = ?2, updated_at = ?3, last_error = ?4, runtime_json = ?5, last_stop = ?6, start_fsck = ?7 WHERE id = ?1",
            params![
                vm.id,
                vm.state.as_str(),
                vm.updated_at,
                vm.last_error,
                runtime,
                last_stop,
                start_fsck
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::VmNotFound(vm.name.to_string()));
        }
        Ok(())
    }

    /// Writes an existing VM's resources (`vm set`): CPUs, memory, work disk size, and whether
    /// its work filesystem still has to grow. Separate from [`Self::update_vm`], which runs
    /// without the VM's lock when a dead VMM is found, so a stale record never writes them.
    pub fn update_spec(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let changed = self.conn.execute(
            "UPDATE vms SET cpus = ?2, memory_mib = ?3, disk_size_bytes = ?4, grow_work_fs = ?5, updated_at = ?6 WHERE id = ?1",
            params![
                vm.id,
                vm.spec.cpus,
                vm.spec.memory_mib,
                vm.spec.disk_size_bytes,
                vm.grow_work_fs,
                vm.updated_at
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::VmNotFound(vm.name.to_string()));
        }
        Ok(())
    }

    /// The VM called `name`, if any.
    pub fn find_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        self.find_vm_where("name = ?1", name)
    }

    /// The VM with id `id`, if any.
    pub fn find_vm_by_id(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        self.find_vm_where("id = ?1", id)
    }

    /// The VM matching `condition` (a fixed SQL condition on `?1`) with `value`, if any.
    fn find_vm_where(&self, condition: &str, value: &str) -> Result<Option<VmRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE {condition}"),
                [value],
                raw_vm,
            )
            .optional()?
            .map(RawVm::into_record)
            .transpose()
    }

    /// The VM called `name`, or [`StoreError::VmNotFound`].
    pub fn get_vm(&self, name: &str) -> Result<VmRecord, StoreError> {
        self.find_vm(name)?
            .ok_or_else(|| StoreError::VmNotFound(name.to_owned()))
    }

    /// All VMs, by name.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))?;
        let rows = stmt.query_map([], raw_vm)?;
        rows.map(|row| row.map_err(StoreError::from).and_then(RawVm::into_record))
            .collect()
    }

    /// Deletes the VM called `name`.
    pub fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        let changed = self
            .conn
            .execute("DELETE FROM vms WHERE name = ?1", [name])?;
        if changed == 0 {
            return Err(StoreError::VmNotFound(name.to_owned()));
        }
        Ok(())
    }
}

/// Inserts `vm` on `conn` (a connection or a transaction).
fn insert_vm_on(conn: &Connection, vm: &VmRecord) -> Result<(), StoreError> {
    let runtime = runtime_json(vm)?;
    let result = conn.execute(
        &format!(
            "INSERT INTO vms ({VM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        ),
        params![
            vm.id,
            vm.name.as_str(),
            vm.spec.cpus,
            vm.spec.memory_mib,
            vm.spec.disk_size_bytes,
            vm.spec.image,
            vm.state.as_str(),
            vm.created_at,
            vm.updated_at,
            vm.last_error,
            runtime,
            vm.spec.vmm.as_str(),
            vm.spec.vmm_reason,
            vm.spec.system_disk.as_str(),
            to_json(&vm.last_stop)?,
            to_json(&vm.start_fsck)?,
            vm.grow_work_fs,
        ],
    );
    match result {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::VmExists(vm.name.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

fn runtime_json(vm: &VmRecord) -> Result<Option<String>, StoreError> {
    to_json(&vm.runtime)
}

/// An optional document of a VM row as JSON text (`NULL` when absent).
fn to_json<T: serde::Serialize>(value: &Option<T>) -> Result<Option<String>, StoreError> {
    value
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A row as SQLite returns it, before validation.
struct RawVm {
    id: String,
    name: String,
    cpus: u32,
    memory_mib: u64,
    disk_size_bytes: u64,
    image: String,
    state: String,
    created_at: String,
    updated_at: String,
    last_error: Option<String>,
    runtime_json: Option<String>,
    vmm: String,
    vmm_reason: String,
    system_disk: String,
    last_stop: Option<String>,
    start_fsck: Option<String>,
    grow_work_fs: bool,
}

/// Reads a row of [`VM_COLUMNS`], or of [`VM_COLUMNS_V8`] (migration 6's check, before the
/// later columns exist), whose later fields read as absent.
fn raw_vm(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawVm> {
    let later = row.as_ref().column_count() > 14;
    Ok(RawVm {
        id: row.get(0)?,
        name: row.get(1)?,
        cpus: row.get(2)?,
        memory_mib: row.get(3)?,
        disk_size_bytes: row.get(4)?,
        image: row.get(5)?,
        state: row.get(6)?,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
        last_error: row.get(9)?,
        runtime_json: row.get(10)?,
        vmm: row.get(11)?,
        vmm_reason: row.get(12)?,
        system_disk: row.get(13)?,
        last_stop: if later { row.get(14)? } else { None },
        start_fsck: if later { row.get(15)? } else { None },
        grow_work_fs: later && row.get(16)?,
    })
}

impl RawVm {
    /// The typed record; a value no domain enum spells is an error naming the VM, never a
    /// default (a Firecracker VM read as QEMU would boot its raw disk as qcow2).
    fn into_record(self) -> Result<VmRecord, StoreError> {
        let name = VmName::parse(&self.name).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("VM {name:?}: {e}"));
        let state = VmState::from_wire(&self.state)
            .ok_or_else(|| corrupt(&format!("state {:?}", self.state)))?;
        let vmm = self.vmm.parse().map_err(|e| corrupt(&e))?;
        let system_disk = self.system_disk.parse().map_err(|e| corrupt(&e))?;
        let runtime = self
            .runtime_json
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| corrupt(&format!("runtime: {e}")))?;
        let last_stop = self
            .last_stop
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| corrupt(&format!("last stop: {e}")))?;
        let start_fsck = self
            .start_fsck
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| corrupt(&format!("start fsck: {e}")))?;
        Ok(VmRecord {
            id: self.id,
            name,
            spec: VmSpec {
                cpus: self.cpus,
                memory_mib: self.memory_mib,
                disk_size_bytes: self.disk_size_bytes,
                image: self.image,
                vmm,
                vmm_reason: self.vmm_reason,
                system_disk,
            },
            state,
            created_at: self.created_at,
            updated_at: self.updated_at,
            last_error: self.last_error,
            runtime,
            last_stop,
            start_fsck,
            grow_work_fs: self.grow_work_fs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{SystemDiskStrategy, VmmKind};

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 2,
            memory_mib: 1024,
            disk_size_bytes: 8 << 30,
            image: "default".into(),
            vmm: VmmKind::Firecracker,
            vmm_reason: "test".into(),
            system_disk: SystemDiskStrategy::Reflink,
        }
    }

    /// A row whose backend or disk strategy this banger does not know is refused with an
    /// error naming the VM and the value, on open (the migration's check) and on read.
    #[test]
    fn unknown_backend_or_strategy_in_a_row_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        store
            .insert_vm(&VmRecord::new(VmName::parse("dev").unwrap(), spec()))
            .unwrap();
        store
            .conn
            .execute("UPDATE vms SET system_disk = 'zfs' WHERE name = 'dev'", [])
            .unwrap();
        let err = store.get_vm("dev").unwrap_err().to_string();
        assert!(
            err.contains("\"dev\"")
                && err.contains("\"zfs\"")
                && err.contains("qcow2, reflink, dm, copy"),
            "{err}"
        );
        assert!(store.list_vms().is_err());
        store
            .conn
            .execute(
                "UPDATE vms SET system_disk = 'copy', vmm = 'xen' WHERE name = 'dev'",
                [],
            )
            .unwrap();
        let err = store.get_vm("dev").unwrap_err().to_string();
        assert!(
            err.contains("vmm \"xen\" is not one of qemu, firecracker"),
            "{err}"
        );
        // A runtime document with an unknown acceleration is no better.
        store
            .conn
            .execute(
                r#"UPDATE vms SET vmm = 'qemu', runtime_json = '{"vmm":"qemu","accel":"hvf","reason":"","ssh_host":"h","ssh_port":1}' WHERE name = 'dev'"#,
                [],
            )
            .unwrap();
        let err = store.get_vm("dev").unwrap_err().to_string();
        assert!(err.contains("hvf") && err.contains("kvm, tcg"), "{err}");
    }

    /// A database from before the typed domain (schema 5) holding a row with an unknown
    /// backend does not open: the migration names the row instead of carrying it along.
    #[test]
    fn the_typed_domain_migration_refuses_unknown_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrations::apply_up_to(&mut conn, 5).unwrap();
            conn.execute(
                "INSERT INTO vms (id, name, cpus, memory_mib, disk_size_bytes, image, state, created_at, updated_at, vmm, system_disk) \
                 VALUES ('a1', 'old', 1, 128, 67108864, 'default', 'stopped', 't', 't', 'bhyve', 'qcow2')",
                [],
            )
            .unwrap();
        }
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("\"old\"")
                && err.contains("vmm \"bhyve\" is not one of qemu, firecracker"),
            "{err}"
        );
        // Nothing was half-applied: fixing the row lets the migration through.
        {
            let conn = Connection::open(&path).unwrap();
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 5);
            conn.execute("UPDATE vms SET vmm = 'qemu'", []).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_vm("old").unwrap().spec.vmm, VmmKind::Qemu);
    }

    #[test]
    fn round_trips_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let vm = VmRecord::new(VmName::parse("dev").unwrap(), spec());
        store.insert_vm(&vm).unwrap();
        assert_eq!(store.get_vm("dev").unwrap(), vm);
        assert_eq!(store.find_vm_by_id(&vm.id).unwrap(), Some(vm.clone()));
        assert_eq!(store.find_vm_by_id("dev").unwrap(), None);
        let again = VmRecord::new(VmName::parse("dev").unwrap(), spec());
        assert!(matches!(
            store.insert_vm(&again),
            Err(StoreError::VmExists(_))
        ));
        store.delete_vm("dev").unwrap();
        assert!(matches!(
            store.get_vm("dev"),
            Err(StoreError::VmNotFound(_))
        ));
    }

    /// How a VM last stopped, what its last start checked and its resources survive a
    /// reopen; a spec write leaves the lifecycle fields alone and the other way round.
    #[test]
    fn stops_checks_and_resources_are_kept() {
        use banger_proto::{DiskFsck, FsckResult, StartFsck, StopKind};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut vm = VmRecord::new(VmName::parse("a").unwrap(), spec());
        {
            let store = Store::open(&path).unwrap();
            store.insert_vm(&vm).unwrap();
            vm.record_stop(StopKind::Unclean, "kill");
            vm.start_fsck = Some(StartFsck {
                at: "t".into(),
                ran: true,
                why: "the last stop was unclean (kill)".into(),
                disks: vec![DiskFsck {
                    disk: "work".into(),
                    result: FsckResult::Repaired,
                    checked_by: Default::default(),
                    exit_code: Some(1),
                    detail: "work.ext4: 11/65536 files".into(),
                }],
            });
            store.update_vm(&vm).unwrap();
            let mut bigger = vm.clone();
            bigger.spec.cpus = 1;
            bigger.spec.memory_mib = 512;
            bigger.spec.disk_size_bytes = 16 << 30;
            bigger.grow_work_fs = true;
            // A stale copy of the record (what `vm ls` writes when it finds the VMM dead)
            // does not undo the spec.
            store.update_spec(&bigger).unwrap();
            store.update_vm(&vm).unwrap();
            vm = bigger;
        }
        let store = Store::open(&path).unwrap();
        let read = store.get_vm("a").unwrap();
        assert_eq!(read.last_stop, vm.last_stop);
        assert_eq!(read.start_fsck, vm.start_fsck);
        assert_eq!(
            (
                read.spec.cpus,
                read.spec.memory_mib,
                read.spec.disk_size_bytes
            ),
            (1, 512, 16 << 30)
        );
        assert!(read.grow_work_fs);
        assert_eq!(read.last_stop.unwrap().kind, StopKind::Unclean);
    }

    /// A VM recorded before schema 9 has no stop, no check and nothing to grow: its next
    /// start runs no fsck.
    #[test]
    fn rows_from_before_stop_records_read_as_never_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrations::apply_up_to(&mut conn, 8).unwrap();
            conn.execute(
                "INSERT INTO vms (id, name, cpus, memory_mib, disk_size_bytes, image, state, created_at, updated_at, vmm, system_disk) \
                 VALUES ('a1', 'old', 1, 128, 67108864, 'default', 'stopped', 't', 't', 'qemu', 'qcow2')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.get_vm("old").unwrap();
        assert_eq!(
            (old.last_stop, old.start_fsck, old.grow_work_fs),
            (None, None, false)
        );
    }

    #[test]
    fn reopening_keeps_records_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let store = Store::open(&path).unwrap();
            let mut vm = VmRecord::new(VmName::parse("a").unwrap(), spec());
            store.insert_vm(&vm).unwrap();
            vm.state = VmState::Stopped;
            vm.last_error = Some("boom".into());
            store.update_vm(&vm).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let vm = store.get_vm("a").unwrap();
        assert_eq!(vm.state, VmState::Stopped);
        assert_eq!(vm.last_error.as_deref(), Some("boom"));
    }
}
