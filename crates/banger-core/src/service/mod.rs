//! [`Manager`]: one method per daemon operation. Transports (the HTTP server) only parse,
//! call one method and render its result; all decisions are made here. One file per verb:
//! `create`, `start`, `stop`, `pause` (and resume), `suspend`, `reconcile` (daemon start),
//! `rm`, `show` (ls/show), `snapshots` (named snapshots), `clone`, `set` (resources), `ssh` (ssh/exec), `logs`, `workspace`, `cp`,
//! `images`, `network`, `doctor`, `recover` (daemon start: orphans, then `reconcile`);
//! `backend` says which VMM serves a VM, `system_disk` holds the dm disk's host side and
//! `fsck` how a VMM ended and the disk checks before a start. This file holds the Manager,
//! the per-VM lock and the record's state transitions.

mod backend;
mod clone;
pub mod console_cap;
mod cp;
mod create;
mod db;
mod doctor;
mod from_image;
mod fsck;
mod images;
mod kernels;
mod live_snapshots;
mod logs;
mod network;
mod pause;
mod ports;
mod reconcile;
mod recover;
mod registry;
mod rm;
mod set;
mod show;
mod snapshots;
mod ssh;
mod start;
mod stats;
mod stop;
mod suspend;
mod system_disk;
mod workspace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use banger_proto::{LifecycleResult, Vm, VmName, VmState};
use tracing::warn;

use crate::Error;
use crate::config::{Config, ResolvedDefaults};
use crate::domain::NetMode;
use crate::host::{HelperClient, HostOps};
use crate::layout::Layout;
use crate::model::{VmRecord, check_transition, has_process};
use crate::store::Store;
use crate::vmm::accel::AccelChoice;
use crate::vmm::{Backends, process};
use db::Db;

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
    /// Where every privileged operation goes (a recording fake) instead of banger-helper:
    /// the network's, the dm system disk's and the jailer's. Device-mapper is then taken as
    /// available.
    pub host_ops: Option<Arc<dyn HostOps>>,
}

/// The daemon's operations over one banger instance.
#[derive(Debug)]
pub struct Manager {
    layout: Layout,
    defaults: ResolvedDefaults,
    config: Config,
    /// The state database, used from async code through [`Db::run`].
    db: Db,
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    backends: Backends,
    /// KVM-or-TCG is decided once per daemon (a probe boot may be needed).
    accel: tokio::sync::OnceCell<AccelChoice>,
    /// Firecracker's KVM check (`firecracker.kvm = "auto"`) when `qemu.accel` is not `auto`
    /// (else it shares [`Manager::accel`]).
    evidence_accel: tokio::sync::OnceCell<AccelChoice>,
    /// Test-only overrides of discovered host facts (see [`Seams`]).
    seams: Seams,
    /// Serialises image and kernel builds and imports.
    asset_lock: tokio::sync::Mutex<()>,
    /// Serialises the first generation of banger's client key.
    key_lock: tokio::sync::Mutex<()>,
    /// Counters of the workspace prepares running now, by VM name.
    prepares: Mutex<HashMap<String, Arc<crate::workspace::transfer::Progress>>>,
    /// The running `banger kernel build`'s progress.
    kernel_build: Mutex<banger_proto::KernelBuildProgress>,
    /// Counters of the registry pushes and pulls running now, by transfer id.
    transfers: Mutex<HashMap<String, Arc<crate::image::registry::Progress>>>,
    /// Privileged actions: the root helper (or the test's [`Seams::host_ops`]), the one
    /// [`HostOps`] the network, the dm system disks and the jailer share. The network uses
    /// it only when `network.mode` is not `"user"` (see [`Manager::network_helper`]).
    helper: Arc<dyn HostOps>,
    helper_socket: std::path::PathBuf,
    /// The helper's settings once it answered.
    net_info: Mutex<Option<banger_proto::helper::HelperInfo>>,
    /// Serialises network up/down.
    net_lock: tokio::sync::Mutex<()>,
    /// The `NAME.vm` DNS server, and where it listens.
    dns_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    dns_addr: Mutex<Option<String>>,
    /// The previous CPU reading of each VMM, for `vm stats` (see [`stats::CpuSamples`]).
    cpu_samples: stats::CpuSamples,
    /// Published ports of running bridge VMs, relayed by the daemon itself.
    forwards: crate::net::forward::Forwards,
}

impl Manager {
    /// Creates the instance's directories, opens the state database and applies migrations.
    pub fn open(layout: Layout, config: Config) -> Result<Self, Error> {
        let helper_socket = if config.network.helper_socket.is_empty() {
            Layout::default_helper_socket(nix::unistd::getuid().as_raw())
        } else {
            config.network.helper_socket.clone().into()
        };
        let helper = Arc::new(HelperClient::new(helper_socket.clone()));
        Self::with_host(layout, config, helper, helper_socket)
    }

    /// Like [`Manager::open`] with an explicit [`HostOps`] (tests use a recording fake);
    /// `helper_socket` is only shown (`network status`).
    pub fn with_host(
        layout: Layout,
        config: Config,
        helper: Arc<dyn HostOps>,
        helper_socket: std::path::PathBuf,
    ) -> Result<Self, Error> {
        for dir in [layout.data_dir().to_path_buf(), layout.logs_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
        let defaults = config.resolved_defaults(&layout.config_file().display().to_string())?;
        let store = Store::open(&layout.state_db())?;
        // A jailer must start as root: the helper runs it, whatever the network mode.
        let backends = Backends::from_config(&config, helper.clone());
        Ok(Self {
            layout,
            defaults,
            config,
            db: Db::new(store),
            vm_locks: Mutex::new(HashMap::new()),
            backends,
            accel: tokio::sync::OnceCell::new(),
            evidence_accel: tokio::sync::OnceCell::new(),
            seams: Seams::default(),
            asset_lock: tokio::sync::Mutex::new(()),
            key_lock: tokio::sync::Mutex::new(()),
            prepares: Mutex::new(HashMap::new()),
            kernel_build: Mutex::new(banger_proto::KernelBuildProgress::default()),
            transfers: Mutex::new(HashMap::new()),
            helper,
            helper_socket,
            net_info: Mutex::new(None),
            net_lock: tokio::sync::Mutex::new(()),
            dns_task: Mutex::new(None),
            dns_addr: Mutex::new(None),
            cpu_samples: stats::CpuSamples::default(),
            forwards: Default::default(),
        })
    }

    /// Replaces discovered host facts with `seams` (tests against a fake VMM).
    pub fn with_seams(mut self, seams: Seams) -> Self {
        if let Some(ops) = &seams.host_ops {
            self.helper = ops.clone();
            self.backends = Backends::from_config(&self.config, ops.clone());
        }
        self.seams = seams;
        self
    }

    /// The helper for network operations; `None` when `network.mode = "user"` (bridge
    /// networking off: no network operation reaches a helper).
    fn network_helper(&self) -> Option<&Arc<dyn HostOps>> {
        (self.config.network.mode != NetMode::User).then_some(&self.helper)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The lock that serialises lifecycle operations on one VM; VMs do not wait for each other.
    fn vm_lock(&self, name: &VmName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// Parses `name` and takes the VM's lifecycle lock: what every operation that changes a
    /// VM starts with. The lock is held until the returned guard drops.
    async fn locked(&self, name: &str) -> Result<Locked, Error> {
        let name = VmName::parse(name)?;
        let guard = self.vm_lock(&name).lock_owned().await;
        Ok(Locked {
            name,
            _guard: guard,
        })
    }

    /// Applies `to` to `record` after checking the transition, and persists it.
    async fn transition(&self, record: &mut VmRecord, to: VmState) -> Result<(), Error> {
        check_transition(record.state, to)?;
        record.state = to;
        record.updated_at = crate::now_rfc3339();
        self.db.update_vm(record).await
    }

    /// The VM called `name` as it is now (see [`Self::observe`]).
    pub(super) async fn observed_vm(&self, name: &VmName) -> Result<VmRecord, Error> {
        let record = self.db.get_vm(name.as_str()).await?;
        Ok(self.observe(record).await)
    }

    /// The record as it is now: a VM recorded as running whose VMM is gone (guest powered
    /// off, VMM killed) is marked stopped.
    pub(super) async fn observe(&self, mut record: VmRecord) -> VmRecord {
        if !has_process(record.state) {
            return record;
        }
        let pid = record.runtime.as_ref().and_then(|r| r.pid);
        if pid.is_some_and(|pid| process::is_alive(pid, &record.id)) {
            return record;
        }
        let reason = self.exit_reason(&record, &*self.backend(&record));
        warn!(vm = %record.name, reason = reason.as_deref().unwrap_or("unknown"), "VMM is gone; marking the VM stopped");
        // Not waited for: `vm ls` answers while the helper removes the jail.
        drop(self.release_runtime(&record));
        record.clear_process();
        let (kind, how) = self.found_stopped(&record);
        record.record_stop(kind, how);
        record.last_error = Some(match reason {
            Some(reason) => format!("the VM stopped outside banger: {reason}"),
            None => "the VM stopped outside banger (guest power-off or VMM exit)".into(),
        });
        if let Err(e) = self.transition(&mut record, VmState::Stopped).await {
            warn!(vm = %record.name, "cannot record the stop: {e}");
        }
        record
    }
}

/// A VM's name with its lifecycle lock held (see [`Manager::locked`]).
#[derive(Debug)]
struct Locked {
    name: VmName,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// A lifecycle result without stop method, restore or warnings.
fn result(vm: Vm, changed: bool) -> LifecycleResult {
    LifecycleResult {
        vm,
        changed,
        stop_method: None,
        restored: false,
        warnings: Vec::new(),
    }
}

/// The refusal of an operation that needs a running VM, with the hint that fits `state`.
pub(super) fn not_running(name: &VmName, state: VmState) -> Error {
    Error::InvalidState {
        name: name.to_string(),
        state,
        hint: match state {
            VmState::Paused => "resume it with `banger vm resume NAME`",
            VmState::Suspended => "start it with `banger vm start NAME` (restores its snapshot)",
            _ => "start it with `banger vm start NAME`",
        },
    }
}

/// The alias under which a VM's host key is pinned, independent of host and port.
pub fn host_key_alias(name: &VmName) -> String {
    format!("{name}.vm")
}

/// Removes a directory tree (a VM's, an image's) on the blocking pool; a failure is left
/// behind (logged), not reported.
async fn remove_tree(dir: std::path::PathBuf) {
    let shown = dir.display().to_string();
    match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => warn!("cannot remove {shown}: {e}"),
        Err(e) => warn!("cannot remove {shown}: {e}"),
    }
}

fn set_mode(path: &std::path::Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("cannot chmod {}", path.display())))
}
