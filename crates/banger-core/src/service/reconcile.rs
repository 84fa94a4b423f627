//! After a daemon (re)start: live VMs are kept (paused or not as their VMM says); VMs caught
//! mid-operation or whose VMM died are cleaned up and marked stopped.

use std::time::Duration;

use banger_proto::{StopKind, VmState};
use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::model::{VmRecord, has_process};
use crate::vmm::{VmBackend, VmProcess, process};

impl Manager {
    /// After a daemon (re)start: running and paused VMs whose VMM lives are kept (paused or
    /// not as the VMM itself says); VMs caught mid-start, mid-stop or mid-suspend, or whose
    /// VMM died, are cleaned up and marked stopped.
    pub async fn reconcile(&self) -> Result<(), Error> {
        let records = self.db.list_vms().await?;
        for mut record in records {
            if !matches!(
                record.state,
                VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
            ) {
                continue;
            }
            let _vm = self.locked(record.name.as_str()).await?;
            let pid = record.runtime.as_ref().and_then(|r| r.pid);
            let alive = pid.is_some_and(|pid| process::is_alive(pid, &record.id));
            if let Some(pid) = pid.filter(|_| alive && has_process(record.state)) {
                self.reattach(&mut record, pid).await?;
                continue;
            }
            // How the VMM ended, for the next start's disk check.
            let mut ended = None;
            if let Some(pid) = pid.filter(|_| alive) {
                warn!(vm = %record.name, state = %record.state, "VM was mid-operation when the daemon died; stopping it");
                let method = self.stop_process(&record, pid, true, true).await;
                ended = Some((
                    super::fsck::stop_kind(method),
                    "stopped at daemon start, mid-operation",
                ));
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
                        ended = Some((StopKind::Unclean, "the daemon died during its start"));
                    }
                }
                if pid.is_some() {
                    ended = Some((StopKind::Unclean, "the daemon died during its start"));
                }
                // A jail made before the daemon recorded it: removal is idempotent.
                self.remove_jail(&record).await;
            }
            self.release_runtime_now(&record).await;
            let (kind, how) = ended.unwrap_or_else(|| self.found_stopped(&record));
            if ended.is_some() || record.state != VmState::Starting {
                record.record_stop(kind, how);
            }
            record.clear_process();
            if matches!(record.state, VmState::Stopping | VmState::Starting) {
                // A suspend may have been cut short (its snapshot cannot be trusted), or a
                // start may have loaded the snapshot and run the guest on (its disks moved
                // on). The guest was synced before the snapshot, so its disks hold its data.
                self.remove_snapshot(&record.id);
            }
            let died_running = has_process(record.state) && !alive && pid.is_some();
            if has_process(record.state) {
                record.state = VmState::Stopping;
            }
            if record.state == VmState::Starting {
                record.last_error = Some("the daemon stopped during start".into());
            } else if died_running {
                // It died while the daemon was away: say why, when the VMM left a reason.
                if let Some(reason) = self.exit_reason(&record, &*self.backend(&record)) {
                    record.last_error = Some(format!(
                        "the VM stopped while the daemon was down: {reason}"
                    ));
                }
            }
            self.transition(&mut record, VmState::Stopped).await?;
            info!(vm = %record.name, "VM marked stopped after daemon restart");
        }
        Ok(())
    }

    /// Keeps a live VM after a daemon restart, recording whether it is paused as its VMM
    /// reports (the daemon may have died between the VMM's pause or resume and its record).
    pub(super) async fn reattach(&self, record: &mut VmRecord, pid: u32) -> Result<(), Error> {
        let (vmm, control) = self.control(record, pid);
        self.follow_vmm_pause(record, &*vmm, &control).await?;
        info!(vm = %record.name, pid, state = %record.state, "reattached to VM");
        self.reopen_forwards(record).await;
        Ok(())
    }

    /// Records the live VM `record` paused or running as its VMM says (unchanged when the VMM
    /// does not answer).
    pub(super) async fn follow_vmm_pause(
        &self,
        record: &mut VmRecord,
        vmm: &dyn VmBackend,
        control: &VmProcess,
    ) -> Result<(), Error> {
        let observed = match vmm.is_paused(control).await {
            Ok(true) => VmState::Paused,
            Ok(false) => VmState::Running,
            Err(e) => {
                warn!(vm = %record.name, "cannot ask the VMM whether it is paused: {e}");
                record.state
            }
        };
        if observed != record.state {
            info!(vm = %record.name, recorded = %record.state, observed = %observed, "VMM state differs from the record; following the VMM");
            self.transition(record, observed).await?;
        }
        Ok(())
    }
}
