//! `vm pause` and `vm resume`: the VMM's vCPUs stop and go on; the guest keeps its memory.

use std::sync::Arc;

use banger_proto::{LifecycleResult, VmName, VmState};
use tracing::info;

use super::{Manager, not_running, result};
use crate::Error;
use crate::model::{VmRecord, has_process};
use crate::vmm::{VmBackend, VmProcess, process};

impl Manager {
    /// The VM called `name` with its live VMM process, for pause/resume/suspend; refused
    /// unless it runs (paused or not).
    pub(super) async fn live_vm(
        &self,
        name: &VmName,
    ) -> Result<(VmRecord, Arc<dyn VmBackend>, VmProcess), Error> {
        let record = self.observed_vm(name).await?;
        let pid = record
            .runtime
            .as_ref()
            .and_then(|r| r.pid)
            .filter(|pid| has_process(record.state) && process::is_alive(*pid, &record.id));
        let Some(pid) = pid else {
            return Err(not_running(name, record.state));
        };
        let (vmm, control) = self.control(&record, pid);
        Ok((record, vmm, control))
    }

    /// Pauses a running VM's vCPUs (QMP `stop`, Firecracker `PATCH /vm Paused`). The guest
    /// keeps its memory and devices; nothing runs in it until `resume`. A paused VM is left
    /// as it is (`changed: false`).
    pub async fn pause_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let (mut record, vmm, control) = self.live_vm(name).await?;
        if record.state == VmState::Paused {
            return Ok(result(record.to_api(), false));
        }
        if !vmm.capabilities().supports_pause {
            return Err(Error::Unsupported {
                message: format!("VM {name} runs on {}, which cannot pause", vmm.kind()),
                hint: "use `banger vm stop NAME`".into(),
            });
        }
        // The VMM first, then the record: a daemon dying in between is corrected at
        // reattach, which asks the VMM.
        vmm.pause(&control).await?;
        crate::fault::point("pause.after_vmm")?;
        self.transition(&mut record, VmState::Paused).await?;
        info!(vm = %name, "VM paused");
        Ok(result(record.to_api(), true))
    }

    /// Resumes a paused VM, or one its VMM paused on a host I/O error (the drive's request
    /// is retried). A running VM is left as it is (`changed: false`).
    pub async fn resume_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let (mut record, vmm, control) = self.live_vm(name).await?;
        if record.state == VmState::Running && !matches!(vmm.io_error(&control).await, Ok(Some(_)))
        {
            return Ok(result(record.to_api(), false));
        }
        vmm.resume(&control).await?;
        crate::fault::point("resume.after_vmm")?;
        if record.state != VmState::Running {
            self.transition(&mut record, VmState::Running).await?;
        }
        info!(vm = %name, "VM resumed");
        Ok(result(record.to_api(), true))
    }
}
