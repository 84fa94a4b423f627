//! A qcow2 overlay seen as a raw file through qemu-storage-daemon's FUSE export: e2fsck reads
//! and repairs it there, what it writes lands in the overlay (never in the backing file), and
//! closing the view leaves no mount, process or file behind. A bad image fails in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use banger_core::disk::system_tool;
use banger_core::disk_view::RawView;

/// Whether this user can make FUSE mounts here, or why not.
fn fuse_usable() -> Result<(), String> {
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("qemu-storage-daemon is not installed (qemu-utils)".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| format!("/dev/fuse cannot be opened by this user: {e}"))
}

fn run(program: &Path, args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(path.to_str().unwrap())
}

fn storage_daemons() -> usize {
    let out = Command::new("pgrep")
        .args(["-c", "-x", "qemu-storage-d"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test]
async fn e2fsck_repairs_a_qcow2_overlay_through_its_raw_view_and_nothing_is_left() {
    if let Err(why) = fuse_usable() {
        banger_shared::skip::report(
            "e2fsck_repairs_a_qcow2_overlay_through_its_raw_view_and_nothing_is_left",
            &why,
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mkfs = system_tool("mkfs.ext4");
    assert!(
        run(&mkfs, &["-q", "-F", "base.ext4", "64M"], d)
            .status
            .success()
    );
    let base_before = std::fs::read(d.join("base.ext4")).unwrap();
    let created = run(
        Path::new("qemu-img"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            d.join("base.ext4").to_str().unwrap(),
            "-F",
            "raw",
            "top.qcow2",
        ],
        d,
    );
    assert!(created.status.success(), "{created:?}");
    let daemons_before = storage_daemons();

    let mountpoint = d.join("top.view.raw");
    let view = RawView::open(&d.join("top.qcow2"), &mountpoint)
        .await
        .unwrap();
    assert_eq!(view.path(), mountpoint);
    assert!(mounted(&mountpoint));
    assert_eq!(std::fs::metadata(&mountpoint).unwrap().len(), 64 << 20);
    // Something for e2fsck to repair: the superblock's free block count made wrong.
    let debugfs = system_tool("debugfs");
    let broken = run(
        &debugfs,
        &["-w", "-R", "ssv free_blocks_count 7", "top.view.raw"],
        d,
    );
    assert!(broken.status.success(), "{broken:?}");
    let e2fsck = system_tool("e2fsck");
    let repaired = run(&e2fsck, &["-fp", "top.view.raw"], d);
    assert_eq!(repaired.status.code(), Some(1), "{repaired:?}");
    let clean = run(&e2fsck, &["-fn", "top.view.raw"], d);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");
    view.close().await;

    assert!(!mounted(&mountpoint));
    assert!(!mountpoint.exists());
    assert_eq!(storage_daemons(), daemons_before);
    // The repair went into the overlay; the backing file is as it was.
    assert_eq!(std::fs::read(d.join("base.ext4")).unwrap(), base_before);
    let again = RawView::open(&d.join("top.qcow2"), &mountpoint)
        .await
        .unwrap();
    let clean = run(&e2fsck, &["-fn", "top.view.raw"], d);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");
    again.close().await;

    // Not a qcow2 image: one line saying so, and nothing left.
    std::fs::write(d.join("junk.qcow2"), b"not a disk").unwrap();
    let err = RawView::open(&d.join("junk.qcow2"), &mountpoint)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot export") && !err.contains('\n'),
        "{err}"
    );
    assert!(!mountpoint.exists());
    assert_eq!(storage_daemons(), daemons_before);
}
