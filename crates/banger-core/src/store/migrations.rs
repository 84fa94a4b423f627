//! Schema migrations, applied in order and recorded in `PRAGMA user_version`. Append only:
//! a released migration is never edited.

use rusqlite::{Connection, Transaction};

use super::StoreError;

/// One step of the schema.
enum Migration {
    /// SQL applied as one batch.
    Sql(&'static str),
    /// A check (or conversion) of stored rows that SQL cannot express.
    Rows(fn(&Transaction<'_>) -> Result<(), StoreError>),
}

use Migration::{Rows, Sql};

/// Each entry moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[Migration] = &[
    // 1: VM records.
    Sql("CREATE TABLE vms (
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
    ) STRICT;"),
    // 2: kernels and images, content-addressed on disk by digest.
    Sql("CREATE TABLE kernels (
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
    ) STRICT;"),
    // 3: the workspace prepared in each VM and its manifest (what the guest holds).
    Sql("CREATE TABLE workspaces (
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
    ) STRICT, WITHOUT ROWID;"),
    // 4: the VM's backend (and why) and how its system disk was made.
    Sql(
        "ALTER TABLE vms ADD COLUMN vmm TEXT NOT NULL DEFAULT 'qemu';
    ALTER TABLE vms ADD COLUMN vmm_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN system_disk TEXT NOT NULL DEFAULT 'qcow2';",
    ),
    // 5: bridge networking: one lease (address + tap) per VM in bridge mode; a VM without a
    // lease uses user-mode networking. Deleted with the VM.
    Sql("CREATE TABLE leases (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        ip          TEXT NOT NULL UNIQUE,
        tap         TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL
    ) STRICT;"),
    // 6: the typed domain: every stored backend, system disk strategy and runtime document
    // must parse into banger's enums (their spellings did not change, so nothing converts);
    // a row that does not is named, and the database stays at 5 until it is fixed.
    Rows(check_typed_rows),
    // 7: user-mode VMs without outbound network (`--net isolated`; no row: outbound allowed),
    // and every VM's published ports. Deleted with the VM.
    Sql("CREATE TABLE vm_isolated (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE
    ) STRICT;
    CREATE TABLE vm_ports (
        vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        proto       TEXT NOT NULL CHECK (proto IN ('tcp', 'udp')),
        host_ip     TEXT NOT NULL,
        host_port   INTEGER NOT NULL CHECK (host_port BETWEEN 1 AND 65535),
        guest_port  INTEGER NOT NULL CHECK (guest_port BETWEEN 1 AND 65535),
        PRIMARY KEY (vm_id, proto, host_ip, host_port)
    ) STRICT;"),
    // 8: registry blobs: which compressed layer (by its OCI digest) became which local store
    // directory (`kind` rootfs → images/<local>, kernel/initrd → kernels/<local>), so a pull of
    // stored content fetches nothing and a push of it compresses nothing. For `config`, `local`
    // is the config JSON itself.
    Sql("CREATE TABLE blobs (
        digest        TEXT PRIMARY KEY NOT NULL,
        kind          TEXT NOT NULL,
        local         TEXT NOT NULL,
        size          INTEGER NOT NULL,
        uncompressed  INTEGER NOT NULL,
        created_at    TEXT NOT NULL
    ) STRICT;
    CREATE INDEX blobs_by_local ON blobs(kind, local);"),
    // 9: how each VM's VMM last ended (`last_stop`, JSON `LastStop`: clean or unclean), what
    // its last start checked (`start_fsck`, JSON `StartFsck`), and whether its work disk's
    // filesystem still has to grow into a grown file (`vm set --disk`).
    Sql("ALTER TABLE vms ADD COLUMN last_stop TEXT;
    ALTER TABLE vms ADD COLUMN start_fsck TEXT;
    ALTER TABLE vms ADD COLUMN grow_work_fs INTEGER NOT NULL DEFAULT 0 CHECK (grow_work_fs IN (0, 1));"),
    // 10: an image's work-seed (the digest of a tree under work-seeds/), when it has one, and
    // its `vm exec` defaults (JSON `ExecDefaults`; from a container image's config).
    Sql("ALTER TABLE images ADD COLUMN work_seed TEXT;
         ALTER TABLE images ADD COLUMN exec_json TEXT;"),
    // 11: named snapshots of VMs' disks (`vm snapshot`; files in vms/<vm id>/snapshots/<id>/).
    // `work_format` is the format of the work file it froze; `parent` the snapshot the VM
    // continued from when it was taken; `pending` a create or remove whose file steps may be
    // half done (finished at daemon start). `vm_disk_heads`: the snapshot a VM's disks
    // continue from now (no row: from none), and `restoring` a restore whose rename of the
    // new top overlays may be half done. `vm_clones`: the snapshot (of another VM) a clone's
    // disks continue from at its creation; the snapshot cannot go while the clone exists;
    // `fresh`: its SSH host key is still its source's (replaced at its first start).
    Sql("CREATE TABLE vm_snapshots (
        id          TEXT PRIMARY KEY NOT NULL,
        vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        work_format TEXT NOT NULL CHECK (work_format IN ('raw', 'qcow2')),
        parent      TEXT REFERENCES vm_snapshots(id) ON DELETE SET NULL,
        created_at  TEXT NOT NULL,
        pending     TEXT CHECK (pending IN ('create', 'remove')),
        UNIQUE (vm_id, name)
    ) STRICT;
    CREATE TABLE vm_disk_heads (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        snapshot_id TEXT NOT NULL REFERENCES vm_snapshots(id) ON DELETE CASCADE,
        restoring   INTEGER NOT NULL DEFAULT 0 CHECK (restoring IN (0, 1))
    ) STRICT;
    CREATE TABLE vm_clones (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        snapshot_id TEXT NOT NULL REFERENCES vm_snapshots(id) ON DELETE RESTRICT,
        fresh       INTEGER NOT NULL DEFAULT 1 CHECK (fresh IN (0, 1))
    ) STRICT;"),
    // 12: a named snapshot asked to hold the VM's memory too (`--memory`), and the state the
    // VM was in then (`running`, `paused`): a daemon that died during it resumes a VM it had
    // paused. It holds the memory once its sealed manifest is in its directory.
    Sql("ALTER TABLE vm_snapshots ADD COLUMN memory_of TEXT
         CHECK (memory_of IN ('running', 'paused'));"),
];

/// Reads every VM row through the typed record, so an unknown value fails here, naming it.
fn check_typed_rows(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(&format!("SELECT {} FROM vms", super::VM_COLUMNS_V8))?;
    let rows = stmt.query_map([], super::raw_vm)?;
    for row in rows {
        row?.into_record()?;
    }
    Ok(())
}

/// Brings the schema up to date, each migration in its own transaction.
pub(super) fn apply(conn: &mut Connection) -> Result<(), StoreError> {
    apply_up_to(conn, MIGRATIONS.len())
}

/// Applies the migrations up to schema version `target`.
pub(super) fn apply_up_to(conn: &mut Connection, target: usize) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (index, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(found as usize)
    {
        let tx = conn.transaction()?;
        match migration {
            Sql(sql) => tx.execute_batch(sql)?,
            Rows(check) => check(&tx)?,
        }
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
