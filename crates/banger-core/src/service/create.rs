//! `vm create`: the spec from the request and the defaults, the backend and system disk
//! strategy chosen (nothing is written when they cannot work), the VM's disks and its record.

use banger_proto::{CreateVmRequest, Vm, VmName};
use tracing::info;

use super::ports::NetChoice;
use super::system_disk::save_dm;
use super::{Manager, host_key_alias, set_mode};
use crate::Error;
use crate::disk;
use crate::domain::{SystemDiskStrategy, VmmChoice};
use crate::guest::ssh;
use crate::image;
use crate::model::{VmRecord, VmSpec};
use crate::store::StoreError;
use crate::vmm::accel::Accel;
use crate::vmm::select::{self as vmm_select, Facts, Selection};
use crate::vmm::{DiskRefusal, VmBackend};

/// Upper bounds that keep a typo from asking for an absurd VM.
pub(super) const MAX_CPUS: u32 = 256;
pub(super) const MAX_MEMORY_MIB: u64 = 4 << 20;
pub(super) const MIN_MEMORY_MIB: u64 = 128;
const MIN_DISK_BYTES: u64 = 64 << 20;
pub(super) const MAX_DISK_BYTES: u64 = 64 << 40;

impl Manager {
    /// Creates a VM in state Created: its record, system overlay and work disk (with the
    /// VM's SSH host key and banger's client key seeded in). Leaves nothing behind on error.
    pub async fn create_vm(&self, request: CreateVmRequest) -> Result<Vm, Error> {
        VmName::parse(&request.name)?;
        // An image given as a registry reference is pulled first (per `--pull`).
        let request = self.autopull(request).await?;
        let vm = self.locked(&request.name).await?;
        let name = vm.name.clone();
        let asked = self.resolve_spec(&request)?;
        let taken = name.to_string();
        if self.db.run(move |s| s.find_vm(&taken)).await?.is_some() {
            return Err(StoreError::VmExists(name.to_string()).into());
        }
        let image = self.find_image(&asked.image).await?;
        // Decided before anything is written: a backend that cannot work changes nothing.
        // Firecracker has no user-mode networking: it needs the bridge (a lease and its tap).
        let (pool, isolated) = match self.choose_net(request.network.as_deref()).await? {
            NetChoice::Bridge(pool) => (Some(pool), false),
            NetChoice::User { isolated } => (None, isolated),
        };
        self.check_ports(None, &request.ports, true).await?;
        let selection = self.select_vmm(asked.vmm, &image, pool.is_some()).await?;
        let backend = self.backend_of(selection.kind);
        // E.g. a jailer asked for and not there: refused before anything is written.
        backend.preflight()?;
        let (strategy, disk_reason) = self.system_disk_strategy(backend.as_ref()).await?;
        backend
            .check_system_disk(strategy)
            .map_err(|refusal| match refusal {
                DiskRefusal::Format(message) => Error::InvalidRequest(message),
                DiskRefusal::Setup { message, hint } => Error::HostSetup { message, hint },
            })?;
        let spec = VmSpec {
            cpus: asked.cpus,
            memory_mib: asked.memory_mib,
            disk_size_bytes: asked.disk_size_bytes,
            image: asked.image,
            vmm: selection.kind,
            vmm_reason: selection.reason,
            system_disk: strategy,
        };
        info!(vm = %name, vmm = %spec.vmm, reason = %spec.vmm_reason, system_disk = %spec.system_disk, disk_reason = %disk_reason, "backend chosen");
        let record = VmRecord::new(name, spec);
        let vm_dir = self.layout.vm_dir(&record.id);
        let made = async {
            self.make_vm_disks(&record, &image.digest, image.work_seed.as_deref())
                .await?;
            crate::fault::point("create.before_record")?;
            let (stored, ports) = (record.clone(), request.ports.clone());
            self.db
                .run(move |store| {
                    let lease = store.insert_vm_with_lease(&stored, pool)?;
                    let settings = store
                        .set_isolated(&stored.id, isolated)
                        .and_then(|()| store.change_ports(&stored.id, &ports, &[]));
                    if let Err(e) = settings {
                        let _ = store.delete_vm(stored.name.as_str());
                        return Err(e);
                    }
                    Ok(lease)
                })
                .await
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
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&vm_dir)).await;
                return Err(err);
            }
        };
        info!(vm = %record.name, id = %record.id, image = %record.spec.image, ip = ?lease.as_ref().map(|l| l.ip), tap = ?lease.as_ref().map(|l| &l.tap), "VM created");
        self.refresh_ssh_config().await;
        Ok(self.vm_api(&record).await)
    }

    /// The VM's directory with its disks and pinned host key; the work disk starts with the
    /// image's work-seed, when it has one.
    pub(super) async fn make_vm_disks(
        &self,
        record: &VmRecord,
        image_digest: &str,
        work_seed: Option<&str>,
    ) -> Result<(), Error> {
        let id = &record.id;
        let vm_dir = self.layout.vm_dir(id);
        std::fs::create_dir_all(&vm_dir)
            .map_err(Error::io(format!("cannot create {}", vm_dir.display())))?;
        let client_public = self.client_public_key().await?;
        // The seed holds the guest's private host key only until mkfs copied it in.
        let seed = self.layout.vm_seed(id);
        let ssh_dir = seed.ssh_dir();
        let banger_dir = seed.banger_dir();
        std::fs::create_dir_all(seed.root()).map_err(Error::io(format!(
            "cannot create {}",
            seed.root().display()
        )))?;
        if let Some(digest) = work_seed {
            // Hard links into the store: no copy of the seed's bytes (mkfs.ext4 -d reads
            // them once).
            let (from, to) = (self.layout.work_seed(digest), seed.root().to_path_buf());
            tokio::task::spawn_blocking(move || image::tree::link_seed(&from, &to))
                .await
                .map_err(|e| Error::Failed(format!("work-seed task failed: {e}")))?
                .map_err(super::images::seed_error)?;
        }
        for dir in [&ssh_dir, &banger_dir, &seed.repo_dir()] {
            std::fs::create_dir_all(dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
        set_mode(&ssh_dir, 0o700)?;
        set_mode(&banger_dir, 0o700)?;
        let authorized = seed.authorized_keys();
        std::fs::write(&authorized, format!("{client_public}\n"))
            .map_err(Error::io(format!("cannot write {}", authorized.display())))?;
        set_mode(&authorized, 0o600)?;
        let host_public = ssh::ensure_key(&seed.host_key(), &format!("{}.vm", record.name)).await?;
        let known_hosts = self.layout.vm_known_hosts(id);
        std::fs::write(
            &known_hosts,
            format!("{} {host_public}\n", host_key_alias(&record.name)),
        )
        .map_err(Error::io(format!("cannot write {}", known_hosts.display())))?;
        let made = disk::create_work_disk(
            &self.layout.vm_work_disk(id),
            record.spec.disk_size_bytes,
            seed.root(),
        )
        .await;
        super::remove_tree(seed.root().to_path_buf()).await;
        made?;
        crate::fault::point("create.after_work_disk")?;
        let base = self.layout.image_rootfs(image_digest);
        let raw = self.layout.vm_system_raw(id);
        let io = |what: &'static str| {
            let context = format!("cannot {what} {} to {}", base.display(), raw.display());
            move |source| disk::DiskError::Io { context, source }
        };
        match record.spec.system_disk {
            SystemDiskStrategy::Qcow2 => {
                disk::create_system_overlay(
                    &base,
                    &self.layout.vm_system_disk(id),
                    self.defaults.system_disk_bytes,
                )
                .await?
            }
            SystemDiskStrategy::Reflink => {
                let (b, r) = (base.clone(), raw.clone());
                tokio::task::spawn_blocking(move || disk::reflink(&b, &r))
                    .await
                    .map_err(|e| Error::Failed(format!("reflink task failed: {e}")))?
                    .map_err(io("reflink"))?;
                disk::grow_raw_system_disk(&raw, self.defaults.system_disk_bytes)?;
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
                .map_err(io("copy"))?;
                disk::grow_raw_system_disk(&raw, self.defaults.system_disk_bytes)?;
            }
            // A dm snapshot has the image's size: it does not grow.
            SystemDiskStrategy::DmSnapshot => {
                let host = self.disk_host();
                let op_id = crate::net::current_op_id();
                let name = self.layout.vm_dm_name(nix::unistd::getuid().as_raw(), id);
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
        crate::fault::point("create.after_system_disk")?;
        Ok(())
    }

    /// The backend for a new VM (see [`vmm_select`]). Firecracker's facts are gathered only
    /// when they can matter; KVM is probed last (it may boot a probe kernel).
    pub(super) async fn select_vmm(
        &self,
        requested: VmmChoice,
        image: &banger_proto::Image,
        bridge: bool,
    ) -> Result<Selection, Error> {
        let mut facts = Facts {
            kernel: Err("not checked".into()),
            firecracker: Err("not checked".into()),
            tap: Err("not checked".into()),
            kvm: Err("not checked".into()),
        };
        if requested != VmmChoice::Qemu {
            let kernel = self.find_kernel(&image.kernel).await?;
            let caps = self.kernel_capabilities(&kernel).await;
            facts.kernel = match crate::image::kernel::firecracker_blocker(&caps, kernel.has_initrd)
            {
                Some(why) => Err(format!("kernel {}, which {why}", kernel.name)),
                None => Ok(()),
            };
            facts.firecracker = self
                .backends
                .firecracker()
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
            if facts.firecracker.is_ok() && facts.kernel.is_ok() && facts.tap.is_ok() {
                let path = self.layout.kernel_vmlinux(&kernel.digest);
                let choice = self.vmm_accel(self.backends.firecracker(), &path).await?;
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

    /// The system disk strategy for a new VM on `backend`, and why: `auto` is a qcow2
    /// overlay where the backend opens qcow2, else the best raw strategy this host has.
    pub(super) async fn system_disk_strategy(
        &self,
        backend: &dyn VmBackend,
    ) -> Result<(SystemDiskStrategy, String), Error> {
        match self.config.defaults.system_disk.fixed() {
            None if backend.capabilities().supports_qcow2 => Ok((
                SystemDiskStrategy::Qcow2,
                format!("qcow2 overlay ({})", backend.display_name()),
            )),
            None => Ok(disk::choose_raw_strategy(
                &self.layout.images_dir(),
                match backend.dm_disks() {
                    Ok(()) => self.dm_available().await,
                    Err(why) => Err(why),
                },
            )),
            Some(SystemDiskStrategy::DmSnapshot) => match self.dm_available().await {
                Ok(()) => Ok((SystemDiskStrategy::DmSnapshot, "defaults.system_disk = \"dm\"".into())),
                Err(why) => Err(Error::HostSetup {
                    message: format!("cannot make a device-mapper system disk: {why}"),
                    hint: "on a host with device-mapper, `sudo banger helper install` and enable banger-helper@$UID.socket; else set defaults.system_disk = \"auto\"".into(),
                }),
            },
            Some(strategy) => Ok((strategy, format!("defaults.system_disk = \"{strategy}\""))),
        }
    }

    /// banger's SSH public key, generating the pair on first use.
    pub(super) async fn client_public_key(&self) -> Result<String, Error> {
        let _guard = self.key_lock.lock().await;
        let keys = self.layout.keys_dir();
        std::fs::create_dir_all(&keys)
            .map_err(Error::io(format!("cannot create {}", keys.display())))?;
        set_mode(&keys, 0o700)?;
        Ok(ssh::ensure_key(&self.layout.client_key(), "banger").await?)
    }

    /// What `request` and the defaults ask for, checked.
    pub(super) fn resolve_spec(&self, request: &CreateVmRequest) -> Result<Asked, Error> {
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
        let vmm = match &request.vmm {
            Some(vmm) => vmm
                .parse::<VmmChoice>()
                .map_err(|e| Error::InvalidRequest(e.to_string()))?,
            None => self.config.defaults.vmm,
        };
        Ok(Asked {
            cpus,
            memory_mib,
            disk_size_bytes,
            image,
            vmm,
        })
    }
}

/// A create request with the defaults filled in, before the backend and system disk are
/// chosen.
#[derive(Debug)]
pub(super) struct Asked {
    cpus: u32,
    memory_mib: u64,
    disk_size_bytes: u64,
    image: String,
    vmm: VmmChoice,
}
