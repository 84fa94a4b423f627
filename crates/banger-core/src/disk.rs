//! Per-VM disks. The system disk is a qcow2 overlay over the image's raw root filesystem
//! (kept until `vm rm`); the work disk is a fresh ext4 (lazy init, label `banger-work`)
//! populated at creation from a seed directory with `mkfs.ext4 -d`, so per-VM files (keys)
//! reach the guest without mounting anything on the host. The work disk holds the user's data
//! and is never recreated.

use std::path::Path;
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
