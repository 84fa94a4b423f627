//! `vm ls` and `vm show`: VMs as they are now (a VM whose VMM died shows as stopped), with
//! their network.

use banger_proto::{Vm, VmName};

use std::collections::HashMap;

use banger_proto::{SnapshotSummary, VmNetwork};
use tracing::warn;

use super::Manager;
use super::clone::cloned_from_in;
use super::ports::network_in;
use super::set::system_disk_size_of;
use super::snapshots::snapshot_summary_in;
use crate::Error;
use crate::layout::Layout;
use crate::model::{VmRecord, has_process};
use crate::store::Store;

/// What the API form of a VM shows beside its record, read from the store (and the disks'
/// headers) in one go. A VM whose rows cannot be read is still shown, without them.
struct Extra {
    network: Option<VmNetwork>,
    size: Option<u64>,
    snapshots: Option<SnapshotSummary>,
    cloned_from: Option<String>,
}

impl Extra {
    /// Reads them for `record`; `names`: every VM's name by id (a clone's source is named).
    /// Blocking.
    fn read(
        store: &mut Store,
        layout: &Layout,
        names: &HashMap<String, String>,
        record: &VmRecord,
    ) -> Self {
        let network = network_in(store, &record.id)
            .inspect_err(|e| warn!(vm = %record.name, "cannot read the VM's network: {e}"))
            .ok();
        let image = store.find_image(&record.spec.image).ok().flatten();
        Self {
            network,
            size: system_disk_size_of(layout, record, image.as_ref()),
            snapshots: snapshot_summary_in(store, layout, &record.id)
                .ok()
                .flatten(),
            cloned_from: cloned_from_in(store, names, &record.id).ok().flatten(),
        }
    }

    fn apply(self, vm: &mut Vm) {
        vm.network = self.network;
        vm.spec.system_disk_size_bytes = self.size;
        vm.snapshots = self.snapshots;
        vm.cloned_from = self.cloned_from;
    }
}

/// Every VM's name by id.
fn names_of(records: &[VmRecord]) -> HashMap<String, String> {
    records
        .iter()
        .map(|r| (r.id.clone(), r.name.to_string()))
        .collect()
}

impl Manager {
    /// All VMs by name. The store is read once for all of them (records and [`Extra`]), so a
    /// listing waits for the database once, not once per VM, while other operations write.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        let layout = self.layout.clone();
        let rows = self
            .db
            .run(move |store| {
                let records = store.list_vms()?;
                let names = names_of(&records);
                let rows = records
                    .into_iter()
                    .map(|record| {
                        let extra = Extra::read(store, &layout, &names, &record);
                        (record, extra)
                    })
                    .collect::<Vec<_>>();
                Ok::<_, crate::store::StoreError>(rows)
            })
            .await?;
        let mut vms = Vec::with_capacity(rows.len());
        for (record, extra) in rows {
            let observed = self.observe(record).await;
            let mut vm = observed.to_api();
            extra.apply(&mut vm);
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
        let (layout, read) = (self.layout.clone(), record.clone());
        let extra = self
            .db
            .run(move |store| {
                let names = names_of(&store.list_vms()?);
                Ok::<_, crate::store::StoreError>(Extra::read(store, &layout, &names, &read))
            })
            .await;
        match extra {
            Ok(extra) => extra.apply(&mut vm),
            Err(e) => {
                warn!(vm = %record.name, "cannot read the VM's network, disks and snapshots: {}", e.to_api().message)
            }
        }
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
