//! Every fault point (`crate::fault::point("…")` in banger-core, see its module doc) is hit:
//! the daemon SIGKILLs itself there (and, for the steps before an outside call, the step
//! fails instead). Then a daemon starts without the fault and must tell the truth and clean
//! up: `vm ls` shows each VM in a state its process agrees with, the VM can be started,
//! stopped and removed as its state allows, and the leak check finds nothing the operation
//! added. [`every_fault_point_has_a_case`] reads the step names from the source, so a new
//! step without a case here fails.
//!
//! Lifecycle steps run against the fake Firecracker (banger-fc-fake): no guest boots. The
//! daemon is this test binary itself, re-run as a child ([`fault_daemon_child`]) holding a
//! Manager with the fake's seams, because a SIGKILL must end a process other than the test.
//! Image steps run the real `bangerd` through the CLI with `BANGER_FAULT` in its
//! environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fake_manager.rs"]
mod fake_manager;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_core::service::Manager;
use banger_e2e::leaks::{LeakScope, Snapshot, assert_no_leaks};
use banger_e2e::{Run, TestEnv, bin, poll_or_none, processes_with_cmdline};
use banger_proto::{CreateSnapshotRequest, CreateVmRequest, VmState};

/// What the daemon was doing when the fault hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Start,
    Stop,
    Suspend,
    Pause,
    Resume,
    /// `vm start` of a suspended VM (restores its snapshot).
    Restore,
    Rm,
    ImageImport,
    ImageBuild,
    ImagePull,
    /// `vm workspace prepare` (a real QEMU guest: the only step here that needs one).
    WorkspacePrepare,
    /// `vm snapshot create` of a stopped QEMU VM (no guest: files and qemu-img only).
    SnapshotCreate,
    /// `vm snapshot restore`.
    SnapshotRestore,
    /// `vm snapshot rm` of a snapshot the VM and a later snapshot continue from.
    SnapshotRm,
    /// `vm snapshot create` of a running QEMU VM: a real guest, so its cases (killed, failed,
    /// and QEMU killed with the daemon running on) run in tests/live_snapshots.rs.
    LiveSnapshot,
    /// `vm snapshot create --memory` and the restore of such a snapshot: a real guest, so
    /// their cases run in tests/memory_snapshots.rs.
    MemorySnapshot,
    /// A clone's first start, which gives it its own host key: a real guest, so its cases run
    /// in tests/named_snapshots.rs.
    CloneFirstStart,
}

/// Every step and the operation that reaches it.
const CASES: &[(&str, Op)] = &[
    ("create.after_work_disk", Op::Create),
    ("create.after_system_disk", Op::Create),
    ("create.before_record", Op::Create),
    ("start.after_runtime_dir", Op::Start),
    ("start.before_launch", Op::Start),
    ("start.after_launch", Op::Start),
    ("start.after_record", Op::Start),
    ("start.after_restore", Op::Restore),
    ("stop.after_stopping", Op::Stop),
    ("stop.after_process", Op::Stop),
    ("stop.after_release", Op::Stop),
    ("suspend.after_stopping", Op::Suspend),
    ("suspend.after_snapshot", Op::Suspend),
    ("suspend.after_stop", Op::Suspend),
    ("pause.after_vmm", Op::Pause),
    ("resume.after_vmm", Op::Resume),
    ("rm.after_teardown", Op::Rm),
    ("rm.after_record", Op::Rm),
    ("copy.before_rename", Op::ImageImport),
    ("kernel.after_copy", Op::ImageImport),
    ("image.after_copy", Op::ImageImport),
    ("build.after_scripts", Op::ImageBuild),
    ("pull.after_fetch", Op::ImagePull),
    ("pull.after_rootfs_move", Op::ImagePull),
    ("workspace.before_transfer", Op::WorkspacePrepare),
    ("workspace.after_transfer", Op::WorkspacePrepare),
    ("snapshot.after_record", Op::SnapshotCreate),
    ("snapshot.after_system_moved", Op::SnapshotCreate),
    ("snapshot.after_work_moved", Op::SnapshotCreate),
    ("snapshot.after_overlays", Op::SnapshotCreate),
    ("snapshot.restore_after_record", Op::SnapshotRestore),
    ("snapshot.restore_after_system", Op::SnapshotRestore),
    ("snapshot.rm_after_record", Op::SnapshotRm),
    ("snapshot.rm_after_rebase", Op::SnapshotRm),
    ("snapshot.live.after_record", Op::LiveSnapshot),
    ("snapshot.live.after_system_moved", Op::LiveSnapshot),
    ("snapshot.live.after_overlays", Op::LiveSnapshot),
    ("snapshot.live.after_freeze", Op::LiveSnapshot),
    ("snapshot.live.after_switch", Op::LiveSnapshot),
    ("snapshot.live.after_thaw", Op::LiveSnapshot),
    ("snapshot.memory.after_pause", Op::MemorySnapshot),
    ("snapshot.memory.after_switch", Op::MemorySnapshot),
    ("snapshot.memory.after_state", Op::MemorySnapshot),
    ("snapshot.memory.after_resume", Op::MemorySnapshot),
    ("snapshot.memory.after_seal", Op::MemorySnapshot),
    ("snapshot.restore_after_disks", Op::MemorySnapshot),
    ("clone.after_pin_both", Op::CloneFirstStart),
    ("clone.after_guest_key", Op::CloneFirstStart),
];

/// Steps just before an outside call (disk tools, the helper, the VMM, SSH, a rename): they
/// are also made to fail, and the operation must undo itself at once, without a restart.
const FAIL_CASES: &[&str] = &[
    "create.after_work_disk",
    "create.after_system_disk",
    "start.after_runtime_dir",
    "start.before_launch",
    "start.after_record",
    "copy.before_rename",
    "workspace.before_transfer",
    "snapshot.after_record",
    "snapshot.after_system_moved",
    "snapshot.after_work_moved",
    "snapshot.after_overlays",
];

/// The step names the source holds: every `fault::point("NAME")` under banger-core/src.
fn steps_in_source() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../banger-core/src");
    let mut found = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("fault.rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split("fault::point(\"").skip(1) {
                    found.insert(piece.split('"').next().unwrap().to_owned());
                }
            }
        }
    }
    found
}

#[test]
fn every_fault_point_has_a_case() {
    let in_source = steps_in_source();
    assert!(in_source.len() >= 20, "{in_source:?}");
    let cased: BTreeSet<String> = CASES.iter().map(|(s, _)| (*s).to_owned()).collect();
    let missing: Vec<&String> = in_source.difference(&cased).collect();
    let stale: Vec<&String> = cased.difference(&in_source).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "fault points without a case in tests/faults.rs: {missing:?}; cases of no fault point: {stale:?}"
    );
    for step in FAIL_CASES {
        assert!(cased.contains(*step), "{step}");
    }
}

// ---------------------------------------------------------------------------------------
// Lifecycle steps: the fake Firecracker, the daemon as a child process.

const CHILD_DIR: &str = "BANGER_FAULT_TEST_DIR";
const CHILD_FC: &str = "BANGER_FAULT_TEST_FC";
const CHILD_OP: &str = "BANGER_FAULT_TEST_OP";
/// Set: the child's Manager makes QEMU VMs (the snapshot cases).
const CHILD_QEMU: &str = "BANGER_FAULT_TEST_QEMU";
const VM: &str = "fc";

/// A `firecracker` wrapper exec'ing the fake.
fn fake_firecracker(dir: &Path) -> PathBuf {
    let binary = dir.join("firecracker");
    std::fs::write(
        &binary,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            bin("banger-fc-fake").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    binary
}

/// The daemon's Manager on `dir` with the fake's seams (a second one on the same dir is a
/// daemon restart).
fn manager(dir: &Path, firecracker: &Path) -> Manager {
    fake_manager::open(dir, firecracker, |_| {})
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Start => "start",
        Op::Stop => "stop",
        Op::Suspend => "suspend",
        Op::Pause => "pause",
        Op::Resume => "resume",
        Op::Restore => "restore",
        Op::Rm => "rm",
        Op::SnapshotCreate => "snapshot-create",
        Op::SnapshotRestore => "snapshot-restore",
        Op::SnapshotRm => "snapshot-rm",
        Op::ImageImport
        | Op::ImageBuild
        | Op::ImagePull
        | Op::WorkspacePrepare
        | Op::LiveSnapshot
        | Op::MemorySnapshot
        | Op::CloneFirstStart => "other",
    }
}

/// Runs one lifecycle operation on [`VM`].
async fn run_op(manager: &Manager, op: &str) -> Result<(), banger_core::Error> {
    match op {
        "create" => manager
            .create_vm(CreateVmRequest {
                name: VM.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "start" | "restore" => manager.start_vm(VM).await.map(drop),
        "stop" => manager.stop_vm(VM, false).await.map(drop),
        "suspend" => manager.suspend_vm(VM).await.map(drop),
        "pause" => manager.pause_vm(VM).await.map(drop),
        "resume" => manager.resume_vm(VM).await.map(drop),
        "rm" => manager.remove_vm(VM).await,
        "qemu-create" => manager
            .create_vm(CreateVmRequest {
                name: VM.into(),
                vmm: Some("qemu".into()),
                disk_size_bytes: Some(64 << 20),
                ..Default::default()
            })
            .await
            .map(drop),
        "snapshot-create" => manager
            .create_named_snapshot(
                VM,
                CreateSnapshotRequest {
                    name: Some("s1".into()),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
        "snapshot-s2" => manager
            .create_named_snapshot(
                VM,
                CreateSnapshotRequest {
                    name: Some("s2".into()),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
        "snapshot-restore" => manager.restore_named_snapshot(VM, "s1").await.map(drop),
        "snapshot-rm" => manager.remove_named_snapshot(VM, "s1").await,
        other => panic!("unknown operation {other}"),
    }
}

/// Not a test: the entry point of the daemon child that [`lifecycle_fault`] runs (this
/// binary with `--exact fault_daemon_child`); without its variables it does nothing.
#[tokio::test(flavor = "multi_thread")]
async fn fault_daemon_child() {
    let (Some(dir), Some(fc), Some(op)) = (
        std::env::var_os(CHILD_DIR),
        std::env::var_os(CHILD_FC),
        std::env::var(CHILD_OP).ok(),
    ) else {
        return;
    };
    let manager = if std::env::var_os(CHILD_QEMU).is_some() {
        qemu_manager(Path::new(&dir), Path::new(&fc))
    } else {
        manager(Path::new(&dir), Path::new(&fc))
    };
    let outcome = run_op(&manager, &op).await;
    // Reached only when the fault did not kill this process.
    match outcome {
        Ok(()) => println!("FAULT-CHILD: ok"),
        Err(e) => println!("FAULT-CHILD: error: {}", e.to_api().message),
    }
}

/// The VMs as a restarted daemon lists them, checked against their processes: a VM listed
/// as running or paused has a live VMM, any other has none; none is left mid-operation.
async fn truthful_list(manager: &Manager, step: &str) -> Vec<(String, VmState)> {
    let vms = manager.list_vms().await.unwrap();
    vms.iter()
        .map(|vm| {
            let alive = !processes_with_cmdline("banger-fc-fake", &vm.id).is_empty();
            let live_state = matches!(vm.state, VmState::Running | VmState::Paused);
            assert_eq!(
                alive,
                live_state,
                "{step}: VM {} is listed {} but its VMM is {}",
                vm.name,
                vm.state,
                if alive { "alive" } else { "gone" }
            );
            assert!(
                !matches!(vm.state, VmState::Starting | VmState::Stopping),
                "{step}: VM {} left {}",
                vm.name,
                vm.state
            );
            (vm.name.clone(), vm.state)
        })
        .collect()
}

/// Starts, stops and removes the VM as its state allows.
async fn cycle(manager: &Manager, state: VmState, step: &str) {
    if matches!(
        state,
        VmState::Created | VmState::Stopped | VmState::Suspended
    ) {
        let started = manager.start_vm(VM).await;
        assert!(started.is_ok(), "{step}: start after recovery: {started:?}");
    }
    let stopped = manager.stop_vm(VM, false).await.unwrap();
    assert_eq!(stopped.vm.state, VmState::Stopped, "{step}");
    manager.remove_vm(VM).await.unwrap();
}

/// One lifecycle step faulted with `mode` ("kill" or "fail").
async fn lifecycle_fault(step: &str, op: Op, mode: &str) {
    let dir = tempfile::Builder::new()
        .prefix("bgflt")
        .tempdir_in("/tmp")
        .unwrap();
    let fc = fake_firecracker(dir.path());
    let scope = LeakScope::new(dir.path(), &dir.path().join("home"));
    let manager = manager(dir.path(), &fc);
    fake_manager::import_stub(&manager, dir.path()).await;
    let baseline = Snapshot::take(&scope);
    // The state the operation starts from.
    let before: &[&str] = match op {
        Op::Create => &[],
        Op::Start | Op::Rm => &["create"],
        Op::Stop | Op::Suspend | Op::Pause => &["create", "start"],
        Op::Resume => &["create", "start", "pause"],
        Op::Restore => &["create", "start", "suspend"],
        _ => unreachable!(),
    };
    for setup in before {
        run_op(&manager, setup).await.unwrap();
    }
    drop(manager);
    let before_op = Snapshot::take(&scope);

    let fault = if mode == "kill" {
        step.to_owned()
    } else {
        format!("{step}=fail")
    };
    let out_file = dir.path().join("child.out");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fault_daemon_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_FC, &fc)
        .env(CHILD_OP, op_name(op))
        .env(banger_core::fault::ENV, &fault)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = poll_or_none(Duration::from_secs(120), || child.try_wait().unwrap());
    let Some(status) = status else {
        let _ = child.kill();
        panic!("{fault}: the daemon child hangs");
    };
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    if mode == "kill" {
        assert_eq!(
            status.signal(),
            Some(9),
            "{fault}: the fault point was not reached: {stdout}"
        );
    } else {
        assert!(
            stdout.contains("FAULT-CHILD: error: ") && stdout.contains(step),
            "{fault}: the step did not fail: {stdout}"
        );
        // An outside call that fails is undone at once, before any restart.
        assert_no_leaks(&before_op, &Snapshot::take(&scope), &fault);
    }

    // A daemon without the fault: recovery, a truthful list, the VM usable, nothing left.
    let manager = self::manager(dir.path(), &fc);
    manager.recover().await.unwrap();
    let listed = truthful_list(&manager, &fault).await;
    match listed.as_slice() {
        [] => assert!(
            op == Op::Create || op == Op::Rm,
            "{fault}: the VM is gone after {op:?}"
        ),
        [(name, state)] => {
            assert_eq!(name, VM);
            cycle(&manager, *state, &fault).await;
        }
        more => panic!("{fault}: {more:?}"),
    }
    assert!(manager.list_vms().await.unwrap().is_empty());
    assert_no_leaks(&baseline, &Snapshot::take(&scope), &fault);
    for pid in processes_with_cmdline("banger-fc-fake", &dir.path().display().to_string()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// All lifecycle cases of operations `ops`, each killed and (where listed) failed.
async fn lifecycle_cases(ops: &[Op]) {
    for (step, op) in CASES.iter().filter(|(_, op)| ops.contains(op)) {
        for fault in faults_of(step) {
            let mode = if fault.ends_with("=fail") {
                "fail"
            } else {
                "kill"
            };
            lifecycle_fault(step, *op, mode).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_in_create_and_rm_are_recovered() {
    lifecycle_cases(&[Op::Create, Op::Rm]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_in_start_are_recovered() {
    lifecycle_cases(&[Op::Start, Op::Restore]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_in_stop_suspend_pause_and_resume_are_recovered() {
    lifecycle_cases(&[Op::Stop, Op::Suspend, Op::Pause, Op::Resume]).await;
}

// ---------------------------------------------------------------------------------------
// Named snapshot steps: a QEMU VM that never boots (its disks are files and qemu-img), the
// daemon as a child process as above; guest writes are stood in for by `qemu-io`.

/// The Manager of the snapshot cases: QEMU VMs with small disks.
fn qemu_manager(dir: &Path, firecracker: &Path) -> Manager {
    fake_manager::open(dir, firecracker, |config| {
        config.defaults.vmm = banger_core::domain::VmmChoice::Qemu;
        config.defaults.system_disk_size = "16M".into();
    })
}

/// The VM's directory (its id is the only one under vms/).
fn only_vm_dir(dir: &Path) -> PathBuf {
    let vms = dir.join("home/vms");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.pop().unwrap()
}

/// What a guest would see on the VM's two disks now (each chain read whole), and each
/// chain checked by `qemu-img check`.
fn disk_contents(vm_dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let read = |top: PathBuf, format: &str| -> Vec<u8> {
        if format == "qcow2" {
            let check = Command::new("qemu-img")
                .args(["check", "-q"])
                .arg(&top)
                .status()
                .unwrap();
            assert!(check.success(), "qemu-img check {}", top.display());
        }
        let out = top.with_extension("content");
        let status = Command::new("qemu-img")
            .args(["convert", "-f", format, "-O", "raw"])
            .arg(&top)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img convert {}", top.display());
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(out).unwrap();
        bytes
    };
    let work = if vm_dir.join("work.qcow2").exists() {
        read(vm_dir.join("work.qcow2"), "qcow2")
    } else {
        read(vm_dir.join("work.ext4"), "raw")
    };
    (read(vm_dir.join("system.qcow2"), "qcow2"), work)
}

/// Writes `byte` over the first 64 KiB of both of the VM's top overlays (a guest's writes).
fn scribble(vm_dir: &Path, byte: u8) {
    for top in ["system.qcow2", "work.qcow2"] {
        let status = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {byte} 0 65536"))
            .arg(vm_dir.join(top))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "qemu-io {top}");
    }
}

/// The VM's snapshots by name, none left half done.
async fn snapshot_names(manager: &Manager, fault: &str) -> Vec<String> {
    manager
        .list_named_snapshots(VM)
        .await
        .unwrap()
        .snapshots
        .into_iter()
        .inspect(|s| assert!(!s.name.is_empty(), "{fault}"))
        .map(|s| s.name)
        .collect()
}

/// One snapshot step faulted with `mode`: afterwards (at once for a failed step, after a
/// restart for a killed one) the VM's disks hold either the state before the operation or
/// the one after it, whole, and nothing leaks once the VM is removed.
async fn snapshot_fault(step: &str, op: Op, mode: &str) {
    let dir = tempfile::Builder::new()
        .prefix("bgsnap")
        .tempdir_in("/tmp")
        .unwrap();
    let fc = fake_firecracker(dir.path());
    let scope = LeakScope::new(dir.path(), &dir.path().join("home"));
    let manager = qemu_manager(dir.path(), &fc);
    fake_manager::import_stub(&manager, dir.path()).await;
    let baseline = Snapshot::take(&scope);
    run_op(&manager, "qemu-create").await.unwrap();
    let vm_dir = only_vm_dir(dir.path());
    // The contents the operation may end with: before it, and after it.
    let (before, after) = match op {
        Op::SnapshotCreate => {
            let now = disk_contents(&vm_dir);
            (now.clone(), now)
        }
        Op::SnapshotRestore => {
            run_op(&manager, "snapshot-create").await.unwrap();
            let at_s1 = disk_contents(&vm_dir);
            scribble(&vm_dir, 0x5a);
            (disk_contents(&vm_dir), at_s1)
        }
        Op::SnapshotRm => {
            run_op(&manager, "snapshot-create").await.unwrap();
            scribble(&vm_dir, 0x5a);
            run_op(&manager, "snapshot-s2").await.unwrap();
            scribble(&vm_dir, 0x6b);
            let now = disk_contents(&vm_dir);
            (now.clone(), now)
        }
        _ => unreachable!(),
    };
    assert!(op != Op::SnapshotRestore || before != after);
    drop(manager);
    let before_op = Snapshot::take(&scope);

    let fault = if mode == "kill" {
        step.to_owned()
    } else {
        format!("{step}=fail")
    };
    let out_file = dir.path().join("child.out");
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fault_daemon_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_FC, &fc)
        .env(CHILD_QEMU, "1")
        .env(CHILD_OP, op_name(op))
        .env(banger_core::fault::ENV, &fault)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    if mode == "kill" {
        assert_eq!(status.signal(), Some(9), "{fault}: not reached: {stdout}");
    } else {
        assert!(
            stdout.contains("FAULT-CHILD: error: ") && stdout.contains(step),
            "{fault}: the step did not fail: {stdout}"
        );
        // Undone at once: the disks and the files as before the operation.
        assert_eq!(disk_contents(&vm_dir), before, "{fault}: disks changed");
        assert_no_leaks(&before_op, &Snapshot::take(&scope), &fault);
    }

    let manager = qemu_manager(dir.path(), &fc);
    manager.recover().await.unwrap();
    let now = disk_contents(&vm_dir);
    assert!(
        now == before || now == after,
        "{fault}: the disks are neither as before the operation nor as after it"
    );
    let names = snapshot_names(&manager, &fault).await;
    match op {
        // A killed create is finished at the restart; a failed one was undone.
        Op::SnapshotCreate if mode == "kill" => assert_eq!(names, ["s1"], "{fault}"),
        Op::SnapshotCreate => assert!(names.is_empty(), "{fault}: {names:?}"),
        // Past its commit point, a restore is finished at the restart.
        Op::SnapshotRestore => {
            assert_eq!(names, ["s1"], "{fault}");
            assert!(now == after, "{fault}: the restore was not finished");
        }
        Op::SnapshotRm => assert_eq!(names, ["s2"], "{fault}"),
        _ => unreachable!(),
    }
    // The VM's rows and files, snapshots included, go with it.
    manager.remove_vm(VM).await.unwrap();
    assert_no_leaks(&baseline, &Snapshot::take(&scope), &fault);
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_in_named_snapshots_are_recovered() {
    let ops = [Op::SnapshotCreate, Op::SnapshotRestore, Op::SnapshotRm];
    for (step, op) in CASES.iter().filter(|(_, op)| ops.contains(op)) {
        for fault in faults_of(step) {
            let mode = if fault.ends_with("=fail") {
                "fail"
            } else {
                "kill"
            };
            snapshot_fault(step, *op, mode).await;
        }
    }
}

/// Named snapshots need qcow2: a Firecracker VM is refused with a hint, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn firecracker_vms_refuse_named_snapshots() {
    let dir = tempfile::Builder::new()
        .prefix("bgsnap")
        .tempdir_in("/tmp")
        .unwrap();
    let fc = fake_firecracker(dir.path());
    let manager = manager(dir.path(), &fc);
    fake_manager::import_stub(&manager, dir.path()).await;
    run_op(&manager, "create").await.unwrap();
    let err = run_op(&manager, "snapshot-create")
        .await
        .unwrap_err()
        .to_api();
    assert!(
        err.message.contains("named snapshots")
            && err.hint.is_some_and(|h| h.contains("--vmm qemu")),
        "{}",
        err.message
    );
    assert!(
        manager
            .list_named_snapshots(VM)
            .await
            .unwrap()
            .snapshots
            .is_empty()
    );
    manager.remove_vm(VM).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Image steps: the real daemon, `BANGER_FAULT` in its environment.

/// After a faulted image operation: a daemon without the fault lists only images whose
/// files are there, and every stored directory is named by a record.
fn check_stores(env: &TestEnv, fault: &str) {
    let images = env.banger(&["image", "ls", "--json"]).ok().json();
    for image in images.as_array().unwrap() {
        let digest = image["digest"].as_str().unwrap();
        assert!(
            env.home()
                .join("images")
                .join(digest)
                .join("rootfs.ext4")
                .is_file(),
            "{fault}: image {image} is listed without its file"
        );
    }
    let kernels = env.banger(&["kernel", "ls", "--json"]).ok().json();
    let known: BTreeSet<String> = images
        .as_array()
        .unwrap()
        .iter()
        .chain(kernels.as_array().unwrap())
        .map(|a| a["digest"].as_str().unwrap().to_owned())
        .collect();
    for kind in ["images", "kernels"] {
        for entry in std::fs::read_dir(env.home().join(kind))
            .into_iter()
            .flatten()
        {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                known.contains(&name),
                "{fault}: {kind}/{name} has no record"
            );
        }
    }
}

/// The faults to try at `step`: killed, and failed where it is in [`FAIL_CASES`].
fn faults_of(step: &str) -> Vec<String> {
    let mut faults = vec![step.to_owned()];
    if FAIL_CASES.contains(&step) {
        faults.push(format!("{step}=fail"));
    }
    faults
}

/// Removes image `image` and kernel `kernel` if listed.
fn remove_assets(env: &TestEnv, image: &str, kernel: &str) {
    let _ = env.banger(&["image", "rm", image]);
    let _ = env.banger(&["kernel", "rm", kernel]);
}

/// Asserts that the faulted command failed the way its mode says: a failed step is undone
/// at once (nothing added since `baseline`), then its daemon is stopped; a killed daemon
/// is gone.
#[track_caller]
fn assert_faulted(env: &TestEnv, run: &Run, fault: &str, baseline: &Snapshot) {
    assert_ne!(
        run.code, 0,
        "{fault}: the command succeeded: {}",
        run.stdout
    );
    if fault.ends_with("=fail") {
        assert!(
            run.stderr.contains("injected fault at"),
            "{fault}: {}",
            run.stderr
        );
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
        assert_no_leaks(baseline, &env.leak_snapshot(), fault);
        // The next command's daemon runs without the fault.
        env.banger(&["daemon", "stop"]).ok();
    } else {
        assert!(env.daemon_gone(), "{fault}: the daemon still runs");
    }
}

#[test]
fn faults_in_image_import_are_recovered() {
    for (step, _) in CASES.iter().filter(|(_, op)| *op == Op::ImageImport) {
        for fault in faults_of(step) {
            let env = TestEnv::new();
            let baseline = env.leak_snapshot();
            let args = env.stub_image_import();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run = env.with_fault(&fault, &args);
            assert_faulted(&env, &run, &fault, &baseline);
            check_stores(&env, &fault);
            // Importing again works, and a VM can be made of it and removed.
            env.banger(&args).ok();
            env.banger(&["vm", "create", "v", "--vmm", "qemu"]).ok();
            env.banger(&["vm", "rm", "v"]).ok();
            remove_assets(&env, "default", "default");
            assert_no_leaks(&baseline, &env.leak_snapshot(), &fault);
        }
    }
}

#[test]
fn faults_in_image_build_are_recovered() {
    const TEST: &str = "faults_in_image_build_are_recovered";
    let Some(cache) = std::env::var_os("BANGER_CACHE_DIR").filter(|v| !v.is_empty()) else {
        banger_shared::skip::report(TEST, "BANGER_CACHE_DIR is not set (a build takes minutes)");
        return;
    };
    let recipe = banger_core::image::recipe_digest();
    let built = Path::new(&cache).join(format!("guest-{}", &recipe[..16]));
    if !built.join("rootfs.ext4").is_file() {
        banger_shared::skip::report(
            TEST,
            &format!("{} holds no build of this recipe", built.display()),
        );
        return;
    }
    for fault in ["build.after_scripts", "build.after_scripts=fail"] {
        let env = TestEnv::new().with_env("BANGER_CACHE_DIR", &cache.to_string_lossy());
        let baseline = env.leak_snapshot();
        let run = env.with_fault(fault, &["image", "build"]);
        assert_faulted(&env, &run, fault, &baseline);
        check_stores(&env, fault);
        assert_eq!(
            env.banger(&["image", "ls", "--json"]).ok().json(),
            serde_json::json!([])
        );
        remove_assets(&env, "default", "default");
        assert_no_leaks(&baseline, &env.leak_snapshot(), fault);
    }
}

#[test]
fn faults_in_image_pull_are_recovered() {
    const TEST: &str = "faults_in_image_pull_are_recovered";
    let registry = Path::new("/usr/bin/docker-registry");
    if !registry.is_file() {
        banger_shared::skip::report(TEST, "docker-registry is not installed");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let storage = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = storage.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.path().join("data").display()
        ),
    )
    .unwrap();
    let mut server = Command::new(registry)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let answering = poll_or_none(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(answering.is_some(), "the registry does not answer");
    let reference = format!("127.0.0.1:{port}/banger/stub:1");
    let source = TestEnv::new();
    source.import_stub_image();
    source
        .banger(&["image", "push", "default", &reference])
        .ok();
    for (step, _) in CASES.iter().filter(|(_, op)| *op == Op::ImagePull) {
        for fault in faults_of(step) {
            let env = TestEnv::new();
            let baseline = env.leak_snapshot();
            let run = env.with_fault(&fault, &["image", "pull", &reference, "dev"]);
            assert_faulted(&env, &run, &fault, &baseline);
            check_stores(&env, &fault);
            env.banger(&["image", "pull", &reference, "dev"]).ok();
            env.banger(&["vm", "create", "v", "--vmm", "qemu", "--image", "dev"])
                .ok();
            env.banger(&["vm", "rm", "v"]).ok();
            remove_assets(&env, "dev", "dev");
            assert_no_leaks(&baseline, &env.leak_snapshot(), &fault);
        }
    }
    let _ = server.kill();
    let _ = server.wait();
}

// ---------------------------------------------------------------------------------------
// Workspace prepare: one real guest (TCG boots take minutes here), every step on it.

#[test]
fn faults_in_workspace_prepare_are_recovered() {
    let env = TestEnv::new();
    // TCG boots on a loaded host can take minutes.
    std::fs::write(env.config_file(), "[daemon]\nstart_timeout_secs = 900\n").unwrap();
    env.build_default_image();
    let repo = env.dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}");
    };
    git(&["init", "-q", "."]);
    std::fs::write(repo.join("file.txt"), "v0\n").unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-qm", "init"]);
    let repo_s = repo.to_str().unwrap();
    env.banger(&["vm", "create", "dev"]).ok();
    env.banger_within(Duration::from_secs(1000), &["vm", "start", "dev"])
        .ok();
    let mut round = 0;
    for (step, _) in CASES.iter().filter(|(_, op)| *op == Op::WorkspacePrepare) {
        for fault in faults_of(step) {
            round += 1;
            // A change for this round to carry.
            let content = format!("v{round}\n");
            std::fs::write(repo.join("file.txt"), &content).unwrap();
            // The shared SSH connection (ControlPersist) is up in both snapshots.
            env.banger(&["vm", "exec", "dev", "--", "true"]).ok();
            // The fault reaches only a daemon started with it: stop this one (the VM keeps
            // running; the next daemon reattaches it).
            env.banger(&["daemon", "stop"]).ok();
            let before = env.leak_snapshot();
            let run = env.with_fault(&fault, &["vm", "workspace", "prepare", "dev", repo_s]);
            assert_faulted(&env, &run, &fault, &before);
            // The VM outlived the daemon and is listed running, its QEMU alive.
            let vm = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
            assert_eq!(vm["state"], "running", "{fault}: {vm}");
            assert_eq!(env.qemu_pids().len(), 1, "{fault}");
            // Preparing again brings the guest up to date.
            env.banger(&["vm", "workspace", "prepare", "dev", repo_s])
                .ok();
            let seen = env
                .banger(&["vm", "exec", "dev", "--", "cat", "/root/repo/file.txt"])
                .ok();
            assert_eq!(seen.stdout, content, "{fault}");
            let status = env
                .banger(&["vm", "workspace", "status", "dev", "--json"])
                .ok()
                .json();
            assert_eq!(status["host_dirty"], false, "{fault}: {status}");
            assert_no_leaks(&before, &env.leak_snapshot(), &fault);
        }
    }
    env.banger_within(Duration::from_secs(180), &["vm", "stop", "dev"])
        .ok();
    env.banger(&["vm", "rm", "dev"]).ok();
    assert!(env.qemu_pids().is_empty());
}
