//! `vm ls` and `vm show`: VMs as they are now (a VM whose VMM died shows as stopped), with
//! their network.

use banger_proto::{Vm, VmName};

use super::Manager;
use crate::Error;
use crate::model::{VmRecord, has_process};

impl Manager {
    /// All VMs by name.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        let records = self.db.list_vms().await?;
        let mut vms = Vec::with_capacity(records.len());
        for record in records {
            let record = self.observe(record).await;
            vms.push(self.vm_api(&record).await);
        }
        Ok(vms)
    }

    /// One VM, with the reason its VMM paused it on a host I/O error, if it did.
    pub async fn get_vm(&self, name: &str) -> Result<Vm, Error> {
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name).await?;
        let mut vm = self.vm_api(&record).await;
        let pid = record.runtime.as_ref().and_then(|r| r.pid);
        if let (Some(pid), Some(runtime)) =
            (pid.filter(|_| has_process(record.state)), &mut vm.runtime)
        {
            let (vmm, control) = self.control(&record, pid);
            runtime.io_error = vmm.io_error(&control).await.ok().flatten();
        }
        Ok(vm)
    }

    /// The API form of a VM, with its network (lease) looked up.
    pub(super) async fn vm_api(&self, record: &VmRecord) -> Vm {
        let mut vm = record.to_api();
        vm.network = self.vm_network(record).await;
        vm.spec.system_disk_size_bytes = self.system_disk_size(record).await;
        vm.snapshots = self.snapshot_summary(record).await;
        vm.cloned_from = self.cloned_from(record).await;
        if let Some(runtime) = vm.runtime.as_mut() {
            runtime.jailer = self.backend_of(record.spec.vmm).jailed();
        }
        vm
    }
}
