//! Loop devices and device-mapper snapshots for the daemon's `dm` system-disk strategy: loop
//! attach/detach through the kernel's loop ioctls (the helper opens and checks the backing
//! file itself, so what is attached is exactly what was validated), the snapshot through
//! `dmsetup` with a table the helper builds from validated loop devices. Every mapping gets the
//! uuid `BANGER-<owner>-<vm id>`, and only mappings carrying this owner's uuid are removed.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_proto::helper::{parse_dm_name, parse_loop_device};
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, SFlag, fstat};

use crate::validate::{self, Invalid};

/// The device-mapper control node; without it there is no device-mapper.
pub const DM_CONTROL: &str = "/dev/mapper/control";

/// Attempts at grabbing a free loop device another process may take first.
const ATTACH_ATTEMPTS: usize = 16;

// From linux/loop.h: "bad" ioctls (plain numbers, not _IO-encoded).
nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);

/// Why a disk operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Failed(String),
}

fn failed(message: impl Into<String>) -> DiskError {
    DiskError::Failed(message.into())
}

/// The state dir, canonical (it may appear after the helper starts).
pub fn root(state_dir: &Path) -> Result<PathBuf, Invalid> {
    state_dir
        .canonicalize()
        .map_err(|_| Invalid::PathMissing(state_dir.display().to_string()))
}

/// Attaches the regular file `text` (inside `root` once resolved) to a free loop device,
/// read-only when asked (the kernel makes the device read-only when its backing file is
/// opened read-only). The file must belong to `owner`: a root file hard-linked into the state
/// dir must not become readable or writable through a device the owner is given. Answers
/// `/dev/loopN`.
pub fn loop_attach(
    text: &str,
    read_only: bool,
    root: &Path,
    owner: u32,
) -> Result<String, DiskError> {
    let resolved = validate::state_path(text, root)?;
    let access = if read_only {
        OFlag::O_RDONLY
    } else {
        OFlag::O_RDWR
    };
    let file = open(
        &resolved,
        access | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| failed(format!("cannot open {}: {e}", resolved.display())))?;
    // What was opened, not what the path named a moment ago.
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| failed(format!("cannot check {}: {e}", resolved.display())))?;
    validate::inside(text, &opened, root)?;
    let stat =
        fstat(&file).map_err(|e| failed(format!("cannot stat {}: {e}", opened.display())))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(Invalid::NotRegular(text.to_owned()).into());
    }
    if stat.st_uid != owner {
        return Err(failed(format!(
            "{} belongs to uid {}, not to the owner (uid {owner})",
            opened.display(),
            stat.st_uid
        )));
    }
    let control = open(
        "/dev/loop-control",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| failed(format!("cannot open /dev/loop-control: {e}")))?;
    for _ in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is open for the call.
        let index = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
            .map_err(|e| failed(format!("no free loop device: {e}")))?;
        let device = format!("/dev/loop{index}");
        let node = open_loop(&device, read_only)?;
        // SAFETY: LOOP_SET_FD reads the integer fd argument only; both descriptors are open
        // for the duration of the call.
        match unsafe { loop_set_fd(node.as_raw_fd(), file.as_raw_fd()) } {
            Ok(_) => return Ok(device),
            // Another process bound it between GET_FREE and SET_FD: ask again.
            Err(Errno::EBUSY) => continue,
            Err(e) => {
                return Err(failed(format!(
                    "cannot attach {} to {device}: {e}",
                    opened.display()
                )));
            }
        }
    }
    Err(failed(format!(
        "no free loop device after {ATTACH_ATTEMPTS} attempts (others keep taking them)"
    )))
}

fn open_loop(device: &str, read_only: bool) -> Result<OwnedFd, DiskError> {
    let access = if read_only {
        OFlag::O_RDONLY
    } else {
        OFlag::O_RDWR
    };
    open(device, access | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| failed(format!("cannot open {device}: {e}")))
}

/// A loop device this owner may act on: `/dev/loopN`, attached, its backing file inside
/// `root`. Answers its sysfs directory.
pub fn owned_loop(device: &str, root: &Path) -> Result<PathBuf, Invalid> {
    owned_loop_backing(device, root).map(|(sys, _)| sys)
}

/// [`owned_loop`], with the backing file as the kernel names it (" (deleted)" removed).
fn owned_loop_backing(device: &str, root: &Path) -> Result<(PathBuf, PathBuf), Invalid> {
    let index = parse_loop_device(device).ok_or_else(|| Invalid::LoopDevice(device.to_owned()))?;
    let sys = PathBuf::from(format!("/sys/block/loop{index}"));
    let backing = std::fs::read_to_string(sys.join("loop/backing_file"))
        .map_err(|_| Invalid::LoopNotAttached(device.to_owned()))?;
    // The kernel's path of the open file (" (deleted)" appended once unlinked: still
    // below the same directories).
    let backing = backing.trim_end_matches('\n');
    let backing = PathBuf::from(backing.strip_suffix(" (deleted)").unwrap_or(backing));
    if !backing.starts_with(root) {
        return Err(Invalid::LoopNotOwned {
            device: device.to_owned(),
            backing,
            root: root.to_path_buf(),
        });
    }
    Ok((sys, backing))
}

/// Checks that `device` is the owner's and, when `file` is given, backed by that file (as
/// the kernel resolved it when attaching: symlinks in `file` are resolved for the compare,
/// and only the path as given is ever echoed, so the answer says nothing about other files).
fn detachable(device: &str, file: Option<&Path>, root: &Path) -> Result<(), Invalid> {
    let (_, backing) = owned_loop_backing(device, root)?;
    if let Some(file) = file {
        let resolved = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        if backing != resolved {
            return Err(Invalid::LoopReused {
                device: device.to_owned(),
                backing,
                expected: file.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Detaches a loop device backed by a file inside `root` (and by `file`, when given).
pub fn loop_detach(device: &str, file: Option<&Path>, root: &Path) -> Result<(), DiskError> {
    detachable(device, file, root)?;
    let node = open(device, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| failed(format!("cannot open {device}: {e}")))?;
    // Checked again with the node open: what is detached is what was checked, unless it was
    // detached and re-attached in the instant between (then the kernel refuses or the check
    // above already saw the new file).
    detachable(device, file, root)?;
    // SAFETY: LOOP_CLR_FD takes no argument; `node` is open for the call. While the device
    // is held open elsewhere (a dm table), the kernel detaches it when the last user closes.
    unsafe { loop_clr_fd(node.as_raw_fd()) }
        .map_err(|e| failed(format!("cannot detach {device}: {e}")))?;
    Ok(())
}

fn sys_read(sys: &Path, file: &str) -> Result<String, DiskError> {
    std::fs::read_to_string(sys.join(file))
        .map(|s| s.trim().to_owned())
        .map_err(|e| failed(format!("cannot read {}: {e}", sys.join(file).display())))
}

/// The uuid banger gives the mapping of `vm_id` for `owner`.
fn dm_uuid(owner: u32, vm_id: &str) -> String {
    format!("BANGER-{owner}-{vm_id}")
}

fn dm_name(name: &str) -> Result<&str, Invalid> {
    parse_dm_name(name).ok_or_else(|| Invalid::DmName(name.to_owned()))
}

fn require_dm() -> Result<(), DiskError> {
    if Path::new(DM_CONTROL).exists() {
        Ok(())
    } else {
        Err(failed(format!(
            "device-mapper is not available: {DM_CONTROL} is missing (load dm_mod: modprobe dm_mod)"
        )))
    }
}

/// Creates the snapshot mapping `name` over two validated loop devices and gives its node to
/// `owner`. Undone when the node cannot be given.
pub fn dm_snapshot_create(
    name: &str,
    origin_loop: &str,
    cow_loop: &str,
    root: &Path,
    owner: u32,
) -> Result<String, DiskError> {
    let vm_id = dm_name(name)?;
    let origin = owned_loop(origin_loop, root)?;
    owned_loop(cow_loop, root)?;
    if origin_loop == cow_loop {
        return Err(Invalid::SameLoop(origin_loop.to_owned()).into());
    }
    if sys_read(&origin, "ro")? != "1" {
        return Err(Invalid::OriginWritable(origin_loop.to_owned()).into());
    }
    let sectors: u64 = sys_read(&origin, "size")?
        .parse()
        .map_err(|e| failed(format!("size of {origin_loop}: {e}")))?;
    require_dm()?;
    let table = format!("0 {sectors} snapshot {origin_loop} {cow_loop} P 8");
    dmsetup(&[
        "create",
        name,
        "--uuid",
        &dm_uuid(owner, vm_id),
        "--table",
        &table,
    ])?;
    let device = format!("/dev/mapper/{name}");
    let give = || -> Result<(), DiskError> {
        // Without udev the node may not exist yet; with udev this is a no-op.
        dmsetup(&["mknodes", name])?;
        // Follows /dev/mapper/NAME to /dev/dm-N where udev makes a symlink.
        let node = Path::new(&device)
            .canonicalize()
            .map_err(|e| failed(format!("cannot resolve {device}: {e}")))?;
        let meta = std::fs::metadata(&node)
            .map_err(|e| failed(format!("cannot stat {}: {e}", node.display())))?;
        if !node.starts_with("/dev") || !meta.file_type().is_block_device() {
            return Err(failed(format!("{device} is not a block device under /dev")));
        }
        std::os::unix::fs::chown(&node, Some(owner), None)
            .map_err(|e| failed(format!("cannot chown {}: {e}", node.display())))
    };
    if let Err(e) = give() {
        let _ = dmsetup(&["remove", name]);
        return Err(e);
    }
    Ok(device)
}

/// Removes the mapping `name` if it carries this owner's banger uuid.
pub fn dm_remove(name: &str, owner: u32) -> Result<(), DiskError> {
    let vm_id = dm_name(name)?;
    require_dm()?;
    let uuid = dmsetup(&["info", "--noheadings", "-c", "-o", "uuid", name])?;
    if uuid.trim() != dm_uuid(owner, vm_id) {
        return Err(Invalid::DmNotOwned(name.to_owned()).into());
    }
    dmsetup(&["remove", name]).map(|_| ())
}

/// Runs dmsetup; answers its stdout, or its last stderr line as the error.
fn dmsetup(args: &[&str]) -> Result<String, DiskError> {
    let output = Command::new("dmsetup")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run dmsetup: {e}")))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    Err(failed(format!("dmsetup {}: {last}", args[0])))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_and_devices_are_validated_before_anything_runs() {
        let root = Path::new("/nonexistent-root");
        assert!(matches!(
            dm_snapshot_create("root", "/dev/loop0", "/dev/loop1", root, 0),
            Err(DiskError::Invalid(Invalid::DmName(_)))
        ));
        let name = "banger-0123456789abcdef0123456789abcdef";
        assert!(matches!(
            dm_snapshot_create(name, "/dev/sda", "/dev/loop1", root, 0),
            Err(DiskError::Invalid(Invalid::LoopDevice(_)))
        ));
        assert!(matches!(
            dm_remove("banger-x; rm -rf /", 0),
            Err(DiskError::Invalid(Invalid::DmName(_)))
        ));
        assert!(matches!(
            loop_detach("/dev/loop0/../sda", None, root),
            Err(DiskError::Invalid(Invalid::LoopDevice(_)))
        ));
    }
}
