//! The reflink system-disk strategy on a real xfs (reflink=1) file system, made by the test
//! in a sparse file and loop-mounted (needs root and mkfs.xfs from xfsprogs, which
//! scripts/install-deps installs). The mount and the loop device are released even when an
//! assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_core::disk::{self, SystemDiskStrategy};

/// A loop-mounted xfs; unmounted and detached on drop.
struct XfsMount {
    _dir: tempfile::TempDir,
    mount: PathBuf,
    device: String,
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl XfsMount {
    fn new(size: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bg-xfs")
            .tempdir_in("/var/tmp")
            .unwrap();
        let image = dir.path().join("xfs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        run(
            "mkfs.xfs",
            &["-q", "-m", "reflink=1", image.to_str().unwrap()],
        );
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        // Built before mounting so that a failed mount still detaches the loop device.
        let guard = Self {
            _dir: dir,
            mount,
            device,
        };
        run("mount", &[&guard.device, guard.mount.to_str().unwrap()]);
        guard
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup")
            .args(["--detach", &self.device])
            .status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).unwrap();
    stat.blocks_available() as u64 * stat.fragment_size() as u64
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::File::options().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_2gib_image_clones_at_once_and_the_clone_is_independent() {
    if !nix::unistd::geteuid().is_root() {
        banger_shared::skip::report(
            "a_2gib_image_clones_at_once_and_the_clone_is_independent",
            "needs root (mounting an xfs image)",
        );
        return;
    }
    const SIZE: u64 = 2 << 30;
    let xfs = XfsMount::new(4 << 30);
    let base = xfs.mount.join("rootfs.ext4");
    {
        // 2 GiB of real, allocated data (not a sparse file, which would clone trivially).
        let mut f = std::fs::File::create(&base).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..(SIZE >> 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let (strategy, why) = disk::choose_raw_strategy(&xfs.mount, Err("no dm".into()));
    assert_eq!(strategy, SystemDiskStrategy::Reflink, "{why}");

    let free_before = free_bytes(&xfs.mount);
    let clone = xfs.mount.join("system.raw");
    let started = Instant::now();
    disk::reflink(&base, &clone).unwrap();
    let took = started.elapsed();
    eprintln!("reflink clone of 2 GiB took {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Shared extents: the clone used (almost) no space.
    let used = free_before.saturating_sub(free_bytes(&xfs.mount));
    assert!(used < 64 << 20, "the clone used {used} bytes");
    assert_eq!(std::fs::metadata(&clone).unwrap().len(), SIZE);
    assert_eq!(
        read_at(&clone, SIZE - 4096, 4096),
        read_at(&base, SIZE - 4096, 4096)
    );

    // Independent both ways.
    let original_head = read_at(&base, 0, 4096);
    write_at(&clone, 0, &[0xAB; 4096]);
    assert_eq!(
        read_at(&base, 0, 4096),
        original_head,
        "writing the clone left the image alone"
    );
    let clone_tail = read_at(&clone, SIZE - 4096, 4096);
    write_at(&base, SIZE - 4096, &[0xCD; 4096]);
    assert_eq!(
        read_at(&clone, SIZE - 4096, 4096),
        clone_tail,
        "writing the image left the clone alone"
    );
    assert_eq!(read_at(&clone, 0, 4096), vec![0xAB; 4096]);

    // Cloning onto an existing file is refused and leaves it alone.
    assert!(disk::reflink(&base, &clone).is_err());
    assert_eq!(read_at(&clone, 0, 4096), vec![0xAB; 4096]);
}

#[test]
fn ext4_gets_the_copy_strategy() {
    // /var/tmp is not a reflink file system on this host's kind (ext4): the choice falls to
    // the sparse copy when device-mapper is not usable either.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (strategy, why) = disk::choose_raw_strategy(dir.path(), Err("no device-mapper".into()));
    let fs_type = run("stat", &["-f", "-c", "%T", dir.path().to_str().unwrap()]);
    if fs_type == "xfs" || fs_type == "btrfs" {
        eprintln!("skipped: /var/tmp is {fs_type}");
        return;
    }
    assert_eq!(strategy, SystemDiskStrategy::Copy, "{why}");
    assert!(
        why.contains("cannot reflink") && why.contains("no device-mapper"),
        "{why}"
    );
    let (strategy, _) = disk::choose_raw_strategy(dir.path(), Ok(()));
    assert_eq!(strategy, SystemDiskStrategy::DmSnapshot);
}
