//! What a daemon does on start, before it serves: it removes what a daemon that died left
//! half-made (scratch of a build or pull, partial copies, and the directories of VMs, images
//! and kernels that no record names: made before their record was written, or left after it
//! was deleted), finishes the named-snapshot steps it left half done, then reconciles the VMs' state with their processes ([`Manager::reconcile`]).

use std::path::Path;

use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::layout::Layout;

impl Manager {
    /// The daemon's start-up recovery: stale scratch, orphaned files, then the VMs.
    pub async fn recover(&self) -> Result<(), Error> {
        self.remove_stale_scratch().await;
        self.remove_orphans().await?;
        self.recover_snapshots().await?;
        self.reconcile().await
    }

    /// Removes `vms/<id>` and `run/vms/<id>` of VMs without a record, `images/<digest>` and
    /// `kernels/<digest>` no row names, and `*.partial` copies in the stores. Only names of
    /// banger's own shape (hex ids and digests) are touched.
    async fn remove_orphans(&self) -> Result<(), Error> {
        let (vms, images, kernels) = self
            .db
            .run(|store| {
                let vms: Vec<String> = store.list_vms()?.into_iter().map(|v| v.id).collect();
                let images: Vec<String> =
                    store.list_images()?.into_iter().map(|i| i.digest).collect();
                let kernels: Vec<String> = store
                    .list_kernels()?
                    .into_iter()
                    .map(|k| k.digest)
                    .collect();
                Ok::<_, crate::store::StoreError>((vms, images, kernels))
            })
            .await?;
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || remove_unnamed(&layout, &vms, &images, &kernels))
            .await
            .map_err(|e| Error::Failed(format!("orphan removal task failed: {e}")))
    }
}

/// Removes the directories under `layout` that no VM, image or kernel names.
fn remove_unnamed(layout: &Layout, vms: &[String], images: &[String], kernels: &[String]) {
    let runtime_vms = layout.vm_runtime_dir("x");
    let runtime_vms = runtime_vms.parent().unwrap_or(layout.runtime_dir());
    let vm_dirs = layout.vm_dir("x");
    let vm_dirs = vm_dirs.parent().unwrap_or(layout.data_dir());
    let (images_dir, kernels_dir) = (layout.images_dir(), layout.kernels_dir());
    for (parent, known, len) in [
        (vm_dirs, vms, 32),
        (runtime_vms, vms, 32),
        (images_dir.as_path(), images, 64),
        (kernels_dir.as_path(), kernels, 64),
    ] {
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.len() == len && name.bytes().all(|b| b.is_ascii_hexdigit());
            if !ours {
                continue;
            }
            if known.contains(&name) {
                remove_partials(&entry.path());
            } else {
                remove(&entry.path(), "no record names it");
            }
        }
    }
}

/// Removes `path` (a directory or a file), logging why.
fn remove(path: &Path, why: &str) {
    let removed = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
    match removed {
        Ok(()) => info!(path = %path.display(), "removed what a dead daemon left: {why}"),
        Err(e) => warn!(path = %path.display(), "cannot remove what a dead daemon left: {e}"),
    }
}

/// Removes the `*.partial` copies directly in `dir` (a copy cut short before its rename).
pub(super) fn remove_partials(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "partial") {
            remove(&path, "a copy cut short");
        }
    }
}
