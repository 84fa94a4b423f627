//! [`Manager`]: one method per daemon operation. Transports (the HTTP server) only parse,
//! call one method and render its result; all decisions are made here. VM records live here;
//! `images` holds the image/kernel store operations and `lifecycle` start/stop/exec.

mod doctor;
mod images;
mod lifecycle;
mod network;
mod registry;
mod workspace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use banger_proto::{CreateVmRequest, Vm, VmName, VmSpec};
use tracing::{info, warn};

use crate::Error;
use crate::config::{Config, ResolvedDefaults};
use crate::disk;
use crate::disk::SystemDiskStrategy;
use crate::guest::ssh;
use crate::host::{HelperClient, HostOps};
use crate::layout::Layout;
use crate::model::{self, VmRecord};
use crate::store::Store;
use crate::store::StoreError;
use crate::vmm::accel::{Accel, AccelChoice};
use crate::vmm::firecracker::{Firecracker, Jailer};
use crate::vmm::qemu::Qemu;
use crate::vmm::select::{self as vmm_select, Facts, Selection, VmmKind};
use crate::vmm::{Vmm, select};

/// Upper bounds that keep a typo from asking for an absurd VM.
const MAX_CPUS: u32 = 256;
const MAX_MEMORY_MIB: u64 = 4 << 20;
const MIN_MEMORY_MIB: u64 = 128;
const MIN_DISK_BYTES: u64 = 64 << 20;
const MAX_DISK_BYTES: u64 = 64 << 40;

/// Host facts a test can impose instead of the Manager discovering them: what a fake VMM
/// (banger-fc-fake) cannot provide. Production code never sets these.
#[derive(Debug, Clone, Default)]
pub struct Seams {
    /// A tap device for Firecracker VMs (stands in for banger-helper's tap pool).
    pub tap: Option<String>,
    /// The acceleration to assume instead of probing KVM.
    pub accel: Option<AccelChoice>,
    /// Do not wait for the guest's SSH server after launch (no guest runs in a fake).
    pub skip_readiness: bool,
    /// Where the dm system disk's privileged operations go (a recording fake), instead of
    /// banger-helper; device-mapper is then taken as available.
    pub host_ops: Option<Arc<dyn HostOps>>,
}

/// The daemon's operations over one banger instance.
#[derive(Debug)]
pub struct Manager {
    layout: Layout,
    defaults: ResolvedDefaults,
    config: Config,
    store: Mutex<Store>,
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    qemu: Qemu,
    firecracker: Firecracker,
    /// KVM-or-TCG is decided once per daemon (a probe boot may be needed).
    accel: tokio::sync::OnceCell<AccelChoice>,
    /// Test-only overrides of discovered host facts (see [`Seams`]).
    seams: Seams,
    /// Serialises image and kernel builds and imports.
    asset_lock: tokio::sync::Mutex<()>,
    /// Serialises the first generation of banger's client key.
    key_lock: tokio::sync::Mutex<()>,
    /// Counters of the workspace prepares running now, by VM name.
    prepares: Mutex<HashMap<String, Arc<crate::workspace::transfer::Progress>>>,
    /// Counters of the registry pushes and pulls running now, by transfer id.
    transfers: Mutex<HashMap<String, Arc<crate::image::registry::Progress>>>,
    /// Privileged actions (the root helper); `None` when `network.mode = "user"`.
    host: Option<Arc<dyn HostOps>>,
    helper_socket: std::path::PathBuf,
    /// The helper's settings once it answered.
    net_info: Mutex<Option<banger_proto::helper::HelperInfo>>,
    /// Serialises network up/down.
    net_lock: tokio::sync::Mutex<()>,
    /// The `NAME.vm` DNS server, and where it listens.
    dns_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    dns_addr: Mutex<Option<String>>,
}

impl Manager {
    /// Creates the instance's directories, opens the state database and applies migrations.
    pub fn open(layout: Layout, config: Config) -> Result<Self, Error> {
        let helper_socket = if config.network.helper_socket.is_empty() {
            Layout::default_helper_socket(nix::unistd::getuid().as_raw())
        } else {
            config.network.helper_socket.clone().into()
        };
        let host: Option<Arc<dyn HostOps>> = (config.network.mode != "user")
            .then(|| Arc::new(HelperClient::new(helper_socket.clone())) as Arc<dyn HostOps>);
        Self::with_host(layout, config, host, helper_socket)
    }

    /// Like [`Manager::open`] with an explicit [`HostOps`] (tests use a recording fake).
    pub fn with_host(
        layout: Layout,
        config: Config,
        host: Option<Arc<dyn HostOps>>,
        helper_socket: std::path::PathBuf,
    ) -> Result<Self, Error> {
        for dir in [layout.data_dir().to_path_buf(), layout.logs_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
        let defaults = config.resolved_defaults(&layout.config_file().display().to_string())?;
        let store = Store::open(&layout.state_db())?;
        let qemu = Qemu::new(config.qemu.binary.clone().into()).with_tcg_threads(
            config
                .qemu
                .tcg_threads()
                .unwrap_or(crate::vmm::qemu::TcgThreads::Auto),
        );
        let mut firecracker = Firecracker::new(config.firecracker.binary.clone().into());
        if !config.firecracker.jailer.is_empty() {
            // The jailer must start as root: the helper runs it, whatever the network mode.
            let host = host.clone().unwrap_or_else(|| {
                Arc::new(HelperClient::new(helper_socket.clone())) as Arc<dyn HostOps>
            });
            firecracker = firecracker.with_jailer(Jailer {
                binary: config.firecracker.jailer.clone().into(),
                host,
            });
        }
        Ok(Self {
            layout,
            defaults,
            config,
            store: Mutex::new(store),
            vm_locks: Mutex::new(HashMap::new()),
            qemu,
            firecracker,
            accel: tokio::sync::OnceCell::new(),
            seams: Seams::default(),
            asset_lock: tokio::sync::Mutex::new(()),
            key_lock: tokio::sync::Mutex::new(()),
            prepares: Mutex::new(HashMap::new()),
            transfers: Mutex::new(HashMap::new()),
            host,
            helper_socket,
            net_info: Mutex::new(None),
            net_lock: tokio::sync::Mutex::new(()),
            dns_task: Mutex::new(None),
            dns_addr: Mutex::new(None),
        })
    }

    /// Replaces discovered host facts with `seams` (tests against a fake VMM).
    pub fn with_seams(mut self, seams: Seams) -> Self {
        self.seams = seams;
        self
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

    /// Creates a VM in state Created: its record, system overlay and work disk (with the
    /// VM's SSH host key and banger's client key seeded in). Leaves nothing behind on error.
    pub async fn create_vm(&self, request: CreateVmRequest) -> Result<Vm, Error> {
        let name = VmName::parse(&request.name)?;
        // An image given as a registry reference is pulled first (per `--pull`).
        let request = self.autopull(request).await?;
        let spec = self.resolve_spec(&request)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        if self.store().find_vm(name.as_str())?.is_some() {
            return Err(StoreError::VmExists(name.to_string()).into());
        }
        let image = self.find_image(&spec.image)?;
        // Decided before anything is written: a backend that cannot work changes nothing.
        let requested = request
            .vmm
            .clone()
            .unwrap_or_else(|| self.config.defaults.vmm.clone());
        // Firecracker has no user-mode networking: it needs the bridge (a lease and its tap).
        let pool = self.choose_network(request.network.as_deref()).await?;
        let selection = self.select_vmm(&requested, &image, pool.is_some()).await?;
        if selection.kind == VmmKind::Firecracker {
            // Asked for a jailer that is not there: refused before anything is written.
            self.firecracker.jailer_path()?;
        }
        let (strategy, disk_reason) = self.system_disk_strategy(selection.kind).await?;
        if selection.kind == VmmKind::Firecracker
            && strategy == SystemDiskStrategy::DmSnapshot
            && !self.config.firecracker.jailer.is_empty()
        {
            return Err(Error::HostSetup {
                message: "a device-mapper system disk cannot be placed in the jailer's chroot"
                    .into(),
                hint: "set defaults.system_disk = \"reflink\" or \"copy\", or remove firecracker.jailer".into(),
            });
        }
        let mut spec = spec;
        spec.vmm = selection.kind.as_str().into();
        spec.vmm_reason = selection.reason;
        spec.system_disk = strategy.as_str().into();
        info!(vm = %name, vmm = %spec.vmm, reason = %spec.vmm_reason, system_disk = %spec.system_disk, disk_reason = %disk_reason, "backend chosen");
        let record = VmRecord::new(name, spec);
        let vm_dir = self.layout.vm_dir(&record.id);
        let made = async {
            self.make_vm_disks(&record, &image.digest).await?;
            Ok::<_, Error>(self.store().insert_vm_with_lease(&record, pool)?)
        }
        .await;
        let lease = match made {
            Ok(lease) => lease,
            Err(err) => {
                // A dm disk made before the failure (e.g. the insert lost a race for the
                // name) lives in the kernel, not in the directory: tear it down first.
                if let Err(e) = self.remove_dm_disk(&record.id).await {
                    tracing::warn!(vm = %record.name, "device-mapper teardown incomplete after a failed create: {e}");
                }
                let _ = std::fs::remove_dir_all(&vm_dir);
                return Err(err);
            }
        };
        info!(vm = %record.name, id = %record.id, image = %record.spec.image, ip = ?lease.as_ref().map(|l| l.ip), tap = ?lease.as_ref().map(|l| &l.tap), "VM created");
        self.refresh_ssh_config();
        Ok(self.vm_api(&record))
    }

    /// The VM's directory with its disks and pinned host key.
    async fn make_vm_disks(&self, record: &VmRecord, image_digest: &str) -> Result<(), Error> {
        let id = &record.id;
        let vm_dir = self.layout.vm_dir(id);
        std::fs::create_dir_all(&vm_dir)
            .map_err(Error::io(format!("cannot create {}", vm_dir.display())))?;
        let client_public = self.client_public_key().await?;
        // The seed holds the guest's private host key only until mkfs copied it in.
        let seed = vm_dir.join("seed");
        let ssh_dir = seed.join(".ssh");
        let banger_dir = seed.join(".banger");
        for dir in [&ssh_dir, &banger_dir, &seed.join("repo")] {
            std::fs::create_dir_all(dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
        set_mode(&ssh_dir, 0o700)?;
        set_mode(&banger_dir, 0o700)?;
        let authorized = ssh_dir.join("authorized_keys");
        std::fs::write(&authorized, format!("{client_public}\n"))
            .map_err(Error::io(format!("cannot write {}", authorized.display())))?;
        set_mode(&authorized, 0o600)?;
        let host_public = ssh::ensure_key(
            &banger_dir.join("ssh_host_ed25519_key"),
            &format!("{}.vm", record.name),
        )
        .await?;
        let known_hosts = self.layout.vm_known_hosts(id);
        std::fs::write(
            &known_hosts,
            format!("{} {host_public}\n", host_key_alias(&record.name)),
        )
        .map_err(Error::io(format!("cannot write {}", known_hosts.display())))?;
        let made = disk::create_work_disk(
            &self.layout.vm_work_disk(id),
            record.spec.disk_size_bytes,
            &seed,
        )
        .await;
        let _ = std::fs::remove_dir_all(&seed);
        made?;
        let base = self.layout.image_rootfs(image_digest);
        let strategy = SystemDiskStrategy::from_wire(&record.spec.system_disk)
            .unwrap_or(SystemDiskStrategy::Qcow2);
        let raw = self.layout.vm_system_raw(id);
        let io = |what: &'static str| {
            let context = format!("cannot {what} {} to {}", base.display(), raw.display());
            move |source| disk::DiskError::Io { context, source }
        };
        match strategy {
            SystemDiskStrategy::Qcow2 => {
                disk::create_system_overlay(&base, &self.layout.vm_system_disk(id)).await?
            }
            SystemDiskStrategy::Reflink => {
                let (b, r) = (base.clone(), raw.clone());
                tokio::task::spawn_blocking(move || disk::reflink(&b, &r))
                    .await
                    .map_err(|e| Error::Failed(format!("reflink task failed: {e}")))?
                    .map_err(io("reflink"))?
            }
            SystemDiskStrategy::Copy => {
                let (b, r) = (base.clone(), raw.clone());
                let vm = record.name.to_string();
                tokio::task::spawn_blocking(move || {
                    let mut shown = 0;
                    disk::sparse_copy(&b, &r, |done, total| {
                        let percent = done * 100 / total.max(1);
                        if percent >= shown + 10 {
                            shown = percent;
                            info!(vm = %vm, percent, "copying the system disk");
                        }
                    })
                })
                .await
                .map_err(|e| Error::Failed(format!("copy task failed: {e}")))?
                .map_err(io("copy"))?
            }
            SystemDiskStrategy::DmSnapshot => {
                let host = self.disk_host();
                let op_id = crate::net::current_op_id();
                let name = self.layout.vm_dm_name(id);
                let cow = self.layout.vm_system_cow(id);
                let state = self.layout.vm_system_dm(id);
                let cow_bytes = std::fs::metadata(&base).map(|m| m.len()).unwrap_or(0);
                tokio::task::spawn_blocking(move || {
                    let dm = disk::dm_snapshot_create(
                        host.as_ref(),
                        &op_id,
                        &name,
                        &base,
                        &cow,
                        cow_bytes,
                    )?;
                    save_dm(&state, &dm).inspect_err(|_| {
                        let _ = disk::dm_snapshot_remove(host.as_ref(), &op_id, &dm);
                    })
                })
                .await
                .map_err(|e| Error::Failed(format!("dm task failed: {e}")))??;
            }
        }
        Ok(())
    }

    /// Where the dm system disk's operations go: the test seam's fake, else banger-helper
    /// (the network's client, or one of its own when networking is user-mode: dm disks need
    /// the helper whatever the network mode).
    pub(super) fn disk_host(&self) -> Arc<dyn HostOps> {
        self.seams
            .host_ops
            .clone()
            .or_else(|| self.host.clone())
            .unwrap_or_else(|| Arc::new(HelperClient::new(self.helper_socket.clone())))
    }

    /// Whether dm snapshot system disks can be made here (device-mapper exists and
    /// banger-helper answers), or why not.
    async fn dm_available(&self) -> Result<(), String> {
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

    /// The backend for a new VM (see [`vmm_select`]). Firecracker's facts are gathered only
    /// when they can matter; KVM is probed last (it may boot a probe kernel).
    async fn select_vmm(
        &self,
        requested: &str,
        image: &banger_proto::Image,
        bridge: bool,
    ) -> Result<Selection, Error> {
        let mut facts = Facts {
            firecracker: Err("not checked".into()),
            tap: Err("not checked".into()),
            kvm: Err("not checked".into()),
        };
        if requested != "qemu" {
            facts.firecracker = self
                .firecracker
                .version()
                .await
                .map(|(a, b, c)| format!("firecracker {a}.{b}.{c}"))
                .map_err(|e| e.to_string());
            facts.tap = if bridge || self.seams.tap.is_some() {
                Ok(())
            } else {
                Err(
                    "this VM gets user-mode networking (no root helper answers, or --network user)"
                        .into(),
                )
            };
            if facts.firecracker.is_ok() && facts.tap.is_ok() {
                let kernel = self.find_kernel(&image.kernel)?;
                let path = self.layout.kernel_dir(&kernel.digest).join("vmlinux");
                let choice = self.accel_choice(&path).await?;
                facts.kvm = match choice.accel {
                    Accel::Kvm => Ok(()),
                    Accel::Tcg => Err(choice.reason),
                };
            }
        }
        vmm_select::select(requested, &facts).map_err(|e| Error::HostSetup {
            message: e.message,
            hint: e.hint,
        })
    }

    /// The system disk strategy for a new VM of `kind`, and why.
    async fn system_disk_strategy(
        &self,
        kind: VmmKind,
    ) -> Result<(SystemDiskStrategy, String), Error> {
        let configured = self.config.defaults.system_disk.as_str();
        match (kind, configured) {
            (VmmKind::Qemu, "auto") => Ok((SystemDiskStrategy::Qcow2, "qcow2 overlay (QEMU)".into())),
            (_, "auto") => Ok(disk::choose_raw_strategy(
                &self.layout.images_dir(),
                if self.config.firecracker.jailer.is_empty() {
                    self.dm_available().await
                } else {
                    Err("the jailer's chroot takes regular files only".into())
                },
            )),
            (_, "dm") => match self.dm_available().await {
                Ok(()) => Ok((SystemDiskStrategy::DmSnapshot, "defaults.system_disk = \"dm\"".into())),
                Err(why) => Err(Error::HostSetup {
                    message: format!("cannot make a device-mapper system disk: {why}"),
                    hint: "on a host with device-mapper, `sudo banger helper install` and enable banger-helper@$UID.socket; else set defaults.system_disk = \"auto\"".into(),
                }),
            },
            (VmmKind::Firecracker, "qcow2") => Err(Error::InvalidRequest(
                "Firecracker takes raw disks only; defaults.system_disk = \"qcow2\" works with QEMU only".into(),
            )),
            (_, other) => SystemDiskStrategy::from_wire(other)
                .map(|s| (s, format!("defaults.system_disk = {other:?}")))
                .ok_or_else(|| Error::InvalidRequest(format!("unknown system disk strategy {other:?}"))),
        }
    }

    /// The backend a VM was created with.
    fn vmm_for(&self, record: &VmRecord) -> Vmm {
        match VmmKind::from_wire(&record.spec.vmm) {
            Some(VmmKind::Firecracker) => Vmm::Firecracker(self.firecracker.clone()),
            _ => Vmm::Qemu(self.qemu.clone()),
        }
    }

    /// banger's SSH public key, generating the pair on first use.
    async fn client_public_key(&self) -> Result<String, Error> {
        let _guard = self.key_lock.lock().await;
        let keys = self.layout.keys_dir();
        std::fs::create_dir_all(&keys)
            .map_err(Error::io(format!("cannot create {}", keys.display())))?;
        set_mode(&keys, 0o700)?;
        Ok(ssh::ensure_key(&self.layout.client_key(), "banger").await?)
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
        if let Some(vmm) = &request.vmm
            && !select::CHOICES.contains(&vmm.as_str())
        {
            return Err(Error::InvalidRequest(format!(
                "vmm {vmm:?} is not one of auto, firecracker, qemu"
            )));
        }
        Ok(VmSpec {
            cpus,
            memory_mib,
            disk_size_bytes,
            image,
            vmm: String::new(),
            vmm_reason: String::new(),
            system_disk: String::new(),
        })
    }

    /// All VMs by name.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        let records = self.store().list_vms()?;
        Ok(records
            .into_iter()
            .map(|record| self.vm_api(&self.observe(record)))
            .collect())
    }

    /// One VM.
    pub async fn get_vm(&self, name: &str) -> Result<Vm, Error> {
        let name = VmName::parse(name)?;
        let record = self.store().get_vm(name.as_str())?;
        Ok(self.vm_api(&self.observe(record)))
    }

    /// The API form of a VM, with its network (lease) looked up.
    fn vm_api(&self, record: &VmRecord) -> Vm {
        let mut vm = record.to_api();
        vm.network = match self.store().lease_of(&record.id) {
            Ok(Some(lease)) => Some(banger_proto::VmNetwork {
                mode: "bridge".into(),
                ip: Some(lease.ip.to_string()),
                tap: Some(lease.tap),
            }),
            Ok(None) => Some(banger_proto::VmNetwork {
                mode: "user".into(),
                ip: None,
                tap: None,
            }),
            Err(e) => {
                warn!(vm = %record.name, "cannot read the lease: {e}");
                None
            }
        };
        vm
    }

    /// Removes a VM that is not running, with its files.
    pub async fn remove_vm(&self, name: &str) -> Result<(), Error> {
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        // A VM recorded as running whose VMM died is stopped, and so removable.
        let record = self.observed_vm(&name)?;
        if !model::removable(record.state) {
            return Err(Error::InvalidState {
                name: name.to_string(),
                state: record.state,
                hint: "stop it first with `banger vm stop NAME`",
            });
        }
        // A jail whose removal failed at stop still holds hard links to the VM's disks: try
        // again (idempotent; nothing to do without a jailer).
        if record.spec.vmm == "firecracker"
            && let Err(e) = self.firecracker.remove_jail(&record.id)
        {
            tracing::warn!(vm = %name, "{e}");
        }
        if record.spec.system_disk == SystemDiskStrategy::DmSnapshot.as_str()
            && let Err(e) = self.remove_dm_disk(&record.id).await
        {
            tracing::warn!(vm = %name, "device-mapper teardown incomplete: {e}");
        }
        let lease = self.store().lease_of(&record.id)?;
        if let Some(lease) = &lease {
            // The tap goes with the VM. When the helper cannot do it now, `banger network
            // down` removes every banger tap later.
            if let Err(e) = self
                .host_call(banger_proto::helper::HelperOp::DeleteTap {
                    name: lease.tap.clone(),
                })
                .await
            {
                warn!(vm = %name, tap = %lease.tap, "cannot remove the tap: {}", e.to_api().message);
            }
        }
        // Deleting the VM deletes its lease (ON DELETE CASCADE).
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
        self.refresh_ssh_config();
        Ok(())
    }
}

/// Records a dm system disk's loop devices for teardown.
impl Manager {
    /// Tears down the VM's device-mapper system disk, if it has one (its loops recorded in
    /// the VM directory).
    async fn remove_dm_disk(&self, vm_id: &str) -> Result<(), String> {
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

/// The alias under which a VM's host key is pinned, independent of host and port.
pub fn host_key_alias(name: &VmName) -> String {
    format!("{name}.vm")
}

fn set_mode(path: &std::path::Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("cannot chmod {}", path.display())))
}
