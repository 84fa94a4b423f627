//! Rows of the blob table: which registry blob (compressed layer or config, by its OCI
//! digest) became which local store directory. Written only after the files are in place.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

/// One registry blob known locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    /// `sha256:<hex>` of the compressed bytes.
    pub digest: String,
    /// `rootfs`, `kernel`, `initrd` or `config`.
    pub kind: String,
    /// The local store directory's digest (for `config`: the config JSON).
    pub local: String,
    /// Compressed size.
    pub size: u64,
    pub uncompressed: u64,
}

const COLUMNS: &str = "digest, kind, local, size, uncompressed";

fn blob_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<BlobRecord> {
    Ok(BlobRecord {
        digest: row.get(0)?,
        kind: row.get(1)?,
        local: row.get(2)?,
        size: row.get(3)?,
        uncompressed: row.get(4)?,
    })
}

impl Store {
    /// Inserts or replaces the row of `blob.digest`.
    pub fn put_blob(&self, blob: &BlobRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO blobs (digest, kind, local, size, uncompressed, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(digest) DO UPDATE SET kind = ?2, local = ?3, size = ?4, uncompressed = ?5",
            params![
                blob.digest,
                blob.kind,
                blob.local,
                blob.size,
                blob.uncompressed,
                crate::now_rfc3339()
            ],
        )?;
        Ok(())
    }

    /// The blob with `digest`, if known.
    pub fn blob(&self, digest: &str) -> Result<Option<BlobRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM blobs WHERE digest = ?1"),
                [digest],
                blob_row,
            )
            .optional()?)
    }

    /// The newest blob made from the `kind` file of local store directory `local`.
    pub fn blob_for(&self, kind: &str, local: &str) -> Result<Option<BlobRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM blobs WHERE kind = ?1 AND local = ?2
                     ORDER BY created_at DESC LIMIT 1"
                ),
                [kind, local],
                blob_row,
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let blob = BlobRecord {
            digest: "sha256:aa".into(),
            kind: "rootfs".into(),
            local: "11".into(),
            size: 5,
            uncompressed: 50,
        };
        assert_eq!(store.blob("sha256:aa").unwrap(), None);
        store.put_blob(&blob).unwrap();
        assert_eq!(store.blob("sha256:aa").unwrap(), Some(blob.clone()));
        assert_eq!(store.blob_for("rootfs", "11").unwrap(), Some(blob));
        assert_eq!(store.blob_for("kernel", "11").unwrap(), None);
    }
}
