//! `vm set`: a VM's CPUs, memory and disk sizes after create. Everything asked is checked
//! first (against the VM's state, its disks as they are, and this host), so a refused request
//! changes nothing. CPUs, memory and the system disk change while the VM is stopped (the next
//! boot uses them; the guest grows `/` into a bigger system disk at boot). The work disk also
//! grows under a running QEMU guest: QMP `block_resize` (never with a smaller size), then
//! `resize2fs` of `/root` in the guest over SSH. While stopped, the host grows the file and
//! then its filesystem (`e2fsck -f -p`, `resize2fs`). A filesystem left smaller than its file
//! (the guest could not grow it, a crash in between) is grown by the next start. Disks never
//! shrink.

use std::path::PathBuf;
use std::time::Duration;

use banger_proto::{ByteSize, FsckResult, SetVmRequest, SetVmResult, VmState};
use tracing::{info, warn};

use super::Manager;
use super::create::{MAX_CPUS, MAX_DISK_BYTES, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use crate::Error;
use crate::domain::SystemDiskStrategy;
use crate::guest::ssh;
use crate::model::{VmRecord, VmSpec};
use crate::vmm::{VmDisk, VmmError, process};
use crate::{disk, e2fs, usage};

/// Disk sizes are whole MiB (what `--disk 4G`, `1.5G`, `4096M` give).
const DISK_UNIT: u64 = 1 << 20;
/// Bound on growing `/root` in the guest (waiting for the new size included).
const GUEST_GROW_LIMIT: Duration = Duration::from_secs(120);

/// What this host can give one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HostLimits {
    /// CPUs the daemon (and so the VMMs it starts) may run on.
    pub cpus: u32,
    /// The host's physical memory, MiB.
    pub memory_mib: u64,
}

impl HostLimits {
    /// This host's limits: the daemon's CPU affinity (cgroup quotas included) and
    /// `MemTotal`. What cannot be read does not limit.
    pub(super) fn here() -> Self {
        let cpus = std::thread::available_parallelism()
            .map_or(u32::MAX, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total_mib(&text))
            .unwrap_or(u64::MAX);
        Self { cpus, memory_mib }
    }
}

/// `MemTotal:  24684204 kB` from /proc/meminfo, in MiB.
fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The sizes the guest sees of a VM's disks now, read from the disks (not the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiskSizes {
    work: u64,
    /// `None` when it cannot be read.
    system: Option<u64>,
}

/// What a request changes: only values that differ from what the VM has.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Plan {
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    disk: Option<u64>,
    system_disk: Option<u64>,
}

impl Plan {
    /// The names of what changes, as `SetVmResult.changed` lists them.
    fn changed(&self) -> Vec<String> {
        [
            ("cpus", self.cpus.is_some()),
            ("memory", self.memory_mib.is_some()),
            ("disk", self.disk.is_some()),
            ("system_disk", self.system_disk.is_some()),
        ]
        .into_iter()
        .filter(|(_, changes)| *changes)
        .map(|(what, _)| what.to_owned())
        .collect()
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn refused(message: String, hint: String) -> Error {
    Error::Refused { message, hint }
}

/// A new size for `what` (`work` or `system`) of VM `name`, now `current` bytes: `None` when
/// it is the same, refused when it would shrink, is not whole MiB or is absurd.
fn grow_to(name: &str, what: &str, current: u64, asked: u64) -> Result<Option<u64>, Error> {
    if asked < current {
        return Err(refused(
            format!(
                "cannot shrink the {what} disk of VM {name} from {} to {}: disks only grow",
                ByteSize(current),
                ByteSize(asked)
            ),
            format!(
                "give at least {}; nothing was changed (to get a smaller disk, copy the data to a new VM)",
                ByteSize(current)
            ),
        ));
    }
    if asked == current {
        return Ok(None);
    }
    if !asked.is_multiple_of(DISK_UNIT) || asked > MAX_DISK_BYTES {
        return Err(refused(
            format!(
                "cannot make the {what} disk of VM {name} {asked} bytes: sizes are whole MiB up to 64T"
            ),
            "give a size such as 20G or 20480M".into(),
        ));
    }
    Ok(Some(asked))
}

/// Decides what `request` changes on VM `name` (in `state`, with `spec` and disks of `sizes`)
/// on a host of `host`, or why it cannot: before anything changes.
fn plan(
    name: &str,
    state: VmState,
    spec: &VmSpec,
    sizes: DiskSizes,
    request: &SetVmRequest,
    host: HostLimits,
) -> Result<Plan, Error> {
    if *request == SetVmRequest::default() {
        return Err(Error::InvalidRequest(
            "nothing to change: give --cpus, --memory, --disk or --system-disk".into(),
        ));
    }
    let mut plan = Plan::default();
    if let Some(cpus) = request.cpus.filter(|c| *c != spec.cpus) {
        if !(1..=MAX_CPUS).contains(&cpus) {
            return Err(Error::InvalidRequest(format!(
                "cpus must be between 1 and {MAX_CPUS}, not {cpus}"
            )));
        }
        if cpus > host.cpus {
            return Err(refused(
                format!(
                    "VM {name} cannot have {cpus} vCPUs: this host has {} CPUs",
                    host.cpus
                ),
                format!("use --cpus {} or fewer", host.cpus),
            ));
        }
        plan.cpus = Some(cpus);
    }
    if let Some(memory) = request.memory_mib.filter(|m| *m != spec.memory_mib) {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory) {
            return Err(Error::InvalidRequest(format!(
                "memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, not {memory} MiB"
            )));
        }
        if memory > host.memory_mib {
            return Err(refused(
                format!(
                    "VM {name} cannot have {} of memory: this host has {} in all",
                    ByteSize(memory << 20),
                    ByteSize(host.memory_mib << 20)
                ),
                format!(
                    "use --memory {}M or less (what the guest does not touch stays free on the host)",
                    host.memory_mib
                ),
            ));
        }
        plan.memory_mib = Some(memory);
    }
    if let Some(asked) = request.disk_size_bytes {
        plan.disk = grow_to(name, "work", sizes.work, asked)?;
    }
    if let Some(asked) = request.system_disk_size_bytes {
        let Some(current) = sizes.system else {
            return Err(refused(
                format!("cannot read the size of VM {name}'s system disk"),
                "see `banger vm stats NAME` for its disks".into(),
            ));
        };
        if spec.system_disk == SystemDiskStrategy::DmSnapshot && asked != current {
            return Err(refused(
                format!(
                    "the system disk of VM {name} is a device-mapper snapshot, which keeps its image's size ({})",
                    ByteSize(current)
                ),
                "grow the work disk (--disk) instead; new VMs get a growable system disk with defaults.system_disk = \"reflink\" or \"copy\"".into(),
            ));
        }
        plan.system_disk = grow_to(name, "system", current, asked)?;
    }
    let offline_only = plan.cpus.is_some() || plan.memory_mib.is_some();
    let stop_first = format!("stop it first (`banger vm stop {name}`), then `banger vm set` again");
    let not_now = |message: String, hint: String| -> Result<Plan, Error> {
        Err(Error::NotNow { message, hint })
    };
    match state {
        VmState::Created | VmState::Stopped | VmState::Error => Ok(plan),
        _ if plan.is_empty() => Ok(plan),
        VmState::Running if offline_only => not_now(
            format!("cannot change the CPUs or memory of VM {name} while it runs"),
            format!("{stop_first}; its next start uses them"),
        ),
        VmState::Running if plan.system_disk.is_some() => not_now(
            format!("cannot grow the system disk of VM {name} while it runs"),
            format!("{stop_first}; the guest grows / into it at its next boot"),
        ),
        VmState::Running => Ok(plan),
        VmState::Paused => not_now(
            format!("cannot change VM {name} while it is paused"),
            format!(
                "resume it (`banger vm resume {name}`) to grow its work disk, or stop it to change anything"
            ),
        ),
        VmState::Suspended => not_now(
            format!(
                "cannot change VM {name} while it is suspended: its memory snapshot holds the old devices"
            ),
            format!("start it (`banger vm start {name}` restores the snapshot) and stop it first"),
        ),
        VmState::Starting | VmState::Stopping => not_now(
            format!("VM {name} is {state}"),
            "wait until it is done, then `banger vm set` again".into(),
        ),
    }
}

/// The guest script that grows `/root` once its disk shows `size_bytes`: the new size
/// reaches the guest kernel by an interrupt, so it is polled for (10 s at most) before
/// `resize2fs`; prints the filesystem's new size in bytes.
fn guest_grow_script(size_bytes: u64) -> String {
    format!(
        r#"dev=$(findmnt -no SOURCE /root) || exit 2
blk=$(basename "$(readlink -f "$dev")")
i=0
while [ "$(cat "/sys/class/block/$blk/size")" -lt {sectors} ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || {{ echo "the guest still sees the old size of $dev" >&2; exit 3; }}
    sleep 0.1
done
out=$(resize2fs "$dev" 2>&1) || {{ echo "$out" >&2; exit 1; }}
df -B1 --output=size /root | tail -n 1"#,
        sectors = size_bytes / 512
    )
}

impl Manager {
    /// The file holding a VM's system disk as its VMM opens it; `None` for a dm snapshot (a
    /// device over the image and a copy-on-write store).
    pub(super) fn system_disk_file(&self, record: &VmRecord) -> Option<PathBuf> {
        system_disk_file(&self.layout, record)
    }

    /// The size the guest sees of a VM's system disk (a dm snapshot: its image's).
    pub(super) async fn system_disk_size(&self, record: &VmRecord) -> Option<u64> {
        let image = match self.system_disk_file(record) {
            Some(_) => None,
            None => self.db.find_image(&record.spec.image).await.ok()?,
        };
        system_disk_size_of(&self.layout, record, image.as_ref())
    }

    /// Changes a VM's CPUs, memory and disk sizes (see the module doc); returns the VM with
    /// its new spec and what changed.
    pub async fn set_vm(&self, name: &str, request: SetVmRequest) -> Result<SetVmResult, Error> {
        let vm = self.locked(name).await?;
        let name = &vm.name;
        let mut record = self.observed_vm(name).await?;
        let (work, _) = self.work_disk(&record.id);
        let sizes = DiskSizes {
            work: usage::virtual_bytes(&work).unwrap_or(record.spec.disk_size_bytes),
            system: self.system_disk_size(&record).await,
        };
        let plan = plan(
            name.as_str(),
            record.state,
            &record.spec,
            sizes,
            &request,
            HostLimits::here(),
        )?;
        let mut result = SetVmResult {
            vm: self.vm_api(&record).await,
            changed: plan.changed(),
            online: false,
            warnings: Vec::new(),
        };
        if plan.is_empty() {
            return Ok(result);
        }
        if record.state == VmState::Running {
            if let Some(bytes) = plan.disk {
                self.grow_work_disk_online(&mut record, bytes, &mut result.warnings)
                    .await?;
                result.online = true;
            }
        } else {
            // The host writes the disks only while no VMM has them open.
            let pid = record.runtime.as_ref().and_then(|r| r.pid);
            if pid.is_some_and(|pid| process::is_alive(pid, &record.id)) {
                return Err(Error::NotNow {
                    message: format!("VM {name} is {} but its VMM still runs", record.state),
                    hint: format!("stop it first (`banger vm stop {name}`)"),
                });
            }
            self.set_offline(&mut record, plan, &mut result.warnings)
                .await?;
        }
        info!(vm = %name, changed = ?result.changed, online = result.online, cpus = record.spec.cpus, memory_mib = record.spec.memory_mib, disk = record.spec.disk_size_bytes, "VM resources changed");
        result.vm = self.vm_api(&record).await;
        Ok(result)
    }

    /// The changes of `plan` on a VM that does not run.
    async fn set_offline(
        &self,
        record: &mut VmRecord,
        plan: Plan,
        warnings: &mut Vec<String>,
    ) -> Result<(), Error> {
        let name = record.name.to_string();
        let (work, work_format) = self.work_disk(&record.id);
        if plan.disk.is_some() && work_format != crate::domain::DiskFormat::Raw {
            return Err(Error::Refused {
                message: format!(
                    "the work disk of VM {name} is a qcow2 overlay over its snapshot: the host cannot check and grow its filesystem while the VM is stopped"
                ),
                hint: format!(
                    "start it and grow it while it runs (`banger vm start {name}; banger vm set {name} --disk SIZE`); nothing was changed"
                ),
            });
        }
        // resize2fs needs a freshly checked filesystem, and one e2fsck cannot repair is
        // refused here, before anything changed.
        if plan.disk.is_some() {
            let check = e2fs::fsck(&work, true).await?;
            if check.fsck_result() == FsckResult::Failed {
                return Err(Error::DiskCheck {
                    message: format!(
                        "cannot grow the work disk of VM {name}: e2fsck -f -p cannot repair it by itself (exit {}): {}",
                        check.exit_code,
                        check.tail(6)
                    ),
                    hint: format!(
                        "nothing was changed; repair it by hand with `e2fsck -f {}` first",
                        work.display()
                    ),
                });
            }
        }
        if let (Some(bytes), Some(file)) = (plan.system_disk, self.system_disk_file(record)) {
            if record.spec.system_disk == SystemDiskStrategy::Qcow2 {
                disk::grow_qcow2(&file, bytes).await?;
            } else {
                blocking(move || disk::grow_raw_system_disk(&file, bytes)).await??;
            }
            info!(vm = %name, bytes, "system disk grown; the guest grows / into it at its next boot");
        }
        if let Some(bytes) = plan.disk {
            // Recorded before the file grows: a crash in between leaves a record that asks
            // the next start to finish the job.
            let before = (record.spec.disk_size_bytes, record.grow_work_fs);
            record.spec.disk_size_bytes = bytes;
            record.grow_work_fs = true;
            record.updated_at = crate::now_rfc3339();
            self.db.update_spec(record).await?;
            let file = work.clone();
            let grown = blocking(move || disk::grow_raw_system_disk(&file, bytes)).await;
            if let Err(e) = grown.and_then(|r| r.map_err(Error::from)) {
                (record.spec.disk_size_bytes, record.grow_work_fs) = before;
                self.db.update_spec(record).await?;
                return Err(e);
            }
            match e2fs::grow(&work).await {
                Ok(()) => record.grow_work_fs = false,
                Err(e) => {
                    warn!(vm = %name, "cannot grow the work filesystem: {e}");
                    warnings.push(format!(
                        "the work disk of VM {name} is {} now, but its filesystem could not grow ({e}); the next start grows it",
                        ByteSize(bytes)
                    ));
                }
            }
        }
        if let Some(cpus) = plan.cpus {
            record.spec.cpus = cpus;
        }
        if let Some(memory) = plan.memory_mib {
            record.spec.memory_mib = memory;
        }
        record.updated_at = crate::now_rfc3339();
        self.db.update_spec(record).await?;
        Ok(())
    }

    /// Grows the work disk of a running VM to `bytes` through its VMM, then `/root` in the
    /// guest; a guest that cannot grow it leaves a warning and the next start grows it.
    async fn grow_work_disk_online(
        &self,
        record: &mut VmRecord,
        bytes: u64,
        warnings: &mut Vec<String>,
    ) -> Result<(), Error> {
        let name = record.name.to_string();
        let pid = record
            .runtime
            .as_ref()
            .and_then(|r| r.pid)
            .filter(|pid| process::is_alive(*pid, &record.id))
            .ok_or_else(|| super::not_running(&record.name, record.state))?;
        let (vmm, control) = self.control(record, pid);
        match vmm.grow_disk(&control, VmDisk::Work, bytes).await {
            Ok(()) => {}
            Err(VmmError::Unsupported(_)) => {
                return Err(Error::NotNow {
                    message: format!(
                        "VM {name} runs on {}, which cannot grow a disk while the VM runs",
                        vmm.display_name()
                    ),
                    hint: format!(
                        "stop it first (`banger vm stop {name}`), then `banger vm set` again"
                    ),
                });
            }
            Err(e) => return Err(e.into()),
        }
        info!(vm = %name, bytes, "work disk grown under the running guest");
        record.spec.disk_size_bytes = bytes;
        record.grow_work_fs = true;
        record.updated_at = crate::now_rfc3339();
        self.db.update_spec(record).await?;
        let grown = match self.ssh_target(record) {
            Ok(target) => ssh::run(
                &target,
                &guest_grow_script(bytes),
                Duration::from_secs(10),
                GUEST_GROW_LIMIT,
            )
            .await
            .map_err(|e| e.to_string())
            .and_then(|(code, out, err)| match code {
                Some(0) => Ok(out),
                _ => Err(err
                    .lines()
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("no output")
                    .to_owned()),
            }),
            Err(e) => Err(e.to_string()),
        };
        match grown {
            Ok(size) => {
                info!(vm = %name, fs_bytes = %size.trim(), "/root grown in the guest");
                record.grow_work_fs = false;
                self.db.update_spec(record).await?;
            }
            Err(why) => {
                warn!(vm = %name, "the guest could not grow /root: {why}");
                warnings.push(format!(
                    "the work disk of VM {name} is {} now, but the guest could not grow /root ({why}); its next start grows it",
                    ByteSize(bytes)
                ));
            }
        }
        Ok(())
    }
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Failed(format!("disk task failed: {e}")))
}

/// The file of a VM's own system disk: its overlay or raw copy; `None` for a dm snapshot
/// (whose device is made at start from the image's rootfs).
pub(super) fn system_disk_file(
    layout: &crate::layout::Layout,
    record: &VmRecord,
) -> Option<PathBuf> {
    match record.spec.system_disk {
        SystemDiskStrategy::Qcow2 => Some(layout.vm_system_disk(&record.id)),
        SystemDiskStrategy::Reflink | SystemDiskStrategy::Copy => {
            Some(layout.vm_system_raw(&record.id))
        }
        SystemDiskStrategy::DmSnapshot => None,
    }
}

/// The size the guest sees of a VM's system disk, given its image when it has no file of its
/// own (a dm snapshot). Blocking (reads a disk header).
pub(super) fn system_disk_size_of(
    layout: &crate::layout::Layout,
    record: &VmRecord,
    image: Option<&banger_proto::Image>,
) -> Option<u64> {
    match system_disk_file(layout, record) {
        Some(file) => usage::virtual_bytes(&file),
        None => usage::virtual_bytes(&layout.image_rootfs(&image?.digest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::VmmKind;

    const GIB: u64 = 1 << 30;

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 2,
            memory_mib: 1024,
            disk_size_bytes: 2 * GIB,
            image: "default".into(),
            // Any backend: the plan never depends on it.
            vmm: VmmKind::ALL[0],
            vmm_reason: "test".into(),
            system_disk: SystemDiskStrategy::Qcow2,
        }
    }

    const SIZES: DiskSizes = DiskSizes {
        work: 2 * GIB,
        system: Some(8 * GIB),
    };
    const HOST: HostLimits = HostLimits {
        cpus: 4,
        memory_mib: 8192,
    };

    fn ask(state: VmState, request: SetVmRequest) -> Result<Plan, Error> {
        plan("dev", state, &spec(), SIZES, &request, HOST)
    }

    fn message(result: Result<Plan, Error>) -> (String, String, banger_proto::ErrorCode) {
        let api = result.unwrap_err().to_api();
        (api.message, api.hint.unwrap_or_default(), api.code)
    }

    #[test]
    fn a_stopped_vm_takes_new_cpus_memory_and_bigger_disks() {
        for state in [VmState::Stopped, VmState::Created, VmState::Error] {
            let plan = ask(
                state,
                SetVmRequest {
                    cpus: Some(1),
                    memory_mib: Some(512),
                    disk_size_bytes: Some(4 * GIB),
                    system_disk_size_bytes: Some(10 * GIB),
                },
            )
            .unwrap();
            assert_eq!(
                plan,
                Plan {
                    cpus: Some(1),
                    memory_mib: Some(512),
                    disk: Some(4 * GIB),
                    system_disk: Some(10 * GIB),
                }
            );
            assert_eq!(plan.changed(), ["cpus", "memory", "disk", "system_disk"]);
        }
    }

    #[test]
    fn what_the_vm_has_already_changes_nothing() {
        let plan = ask(
            VmState::Running,
            SetVmRequest {
                cpus: Some(2),
                memory_mib: Some(1024),
                disk_size_bytes: Some(2 * GIB),
                system_disk_size_bytes: Some(8 * GIB),
            },
        )
        .unwrap();
        assert!(plan.is_empty() && plan.changed().is_empty());
        let (msg, _, _) = message(ask(VmState::Stopped, SetVmRequest::default()));
        assert!(msg.contains("nothing to change"), "{msg}");
    }

    #[test]
    fn disks_never_shrink() {
        for request in [
            SetVmRequest {
                disk_size_bytes: Some(GIB),
                ..Default::default()
            },
            SetVmRequest {
                system_disk_size_bytes: Some(4 * GIB),
                ..Default::default()
            },
        ] {
            for state in [VmState::Running, VmState::Stopped] {
                let (msg, hint, code) = message(ask(state, request.clone()));
                assert!(
                    msg.contains("cannot shrink") && msg.contains("dev"),
                    "{msg}"
                );
                assert!(hint.contains("nothing was changed"), "{hint}");
                assert_eq!(code, banger_proto::ErrorCode::InvalidRequest);
            }
        }
    }

    #[test]
    fn sizes_are_whole_mib_and_bounded() {
        for bytes in [2 * GIB + 4096, 65 << 40] {
            let (msg, _, _) = message(ask(
                VmState::Stopped,
                SetVmRequest {
                    disk_size_bytes: Some(bytes),
                    ..Default::default()
                },
            ));
            assert!(msg.contains("whole MiB"), "{msg}");
        }
    }

    #[test]
    fn more_than_the_host_has_is_refused_with_a_hint() {
        let (msg, hint, code) = message(ask(
            VmState::Stopped,
            SetVmRequest {
                cpus: Some(8),
                ..Default::default()
            },
        ));
        assert_eq!(msg, "VM dev cannot have 8 vCPUs: this host has 4 CPUs");
        assert_eq!(hint, "use --cpus 4 or fewer");
        assert_eq!(code, banger_proto::ErrorCode::InvalidRequest);
        let (msg, hint, _) = message(ask(
            VmState::Stopped,
            SetVmRequest {
                memory_mib: Some(16384),
                ..Default::default()
            },
        ));
        assert_eq!(
            msg,
            "VM dev cannot have 16G of memory: this host has 8G in all"
        );
        assert!(hint.starts_with("use --memory 8192M or less"), "{hint}");
        // The host's full size is allowed; the create bounds still apply.
        assert!(
            ask(
                VmState::Stopped,
                SetVmRequest {
                    cpus: Some(4),
                    memory_mib: Some(8192),
                    ..Default::default()
                }
            )
            .is_ok()
        );
        let (msg, _, _) = message(ask(
            VmState::Stopped,
            SetVmRequest {
                memory_mib: Some(64),
                ..Default::default()
            },
        ));
        assert!(msg.contains("between 128 MiB"), "{msg}");
        let (msg, _, _) = message(ask(
            VmState::Stopped,
            SetVmRequest {
                cpus: Some(0),
                ..Default::default()
            },
        ));
        assert!(msg.contains("between 1 and"), "{msg}");
    }

    #[test]
    fn a_running_vm_grows_only_its_work_disk() {
        let plan = ask(
            VmState::Running,
            SetVmRequest {
                disk_size_bytes: Some(4 * GIB),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plan.disk, Some(4 * GIB));
        for (request, says) in [
            (
                SetVmRequest {
                    cpus: Some(1),
                    disk_size_bytes: Some(4 * GIB),
                    ..Default::default()
                },
                "cannot change the CPUs or memory of VM dev while it runs",
            ),
            (
                SetVmRequest {
                    memory_mib: Some(512),
                    ..Default::default()
                },
                "cannot change the CPUs or memory of VM dev while it runs",
            ),
            (
                SetVmRequest {
                    system_disk_size_bytes: Some(10 * GIB),
                    ..Default::default()
                },
                "cannot grow the system disk of VM dev while it runs",
            ),
        ] {
            let (msg, hint, code) = message(ask(VmState::Running, request));
            assert_eq!(msg, says);
            assert!(
                hint.starts_with("stop it first (`banger vm stop dev`)"),
                "{hint}"
            );
            assert_eq!(code, banger_proto::ErrorCode::InvalidState);
        }
    }

    #[test]
    fn paused_suspended_and_busy_vms_are_not_changed() {
        let request = SetVmRequest {
            disk_size_bytes: Some(4 * GIB),
            ..Default::default()
        };
        for (state, says) in [
            (VmState::Paused, "while it is paused"),
            (VmState::Suspended, "while it is suspended"),
            (VmState::Starting, "is starting"),
            (VmState::Stopping, "is stopping"),
        ] {
            let (msg, _, code) = message(ask(state, request.clone()));
            assert!(msg.contains(says), "{state}: {msg}");
            assert_eq!(code, banger_proto::ErrorCode::InvalidState);
        }
    }

    #[test]
    fn a_dm_system_disk_keeps_its_size() {
        let mut dm = spec();
        dm.system_disk = SystemDiskStrategy::DmSnapshot;
        let request = SetVmRequest {
            system_disk_size_bytes: Some(10 * GIB),
            ..Default::default()
        };
        let api = plan("dev", VmState::Stopped, &dm, SIZES, &request, HOST)
            .unwrap_err()
            .to_api();
        assert!(api.message.contains("device-mapper"), "{}", api.message);
        // An unreadable system disk is refused rather than guessed.
        let unknown = DiskSizes {
            system: None,
            ..SIZES
        };
        assert!(plan("dev", VmState::Stopped, &spec(), unknown, &request, HOST).is_err());
    }

    #[test]
    fn host_memory_is_read_from_meminfo() {
        assert_eq!(
            mem_total_mib("MemTotal:       24684204 kB\nMemFree: 1 kB\n"),
            Some(24105)
        );
        assert_eq!(mem_total_mib("nothing"), None);
        let here = HostLimits::here();
        assert!(here.cpus >= 1 && here.memory_mib > 0);
    }

    #[test]
    fn the_guest_script_waits_for_the_sectors_it_needs() {
        let script = guest_grow_script(4 * GIB);
        assert!(script.contains("-lt 8388608 ]"), "{script}");
        assert!(script.contains("resize2fs \"$dev\""), "{script}");
    }
}
