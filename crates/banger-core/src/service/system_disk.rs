//! The device-mapper system disk's host side: where its privileged steps go (banger-helper or
//! the test seam), whether it can be made here, re-attaching it after a host reboot, tearing it
//! down, and the record of its loop devices in the VM directory.

use std::sync::Arc;

use super::Manager;
use crate::Error;
use crate::disk;
use crate::host::HostOps;
use crate::model::VmRecord;

impl Manager {
    /// Where the dm system disk's operations go: the Manager's helper, whatever the network
    /// mode (dm disks need it either way).
    pub(super) fn disk_host(&self) -> Arc<dyn HostOps> {
        self.helper.clone()
    }

    /// Whether dm snapshot system disks can be made here (device-mapper exists and
    /// banger-helper answers), or why not.
    pub(super) async fn dm_available(&self) -> Result<(), String> {
        if self.seams.host_ops.is_some() {
            return Ok(());
        }
        const NEEDS: &str = "device-mapper snapshots need banger-helper and /dev/mapper/control";
        if !std::path::Path::new("/dev/mapper/control").exists() {
            return Err(format!("{NEEDS}, which is missing"));
        }
        let host = self.disk_host();
        let op_id = crate::net::current_op_id();
        let hello = tokio::task::spawn_blocking(move || host.hello(&op_id))
            .await
            .map_err(|e| format!("helper task failed: {e}"))?;
        hello
            .map(|_| ())
            .map_err(|e| format!("{NEEDS}; banger-helper does not answer ({e})"))
    }

    /// The VM's dm system disk, attached again when the mapping is gone (host reboot): the
    /// copy-on-write store keeps the VM's writes.
    pub(super) async fn ensure_dm(
        &self,
        record: &VmRecord,
        image_digest: &str,
    ) -> Result<std::path::PathBuf, Error> {
        // The mapping recorded at create, also under a name from before dm names carried
        // the uid: one that exists is the VM's (never a second snapshot on the same store).
        if let Some(dm) = load_dm(&self.layout.vm_system_dm(&record.id)).filter(|dm| {
            banger_proto::helper::parse_dm_name(&dm.name).is_some()
                || banger_proto::helper::parse_legacy_dm_name(&dm.name).is_some()
        }) {
            let recorded = std::path::Path::new("/dev/mapper").join(&dm.name);
            if recorded.exists() {
                return Ok(recorded);
            }
        }
        let name = self
            .layout
            .vm_dm_name(nix::unistd::getuid().as_raw(), &record.id);
        let device = std::path::Path::new("/dev/mapper").join(&name);
        if device.exists() {
            return Ok(device);
        }
        let host = self.disk_host();
        let op_id = crate::net::current_op_id();
        let base = self.layout.image_rootfs(image_digest);
        let cow = self.layout.vm_system_cow(&record.id);
        let state = self.layout.vm_system_dm(&record.id);
        let dm = tokio::task::spawn_blocking(move || {
            disk::dm_snapshot_attach(host.as_ref(), &op_id, &name, &base, &cow)
        })
        .await
        .map_err(|e| Error::Failed(format!("dm task failed: {e}")))??;
        save_dm(&state, &dm)?;
        Ok(dm.device)
    }

    /// Tears down the VM's device-mapper system disk, if it has one (its loops recorded in
    /// the VM directory).
    pub(super) async fn remove_dm_disk(&self, vm_id: &str) -> Result<(), String> {
        let Some(dm) = load_dm(&self.layout.vm_system_dm(vm_id)) else {
            return Ok(());
        };
        let host = self.disk_host();
        let op_id = crate::net::current_op_id();
        tokio::task::spawn_blocking(move || disk::dm_snapshot_remove(host.as_ref(), &op_id, &dm))
            .await
            .map_err(|e| format!("dm task failed: {e}"))?
            .map_err(|e| e.to_string())
    }
}

pub(super) fn save_dm(path: &std::path::Path, dm: &disk::DmDisk) -> Result<(), Error> {
    let text = serde_json::to_string(dm).map_err(|e| Error::Failed(e.to_string()))?;
    std::fs::write(path, text).map_err(Error::io(format!("cannot write {}", path.display())))
}

/// The recorded dm system disk, if any.
pub(super) fn load_dm(path: &std::path::Path) -> Option<disk::DmDisk> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
