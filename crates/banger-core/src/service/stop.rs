//! `vm stop`: `sync` over SSH first (dial bounded), then the guest powers itself off; if it
//! does not, the backend's shutdown signal, its quit, and finally SIGKILL. Also what every end
//! of a VMM process leaves to clean up (runtime dir, cgroup, jail).

use std::time::Duration;

use banger_proto::{LifecycleResult, VmState};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Manager, result};
use crate::Error;
use crate::guest::ssh;
use crate::model::VmRecord;
use crate::vmm::{StopTimings, cgroup, process, stop_sequence};

/// Bound on dialling the guest's SSH server when stopping.
pub(super) const STOP_DIAL: Duration = Duration::from_secs(5);
/// Bound on the `sync` over SSH when stopping.
pub(super) const STOP_SYNC: Duration = Duration::from_secs(60);
/// How long to wait after an ACPI power-button press, and after QMP `quit`.
const ACPI_GRACE: Duration = Duration::from_secs(10);
pub(super) const QUIT_GRACE: Duration = Duration::from_secs(5);

impl Manager {
    /// Stops a VM without losing data: `sync` over SSH first (dial bounded), then the guest
    /// powers itself off; if it does not, ACPI power button, QMP quit, and finally SIGKILL.
    /// `force` skips the graceful power-off but still tries the bounded `sync`.
    pub async fn stop_vm(&self, name: &str, force: bool) -> Result<LifecycleResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let mut record = self.observed_vm(name).await?;
        let pid = record.runtime.as_ref().and_then(|r| r.pid);
        let live_pid = pid.filter(|pid| process::is_alive(*pid, &record.id));
        let Some(pid) = live_pid else {
            if record.state == VmState::Error {
                self.transition(&mut record, VmState::Stopped).await?;
            }
            return Ok(result(record.to_api(), false));
        };
        let maybe_paused = record.state != VmState::Running;
        if record.state != VmState::Stopping {
            self.transition(&mut record, VmState::Stopping).await?;
        }
        crate::fault::point("stop.after_stopping")?;
        let method = self.stop_process(&record, pid, force, maybe_paused).await;
        crate::fault::point("stop.after_process")?;
        self.release_runtime_now(&record).await;
        crate::fault::point("stop.after_release")?;
        record.clear_process();
        record.record_stop(super::fsck::stop_kind(method), method);
        record.last_error = None;
        self.transition(&mut record, VmState::Stopped).await?;
        info!(vm = %name, method, "VM stopped");
        Ok(LifecycleResult {
            stop_method: Some(method.into()),
            ..result(record.to_api(), true)
        })
    }

    /// The stop sequence on a live VMM process; returns how it ended. `maybe_paused`: ask the
    /// VMM whether it is paused and resume it first.
    pub(super) async fn stop_process(
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
        // 1. What makes data safe: flush the guest's page cache to its disks; unless forced,
        // the guest then ends the VMM by itself the way its backend needs.
        // A kernel without ACPI cannot power the VM off; its reboot ends the VMM.
        let script = if force {
            "sync"
        } else if self.kernel_takes_devices_on_cmdline(record).await {
            super::kernels::REBOOT_STOP_SCRIPT
        } else {
            vmm.guest_stop_script()
        };
        // Dialled directly: STOP_DIAL then bounds a hung guest (not so through a master).
        let synced = match self.ssh_target(record) {
            Ok(target) => match ssh::run(&target.direct(), script, STOP_DIAL, STOP_SYNC).await {
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
        stop_sequence(vmm.as_ref(), &control, marker, synced, force, timings).await
    }

    /// Removes a stopped VM's transient state: the daemon's listeners of its published
    /// ports, its runtime dir, its cgroup leaf and its jail. The jail goes through the helper on the blocking pool; the returned task ends
    /// when it is gone (`None`: no jail).
    pub(super) fn release_runtime(&self, record: &VmRecord) -> Option<JoinHandle<()>> {
        let vm_id = record.id.as_str();
        self.forwards.close_vm(vm_id);
        let _ = std::fs::remove_dir_all(self.layout.vm_runtime_dir(vm_id));
        if let Some(root) = cgroup::default_root() {
            cgroup::remove(&root, vm_id);
        }
        if record.runtime.as_ref().is_none_or(|r| r.jail.is_none()) {
            return None;
        }
        // A helper call (up to a minute when the helper hangs): on the blocking pool, never
        // on the async worker that runs this operation (or `vm ls`).
        let backend = self.backend(record);
        let (id, name) = (record.id.clone(), record.name.clone());
        let op_id = crate::net::current_op_id();
        Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = backend.remove_jail(&op_id, &id) {
                warn!(vm = %name, "{e}");
            }
        }))
    }

    /// [`Self::release_runtime`], waiting for the jail to be gone.
    pub(super) async fn release_runtime_now(&self, record: &VmRecord) {
        if let Some(removal) = self.release_runtime(record) {
            let _ = removal.await;
        }
    }
}
