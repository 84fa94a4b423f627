//! Which backend serves a VM and how to reach its running VMM: the backend a record names,
//! its control socket, and the acceleration (decided once per daemon).

use std::path::{Path, PathBuf};

use super::Manager;
use crate::Error;
use crate::domain::VmmKind;
use crate::model::VmRecord;
use crate::vmm::{VmProcess, Vmm, accel, firecracker};

impl Manager {
    /// The backend a VM was created with.
    pub(super) fn vmm_for(&self, record: &VmRecord) -> Vmm {
        match record.spec.vmm {
            VmmKind::Firecracker => Vmm::Firecracker(self.firecracker.clone()),
            VmmKind::Qemu => Vmm::Qemu(self.qemu.clone()),
        }
    }
    /// The backend of `record` and its live process `pid` with its control socket.
    pub(super) fn control(&self, record: &VmRecord, pid: u32) -> (Vmm, VmProcess) {
        let vmm = self.vmm_for(record);
        let runtime_dir = self.layout.vm_runtime_dir(&record.id);
        let control = VmProcess {
            pid,
            control_socket: match vmm {
                Vmm::Firecracker(_) => firecracker::api_socket(&runtime_dir),
                Vmm::Qemu(_) => runtime_dir.join("qmp.sock"),
            },
            jail: record
                .runtime
                .as_ref()
                .and_then(|r| r.jail.as_ref())
                .map(PathBuf::from),
        };
        (vmm, control)
    }
    pub(super) async fn accel_choice(&self, kernel: &Path) -> Result<accel::AccelChoice, Error> {
        if let Some(choice) = &self.seams.accel {
            return Ok(choice.clone());
        }
        let scratch = self.layout.runtime_dir().to_path_buf();
        Ok(self
            .accel
            .get_or_init(|| async {
                accel::choose(self.config.qemu.accel, self.qemu.binary(), kernel, &scratch).await
            })
            .await
            .clone())
    }
}
