//! How a VMM ended, and what a VM's disks need before the next start. A stop is clean when
//! the guest shut itself down (power-off after `sync`, the ACPI button, Ctrl-Alt-Del, or a
//! power-off or reboot the guest's console shows) and unclean when the VMM ended under a
//! running guest (QMP quit, SIGKILL, a crash, a host crash, a failed start). Before the next
//! start of an unclean VM, `e2fsck -p` runs on both disks: a raw one (reflink, copy, a dm
//! device) as it is, a qcow2 one through a raw view ([`crate::disk_view`]). A qcow2 system
//! disk with no view (no usable FUSE, or `qemu.check_qcow2_on_host` off) is checked by the
//! guest itself: that boot mounts `/` read-only and asks
//! systemd-fsck-root for a forced, repairing check before systemd-remount-fs makes it
//! read-write ([`GUEST_ROOT_FSCK`]); once the guest is up the daemon reads the check's result
//! over SSH ([`GUEST_FSCK_SCRIPT`]). A check that repaired the mounted `/` makes the guest
//! restart, which ends the VMM (`-no-reboot`): the start then boots once more, plainly. A VM
//! that never ran, or is restored from a suspend snapshot, is never checked. What
//! `e2fsck -p` cannot repair stops the start with its output. A work filesystem left smaller
//! than its grown file by `vm set --disk` is grown here too.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use banger_proto::{DiskFsck, FsckBy, FsckResult, StartFsck, StopKind, StopMethod};
use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::domain::{DiskFormat, SystemDiskStrategy};
use crate::e2fs;
use crate::model::VmRecord;
use crate::vmm::VmDisk;

/// How much of the end of a console log is read to see how the guest ended.
const CONSOLE_TAIL: u64 = 256 << 10;

/// Kernel command line words for a boot that mounts `/` read-write at once (every boot but
/// one that checks `/`).
pub(super) const ROOT_RW: &str = "rw";

/// Kernel command line words for a boot in which the guest checks `/` before using it: the
/// initrd (or the kernel) mounts it read-only; systemd-fsck-root runs a forced check that
/// repairs what it finds (`fsck -y -f`); systemd-remount-fs then remounts `/` read-write. An
/// image with `/` in its fstab has both units already; for one without (banger's), the
/// command line pulls in the check (`systemd.wants=`) and tells systemd-remount-fs to make
/// `/` read-write (`$SYSTEMD_REMOUNT_ROOT_RW`, which that boot's processes see in their
/// environment).
pub(super) const GUEST_ROOT_FSCK: &str = "ro fsck.mode=force fsck.repair=yes \
     systemd.wants=systemd-fsck-root.service systemd.setenv=SYSTEMD_REMOUNT_ROOT_RW=1";

/// What the guest reports of its boot's check of `/` (one `key=value` a line, read by
/// [`parse_guest_fsck`]): the unit's state from systemd, whether fsck said it corrected
/// errors (systemd-fsck leaves `/run/systemd/quotacheck` then), the options `/` is mounted
/// with, and the check's last log lines.
pub(super) const GUEST_FSCK_SCRIPT: &str = "\
systemctl show -p ConditionResult -p ExecMainStartTimestampMonotonic -p ExecMainStatus \
 -p Result systemd-fsck-root.service 2>/dev/null
if test -e /run/systemd/quotacheck; then echo Corrected=yes; fi
awk '$2 == \"/\" { o = $4 } END { print \"RootOptions=\" o }' /proc/mounts
journalctl -b -o cat --no-pager -u systemd-fsck-root.service 2>/dev/null | tail -n 3 | sed 's/^/Log=/'
exit 0";

/// The guest's check of `/` at boot as [`GUEST_FSCK_SCRIPT`] reported it: the result, a
/// detail for `vm show`, and whether the image kept the guest contract (when not, why: a
/// warning for the daemon's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GuestFsck {
    pub result: FsckResult,
    pub exit_code: Option<i32>,
    pub detail: String,
    pub contract: Result<(), String>,
}

/// Reads [`GUEST_FSCK_SCRIPT`]'s output.
pub(super) fn parse_guest_fsck(output: &str) -> GuestFsck {
    let value = |key: &str| {
        output
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .next_back()
            .map(str::trim)
    };
    let log: Vec<&str> = output
        .lines()
        .filter_map(|l| l.strip_prefix("Log="))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let last_log = log.last().copied().unwrap_or_default().to_owned();
    let rw = value("RootOptions").is_some_and(|o| o.split(',').any(|opt| opt == "rw"));
    let not_checked = |why: String| GuestFsck {
        result: FsckResult::Skipped,
        exit_code: None,
        detail: why.clone(),
        contract: Err(why),
    };
    let ran = value("ExecMainStartTimestampMonotonic").is_some_and(|t| t != "0" && !t.is_empty());
    if value("ConditionResult") == Some("no") {
        return not_checked(
            "the guest did not check / at boot: it was read-write before systemd-fsck-root ran \
             (the image's initrd or fstab mounts it rw)"
                .into(),
        );
    }
    if !ran {
        return not_checked(
            "the guest did not check / at boot: systemd-fsck-root.service did not run \
             (the image lacks it, or has no systemd)"
                .into(),
        );
    }
    if log.iter().any(|l| {
        l.contains("doesn't exist, not checking") || l.contains("does not exist, not checking")
    }) {
        return not_checked(format!("the guest did not check / at boot: {last_log}"));
    }
    let exit_code = value("ExecMainStatus").and_then(|c| c.parse::<i32>().ok());
    let success = value("Result") == Some("success") && exit_code == Some(0);
    let result = match (success, value("Corrected") == Some("yes")) {
        (false, _) => FsckResult::Failed,
        (true, true) => FsckResult::Repaired,
        (true, false) => FsckResult::Clean,
    };
    let contract = if rw {
        Ok(())
    } else {
        Err("/ is still read-only after the guest's check (the image does not remount it read-write: add / to its fstab)".into())
    };
    GuestFsck {
        result,
        exit_code,
        detail: if last_log.is_empty() {
            "checked by the guest at boot".into()
        } else {
            format!("checked by the guest at boot: {last_log}")
        },
        contract,
    }
}

/// Whether a guest booted with [`GUEST_ROOT_FSCK`] ended its boot by restarting after the
/// check (what systemd-fsck asks for once e2fsck repaired a mounted `/`): the console of
/// that boot shows the check and a restart, and no panic.
pub(super) fn console_shows_fsck_restart(console: &str) -> bool {
    let boot = console
        .rfind("Linux version ")
        .map_or(console, |at| &console[at..]);
    boot.contains("systemd-fsck-root")
        && boot.contains("reboot: Restarting system")
        && !boot.contains("Kernel panic")
}
/// How a `vm stop` method (what ended the VMM) leaves the disks: the guest's own shutdown
/// unmounted them; QMP quit and SIGKILL (also after a `sync`) did not.
pub(super) fn stop_kind(method: StopMethod) -> StopKind {
    if method.guest_shut_down() {
        StopKind::Clean
    } else {
        StopKind::Unclean
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

/// How the host's e2fsck reaches a disk: the file itself (raw), or a raw view of a qcow2
/// chain ([`crate::disk_view::RawView`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HostAccess {
    Direct,
    Qcow2View,
}

/// How the host reaches a system disk made by `strategy`.
pub(super) fn system_disk_access(strategy: SystemDiskStrategy) -> HostAccess {
    match strategy {
        SystemDiskStrategy::Reflink | SystemDiskStrategy::Copy | SystemDiskStrategy::DmSnapshot => {
            HostAccess::Direct
        }
        SystemDiskStrategy::Qcow2 => HostAccess::Qcow2View,
    }
}

/// How the host reaches a work disk in `format`.
pub(super) fn work_disk_access(format: DiskFormat) -> HostAccess {
    match format {
        DiskFormat::Raw => HostAccess::Direct,
        DiskFormat::Qcow2 => HostAccess::Qcow2View,
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
    /// it did in `record.start_fsck`; returns warnings for the start's result and whether the
    /// guest is to check `/` at this boot (a system disk the host cannot check).
    pub(super) async fn check_disks_before_start(
        &self,
        record: &mut VmRecord,
        system_disk: &Path,
        work_disk: &Path,
        work_format: DiskFormat,
        restoring: bool,
    ) -> Result<DiskCheck, Error> {
        let mut checked = DiskCheck::default();
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
            return Ok(checked);
        }
        match &record.last_stop {
            None => report.why = "no stop recorded: the disks are as created".into(),
            Some(stop) if stop.kind == StopKind::Clean => {
                report.why = format!("the last stop was clean ({})", stop.how);
            }
            Some(stop) => {
                report.why = format!("the last stop was unclean ({})", stop.how);
                report.ran = true;
                let system = system_disk_access(record.spec.system_disk);
                let work = work_disk_access(work_format);
                for (disk, path) in [(VmDisk::Work, work_disk), (VmDisk::System, system_disk)] {
                    let access = match disk {
                        VmDisk::System => system,
                        VmDisk::Work => work,
                    };
                    let view = match access {
                        HostAccess::Direct => None,
                        HostAccess::Qcow2View => match self.disk_view(record, disk, path).await {
                            Ok(view) => Some(view),
                            Err(why) => {
                                let guest_root = matches!(disk, VmDisk::System);
                                let detail = if guest_root {
                                    info!(vm = %name, disk = disk.as_str(), "no e2fsck on the host ({why}): the guest checks / at this boot");
                                    format!(
                                        "{why}; left to the guest's check of / at boot, whose result the start did not get"
                                    )
                                } else {
                                    info!(vm = %name, disk = disk.as_str(), "no e2fsck on the host: {why}");
                                    format!(
                                        "{why}; the guest kernel replays its journal when it mounts /root"
                                    )
                                };
                                report.disks.push(DiskFsck {
                                    disk: disk.as_str().into(),
                                    result: FsckResult::Skipped,
                                    checked_by: FsckBy::Guest,
                                    exit_code: None,
                                    detail,
                                });
                                checked.guest_checks_root |= guest_root;
                                continue;
                            }
                        },
                    };
                    let run = match &view {
                        Some(view) => e2fs::fsck(view.path(), false).await,
                        None => e2fs::fsck(path, false).await,
                    };
                    if let Some(view) = view {
                        view.close().await;
                    }
                    let run = run.map_err(step)?;
                    let result = run.fsck_result();
                    info!(vm = %name, disk = disk.as_str(), exit_code = run.exit_code, result = result.as_str(), output = ?run.tail(8), "e2fsck -p before start: {}", report.why);
                    report.disks.push(DiskFsck {
                        disk: disk.as_str().into(),
                        result,
                        checked_by: FsckBy::Host,
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
                            hint: match access {
                                HostAccess::Direct => format!(
                                    "the VM stays stopped; repair the disk by hand with `e2fsck -f {}` (answering its questions), then start it again",
                                    path.display()
                                ),
                                HostAccess::Qcow2View => format!(
                                    "the VM stays stopped; repair the disk by hand with `e2fsck -f` on a raw view of {} (docs/config.md, check_qcow2_on_host), then start it again",
                                    path.display()
                                ),
                            },
                        });
                    }
                }
            }
        }
        if !report.ran {
            info!(vm = %name, "no e2fsck before start: {}", report.why);
        }
        record.start_fsck = Some(report);
        let warnings = &mut checked.warnings;
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
        Ok(checked)
    }

    /// A raw view of the qcow2 `disk` of `record` at `path` for the host's e2fsck, or why
    /// there is none.
    async fn disk_view(
        &self,
        record: &VmRecord,
        disk: VmDisk,
        path: &Path,
    ) -> Result<crate::disk_view::RawView, String> {
        if !self.config.qemu.check_qcow2_on_host {
            return Err("a qcow2 overlay, and qemu.check_qcow2_on_host is off".into());
        }
        let mountpoint = self.layout.vm_disk_view(&record.id, disk.as_str());
        crate::disk_view::RawView::open(path, &mountpoint)
            .await
            .map_err(|e| format!("a qcow2 overlay with no raw view for e2fsck ({e})"))
    }

    /// After a boot with [`GUEST_ROOT_FSCK`]: reads the guest's check of `/` over SSH and
    /// records it as the system disk's entry of `record.start_fsck` (`restarted`: the guest
    /// restarted after its check repaired `/`, and this is the boot after). Logs it; an image
    /// that did not check `/` (or left it read-only) gets a warning in the log, not a failed
    /// start.
    pub(super) async fn record_guest_fsck(
        &self,
        record: &mut VmRecord,
        target: &crate::guest::ssh::SshTarget,
        restarted: bool,
    ) {
        let name = record.name.to_string();
        let read =
            crate::guest::ssh::run(target, GUEST_FSCK_SCRIPT, GUEST_FSCK_DIAL, GUEST_FSCK_LIMIT)
                .await;
        let mut found = match read {
            Ok((Some(0), stdout, _)) => parse_guest_fsck(&stdout),
            Ok((code, _, stderr)) => GuestFsck {
                result: FsckResult::Skipped,
                exit_code: None,
                detail: format!(
                    "cannot read the guest's check of / (exit {code:?}): {}",
                    stderr.trim()
                ),
                contract: Ok(()),
            },
            Err(e) => GuestFsck {
                result: FsckResult::Skipped,
                exit_code: None,
                detail: format!("cannot read the guest's check of /: {e}"),
                contract: Ok(()),
            },
        };
        if restarted {
            // The boot that checked `/` repaired it and restarted; this boot did not check
            // (it mounted `/` read-write at once), and the image kept the contract.
            found.result = FsckResult::Repaired;
            found.exit_code = None;
            found.contract = Ok(());
            found.detail = "checked by the guest at boot: repaired, then the guest restarted \
                 (as fsck asks after repairing a mounted /) and booted again"
                .into();
        }
        if found.result == FsckResult::Skipped {
            warn!(vm = %name, disk = "system", "system disk: not checked by the guest at boot: {}", found.detail);
        } else {
            info!(vm = %name, disk = "system", result = found.result.as_str(), "system disk: checked by the guest at boot: {} ({})", found.result.as_str(), found.detail);
        }
        if let Err(why) = &found.contract {
            warn!(vm = %name, disk = "system", "the image does not keep the guest contract for a boot fsck of /: {why}");
        }
        let entry = DiskFsck {
            disk: VmDisk::System.as_str().into(),
            result: found.result,
            checked_by: FsckBy::Guest,
            exit_code: found.exit_code,
            detail: found.detail,
        };
        if let Some(report) = record.start_fsck.as_mut() {
            match report
                .disks
                .iter_mut()
                .find(|d| d.disk == VmDisk::System.as_str())
            {
                Some(disk) => *disk = entry,
                None => report.disks.push(entry),
            }
        }
    }
}

/// Bounds on reading the guest's check of `/` once it is up.
const GUEST_FSCK_DIAL: std::time::Duration = std::time::Duration::from_secs(10);
const GUEST_FSCK_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What [`Manager::check_disks_before_start`] leaves to the start.
#[derive(Debug, Default)]
pub(super) struct DiskCheck {
    /// For the start's result.
    pub warnings: Vec<String>,
    /// The guest checks `/` at this boot ([`GUEST_ROOT_FSCK`]).
    pub guest_checks_root: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_guests_own_shutdown_is_clean() {
        for clean in [
            StopMethod::Poweroff,
            StopMethod::Acpi,
            StopMethod::CtrlAltDel,
        ] {
            assert_eq!(stop_kind(clean), StopKind::Clean, "{clean}");
        }
        for unclean in [StopMethod::Quit, StopMethod::Kill] {
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

    const UNIT_RAN: &str = "ConditionResult=yes\nExecMainStartTimestampMonotonic=5296444\n\
                            ExecMainStatus=0\nResult=success\n";

    #[test]
    fn the_guests_check_of_root_is_read_from_systemd_and_its_log() {
        let clean = parse_guest_fsck(&format!(
            "{UNIT_RAN}RootOptions=rw,relatime\nLog=Pass 5: Checking group summary information\n\
             Log=banger-root: 11641/31488 files (0.1% non-contiguous), 98201/127232 blocks\n"
        ));
        assert_eq!(clean.result, FsckResult::Clean);
        assert_eq!(clean.exit_code, Some(0));
        assert!(
            clean.detail.contains("11641/31488 files"),
            "{}",
            clean.detail
        );
        assert_eq!(clean.contract, Ok(()));

        let repaired = parse_guest_fsck(&format!("{UNIT_RAN}Corrected=yes\nRootOptions=rw\n"));
        assert_eq!(repaired.result, FsckResult::Repaired);

        let failed = parse_guest_fsck(
            "ConditionResult=yes\nExecMainStartTimestampMonotonic=9\nExecMainStatus=1\n\
             Result=exit-code\nRootOptions=rw\nLog=fsck failed with exit status 4.\n",
        );
        assert_eq!(failed.result, FsckResult::Failed);
        assert_eq!(failed.exit_code, Some(1));

        // `/` left read-only: the check counts, the image breaks the contract.
        let ro = parse_guest_fsck(&format!("{UNIT_RAN}RootOptions=ro,relatime\n"));
        assert_eq!(ro.result, FsckResult::Clean);
        assert!(ro.contract.is_err());
    }

    #[test]
    fn an_image_that_did_not_check_root_is_skipped_with_a_reason() {
        for (output, says) in [
            (
                "ConditionResult=no\nExecMainStartTimestampMonotonic=0\nRootOptions=rw\n",
                "read-write before",
            ),
            (
                "ExecMainStartTimestampMonotonic=0\nRootOptions=rw\n",
                "did not run",
            ),
            ("", "did not run"),
            (
                &format!(
                    "{UNIT_RAN}RootOptions=rw\nLog=fsck.ext4 doesn't exist, not checking file system.\n"
                ),
                "doesn't exist",
            ),
        ] {
            let found = parse_guest_fsck(output);
            assert_eq!(found.result, FsckResult::Skipped, "{output}");
            assert!(found.detail.contains(says), "{output}: {}", found.detail);
            assert!(found.contract.is_err(), "{output}");
        }
    }

    #[test]
    fn a_restart_after_the_guests_check_is_told_from_a_panic() {
        let boot = "[    0.000000] Linux version 6.1.0-40-cloud-amd64\n";
        let check = "Starting systemd-fsck-root.service - File System Check on Root Device...\n";
        assert!(console_shows_fsck_restart(&format!(
            "{boot}{check}Reached target reboot.target\n[ 10.7] reboot: Restarting system\n"
        )));
        assert!(!console_shows_fsck_restart(&format!(
            "{boot}{check}Kernel panic - not syncing\nreboot: Restarting system\n"
        )));
        assert!(!console_shows_fsck_restart(&format!(
            "{boot}reboot: Restarting system\n"
        )));
        // The check and restart of an earlier boot say nothing of the last one.
        assert!(!console_shows_fsck_restart(&format!(
            "{boot}{check}reboot: Restarting system\n{boot}still booting\n"
        )));
    }

    #[test]
    fn a_guest_check_boot_mounts_root_read_only_and_asks_for_the_check() {
        let words: Vec<&str> = GUEST_ROOT_FSCK.split_whitespace().collect();
        assert_eq!(words[0], "ro");
        for word in [
            "fsck.mode=force",
            "fsck.repair=yes",
            "systemd.wants=systemd-fsck-root.service",
            "systemd.setenv=SYSTEMD_REMOUNT_ROOT_RW=1",
        ] {
            assert!(words.contains(&word), "{GUEST_ROOT_FSCK}");
        }
        assert!(!words.contains(&"rw"));
        assert_eq!(ROOT_RW, "rw");
    }

    #[test]
    fn the_host_reaches_raw_disks_directly_and_qcow2_ones_through_a_view() {
        assert_eq!(work_disk_access(DiskFormat::Raw), HostAccess::Direct);
        assert_eq!(work_disk_access(DiskFormat::Qcow2), HostAccess::Qcow2View);
        assert_eq!(
            system_disk_access(SystemDiskStrategy::Qcow2),
            HostAccess::Qcow2View
        );
        for raw in [
            SystemDiskStrategy::Reflink,
            SystemDiskStrategy::Copy,
            SystemDiskStrategy::DmSnapshot,
        ] {
            assert_eq!(system_disk_access(raw), HostAccess::Direct, "{raw}");
        }
    }
}
