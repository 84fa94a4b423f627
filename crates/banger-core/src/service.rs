//! [`Manager`]: one method per daemon operation. Transports (the HTTP server) only parse,
//! call one method and render its result; all decisions are made here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use banger_proto::{CreateVmRequest, Vm, VmName, VmSpec};
use tracing::info;

use crate::Error;
use crate::config::{Config, ResolvedDefaults};
use crate::layout::Layout;
use crate::model::{self, VmRecord};
use crate::store::Store;

/// Upper bounds that keep a typo from asking for an absurd VM.
const MAX_CPUS: u32 = 256;
const MAX_MEMORY_MIB: u64 = 4 << 20;
const MIN_MEMORY_MIB: u64 = 128;
const MIN_DISK_BYTES: u64 = 64 << 20;
const MAX_DISK_BYTES: u64 = 64 << 40;

/// The daemon's operations over one banger instance.
#[derive(Debug)]
pub struct Manager {
    layout: Layout,
    defaults: ResolvedDefaults,
    config: Config,
    store: Mutex<Store>,
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Manager {
    /// Creates the instance's directories, opens the state database and applies migrations.
    pub fn open(layout: Layout, config: Config) -> Result<Self, Error> {
        for dir in [layout.data_dir().to_path_buf(), layout.logs_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
        let defaults = config.resolved_defaults(&layout.config_file().display().to_string())?;
        let store = Store::open(&layout.state_db())?;
        Ok(Self {
            layout,
            defaults,
            config,
            store: Mutex::new(store),
            vm_locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store. A panic while holding the lock cannot leave SQLite half-written (every write
    /// is one transaction), so a poisoned lock is safe to take over.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock that serialises lifecycle operations on one VM; VMs do not wait for each other.
    pub fn vm_lock(&self, name: &VmName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// Records a new VM in state Created.
    pub async fn create_vm(&self, request: CreateVmRequest) -> Result<Vm, Error> {
        let name = VmName::parse(&request.name)?;
        let spec = self.resolve_spec(&request)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let record = VmRecord::new(name, spec);
        self.store().insert_vm(&record)?;
        info!(vm = %record.name, id = %record.id, "VM created");
        Ok(record.to_api())
    }

    fn resolve_spec(&self, request: &CreateVmRequest) -> Result<VmSpec, Error> {
        let cpus = request.cpus.unwrap_or(self.defaults.cpus);
        if !(1..=MAX_CPUS).contains(&cpus) {
            return Err(Error::InvalidRequest(format!(
                "cpus must be between 1 and {MAX_CPUS}, not {cpus}"
            )));
        }
        let memory_mib = request.memory_mib.unwrap_or(self.defaults.memory_mib);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(Error::InvalidRequest(format!(
                "memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, not {memory_mib} MiB"
            )));
        }
        let disk_size_bytes = request
            .disk_size_bytes
            .unwrap_or(self.defaults.disk_size_bytes);
        if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&disk_size_bytes) {
            return Err(Error::InvalidRequest(format!(
                "disk size must be between 64M and 64T, not {}",
                banger_proto::ByteSize(disk_size_bytes)
            )));
        }
        let image = request
            .image
            .clone()
            .unwrap_or_else(|| self.config.defaults.image.clone());
        if image.is_empty() || image.len() > 128 || image.contains('/') {
            return Err(Error::InvalidRequest(format!(
                "image name {image:?} is not valid"
            )));
        }
        Ok(VmSpec {
            cpus,
            memory_mib,
            disk_size_bytes,
            image,
        })
    }

    /// All VMs by name.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        Ok(self
            .store()
            .list_vms()?
            .iter()
            .map(VmRecord::to_api)
            .collect())
    }

    /// One VM.
    pub async fn get_vm(&self, name: &str) -> Result<Vm, Error> {
        let name = VmName::parse(name)?;
        Ok(self.store().get_vm(name.as_str())?.to_api())
    }

    /// Removes a VM that is not running, with its files.
    pub async fn remove_vm(&self, name: &str) -> Result<(), Error> {
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let record = self.store().get_vm(name.as_str())?;
        if !model::removable(record.state) {
            return Err(Error::InvalidState {
                name: name.to_string(),
                state: record.state,
                hint: "stop it first with `banger vm stop NAME`",
            });
        }
        self.store().delete_vm(name.as_str())?;
        for dir in [
            self.layout.vm_dir(&record.id),
            self.layout.vm_runtime_dir(&record.id),
        ] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("cannot remove {}", dir.display()))(e)),
            }
        }
        info!(vm = %name, id = %record.id, "VM removed");
        Ok(())
    }
}
