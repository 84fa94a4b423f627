//! Schema migrations, applied in order and recorded in `PRAGMA user_version`. Append only:
//! a released migration is never edited.

use rusqlite::Connection;

use super::StoreError;

/// Each entry moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: VM records.
    "CREATE TABLE vms (
        id              TEXT PRIMARY KEY NOT NULL,
        name            TEXT NOT NULL UNIQUE,
        cpus            INTEGER NOT NULL CHECK (cpus > 0),
        memory_mib      INTEGER NOT NULL CHECK (memory_mib > 0),
        disk_size_bytes INTEGER NOT NULL CHECK (disk_size_bytes > 0),
        image           TEXT NOT NULL,
        state           TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        last_error      TEXT,
        runtime_json    TEXT
    ) STRICT;",
    // 2: kernels and images, content-addressed on disk by digest.
    "CREATE TABLE kernels (
        name        TEXT PRIMARY KEY NOT NULL,
        digest      TEXT NOT NULL,
        release     TEXT,
        has_initrd  INTEGER NOT NULL,
        source      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE images (
        name        TEXT PRIMARY KEY NOT NULL,
        digest      TEXT NOT NULL,
        kernel      TEXT NOT NULL REFERENCES kernels(name) ON DELETE RESTRICT,
        size_bytes  INTEGER NOT NULL,
        source      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    ) STRICT;",
    // 3: the workspace prepared in each VM and its manifest (what the guest holds).
    "CREATE TABLE workspaces (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        host_path   TEXT NOT NULL,
        git         INTEGER NOT NULL,
        head        TEXT,
        base_tree   TEXT,
        prepared_at TEXT NOT NULL
    ) STRICT;
    CREATE TABLE workspace_files (
        vm_id    TEXT NOT NULL REFERENCES workspaces(vm_id) ON DELETE CASCADE,
        path     TEXT NOT NULL,
        kind     TEXT NOT NULL,
        size     INTEGER NOT NULL,
        mode     INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash     TEXT NOT NULL,
        PRIMARY KEY (vm_id, path)
    ) STRICT, WITHOUT ROWID;",
    // 4: the VM's backend (and why) and how its system disk was made.
    "ALTER TABLE vms ADD COLUMN vmm TEXT NOT NULL DEFAULT 'qemu';
    ALTER TABLE vms ADD COLUMN vmm_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN system_disk TEXT NOT NULL DEFAULT 'qcow2';",
    // 5: bridge networking: one lease (address + tap) per VM in bridge mode; a VM without a
    // lease uses user-mode networking. Deleted with the VM.
    "CREATE TABLE leases (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        ip          TEXT NOT NULL UNIQUE,
        tap         TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL
    ) STRICT;",
    // 6: registry blobs: which compressed layer (by its OCI digest) became which local store
    // directory (`kind` rootfs → images/<local>, kernel/initrd → kernels/<local>), so a pull of
    // stored content fetches nothing and a push of it compresses nothing. For `config`, `local`
    // is the config JSON itself.
    "CREATE TABLE blobs (
        digest        TEXT PRIMARY KEY NOT NULL,
        kind          TEXT NOT NULL,
        local         TEXT NOT NULL,
        size          INTEGER NOT NULL,
        uncompressed  INTEGER NOT NULL,
        created_at    TEXT NOT NULL
    ) STRICT;
    CREATE INDEX blobs_by_local ON blobs(kind, local);",
];

/// Brings the schema up to date, each migration in its own transaction.
pub(super) fn apply(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
