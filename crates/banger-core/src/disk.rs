//! Per-VM disks. The system disk is a qcow2 overlay over the image's raw root filesystem
//! (kept until `vm rm`); the work disk is a fresh ext4 (lazy init, label `banger-work`)
//! populated at creation from a seed directory with `mkfs.ext4 -d`, so per-VM files (keys)
//! reach the guest without mounting anything on the host. The work disk holds the user's data
//! and is never recreated.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Filesystem label the guest mounts at /root.
pub const WORK_LABEL: &str = "banger-work";

/// Bytes per inode on work disks: workspaces are many small files, and the ext4 default
/// (one inode per 16 KiB above 512 MiB, fewer on small disks) runs out on large repos.
const WORK_BYTES_PER_INODE: u64 = 8192;

/// Why a disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A tool failed.
    #[error("{tool} failed: {message}")]
    Tool { tool: &'static str, message: String },
    /// A tool is not installed.
    #[error("{0} is not installed")]
    MissingTool(&'static str),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

async fn run(tool: &'static str, command: &mut Command) -> Result<(), DiskError> {
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DiskError::MissingTool(tool),
            _ => DiskError::Tool {
                tool,
                message: e.to_string(),
            },
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(DiskError::Tool {
        tool,
        message: stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .to_owned(),
    })
}

/// Creates `overlay` as a qcow2 file backed by the raw image `base` (absolute path).
pub async fn create_system_overlay(base: &Path, overlay: &Path) -> Result<(), DiskError> {
    run(
        "qemu-img",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(overlay),
    )
    .await
}

/// Creates the work disk `path` of `size_bytes` from `seed_dir`.
pub async fn create_work_disk(
    path: &Path,
    size_bytes: u64,
    seed_dir: &Path,
) -> Result<(), DiskError> {
    let inodes = (size_bytes / WORK_BYTES_PER_INODE).clamp(16_384, 1 << 26);
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", WORK_LABEL, "-t", "ext4"])
            .args([
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            ])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(seed_dir)
            .arg(path)
            .arg(format!("{}k", size_bytes / 1024)),
    )
    .await
}

/// How a VM's system disk is made from the image's raw root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemDiskStrategy {
    /// qcow2 overlay backed by the image (QEMU only).
    Qcow2,
    /// Reflink clone (FICLONE; xfs, btrfs): instant, shares blocks until written.
    Reflink,
    /// device-mapper snapshot over a read-only loop device of the image (via [`HostOps`]).
    DmSnapshot,
    /// Full sparse copy: the last resort, time and space grow with the image.
    Copy,
}

impl SystemDiskStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Reflink => "reflink",
            Self::DmSnapshot => "dm",
            Self::Copy => "copy",
        }
    }

    pub fn from_wire(text: &str) -> Option<Self> {
        [Self::Qcow2, Self::Reflink, Self::DmSnapshot, Self::Copy]
            .into_iter()
            .find(|s| s.as_str() == text)
    }

    /// The format the VMM opens the disk with.
    pub fn format(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            _ => "raw",
        }
    }
}

// FICLONE = _IOW(0x94, 9, int): clone all of the source fd's extents into the target.
nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Makes `dest` a reflink clone of `source` (same file system; xfs with reflink=1, btrfs).
/// `dest` must not exist; it is removed again on failure.
pub fn reflink(source: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(source)?;
    let dst = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(dest)?;
    // SAFETY: both descriptors are open for the duration of the call (the Files live until
    // the end of this function); FICLONE reads only the integer argument.
    let result = unsafe {
        ficlone(
            dst.as_raw_fd(),
            src.as_raw_fd() as nix::sys::ioctl::ioctl_param_type,
        )
    };
    if let Err(errno) = result {
        drop(dst);
        let _ = std::fs::remove_file(dest);
        return Err(std::io::Error::from(errno));
    }
    Ok(())
}

/// Whether reflink clones work in `dir` (tried on two scratch files there).
pub fn reflink_supported(dir: &Path) -> Result<(), String> {
    let scratch = tempfile::Builder::new()
        .prefix(".reflink-probe")
        .tempdir_in(dir)
        .map_err(|e| format!("cannot probe {}: {e}", dir.display()))?;
    let source = scratch.path().join("a");
    std::fs::write(&source, [0u8; 4096])
        .map_err(|e| format!("cannot probe {}: {e}", dir.display()))?;
    reflink(&source, &scratch.path().join("b"))
        .map_err(|e| format!("the file system of {} cannot reflink ({e})", dir.display()))
}

/// The raw-disk strategy for images stored in `dir`: reflink where the file system clones,
/// else a device-mapper snapshot where `dm_available` (device-mapper and a way to drive it),
/// else a sparse copy. Returns the strategy and why.
pub fn choose_raw_strategy(
    dir: &Path,
    dm_available: Result<(), String>,
) -> (SystemDiskStrategy, String) {
    match reflink_supported(dir) {
        Ok(()) => (
            SystemDiskStrategy::Reflink,
            format!("{} supports reflink clones", dir.display()),
        ),
        Err(no_reflink) => match dm_available {
            Ok(()) => (
                SystemDiskStrategy::DmSnapshot,
                format!("{no_reflink}; device-mapper is available"),
            ),
            Err(no_dm) => (
                SystemDiskStrategy::Copy,
                format!("{no_reflink}, and {no_dm}: full sparse copy"),
            ),
        },
    }
}

/// Copies `source` to `dest` (created, must not exist), leaving holes where the source has
/// zeros, calling `progress(done, total)` after each chunk. `dest` is removed on failure.
pub fn sparse_copy(
    source: &Path,
    dest: &Path,
    mut progress: impl FnMut(u64, u64),
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    const CHUNK: usize = 1 << 20;
    let mut copy = || -> std::io::Result<()> {
        let mut src = std::fs::File::open(source)?;
        let total = src.metadata()?.len();
        let mut dst = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(dest)?;
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                let n = src.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            if buf[..filled].iter().all(|b| *b == 0) {
                dst.seek(SeekFrom::Current(filled as i64))?;
            } else {
                dst.write_all(&buf[..filled])?;
            }
            done += filled as u64;
            progress(done, total);
        }
        dst.set_len(total)?;
        dst.sync_all()
    };
    copy().inspect_err(|_| {
        let _ = std::fs::remove_file(dest);
    })
}

/// A privileged host operation (the closed set banger-helper will accept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    /// `losetup --find --show [--read-only] FILE`; answers the loop device.
    LoopAttach { file: PathBuf, read_only: bool },
    /// `losetup --detach DEVICE`.
    LoopDetach { device: String },
    /// `dmsetup create NAME --table TABLE`.
    DmCreate { name: String, table: String },
    /// `dmsetup remove NAME`.
    DmRemove { name: String },
}

/// Where privileged operations go: the helper in production, a recording fake in tests.
pub trait HostOps: Send + Sync + std::fmt::Debug {
    /// Runs `op`; answers its output (the loop device for `LoopAttach`).
    fn run(&self, op: &HostOp) -> Result<String, String>;
}

/// Runs the operations directly with losetup/dmsetup (needs root; stands in for the helper).
#[derive(Debug, Default)]
pub struct LocalHostOps;

impl HostOps for LocalHostOps {
    fn run(&self, op: &HostOp) -> Result<String, String> {
        let mut command = match op {
            HostOp::LoopAttach { file, read_only } => {
                let mut c = std::process::Command::new("losetup");
                c.args(["--find", "--show"]);
                if *read_only {
                    c.arg("--read-only");
                }
                c.arg(file);
                c
            }
            HostOp::LoopDetach { device } => {
                let mut c = std::process::Command::new("losetup");
                c.args(["--detach", device]);
                c
            }
            HostOp::DmCreate { name, table } => {
                let mut c = std::process::Command::new("dmsetup");
                c.args(["create", name, "--table", table]);
                c
            }
            HostOp::DmRemove { name } => {
                let mut c = std::process::Command::new("dmsetup");
                c.args(["remove", name]);
                c
            }
        };
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{op:?}: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{op:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

/// A device-mapper snapshot system disk and the loop devices under it (saved beside the VM's
/// disks so `vm rm` can tear down what this boot attached).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmDisk {
    pub name: String,
    /// `/dev/mapper/NAME`, what the VMM opens.
    pub device: PathBuf,
    pub base_loop: String,
    pub cow_loop: String,
}

/// Builds a persistent dm snapshot `name` of the image `base` with copy-on-write store
/// `cow` (a sparse file of `cow_bytes`, created here): base attached read-only, cow attached,
/// `snapshot` target with persistent exceptions and 4 KiB chunks. Undone on failure.
pub fn dm_snapshot_create(
    ops: &dyn HostOps,
    name: &str,
    base: &Path,
    cow: &Path,
    cow_bytes: u64,
) -> Result<DmDisk, DiskError> {
    std::fs::File::create(cow)
        .and_then(|f| f.set_len(cow_bytes))
        .map_err(|e| DiskError::Tool {
            tool: "device-mapper",
            message: format!("cannot create {}: {e}", cow.display()),
        })?;
    dm_snapshot_attach(ops, name, base, cow)
}

/// Sets up the mapping `name` over an existing copy-on-write store (after a host reboot the
/// loop devices and the mapping are gone; the persistent exceptions in `cow` are not).
pub fn dm_snapshot_attach(
    ops: &dyn HostOps,
    name: &str,
    base: &Path,
    cow: &Path,
) -> Result<DmDisk, DiskError> {
    let tool_err = |message: String| DiskError::Tool {
        tool: "device-mapper",
        message,
    };
    let sectors = std::fs::metadata(base)
        .map_err(|e| tool_err(format!("cannot stat {}: {e}", base.display())))?
        .len()
        / 512;
    let base_loop = ops
        .run(&HostOp::LoopAttach {
            file: base.to_path_buf(),
            read_only: true,
        })
        .map_err(tool_err)?;
    let cow_loop = match ops.run(&HostOp::LoopAttach {
        file: cow.to_path_buf(),
        read_only: false,
    }) {
        Ok(device) => device,
        Err(e) => {
            let _ = ops.run(&HostOp::LoopDetach { device: base_loop });
            return Err(tool_err(e));
        }
    };
    let table = format!("0 {sectors} snapshot {base_loop} {cow_loop} P 8");
    if let Err(e) = ops.run(&HostOp::DmCreate {
        name: name.to_owned(),
        table,
    }) {
        let _ = ops.run(&HostOp::LoopDetach { device: cow_loop });
        let _ = ops.run(&HostOp::LoopDetach { device: base_loop });
        return Err(tool_err(e));
    }
    Ok(DmDisk {
        name: name.to_owned(),
        device: PathBuf::from("/dev/mapper").join(name),
        base_loop,
        cow_loop,
    })
}

/// Tears a dm snapshot down: the mapping first, then its loop devices (every step tried).
pub fn dm_snapshot_remove(ops: &dyn HostOps, disk: &DmDisk) -> Result<(), DiskError> {
    let results = [
        ops.run(&HostOp::DmRemove {
            name: disk.name.clone(),
        }),
        ops.run(&HostOp::LoopDetach {
            device: disk.cow_loop.clone(),
        }),
        ops.run(&HostOp::LoopDetach {
            device: disk.base_loop.clone(),
        }),
    ];
    match results.into_iter().find_map(Result::err) {
        Some(message) => Err(DiskError::Tool {
            tool: "device-mapper",
            message,
        }),
        None => Ok(()),
    }
}

/// A [`HostOps`] that records every operation and answers like the real tools (loop devices
/// numbered from /dev/loop0); `fail_on` makes the first matching operation fail.
#[derive(Debug, Default)]
pub struct RecordingHostOps {
    ops: std::sync::Mutex<Vec<HostOp>>,
    fail_on: Option<fn(&HostOp) -> bool>,
}

impl RecordingHostOps {
    pub fn failing_on(fail_on: fn(&HostOp) -> bool) -> Self {
        Self {
            ops: Default::default(),
            fail_on: Some(fail_on),
        }
    }

    /// Every operation run so far, in order.
    pub fn ops(&self) -> Vec<HostOp> {
        self.ops.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

impl HostOps for RecordingHostOps {
    fn run(&self, op: &HostOp) -> Result<String, String> {
        let mut ops = self.ops.lock().map_err(|_| "poisoned".to_owned())?;
        ops.push(op.clone());
        if self.fail_on.is_some_and(|f| f(op)) {
            return Err(format!("{op:?}: refused by the test"));
        }
        let loops = ops
            .iter()
            .filter(|o| matches!(o, HostOp::LoopAttach { .. }))
            .count();
        Ok(match op {
            HostOp::LoopAttach { .. } => format!("/dev/loop{}", loops - 1),
            _ => String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> PathBuf {
        let base = dir.join("rootfs.ext4");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        base
    }

    #[test]
    fn dm_snapshot_runs_exactly_these_host_operations() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path());
        let cow = dir.path().join("system.cow");
        let ops = RecordingHostOps::default();
        let disk = dm_snapshot_create(&ops, "banger-abc", &base, &cow, 1 << 30).unwrap();
        assert_eq!(disk.device, Path::new("/dev/mapper/banger-abc"));
        assert_eq!(
            std::fs::metadata(&cow).unwrap().len(),
            1 << 30,
            "sparse cow store"
        );
        dm_snapshot_remove(&ops, &disk).unwrap();
        assert_eq!(
            ops.ops(),
            vec![
                HostOp::LoopAttach {
                    file: base.clone(),
                    read_only: true
                },
                HostOp::LoopAttach {
                    file: cow.clone(),
                    read_only: false
                },
                HostOp::DmCreate {
                    name: "banger-abc".into(),
                    table: format!(
                        "0 {} snapshot /dev/loop0 /dev/loop1 P 8",
                        (64u64 << 20) / 512
                    ),
                },
                HostOp::DmRemove {
                    name: "banger-abc".into()
                },
                HostOp::LoopDetach {
                    device: "/dev/loop1".into()
                },
                HostOp::LoopDetach {
                    device: "/dev/loop0".into()
                },
            ]
        );
    }

    #[test]
    fn a_failed_dm_create_detaches_both_loops() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path());
        let cow = dir.path().join("system.cow");
        let ops = RecordingHostOps::failing_on(|op| matches!(op, HostOp::DmCreate { .. }));
        let err = dm_snapshot_create(&ops, "banger-x", &base, &cow, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        let recorded = ops.ops();
        assert_eq!(
            recorded[3..],
            [
                HostOp::LoopDetach {
                    device: "/dev/loop1".into()
                },
                HostOp::LoopDetach {
                    device: "/dev/loop0".into()
                },
            ]
        );
    }

    #[test]
    fn sparse_copy_keeps_holes_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::File::create(&src).unwrap();
            f.set_len(32 << 20).unwrap();
            f.seek(SeekFrom::Start(5 << 20)).unwrap();
            f.write_all(b"data in the middle").unwrap();
        }
        let dst = dir.path().join("dst");
        let mut calls = Vec::new();
        sparse_copy(&src, &dst, |done, total| calls.push((done, total))).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(calls.last(), Some(&(32 << 20, 32 << 20)));
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20,
            "holes kept"
        );
    }
}
