//! The QEMU backend: `-M microvm` with virtio-mmio disks and network, QMP on a Unix socket,
//! a virtio-serial port for the workspace channel,
//! the serial console to a file, `-no-reboot` so a guest reboot or panic ends the process, and
//! `-daemonize` so the VM outlives the daemon and launch errors are reported synchronously.
//! Pause/resume are QMP `stop`/`cont`, observed with `query-status`. A memory snapshot
//! (`vm suspend`) is a migration of the paused VM into a file (`file:` from QEMU 8.2 on,
//! `exec:cat` before: QEMU 7.2, Debian 12); a restore is a new process with the same devices,
//! `-S -incoming defer`, `migrate-incoming` from that file, then `cont`. A virtio-balloon with
//! free-page reporting hands memory the guest freed back to QEMU, so it is not in the file.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::domain::VmmKind;
pub use crate::domain::{QemuDevices, TcgThreads};
use crate::layout::vm_runtime;

use super::{
    Accel, Capabilities, DeviceDiscovery, DiskSwitch, Hypervisor, LaunchSpec, NetAttach,
    PortForward, Snapshot, StopMethod, VmDisk, VmProcess, VmmError, process, qmp,
};

/// The migration bandwidth while suspending (bytes/s): QEMU's default (128 MiB/s on 10.0,
/// 32 MiB/s on 7.2) made writing ~100 MB of state take most of a second; the paused VM gains
/// nothing from a throttle.
const MIGRATE_BANDWIDTH: u64 = 1 << 40;
/// Bound on writing or loading a VM's state.
const MIGRATE_LIMIT: Duration = Duration::from_secs(120);
/// Bound on a cancelled migration's end.
const MIGRATE_CANCEL_LIMIT: Duration = Duration::from_secs(10);

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    /// TCG with a host thread per vCPU (see `args`).
    multi_threaded_tcg: bool,
    /// The binary's version, when known: it decides how a suspend writes its file.
    version: Option<QemuVersion>,
    /// Devices always on the kernel command line (`qemu.devices = "cmdline"`).
    cmdline_devices: bool,
}

impl Qemu {
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            multi_threaded_tcg: false,
            version: None,
            cmdline_devices: false,
        }
    }

    /// Declares devices on the kernel command line (ACPI off) for every kernel:
    /// `qemu.devices = "cmdline"`.
    pub fn with_devices(self, choice: QemuDevices) -> Self {
        Self {
            cmdline_devices: choice == QemuDevices::Cmdline,
            ..self
        }
    }

    /// Asks the binary for its version (one short `--version` run) and chooses the TCG
    /// threading for `choice`: `Auto` takes a thread per vCPU from QEMU 8.1 on.
    pub fn with_tcg_threads(self, choice: TcgThreads) -> Self {
        let version = probe_version(&self.binary);
        let multi = match choice {
            TcgThreads::Single => false,
            TcgThreads::Multi => true,
            TcgThreads::Auto => version.is_some_and(mttcg_is_safe),
        };
        Self {
            multi_threaded_tcg: multi,
            version,
            ..self
        }
    }

    /// The same backend taking `version` as the binary's (tests).
    pub fn with_version(self, version: Option<QemuVersion>) -> Self {
        Self { version, ..self }
    }

    /// The migration URI that writes (`Direction::Save`) or reads a VM's state at `path`:
    /// `file:` from QEMU 8.2 on; before (and for a version not known, or a path with a comma,
    /// which `file:` reads as an option separator) `exec:` through `cat`, which every QEMU
    /// since 7.2 has (its `-sandbox` leaves process spawning allowed).
    pub fn migration_uri(&self, path: &Path, direction: Direction) -> String {
        let text = path.display().to_string();
        let file_uri = self
            .version
            .is_some_and(|v| v >= QemuVersion { major: 8, minor: 2 });
        if file_uri && !text.contains(',') {
            return format!("file:{text}");
        }
        let quoted = crate::guest::ssh::shell_quote(&text);
        match direction {
            Direction::Save => format!("exec:cat > {quoted}"),
            Direction::Load => format!("exec:cat {quoted}"),
        }
    }

    /// Runs QEMU with `args` (it daemonizes) and reads the pid it wrote.
    async fn spawn(&self, spec: &LaunchSpec, args: Vec<String>) -> Result<VmProcess, VmmError> {
        let binary = self.binary.display().to_string();
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(fd) = &spec.tap_fd {
            let raw = fd.as_raw_fd();
            // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the child's copy
            // of the tap queue only, so QEMU (and no other child) inherits it.
            unsafe {
                command.pre_exec(move || {
                    if nix::libc::fcntl(raw, nix::libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let output = command.output().await.map_err(VmmError::spawn(&binary))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr
                .lines()
                .map(|l| l.trim_start_matches(&format!("{binary}: ")).to_owned())
                .find(|l| !l.trim().is_empty())
                .unwrap_or_else(|| output.status.to_string());
            // QEMU reports a hostfwd port that another process bound first this way; the
            // caller picks another port.
            if let NetAttach::User { ssh_port, .. } = spec.net
                && message.contains("forwarding")
            {
                return Err(VmmError::PortTaken {
                    binary,
                    port: ssh_port,
                    message,
                });
            }
            return Err(VmmError::LaunchFailed { binary, message });
        }
        let pid_path = pid_file(spec);
        let pid = std::fs::read_to_string(&pid_path)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .ok_or_else(|| VmmError::LaunchFailed {
                binary: binary.clone(),
                message: format!("no pid in {}", pid_path.display()),
            })?;
        Ok(VmProcess {
            pid,
            control_socket: qmp_socket(spec),
            jail: None,
        })
    }

    /// Loads the state at `state` into a QEMU started with `-S -incoming defer`, then runs it.
    async fn load(&self, process: &VmProcess, marker: &str, state: &Path) -> Result<(), VmmError> {
        let qmp = &process.control_socket;
        let mut arguments = json!({ "uri": self.migration_uri(state, Direction::Load) });
        // From 9.1 on QEMU can stay up after a failed load and say why (query-migrate's
        // `error-desc`); before, it exits.
        if self
            .version
            .is_some_and(|v| v >= QemuVersion { major: 9, minor: 1 })
        {
            arguments["exit-on-error"] = json!(false);
        }
        qmp::execute_with(qmp, "migrate-incoming", Some(arguments)).await?;
        let alive = || process::is_alive(process.pid, marker);
        wait_migration(qmp, "load the saved state", alive).await?;
        qmp::execute(qmp, "cont").await.map(drop)
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The full argument list for `spec` (without the binary).
    pub fn args(&self, spec: &LaunchSpec) -> Vec<String> {
        // ACPI: Debian's cloud kernel finds virtio-mmio devices only through ACPI, and ACPI is
        // how a guest power-off ends QEMU. A kernel that takes its devices on the command line
        // (Firecracker's way) boots with ACPI off: QEMU then appends a `virtio_mmio.device=`
        // entry per device to the command line itself (`auto-kernel-cmdline`), and an i8042
        // takes Ctrl-Alt-Del (the guest reboots, which ends QEMU: `-no-reboot`). The PIT stays
        // on only for a TCG guest that has to calibrate its TSC by itself (no `tsc_early_khz`).
        let pit = if spec.accel == Accel::Tcg && !spec.cmdline.contains("tsc_early_khz=") {
            "on"
        } else {
            "off"
        };
        // Without ACPI the kernel takes its timer interrupt from the legacy PIC and PIT (as
        // under Firecracker, whose KVM irqchip has both); without them it hangs in boot
        // ("Failed to register legacy timer interrupt").
        let machine = match spec.devices {
            DeviceDiscovery::Acpi => {
                format!("microvm,isa-serial=on,rtc=on,acpi=on,pic=off,pit={pit}")
            }
            DeviceDiscovery::CommandLine => {
                "microvm,isa-serial=on,rtc=on,acpi=off,pic=on,pit=on".to_owned()
            }
        };
        // TCG runs all vCPUs of a VM on one host thread (`thread=single`) unless configured
        // otherwise. With one thread per vCPU (MTTCG, QEMU's default), QEMU 7.2 (Debian 12)
        // races when the guest patches kernel code that another vCPU is translating (static
        // keys: text_poke writes an INT3, then the final bytes): the other vCPU can keep a
        // stale translation with the INT3 and trap on it for ever. Seen as a guest hung early
        // in boot about once in 100 boots with two VMs starting at once, and reproduced at
        // will by flipping static keys in a loop (docs/ARCHITECTURE.md, "TCG and guest code
        // patching").
        let (accel, cpu) = match spec.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg if self.multi_threaded_tcg => ("tcg,thread=multi", "max"),
            Accel::Tcg => ("tcg,thread=single", "max"),
        };
        let mut args: Vec<String> = vec![
            // The VM id in the process name lets liveness checks tell our QEMU from a reused pid.
            "-name".into(),
            format!("banger-{},process=banger-{}", spec.vm_name, spec.vm_id),
            "-M".into(),
            machine,
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.cpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            // qboot, named: QEMU 10 on Debian ships no `bios-microvm.bin` of its own and falls
            // back to SeaBIOS's microvm build, which corrupts the DSDT once a VM has five
            // virtio-mmio devices (the guest spends minutes checksumming a garbage table, or
            // prints nothing at all). qboot.rom is in QEMU's data dir from 4.2 on.
            "-bios".into(),
            "qboot.rom".into(),
            // seccomp: obsolete system calls and scheduler/resource changes refused. Process
            // spawning and privilege calls stay allowed: `-daemonize` forks, and QEMU 7.2 and
            // 10.0 both refuse to start with `spawn=deny` or `elevateprivileges=deny` and it.
            "-sandbox".into(),
            "on,resourcecontrol=deny".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
        ];
        if let Some(initrd) = &spec.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        args.extend([
            "-append".into(),
            spec.cmdline.clone(),
            // Appending, so the daemon can cut the file to its cap while QEMU writes (see
            // service::console_cap); commas in the path are doubled for QEMU's option parser.
            "-chardev".into(),
            format!(
                "file,id=console,append=on,path={}",
                spec.console_log.display().to_string().replace(',', ",,")
            ),
            "-serial".into(),
            "chardev:console".into(),
            // vda: the system disk; vdb: the work disk (device order = command-line order).
            // `auto-read-only=off`: a drive that becomes the backing of a live snapshot's
            // overlay keeps the fd it has; with `-drive`'s default (on) QEMU reopens it
            // read-only by its file name, which the snapshot has just moved away.
            "-drive".into(),
            format!(
                "id=sys,file={},format={},if=none,auto-read-only=off,discard=unmap,werror=stop,rerror=stop",
                spec.system_disk.display(),
                spec.system_disk_format
            ),
            "-device".into(),
            "virtio-blk-device,drive=sys".into(),
            "-drive".into(),
            format!(
                "id=work,file={},format={},if=none,auto-read-only=off,discard=unmap,werror=stop,rerror=stop",
                spec.work_disk.display(),
                spec.work_disk_format
            ),
            "-device".into(),
            "virtio-blk-device,drive=work".into(),
            "-netdev".into(),
            match &spec.net {
                NetAttach::User {
                    ssh_port,
                    isolated,
                    ports,
                } => user_netdev(*ssh_port, *isolated, ports),
                NetAttach::Tap { name } => match &spec.tap_fd {
                    // The helper's queue of the tap, inherited (see `launch`).
                    Some(fd) => format!("tap,id=n0,fd={}", fd.as_raw_fd()),
                    None => format!("tap,id=n0,ifname={name},script=no,downscript=no"),
                },
            },
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", spec.mac),
            "-device".into(),
            "virtio-rng-device".into(),
            // Free-page reporting: the guest hands pages it freed back to QEMU, which then
            // leaves them out of a suspend's state file (a 1 GiB guest that had freed most of
            // its memory: 104 MB instead of 611 MB). No target size is ever set.
            "-device".into(),
            "virtio-balloon-device,free-page-reporting=on".into(),
            // The workspace channel: a virtio-serial port the guest sees as
            // /dev/virtio-ports/org.banger.workspace, its host end a Unix socket (see
            // `workspace::transfer`).
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=ws,path={},server=on,wait=off",
                spec.runtime_dir
                    .join(crate::layout::WORKSPACE_CHANNEL_SOCKET)
                    .display()
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=ws,name={}",
                crate::workspace::CHANNEL_PORT_NAME
            ),
        ]);
        if spec.devices == DeviceDiscovery::CommandLine {
            args.extend(["-device".into(), "i8042".into()]);
        }
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_socket(spec).display()),
            "-daemonize".into(),
            "-pidfile".into(),
            pid_file(spec).display().to_string(),
        ]);
        args
    }
}

/// The user-mode netdev (id `n0`, what `hostfwd_add` names): the guest reaches the host's
/// loopback as 10.0.2.2 and QEMU's resolver as 10.0.2.3; `restrict=on` (isolated) drops
/// every connection the guest starts. SSH and the published ports are host forwards, which
/// work either way.
fn user_netdev(ssh_port: u16, isolated: bool, ports: &[banger_proto::PortMapping]) -> String {
    let mut netdev = format!(
        "user,id={NETDEV_ID},restrict={}",
        if isolated { "on" } else { "off" }
    );
    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"));
    for p in ports {
        netdev.push_str(&format!(",hostfwd={}", hostfwd(p)));
    }
    netdev
}

/// The QEMU netdev id of every VM's NIC.
const NETDEV_ID: &str = "n0";

/// `proto:hostip:hostport-:guestport`, QEMU's hostfwd rule.
fn hostfwd(p: &banger_proto::PortMapping) -> String {
    format!("{}-:{}", hostfwd_host(p), p.guest_port)
}

/// `proto:hostip:hostport`, what `hostfwd_remove` names.
fn hostfwd_host(p: &banger_proto::PortMapping) -> String {
    format!("{}:{}:{}", p.proto.as_str(), p.host_ip, p.host_port)
}

/// Whether a monitor answer to `hostfwd_add`/`hostfwd_remove` means it worked: QEMU reports a
/// failure as text; `hostfwd_add` says nothing when it worked, `hostfwd_remove` says
/// "... removed" (or "... not found", which leaves what was wanted: no such forward).
fn hmp_succeeded(answer: &str) -> bool {
    let text = answer.trim();
    text.is_empty()
        || (text.starts_with("host forwarding rule for ")
            && (text.ends_with(" removed") || text.ends_with(" not found")))
}

/// A QEMU release, as `--version` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
}

/// QEMU 8.1 fixed the multi-threaded TCG race with guest code patching (deba78709ae8).
fn mttcg_is_safe(version: QemuVersion) -> bool {
    version >= (QemuVersion { major: 8, minor: 1 })
}

/// Parses "QEMU emulator version 10.0.2 (Debian ...)".
pub fn parse_version(text: &str) -> Option<QemuVersion> {
    let rest = text.split("version ").nth(1)?;
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(str::parse::<u32>);
    Some(QemuVersion {
        major: numbers.next()?.ok()?,
        minor: numbers.next()?.ok()?,
    })
}

/// The version `binary --version` reports, or `None` when it does not run or says nothing
/// parseable.
pub fn probe_version(binary: &Path) -> Option<QemuVersion> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&output.stdout))
}

fn qmp_socket(spec: &LaunchSpec) -> PathBuf {
    qmp_socket_in(&spec.runtime_dir)
}

/// The QMP socket in a VM's runtime directory.
fn qmp_socket_in(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(vm_runtime::QMP_SOCKET)
}

fn pid_file(spec: &LaunchSpec) -> PathBuf {
    spec.runtime_dir.join(vm_runtime::QEMU_PID)
}

impl Hypervisor for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn display_name(&self) -> &'static str {
        "QEMU"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            needs_tap: false,
            supports_qcow2: true,
            requires_kvm: false,
            supports_memory_snapshot: true,
            supports_pause: true,
            cmdline_devices_only: self.cmdline_devices,
            tap_fd: true,
        }
    }

    /// `-no-reboot` ends QEMU when the guest reboots; `panic=-1` makes a panic a reboot.
    fn boot_args(&self) -> &'static str {
        "panic=-1"
    }

    /// A guest power-off ends QEMU (ACPI).
    fn guest_stop_script(&self) -> &'static str {
        "sync && (systemctl poweroff --no-block || poweroff) >/dev/null 2>&1"
    }

    fn control_socket(&self, runtime_dir: &Path) -> PathBuf {
        qmp_socket_in(runtime_dir)
    }

    fn shutdown_signal(&self) -> StopMethod {
        StopMethod::Acpi
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<VmProcess, VmmError> {
        self.spawn(spec, self.args(spec)).await
    }

    /// The ACPI power button, then Ctrl-Alt-Del: a guest without ACPI (devices on the command
    /// line) has an i8042 instead and reboots, which ends QEMU. Without a keyboard the keys
    /// go nowhere, so an ACPI guest sees only the button.
    async fn request_shutdown(&self, process: &VmProcess) -> Result<(), VmmError> {
        qmp::execute(&process.control_socket, "system_powerdown").await?;
        let keys = serde_json::json!({ "keys": [
            { "type": "qcode", "data": "ctrl" },
            { "type": "qcode", "data": "alt" },
            { "type": "qcode", "data": "delete" },
        ] });
        qmp::execute_with(&process.control_socket, "send-key", Some(keys))
            .await
            .map(drop)
    }

    async fn quit(&self, process: &VmProcess) -> Result<(), VmmError> {
        qmp::execute(&process.control_socket, "quit")
            .await
            .map(drop)
    }

    async fn pause(&self, process: &VmProcess) -> Result<(), VmmError> {
        qmp::execute(&process.control_socket, "stop")
            .await
            .map(drop)
    }

    /// `cont`, after cancelling an outgoing migration still under way (a suspend cut short
    /// by a daemon that died): when it completed it would stop the vCPUs again.
    async fn resume(&self, process: &VmProcess) -> Result<(), VmmError> {
        let qmp = &process.control_socket;
        let deadline = Instant::now() + MIGRATE_CANCEL_LIMIT;
        let mut cancelled = false;
        loop {
            let info = qmp::execute(qmp, "query-migrate").await?;
            let status = info
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("none");
            if matches!(status, "none" | "completed" | "failed" | "cancelled") {
                break;
            }
            if !cancelled {
                qmp::execute(qmp, "migrate_cancel").await?;
                cancelled = true;
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Control {
                    path: qmp.display().to_string(),
                    message: format!(
                        "a migration is still {status} {}s after it was cancelled",
                        MIGRATE_CANCEL_LIMIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        qmp::execute(qmp, "cont").await.map(drop)
    }

    /// `query-status` answers `{"running": bool, "status": "running"|"paused"|...}`: `paused`
    /// is a pause, and so is `postmigrate` (a suspend wrote the state, then the daemon died:
    /// `cont` runs the guest again); `prelaunch`, `inmigrate`, `shutdown` are not.
    async fn is_paused(&self, process: &VmProcess) -> Result<bool, VmmError> {
        let status = qmp::execute(&process.control_socket, "query-status").await?;
        Ok(matches!(
            status.get("status").and_then(|s| s.as_str()),
            Some("paused" | "postmigrate")
        ))
    }

    /// Migrates the paused VM into `snapshot.state` (devices and memory in one file; QEMU
    /// writes no separate memory file) at full speed. It does not flush guest disks: callers
    /// sync the guest first. The file is not fsynced here either (the caller seals it).
    async fn snapshot(&self, process: &VmProcess, snapshot: &Snapshot) -> Result<(), VmmError> {
        let qmp = &process.control_socket;
        qmp::execute_with(
            qmp,
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": MIGRATE_BANDWIDTH })),
        )
        .await?;
        let uri = self.migration_uri(&snapshot.state, Direction::Save);
        qmp::execute_with(qmp, "migrate", Some(json!({ "uri": uri }))).await?;
        // A QEMU that dies meanwhile fails the next query (its socket is gone).
        let written = wait_migration(qmp, "save the VM's state", || true).await;
        if written.is_err() {
            let _ = qmp::execute(qmp, "migrate_cancel").await;
        }
        written
    }

    /// A new QEMU with the same devices waits for the state (`-S -incoming defer`), loads it
    /// and runs on (`cont`): no boot. Leaves no process behind on error.
    async fn restore(&self, spec: &LaunchSpec, snapshot: &Snapshot) -> Result<VmProcess, VmmError> {
        let mut args = self.args(spec);
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        let process = self.spawn(spec, args).await?;
        if let Err(e) = self.load(&process, &spec.vm_id, &snapshot.state).await {
            process::kill(process.pid, &spec.vm_id).await;
            return Err(e);
        }
        Ok(process)
    }

    /// QMP `block_resize` of the drive (`sys` or `work`, the `-drive` ids), after
    /// `query-block` gave its current virtual size: `block_resize` shrinks as readily as it
    /// grows (the guest's filesystem would be cut), so a smaller size is never sent. The
    /// virtio-blk device tells the guest at once (a config-change interrupt).
    async fn grow_disk(
        &self,
        process: &VmProcess,
        disk: VmDisk,
        size_bytes: u64,
    ) -> Result<(), VmmError> {
        let socket = &process.control_socket;
        let device = drive_id(disk);
        let blocks = qmp::execute(socket, "query-block").await?;
        let current = current_size(&blocks, device).ok_or_else(|| VmmError::Control {
            path: socket.display().to_string(),
            message: format!("query-block: no drive {device} with a size"),
        })?;
        match size_bytes.cmp(&current) {
            std::cmp::Ordering::Less => Err(VmmError::WouldShrink {
                disk: disk.as_str(),
                current,
                requested: size_bytes,
            }),
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => qmp::execute_with(
                socket,
                "block_resize",
                Some(serde_json::json!({ "device": device, "size": size_bytes })),
            )
            .await
            .map(drop),
        }
    }

    /// One QMP `transaction` of two `blockdev-snapshot-sync` actions (mode `existing`: the
    /// overlays were made beforehand, naming their backings): QEMU drains both drives, opens
    /// each new file over the image it had open and writes there from then on; both or
    /// neither. The new nodes are named after the tag (`TAGs`, `TAGw`), which is how
    /// [`Hypervisor::disks_switched`] tells. QEMU 7.2 and 10.x take the `-drive` ids as
    /// `device`.
    ///
    /// QEMU then reopens each image it switched away from read-only, by the file name it has
    /// for it, which drops its write lock (a clone's QEMU cannot open the file while it is
    /// held). That name is the one it opened: for a file a previous switch opened, a name
    /// since renamed. For the switch it is linked again to the file (`alias`), and removed
    /// after.
    async fn switch_disks(&self, process: &VmProcess, switch: &DiskSwitch) -> Result<(), VmmError> {
        let blocks = qmp::execute(&process.control_socket, "query-block").await?;
        let mut aliases = Vec::new();
        for (disk, now) in [
            (VmDisk::System, &switch.system_now),
            (VmDisk::Work, &switch.work_now),
        ] {
            let Some(known) = active_file(&blocks, drive_id(disk)) else {
                continue;
            };
            if &known != now && !known.exists() {
                match std::fs::hard_link(now, &known) {
                    Ok(()) => aliases.push(known),
                    Err(e) => {
                        tracing::warn!(file = %known.display(), "cannot link the disk under the name QEMU knows it by; QEMU keeps its write lock on it: {e}")
                    }
                }
            }
        }
        let switched = switch_transaction(process, switch).await;
        for alias in aliases {
            if let Err(e) = std::fs::remove_file(&alias) {
                tracing::warn!(file = %alias.display(), "cannot remove a disk's reopen alias: {e}");
            }
        }
        switched
    }

    /// Whether `query-block` shows both drives on the switch's nodes (neither: `false`; one
    /// only cannot come of a transaction and is an error).
    async fn disks_switched(&self, process: &VmProcess, tag: &str) -> Result<bool, VmmError> {
        let blocks = qmp::execute(&process.control_socket, "query-block").await?;
        let on = |disk: VmDisk| {
            top_node(&blocks, drive_id(disk)) == Some(switch_node(tag, disk).as_str())
        };
        match (on(VmDisk::System), on(VmDisk::Work)) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            _ => Err(VmmError::Control {
                path: process.control_socket.display().to_string(),
                message: format!("only one of the VM's disks is on the new files of {tag}"),
            }),
        }
    }

    /// The drives are `werror=stop,rerror=stop`: a failed host write or read (a full data
    /// dir) pauses the guest, status `io-error`, instead of handing it the error; `query-block`
    /// says which drive and why (`nospace`, `failed`).
    async fn forward_port(
        &self,
        process: &VmProcess,
        port: &banger_proto::PortMapping,
        change: PortForward,
    ) -> Result<(), VmmError> {
        let command = match change {
            PortForward::Add => format!("hostfwd_add {NETDEV_ID} {}", hostfwd(port)),
            PortForward::Remove => format!("hostfwd_remove {NETDEV_ID} {}", hostfwd_host(port)),
        };
        let answer = qmp::human_monitor_command(&process.control_socket, &command).await?;
        if hmp_succeeded(&answer) {
            Ok(())
        } else {
            Err(VmmError::Control {
                path: process.control_socket.display().to_string(),
                message: format!("QEMU refused `{command}`: {}", answer.trim()),
            })
        }
    }

    async fn io_error(&self, process: &VmProcess) -> Result<Option<String>, VmmError> {
        let status = qmp::execute(&process.control_socket, "query-status").await?;
        if status.get("status").and_then(|s| s.as_str()) != Some("io-error") {
            return Ok(None);
        }
        let blocks = qmp::execute(&process.control_socket, "query-block").await?;
        Ok(Some(describe_io_error(&blocks)))
    }
}

/// Which way a migration URI moves a VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Save,
    Load,
}

/// Polls `query-migrate` until the migration completed (`Ok`), failed, or `MIGRATE_LIMIT`
/// passed. A QEMU before 9.1 exits when a load fails: a query that fails once `alive` says
/// the process is gone is that failure.
async fn wait_migration(qmp: &Path, what: &str, alive: impl Fn() -> bool) -> Result<(), VmmError> {
    let failed = |message: String| VmmError::Control {
        path: qmp.display().to_string(),
        message: format!("cannot {what}: {message}"),
    };
    let deadline = Instant::now() + MIGRATE_LIMIT;
    loop {
        match qmp::execute(qmp, "query-migrate").await {
            Ok(info) => match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let why = info
                        .get("error-desc")
                        .and_then(|d| d.as_str())
                        .unwrap_or(status);
                    return Err(failed(why.to_owned()));
                }
                _ => {}
            },
            Err(_) if !alive() => {
                return Err(failed(
                    "QEMU exited (the state file is not one it can load)".into(),
                ));
            }
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "not done within {}s",
                MIGRATE_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `-drive` id of a disk (what QMP's block commands name as `device`).
fn drive_id(disk: VmDisk) -> &'static str {
    match disk {
        VmDisk::System => "sys",
        VmDisk::Work => "work",
    }
}

/// The node name of `disk`'s new top in the switch tagged `tag`.
fn switch_node(tag: &str, disk: VmDisk) -> String {
    match disk {
        VmDisk::System => format!("{tag}s"),
        VmDisk::Work => format!("{tag}w"),
    }
}

/// The node name of the image `device` reads and writes (its top), per `query-block`.
fn top_node<'a>(blocks: &'a serde_json::Value, device: &str) -> Option<&'a str> {
    blocks
        .as_array()?
        .iter()
        .find(|b| b.get("device").and_then(|d| d.as_str()) == Some(device))?
        .get("inserted")?
        .get("node-name")?
        .as_str()
}

/// The disks' switch proper (see [`Hypervisor::switch_disks`]).
async fn switch_transaction(process: &VmProcess, switch: &DiskSwitch) -> Result<(), VmmError> {
    let actions: Vec<serde_json::Value> = [
        (VmDisk::System, &switch.system),
        (VmDisk::Work, &switch.work),
    ]
    .into_iter()
    .map(|(disk, file)| {
        json!({
            "type": "blockdev-snapshot-sync",
            "data": {
                "device": drive_id(disk),
                "snapshot-file": file.display().to_string(),
                "snapshot-node-name": switch_node(&switch.tag, disk),
                "format": "qcow2",
                "mode": "existing",
            }
        })
    })
    .collect();
    qmp::execute_with(
        &process.control_socket,
        "transaction",
        Some(json!({ "actions": actions })),
    )
    .await
    .map(drop)
}

/// The file name QEMU has for the image `device` reads and writes (its top), per
/// `query-block`: a plain path, or for a node a switch made (its backing given, not read
/// from its header) a `json:` description whose `file.filename` is the path.
fn active_file(blocks: &serde_json::Value, device: &str) -> Option<PathBuf> {
    let name = blocks
        .as_array()?
        .iter()
        .find(|b| b.get("device").and_then(|d| d.as_str()) == Some(device))?
        .get("inserted")?
        .get("file")?
        .as_str()?;
    match name.strip_prefix("json:") {
        None => Some(PathBuf::from(name)),
        Some(json) => serde_json::from_str::<serde_json::Value>(json)
            .ok()?
            .get("file")?
            .get("filename")?
            .as_str()
            .map(PathBuf::from),
    }
}

/// The virtual size `query-block` reports for `device`.
fn current_size(blocks: &serde_json::Value, device: &str) -> Option<u64> {
    blocks
        .as_array()?
        .iter()
        .find(|b| b.get("device").and_then(|d| d.as_str()) == Some(device))?
        .get("inserted")?
        .get("image")?
        .get("virtual-size")?
        .as_u64()
}

/// "`work` disk: no space left on the host" (one entry a failed drive) from `query-block`.
fn describe_io_error(blocks: &serde_json::Value) -> String {
    let failed: Vec<String> = blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let status = b.get("io-status")?.as_str()?;
            let why = match status {
                "ok" => return None,
                "nospace" => "no space left on the host",
                _ => "the host's read or write failed",
            };
            Some(format!("{} disk: {why}", b.get("device")?.as_str()?))
        })
        .collect();
    if failed.is_empty() {
        "a host read or write failed".into()
    } else {
        failed.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_is_told_by_the_drives_top_nodes() {
        let blocks = serde_json::json!([
            { "device": "sys", "inserted": { "node-name": "snapabcs" } },
            { "device": "work", "inserted": { "node-name": "#block123" } },
        ]);
        assert_eq!(switch_node("snapabc", VmDisk::System), "snapabcs");
        assert_eq!(switch_node("snapabc", VmDisk::Work), "snapabcw");
        assert_eq!(top_node(&blocks, "sys"), Some("snapabcs"));
        assert_eq!(top_node(&blocks, "work"), Some("#block123"));
        assert_eq!(top_node(&blocks, "other"), None);
    }

    #[test]
    fn drives_keep_their_fds_when_they_become_backings() {
        let spec_args = Qemu::new("qemu-system-x86_64".into()).args(&spec(Accel::Tcg));
        let drives: Vec<&String> = spec_args
            .iter()
            .filter(|a| a.starts_with("id=sys,") || a.starts_with("id=work,"))
            .collect();
        assert_eq!(drives.len(), 2, "{spec_args:?}");
        assert!(drives.iter().all(|d| d.contains("auto-read-only=off")));
    }

    #[test]
    fn hostfwd_rules_and_monitor_answers() {
        let p = banger_proto::PortMapping::parse("8080:8000").unwrap();
        assert_eq!(hostfwd(&p), "tcp:127.0.0.1:8080-:8000");
        let udp = banger_proto::PortMapping::parse("8080:8000/udp").unwrap();
        assert_eq!(hostfwd_host(&udp), "udp:127.0.0.1:8080");
        assert!(hmp_succeeded(""));
        assert!(hmp_succeeded(
            "host forwarding rule for tcp:127.0.0.1:8080 removed\r\n"
        ));
        assert!(!hmp_succeeded(
            "Could not set up host forwarding rule 'tcp:127.0.0.1:8080-:80'\r\n"
        ));
    }

    #[test]
    fn io_errors_name_the_drive_and_the_cause() {
        let blocks = serde_json::json!([
            {"device": "sys", "io-status": "ok"},
            {"device": "work", "io-status": "nospace"},
        ]);
        assert_eq!(
            describe_io_error(&blocks),
            "work disk: no space left on the host"
        );
        assert_eq!(
            describe_io_error(&serde_json::json!([])),
            "a host read or write failed"
        );
    }

    fn spec(accel: Accel) -> LaunchSpec {
        LaunchSpec {
            vm_id: "0123456789abcdef0123456789abcdef".into(),
            vm_name: "t".into(),
            cpus: 2,
            memory_mib: 512,
            accel,
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0 tsc_early_khz=1".into(),
            system_disk: "/s".into(),
            system_disk_format: "qcow2",
            work_disk: "/w".into(),
            work_disk_format: "raw",
            runtime_dir: "/run/t".into(),
            console_log: "/c".into(),
            net: NetAttach::User {
                ssh_port: 2222,
                isolated: false,
                ports: vec![],
            },
            mac: "52:54:00:01:02:03".into(),
            tap: None,
            tap_fd: None,
            devices: DeviceDiscovery::Acpi,
        }
    }

    fn accel_arg(qemu: &Qemu, accel: Accel) -> String {
        let args = qemu.args(&spec(accel));
        let at = args.iter().position(|a| a == "-accel").unwrap();
        args[at + 1].clone()
    }

    #[test]
    fn tcg_is_single_threaded_unless_configured() {
        let qemu = Qemu::new("qemu".into());
        assert_eq!(accel_arg(&qemu, Accel::Tcg), "tcg,thread=single");
        assert_eq!(accel_arg(&qemu, Accel::Kvm), "kvm");
        let multi = Qemu::new("qemu".into()).with_tcg_threads(TcgThreads::Multi);
        assert_eq!(accel_arg(&multi, Accel::Tcg), "tcg,thread=multi");
    }

    #[test]
    fn suspend_writes_a_file_uri_from_8_2_and_goes_through_cat_before() {
        let v = |major, minor| Some(QemuVersion { major, minor });
        let state = Path::new("/d/vms/x/snapshot.state");
        let new = Qemu::new("qemu".into()).with_version(v(10, 0));
        for (version, save, load) in [
            (
                v(10, 0),
                "file:/d/vms/x/snapshot.state",
                "file:/d/vms/x/snapshot.state",
            ),
            (
                v(8, 2),
                "file:/d/vms/x/snapshot.state",
                "file:/d/vms/x/snapshot.state",
            ),
            (
                v(8, 1),
                "exec:cat > /d/vms/x/snapshot.state",
                "exec:cat /d/vms/x/snapshot.state",
            ),
            (
                v(7, 2),
                "exec:cat > /d/vms/x/snapshot.state",
                "exec:cat /d/vms/x/snapshot.state",
            ),
            (
                None,
                "exec:cat > /d/vms/x/snapshot.state",
                "exec:cat /d/vms/x/snapshot.state",
            ),
        ] {
            let qemu = Qemu::new("qemu".into()).with_version(version);
            assert_eq!(
                qemu.migration_uri(state, Direction::Save),
                save,
                "{version:?}"
            );
            assert_eq!(
                qemu.migration_uri(state, Direction::Load),
                load,
                "{version:?}"
            );
        }
        // `file:` would read a comma as an option; the shell gets the path quoted.
        let odd = Path::new("/d/it's, here/snapshot.state");
        assert_eq!(
            new.migration_uri(odd, Direction::Save),
            r"exec:cat > '/d/it'\''s, here/snapshot.state'"
        );
    }

    #[test]
    fn every_vm_has_a_balloon_that_reports_free_pages() {
        let args = Qemu::new("qemu".into()).args(&spec(Accel::Tcg)).join(" ");
        assert!(
            args.contains("-device virtio-balloon-device,free-page-reporting=on"),
            "{args}"
        );
    }

    #[test]
    fn the_firmware_is_qboot() {
        let args = Qemu::new("qemu".into()).args(&spec(Accel::Tcg));
        let at = args.iter().position(|a| a == "-bios").unwrap();
        assert_eq!(args[at + 1], "qboot.rom");
    }

    #[test]
    fn qemu_runs_under_its_seccomp_sandbox() {
        let args = Qemu::new("qemu".into()).args(&spec(Accel::Tcg));
        let at = args.iter().position(|a| a == "-sandbox").unwrap();
        assert_eq!(args[at + 1], "on,resourcecontrol=deny");
    }

    #[test]
    fn versions_are_read_from_the_banner() {
        let v = parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright");
        assert_eq!(
            v,
            Some(QemuVersion {
                major: 10,
                minor: 0
            })
        );
        let old = parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)");
        assert!(!mttcg_is_safe(old.unwrap()));
        assert!(mttcg_is_safe(v.unwrap()));
        assert!(mttcg_is_safe(
            parse_version("QEMU emulator version 8.1.0").unwrap()
        ));
        assert!(!mttcg_is_safe(
            parse_version("QEMU emulator version 8.0.5").unwrap()
        ));
        assert_eq!(parse_version("not qemu"), None);
    }

    #[test]
    fn explicit_tcg_threads_need_no_probe() {
        let missing = Path::new("/nonexistent/qemu");
        let single = Qemu::new(missing.into()).with_tcg_threads(TcgThreads::Single);
        assert_eq!(accel_arg(&single, Accel::Tcg), "tcg,thread=single");
        let multi = Qemu::new(missing.into()).with_tcg_threads(TcgThreads::Multi);
        assert_eq!(accel_arg(&multi, Accel::Tcg), "tcg,thread=multi");
        // A binary that cannot tell its version gets the safe choice.
        let auto = Qemu::new(missing.into()).with_tcg_threads(TcgThreads::Auto);
        assert_eq!(accel_arg(&auto, Accel::Tcg), "tcg,thread=single");
    }

    #[test]
    fn the_workspace_channel_is_a_named_port_on_a_socket_in_the_runtime_dir() {
        let args = Qemu::new("qemu".into()).args(&spec(Accel::Tcg));
        let joined = args.join(" ");
        assert!(
            joined.contains("-chardev socket,id=ws,path=/run/t/workspace.sock,server=on,wait=off"),
            "{joined}"
        );
        assert!(
            joined.contains("virtserialport,chardev=ws,name=org.banger.workspace"),
            "{joined}"
        );
    }

    #[test]
    fn a_command_line_kernel_gets_acpi_off_and_a_keyboard_for_ctrl_alt_del() {
        let acpi = Qemu::new("qemu".into()).args(&spec(Accel::Tcg)).join(" ");
        assert!(
            acpi.contains("acpi=on") && !acpi.contains("i8042"),
            "{acpi}"
        );
        let mut cmdline = spec(Accel::Tcg);
        cmdline.devices = DeviceDiscovery::CommandLine;
        let args = Qemu::new("qemu".into()).args(&cmdline).join(" ");
        assert!(args.contains("acpi=off,pic=on,pit=on"), "{args}");
        assert!(args.contains("-device i8042"), "{args}");
    }

    #[test]
    fn the_active_file_is_a_path_or_the_file_of_a_json_description() {
        let blocks = json!([
            {"device": "sys", "inserted": {"file": "/v/system.qcow2"}},
            {"device": "work", "inserted": {"file": "json:{\"backing\": {\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/v/work.qcow2\"}}, \"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/v/work.qcow2.live-abc\"}}"}},
        ]);
        assert_eq!(
            active_file(&blocks, "sys"),
            Some(PathBuf::from("/v/system.qcow2"))
        );
        assert_eq!(
            active_file(&blocks, "work"),
            Some(PathBuf::from("/v/work.qcow2.live-abc"))
        );
        assert_eq!(active_file(&blocks, "other"), None);
    }

    #[test]
    fn the_drive_size_is_read_from_query_block() {
        let blocks = serde_json::json!([
            { "device": "sys", "inserted": { "image": { "virtual-size": 8589934592u64 } } },
            { "device": "work", "inserted": { "image": { "virtual-size": 2147483648u64 } } },
            { "device": "empty" },
        ]);
        assert_eq!(current_size(&blocks, "work"), Some(2 << 30));
        assert_eq!(
            current_size(&blocks, drive_id(VmDisk::System)),
            Some(8 << 30)
        );
        assert_eq!(current_size(&blocks, "empty"), None);
        assert_eq!(current_size(&blocks, "none"), None);
        assert_eq!(current_size(&serde_json::json!({}), "work"), None);
    }

    fn netdev(spec: &LaunchSpec) -> String {
        let args = Qemu::new("qemu".into()).args(spec);
        let at = args.iter().position(|a| a == "-netdev").unwrap();
        args[at + 1].clone()
    }

    #[test]
    fn user_mode_has_egress_unless_isolated_and_forwards_published_ports() {
        let mut spec = spec(Accel::Tcg);
        assert_eq!(
            netdev(&spec),
            "user,id=n0,restrict=off,hostfwd=tcp:127.0.0.1:2222-:22"
        );
        spec.net = NetAttach::User {
            ssh_port: 2222,
            isolated: true,
            ports: vec![
                banger_proto::PortMapping::parse("8080:8000").unwrap(),
                banger_proto::PortMapping::parse("0.0.0.0:5353:53/udp").unwrap(),
            ],
        };
        assert_eq!(
            netdev(&spec),
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,\
             hostfwd=tcp:127.0.0.1:8080-:8000,hostfwd=udp:0.0.0.0:5353-:53"
        );
    }
}
