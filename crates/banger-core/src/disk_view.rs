//! A qcow2 disk seen as a raw file, for host tools that read only raw images (e2fsck):
//! `qemu-storage-daemon` (qemu-utils, beside `qemu-img`) opens the qcow2 chain and exports it
//! through FUSE onto an empty file, which then reads and writes as the guest's disk would.
//! Writes go into the qcow2 top, as the guest's own would. Needs a FUSE device the owner can
//! open (`/dev/fuse`, and `fusermount3` for an unprivileged owner); where it cannot be had,
//! [`RawView::open`] fails and the caller does without.
//!
//! The storage daemon is the daemon's child, asked to end (SIGTERM) when the daemon ends, so
//! a daemon killed during a check leaves no export mounted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// The tool, from qemu-utils.
const STORAGE_DAEMON: &str = "qemu-storage-daemon";

/// How long the export may take to appear, and the daemon to end when asked.
const OPEN_LIMIT: Duration = Duration::from_secs(15);
const CLOSE_LIMIT: Duration = Duration::from_secs(15);

/// Why a view could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{STORAGE_DAEMON} is not installed (package qemu-utils)")]
    Missing,
    #[error("cannot prepare {path}: {source}")]
    Mountpoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {STORAGE_DAEMON}: {0}")]
    Spawn(std::io::Error),
    #[error("{STORAGE_DAEMON} cannot export {image} through FUSE: {message}")]
    Export { image: PathBuf, message: String },
}

/// A running export of one qcow2 image at [`RawView::path`]; [`RawView::close`] ends it.
#[derive(Debug)]
pub struct RawView {
    child: Child,
    mountpoint: PathBuf,
}

impl RawView {
    /// Exports `image` (a qcow2 file and its backing chain; only its top is written) at
    /// `mountpoint`, a file this creates (or replaces when empty) and [`RawView::close`]
    /// removes. Returns once the export answers.
    pub async fn open(image: &Path, mountpoint: &Path) -> Result<Self, ViewError> {
        prepare_mountpoint(mountpoint).await?;
        let blockdev_file = serde_json::json!({
            "driver": "file", "node-name": "file", "filename": image,
        });
        let blockdev_disk = serde_json::json!({
            "driver": "qcow2", "node-name": "disk", "file": "file",
        });
        let export = serde_json::json!({
            "type": "fuse", "id": "view", "node-name": "disk",
            "mountpoint": mountpoint, "writable": true,
        });
        let mut command = Command::new(STORAGE_DAEMON);
        command
            .arg("--blockdev")
            .arg(blockdev_file.to_string())
            .arg("--blockdev")
            .arg(blockdev_disk.to_string())
            .arg("--export")
            .arg(export.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and changes only the child. The parent-death
        // signal follows the thread that forks: this runs on an async worker, which lives
        // as long as the daemon.
        unsafe {
            command.pre_exec(|| {
                if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ViewError::Missing,
            _ => ViewError::Spawn(e),
        })?;
        let deadline = Instant::now() + OPEN_LIMIT;
        loop {
            // Before the export the file is empty; once mounted it has the disk's size.
            if std::fs::metadata(mountpoint).is_ok_and(|m| m.len() > 0) {
                return Ok(Self {
                    child,
                    mountpoint: mountpoint.to_owned(),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr).await;
                }
                let _ = std::fs::remove_file(mountpoint);
                return Err(ViewError::Export {
                    image: image.to_owned(),
                    message: crate::cause::of_failure(STORAGE_DAEMON, &status, stderr.as_bytes()),
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                let _ = std::fs::remove_file(mountpoint);
                return Err(ViewError::Export {
                    image: image.to_owned(),
                    message: format!("no export after {} s", OPEN_LIMIT.as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The raw view of the disk.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Ends the export: the storage daemon flushes the image and unmounts on SIGTERM (killed
    /// when it does not end in time), then the mount point file goes.
    pub async fn close(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(CLOSE_LIMIT, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "{STORAGE_DAEMON} did not end when asked; killed");
                let _ = self.child.kill().await;
                detach(&self.mountpoint).await;
            }
        }
        let _ = std::fs::remove_file(&self.mountpoint);
    }
}

/// An empty regular file at `path`; a stale export left there (its daemon gone) is detached
/// first.
async fn prepare_mountpoint(path: &Path) -> Result<(), ViewError> {
    let fail = |source| ViewError::Mountpoint {
        path: path.to_owned(),
        source,
    };
    if let Err(e) = std::fs::symlink_metadata(path)
        && e.raw_os_error() == Some(nix::libc::ENOTCONN)
    {
        detach(path).await;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map(drop)
        .map_err(fail)
}

/// Lazily unmounts an export whose daemon is gone: as root directly, else through
/// `fusermount3` (which unmounts only the user's own FUSE mounts).
async fn detach(path: &Path) {
    if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
}
