//! A full host disk: the data dir (`BANGER_HOME`) on a small loop-mounted ext4 file system
//! this test makes. `image import`, `kernel import` and `vm create` then fail with the
//! tools' own "no space" reason on one line, leave no record and nothing on the host (the
//! leak check), and work again once space is freed. A running QEMU guest whose writes hit
//! the full disk is paused by QEMU (`werror=stop`), `vm show` says why, and `vm resume`
//! after freeing space finishes the writes intact. Needs root (the mount).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use banger_e2e::leaks::assert_no_leaks;
use banger_e2e::{Run, TestEnv, poll_or_none, root_or_skip, system_tool};

/// The loop mount on the instance's home, lazily unmounted on drop (the daemon may still
/// hold files there when a test fails).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) {
    let out = Command::new(program.as_ref()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{:?} {args:?}: {}",
        program.as_ref(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file of `mib` MiB of incompressible bytes (no holes for `cp --sparse` to skip).
fn random_file(path: &Path, mib: usize) {
    let mut file = std::fs::File::create(path).unwrap();
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        std::io::Read::read_exact(&mut urandom, &mut buf).unwrap();
        file.write_all(&buf).unwrap();
    }
}

/// Fills the file system holding `dir` with `dir/filler` until a write fails.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let buf = vec![1u8; 64 << 10];
    while file.write_all(&buf).is_ok() {}
    let small = [1u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
    filler
}

/// A failed command's one-line error that names the lack of space.
#[track_caller]
fn assert_no_space(run: &Run, what: &str) {
    assert_ne!(run.code, 0, "{what} succeeded: {}", run.stdout);
    let line = run.stderr.trim();
    eprintln!("{what}: {line}");
    assert_eq!(line.lines().count(), 1, "{what}: {line}");
    assert!(
        line.contains("No space left on device") || line.contains("disk is full"),
        "{what}: {line}"
    );
}

/// Puts `env`'s home on a new ext4 file system of `mib` MiB, loop-mounted.
fn small_home(env: &TestEnv, mib: u64) -> Mounted {
    let image = env.dir().join("home.ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    run(
        system_tool("mkfs.ext4"),
        &["-q", "-F", image.to_str().unwrap()],
    );
    std::fs::create_dir_all(env.home()).unwrap();
    run(
        "mount",
        &[
            "-o",
            "loop",
            image.to_str().unwrap(),
            env.home().to_str().unwrap(),
        ],
    );
    Mounted(env.home())
}

#[test]
fn a_full_data_dir_fails_cleanly_and_recovers() {
    const TEST: &str = "a_full_data_dir_fails_cleanly_and_recovers";
    if !root_or_skip(TEST, "loop-mounting a small file system as the data dir") {
        return;
    }
    let env = TestEnv::new();
    let mounted = small_home(&env, 48);
    env.import_stub_image();
    let before = env.leak_snapshot();
    let listed = |env: &TestEnv, what: &str| env.banger(&[what, "ls", "--json"]).ok().json();
    let images = listed(&env, "image");
    let kernels = listed(&env, "kernel");

    // A root filesystem bigger than the space left: cp's own reason, no record, no partial
    // copy, no kernel left from the same import.
    let big = env.dir().join("big.ext4");
    random_file(&big, 64);
    let kernel = env.dir().join("stub/vmlinux");
    let run_import = |kernel: &str| {
        env.banger(&[
            "image",
            "import",
            "big",
            "--rootfs",
            big.to_str().unwrap(),
            "--kernel",
            kernel,
        ])
    };
    assert_no_space(&run_import("default"), "image import");
    let other_kernel = env.dir().join("vmlinux2");
    std::fs::write(&other_kernel, b"\x7fELF\x02\x01\x01\x00another stub").unwrap();
    assert_no_space(
        &run_import(other_kernel.to_str().unwrap()),
        "image import with a kernel file",
    );
    assert_eq!(listed(&env, "image"), images);
    assert_eq!(listed(&env, "kernel"), kernels);
    assert_no_leaks(&before, &env.leak_snapshot(), "image import on a full disk");

    // No space at all: kernel import and vm create fail the same way.
    let filler = fill(&env.home());
    let run = env.banger(&[
        "kernel",
        "import",
        "k2",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    // The same kernel is stored already: only its record would be new, and SQLite's
    // journal needs space too.
    if run.code != 0 {
        assert_no_space(&run, "kernel import");
    }
    env.banger(&["kernel", "rm", "k2"]);
    let run = env.banger(&["vm", "create", "v", "--vmm", "qemu"]);
    assert_no_space(&run, "vm create");
    assert_eq!(listed(&env, "vm"), serde_json::json!([]));
    assert_no_leaks(&before, &env.leak_snapshot(), "vm create on a full disk");

    // A little space: each step of a create may be the one that fails (the keys, mkfs.ext4's
    // work disk, qemu-img's overlay, the record); whichever it is, the create fails cleanly
    // or works.
    let full_len = std::fs::metadata(&filler).unwrap().len();
    let mut failed_late = false;
    for free_kib in [64u64, 256, 1024, 4096] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        file.set_len(full_len - free_kib * 1024).unwrap();
        file.sync_all().unwrap();
        let run = env.banger(&["vm", "create", "v", "--vmm", "qemu"]);
        if run.code == 0 {
            env.banger(&["vm", "rm", "v"]).ok();
        } else {
            assert_no_space(&run, &format!("vm create with {free_kib} KiB free"));
            failed_late |= !run.stderr.contains("cannot create");
            assert_eq!(listed(&env, "vm"), serde_json::json!([]));
        }
        assert_no_leaks(
            &before,
            &env.leak_snapshot(),
            &format!("vm create with {free_kib} KiB free"),
        );
    }
    assert!(failed_late, "no create got past its first directory");

    // Space again: the same commands work.
    std::fs::remove_file(&filler).unwrap();
    env.banger(&["vm", "create", "v", "--vmm", "qemu"]).ok();
    env.banger(&["vm", "rm", "v"]).ok();
    assert_no_leaks(
        &before,
        &env.leak_snapshot(),
        "create and rm after freeing space",
    );
    env.banger(&["daemon", "stop"]).ok();
    env.kill_daemon();
    drop(mounted);
}

#[test]
fn a_guest_writing_to_a_full_host_disk_is_paused_and_resumes_intact() {
    const TEST: &str = "a_guest_writing_to_a_full_host_disk_is_paused_and_resumes_intact";
    if !root_or_skip(TEST, "loop-mounting a small file system as the data dir") {
        return;
    }
    let env = TestEnv::new();
    // TCG boots on a loaded host can take minutes.
    std::fs::write(env.config_file(), "[daemon]\nstart_timeout_secs = 900\n").unwrap();
    let mounted = small_home(&env, 900);
    env.build_default_image();
    env.banger(&["vm", "create", "dev", "--vmm", "qemu"]).ok();
    env.banger_within(Duration::from_secs(1000), &["vm", "start", "dev"])
        .ok();
    // 128 MiB of a known pattern, flushed, then read back from the disk, not the cache.
    const BYTES: u64 = 128 << 20;
    let script = format!(
        "yes banger | head -c {BYTES} > /root/big && sync && echo 3 > /proc/sys/vm/drop_caches \
         && sha256sum /root/big"
    );
    let expected = {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("yes banger | head -c {BYTES} | sha256sum"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    // Leave 48 MiB: the guest's writes run out of host space.
    let filler = fill(&env.home());
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len.saturating_sub(48 << 20))
        .unwrap();
    let writer = env
        .command(&["vm", "exec", "dev", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let paused = poll_or_none(Duration::from_secs(600), || {
        let vm = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
        vm["runtime"]["io_error"].as_str().map(str::to_owned)
    });
    let Some(why) = paused else {
        panic!("QEMU did not pause the guest on the full disk");
    };
    assert!(why.contains("no space left on the host"), "{why}");
    let shown = env.banger(&["vm", "show", "dev"]).ok();
    assert!(
        shown.stdout.contains("paused by QEMU") && shown.stdout.contains("vm resume dev"),
        "{}",
        shown.stdout
    );
    // Space again: resume, and the writes finish with the pattern intact on the disk.
    std::fs::remove_file(&filler).unwrap();
    let resumed = env.banger(&["vm", "resume", "dev", "--json"]).ok().json();
    assert_eq!(resumed["changed"], true, "{resumed}");
    let mut writer = writer;
    let done = poll_or_none(Duration::from_secs(600), || writer.try_wait().unwrap());
    assert!(
        done.is_some(),
        "the guest's writes did not finish after resume"
    );
    let output = Run::from_output(writer.wait_with_output().unwrap()).ok();
    assert!(output.stdout.starts_with(&expected), "{}", output.stdout);
    let vm = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
    assert!(vm["runtime"]["io_error"].is_null(), "{vm}");
    env.banger_within(Duration::from_secs(300), &["vm", "stop", "dev"])
        .ok();
    env.banger(&["vm", "rm", "dev"]).ok();
    env.banger(&["daemon", "stop"]).ok();
    env.kill_daemon();
    drop(mounted);
}
