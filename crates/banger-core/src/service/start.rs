//! `vm start`: a list of steps, each undone in reverse on failure (from a suspend snapshot
//! when there is one); returns once the guest's SSH server accepts banger's key.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use banger_proto::LifecycleResult;
use banger_proto::helper::HelperOp;
use banger_proto::{StopKind, VmName, VmState};
use tracing::{info, warn};

use super::{Manager, result};
use crate::Error;
use crate::domain::SystemDiskStrategy;
use crate::guest::ssh;
use crate::model::{VmRecord, VmRuntime};
use crate::vmm::{
    Accel, DeviceDiscovery, LaunchSpec, NetAttach, Snapshot, VmBackend, VmProcess, VmmError, accel,
    cgroup, process,
};

/// The guest's static address under QEMU user-mode networking.
const USER_NET: &str = "banger.ip=10.0.2.15/24 banger.gw=10.0.2.2 banger.dns=10.0.2.3";

/// What a start did besides starting.
#[derive(Debug, Default)]
struct StartOutcome {
    restored: bool,
    warnings: Vec<String>,
    /// A bridge VM's published ports, bound before launch, served once it runs.
    forwards: Vec<crate::net::forward::Bound>,
}

/// Steps done so far by a start, undone in reverse when a later one fails.
#[derive(Debug, Default)]
struct StartUndo {
    runtime_dir: Option<std::path::PathBuf>,
    process: Option<(VmProcess, String)>,
    /// The backend that made the process's jail, when it runs jailed.
    jail: Option<Arc<dyn VmBackend>>,
}

impl StartUndo {
    async fn undo(self) {
        if let Some((process, marker)) = self.process {
            process::kill(process.pid, &marker).await;
            if let Some(backend) = self.jail {
                let op_id = crate::net::current_op_id();
                let removed =
                    tokio::task::spawn_blocking(move || backend.remove_jail(&op_id, &marker)).await;
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
    /// Starts a VM and returns once its SSH server accepts banger's key. A running VM is left
    /// as it is (`changed: false`). On failure every step is undone and the VM returns to its
    /// previous state with `last_error` set.
    pub async fn start_vm(&self, name: &str) -> Result<LifecycleResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let record = self.observed_vm(name).await?;
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
        // Which files are its disks is decided first (a snapshot step left half done).
        let record = if self.settle_disks(&record).await? {
            self.observed_vm(name).await?
        } else {
            record
        };
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
        self.transition(&mut record, VmState::Starting).await?;
        let mut undo = StartUndo::default();
        let mut outcome = StartOutcome::default();
        match self
            .start_steps(&mut record, &mut undo, restore.as_ref(), &mut outcome)
            .await
        {
            Ok(()) => {
                record.last_error = None;
                self.transition(&mut record, VmState::Running).await?;
                info!(vm = %name, restored = outcome.restored, "VM running");
                if let Err(e) = self
                    .open_forwards(&record, std::mem::take(&mut outcome.forwards))
                    .await
                {
                    outcome.warnings.push(e.to_api().message);
                }
                self.refresh_ssh_config().await;
                Ok(LifecycleResult {
                    restored: outcome.restored,
                    warnings: outcome.warnings,
                    ..result(record.to_api(), true)
                })
            }
            Err(err) => {
                warn!(vm = %name, "start failed, undoing: {err}");
                if undo.process.is_some() {
                    record.record_stop(StopKind::Unclean, "a failed start killed the VMM");
                }
                undo.undo().await;
                record.clear_process();
                record.last_error = Some(err.to_api().message);
                // A suspended VM whose snapshot was used up (loaded, or refused) is stopped.
                let back = if previous == VmState::Suspended && !snapshot.state.exists() {
                    VmState::Stopped
                } else {
                    previous
                };
                if let Err(e) = self.transition(&mut record, back).await {
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
        let image = self
            .find_image(&record.spec.image)
            .await
            .map_err(step("image"))?;
        let kernel = self
            .find_kernel(&image.kernel)
            .await
            .map_err(step("kernel"))?;
        let kernel_path = self.layout.kernel_vmlinux(&kernel.digest);
        let initrd = kernel
            .has_initrd
            .then(|| self.layout.kernel_initrd(&kernel.digest));
        let kernel_caps = self.kernel_capabilities(&kernel).await;
        let strategy = record.spec.system_disk;
        let system_disk = match strategy {
            SystemDiskStrategy::Qcow2 => self.layout.vm_system_disk(&record.id),
            SystemDiskStrategy::DmSnapshot => self.ensure_dm(record, &image.digest).await?,
            SystemDiskStrategy::Reflink | SystemDiskStrategy::Copy => {
                self.layout.vm_system_raw(&record.id)
            }
        };
        let backend = self.backend(record);
        let caps = backend.capabilities();
        // A backend that declares devices only on the command line (Firecracker, QEMU with
        // `qemu.devices = "cmdline"`) boots every kernel that way, else ACPI where the kernel
        // reads it.
        let devices = if caps.cmdline_devices_only
            || crate::image::kernel::devices_on_cmdline(&kernel_caps)
        {
            DeviceDiscovery::CommandLine
        } else {
            DeviceDiscovery::Acpi
        };
        let (work_disk, work_format) = self.work_disk(&record.id);
        for disk in [&system_disk, &work_disk] {
            if !disk.exists() {
                return Err(Error::Failed(format!(
                    "cannot start VM {}: disk {} is missing",
                    record.name,
                    disk.display()
                )));
            }
        }
        // A suspended VM: a fresh VMM loads the snapshot and resumes it. The snapshot is
        // deleted once a load was tried: after a load the guest's disks move on from it, so
        // loading it again would pair old memory with newer disks. A refused load boots cold
        // (the guest was synced before the snapshot was taken).
        let mut restoring = restore;
        if let Some(snapshot) = restoring {
            // Checked first: every file as sealed, the disks the very ones it was taken with.
            let manifest = self.layout.vm_snapshot_manifest(&record.id);
            let disks = self.snapshot_disks(record);
            let machine = crate::snapshot::Machine::of(&record.spec);
            let checked = tokio::task::spawn_blocking(move || {
                crate::snapshot::verify(&manifest, &disks, machine)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            if let Err(why) = checked {
                warn!(vm = %record.name, "not restoring the snapshot: {why}");
                outcome.warnings.push(cold_boot_warning(&record.name, &why));
                restoring = None;
                self.remove_snapshot(&record.id);
            } else {
                info!(vm = %record.name, state = %snapshot.state.display(), "restoring the VM from its snapshot");
            }
        }
        // After an unclean stop, e2fsck before the guest mounts anything; never under a
        // guest restored from its snapshot (its filesystems are mounted in its memory).
        let checked = self
            .check_disks_before_start(
                record,
                &system_disk,
                &work_disk,
                work_format,
                restoring.is_some(),
            )
            .await?;
        outcome.warnings.extend(checked.warnings);
        let guest_fsck = checked.guest_checks_root;
        if caps.cmdline_devices_only
            && let Some(why) =
                crate::image::kernel::firecracker_blocker(&kernel_caps, kernel.has_initrd)
        {
            return Err(Error::HostSetup {
                message: format!(
                    "cannot start VM {} under {}: kernel {} {why}",
                    record.name,
                    backend.display_name(),
                    kernel.name
                ),
                hint: "recreate the VM with --vmm qemu (with qemu.devices = \"auto\"), or with an image whose kernel comes from `banger kernel build`".into(),
            });
        }
        let choice = self.vmm_accel(&*backend, &kernel_path).await?;
        if caps.requires_kvm && choice.accel != Accel::Kvm {
            return Err(Error::HostSetup {
                message: format!(
                    "cannot start VM {}: {} needs KVM, and {}",
                    record.name,
                    backend.display_name(),
                    choice.reason
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
        crate::fault::point("start.after_runtime_dir")?;

        // Bridge mode: the network (and DNS) up, the VM's own tap ready, a static address.
        let id = record.id.clone();
        let lease = self.db.run(move |s| s.lease_of(&id)).await?;
        let (net_args, attach, tap_fd) = match &lease {
            Some(lease) => {
                let info = self
                    .ensure_network()
                    .await
                    .map_err(step("bridge network"))?;
                // The helper checks the lease against its subnet (which may have changed).
                self.host_run(HelperOp::CheckAddress {
                    ip: lease.ip.to_string(),
                })
                .await
                .map_err(step("lease"))?;
                let name = lease.tap.clone();
                // A backend that takes its tap as a descriptor gets a queue the helper
                // opened: `/dev/net/tun` may be root's only.
                let tap = name.clone();
                let tap_fd = if caps.tap_fd {
                    self.net_op(move |host, op_id| host.open_tap(op_id, &tap))
                        .await
                        .map_err(step("tap"))?
                        .map(Arc::new)
                } else {
                    self.net_op(move |host, op_id| host.ensure_tap(op_id, &tap))
                        .await
                        .map_err(step("tap"))?;
                    None
                };
                (
                    super::network::cmdline_for(lease.ip, &info),
                    Some(NetAttach::Tap { name }),
                    tap_fd,
                )
            }
            None => (USER_NET.to_owned(), None, None),
        };
        // A kernel without ACPI gets Firecracker's boot arguments whatever the backend
        // (i8042 probing kept short, reboot through the keyboard controller).
        let boot_args = match devices {
            DeviceDiscovery::CommandLine => crate::vmm::NO_ACPI_BOOT_ARGS,
            DeviceDiscovery::Acpi => backend.boot_args(),
        };
        // User mode: outbound or isolated, and the published ports (a busy one refuses the
        // start before anything runs).
        let (isolated, ports) = self.user_net_for_start(record, lease.is_some()).await?;
        outcome.forwards = self.bind_forwards(record).await?;
        // `/` read-write at once, or (the guest checks it at this boot) read-only until
        // systemd-fsck-root checked it.
        let mut tail = format!("{boot_args} banger.hostname={} {net_args}", record.name);
        let clone = self.clone_boot_args(record).await;
        if let Some(clone) = &clone {
            tail.push(' ');
            tail.push_str(&clone.args);
        }
        if choice.accel == Accel::Tcg {
            // The kernel's check that the timer interrupt arrives through the IO-APIC waits a
            // few ticks by a delay loop; under TCG on a busy host the ticks come late and the
            // kernel panics ("IO-APIC + timer doesn't work!"), as cloud images' VMs avoid.
            tail.push_str(" no_timer_check");
            if let Some(khz) = accel::this_host_tsc_khz() {
                // Without these, TCG guests hang in timer calibration at random, or fall back
                // to a coarse clock because the vCPUs' TSCs look unsynchronised.
                tail.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
            }
        }
        let cmdline_with = |root: &str| format!("console=ttyS0 root=/dev/vda {root} {tail}");
        let cmdline = cmdline_with(if guest_fsck {
            super::fsck::GUEST_ROOT_FSCK
        } else {
            super::fsck::ROOT_RW
        });
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
            work_disk_format: work_format.as_str(),
            runtime_dir,
            console_log: console_log.clone(),
            net: attach.clone().unwrap_or(NetAttach::User {
                ssh_port: 0,
                isolated,
                ports: ports.clone(),
            }),
            mac: mac_for(&record.id),
            // A backend that needs a tap gets the lease's (bridge mode); tests without the
            // helper hand one in through the seam. Without one the launch refuses before
            // spawning (VmmError::NeedsTap).
            tap: match &attach {
                Some(NetAttach::Tap { name }) if caps.needs_tap => Some(name.clone()),
                _ if caps.needs_tap => self.seams.tap.clone(),
                _ => None,
            },
            tap_fd,
            devices,
        };
        crate::fault::point("start.before_launch")?;
        // A guest whose check of `/` repaired it restarts, which ends the VMM: boot it once
        // more, plainly.
        let mut fsck_restarted = false;
        'boot: loop {
            // A port picked free may be taken before QEMU binds it: try a few.
            let mut attempt = 0;
            let process = loop {
                attempt += 1;
                if attach.is_none() {
                    spec.net = NetAttach::User {
                        ssh_port: free_port().map_err(Error::io("cannot pick a port"))?,
                        isolated,
                        ports: ports.clone(),
                    };
                }
                let tried = match restoring {
                    Some(snapshot) => backend.restore(&spec, snapshot).await,
                    None => backend.launch(&spec).await,
                };
                match tried {
                    Ok(process) => break process,
                    Err(e @ VmmError::PortTaken { .. }) if attempt < 3 => {
                        warn!("port was taken, retrying: {e}");
                    }
                    Err(e) if restoring.is_some() => {
                        warn!(vm = %record.name, "cannot restore the snapshot, booting instead: {e}");
                        outcome
                            .warnings
                            .push(cold_boot_warning(&record.name, &e.to_string()));
                        restoring = None;
                        self.remove_snapshot(&record.id);
                        attempt = 0;
                    }
                    Err(e) => return Err(step("launch the VMM")(e.into())),
                }
            };
            crate::fault::vmm_running(&record.id, process.pid);
            if restoring.is_some() {
                info!(vm = %record.name, pid = process.pid, "VM restored from its snapshot");
                outcome.restored = true;
                self.remove_snapshot(&record.id);
                crate::fault::point("start.after_restore")?;
            }
            crate::fault::point("start.after_launch")?;
            let (ssh_host, ssh_port) = match (&spec.net, &lease) {
                (NetAttach::User { ssh_port, .. }, _) => ("127.0.0.1".to_owned(), *ssh_port),
                (NetAttach::Tap { .. }, Some(lease)) => (lease.ip.to_string(), 22),
                (NetAttach::Tap { .. }, None) => ("127.0.0.1".to_owned(), 0),
            };
            undo.process = Some((process.clone(), record.id.clone()));
            if process.jail.is_some() {
                undo.jail = Some(backend.clone());
            }
            record.runtime = Some(VmRuntime {
                vmm: record.spec.vmm,
                accel: choice.accel,
                reason: choice.reason.clone(),
                pid: Some(process.pid),
                ssh_host,
                ssh_port,
                jail: process.jail.as_ref().map(|p| p.display().to_string()),
            });
            // Durable before waiting: a daemon crash now still knows which process to clean up.
            self.db.update_vm(record).await?;
            crate::fault::point("start.after_record")?;
            if let Some(jail) = &process.jail {
                info!(vm = %record.name, jail = %jail.display(), "Firecracker runs in its jail (cgroup set by the jailer)");
            } else if let Some(root) = cgroup::default_root() {
                match cgroup::place(&root, &record.id, process.pid, spec.cpus, spec.memory_mib) {
                    Ok(leaf) => {
                        info!(vm = %record.name, cgroup = %leaf.display(), "VMM placed in its cgroup")
                    }
                    Err(why) => {
                        info!(vm = %record.name, "VMM runs without a cgroup of its own: {why}")
                    }
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
            let waiting = std::time::Instant::now();
            let ready = ssh::wait_ready(&target, limit, &probe, || {
                process::is_alive(process.pid, &id)
            })
            .await;
            match ready {
                Ok(true) => {
                    info!(vm = %record.name, ms = waiting.elapsed().as_millis() as u64, "guest SSH answered");
                    if outcome.restored {
                        self.set_guest_clock(record, &target, outcome).await;
                    } else {
                        let token = clone.as_ref().and_then(|c| c.token.as_deref());
                        self.own_host_key(record, &target, token).await?;
                    }
                    if guest_fsck {
                        self.record_guest_fsck(record, &target, fsck_restarted)
                            .await;
                    }
                    return Ok(());
                }
                Ok(false)
                    if guest_fsck
                        && !fsck_restarted
                        && super::fsck::console_shows_fsck_restart(&read_console(&console_log)) =>
                {
                    info!(vm = %record.name, "the guest's check of / repaired it and restarted the guest; booting it again");
                    fsck_restarted = true;
                    spec.cmdline = cmdline_with(super::fsck::ROOT_RW);
                    record.runtime = None;
                    continue 'boot;
                }
                Ok(false) if outcome.restored => {
                    // Its snapshot is used up (deleted once loaded): the next start boots cold.
                    let reason = self.exit_reason(record, &*backend);
                    return Err(Error::Failed(format!(
                        "VM {}'s VMM ended right after its restore from the snapshot{}; the \
                         VM is stopped and its next start boots it from its disks",
                        record.name,
                        reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    )));
                }
                Ok(false) => {
                    return Err(Error::Failed(match self.exit_reason(record, &*backend) {
                        Some(reason) => format!(
                            "VM {} stopped during boot: {reason}; console: {}",
                            record.name,
                            console_tail(&console_log)
                        ),
                        None => format!(
                            "VM {} stopped during boot: {}",
                            record.name,
                            console_tail(&console_log)
                        ),
                    }));
                }
                Err(e) => {
                    return Err(Error::Failed(format!(
                        "VM {}: {e}; console: {}",
                        record.name,
                        console_tail(&console_log)
                    )));
                }
            }
        }
    }
}

impl Manager {
    /// After a restore the guest's clock stands where it was at suspend: set it to the
    /// host's (over the connection the readiness probe opened, so it lands within a
    /// round trip). A failure is a warning: the guest runs, with a late clock.
    async fn set_guest_clock(
        &self,
        record: &VmRecord,
        target: &ssh::SshTarget,
        outcome: &mut StartOutcome,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let script = format!(
            "date -u -s @{}.{:09} >/dev/null",
            now.as_secs(),
            now.subsec_nanos()
        );
        let set = ssh::run(target, &script, CLOCK_DIAL, CLOCK_LIMIT).await;
        let why = match set {
            Ok((Some(0), _, _)) => return,
            Ok((code, _, stderr)) => format!("exit {code:?}: {}", stderr.trim()),
            Err(e) => e.to_string(),
        };
        warn!(vm = %record.name, "cannot set the guest clock after restore: {why}");
        outcome.warnings.push(format!(
            "cannot set VM {}'s clock after the restore ({why}); it is behind by the time it \
             was suspended",
            record.name
        ));
    }
}

/// Bounds on setting a restored guest's clock.
const CLOCK_DIAL: Duration = Duration::from_secs(5);
const CLOCK_LIMIT: Duration = Duration::from_secs(15);

/// What a start that could not restore a suspended VM says.
fn cold_boot_warning(name: &VmName, why: &str) -> String {
    format!(
        "cannot restore VM {name} from its snapshot ({why}); booted it from its disks instead \
         (the guest was synced before suspend)"
    )
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

/// A console log as text (empty when it cannot be read).
fn read_console(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
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
    pub(super) fn macs_are_stable_and_local() {
        let mac = super::mac_for("0a1b2c3d4e5f");
        assert_eq!(mac, "52:54:00:0a:1b:2c");
    }
}
