//! Rows of the kernel and image tables. The files live under the layout's content-addressed
//! directories; these rows name them.

use banger_proto::{Image, Kernel};
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

impl Store {
    /// Inserts or replaces the kernel called `kernel.name`.
    pub fn put_kernel(&self, kernel: &Kernel) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO kernels (name, digest, release, has_initrd, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET digest = ?2, release = ?3, has_initrd = ?4,
                 source = ?5, created_at = ?6",
            params![
                kernel.name,
                kernel.digest,
                kernel.release,
                kernel.has_initrd,
                kernel.source,
                kernel.created_at
            ],
        )?;
        Ok(())
    }

    pub fn find_kernel(&self, name: &str) -> Result<Option<Kernel>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, digest, release, has_initrd, source, created_at FROM kernels WHERE name = ?1",
                [name],
                kernel_row,
            )
            .optional()?)
    }

    pub fn list_kernels(&self) -> Result<Vec<Kernel>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, digest, release, has_initrd, source, created_at FROM kernels ORDER BY name",
        )?;
        let rows = stmt.query_map([], kernel_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a kernel row; images referring to it make this fail (foreign key).
    pub fn delete_kernel(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM kernels WHERE name = ?1", [name])?
            > 0)
    }

    /// Inserts or replaces the image called `image.name`.
    pub fn put_image(&self, image: &Image) -> Result<(), StoreError> {
        let exec_json = image
            .exec
            .as_ref()
            .and_then(|e| serde_json::to_string(e).ok());
        self.conn.execute(
            "INSERT INTO images (name, digest, kernel, size_bytes, source, created_at, work_seed, exec_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(name) DO UPDATE SET digest = ?2, kernel = ?3, size_bytes = ?4,
                 source = ?5, created_at = ?6, work_seed = ?7, exec_json = ?8",
            params![
                image.name,
                image.digest,
                image.kernel,
                image.size_bytes,
                image.source,
                image.created_at,
                image.work_seed,
                exec_json
            ],
        )?;
        Ok(())
    }

    pub fn find_image(&self, name: &str) -> Result<Option<Image>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, digest, kernel, size_bytes, source, created_at, work_seed, exec_json FROM images WHERE name = ?1",
                [name],
                image_row,
            )
            .optional()?)
    }

    pub fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, digest, kernel, size_bytes, source, created_at, work_seed, exec_json FROM images ORDER BY name",
        )?;
        let rows = stmt.query_map([], image_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM images WHERE name = ?1", [name])?
            > 0)
    }

    /// Names of images built on `kernel`.
    pub fn images_using_kernel(&self, kernel: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM images WHERE kernel = ?1 ORDER BY name")?;
        let rows = stmt.query_map([kernel], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Names of VMs made from `image`.
    pub fn vms_using_image(&self, image: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")?;
        let rows = stmt.query_map([image], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether any kernel row (`table = "kernels"`) or image row uses `digest`.
    pub fn digest_in_use(&self, table: AssetTable, digest: &str) -> Result<bool, StoreError> {
        let sql = match table {
            AssetTable::Kernels => "SELECT COUNT(*) FROM kernels WHERE digest = ?1",
            AssetTable::Images => "SELECT COUNT(*) FROM images WHERE digest = ?1",
            AssetTable::WorkSeeds => "SELECT COUNT(*) FROM images WHERE work_seed = ?1",
        };
        let count: i64 = self.conn.query_row(sql, [digest], |row| row.get(0))?;
        Ok(count > 0)
    }
}

/// Which content-addressed table a digest belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetTable {
    Kernels,
    Images,
    /// The work-seeds images name.
    WorkSeeds,
}

fn kernel_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Kernel> {
    Ok(Kernel {
        name: row.get(0)?,
        digest: row.get(1)?,
        release: row.get(2)?,
        has_initrd: row.get(3)?,
        source: row.get(4)?,
        created_at: row.get(5)?,
        warnings: Vec::new(),
        capabilities: None,
    })
}

fn image_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        name: row.get(0)?,
        digest: row.get(1)?,
        kernel: row.get(2)?,
        size_bytes: row.get(3)?,
        source: row.get(4)?,
        created_at: row.get(5)?,
        work_seed: row.get(6)?,
        // Written by put_image from the typed value; unreadable JSON reads as none.
        exec: row
            .get::<_, Option<String>>(7)?
            .and_then(|j| serde_json::from_str(&j).ok()),
    })
}
