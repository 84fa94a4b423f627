//! `vm ls` and `vm show`: VMs as they are now (a VM whose VMM died shows as stopped), with
//! their network.

use banger_proto::{Vm, VmName};

use super::Manager;
use super::clone::cloned_from_in;
use super::ports::network_in;
use super::set::system_disk_size_of;
use super::snapshots::snapshot_summary_in;

/// What a listing reads beside a VM's record.
struct Extra {
    network: Option<banger_proto::VmNetwork>,
    size: Option<u64>,
    snapshots: Option<banger_proto::SnapshotSummary>,
    cloned_from: Option<String>,
}
use crate::Error;
use crate::model::{VmRecord, has_process};

impl Manager {
    /// All VMs by name. The store is read once for all of them (records, networks, images),
    /// so a listing waits for the database once, not once per VM, while other operations write.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        let layout = self.layout.clone();
        let rows = self
            .db
            .run(move |store| {
                let records = store.list_vms()?;
                let names = records
                    .iter()
                    .map(|r| (r.id.clone(), r.name.to_string()))
                    .collect();
                let mut rows = Vec::with_capacity(records.len());
                for record in records {
                    // A VM whose rows cannot be read is still listed, without them.
                    let image = store.find_image(&record.spec.image).ok().flatten();
                    let extra = Extra {
                        network: network_in(store, &record.id).ok(),
                        size: system_disk_size_of(&layout, &record, image.as_ref()),
                        snapshots: snapshot_summary_in(store, &layout, &record.id)
                            .ok()
                            .flatten(),
                        cloned_from: cloned_from_in(store, &names, &record.id).ok().flatten(),
                    };
                    rows.push((record, extra));
                }
                Ok::<_, crate::store::StoreError>(rows)
            })
            .await?;
        let mut vms = Vec::with_capacity(rows.len());
        for (record, extra) in rows {
            let observed = self.observe(record).await;
            let mut vm = observed.to_api();
            vm.network = extra.network;
            vm.spec.system_disk_size_bytes = extra.size;
            vm.snapshots = extra.snapshots;
            vm.cloned_from = extra.cloned_from;
            self.fill_runtime(&observed, &mut vm);
            vms.push(vm);
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
        self.fill_runtime(record, &mut vm);
        vm
    }

    /// What the API adds to a VM's runtime that the record does not hold.
    fn fill_runtime(&self, record: &VmRecord, vm: &mut Vm) {
        if let Some(runtime) = vm.runtime.as_mut() {
            runtime.jailer = self.backend_of(record.spec.vmm).jailed();
        }
    }
}
