//! The Firecracker backend against the fake Firecracker (`banger-fc-fake`, which validates
//! every request against Firecracker's OpenAPI file and enforces its state machine): launch,
//! pause/resume, snapshot create/load, and the §5 stop sequence (sync attempt over SSH →
//! SendCtrlAltDel → quit → kill). No guest runs in the fake, so SSH readiness is not part of
//! this; the daemon-level tests below check the backend choice and its refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fake_manager.rs"]
mod fake_manager;

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_core::config::Config;
use banger_core::domain::{NetMode, SystemDiskChoice, VmmChoice};
use banger_core::guest::ssh::SshTarget;
use banger_core::layout::Layout;
use banger_core::service::{Manager, Seams};
use banger_core::vmm::accel::AccelChoice;
use banger_core::vmm::firecracker::{ApiClient, Firecracker};
use banger_core::vmm::{
    Accel, Hypervisor, LaunchSpec, Snapshot, StopTimings, VmProcess, VmmError, process,
    stop_sequence,
};
use banger_e2e::{TestEnv, bin};
use banger_proto::{CreateVmRequest, ImportImageRequest, VmState};
use serde_json::Value;

/// A `firecracker` on a PATH-like dir: a wrapper exec'ing the fake with test knobs.
struct FakeInstall {
    dir: tempfile::TempDir,
    record: PathBuf,
}

impl FakeInstall {
    fn new(knobs: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("requests.jsonl");
        let script = format!(
            "#!/bin/sh\nexec {} --record {} {} \"$@\"\n",
            bin("banger-fc-fake").display(),
            record.display(),
            knobs.join(" ")
        );
        let binary = dir.path().join("firecracker");
        std::fs::write(&binary, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir, record }
    }

    /// A `firecracker` that runs `command` with banger's arguments (the real binary).
    fn wrapping(command: &str) -> Self {
        let install = Self::new(&[]);
        let script = format!("#!/bin/sh\nexec {command} \"$@\"\n");
        std::fs::write(install.dir.path().join("firecracker"), script).unwrap();
        install
    }

    fn backend(&self) -> Firecracker {
        Firecracker::new(self.dir.path().join("firecracker"))
    }

    /// (method, path, status, fault) of every request the fake answered.
    fn requests(&self) -> Vec<(String, String, u64, Value, Value)> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["method"].as_str().unwrap().to_owned(),
                    v["path"].as_str().unwrap().to_owned(),
                    v["status"].as_u64().unwrap(),
                    v["body"].clone(),
                    v["fault"].clone(),
                )
            })
            .collect()
    }
}

/// The files of one VM, like the daemon lays them out.
fn spec(dir: &Path, name: &str) -> LaunchSpec {
    let vm_dir = dir.join(name);
    let runtime_dir = vm_dir.join("run");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    for file in ["vmlinux", "initrd.img", "system.raw", "work.ext4"] {
        std::fs::write(vm_dir.join(file), b"x").unwrap();
    }
    LaunchSpec {
        vm_id: format!("0123456789abcdef0123456789{name:0>6}"),
        vm_name: name.into(),
        cpus: 2,
        memory_mib: 512,
        accel: Accel::Kvm,
        kernel: vm_dir.join("vmlinux"),
        initrd: Some(vm_dir.join("initrd.img")),
        cmdline: format!(
            "console=ttyS0 root=/dev/vda rw {} banger.hostname={name}",
            banger_core::vmm::firecracker::BOOT_ARGS
        ),
        system_disk: vm_dir.join("system.raw"),
        system_disk_format: "raw",
        work_disk: vm_dir.join("work.ext4"),
        work_disk_format: "raw",
        runtime_dir,
        console_log: vm_dir.join("console.log"),
        net: banger_core::vmm::NetAttach::User {
            ssh_port: 0,
            isolated: true,
            ports: Vec::new(),
        },
        mac: "52:54:00:01:02:03".into(),
        tap: Some("bg-tap-0".into()),
        tap_fd: None,
        devices: banger_core::vmm::DeviceDiscovery::CommandLine,
    }
}

/// Kills what a test launched, even when it fails half-way.
struct Reaper(Vec<(u32, String)>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, marker) in &self.0 {
            if process::is_alive(*pid, marker) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A temp dir with a short path under /tmp: socket paths inside it stay under the 108-byte limit.
fn short_tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

async fn state(process: &VmProcess) -> String {
    let info = ApiClient::new(&process.control_socket)
        .call("GET", "/", None)
        .await
        .unwrap()
        .unwrap();
    info["state"].as_str().unwrap().to_owned()
}

/// Step 1 of the stop for real: SSH `sync` to where no guest answers (the fake runs none).
async fn sync_attempt() -> bool {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let target = SshTarget {
        host: "127.0.0.1".into(),
        port,
        user: "root".into(),
        identity: "/nonexistent/key".into(),
        known_hosts: "/dev/null".into(),
        host_key_alias: "x.vm".into(),
        control_path: None,
    };
    matches!(
        banger_core::guest::ssh::run(
            &target,
            "sync",
            Duration::from_secs(5),
            Duration::from_secs(10)
        )
        .await,
        Ok((Some(0), _, _))
    )
}

const TIMINGS: StopTimings = StopTimings {
    poweroff: Duration::from_secs(5),
    signal: Duration::from_secs(5),
    quit: Duration::from_secs(2),
};

#[tokio::test]
async fn lifecycle_against_the_fake_firecracker() {
    let install = FakeInstall::new(&[]);
    let fc = install.backend();
    assert_eq!(fc.version().await.unwrap(), (1, 17, 0));
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "one");
    let mut reaper = Reaper(Vec::new());

    // Launch: every request of the boot conversation is accepted by the spec and the state
    // machine, in this order.
    let process = fc.launch(&spec).await.unwrap();
    reaper.0.push((process.pid, spec.vm_id.clone()));
    assert!(process::is_alive(process.pid, &spec.vm_id));
    let requests = install.requests();
    let paths: Vec<(&str, &str, u64)> = requests
        .iter()
        .map(|(m, p, s, _, _)| (m.as_str(), p.as_str(), *s))
        .collect();
    assert_eq!(
        paths,
        [
            ("PUT", "/metrics", 204),
            ("PUT", "/machine-config", 204),
            ("PUT", "/boot-source", 204),
            ("PUT", "/drives/sys", 204),
            ("PUT", "/drives/work", 204),
            ("PUT", "/network-interfaces/eth0", 204),
            ("PUT", "/entropy", 204),
            ("PUT", "/actions", 204),
        ]
    );
    let boot_args = requests[2].3["boot_args"].as_str().unwrap();
    assert!(
        boot_args.contains("reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"),
        "{boot_args}"
    );
    assert_eq!(requests[7].3["action_type"], "InstanceStart");
    // Its log (from `--log-path`, levels shown) is the VM's, beside the console log.
    let log = std::fs::read_to_string(dir.path().join("one/firecracker.log")).unwrap();
    assert!(log.contains(":main:INFO] Running Firecracker v"), "{log}");
    assert_eq!(state(&process).await, "Running");

    // Pause/resume; a snapshot of a running VM is refused with Firecracker's own message.
    let snap = Snapshot {
        state: dir.path().join("vm.snap"),
        memory: dir.path().join("vm.mem"),
    };
    let err = fc.snapshot(&process, &snap).await.unwrap_err();
    assert!(matches!(err, VmmError::Api { status: 400, .. }), "{err}");
    assert!(err.to_string().contains("must be paused"), "{err}");
    fc.pause(&process).await.unwrap();
    assert_eq!(state(&process).await, "Paused");
    fc.snapshot(&process, &snap).await.unwrap();
    assert!(snap.state.is_file() && snap.memory.is_file());
    fc.resume(&process).await.unwrap();
    assert_eq!(state(&process).await, "Running");

    // Stop: the SSH sync finds no guest, SendCtrlAltDel ends the process (the fake's guest
    // "reboots" and Firecracker exits, as with `reboot=k`).
    let synced = sync_attempt().await;
    assert!(!synced);
    let vmm = fc.clone();
    let how = stop_sequence(&vmm, &process, &spec.vm_id, synced, false, TIMINGS).await;
    assert_eq!(how.as_str(), "ctrl-alt-del");
    assert!(!process::is_alive(process.pid, &spec.vm_id));
    assert_eq!(
        install.requests().last().unwrap().3["action_type"],
        "SendCtrlAltDel"
    );

    // Restore from the snapshot in a fresh process: logger, metrics, then only the load.
    let restored_spec = self::spec(dir.path(), "two");
    let before = install.requests().len();
    let restored = fc.restore(&restored_spec, &snap).await.unwrap();
    reaper.0.push((restored.pid, restored_spec.vm_id.clone()));
    let after: Vec<(String, String, u64)> = install.requests()[before..]
        .iter()
        .map(|(m, p, s, _, _)| (m.clone(), p.clone(), *s))
        .collect();
    assert_eq!(
        after,
        [
            ("PUT".to_owned(), "/metrics".to_owned(), 204),
            ("PUT".into(), "/snapshot/load".into(), 204),
        ]
    );
    assert_eq!(state(&restored).await, "Running");
    let how = stop_sequence(&vmm, &restored, &restored_spec.vm_id, false, false, TIMINGS).await;
    assert_eq!(how.as_str(), "ctrl-alt-del");
}

#[tokio::test]
async fn stop_falls_back_to_quit_then_kill() {
    // A guest without i8042: Ctrl-Alt-Del does nothing; SIGTERM (quit) ends Firecracker.
    let install = FakeInstall::new(&["--ctrl-alt-del", "ignore"]);
    let fc = install.backend();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "deaf");
    let mut reaper = Reaper(Vec::new());
    let process = fc.launch(&spec).await.unwrap();
    reaper.0.push((process.pid, spec.vm_id.clone()));
    let vmm = fc;
    let how = stop_sequence(
        &vmm,
        &process,
        &spec.vm_id,
        sync_attempt().await,
        false,
        TIMINGS,
    )
    .await;
    assert_eq!(how.as_str(), "quit");
    assert!(!process::is_alive(process.pid, &spec.vm_id));

    // A hung VMM that ignores SIGTERM too: only the kill ends it.
    let hung = FakeInstall::new(&["--ctrl-alt-del", "ignore", "--ignore-sigterm"]);
    let fc = hung.backend();
    let spec = self::spec(dir.path(), "hung");
    let process = fc.launch(&spec).await.unwrap();
    reaper.0.push((process.pid, spec.vm_id.clone()));
    let vmm = fc;
    let how = stop_sequence(&vmm, &process, &spec.vm_id, false, false, TIMINGS).await;
    assert_eq!(how.as_str(), "kill");
    assert!(!process::is_alive(process.pid, &spec.vm_id));
    let actions: Vec<Value> = hung
        .requests()
        .into_iter()
        .filter(|(_, p, _, _, _)| p == "/actions")
        .map(|(_, _, _, body, _)| body["action_type"].clone())
        .collect();
    assert_eq!(actions, ["InstanceStart", "SendCtrlAltDel"]);
}

#[tokio::test]
async fn failed_launches_leave_no_process() {
    let install = FakeInstall::new(&[]);
    let fc = install.backend();
    let dir = tempfile::tempdir().unwrap();

    // No tap: refused before anything is spawned.
    let mut no_tap = spec(dir.path(), "notap");
    no_tap.tap = None;
    assert!(matches!(fc.launch(&no_tap).await, Err(VmmError::NeedsTap)));
    assert!(install.requests().is_empty(), "nothing was spawned");

    // A missing disk: Firecracker's fault message reaches banger's error, the process is
    // killed.
    let broken = spec(dir.path(), "broken");
    std::fs::remove_file(&broken.work_disk).unwrap();
    let err = fc.launch(&broken).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("PUT /drives/work") && text.contains("No such file"),
        "{text}"
    );
    let pids = banger_e2e::processes_with_cmdline("banger-fc-fake", &broken.vm_id);
    assert!(pids.is_empty(), "fake still running: {pids:?}");

    // A missing binary is named.
    let missing = Firecracker::new("/nonexistent/firecracker".into());
    let err = missing.version().await.unwrap_err();
    assert!(matches!(err, VmmError::MissingBinary(_)), "{err}");
}

#[test]
fn firecracker_without_its_binary_or_network_changes_nothing() {
    let env = TestEnv::new();
    std::fs::write(
        env.config_file(),
        "[defaults]\nvmm = \"firecracker\"\n[firecracker]\nbinary = \"/nonexistent/firecracker\"\n",
    )
    .unwrap();
    env.import_stub_image();
    let run = env.banger(&["vm", "create", "fc"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("/nonexistent/firecracker is not installed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("firecracker.binary") && run.stderr.contains("--vmm qemu"),
        "{}",
        run.stderr
    );
    let listed = env.banger(&["vm", "ls", "--json"]).ok().json();
    assert_eq!(listed, serde_json::json!([]));
    let vms = env.home().join("vms");
    assert!(
        std::fs::read_dir(&vms).map(|d| d.count()).unwrap_or(0) == 0,
        "no VM files"
    );

    // Too old a Firecracker is named with its version.
    let old = tempfile::tempdir().unwrap();
    let old_fc = old.path().join("firecracker");
    std::fs::write(&old_fc, "#!/bin/sh\necho 'Firecracker v1.2.0'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old_fc, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        env.config_file(),
        format!("[firecracker]\nbinary = \"{}\"\n", old_fc.display()),
    )
    .unwrap();
    env.banger(&["daemon", "stop"]).ok();
    let run = env.banger(&["vm", "create", "fc", "--vmm", "firecracker"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("version 1.2.0; banger needs 1.5.0 or newer"),
        "{}",
        run.stderr
    );
    assert_eq!(
        env.banger(&["vm", "ls", "--json"]).ok().json(),
        serde_json::json!([])
    );

    // With a (fake) binary present, the missing piece is bridge networking.
    let install = FakeInstall::new(&[]);
    let fc_path = install.dir.path().join("firecracker");
    std::fs::write(
        env.config_file(),
        format!(
            "[defaults]\nvmm = \"firecracker\"\n[firecracker]\nbinary = \"{}\"\n",
            fc_path.display()
        ),
    )
    .unwrap();
    env.banger(&["daemon", "stop"]).ok();
    let run = env.banger(&["vm", "create", "fc"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("Firecracker needs bridge networking"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--vmm qemu"), "{}", run.stderr);
    assert_eq!(
        env.banger(&["vm", "ls", "--json"]).ok().json(),
        serde_json::json!([])
    );

    // --vmm qemu works regardless; auto says why it fell back to QEMU.
    env.banger(&["vm", "create", "q", "--vmm", "qemu"]).ok();
    env.banger(&["vm", "create", "a", "--vmm", "auto"]).ok();
    let q = env.banger(&["vm", "show", "q", "--json"]).ok().json();
    assert_eq!(q["spec"]["vmm"], "qemu");
    assert_eq!(q["spec"]["system_disk"], "qcow2");
    let a = env.banger(&["vm", "show", "a"]).ok();
    assert!(
        a.stdout
            .contains("auto: qemu, because Firecracker needs bridge networking"),
        "{}",
        a.stdout
    );
}

#[test]
fn kernel_import_warns_when_firecracker_cannot_use_the_kernel() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00stub").unwrap();
    // Debian's cloud kernel: virtio-mmio devices only through ACPI.
    std::fs::write(
        dir.path().join("config"),
        "CONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n",
    )
    .unwrap();
    let run = env
        .banger(&[
            "kernel",
            "import",
            "cloud",
            "--kernel",
            kernel.to_str().unwrap(),
        ])
        .ok();
    assert!(
        run.stdout.contains("Imported kernel cloud"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("warning") && run.stderr.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
        "{}",
        run.stderr
    );
    // A kernel Firecracker can boot imports without a warning.
    std::fs::write(
        dir.path().join("config"),
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_NET=y\nCONFIG_SERIO_I8042=y\nCONFIG_KEYBOARD_ATKBD=y\n",
    )
    .unwrap();
    let run = env
        .banger(&[
            "kernel",
            "import",
            "fc",
            "--kernel",
            kernel.to_str().unwrap(),
        ])
        .ok();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

#[test]
fn qemu_vms_can_use_raw_system_disks() {
    let env = TestEnv::new();
    std::fs::write(env.config_file(), "[defaults]\nsystem_disk = \"copy\"\n").unwrap();
    env.import_stub_image();
    let vm = env
        .banger(&["vm", "create", "raw", "--vmm", "qemu", "--json"])
        .ok()
        .json();
    assert_eq!(vm["spec"]["system_disk"], "copy");
    let id = vm["id"].as_str().unwrap();
    let rootfs = env.image_rootfs("default");
    let raw = env.home().join("vms").join(id).join("system.raw");
    // The copy holds the image, then a hole up to the system disk's virtual size (8 GiB by
    // default): compare the image's length only, never read the whole disk.
    let image_bytes = std::fs::read(&rootfs).unwrap();
    let mut copied = vec![0u8; image_bytes.len()];
    {
        use std::io::Read;
        std::fs::File::open(&raw)
            .unwrap()
            .read_exact(&mut copied)
            .unwrap();
    }
    assert!(copied == image_bytes, "the copy differs from the image");
    assert!(std::fs::metadata(&raw).unwrap().len() >= image_bytes.len() as u64);
    assert!(
        !env.home()
            .join("vms")
            .join(id)
            .join("system.qcow2")
            .exists()
    );

    // reflink where the file system cannot clone: refused at create, nothing left.
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(env.home())
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_owned();
    if fs != "xfs" && fs != "btrfs" {
        std::fs::write(env.config_file(), "[defaults]\nsystem_disk = \"reflink\"\n").unwrap();
        env.banger(&["daemon", "stop"]).ok();
        let run = env.banger(&["vm", "create", "clone", "--vmm", "qemu"]);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("cannot reflink"), "{}", run.stderr);
        let listed = env.banger(&["vm", "ls", "--json"]).ok().json();
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        let dirs = std::fs::read_dir(env.home().join("vms")).unwrap().count();
        assert_eq!(dirs, 1, "no directory left for the refused VM");
    }
}

/// A Manager (the daemon's logic, in process) whose Firecracker is the fake, with the seams
/// the fake cannot provide: a tap name (banger-helper's job), KVM assumed, no SSH readiness.
async fn fake_manager(install: &FakeInstall, dir: &Path) -> Manager {
    fake_manager_with(install, dir, |_| {}).await
}

/// The Manager of [`fake_manager`] on `dir` without importing the image (a second Manager on
/// the same data dir is a daemon restart).
fn open_fake_manager(
    install: &FakeInstall,
    dir: &Path,
    tweak: impl FnOnce(&mut Config),
) -> Manager {
    fake_manager::open(dir, &install.dir.path().join("firecracker"), tweak)
}

/// [`fake_manager`] with the config adjusted by `tweak`.
async fn fake_manager_with(
    install: &FakeInstall,
    dir: &Path,
    tweak: impl FnOnce(&mut Config),
) -> Manager {
    let manager = open_fake_manager(install, dir, tweak);
    fake_manager::import_stub(&manager, dir).await;
    manager
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manager_lifecycle_runs_against_the_fake() {
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgfc");
    let manager = fake_manager(&install, dir.path()).await;
    let mut reaper = Reaper(Vec::new());

    // create: Firecracker chosen, a raw system disk made.
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "fc".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(vm.spec.vmm, "firecracker", "{}", vm.spec.vmm_reason);
    assert!(
        ["reflink", "copy"].contains(&vm.spec.system_disk.as_str()),
        "{}",
        vm.spec.system_disk
    );
    let vm_dir = dir.path().join("home/vms").join(&vm.id);
    assert!(vm_dir.join("system.raw").is_file());

    for round in 0..2 {
        // start: the whole boot conversation through the lifecycle steps.
        let before = install.requests().len();
        let started = manager.start_vm("fc").await.unwrap();
        let runtime = started.vm.runtime.clone().unwrap();
        assert_eq!(runtime.vmm, "firecracker");
        let pid = runtime.pid.unwrap();
        reaper.0.push((pid, vm.id.clone()));
        assert!(process::is_alive(pid, &vm.id));
        let requests = install.requests()[before..].to_vec();
        assert!(
            requests.iter().all(|r| r.2 == 204),
            "round {round}: {requests:?}"
        );
        let body = |path: &str| {
            requests
                .iter()
                .find(|r| r.1 == path)
                .map(|r| r.3.clone())
                .unwrap_or_else(|| panic!("no {path} in {requests:?}"))
        };
        let boot_args = body("/boot-source")["boot_args"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            boot_args.contains("banger.hostname=fc") && boot_args.contains("reboot=k"),
            "{boot_args}"
        );
        assert!(
            body("/drives/sys")["path_on_host"]
                .as_str()
                .unwrap()
                .ends_with("system.raw")
        );
        assert!(
            body("/drives/work")["path_on_host"]
                .as_str()
                .unwrap()
                .ends_with("work.ext4")
        );
        assert_eq!(
            body("/network-interfaces/eth0")["host_dev_name"],
            "bg-tap-0"
        );
        assert_eq!(body("/machine-config")["vcpu_count"], 2);
        assert_eq!(requests.last().unwrap().3["action_type"], "InstanceStart");

        // stop: the SSH sync is attempted (nothing answers), then SendCtrlAltDel ends it.
        let stopped = manager.stop_vm("fc", false).await.unwrap();
        assert_eq!(
            stopped.stop_method.map(|m| m.as_str()),
            Some("ctrl-alt-del")
        );
        assert_eq!(stopped.vm.state, VmState::Stopped);
        assert!(!process::is_alive(pid, &vm.id));
        assert!(
            !dir.path().join("home/run/vms").join(&vm.id).exists(),
            "runtime dir removed"
        );
    }
    manager.remove_vm("fc").await.unwrap();
    assert!(!vm_dir.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manager_kills_a_firecracker_that_ignores_everything() {
    let install = FakeInstall::new(&["--ctrl-alt-del", "ignore", "--ignore-sigterm"]);
    let dir = short_tmp("bgfc");
    let manager = fake_manager(&install, dir.path()).await;
    let mut reaper = Reaper(Vec::new());
    manager
        .create_vm(CreateVmRequest {
            name: "hung".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = manager.start_vm("hung").await.unwrap();
    let pid = started.vm.runtime.unwrap().pid.unwrap();
    reaper.0.push((pid, started.vm.id.clone()));
    let stopped = manager.stop_vm("hung", false).await.unwrap();
    assert_eq!(stopped.stop_method.map(|m| m.as_str()), Some("kill"));
    assert_eq!(stopped.vm.state, VmState::Stopped);
    assert!(!process::is_alive(pid, &started.vm.id));

    // A launch Firecracker refuses (its kernel vanished: InstanceStart fails) is undone:
    // state back, nothing running, Firecracker's message in the error.
    for kernel in std::fs::read_dir(dir.path().join("home/kernels")).unwrap() {
        std::fs::remove_file(kernel.unwrap().path().join("vmlinux")).unwrap();
    }
    let err = manager.start_vm("hung").await.unwrap_err();
    let text = err.to_api().message;
    assert!(
        text.contains("PUT /actions") && text.contains("Cannot open kernel image"),
        "{text}"
    );
    let vm = manager.get_vm("hung").await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(vm.last_error.is_some());
    let pids = banger_e2e::processes_with_cmdline("banger-fc-fake", &started.vm.id);
    assert!(pids.is_empty(), "{pids:?}");
}

/// A Manager with `defaults.system_disk = "dm"` and user networking whose helper operations
/// go to `ops` (else to banger-helper's socket, where nothing answers in tests), with an
/// imported stand-in image. Answers the manager, the image and the data dir.
async fn dm_manager(
    install: &FakeInstall,
    dir: &Path,
    ops: Option<std::sync::Arc<banger_core::host::RecordingHost>>,
) -> (Manager, banger_proto::Image, std::path::PathBuf) {
    let home = dir.join("home");
    let layout = Layout::new(home.clone(), home.join("run"), dir.join("config.toml"));
    let mut config = Config::default();
    config.firecracker.binary = install.dir.path().join("firecracker").display().to_string();
    config.defaults.vmm = VmmChoice::Firecracker;
    config.defaults.system_disk = SystemDiskChoice::DmSnapshot;
    // No helper answers here, whatever runs on this machine.
    config.network.helper_socket = dir.join("no-helper.sock").display().to_string();
    // User networking, as when no helper answers: the seam's fake takes every privileged
    // operation, and the disk's are the ones these tests record.
    config.network.mode = banger_core::domain::NetMode::User;
    let manager = Manager::open(layout, config).unwrap().with_seams(Seams {
        tap: Some("bg-tap-0".into()),
        accel: Some(AccelChoice {
            accel: Accel::Kvm,
            reason: "test seam".into(),
        }),
        skip_readiness: true,
        host_ops: ops.map(|o| o as std::sync::Arc<dyn banger_core::host::HostOps>),
    });
    let image = fake_manager::import_stub(&manager, dir).await;
    (manager, image, home)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dm_system_disk_is_made_and_torn_down_through_the_helper_seam() {
    use banger_core::host::RecordingHost;
    use banger_proto::helper::HelperOp;
    use std::sync::Arc;
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgfc");
    let ops = Arc::new(RecordingHost::new());
    let (manager, image, home) = dm_manager(&install, dir.path(), Some(ops.clone())).await;
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "dm".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(vm.spec.system_disk, "dm");
    let base = home.join("images").join(&image.digest).join("rootfs.ext4");
    let cow = home.join("vms").join(&vm.id).join("system.cow");
    // dm names are host-wide: they carry the owner (`Layout::vm_dm_name`).
    let name = banger_proto::helper::dm_name(nix::unistd::getuid().as_raw(), &vm.id);
    assert_eq!(
        ops.calls(),
        [
            HelperOp::LoopAttach {
                file: base.display().to_string(),
                read_only: true
            },
            HelperOp::LoopAttach {
                file: cow.display().to_string(),
                read_only: false
            },
            HelperOp::DmSnapshotCreate {
                name: name.clone(),
                origin_loop: "/dev/loop0".into(),
                cow_loop: "/dev/loop1".into(),
            },
        ]
    );
    assert_eq!(
        std::fs::metadata(&cow).unwrap().len(),
        std::fs::metadata(&base).unwrap().len(),
        "cow as large as the image"
    );
    manager.remove_vm("dm").await.unwrap();
    assert_eq!(
        ops.calls()[3..],
        [
            HelperOp::DmRemove { name },
            // With the files attached, so loops that serve other files by now are left alone.
            HelperOp::LoopDetach {
                device: "/dev/loop1".into(),
                file: Some(cow.display().to_string()),
            },
            HelperOp::LoopDetach {
                device: "/dev/loop0".into(),
                file: Some(base.display().to_string()),
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dm_system_disk_the_helper_fails_to_map_is_undone() {
    use banger_core::host::RecordingHost;
    use banger_proto::helper::HelperOp;
    use std::sync::Arc;
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgfc");
    let ops = Arc::new(RecordingHost::failing_on(|op| {
        matches!(op, HelperOp::DmSnapshotCreate { .. })
    }));
    let (manager, _image, home) = dm_manager(&install, dir.path(), Some(ops.clone())).await;
    let err = manager
        .create_vm(CreateVmRequest {
            name: "dm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let text = err.to_api().message;
    assert!(text.contains("dm_snapshot_create"), "{text}");
    let calls = ops.calls();
    assert_eq!(calls.len(), 5, "{calls:?}");
    assert!(matches!(calls[2], HelperOp::DmSnapshotCreate { .. }));
    let attached = |op: &HelperOp| match op {
        HelperOp::LoopAttach { file, .. } => Some(file.clone()),
        _ => None,
    };
    assert_eq!(
        calls[3..],
        [
            HelperOp::LoopDetach {
                device: "/dev/loop1".into(),
                file: attached(&calls[1]),
            },
            HelperOp::LoopDetach {
                device: "/dev/loop0".into(),
                file: attached(&calls[0]),
            },
        ]
    );
    // Nothing of the VM is left: no record, no directory.
    assert!(manager.list_vms().await.unwrap().is_empty());
    let left = std::fs::read_dir(home.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "VM directory left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dm_system_disk_without_device_mapper_or_helper_is_refused_cleanly() {
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgfc");
    let (manager, _image, home) = dm_manager(&install, dir.path(), None).await;
    let err = manager
        .create_vm(CreateVmRequest {
            name: "dm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let api = err.to_api();
    assert!(
        api.message.contains("device-mapper")
            && api.message.contains("banger-helper")
            && !api.message.contains('\n'),
        "{}",
        api.message
    );
    if !Path::new("/dev/mapper/control").exists() {
        assert!(
            api.message
                .contains("/dev/mapper/control, which is missing"),
            "{}",
            api.message
        );
    }
    assert!(api.hint.unwrap_or_default().contains("helper install"));
    assert!(manager.list_vms().await.unwrap().is_empty());
    let left = std::fs::read_dir(home.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "nothing created");
}

/// The requests the fake answered since `before`: (method, path, status, body).
fn since(install: &FakeInstall, before: usize) -> Vec<(String, String, u64, Value)> {
    install.requests()[before..]
        .iter()
        .map(|(m, p, s, b, _)| (m.clone(), p.clone(), *s, b.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_suspend_against_the_fake() {
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgfc");
    let manager = fake_manager(&install, dir.path()).await;
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "sus".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let vm_dir = dir.path().join("home/vms").join(&vm.id);
    let snap_state = vm_dir.join("snapshot.state");
    let snap_mem = vm_dir.join("snapshot.mem");
    let started = manager.start_vm("sus").await.unwrap();
    let pid = started.vm.runtime.unwrap().pid.unwrap();
    reaper.0.push((pid, vm.id.clone()));
    let api = ApiClient::new(dir.path().join("home/run/vms").join(&vm.id).join("fc.sock"));
    let fc_state = || async {
        api.call("GET", "/", None).await.unwrap().unwrap()["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // Pause: PATCH /vm Paused, the VM shows paused; pausing again sends nothing.
    let before = install.requests().len();
    let paused = manager.pause_vm("sus").await.unwrap();
    assert!(paused.changed);
    assert_eq!(paused.vm.state, VmState::Paused);
    let sent = since(&install, before);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].0.as_str(), sent[0].1.as_str(), sent[0].2),
        ("PATCH", "/vm", 204)
    );
    assert_eq!(sent[0].3, serde_json::json!({ "state": "Paused" }));
    assert_eq!(fc_state().await, "Paused");
    assert_eq!(manager.get_vm("sus").await.unwrap().state, VmState::Paused);
    let before = install.requests().len();
    assert!(!manager.pause_vm("sus").await.unwrap().changed);
    assert_eq!(install.requests().len(), before, "a no-op sends nothing");
    // exec/ssh are refused with the resume hint; start is refused too.
    let err = manager.ssh_info("sus").await.unwrap_err().to_api();
    assert!(err.message.contains("paused"), "{}", err.message);
    assert!(
        err.hint
            .as_deref()
            .unwrap_or("")
            .contains("banger vm resume"),
        "{err:?}"
    );
    let err = manager.start_vm("sus").await.unwrap_err().to_api();
    assert!(
        err.hint.as_deref().unwrap_or("").contains("vm resume"),
        "{err:?}"
    );

    // A daemon restart while paused: the new daemon reattaches and still shows it paused.
    drop(manager);
    let manager = open_fake_manager(&install, dir.path(), |_| {});
    manager.reconcile().await.unwrap();
    assert_eq!(manager.get_vm("sus").await.unwrap().state, VmState::Paused);
    assert!(process::is_alive(pid, &vm.id));
    // The record lagging behind the VMM (a daemon that died between the VMM's answer and its
    // own write): reattach asks the VMM (GET /) and follows it.
    api.call(
        "PATCH",
        "/vm",
        Some(&serde_json::json!({ "state": "Resumed" })),
    )
    .await
    .unwrap();
    drop(manager);
    let manager = open_fake_manager(&install, dir.path(), |_| {});
    manager.reconcile().await.unwrap();
    assert_eq!(manager.get_vm("sus").await.unwrap().state, VmState::Running);
    manager.pause_vm("sus").await.unwrap();

    // Resume: PATCH /vm Resumed; resuming a running VM sends nothing.
    let before = install.requests().len();
    let resumed = manager.resume_vm("sus").await.unwrap();
    assert!(resumed.changed);
    assert_eq!(resumed.vm.state, VmState::Running);
    let sent = since(&install, before);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].3, serde_json::json!({ "state": "Resumed" }));
    assert_eq!(fc_state().await, "Running");
    let before = install.requests().len();
    assert!(!manager.resume_vm("sus").await.unwrap().changed);
    assert_eq!(install.requests().len(), before);

    // Suspend: (the SSH sync finds no guest in the fake, which is reported) pause, snapshot
    // into the VM's directory, process gone, state suspended.
    let before = install.requests().len();
    let suspended = manager.suspend_vm("sus").await.unwrap();
    assert!(suspended.changed);
    assert_eq!(suspended.vm.state, VmState::Suspended);
    assert!(
        suspended.warnings.iter().any(|w| w.contains("cannot sync")),
        "{:?}",
        suspended.warnings
    );
    let sent = since(&install, before);
    let paths: Vec<(&str, &str, u64)> = sent
        .iter()
        .map(|(m, p, s, _)| (m.as_str(), p.as_str(), *s))
        .collect();
    assert_eq!(
        paths,
        [("PATCH", "/vm", 204), ("PUT", "/snapshot/create", 204)]
    );
    assert_eq!(sent[1].3["snapshot_path"], snap_state.display().to_string());
    assert_eq!(sent[1].3["mem_file_path"], snap_mem.display().to_string());
    assert!(snap_state.is_file() && snap_mem.is_file());
    assert!(!process::is_alive(pid, &vm.id), "the VMM ended");
    assert!(!dir.path().join("home/run/vms").join(&vm.id).exists());
    assert_eq!(
        manager.get_vm("sus").await.unwrap().state,
        VmState::Suspended
    );
    assert!(!manager.suspend_vm("sus").await.unwrap().changed, "no-op");
    let err = manager.ssh_info("sus").await.unwrap_err().to_api();
    assert!(
        err.hint.as_deref().unwrap_or("").contains("vm start"),
        "{err:?}"
    );

    // Start restores: a fresh process, logger + metrics + /snapshot/load with resume, no
    // InstanceStart; running; the snapshot files are gone.
    let before = install.requests().len();
    let restored = manager.start_vm("sus").await.unwrap();
    assert!(
        restored.restored && restored.warnings.is_empty(),
        "{restored:?}"
    );
    assert_eq!(restored.vm.state, VmState::Running);
    let new_pid = restored.vm.runtime.unwrap().pid.unwrap();
    reaper.0.push((new_pid, vm.id.clone()));
    assert_ne!(new_pid, pid, "a fresh process");
    let sent = since(&install, before);
    let paths: Vec<(&str, &str, u64)> = sent
        .iter()
        .map(|(m, p, s, _)| (m.as_str(), p.as_str(), *s))
        .collect();
    assert_eq!(
        paths,
        [("PUT", "/metrics", 204), ("PUT", "/snapshot/load", 204),]
    );
    assert_eq!(sent[1].3["resume_vm"], true);
    assert_eq!(sent[1].3["snapshot_path"], snap_state.display().to_string());
    assert_eq!(
        sent[1].3["mem_backend"]["backend_path"],
        snap_mem.display().to_string()
    );
    assert_eq!(fc_state().await, "Running");
    assert!(
        !snap_state.exists() && !snap_mem.exists(),
        "snapshot removed"
    );

    // A snapshot file damaged after the suspend (its size and checksum differ): nothing is loaded, a
    // cold boot.
    let suspended = manager.suspend_vm("sus").await.unwrap();
    assert_eq!(suspended.vm.state, VmState::Suspended);
    let manifest = vm_dir.join("snapshot.json");
    assert!(manifest.is_file(), "sealed");
    std::fs::write(&snap_state, b"not a snapshot\n").unwrap();
    let before = install.requests().len();
    let booted = manager.start_vm("sus").await.unwrap();
    reaper.0.push((
        booted.vm.runtime.clone().unwrap().pid.unwrap(),
        vm.id.clone(),
    ));
    assert!(!booted.restored);
    assert!(
        booted.warnings.len() == 1 && booted.warnings[0].contains("is damaged"),
        "{:?}",
        booted.warnings
    );
    let sent = since(&install, before);
    assert!(sent.iter().all(|r| r.1 != "/snapshot/load"), "{sent:?}");
    assert!(!snap_state.exists() && !snap_mem.exists() && !manifest.exists());

    // A snapshot Firecracker refuses to load (sealed as it is, so only the VMM can tell): a
    // warning, then a cold boot on a fresh process.
    let suspended = manager.suspend_vm("sus").await.unwrap();
    assert_eq!(suspended.vm.state, VmState::Suspended);
    std::fs::write(&snap_state, b"not a snapshot\n").unwrap();
    let sealed = banger_core::snapshot::read(&manifest).unwrap();
    let disks: Vec<PathBuf> = sealed.disks.iter().map(|d| d.path.clone()).collect();
    banger_core::snapshot::seal(
        "firecracker",
        sealed.machine.unwrap(),
        &[snap_state.clone(), snap_mem.clone()],
        &disks,
        &manifest,
    )
    .unwrap();
    let before = install.requests().len();
    let booted = manager.start_vm("sus").await.unwrap();
    let boot_pid = booted.vm.runtime.clone().unwrap().pid.unwrap();
    reaper.0.push((boot_pid, vm.id.clone()));
    assert!(!booted.restored);
    assert_eq!(booted.vm.state, VmState::Running);
    assert_eq!(booted.warnings.len(), 1, "{:?}", booted.warnings);
    let warning = &booted.warnings[0];
    assert!(
        warning.contains("cannot restore VM sus from its snapshot")
            && warning.contains("is not a snapshot file")
            && warning.contains("booted it from its disks"),
        "{warning}"
    );
    let sent = since(&install, before);
    let load = sent.iter().position(|r| r.1 == "/snapshot/load").unwrap();
    assert_eq!(sent[load].2, 400, "refused by the fake: {sent:?}");
    let after_load: Vec<&str> = sent[load + 1..].iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        after_load,
        [
            "/metrics",
            "/machine-config",
            "/boot-source",
            "/drives/sys",
            "/drives/work",
            "/network-interfaces/eth0",
            "/entropy",
            "/actions",
        ],
        "a cold boot on a fresh process"
    );
    assert_eq!(sent.last().unwrap().3["action_type"], "InstanceStart");
    assert!(sent[load + 1..].iter().all(|r| r.2 == 204), "{sent:?}");
    assert!(!snap_state.exists() && !snap_mem.exists());
    let stale = banger_e2e::processes_with_cmdline("banger-fc-fake", &vm.id);
    assert_eq!(stale, [boot_pid], "only the booted process is left");

    // Stop of a paused VM resumes it first (then the normal stop sequence).
    manager.pause_vm("sus").await.unwrap();
    let before = install.requests().len();
    let stopped = manager.stop_vm("sus", false).await.unwrap();
    assert_eq!(stopped.vm.state, VmState::Stopped);
    assert_eq!(
        stopped.stop_method.map(|m| m.as_str()),
        Some("ctrl-alt-del")
    );
    let sent = since(&install, before);
    let resumed_at = sent
        .iter()
        .position(|r| r.1 == "/vm" && r.3["state"] == "Resumed")
        .unwrap_or_else(|| panic!("no resume in {sent:?}"));
    let cad = sent
        .iter()
        .position(|r| r.3["action_type"] == "SendCtrlAltDel")
        .unwrap();
    assert!(resumed_at < cad, "{sent:?}");

    // rm of a suspended VM removes its snapshot files.
    let started = manager.start_vm("sus").await.unwrap();
    reaper
        .0
        .push((started.vm.runtime.unwrap().pid.unwrap(), vm.id.clone()));
    manager.suspend_vm("sus").await.unwrap();
    assert!(snap_state.is_file());
    manager.remove_vm("sus").await.unwrap();
    assert!(!snap_state.exists() && !snap_mem.exists() && !vm_dir.exists());
    assert!(banger_e2e::processes_with_cmdline("banger-fc-fake", &vm.id).is_empty());
}

/// The real banger-helper (root, owner uid 0) for one test: jails under `<dir>/jail`, files
/// accepted from `<dir>/home` (the Manager's data dir), the fake jailer and `install`'s
/// Firecracker pinned in its configuration, loop records in `<dir>/records`.
struct JailHelper {
    child: std::process::Child,
    socket: PathBuf,
    base: PathBuf,
}

impl JailHelper {
    fn start(dir: &Path, install: &FakeInstall) -> Self {
        Self::start_with(
            dir,
            &bin("banger-jailer-fake"),
            &install.dir.path().join("firecracker"),
            None,
        )
    }

    /// The helper with `jailer` and `firecracker` pinned, in network namespace `netns` (only
    /// that: it shares the test's mounts) when given.
    fn start_with(dir: &Path, jailer: &Path, firecracker: &Path, netns: Option<&NetNs>) -> Self {
        let socket = dir.join("helper.sock");
        let base = dir.join("jail");
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut command = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.0))
                    .arg(bin("banger-helper"));
                c
            }
            None => std::process::Command::new(bin("banger-helper")),
        };
        let child = command
            .args(["--foreground", "--owner", "0"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&home)
            .arg("--jail-base")
            .arg(&base)
            .arg("--jailer")
            .arg(jailer)
            .arg("--firecracker")
            .arg(firecracker)
            .arg("--record-dir")
            .arg(dir.join("records"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(std::time::Instant::now() < deadline, "helper did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            base,
        }
    }
}

impl Drop for JailHelper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The jail base is the helper's own tmpfs, which outlives it.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.base)
            .status();
    }
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir) && Path::new(m) != dir)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jailed_firecracker_runs_the_lifecycle() {
    if !banger_e2e::root_or_skip(
        "a_jailed_firecracker_runs_the_lifecycle",
        "the root helper runs the jailer",
    ) {
        return;
    }
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgjl");
    let helper = JailHelper::start(dir.path(), &install);
    let manager = fake_manager_with(&install, dir.path(), |config| {
        config.firecracker.jailer = bin("banger-jailer-fake").display().to_string();
        config.network.mode = NetMode::User;
        config.network.helper_socket = helper.socket.display().to_string();
    })
    .await;
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "jfc".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(vm.spec.vmm, "firecracker", "{}", vm.spec.vmm_reason);
    assert_ne!(vm.spec.system_disk, "dm");
    let jail_dir = helper.base.join("firecracker").join(&vm.id);
    for round in 0..2 {
        let before = install.requests().len();
        let started = manager.start_vm("jfc").await.unwrap();
        let runtime = started.vm.runtime.clone().unwrap();
        let pid = runtime.pid.unwrap();
        reaper.0.push((pid, vm.id.clone()));
        assert!(process::is_alive(pid, &vm.id));
        assert_eq!(
            runtime.jail.as_deref(),
            Some(jail_dir.join("root").display().to_string().as_str()),
            "round {round}"
        );
        // The conversation names only in-jail paths, and the fake (chrooted by the fake
        // jailer) found every file there.
        let requests = install.requests()[before..].to_vec();
        assert!(
            requests.iter().all(|r| r.2 == 204),
            "round {round}: {requests:?}"
        );
        let body = |path: &str| {
            requests
                .iter()
                .find(|r| r.1 == path)
                .map(|r| r.3.clone())
                .unwrap_or_else(|| panic!("no {path} in {requests:?}"))
        };
        assert!(requests.iter().all(|r| r.1 != "/logger"), "{requests:?}");
        assert_eq!(body("/metrics")["metrics_path"], "/firecracker.metrics");
        assert_eq!(body("/serial")["serial_out_path"], "/console.log");
        assert_eq!(body("/boot-source")["kernel_image_path"], "/vmlinux");
        assert_eq!(body("/drives/sys")["path_on_host"], "/system.raw");
        assert_eq!(body("/drives/work")["path_on_host"], "/work.ext4");
        assert_eq!(requests.last().unwrap().3["action_type"], "InstanceStart");
        // The jail holds the VM's own files (hard links: same inode).
        let vm_dir = dir.path().join("home/vms").join(&vm.id);
        // Firecracker's log is the VM's own file, written from inside the jail.
        let log = std::fs::read_to_string(vm_dir.join("firecracker.log")).unwrap();
        assert!(log.contains(":main:INFO] Running Firecracker v"), "{log}");
        use std::os::unix::fs::MetadataExt;
        let inside = std::fs::metadata(jail_dir.join("root/work.ext4")).unwrap();
        let source = std::fs::metadata(vm_dir.join("work.ext4")).unwrap();
        assert_eq!(inside.ino(), source.ino());
        // Shown by `vm show`.
        let shown = manager.get_vm("jfc").await.unwrap();
        assert!(shown.runtime.unwrap().jail.is_some());

        // stop through the symlinked API socket: SendCtrlAltDel ends it; the jail goes.
        let stopped = manager.stop_vm("jfc", false).await.unwrap();
        assert_eq!(
            stopped.stop_method.map(|m| m.as_str()),
            Some("ctrl-alt-del")
        );
        assert_eq!(stopped.vm.state, VmState::Stopped);
        assert!(stopped.vm.runtime.unwrap().jail.is_none());
        assert!(!process::is_alive(pid, &vm.id));
        assert!(!jail_dir.exists(), "round {round}: jail left");
        assert!(mounts_under(&helper.base).is_empty());
        assert!(!dir.path().join("home/run/vms").join(&vm.id).exists());
    }
    manager.remove_vm("jfc").await.unwrap();
    assert!(!dir.path().join("home/vms").join(&vm.id).exists());
    assert_eq!(
        std::fs::read_dir(helper.base.join("firecracker"))
            .unwrap()
            .count(),
        0
    );
    let pids = banger_e2e::processes_with_cmdline("banger-fc-fake", &vm.id);
    assert!(pids.is_empty(), "{pids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_jailed_start_leaves_no_jail() {
    if !banger_e2e::root_or_skip(
        "a_failed_jailed_start_leaves_no_jail",
        "the root helper runs the jailer",
    ) {
        return;
    }
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgjl");
    let helper = JailHelper::start(dir.path(), &install);
    let manager = fake_manager_with(&install, dir.path(), |config| {
        config.firecracker.jailer = bin("banger-jailer-fake").display().to_string();
        config.network.mode = NetMode::User;
        config.network.helper_socket = helper.socket.display().to_string();
    })
    .await;
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "jbad".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The kernel vanished: the helper refuses to place it, nothing is built or left running.
    for kernel in std::fs::read_dir(dir.path().join("home/kernels")).unwrap() {
        std::fs::remove_file(kernel.unwrap().path().join("vmlinux")).unwrap();
    }
    let err = manager.start_vm("jbad").await.unwrap_err();
    let text = err.to_api().message;
    assert!(text.contains("vmlinux"), "{text}");
    assert_eq!(
        manager.get_vm("jbad").await.unwrap().state,
        VmState::Created
    );
    assert!(!helper.base.join("firecracker").join(&vm.id).exists());
    assert!(banger_e2e::processes_with_cmdline("banger-fc-fake", &vm.id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_jailer_is_refused_before_anything_is_made() {
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgjl");
    let manager = fake_manager_with(&install, dir.path(), |config| {
        config.firecracker.jailer = "/nonexistent/jailer".into();
        config.network.mode = NetMode::User;
    })
    .await;
    let err = manager
        .create_vm(CreateVmRequest {
            name: "nojail".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let api = err.to_api();
    assert!(
        api.message.contains("firecracker.jailer") && api.message.contains("not installed"),
        "{api:?}"
    );
    assert!(
        api.hint
            .as_deref()
            .unwrap_or_default()
            .contains("remove firecracker.jailer"),
        "{api:?}"
    );
    assert!(manager.list_vms().await.unwrap().is_empty());
    let vms = dir.path().join("home/vms");
    assert!(!vms.exists() || std::fs::read_dir(&vms).unwrap().count() == 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn jailed_vms_reattach_and_are_cleaned_up_however_they_end() {
    if !banger_e2e::root_or_skip(
        "jailed_vms_reattach_and_are_cleaned_up_however_they_end",
        "the root helper runs the jailer",
    ) {
        return;
    }
    // A Firecracker that ignores Ctrl-Alt-Del and SIGTERM: only the kill ends it.
    let install = FakeInstall::new(&["--ctrl-alt-del", "ignore", "--ignore-sigterm"]);
    let dir = short_tmp("bgjl");
    let helper = JailHelper::start(dir.path(), &install);
    let socket = helper.socket.display().to_string();
    let jailed = |config: &mut Config| {
        config.firecracker.jailer = bin("banger-jailer-fake").display().to_string();
        config.network.mode = NetMode::User;
        config.network.helper_socket = socket.clone();
    };
    let first = fake_manager_with(&install, dir.path(), jailed).await;
    let mut reaper = Reaper(Vec::new());
    let vm = first
        .create_vm(CreateVmRequest {
            name: "jr".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let jail_dir = helper.base.join("firecracker").join(&vm.id);
    let pid = first
        .start_vm("jr")
        .await
        .unwrap()
        .vm
        .runtime
        .unwrap()
        .pid
        .unwrap();
    reaper.0.push((pid, vm.id.clone()));

    // Daemon restart: a new Manager on the same data dir keeps the jailed VM running.
    drop(first);
    let second = open_fake_manager(&install, dir.path(), jailed);
    second.reconcile().await.unwrap();
    let shown = second.get_vm("jr").await.unwrap();
    assert_eq!(shown.state, VmState::Running);
    assert_eq!(shown.runtime.unwrap().pid, Some(pid));
    assert!(jail_dir.exists());
    // Its stop reaches the jailed API through the runtime dir's link, then kills.
    let stopped = second.stop_vm("jr", false).await.unwrap();
    assert_eq!(stopped.stop_method.map(|m| m.as_str()), Some("kill"));
    assert!(!process::is_alive(pid, &vm.id));
    assert!(!jail_dir.exists(), "jail left after a kill");

    // A VMM that dies outside banger: the next look marks the VM stopped and removes the jail.
    let pid = second
        .start_vm("jr")
        .await
        .unwrap()
        .vm
        .runtime
        .unwrap()
        .pid
        .unwrap();
    reaper.0.push((pid, vm.id.clone()));
    assert!(jail_dir.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(process::wait_gone(pid, &vm.id, Duration::from_secs(10)).await);
    let seen = second.get_vm("jr").await.unwrap();
    assert_eq!(seen.state, VmState::Stopped);
    // The look starts the jail's removal and answers without waiting for the helper.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while jail_dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "jail left after the VMM died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(mounts_under(&helper.base).is_empty());
    second.remove_vm("jr").await.unwrap();
}

/// `vm set` and the disk check on a Firecracker VM (no guest: the fake): its disks do not
/// grow while it runs (stopped only, with a clear refusal that changes nothing); stopped,
/// CPUs, memory and both disks change and the next launch asks Firecracker for the new
/// machine; a Firecracker killed behind banger's back is an unclean stop, after which the next
/// start runs e2fsck on the work disk and on the raw system disk.
#[tokio::test(flavor = "multi_thread")]
async fn vm_set_and_the_unclean_stop_check_against_the_fake() {
    use banger_proto::{FsckResult, SetVmRequest, StopKind};
    let install = FakeInstall::new(&[]);
    let dir = short_tmp("bgfc");
    let manager = fake_manager(&install, dir.path()).await;
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "fc".into(),
            disk_size_bytes: Some(256 << 20),
            ..Default::default()
        })
        .await
        .unwrap();
    let work = dir.path().join("home/vms").join(&vm.id).join("work.ext4");
    let system = dir.path().join("home/vms").join(&vm.id).join("system.raw");
    let system_size = vm.spec.system_disk_size_bytes.unwrap();
    assert_eq!(system_size, std::fs::metadata(&system).unwrap().len());
    let started = manager.start_vm("fc").await.unwrap();
    reaper
        .0
        .push((started.vm.runtime.unwrap().pid.unwrap(), vm.id.clone()));

    let grow = |bytes: u64| SetVmRequest {
        disk_size_bytes: Some(bytes),
        ..Default::default()
    };
    let err = manager.set_vm("fc", grow(512 << 20)).await.unwrap_err();
    let api = err.to_api();
    assert_eq!(api.code, banger_proto::ErrorCode::InvalidState);
    assert!(
        api.message.contains("Firecracker") && api.hint.unwrap().contains("stop it first"),
        "{}",
        api.message
    );
    assert_eq!(std::fs::metadata(&work).unwrap().len(), 256 << 20);
    let vm_now = manager.get_vm("fc").await.unwrap();
    assert_eq!(vm_now.spec.disk_size_bytes, 256 << 20);

    let stopped = manager.stop_vm("fc", false).await.unwrap();
    assert_eq!(stopped.vm.last_stop.unwrap().kind, StopKind::Clean);
    let set = manager
        .set_vm(
            "fc",
            SetVmRequest {
                cpus: Some(1),
                memory_mib: Some(256),
                disk_size_bytes: Some(512 << 20),
                system_disk_size_bytes: Some(system_size + (64 << 20)),
            },
        )
        .await
        .unwrap();
    assert_eq!(set.changed, ["cpus", "memory", "disk", "system_disk"]);
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    assert_eq!(std::fs::metadata(&work).unwrap().len(), 512 << 20);
    assert_eq!(
        std::fs::metadata(&system).unwrap().len(),
        system_size + (64 << 20)
    );
    // The work filesystem fills its grown file.
    let dumped = std::process::Command::new(banger_e2e::system_tool("dumpe2fs"))
        .arg("-h")
        .arg(&work)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dumped.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(
        field("Block count:") * field("Block size:"),
        512 << 20,
        "{text}"
    );

    let before = install.requests().len();
    let started = manager.start_vm("fc").await.unwrap();
    let pid = started.vm.runtime.clone().unwrap().pid.unwrap();
    reaper.0.push((pid, vm.id.clone()));
    let config = install.requests()[before..]
        .iter()
        .find(|r| r.1 == "/machine-config")
        .map(|r| r.3.clone())
        .unwrap();
    assert_eq!(
        (&config["vcpu_count"], &config["mem_size_mib"]),
        (&Value::from(1), &Value::from(256)),
        "{config}"
    );
    let check = started.vm.start_fsck.unwrap();
    assert!(!check.ran && check.why.contains("clean"), "{check:?}");

    // Killed behind banger's back: unclean, and the next start checks both raw disks.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let gone = loop {
        let vm = manager.get_vm("fc").await.unwrap();
        if vm.state == VmState::Stopped {
            break vm;
        }
        assert!(std::time::Instant::now() < deadline, "the fake still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(gone.last_stop.unwrap().kind, StopKind::Unclean);
    let started = manager.start_vm("fc").await.unwrap();
    reaper.0.push((
        started.vm.runtime.clone().unwrap().pid.unwrap(),
        vm.id.clone(),
    ));
    let check = started.vm.start_fsck.unwrap();
    assert!(check.ran, "{check:?}");
    let disks: Vec<(&str, FsckResult)> = check
        .disks
        .iter()
        .map(|d| (d.disk.as_str(), d.result))
        .collect();
    assert_eq!(
        disks,
        [("work", FsckResult::Clean), ("system", FsckResult::Clean)],
        "{check:?}"
    );
    manager.stop_vm("fc", true).await.unwrap();
    manager.remove_vm("fc").await.unwrap();
}

/// Firecracker's reason for a guest that triple-faults, as the real one (and the fake's
/// `--die-after-boot`) logs it.
/// (The real one's exit code then is 1, or 0 when its main thread wins a race.)
const SHUTDOWN_REASON: &str = "Firecracker: Unexpected exit reason on vcpu run: Shutdown";

/// `hlt; jmp hlt`: a guest that runs and does nothing.
const HALTS: [u8; 3] = [0xf4, 0xeb, 0xfd];

/// `ud2` with no IDT: a triple fault, KVM_EXIT_SHUTDOWN, and Firecracker exits with an error.
const TRIPLE_FAULTS: [u8; 2] = [0x0f, 0x0b];

#[tokio::test(flavor = "multi_thread")]
async fn a_firecracker_that_dies_is_reported_with_its_own_reason() {
    // During boot: the start waits for SSH, Firecracker dies at once after InstanceStart.
    let install = FakeInstall::new(&["--die-after-boot", "0"]);
    let dir = short_tmp("bgfd");
    let manager = fake_manager_with(&install, dir.path(), |c| c.daemon.start_timeout_secs = 60)
        .await
        .with_seams(seams(true));
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "dies".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The log outlived the undo (the runtime dir is gone).
    let vm_dir = dir.path().join("home/vms").join(&vm.id);
    assert_dies_during_boot(&manager, "dies", VmState::Created, &vm_dir).await;
    assert!(!dir.path().join("home/run/vms").join(&vm.id).exists());
    assert!(banger_e2e::processes_with_cmdline("banger-fc-fake", &vm.id).is_empty());

    // After boot: the start returned, then Firecracker dies; the next look says why.
    let install = FakeInstall::new(&["--die-after-boot", "1000"]);
    let dir = short_tmp("bgfd");
    let manager = fake_manager(&install, dir.path()).await;
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "later".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = manager.start_vm("later").await.unwrap();
    reaper
        .0
        .push((started.vm.runtime.unwrap().pid.unwrap(), vm.id.clone()));
    assert_eq!(started.vm.state, VmState::Running);
    assert_dies_running(&manager, "later").await;
    // rm takes the log with the VM.
    manager.remove_vm("later").await.unwrap();
    assert!(!dir.path().join("home/vms").join(&vm.id).exists());
}

/// Starts VM `name`, whose Firecracker dies during boot: the start fails naming Firecracker's
/// reason (not its banner), the VM is back in `back_to` with the reason as its last error,
/// and `vm logs` ends with it; its log outlived the undo.
async fn assert_dies_during_boot(manager: &Manager, name: &str, back_to: VmState, vm_dir: &Path) {
    let err = manager.start_vm(name).await.unwrap_err().to_api().message;
    assert!(
        err.contains(&format!("VM {name} stopped during boot")),
        "{err}"
    );
    assert!(err.contains(SHUTDOWN_REASON), "{err}");
    assert!(
        !err.contains("Running Firecracker"),
        "not its banner: {err}"
    );
    let shown = manager.get_vm(name).await.unwrap();
    assert_eq!(shown.state, back_to);
    assert_reason(shown.last_error.as_deref());
    let chunk = manager.console(name, 0).await.unwrap();
    assert!(!chunk.running);
    assert_reason(chunk.last_error.as_deref());
    let log = std::fs::read_to_string(vm_dir.join("firecracker.log")).unwrap();
    assert!(log.contains(":ERROR] Unexpected exit reason"), "{log}");
}

/// VM `name` runs (its start returned) and its Firecracker dies: the next look marks it
/// stopped, naming Firecracker's reason, and so does `vm logs`.
async fn assert_dies_running(manager: &Manager, name: &str) {
    let error = wait_stopped(manager, name).await;
    assert!(error.contains("stopped outside banger"), "{error}");
    assert_reason(Some(&error));
    assert_reason(
        manager
            .console(name, 0)
            .await
            .unwrap()
            .last_error
            .as_deref(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn firecracker_kvm_overrides_the_kvm_check_for_firecracker_only() {
    let install = FakeInstall::new(&[]);
    let no_accel_seam = Seams {
        accel: None,
        ..seams(false)
    };
    // "yes": KVM taken as working without a check; `vm show` says so.
    let dir = short_tmp("bgkv");
    let manager = fake_manager_with(&install, dir.path(), |c| {
        c.firecracker.kvm = banger_core::domain::FirecrackerKvm::Yes;
        // QEMU's own setting does not decide Firecracker's KVM.
        c.qemu.accel = banger_core::domain::AccelMode::Tcg;
    })
    .await
    .with_seams(no_accel_seam.clone());
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "kvm".into(),
            vmm: Some("firecracker".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(vm.spec.vmm, "firecracker");
    let started = manager.start_vm("kvm").await.unwrap();
    let runtime = started.vm.runtime.unwrap();
    reaper.0.push((runtime.pid.unwrap(), vm.id.clone()));
    assert_eq!(runtime.accel, "kvm");
    assert!(
        runtime.reason.contains("firecracker.kvm = \"yes\""),
        "{runtime:?}"
    );
    manager.stop_vm("kvm", false).await.unwrap();

    // "no": never Firecracker; asked for, a one-line refusal naming the key, nothing made.
    let dir = short_tmp("bgkv");
    let manager = fake_manager_with(&install, dir.path(), |c| {
        c.firecracker.kvm = banger_core::domain::FirecrackerKvm::No;
        c.qemu.accel = banger_core::domain::AccelMode::Kvm;
    })
    .await
    .with_seams(no_accel_seam);
    let err = manager
        .create_vm(CreateVmRequest {
            name: "nokvm".into(),
            vmm: Some("firecracker".into()),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_api();
    assert!(err.message.contains("firecracker.kvm = \"no\""), "{err:?}");
    assert!(manager.list_vms().await.unwrap().is_empty());
    let auto = manager
        .create_vm(CreateVmRequest {
            name: "auto".into(),
            vmm: Some("auto".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(auto.spec.vmm, "qemu", "{}", auto.spec.vmm_reason);
    assert!(
        auto.spec.vmm_reason.contains("firecracker.kvm"),
        "{}",
        auto.spec.vmm_reason
    );
}

/// Imports image `default`: a 16 MiB ext4 and `kernel`.
async fn import_default(manager: &Manager, dir: &Path, kernel: &[u8]) {
    let rootfs = dir.join("rootfs.ext4");
    let made = std::process::Command::new(banger_e2e::system_tool("mkfs.ext4"))
        .args(["-q", "-F"])
        .arg(&rootfs)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let path = dir.join("vmlinux");
    std::fs::write(&path, kernel).unwrap();
    manager
        .import_image(ImportImageRequest {
            name: "default".into(),
            rootfs: rootfs.display().to_string(),
            kernel: path.display().to_string(),
            initrd: None,
            work_seed: None,
        })
        .await
        .unwrap();
}

/// `GET /` of a VM's Firecracker through its runtime dir's socket: (state, id).
async fn instance_info(dir: &Path, vm_id: &str) -> (String, String) {
    let socket = dir.join("home/run/vms").join(vm_id).join("fc.sock");
    let info = ApiClient::new(socket)
        .call("GET", "/", None)
        .await
        .unwrap()
        .unwrap();
    (
        info["state"].as_str().unwrap().to_owned(),
        info["id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_firecracker_runs_the_unjailed_conversation() {
    let test = "the_real_firecracker_runs_the_unjailed_conversation";
    let Some((fc, _)) = real_binaries(test, false) else {
        return;
    };
    let ns = NetNs::new();
    let install = FakeInstall::wrapping(&format!(
        "nsenter --net=/run/netns/{} {}",
        ns.0,
        fc.display()
    ));
    assert!(install.backend().version().await.unwrap() >= (1, 5, 0));
    let dir = short_tmp("bgfr");
    let tweak = |c: &mut Config| {
        c.daemon.start_timeout_secs = 60;
        c.daemon.stop_timeout_secs = 3;
    };
    let open = |readiness: bool| {
        open_fake_manager(&install, dir.path(), tweak).with_seams(seams(readiness))
    };
    let manager = open(false);
    import_default(&manager, dir.path(), &tiny_kernel(&HALTS)).await;
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "real".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let vm_dir = dir.path().join("home/vms").join(&vm.id);

    // Spawn, the config PUTs and InstanceStart, all accepted by the real one; it runs.
    let started = manager.start_vm("real").await.unwrap();
    let pid = started.vm.runtime.unwrap().pid.unwrap();
    reaper.0.push((pid, vm.id.clone()));
    assert!(process::is_alive(pid, &vm.id));
    assert_eq!(
        instance_info(dir.path(), &vm.id).await,
        ("Running".to_owned(), vm.id.clone())
    );
    let log = std::fs::read_to_string(vm_dir.join("firecracker.log")).unwrap();
    assert!(log.contains(":main:INFO] Running Firecracker v"), "{log}");
    assert!(log.contains("InstanceStart"), "{log}");
    assert!(!log.contains(":ERROR]"), "{log}");
    assert_eq!(ns.links(), ["bg-tap-0"], "its tap, in the test's namespace");

    // Pause and resume, as the real one reports them.
    manager.pause_vm("real").await.unwrap();
    assert_eq!(instance_info(dir.path(), &vm.id).await.0, "Paused");
    manager.resume_vm("real").await.unwrap();
    assert_eq!(instance_info(dir.path(), &vm.id).await.0, "Running");

    // Daemon restart: a new Manager reattaches by pid and asks the VMM whether it is paused.
    manager.pause_vm("real").await.unwrap();
    drop(manager);
    let manager = open(false);
    manager.reconcile().await.unwrap();
    let shown = manager.get_vm("real").await.unwrap();
    assert_eq!(shown.state, VmState::Paused);
    assert_eq!(shown.runtime.unwrap().pid, Some(pid));
    manager.resume_vm("real").await.unwrap();

    // Stop: no SSH, a guest without i8042 ignores Ctrl-Alt-Del: SIGTERM ends Firecracker.
    let stopped = manager.stop_vm("real", false).await.unwrap();
    assert_eq!(stopped.vm.state, VmState::Stopped);
    assert_eq!(stopped.stop_method.map(|m| m.as_str()), Some("quit"));
    assert!(!process::is_alive(pid, &vm.id));
    assert!(!dir.path().join("home/run/vms").join(&vm.id).exists());
    ns.assert_empty();

    // A kernel the real one refuses: its fault message, the VM back to stopped, nothing left.
    set_kernels(dir.path(), None);
    let err = manager.start_vm("real").await.unwrap_err().to_api().message;
    assert!(
        err.contains("PUT /boot-source") && err.contains("kernel file cannot be opened"),
        "{err}"
    );
    assert_eq!(
        manager.get_vm("real").await.unwrap().state,
        VmState::Stopped
    );
    assert!(banger_e2e::processes_with_cmdline("firecracker", &vm.id).is_empty());

    // A guest that dies during boot (a triple fault): the start names Firecracker's reason.
    set_kernels(dir.path(), Some(&tiny_kernel(&TRIPLE_FAULTS)));
    drop(manager);
    let manager = open(true);
    assert_dies_during_boot(&manager, "real", VmState::Stopped, &vm_dir).await;

    // Dying after the start returned: the next look says why.
    drop(manager);
    let manager = open(false);
    let started = manager.start_vm("real").await.unwrap();
    reaper
        .0
        .push((started.vm.runtime.unwrap().pid.unwrap(), vm.id.clone()));
    assert_dies_running(&manager, "real").await;

    // rm leaves nothing: no process, no files, no tap.
    manager.remove_vm("real").await.unwrap();
    assert!(!vm_dir.exists());
    assert!(banger_e2e::processes_with_cmdline("firecracker", &vm.id).is_empty());
    ns.assert_empty();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_jailed_firecracker_that_dies_names_its_reason() {
    let test = "the_real_jailed_firecracker_that_dies_names_its_reason";
    let Some((fc, Some(jailer))) = real_binaries(test, true) else {
        return;
    };
    let ns = NetNs::new();
    let install = FakeInstall::wrapping(&fc.display().to_string());
    let dir = short_tmp("bgrj");
    let helper = JailHelper::start_with(dir.path(), &jailer, &fc, Some(&ns));
    let socket = helper.socket.display().to_string();
    let jailed = |c: &mut Config| {
        c.firecracker.jailer = jailer.display().to_string();
        c.network.mode = NetMode::User;
        c.network.helper_socket = socket.clone();
        c.daemon.start_timeout_secs = 60;
        c.daemon.stop_timeout_secs = 3;
    };
    let manager = open_fake_manager(&install, dir.path(), jailed).with_seams(seams(false));
    import_default(&manager, dir.path(), &tiny_kernel(&HALTS)).await;
    let mut reaper = Reaper(Vec::new());
    let vm = manager
        .create_vm(CreateVmRequest {
            name: "rj".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let vm_dir = dir.path().join("home/vms").join(&vm.id);
    let jail_dir = helper.base.join("firecracker").join(&vm.id);

    // It runs in its jail; its log is the VM's own file; stop removes the jail.
    let shown = manager.get_vm("rj").await;
    assert!(shown.unwrap().runtime.is_none());
    let started = manager.start_vm("rj").await.unwrap();
    let runtime = started.vm.runtime.unwrap();
    let pid = runtime.pid.unwrap();
    reaper.0.push((pid, vm.id.clone()));
    assert!(runtime.jail.is_some());
    assert_eq!(instance_info(dir.path(), &vm.id).await.0, "Running");
    let log = std::fs::read_to_string(vm_dir.join("firecracker.log")).unwrap();
    assert!(log.contains(":main:INFO] Running Firecracker v"), "{log}");
    let stopped = manager.stop_vm("rj", false).await.unwrap();
    assert_eq!(stopped.stop_method.map(|m| m.as_str()), Some("quit"));
    assert!(!process::is_alive(pid, &vm.id));
    assert!(!jail_dir.exists());
    // Stopped, `vm show` says the jailer runs it at the next start.
    let shown = manager.get_vm("rj").await.unwrap().runtime.unwrap();
    assert!(shown.jail.is_none() && shown.jailer, "{shown:?}");

    // A guest that dies during boot: the reason from the log it wrote inside the jail.
    set_kernels(dir.path(), Some(&tiny_kernel(&TRIPLE_FAULTS)));
    drop(manager);
    let manager = open_fake_manager(&install, dir.path(), jailed).with_seams(seams(true));
    assert_dies_during_boot(&manager, "rj", VmState::Stopped, &vm_dir).await;
    assert!(!jail_dir.exists(), "jail left");
    assert!(mounts_under(&helper.base).is_empty());
    manager.remove_vm("rj").await.unwrap();
    assert!(!vm_dir.exists());
    assert!(banger_e2e::processes_with_cmdline("firecracker", &vm.id).is_empty());
    ns.assert_empty();
}

/// Polls `manager` until VM `name` is seen stopped (its VMM died); its `last_error`.
async fn wait_stopped(manager: &Manager, name: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let vm = manager.get_vm(name).await.unwrap();
        if vm.state == VmState::Stopped {
            return vm.last_error.unwrap_or_default();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VM {name} still {} after 30 s",
            vm.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_reason(error: Option<&str>) {
    let error = error.unwrap_or_default();
    assert!(error.contains(SHUTDOWN_REASON), "{error:?}");
}

/// The real binaries (`FIRECRACKER_BIN`, and `JAILER_BIN` when `jailed`) when set and this
/// runs as root (their taps go into a network namespace of the test; the jailer needs root);
/// a visible REAL line, else a SKIP line.
fn real_binaries(test: &str, jailed: bool) -> Option<(PathBuf, Option<PathBuf>)> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let Some(fc) = var("FIRECRACKER_BIN") else {
        eprintln!("SKIP: {test}: FIRECRACKER_BIN is not set (the real Firecracker)");
        return None;
    };
    assert!(
        fc.is_file(),
        "FIRECRACKER_BIN={} is not a file",
        fc.display()
    );
    let jailer = if jailed {
        let Some(jailer) = var("JAILER_BIN") else {
            eprintln!("SKIP: {test}: JAILER_BIN is not set (the real jailer)");
            return None;
        };
        assert!(
            jailer.is_file(),
            "JAILER_BIN={} is not a file",
            jailer.display()
        );
        Some(jailer)
    } else {
        None
    };
    if !banger_e2e::root_or_skip(test, "Firecracker's tap goes into a namespace of the test") {
        return None;
    }
    eprintln!("REAL: {test}: Firecracker {}", fc.display());
    Some((fc, jailer))
}

/// The seams of [`open_fake_manager`], with the wait for SSH kept when `readiness` (no guest
/// answers, so a start waits until the VMM dies or the start timeout).
fn seams(readiness: bool) -> Seams {
    Seams {
        tap: Some("bg-tap-0".into()),
        accel: Some(AccelChoice {
            accel: Accel::Kvm,
            reason: "test seam: KVM assumed".into(),
        }),
        skip_readiness: !readiness,
        host_ops: None,
    }
}

/// Replaces every stored kernel under `dir`'s data dir by `kernel` (or removes it).
fn set_kernels(dir: &Path, kernel: Option<&[u8]>) {
    for entry in std::fs::read_dir(dir.join("home/kernels")).unwrap() {
        let path = entry.unwrap().path().join("vmlinux");
        match kernel {
            Some(bytes) => std::fs::write(&path, bytes).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
    }
}

/// [`banger_e2e::tiny_elf_kernel`] running `code`, with banger's marker of a kernel that
/// finds its devices on the command line.
fn tiny_kernel(code: &[u8]) -> Vec<u8> {
    let mut elf = banger_e2e::tiny_elf_kernel(code);
    elf.extend_from_slice(b"\0virtio_mmio.device\0");
    elf
}

/// A network namespace of the test (the taps Firecracker creates land there), deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "bgfc{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let added = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(added.success());
        Self(name)
    }

    /// Waits until it holds no link but `lo` (a tap goes once its process is gone and the
    /// kernel unregistered it).
    fn assert_empty(&self) {
        let gone = banger_e2e::poll_or_none(Duration::from_secs(10), || {
            self.links().is_empty().then_some(())
        });
        assert!(gone.is_some(), "links left: {:?}", self.links());
    }

    /// Its links other than `lo`.
    fn links(&self) -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.0, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
            .filter(|n| n != "lo")
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
