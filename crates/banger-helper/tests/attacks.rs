//! Attacks on the root helper, each asserting it is refused AND nothing changed. The helper
//! runs as root for the owner `bangertest` (a real non-root user the test creates), with the
//! state dir `~/.local/share/banger` of a home in the test's directory:
//! - as the owner: the state dir (or a directory above it) replaced by a symlink, a bind
//!   mount over it, and the state dir swapped for a symlink over and over while requests run
//!   (a swap between check and use);
//! - as another local user (`bangerevil`, with a helper of its own): talking to the owner's
//!   helper (refused, and the log rate-limited), its own helper detaching the owner's loop
//!   devices or building a snapshot over them, attaching the owner's file, and probing
//!   whether paths exist (the helper is no path oracle); its helper removing the owner's jail
//!   or starting a VM of the same id (its jail and cgroup `banger-<its uid>/<id>` are its
//!   own: the owner's VM, jail and memory limit stay), with the real jailer and Firecracker
//!   when `JAILER_BIN`/`FIRECRACKER_BIN` are set, else the fakes.
//!
//! Needs root (CI runs as root) and loop devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use banger_proto::helper::{HelperOp, HelperReply, HelperResult};

mod common;

use common::{Helper, refused, request_as, test_user};

/// A home for `uid` in a fresh root-owned test dir, with `~/.local/share/banger` (0700) and
/// an owner's file `disk.img` in it; and a decoy dir beside the home holding an owner's file
/// of the same name (what a redirected helper would reach).
struct Home {
    dir: tempfile::TempDir,
    uid: u32,
    share: PathBuf,
    state: PathBuf,
    decoy: PathBuf,
}

fn home(uid: u32, tag: &str) -> Home {
    let dir = common::temp_dir(tag);
    let share = dir.path().join("home/.local/share");
    let state = share.join("banger");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    sparse(&state.join("disk.img"));
    sparse(&state.join("cow.img"));
    let decoy = dir.path().join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    sparse(&decoy.join("disk.img"));
    common::chown_tree(&dir.path().join("home"), uid);
    common::chown_tree(&decoy, uid);
    Home {
        dir,
        uid,
        share,
        state,
        decoy,
    }
}

fn sparse(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
}

/// The helper for `home`'s owner, its files in `home`'s test dir.
fn helper_for(home: &Home) -> Helper {
    let dir = common::temp_dir("bgah");
    common::start_for(dir, home.uid, &home.state, &[], &[])
}

/// Runs `script` with `sh -c` as `uid` (the attacker acting).
fn as_user(uid: u32, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
}

fn attach_op(file: &Path, read_only: bool) -> HelperOp {
    HelperOp::LoopAttach {
        file: file.display().to_string(),
        read_only,
    }
}

#[track_caller]
fn device(reply: HelperReply) -> String {
    match reply {
        HelperReply::Ok {
            result: HelperResult::Device { device },
        } => device,
        other => panic!("expected a device, got {other:?}"),
    }
}

/// Loop devices whose backing file is `path` (as the kernel names it).
fn loops_backed_by(path: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        else {
            continue;
        };
        if Path::new(backing.trim()) == path {
            found.push(format!("/dev/{name}"));
        }
    }
    found
}

/// Loop devices backed by anything under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(backing) = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            && Path::new(backing.trim()).starts_with(dir)
        {
            found.push(format!("/dev/{name}"));
        }
    }
    found
}

/// Detaches every loop device backed under the dir on drop (also when the test fails).
struct Loops(PathBuf);

impl Drop for Loops {
    fn drop(&mut self) {
        for device in loops_under(&self.0) {
            let _ = Command::new("losetup").args(["-d", &device]).status();
        }
    }
}

/// Detaches `device` through the helper as `uid` and waits until the kernel let it go.
fn detach(uid: u32, helper: &Helper, device: &str) {
    let reply = request_as(
        uid,
        &helper.socket,
        &HelperOp::LoopDetach {
            device: device.into(),
            file: None,
        },
    );
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let name = device.trim_start_matches("/dev/");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists() {
        assert!(Instant::now() < deadline, "{device} still attached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The helper's loop records (empty: it attached nothing).
fn records(helper: &Helper) -> Vec<String> {
    std::fs::read_dir(helper.dir.path().join("records"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_symlinked_state_dir_is_refused_and_nothing_changes() {
    let owner = test_user("bangertest");
    let home = home(owner, "bgas");
    let _loops = Loops(home.dir.path().to_owned());
    let helper = helper_for(&home);
    // The real state dir works.
    let disk = home.state.join("disk.img");
    let dev = device(request_as(owner, &helper.socket, &attach_op(&disk, true)));
    detach(owner, &helper, &dev);

    let shadow = std::fs::metadata("/etc/shadow").unwrap();
    let share = home.share.display().to_string();
    let decoy = home.decoy.display().to_string();
    let home_dir = home.dir.path().join("home").display().to_string();
    // The attacker (the owner) points the state dir at a decoy, at /, or links a directory
    // above it; every request through it is refused.
    for (attack, undo, target) in [
        (
            format!("cd {share} && mv banger banger.real && ln -s {decoy} banger"),
            format!("cd {share} && rm banger && mv banger.real banger"),
            home.state.join("disk.img"),
        ),
        (
            format!("cd {share} && mv banger banger.real && ln -s / banger"),
            format!("cd {share} && rm banger && mv banger.real banger"),
            home.state.join("etc/shadow"),
        ),
        (
            format!("cd {home_dir} && mv .local .local.real && ln -s .local.real .local"),
            format!("cd {home_dir} && rm .local && mv .local.real .local"),
            home.state.join("disk.img"),
        ),
    ] {
        as_user(owner, &attack);
        for read_only in [true, false] {
            let message = refused(
                request_as(owner, &helper.socket, &attach_op(&target, read_only)),
                "symlink",
            );
            assert!(message.contains("state dir"), "{message}");
        }
        as_user(owner, &undo);
    }
    // Nothing changed: no device over the decoy or /etc/shadow, no record, shadow untouched.
    assert!(loops_backed_by(&home.decoy.join("disk.img")).is_empty());
    assert!(loops_backed_by(Path::new("/etc/shadow")).is_empty());
    assert!(records(&helper).is_empty(), "{:?}", records(&helper));
    let after = std::fs::metadata("/etc/shadow").unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode(), after.ino()),
        (shadow.uid(), shadow.gid(), shadow.mode(), shadow.ino())
    );
    // And the restored state dir works again.
    let dev = device(request_as(owner, &helper.socket, &attach_op(&disk, true)));
    detach(owner, &helper, &dev);
}

#[test]
fn a_bind_mounted_state_dir_is_refused_and_nothing_changes() {
    let owner = test_user("bangertest");
    let home = home(owner, "bgam");
    let _loops = Loops(home.dir.path().to_owned());
    let helper = helper_for(&home);
    // A mount over the state dir (root's bind mount here; an owner could use FUSE).
    let ok = Command::new("mount")
        .arg("--bind")
        .arg(&home.decoy)
        .arg(&home.state)
        .status()
        .unwrap();
    assert!(ok.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let mounted = Unmount(home.state.clone());
    let message = refused(
        request_as(
            owner,
            &helper.socket,
            &attach_op(&home.state.join("disk.img"), false),
        ),
        "mount point",
    );
    assert!(message.contains("state dir"), "{message}");
    drop(mounted);
    assert!(loops_backed_by(&home.decoy.join("disk.img")).is_empty());
    assert!(records(&helper).is_empty());
}

#[test]
fn a_state_dir_swapped_between_check_and_use_never_lets_a_path_out() {
    let owner = test_user("bangertest");
    let home = home(owner, "bgaw");
    let _loops = Loops(home.dir.path().to_owned());
    let helper = helper_for(&home);
    let real_ino = std::fs::metadata(home.state.join("disk.img"))
        .unwrap()
        .ino();
    let decoy_ino = std::fs::metadata(home.decoy.join("disk.img"))
        .unwrap()
        .ino();
    // `banger` and `banger.swap` (a symlink to the decoy) trade places atomically, again and
    // again, while the owner asks for `<state>/disk.img`.
    let swap = home.share.join("banger.swap");
    std::os::unix::fs::symlink(&home.decoy, &swap).unwrap();
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        &swap,
        Some(nix::unistd::Uid::from_raw(owner)),
        Some(nix::unistd::Gid::from_raw(owner)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop = StopOnDrop(stop.clone());
    let swapper = {
        let stop = stop.clone();
        let share = home.share.clone();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &share.join("banger"),
                    nix::fcntl::AT_FDCWD,
                    &share.join("banger.swap"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .is_err()
                {
                    break;
                }
                swaps += 1;
            }
            swaps
        })
    };
    let (mut attached, mut refusals) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while attached + refusals < 100 && Instant::now() < deadline {
        let reply = request_as(
            owner,
            &helper.socket,
            &attach_op(&home.state.join("disk.img"), true),
        );
        match reply {
            HelperReply::Ok {
                result: HelperResult::Device { device },
            } => {
                attached += 1;
                let out = Command::new("losetup")
                    .args(["--list", "--noheadings", "--output", "BACK-INO"])
                    .arg(&device)
                    .output()
                    .unwrap();
                let ino: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                assert_eq!(ino, real_ino, "{device} is backed by the decoy");
                assert_ne!(ino, decoy_ino);
                detach(owner, &helper, &device);
            }
            HelperReply::Error { message, .. } => {
                assert!(
                    message.contains("symlink") || message.contains("not a regular file"),
                    "{message}"
                );
                refusals += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let swaps = swapper.join().unwrap();
    eprintln!(
        "swap race: {attached} attached (all the real file), {refusals} refused, {swaps} swaps"
    );
    assert!(swaps > 0);
    assert!(loops_backed_by(&home.decoy.join("disk.img")).is_empty());
}

#[test]
fn another_user_is_refused_and_the_log_stays_short() {
    let owner = test_user("bangertest");
    let evil = test_user("bangerevil");
    let home = home(owner, "bgal");
    let helper = helper_for(&home);
    for _ in 0..40 {
        let message = refused(
            request_as(evil, &helper.socket, &HelperOp::Hello),
            "is not this helper's owner",
        );
        assert!(message.contains(&evil.to_string()), "{message}");
    }
    // Still serving its owner.
    let reply = request_as(owner, &helper.socket, &HelperOp::Hello);
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let log = common::log(&helper);
    let lines = log
        .lines()
        .filter(|l| l.contains("refused a client that is not the owner"))
        .count();
    assert!(
        (1..=10).contains(&lines),
        "{lines} refusal lines for 40 refused connections:\n{log}"
    );
}

/// A VM id both sides use (ids are not secret).
const VM_ID: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn another_users_helper_cannot_touch_the_owners_loops() {
    let owner = test_user("bangertest");
    let evil = test_user("bangerevil");
    let victim = home(owner, "bgav");
    let attacker = home(evil, "bgae");
    let _loops = (
        Loops(victim.dir.path().to_owned()),
        Loops(attacker.dir.path().to_owned()),
    );
    let victim_helper = helper_for(&victim);
    let evil_helper = helper_for(&attacker);
    let disk = victim.state.join("disk.img");
    let cow = victim.state.join("cow.img");
    let origin = device(request_as(
        owner,
        &victim_helper.socket,
        &attach_op(&disk, true),
    ));
    let store = device(request_as(
        owner,
        &victim_helper.socket,
        &attach_op(&cow, false),
    ));

    // bangerevil, through its own helper: detach the owner's devices, snapshot over them.
    for dev in [&origin, &store] {
        refused(
            request_as(
                evil,
                &evil_helper.socket,
                &HelperOp::LoopDetach {
                    device: dev.clone(),
                    file: None,
                },
            ),
            "not attached by this helper",
        );
    }
    refused(
        request_as(
            evil,
            &evil_helper.socket,
            &HelperOp::DmSnapshotCreate {
                name: banger_proto::helper::dm_name(evil, VM_ID),
                origin_loop: origin.clone(),
                cow_loop: store.clone(),
            },
        ),
        "not attached by this helper",
    );
    // ... take the name the owner's VM needs (VM ids are no secret: dm names are host-wide),
    // over loops of its own, or remove the owner's mapping by its name.
    let own_origin = device(request_as(
        evil,
        &evil_helper.socket,
        &attach_op(&attacker.state.join("disk.img"), true),
    ));
    let own_store = device(request_as(
        evil,
        &evil_helper.socket,
        &attach_op(&attacker.state.join("cow.img"), false),
    ));
    let victims_name = banger_proto::helper::dm_name(owner, VM_ID);
    refused(
        request_as(
            evil,
            &evil_helper.socket,
            &HelperOp::DmSnapshotCreate {
                name: victims_name.clone(),
                origin_loop: own_origin.clone(),
                cow_loop: own_store.clone(),
            },
        ),
        "not a device-mapper mapping banger made for this owner",
    );
    refused(
        request_as(
            evil,
            &evil_helper.socket,
            &HelperOp::DmRemove {
                name: victims_name.clone(),
            },
        ),
        "not a device-mapper mapping banger made for this owner",
    );
    assert!(!Path::new("/dev/mapper").join(&victims_name).exists());
    for dev in [&own_origin, &own_store] {
        detach(evil, &evil_helper, dev);
    }
    // ... attach the owner's file by its path, or through a hard link in its own state dir
    // (made by root here: protected_hardlinks stops the user).
    refused(
        request_as(evil, &evil_helper.socket, &attach_op(&disk, false)),
        "outside the state dir",
    );
    let stolen = attacker.state.join("stolen.img");
    std::fs::hard_link(&disk, &stolen).unwrap();
    refused(
        request_as(evil, &evil_helper.socket, &attach_op(&stolen, false)),
        "not a regular file of the owner",
    );
    // Nothing changed: the owner's devices are attached to the owner's files, the attacker
    // got none.
    assert_eq!(loops_backed_by(&disk), std::slice::from_ref(&origin));
    assert_eq!(loops_backed_by(&cow), std::slice::from_ref(&store));
    assert!(records(&evil_helper).is_empty());
    for dev in [&origin, &store] {
        detach(owner, &victim_helper, dev);
    }
}

#[test]
fn the_helper_is_no_path_oracle() {
    let evil = test_user("bangerevil");
    let attacker = home(evil, "bgao");
    let helper = helper_for(&attacker);
    // A directory inside the state dir the user cannot read, one file in it.
    let private = attacker.state.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    sparse(&private.join("exists.img"));
    let ask = |path: &Path| {
        let reply = request_as(evil, &helper.socket, &attach_op(path, true));
        match reply {
            HelperReply::Error { code, message } => {
                (code, message.replace(&path.display().to_string(), "PATH"))
            }
            other => panic!("{other:?}"),
        }
    };
    for (exists, missing) in [
        (private.join("exists.img"), private.join("missing.img")),
        (private.clone(), attacker.state.join("nothing")),
        (
            PathBuf::from("/root/.bashrc"),
            PathBuf::from("/root/nothing"),
        ),
        (PathBuf::from("/etc/shadow"), PathBuf::from("/etc/nothing")),
    ] {
        assert_eq!(ask(&exists), ask(&missing), "{}", exists.display());
    }
    assert!(records(&helper).is_empty());
}

/// A binary of the workspace built next to this test's binary.
fn workspace_bin(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The helper for `home`'s owner with a jail base of its own and a jailer: the real one from
/// `JAILER_BIN`/`FIRECRACKER_BIN`, else the fakes (a `firecracker` wrapper in a root-owned
/// dir). Returns the helper, its jail base and whether the binaries are real.
fn jail_helper_for(home: &Home) -> (Helper, PathBuf, bool) {
    let dir = common::temp_dir("bgaj");
    let base = dir.path().join("jail");
    std::fs::create_dir(&base).unwrap();
    let (jailer, firecracker, real) = match (
        std::env::var_os("JAILER_BIN"),
        std::env::var_os("FIRECRACKER_BIN"),
    ) {
        (Some(j), Some(f)) => (PathBuf::from(j), PathBuf::from(f), true),
        _ => {
            let exec = dir.path().join("bin/firecracker");
            std::fs::create_dir_all(exec.parent().unwrap()).unwrap();
            std::fs::write(
                &exec,
                format!(
                    "#!/bin/sh\nexec {} \"$@\"\n",
                    workspace_bin("banger-fc-fake").display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755)).unwrap();
            (workspace_bin("banger-jailer-fake"), exec, false)
        }
    };
    let helper = common::start_for(
        dir,
        home.uid,
        &home.state,
        &[],
        &[
            "--jail-base".as_ref(),
            base.as_os_str(),
            "--jailer".as_ref(),
            jailer.as_os_str(),
            "--firecracker".as_ref(),
            firecracker.as_os_str(),
        ],
    );
    (helper, base, real)
}

/// The VM's files in `home`'s state dir, the owner's.
fn vm_files(home: &Home, vm_id: &str) -> banger_proto::helper::JailFiles {
    let vm = home.state.join("vms").join(vm_id);
    std::fs::create_dir_all(&vm).unwrap();
    for name in ["vmlinux", "system.raw", "work.ext4", "console.log"] {
        std::fs::write(vm.join(name), name).unwrap();
    }
    common::chown_tree(&home.state.join("vms"), home.uid);
    let text = |n: &str| vm.join(n).display().to_string();
    banger_proto::helper::JailFiles {
        kernel: text("vmlinux"),
        initrd: None,
        system_disk: text("system.raw"),
        work_disk: text("work.ext4"),
        console_log: text("console.log"),
        log: None,
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

#[test]
fn another_users_helper_cannot_touch_the_owners_jail_or_cgroup() {
    let owner = test_user("bangertest");
    let evil = test_user("bangerevil");
    let victim = home(owner, "bgajv");
    let attacker = home(evil, "bgaje");
    let (victim_helper, victim_base, real) = jail_helper_for(&victim);
    let (evil_helper, evil_base, _) = jail_helper_for(&attacker);
    // The same VM id on both sides (ids are not secret).
    let id = format!("{:08x}{:024x}", std::process::id(), 0xe71u32);
    let spawn = |files, memory_mib| HelperOp::SpawnJailed {
        vm_id: id.clone(),
        files,
        cpus: 1,
        memory_mib,
    };
    let pid = match request_as(
        owner,
        &victim_helper.socket,
        &spawn(vm_files(&victim, &id), 256),
    ) {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, .. },
        } => pid,
        other => panic!("{other:?}\n{}", common::log(&victim_helper)),
    };
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let guard = Kill(pid);
    let victim_jail = victim_base.join("firecracker").join(&id);
    let victim_cgroup = Path::new("/sys/fs/cgroup/memory")
        .join(format!("banger-{owner}"))
        .join(&id);
    let limit = || std::fs::read_to_string(victim_cgroup.join("memory.limit_in_bytes")).ok();
    let before = limit();
    if real {
        assert!(
            before.is_some() || !Path::new("/sys/fs/cgroup/memory").exists(),
            "no cgroup at {}",
            victim_cgroup.display()
        );
    }
    // bangerevil, through its own helper: remove the VM's jail, start a VM of the same id with
    // other limits (its jail and cgroup are its own).
    let reply = request_as(
        evil,
        &evil_helper.socket,
        &HelperOp::RemoveJail { vm_id: id.clone() },
    );
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let reply = request_as(
        evil,
        &evil_helper.socket,
        &spawn(vm_files(&attacker, &id), 64),
    );
    let evil_pid = match reply {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, .. },
        } => Some(pid),
        _ => None,
    };
    let _evil_guard = evil_pid.map(Kill);
    if real {
        // The real jailer placed it under the attacker's own parent, not the owner's.
        assert!(evil_pid.is_some(), "{}", common::log(&evil_helper));
        let evil_cgroup = Path::new("/sys/fs/cgroup/memory")
            .join(format!("banger-{evil}"))
            .join(&id);
        if let Ok(value) = std::fs::read_to_string(evil_cgroup.join("memory.limit_in_bytes")) {
            assert_eq!(value.trim(), ((64u64 + 128) << 20).to_string());
        }
    }
    // ... and the owner's files through a path into the owner's state dir.
    let mut files = vm_files(&attacker, &id);
    files.system_disk = victim
        .state
        .join("vms")
        .join(&id)
        .join("system.raw")
        .display()
        .to_string();
    refused(
        request_as(evil, &evil_helper.socket, &spawn(files, 64)),
        "outside the state dir",
    );
    // Nothing of the owner's changed: the VM runs, its jail and cgroup (with its limit) stay.
    assert!(alive(pid), "the owner's Firecracker was killed");
    assert!(victim_jail.join("root/run/firecracker.socket").exists());
    assert_eq!(limit(), before, "the owner's memory limit changed");
    if let Some(evil_pid) = evil_pid {
        assert_ne!(evil_pid, pid);
        assert!(evil_base.join("firecracker").join(&id).exists());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(evil_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(evil_pid) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = request_as(
            evil,
            &evil_helper.socket,
            &HelperOp::RemoveJail { vm_id: id.clone() },
        );
    }
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = request_as(
        owner,
        &victim_helper.socket,
        &HelperOp::RemoveJail { vm_id: id.clone() },
    );
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(!victim_jail.exists());
    assert!(!victim_cgroup.exists());
}

#[test]
fn another_user_flooding_connections_does_not_starve_the_owner() {
    let owner = test_user("bangertest");
    let evil = test_user("bangerevil");
    let home = home(owner, "bgaf");
    let helper = helper_for(&home);
    // The attacker opens connections as fast as it can and holds up to 400 open (never
    // reading), for 15 s or until the test kills it.
    let mut flood = Command::new("perl")
        .args([
            "-MIO::Socket::UNIX",
            "-e",
            "my @s; my $end = time + 15; while (time < $end) { \
               my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or next; \
               push @s, $c; shift @s if @s > 400; }",
        ])
        .arg(&helper.socket)
        .uid(evil)
        .gid(evil)
        .spawn()
        .unwrap();
    let refusals = || {
        common::log(&helper)
            .lines()
            .filter(|l| l.contains("refused a client that is not the owner"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while refusals() == 0 {
        assert!(
            Instant::now() < deadline,
            "the flood never reached the helper"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every request of the owner's is served while the flood runs.
    for i in 0..30 {
        let reply = request_as(owner, &helper.socket, &HelperOp::Hello);
        assert!(
            matches!(reply, HelperReply::Ok { .. }),
            "request {i}: {reply:?}"
        );
    }
    assert!(
        flood.try_wait().unwrap().is_none(),
        "the flood ended before the owner's requests did"
    );
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(
        !common::log(&helper).contains("too many connections"),
        "the attacker's connections counted toward the limit:\n{}",
        common::log(&helper)
    );
}

/// The owner hard-links the device nodes the jailer made for it (`/dev/kvm`, `/dev/net/tun`,
/// the owner's inside the jail) into its home to keep them after the jail is gone: refused
/// (EXDEV, the jail is on the helper's own tmpfs), and nothing appears in the home.
#[test]
fn the_owner_cannot_hard_link_a_jails_device_nodes_out() {
    let owner = test_user("bangertest");
    let home = home(owner, "bgan");
    let (helper, base, _) = jail_helper_for(&home);
    let id = format!("{:08x}{:024x}", std::process::id(), 0xde7u32);
    let reply = request_as(
        owner,
        &helper.socket,
        &HelperOp::SpawnJailed {
            vm_id: id.clone(),
            files: vm_files(&home, &id),
            cpus: 1,
            memory_mib: 128,
        },
    );
    let (pid, root) = match reply {
        HelperReply::Ok {
            result: HelperResult::Jailed { pid, root },
        } => (pid, PathBuf::from(root)),
        other => panic!("{other:?}\n{}", common::log(&helper)),
    };
    assert!(root.starts_with(&base));
    let home_dir = home.dir.path().join("home");
    let mut nodes = 0;
    for name in ["dev/kvm", "dev/net/tun", "dev/userfaultfd", "dev/urandom"] {
        let node = root.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&node) else {
            continue;
        };
        nodes += 1;
        assert_eq!(meta.uid(), owner, "{name} is the owner's in the jail");
        let target = home_dir.join(name.replace('/', "-"));
        let out = Command::new("ln")
            .arg(&node)
            .arg(&target)
            .uid(owner)
            .gid(owner)
            .output()
            .unwrap();
        assert!(!out.status.success(), "ln {name} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Invalid cross-device link"), "{stderr}");
        assert!(std::fs::symlink_metadata(&target).is_err());
    }
    assert!(
        nodes > 0,
        "the jailer made no device nodes in {}",
        root.display()
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
    let reply = request_as(owner, &helper.socket, &HelperOp::RemoveJail { vm_id: id });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
}
