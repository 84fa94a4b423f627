//! Workspace rows: which host directory a VM's /root/repo was prepared from, and the manifest
//! of what was sent. Replaced as a whole, in one transaction, after a transfer succeeded.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::workspace::{Entry, Kind, Manifest};

/// The prepared workspace of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    pub host_path: String,
    pub git: bool,
    /// HEAD at prepare (git workspaces with commits).
    pub head: Option<String>,
    /// Tree id of the prepared state in the guest, the base of `export`.
    pub base_tree: Option<String>,
    pub prepared_at: String,
}

impl Store {
    /// The workspace of VM `vm_id`, if one was prepared.
    pub fn workspace(&self, vm_id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT host_path, git, head, base_tree, prepared_at FROM workspaces WHERE vm_id = ?1",
                [vm_id],
                |row| {
                    Ok(WorkspaceRecord {
                        host_path: row.get(0)?,
                        git: row.get(1)?,
                        head: row.get(2)?,
                        base_tree: row.get(3)?,
                        prepared_at: row.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// The manifest of VM `vm_id` (empty when none was prepared).
    pub fn manifest(&self, vm_id: &str) -> Result<Manifest, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, kind, size, mode, mtime_ns, hash FROM workspace_files WHERE vm_id = ?1",
        )?;
        let rows = stmt.query_map([vm_id], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, u32>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, String>(5)?,
            ))
        })?;
        let mut manifest = Manifest::new();
        for row in rows {
            let (path, kind, size, mode, mtime_ns, hash) = row?;
            let kind = Kind::from_wire(&kind)
                .ok_or_else(|| StoreError::Corrupt(format!("workspace entry kind {kind:?}")))?;
            manifest.insert(
                path.clone(),
                Entry {
                    path,
                    kind,
                    size: u64::try_from(size).unwrap_or(0),
                    mode,
                    mtime_ns,
                    hash,
                },
            );
        }
        Ok(manifest)
    }

    /// Replaces the workspace of VM `vm_id` and its manifest.
    pub fn save_workspace(
        &mut self,
        vm_id: &str,
        record: &WorkspaceRecord,
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM workspaces WHERE vm_id = ?1", [vm_id])?;
        tx.execute(
            "INSERT INTO workspaces (vm_id, host_path, git, head, base_tree, prepared_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                vm_id,
                record.host_path,
                record.git,
                record.head,
                record.base_tree,
                record.prepared_at
            ],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO workspace_files (vm_id, path, kind, size, mode, mtime_ns, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for entry in manifest.values() {
                insert.execute(params![
                    vm_id,
                    entry.path,
                    entry.kind.as_str(),
                    i64::try_from(entry.size).unwrap_or(i64::MAX),
                    entry.mode,
                    entry.mtime_ns,
                    entry.hash
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::domain::{SystemDiskStrategy, VmmKind};
    use crate::model::VmRecord;
    use crate::model::VmSpec;
    use banger_proto::VmName;

    #[test]
    fn manifest_round_trips_and_goes_with_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        let vm = VmRecord::new(
            VmName::parse("dev").unwrap(),
            VmSpec {
                cpus: 1,
                memory_mib: 512,
                disk_size_bytes: 1 << 30,
                image: "default".into(),
                vmm: VmmKind::Qemu,
                vmm_reason: "test".into(),
                system_disk: SystemDiskStrategy::Qcow2,
            },
        );
        store.insert_vm(&vm).unwrap();
        assert!(store.workspace(&vm.id).unwrap().is_none());
        let mut manifest = Manifest::new();
        for (path, kind) in [
            ("a b/ü", Kind::File),
            ("l", Kind::Symlink),
            (".git", Kind::Dir),
        ] {
            manifest.insert(
                path.into(),
                Entry {
                    path: path.into(),
                    kind,
                    size: 3,
                    mode: 0o755,
                    mtime_ns: 1_700_000_000_123_456_789,
                    hash: "ab".into(),
                },
            );
        }
        let record = WorkspaceRecord {
            host_path: "/src/x".into(),
            git: true,
            head: Some("c0ffee".into()),
            base_tree: None,
            prepared_at: "2026-01-01T00:00:00Z".into(),
        };
        store.save_workspace(&vm.id, &record, &manifest).unwrap();
        store.save_workspace(&vm.id, &record, &manifest).unwrap();
        assert_eq!(store.workspace(&vm.id).unwrap().unwrap(), record);
        assert_eq!(store.manifest(&vm.id).unwrap(), manifest);
        store.delete_vm("dev").unwrap();
        assert!(store.manifest(&vm.id).unwrap().is_empty());
    }
}
