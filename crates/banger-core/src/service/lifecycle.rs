//! VM lifecycle of the [`Manager`]: start (a list of steps, each undone in reverse on failure;
//! from a suspend snapshot when there is one), stop (sync over SSH first, then power-off,
//! ACPI, QMP quit, kill), pause/resume (the VMM's vCPUs), suspend (sync, pause, memory
//! snapshot, process ended), reconciliation after a daemon restart, and what
//! `vm exec`/`vm ssh`/`vm logs` need.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::{ConsoleChunk, LifecycleResult, SshInfo, Vm, VmName, VmRuntime, VmState};
use tracing::{info, warn};

use super::{Manager, host_key_alias};
use crate::Error;
use crate::disk::{self, SystemDiskStrategy};
use crate::guest::ssh::SshTarget;
use crate::model::{VmRecord, check_transition, has_process};
use crate::vmm::{
    Accel, DeviceDiscovery, Hypervisor, LaunchSpec, NetAttach, Snapshot, StopTimings, VmProcess,
    Vmm, accel, cgroup, firecracker, process, stop_sequence,
};
use banger_proto::helper::HelperOp;

/// The guest's static address under QEMU user-mode networking.
const USER_NET: &str = "banger.ip=10.0.2.15/24 banger.gw=10.0.2.2 banger.dns=10.0.2.3";
/// Bound on dialling the guest's SSH server when stopping.
const STOP_DIAL: Duration = Duration::from_secs(5);
/// Bound on the `sync` over SSH when stopping.
const STOP_SYNC: Duration = Duration::from_secs(60);
/// How long to wait after an ACPI power-button press, and after QMP `quit`.
const ACPI_GRACE: Duration = Duration::from_secs(10);
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// Largest console chunk returned at once.
const CONSOLE_CHUNK: u64 = 1 << 20;

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

/// What a start did besides starting.
#[derive(Debug, Default)]
struct StartOutcome {
    restored: bool,
    warnings: Vec<String>,
}

/// Steps done so far by a start, undone in reverse when a later one fails.
#[derive(Debug, Default)]
struct StartUndo {
    runtime_dir: Option<std::path::PathBuf>,
    process: Option<(VmProcess, String)>,
    /// The backend that made the process's jail, when it runs jailed.
    jail: Option<firecracker::Firecracker>,
}

impl StartUndo {
    async fn undo(self) {
        if let Some((process, marker)) = self.process {
            process::kill(process.pid, &marker).await;
            if let Some(fc) = self.jail {
                let removed = tokio::task::spawn_blocking(move || fc.remove_jail(&marker)).await;
                if let Ok(Err(e)) = removed {
                    warn!("failed start: {e}");
                }
            }
        }
        if let Some(dir) = self.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Manager {
    /// Removes a stopped VM's transient state: its runtime dir, its cgroup leaf and its
    /// jail (through the helper; a short blocking call).
    fn release_runtime(&self, record: &VmRecord) {
        let vm_id = record.id.as_str();
        let _ = std::fs::remove_dir_all(self.layout.vm_runtime_dir(vm_id));
        if let Some(root) = cgroup::default_root() {
            cgroup::remove(&root, vm_id);
        }
        if record.runtime.as_ref().is_some_and(|r| r.jail.is_some())
            && let Err(e) = self.firecracker.remove_jail(vm_id)
        {
            warn!(vm = %record.name, "{e}");
        }
    }

    /// Applies `to` to `record` after checking the transition, and persists it.
    fn transition(&self, record: &mut VmRecord, to: VmState) -> Result<(), Error> {
        check_transition(record.state, to)?;
        record.state = to;
        record.updated_at = crate::now_rfc3339();
        self.store().update_vm(record)?;
        Ok(())
    }

    /// The VM called `name` as it is now (see [`Self::observe`]). The store guard is released
    /// before observing, which may write to the store itself: taking both in one expression
    /// would deadlock on the store's mutex.
    pub(super) fn observed_vm(&self, name: &VmName) -> Result<VmRecord, Error> {
        let record = self.store().get_vm(name.as_str())?;
        Ok(self.observe(record))
    }

    /// The record as it is now: a VM recorded as running whose VMM is gone (guest powered
    /// off, VMM killed) is marked stopped.
    pub(super) fn observe(&self, mut record: VmRecord) -> VmRecord {
        if !has_process(record.state) {
            return record;
        }
        let pid = record.runtime.as_ref().and_then(|r| r.pid);
        if pid.is_some_and(|pid| process::is_alive(pid, &record.id)) {
            return record;
        }
        warn!(vm = %record.name, "VMM is gone; marking the VM stopped");
        self.release_runtime(&record);
        if let Some(runtime) = record.runtime.as_mut() {
            runtime.pid = None;
            runtime.jail = None;
        }
        record.last_error =
            Some("the VM stopped outside banger (guest power-off or VMM exit)".into());
        if let Err(e) = self.transition(&mut record, VmState::Stopped) {
            warn!(vm = %record.name, "cannot record the stop: {e}");
        }
        record
    }

    /// After a daemon (re)start: running and paused VMs whose VMM lives are kept (paused or
    /// not as the VMM itself says); VMs caught mid-start, mid-stop or mid-suspend, or whose
    /// VMM died, are cleaned up and marked stopped.
    pub async fn reconcile(&self) -> Result<(), Error> {
        let records = self.store().list_vms()?;
        for mut record in records {
            if !matches!(
                record.state,
                VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
            ) {
                continue;
            }
            let lock = self.vm_lock(&record.name);
            let _guard = lock.lock().await;
            let pid = record.runtime.as_ref().and_then(|r| r.pid);
            let alive = pid.is_some_and(|pid| process::is_alive(pid, &record.id));
            if let Some(pid) = pid.filter(|_| alive && has_process(record.state)) {
                self.reattach(&mut record, pid).await?;
                continue;
            }
            if let Some(pid) = pid.filter(|_| alive) {
                warn!(vm = %record.name, state = %record.state, "VM was mid-operation when the daemon died; stopping it");
                self.stop_process(&record, pid, true, true).await;
            }
            if record.state == VmState::Starting {
                // The daemon may have died before it recorded the VMM's pid (QEMU was still
                // daemonizing): find such a VMM by the VM id in its command line.
                // `-name ...,process=banger-<id>` is how the QEMU backend names its process.
                // `-daemonize` forks: a scan can catch the parent before its child exists, so
                // scan again after every kill until nothing carries the marker (a killed
                // parent forks no more; a child it forked before shows up in the next scan).
                // Firecracker (also when the jailer exec'd it) carries `--id <id>`.
                let marker = format!("process=banger-{}", record.id);
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let mut found = process::find_by_marker(&marker);
                    found.extend(process::find_by_flag("--id", &record.id));
                    if found.is_empty() || std::time::Instant::now() > deadline {
                        break;
                    }
                    for pid in found {
                        warn!(vm = %record.name, pid, "killing a VMM left by an interrupted start");
                        process::kill(pid, &record.id).await;
                    }
                }
                // A jail made before the daemon recorded it: removal is idempotent.
                if let Err(e) = self.firecracker.remove_jail(&record.id) {
                    warn!(vm = %record.name, "{e}");
                }
            }
            self.release_runtime(&record);
            if let Some(runtime) = record.runtime.as_mut() {
                runtime.pid = None;
                runtime.jail = None;
            }
            if record.state == VmState::Stopping {
                // A suspend may have been cut short: its snapshot cannot be trusted. The guest
                // was synced before the snapshot, so its disks hold its data.
                self.remove_snapshot(&record.id);
            }
            if has_process(record.state) {
                record.state = VmState::Stopping;
            }
            if record.state == VmState::Starting {
                record.last_error = Some("the daemon stopped during start".into());
            }
            self.transition(&mut record, VmState::Stopped)?;
            info!(vm = %record.name, "VM marked stopped after daemon restart");
        }
        Ok(())
    }

    /// Keeps a live VM after a daemon restart, recording whether it is paused as its VMM
    /// reports (the daemon may have died between the VMM's pause or resume and its record).
    async fn reattach(&self, record: &mut VmRecord, pid: u32) -> Result<(), Error> {
        let (vmm, control) = self.control(record, pid);
        let observed = match vmm.is_paused(&control).await {
            Ok(true) => VmState::Paused,
            Ok(false) => VmState::Running,
            Err(e) => {
                warn!(vm = %record.name, "cannot ask the VMM whether it is paused: {e}");
                record.state
            }
        };
        if observed != record.state {
            info!(vm = %record.name, recorded = %record.state, observed = %observed, "VMM state differs from the record; following the VMM");
            self.transition(record, observed)?;
        }
        info!(vm = %record.name, pid, state = %record.state, "reattached to VM");
        Ok(())
    }

    /// The backend of `record` and its live process `pid` with its control socket.
    fn control(&self, record: &VmRecord, pid: u32) -> (Vmm, VmProcess) {
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

    /// Where the VM's suspend snapshot lives (in its durable directory).
    fn snapshot_paths(&self, vm_id: &str) -> Snapshot {
        Snapshot {
            state: self.layout.vm_snapshot_state(vm_id),
            memory: self.layout.vm_snapshot_memory(vm_id),
        }
    }

    /// Deletes the VM's suspend snapshot, if any.
    fn remove_snapshot(&self, vm_id: &str) {
        let snapshot = self.snapshot_paths(vm_id);
        for file in [&snapshot.state, &snapshot.memory] {
            match std::fs::remove_file(file) {
                Ok(()) => info!(file = %file.display(), "snapshot file removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(file = %file.display(), "cannot remove snapshot file: {e}"),
            }
        }
    }

    pub(super) async fn accel_choice(&self, kernel: &Path) -> Result<accel::AccelChoice, Error> {
        if let Some(choice) = &self.seams.accel {
            return Ok(choice.clone());
        }
        let scratch = self.layout.runtime_dir().to_path_buf();
        self.accel
            .get_or_try_init(|| async {
                accel::choose(
                    &self.config.qemu.accel,
                    self.qemu.binary(),
                    kernel,
                    &scratch,
                )
                .await
                .map_err(Error::Failed)
            })
            .await
            .cloned()
    }

    /// Starts a VM and returns once its SSH server accepts banger's key. A running VM is left
    /// as it is (`changed: false`). On failure every step is undone and the VM returns to its
    /// previous state with `last_error` set.
    pub async fn start_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let record = self.observed_vm(&name)?;
        if record.state == VmState::Running {
            return Ok(result(record.to_api(), false));
        }
        if record.state == VmState::Paused {
            return Err(Error::InvalidState {
                name: name.to_string(),
                state: record.state,
                hint: "resume it with `banger vm resume NAME`",
            });
        }
        let previous = record.state;
        let mut record = record;
        let snapshot = self.snapshot_paths(&record.id);
        let restore = if previous == VmState::Suspended {
            Some(snapshot.clone())
        } else {
            // Only a completed suspend leaves a snapshot to restore; anything else is stale.
            self.remove_snapshot(&record.id);
            None
        };
        self.transition(&mut record, VmState::Starting)?;
        let mut undo = StartUndo::default();
        let mut outcome = StartOutcome::default();
        match self
            .start_steps(&mut record, &mut undo, restore.as_ref(), &mut outcome)
            .await
        {
            Ok(()) => {
                record.last_error = None;
                self.transition(&mut record, VmState::Running)?;
                info!(vm = %name, restored = outcome.restored, "VM running");
                self.refresh_ssh_config();
                Ok(LifecycleResult {
                    restored: outcome.restored,
                    warnings: outcome.warnings,
                    ..result(record.to_api(), true)
                })
            }
            Err(err) => {
                warn!(vm = %name, "start failed, undoing: {err}");
                undo.undo().await;
                if let Some(runtime) = record.runtime.as_mut() {
                    runtime.pid = None;
                    runtime.jail = None;
                }
                record.last_error = Some(err.to_api().message);
                // A suspended VM whose snapshot was used up (loaded, or refused) is stopped.
                let back = if previous == VmState::Suspended && !snapshot.state.exists() {
                    VmState::Stopped
                } else {
                    previous
                };
                if let Err(e) = self.transition(&mut record, back) {
                    warn!(vm = %name, "cannot restore state: {e}");
                }
                Err(err)
            }
        }
    }

    async fn start_steps(
        &self,
        record: &mut VmRecord,
        undo: &mut StartUndo,
        restore: Option<&Snapshot>,
        outcome: &mut StartOutcome,
    ) -> Result<(), Error> {
        let vm_name = record.name.to_string();
        let step = |what: &str| {
            let step = format!("cannot start VM {vm_name}: {what}");
            move |source: Error| Error::StepFailed {
                step,
                source: Box::new(source),
            }
        };
        let image = self.find_image(&record.spec.image).map_err(step("image"))?;
        let kernel = self.find_kernel(&image.kernel).map_err(step("kernel"))?;
        let kernel_dir = self.layout.kernel_dir(&kernel.digest);
        let kernel_path = kernel_dir.join("vmlinux");
        let initrd = kernel.has_initrd.then(|| kernel_dir.join("initrd.img"));
        let kernel_caps = self.kernel_capabilities(&kernel).await;
        let devices = if crate::image::kernel::devices_on_cmdline(&kernel_caps) {
            DeviceDiscovery::CommandLine
        } else {
            DeviceDiscovery::Acpi
        };
        let strategy = SystemDiskStrategy::from_wire(&record.spec.system_disk)
            .unwrap_or(SystemDiskStrategy::Qcow2);
        let system_disk = match strategy {
            SystemDiskStrategy::Qcow2 => self.layout.vm_system_disk(&record.id),
            SystemDiskStrategy::DmSnapshot => self.ensure_dm(record, &image.digest).await?,
            _ => self.layout.vm_system_raw(&record.id),
        };
        let vmm = self.vmm_for(record);
        let work_disk = self.layout.vm_work_disk(&record.id);
        for disk in [&system_disk, &work_disk] {
            if !disk.exists() {
                return Err(Error::Failed(format!(
                    "cannot start VM {}: disk {} is missing",
                    record.name,
                    disk.display()
                )));
            }
        }
        if let Vmm::Firecracker(_) = vmm
            && let Some(why) =
                crate::image::kernel::firecracker_blocker(&kernel_caps, kernel.has_initrd)
        {
            return Err(Error::HostSetup {
                message: format!(
                    "cannot start VM {} under Firecracker: kernel {} {why}",
                    record.name, kernel.name
                ),
                hint: "recreate the VM with --vmm qemu, or with an image whose kernel comes from `banger kernel build`".into(),
            });
        }
        let choice = self.accel_choice(&kernel_path).await?;
        if let Vmm::Firecracker(_) = vmm
            && choice.accel != Accel::Kvm
        {
            return Err(Error::HostSetup {
                message: format!(
                    "cannot start VM {}: Firecracker needs KVM, and {}",
                    record.name, choice.reason
                ),
                hint: "recreate the VM with --vmm qemu".into(),
            });
        }
        let runtime_dir = self.layout.vm_runtime_dir(&record.id);
        let _ = std::fs::remove_dir_all(&runtime_dir);
        std::fs::create_dir_all(&runtime_dir).map_err(Error::io(format!(
            "cannot create {}",
            runtime_dir.display()
        )))?;
        undo.runtime_dir = Some(runtime_dir.clone());

        // Bridge mode: the network (and DNS) up, the VM's own tap ready, a static address.
        let lease = self.store().lease_of(&record.id)?;
        let (net_args, attach) = match &lease {
            Some(lease) => {
                let info = self
                    .ensure_network()
                    .await
                    .map_err(step("bridge network"))?;
                // The helper checks the lease against its subnet (which may have changed).
                self.host_call(HelperOp::CheckAddress {
                    ip: lease.ip.to_string(),
                })
                .await
                .map_err(step("lease"))?;
                self.host_call(HelperOp::EnsureTap {
                    name: lease.tap.clone(),
                })
                .await
                .map_err(step("tap"))?;
                (
                    super::network::cmdline_for(lease.ip, &info),
                    Some(NetAttach::Tap {
                        name: lease.tap.clone(),
                    }),
                )
            }
            None => (USER_NET.to_owned(), None),
        };
        let mut cmdline = match vmm {
            // Without a tap the launch refuses before spawning (VmmError::NeedsTap).
            Vmm::Firecracker(_) => format!(
                "console=ttyS0 root=/dev/vda rw {} banger.hostname={} {net_args}",
                firecracker::BOOT_ARGS,
                record.name
            ),
            // A kernel without ACPI gets Firecracker's boot arguments (i8042 probing kept
            // short, reboot through the keyboard controller).
            Vmm::Qemu(_) if devices == DeviceDiscovery::CommandLine => format!(
                "console=ttyS0 root=/dev/vda rw {} banger.hostname={} {net_args}",
                firecracker::BOOT_ARGS,
                record.name
            ),
            Vmm::Qemu(_) => format!(
                "console=ttyS0 root=/dev/vda rw panic=-1 banger.hostname={} {net_args}",
                record.name
            ),
        };
        if choice.accel == Accel::Tcg
            && let Some(khz) = accel::this_host_tsc_khz()
        {
            // Without these, TCG guests hang in timer calibration at random, or fall back to a
            // coarse clock because the vCPUs' TSCs look unsynchronised.
            cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        let console_log = self.layout.vm_console_log(&record.id);
        // Keep the previous boot's console for `vm logs` until this one starts writing.
        let _ = std::fs::rename(&console_log, console_log.with_extension("log.prev"));
        let mut spec = LaunchSpec {
            vm_id: record.id.clone(),
            vm_name: record.name.to_string(),
            cpus: record.spec.cpus,
            memory_mib: record.spec.memory_mib,
            accel: choice.accel,
            kernel: kernel_path,
            initrd,
            cmdline,
            system_disk,
            system_disk_format: strategy.format(),
            work_disk,
            runtime_dir,
            console_log: console_log.clone(),
            net: attach.clone().unwrap_or(NetAttach::User { ssh_port: 0 }),
            mac: mac_for(&record.id),
            // Firecracker's NIC is the lease's tap (bridge mode); tests without the helper
            // hand one in through the seam.
            tap: match (&vmm, &attach) {
                (Vmm::Firecracker(_), Some(NetAttach::Tap { name })) => Some(name.clone()),
                (Vmm::Firecracker(_), _) => self.seams.tap.clone(),
                (Vmm::Qemu(_), _) => None,
            },
            devices,
        };
        // A suspended VM: a fresh VMM loads the snapshot and resumes it. The snapshot is
        // deleted once a load was tried: after a load the guest's disks move on from it, so
        // loading it again would pair old memory with newer disks. A refused load boots cold
        // (the guest was synced before the snapshot was taken).
        let mut restored = None;
        if let Some(snapshot) = restore {
            if !snapshot.state.is_file() || !snapshot.memory.is_file() {
                outcome.warnings.push(format!(
                    "VM {} was suspended but its snapshot is missing; booted it from its disks",
                    record.name
                ));
            } else {
                match vmm.restore(&spec, snapshot).await {
                    Ok(process) => {
                        info!(vm = %record.name, pid = process.pid, "VM restored from its snapshot");
                        outcome.restored = true;
                        restored = Some(process);
                    }
                    Err(e) => {
                        warn!(vm = %record.name, "cannot restore the snapshot, booting instead: {e}");
                        outcome.warnings.push(format!(
                            "cannot restore VM {} from its snapshot ({e}); booted it from its disks instead (the guest was synced before suspend)",
                            record.name
                        ));
                    }
                }
            }
            self.remove_snapshot(&record.id);
        }
        // A port picked free may be taken before QEMU binds it: try a few.
        let mut attempt = 0;
        let process = loop {
            if let Some(process) = restored.take() {
                break process;
            }
            attempt += 1;
            if attach.is_none() {
                spec.net = NetAttach::User {
                    ssh_port: free_port().map_err(Error::io("cannot pick a port"))?,
                };
            }
            match vmm.launch(&spec).await {
                Ok(process) => break process,
                Err(e)
                    if attempt < 3 && attach.is_none() && e.to_string().contains("forwarding") =>
                {
                    warn!("port was taken, retrying: {e}");
                }
                Err(e) => return Err(step("launch the VMM")(e.into())),
            }
        };
        let (ssh_host, ssh_port) = match (&spec.net, &lease) {
            (NetAttach::User { ssh_port }, _) => ("127.0.0.1".to_owned(), *ssh_port),
            (NetAttach::Tap { .. }, Some(lease)) => (lease.ip.to_string(), 22),
            (NetAttach::Tap { .. }, None) => ("127.0.0.1".to_owned(), 0),
        };
        undo.process = Some((process.clone(), record.id.clone()));
        if let (Some(_), Vmm::Firecracker(fc)) = (&process.jail, &vmm) {
            undo.jail = Some(fc.clone());
        }
        record.runtime = Some(VmRuntime {
            vmm: vmm.name().into(),
            accel: choice.accel.as_str().into(),
            reason: choice.reason.clone(),
            pid: Some(process.pid),
            ssh_host,
            ssh_port,
            jail: process.jail.as_ref().map(|p| p.display().to_string()),
        });
        // Durable before waiting: a daemon crash now still knows which process to clean up.
        self.store().update_vm(record)?;
        if let Some(jail) = &process.jail {
            info!(vm = %record.name, jail = %jail.display(), "Firecracker runs in its jail (cgroup set by the jailer)");
        } else if let Some(root) = cgroup::default_root() {
            match cgroup::place(&root, &record.id, process.pid, spec.cpus, spec.memory_mib) {
                Ok(leaf) => {
                    info!(vm = %record.name, cgroup = %leaf.display(), "VMM placed in its cgroup")
                }
                Err(why) => info!(vm = %record.name, "VMM runs without a cgroup of its own: {why}"),
            }
        }
        info!(vm = %record.name, pid = process.pid, net = ?spec.net, accel = choice.accel.as_str(), "VMM launched; waiting for SSH");
        if self.seams.skip_readiness {
            // Test seam: a fake VMM runs no guest that could answer.
            return Ok(());
        }

        let target = self.ssh_target(record)?;
        let probe = self.readiness_probe().await;
        let limit = Duration::from_secs(self.config.daemon.start_timeout_secs);
        let id = record.id.clone();
        let ready = target
            .wait_ready(limit, &probe, || process::is_alive(process.pid, &id))
            .await;
        match ready {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Failed(format!(
                "VM {} stopped during boot: {}",
                record.name,
                console_tail(&console_log)
            ))),
            Err(e) => Err(Error::Failed(format!(
                "VM {}: {e}; console: {}",
                record.name,
                console_tail(&console_log)
            ))),
        }
    }

    /// The VM's dm system disk, attached again when the mapping is gone (host reboot): the
    /// copy-on-write store keeps the VM's writes.
    async fn ensure_dm(
        &self,
        record: &VmRecord,
        image_digest: &str,
    ) -> Result<std::path::PathBuf, Error> {
        let name = self.layout.vm_dm_name(&record.id);
        let device = std::path::Path::new("/dev/mapper").join(&name);
        if device.exists() {
            return Ok(device);
        }
        let host = self.disk_host();
        let op_id = crate::net::current_op_id();
        let base = self.layout.image_rootfs(image_digest);
        let cow = self.layout.vm_system_cow(&record.id);
        let state = self.layout.vm_system_dm(&record.id);
        let dm = tokio::task::spawn_blocking(move || {
            disk::dm_snapshot_attach(host.as_ref(), &op_id, &name, &base, &cow)
        })
        .await
        .map_err(|e| Error::Failed(format!("dm task failed: {e}")))??;
        super::save_dm(&state, &dm)?;
        Ok(dm.device)
    }

    /// How the daemon and the CLI reach the guest.
    pub(super) fn ssh_target(&self, record: &VmRecord) -> Result<SshTarget, Error> {
        let runtime = record.runtime.as_ref().ok_or_else(|| Error::InvalidState {
            name: record.name.to_string(),
            state: record.state,
            hint: "start it with `banger vm start NAME`",
        })?;
        Ok(SshTarget {
            host: runtime.ssh_host.clone(),
            port: runtime.ssh_port,
            user: "root".into(),
            identity: self.layout.client_key(),
            known_hosts: self.layout.vm_known_hosts(&record.id),
            host_key_alias: host_key_alias(&record.name),
            control_path: Some(self.layout.vm_ssh_control(&record.id)),
        })
    }

    /// Stops a VM without losing data: `sync` over SSH first (dial bounded), then the guest
    /// powers itself off; if it does not, ACPI power button, QMP quit, and finally SIGKILL.
    /// `force` skips the graceful power-off but still tries the bounded `sync`.
    pub async fn stop_vm(&self, name: &str, force: bool) -> Result<LifecycleResult, Error> {
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let mut record = self.observed_vm(&name)?;
        let pid = record.runtime.as_ref().and_then(|r| r.pid);
        let live_pid = pid.filter(|pid| process::is_alive(*pid, &record.id));
        let Some(pid) = live_pid else {
            if record.state == VmState::Error {
                self.transition(&mut record, VmState::Stopped)?;
            }
            return Ok(result(record.to_api(), false));
        };
        let maybe_paused = record.state != VmState::Running;
        if record.state != VmState::Stopping {
            self.transition(&mut record, VmState::Stopping)?;
        }
        let method = self.stop_process(&record, pid, force, maybe_paused).await;
        self.release_runtime(&record);
        if let Some(runtime) = record.runtime.as_mut() {
            runtime.pid = None;
            runtime.jail = None;
        }
        record.last_error = None;
        self.transition(&mut record, VmState::Stopped)?;
        info!(vm = %name, method, "VM stopped");
        Ok(LifecycleResult {
            stop_method: Some(method.into()),
            ..result(record.to_api(), true)
        })
    }

    /// The VM called `name` with its live VMM process, for pause/resume/suspend; refused
    /// unless it runs (paused or not).
    fn live_vm(&self, name: &VmName) -> Result<(VmRecord, Vmm, VmProcess), Error> {
        let record = self.observed_vm(name)?;
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
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let (mut record, vmm, control) = self.live_vm(&name)?;
        if record.state == VmState::Paused {
            return Ok(result(record.to_api(), false));
        }
        if !vmm.capabilities().supports_pause {
            return Err(Error::Unsupported {
                message: format!("VM {name} runs on {}, which cannot pause", vmm.name()),
                hint: "use `banger vm stop NAME`".into(),
            });
        }
        // The VMM first, then the record: a daemon dying in between is corrected at
        // reattach, which asks the VMM.
        vmm.pause(&control).await?;
        self.transition(&mut record, VmState::Paused)?;
        info!(vm = %name, "VM paused");
        Ok(result(record.to_api(), true))
    }

    /// Resumes a paused VM. A running VM is left as it is (`changed: false`).
    pub async fn resume_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let (mut record, vmm, control) = self.live_vm(&name)?;
        if record.state == VmState::Running {
            return Ok(result(record.to_api(), false));
        }
        vmm.resume(&control).await?;
        self.transition(&mut record, VmState::Running)?;
        info!(vm = %name, "VM resumed");
        Ok(result(record.to_api(), true))
    }

    /// Suspends a VM to disk (backends with memory snapshots: Firecracker): `sync` in the
    /// guest over SSH, pause, snapshot (state + memory files in the VM's directory), end the
    /// process. The next `start` restores it. A suspended VM is left as it is.
    pub async fn suspend_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let name = VmName::parse(name)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let current = self.observed_vm(&name)?;
        if current.state == VmState::Suspended {
            return Ok(result(current.to_api(), false));
        }
        if !self
            .vmm_for(&current)
            .capabilities()
            .supports_memory_snapshot
        {
            return Err(Error::Unsupported {
                message: format!(
                    "cannot suspend VM {name}: suspend needs the Firecracker backend (it runs on {})",
                    current.spec.vmm
                ),
                hint: "use `banger vm pause NAME` or `banger vm stop NAME`".into(),
            });
        }
        if current.runtime.as_ref().is_some_and(|r| r.jail.is_some()) {
            return Err(Error::Unsupported {
                message: format!(
                    "cannot suspend VM {name}: it runs through Firecracker's jailer, whose chroot \
                     cannot take the snapshot files"
                ),
                hint: "use `banger vm pause NAME` or `banger vm stop NAME`".into(),
            });
        }
        let (mut record, vmm, control) = self.live_vm(&name)?;
        let was = record.state;
        // Stopping while the snapshot is written: a daemon that dies now leaves a VM that
        // reconciliation stops (and whose partial snapshot it deletes).
        self.transition(&mut record, VmState::Stopping)?;
        let mut warnings = Vec::new();
        // 1. Data safety first: a paused guest cannot sync, so resume it for that.
        if was == VmState::Paused
            && let Err(e) = vmm.resume(&control).await
        {
            self.transition(&mut record, was)?;
            return Err(Error::StepFailed {
                step: format!("cannot suspend VM {name}: resuming it to sync failed"),
                source: Box::new(Error::from(e)),
            });
        }
        // Dialled directly: STOP_DIAL then bounds a hung guest (not so through a master).
        let synced = match self.ssh_target(&record) {
            Ok(target) => match target.direct().run("sync", STOP_DIAL, STOP_SYNC).await {
                Ok((Some(0), _, _)) => Ok(()),
                Ok((code, _, stderr)) => Err(format!("exit {code:?}: {}", stderr.trim())),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_api().message),
        };
        if let Err(why) = synced {
            warn!(vm = %name, "sync before suspend failed: {why}");
            warnings.push(format!(
                "cannot sync the guest ({why}): its unwritten data is only in the snapshot; \
                 a cold boot would lose it"
            ));
        }
        // 2. Pause and snapshot; on failure the VM runs on as it was.
        let snapshot = self.snapshot_paths(&record.id);
        self.remove_snapshot(&record.id);
        let taken = async {
            vmm.pause(&control).await?;
            vmm.snapshot(&control, &snapshot).await
        }
        .await;
        if let Err(e) = taken {
            warn!(vm = %name, "snapshot failed, resuming: {e}");
            self.remove_snapshot(&record.id);
            // Back to what it was: a paused VM was resumed for the sync, so pause it again.
            let back = if was == VmState::Paused {
                match vmm.is_paused(&control).await {
                    Ok(true) => VmState::Paused,
                    _ => match vmm.pause(&control).await {
                        Ok(()) => VmState::Paused,
                        Err(_) => VmState::Running,
                    },
                }
            } else {
                match vmm.resume(&control).await {
                    Ok(()) => VmState::Running,
                    Err(_) => VmState::Paused,
                }
            };
            self.transition(&mut record, back)?;
            return Err(Error::StepFailed {
                step: format!("cannot suspend VM {name}"),
                source: Box::new(Error::from(e)),
            });
        }
        // 3. End the paused process (SIGTERM, then SIGKILL) and make the snapshot durable.
        let timings = StopTimings {
            poweroff: Duration::ZERO,
            signal: Duration::ZERO,
            quit: QUIT_GRACE,
        };
        let method = stop_sequence(&vmm, &control, &record.id, false, true, timings).await;
        for file in [&snapshot.state, &snapshot.memory] {
            if let Err(e) = std::fs::File::open(file).and_then(|f| f.sync_all()) {
                warn!(vm = %name, file = %file.display(), "cannot flush snapshot file: {e}");
            }
        }
        if let Some(dir) = snapshot.state.parent()
            && let Err(e) = std::fs::File::open(dir).and_then(|f| f.sync_all())
        {
            warn!(vm = %name, "cannot flush {}: {e}", dir.display());
        }
        self.release_runtime(&record);
        if let Some(runtime) = record.runtime.as_mut() {
            runtime.pid = None;
            runtime.jail = None;
        }
        record.last_error = None;
        self.transition(&mut record, VmState::Suspended)?;
        info!(vm = %name, method, snapshot = %snapshot.state.display(), "VM suspended");
        Ok(LifecycleResult {
            warnings,
            ..result(record.to_api(), true)
        })
    }

    /// The stop sequence on a live VMM process; returns how it ended. `maybe_paused`: ask the
    /// VMM whether it is paused and resume it first.
    async fn stop_process(
        &self,
        record: &VmRecord,
        pid: u32,
        force: bool,
        maybe_paused: bool,
    ) -> &'static str {
        let marker = record.id.as_str();
        let grace = Duration::from_secs(self.config.daemon.stop_timeout_secs);
        let (vmm, control) = self.control(record, pid);
        // 0. A paused guest can neither sync nor power off: resume it first. A VM recorded as
        // running is not asked (a hung control socket would only delay the stop).
        if maybe_paused && vmm.capabilities().supports_pause {
            match vmm.is_paused(&control).await {
                Ok(true) => match vmm.resume(&control).await {
                    Ok(()) => info!(vm = %record.name, "resumed the paused VM to stop it"),
                    Err(e) => warn!(vm = %record.name, "cannot resume the paused VM: {e}"),
                },
                Ok(false) => {}
                Err(e) => warn!(vm = %record.name, "cannot ask the VMM whether it is paused: {e}"),
            }
        }
        // 1. What makes data safe: flush the guest's page cache to its disks. Under
        // Firecracker a guest power-off leaves the process running (no ACPI on x86); a
        // reboot ends it (`reboot=k`), so the guest is asked to reboot there.
        // Same under QEMU for a kernel without ACPI (devices on its command line).
        let reboots = match &vmm {
            Vmm::Firecracker(_) => true,
            Vmm::Qemu(_) => self.kernel_takes_devices_on_cmdline(record).await,
        };
        let script = match (force, reboots) {
            (true, _) => "sync",
            (false, true) => "sync && (systemctl reboot --no-block || reboot) >/dev/null 2>&1",
            (false, false) => "sync && (systemctl poweroff --no-block || poweroff) >/dev/null 2>&1",
        };
        // Dialled directly: STOP_DIAL then bounds a hung guest (not so through a master).
        let synced = match self.ssh_target(record) {
            Ok(target) => match target.direct().run(script, STOP_DIAL, STOP_SYNC).await {
                Ok((Some(0), _, _)) => true,
                Ok((code, _, stderr)) => {
                    warn!(vm = %record.name, ?code, "sync/poweroff over SSH failed: {}", stderr.trim());
                    false
                }
                Err(e) => {
                    warn!(vm = %record.name, "sync/poweroff over SSH failed: {e}");
                    false
                }
            },
            Err(_) => false,
        };
        // 2–4. The guest's own power-off, the backend's signal, its quit, SIGKILL.
        let timings = StopTimings {
            poweroff: grace,
            signal: ACPI_GRACE,
            quit: QUIT_GRACE,
        };
        stop_sequence(&vmm, &control, marker, synced, force, timings).await
    }

    /// What `vm exec` and `vm ssh` need; refused unless the VM runs.
    pub async fn ssh_info(&self, name: &str) -> Result<SshInfo, Error> {
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name)?;
        if record.state != VmState::Running {
            return Err(not_running(&name, record.state));
        }
        let target = self.ssh_target(&record)?;
        Ok(SshInfo {
            host: target.host,
            port: target.port,
            user: target.user,
            identity_file: target.identity.display().to_string(),
            known_hosts_file: target.known_hosts.display().to_string(),
            host_key_alias: target.host_key_alias,
            control_path: self.layout.vm_ssh_control(&record.id).display().to_string(),
            workdir: super::workspace::workdir(self.store().workspace(&record.id)?.is_some()),
        })
    }

    /// Serial console output from `offset`.
    pub async fn console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, Error> {
        use std::io::{Read, Seek, SeekFrom};
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name)?;
        let path = self.layout.vm_console_log(&record.id);
        let mut data = Vec::new();
        let mut next_offset = offset;
        if let Ok(mut file) = std::fs::File::open(&path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            // A new boot truncated the file: start over.
            let start = if offset > len { 0 } else { offset };
            file.seek(SeekFrom::Start(start))
                .map_err(Error::io(format!("cannot read {}", path.display())))?;
            file.take(CONSOLE_CHUNK)
                .read_to_end(&mut data)
                .map_err(Error::io(format!("cannot read {}", path.display())))?;
            next_offset = start + data.len() as u64;
        }
        Ok(ConsoleChunk {
            data: String::from_utf8_lossy(&data).into_owned(),
            next_offset,
            running: has_process(record.state),
        })
    }
}

/// A locally administered MAC derived from the VM id (stable across restarts).
fn mac_for(id: &str) -> String {
    let hex = id.as_bytes();
    let pair = |i: usize| std::str::from_utf8(&hex[i * 2..i * 2 + 2]).unwrap_or("00");
    format!("52:54:00:{}:{}:{}", pair(0), pair(1), pair(2))
}

/// A TCP port on 127.0.0.1 that is free right now.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The console lines that explain a failed boot: the last lines reporting a failure or
/// timeout, else the last few lines.
fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "no console output".into();
    }
    let failures: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            l.contains("Failed")
                || l.contains("Timed out")
                || l.contains("FATAL")
                || l.contains("panic")
        })
        .collect();
    let chosen = if failures.is_empty() {
        &lines
    } else {
        &failures
    };
    chosen[chosen.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn macs_are_stable_and_local() {
        let mac = super::mac_for("0a1b2c3d4e5f");
        assert_eq!(mac, "52:54:00:0a:1b:2c");
    }
}
