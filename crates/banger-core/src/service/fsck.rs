//! How a VMM ended, and what a VM's disks need before the next start. A stop is clean when
//! the guest shut itself down (power-off after `sync`, the ACPI button, Ctrl-Alt-Del, or a
//! power-off or reboot the guest's console shows) and unclean when the VMM ended under a
//! running guest (QMP quit, SIGKILL, a crash, a host crash, a failed start). Before the next
//! start of an unclean VM, `e2fsck -p` runs on the work disk and on a system disk the host
//! can open as ext4 (raw: reflink or copy; a dm device); a qcow2 system disk is left to the
//! guest kernel, which replays its journal when it mounts `/`. A VM that never ran, or is
//! restored from a suspend snapshot, is never checked. What `e2fsck -p` cannot repair stops
//! the start with its output. A work filesystem left smaller than its grown file by
//! `vm set --disk` is grown here too.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use banger_proto::{DiskFsck, FsckResult, StartFsck, StopKind};
use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::domain::{DiskFormat, SystemDiskStrategy};
use crate::e2fs;
use crate::model::VmRecord;
use crate::vmm::VmDisk;

/// How much of the end of a console log is read to see how the guest ended.
const CONSOLE_TAIL: u64 = 256 << 10;

/// How a `vm stop` method (what ended the VMM) leaves the disks: the guest's own shutdown
/// unmounted them; QMP quit and SIGKILL (also after a `sync`) did not.
pub(super) fn stop_kind(method: &str) -> StopKind {
    match method {
        "poweroff" | "acpi" | "ctrl-alt-del" => StopKind::Clean,
        _ => StopKind::Unclean,
    }
}

/// Whether the console of the guest's last boot shows it shutting down: the kernel's last
/// words on a power-off or a reboot after the last boot banner, and no panic since. A guest
/// can print anything on its console; one that fakes this only skips a check of its own
/// disks.
pub(super) fn console_shows_shutdown(console: &str) -> bool {
    let boot = console
        .rfind("Linux version ")
        .map_or(console, |at| &console[at..]);
    !boot.contains("Kernel panic")
        && (boot.contains("reboot: Power down") || boot.contains("reboot: Restarting system"))
}

/// The last [`CONSOLE_TAIL`] bytes of a console log (empty when it cannot be read).
fn console_tail(path: &Path) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    read()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Whether the host can check a system disk made by `strategy` with e2fsck, or why not.
pub(super) fn host_checks_system_disk(strategy: SystemDiskStrategy) -> Result<(), &'static str> {
    match strategy {
        SystemDiskStrategy::Reflink | SystemDiskStrategy::Copy | SystemDiskStrategy::DmSnapshot => {
            Ok(())
        }
        SystemDiskStrategy::Qcow2 => Err(
            "a qcow2 overlay, which e2fsck cannot open; the guest kernel replays its journal when it mounts /",
        ),
    }
}

/// Whether the host can check a work disk in `format` with e2fsck, or why not.
pub(super) fn host_checks_work_disk(format: DiskFormat) -> Result<(), &'static str> {
    match format {
        DiskFormat::Raw => Ok(()),
        DiskFormat::Qcow2 => Err(
            "a qcow2 overlay over a named snapshot, which e2fsck cannot open; the guest kernel replays its journal when it mounts /root",
        ),
    }
}

impl Manager {
    /// How the VMM of `record` ended when the daemon found it gone without having stopped it
    /// itself: clean when the guest's console shows it shutting down, else unclean.
    pub(super) fn found_stopped(&self, record: &VmRecord) -> (StopKind, &'static str) {
        let console = console_tail(&self.layout.vm_console_log(&record.id));
        if console_shows_shutdown(&console) {
            (StopKind::Clean, "the guest shut down by itself")
        } else {
            (
                StopKind::Unclean,
                "the VMM ended without the guest shutting down (killed, crashed, or the host went down)",
            )
        }
    }

    /// Before a start: after an unclean stop, `e2fsck -p` on the disks the host can check
    /// (the start is refused with e2fsck's output when it cannot repair one); then a work
    /// filesystem still to grow into its file is grown. Nothing is touched when `restoring` (a
    /// guest restored from its snapshot has its filesystems mounted in memory). Records what
    /// it did in `record.start_fsck`; returns warnings for the start's result.
    pub(super) async fn check_disks_before_start(
        &self,
        record: &mut VmRecord,
        system_disk: &Path,
        work_disk: &Path,
        work_format: DiskFormat,
        restoring: bool,
    ) -> Result<Vec<String>, Error> {
        let name = record.name.to_string();
        let step = |source: crate::disk::DiskError| Error::StepFailed {
            step: format!("cannot start VM {name}: check its disks"),
            source: Box::new(source.into()),
        };
        let mut report = StartFsck {
            at: crate::now_rfc3339(),
            ran: false,
            why: String::new(),
            disks: Vec::new(),
        };
        if restoring {
            report.why = "restored from its suspend snapshot (its filesystems stay mounted in the guest's memory)".into();
            record.start_fsck = Some(report);
            return Ok(Vec::new());
        }
        match &record.last_stop {
            None => report.why = "no stop recorded: the disks are as created".into(),
            Some(stop) if stop.kind == StopKind::Clean => {
                report.why = format!("the last stop was clean ({})", stop.how);
            }
            Some(stop) => {
                report.why = format!("the last stop was unclean ({})", stop.how);
                report.ran = true;
                let system = host_checks_system_disk(record.spec.system_disk);
                let work = host_checks_work_disk(work_format);
                for (disk, path) in [(VmDisk::Work, work_disk), (VmDisk::System, system_disk)] {
                    let check = match disk {
                        VmDisk::System => system,
                        VmDisk::Work => work,
                    };
                    if let Err(why) = check {
                        info!(vm = %name, disk = disk.as_str(), "no e2fsck on the host: {why}");
                        report.disks.push(DiskFsck {
                            disk: disk.as_str().into(),
                            result: FsckResult::Skipped,
                            exit_code: None,
                            detail: why.into(),
                        });
                        continue;
                    }
                    let run = e2fs::fsck(path, false).await.map_err(step)?;
                    let result = run.fsck_result();
                    info!(vm = %name, disk = disk.as_str(), exit_code = run.exit_code, result = result.as_str(), output = ?run.tail(8), "e2fsck -p before start: {}", report.why);
                    report.disks.push(DiskFsck {
                        disk: disk.as_str().into(),
                        result,
                        exit_code: Some(run.exit_code),
                        detail: run.last_line(),
                    });
                    if result == FsckResult::Failed {
                        record.start_fsck = Some(report);
                        return Err(Error::DiskCheck {
                            message: format!(
                                "cannot start VM {name}: e2fsck -p cannot repair its {} disk by itself (exit {}): {}",
                                disk.as_str(),
                                run.exit_code,
                                run.tail(6)
                            ),
                            hint: format!(
                                "the VM stays stopped; repair the disk by hand with `e2fsck -f {}` (answering its questions), then start it again",
                                path.display()
                            ),
                        });
                    }
                }
            }
        }
        if !report.ran {
            info!(vm = %name, "no e2fsck before start: {}", report.why);
        }
        record.start_fsck = Some(report);
        let mut warnings = Vec::new();
        if record.grow_work_fs && work_format != DiskFormat::Raw {
            info!(vm = %name, "the work filesystem still has to grow; the host cannot grow a qcow2 overlay's");
            warnings.push(format!(
                "the work filesystem of VM {name} is smaller than its disk; grow it in the guest with `resize2fs` on /root's device"
            ));
        } else if record.grow_work_fs {
            match e2fs::check_and_grow(work_disk).await {
                Ok(()) => {
                    record.grow_work_fs = false;
                    self.db.update_spec(record).await?;
                    info!(vm = %name, "work filesystem grown to fill its disk");
                }
                Err(e) => {
                    warn!(vm = %name, "cannot grow the work filesystem: {e}");
                    warnings.push(format!(
                        "cannot grow the work filesystem of VM {name} to its disk ({e}); /root keeps its old size until the next start"
                    ));
                }
            }
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_guests_own_shutdown_is_clean() {
        for clean in ["poweroff", "acpi", "ctrl-alt-del"] {
            assert_eq!(stop_kind(clean), StopKind::Clean, "{clean}");
        }
        for unclean in ["quit", "kill", "something new"] {
            assert_eq!(stop_kind(unclean), StopKind::Unclean, "{unclean}");
        }
    }

    #[test]
    fn the_console_of_the_last_boot_tells_a_shutdown_from_a_kill() {
        let boot = "[    0.000000] Linux version 6.1.0-40-cloud-amd64\n[    3.1] systemd[1]: ...\n";
        assert!(!console_shows_shutdown(boot));
        assert!(console_shows_shutdown(&format!(
            "{boot}[   80.2] systemd-shutdown[1]: Powering off.\n[   80.3] reboot: Power down\n"
        )));
        assert!(console_shows_shutdown(&format!(
            "{boot}[   80.3] reboot: Restarting system\n"
        )));
        // A panic is not a shutdown, even when the kernel restarts after it.
        assert!(!console_shows_shutdown(&format!(
            "{boot}Kernel panic - not syncing: Attempted to kill init!\nreboot: Restarting system\n"
        )));
        // Only the last boot counts: an earlier power-off says nothing of this one.
        assert!(!console_shows_shutdown(&format!(
            "{boot}reboot: Power down\n{boot}[ 5.0] still running\n"
        )));
        assert!(!console_shows_shutdown(""));
    }

    #[test]
    fn the_host_checks_raw_work_disks_only() {
        assert!(host_checks_work_disk(DiskFormat::Raw).is_ok());
        assert!(host_checks_work_disk(DiskFormat::Qcow2).is_err());
    }

    #[test]
    fn the_host_checks_raw_system_disks_only() {
        assert!(host_checks_system_disk(SystemDiskStrategy::Qcow2).is_err());
        for raw in [
            SystemDiskStrategy::Reflink,
            SystemDiskStrategy::Copy,
            SystemDiskStrategy::DmSnapshot,
        ] {
            assert!(host_checks_system_disk(raw).is_ok(), "{raw}");
        }
    }
}
