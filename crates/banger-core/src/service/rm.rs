//! `vm rm`: a VM that does not run goes with its jail, dm disk, tap, lease and files (its
//! named snapshots too; refused while a clone continues from one of them).

use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::domain::SystemDiskStrategy;
use crate::model;

impl Manager {
    /// Removes a VM that is not running, with its files.
    pub async fn remove_vm(&self, name: &str) -> Result<(), Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        // A VM recorded as running whose VMM died is stopped, and so removable.
        let record = self.observed_vm(name).await?;
        if !model::removable(record.state) {
            return Err(Error::InvalidState {
                name: name.to_string(),
                state: record.state,
                hint: "stop it first with `banger vm stop NAME`, or remove it with `banger vm rm --force NAME`",
            });
        }
        // Its snapshots go with it: not while a clone continues from one.
        self.check_no_clones(&record).await?;
        // A jail whose removal failed at stop still holds hard links to the VM's disks: try
        // again (idempotent; nothing to do without a jail).
        self.remove_jail(&record).await;
        if record.spec.system_disk == SystemDiskStrategy::DmSnapshot
            && let Err(e) = self.remove_dm_disk(&record.id).await
        {
            tracing::warn!(vm = %name, "device-mapper teardown incomplete: {e}");
        }
        let id = record.id.clone();
        let lease = self.db.run(move |s| s.lease_of(&id)).await?;
        if let Some(lease) = &lease {
            // The tap goes with the VM. When the helper cannot do it now, `banger network
            // down` removes every banger tap later.
            if let Err(e) = self
                .host_run(banger_proto::helper::HelperOp::DeleteTap {
                    name: lease.tap.clone(),
                })
                .await
            {
                warn!(vm = %name, tap = %lease.tap, "cannot remove the tap: {}", e.to_api().message);
            }
        }
        crate::fault::point("rm.after_teardown")?;
        // Deleting the VM deletes its lease (ON DELETE CASCADE).
        let doomed = name.to_string();
        self.db.run(move |s| s.delete_vm(&doomed)).await?;
        crate::fault::point("rm.after_record")?;
        let dirs = [
            self.layout.vm_dir(&record.id),
            self.layout.vm_runtime_dir(&record.id),
        ];
        tokio::task::spawn_blocking(move || {
            for dir in dirs {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("cannot remove {}", dir.display()))(e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Failed(format!("VM removal task failed: {e}")))??;
        info!(vm = %name, id = %record.id, "VM removed");
        self.refresh_ssh_config().await;
        Ok(())
    }
}
