//! Loop devices and device-mapper snapshots for the daemon's `dm` system-disk strategy.
//!
//! Ownership is identity, never a path: a loop device is this owner's when this helper
//! attached it, which it proves twice: the kernel's `lo_file_name` of the device carries a
//! random tag (`banger:<owner>:<64 random bits>`, set atomically with the backing file by
//! `LOOP_CONFIGURE`), and the helper's own root-owned record dir holds `loop<N>` with that tag
//! and the backing file's device and inode (which the kernel reports too). The backing file
//! is opened by the helper beneath the state dir's descriptor and must be the owner's regular
//! file (fstat). Another user's or root's loop device, whatever file backs it, is refused.
//!
//! The snapshot goes through `dmsetup` with a table the helper builds from such loops. Every
//! mapping gets the uuid `BANGER-<owner>-<vm id>`, and only mappings carrying this owner's
//! uuid are removed.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_proto::helper::{parse_dm_name, parse_legacy_dm_name, parse_loop_device};
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use crate::confine::OpenRoot;
use crate::validate::Invalid;

/// The device-mapper control node; without it there is no device-mapper.
pub const DM_CONTROL: &str = "/dev/mapper/control";

/// Attempts at grabbing a free loop device another process may take first.
const ATTACH_ATTEMPTS: usize = 16;

/// `LO_NAME_SIZE` of linux/loop.h.
const LO_NAME_SIZE: usize = 64;
/// `LO_FLAGS_READ_ONLY` of linux/loop.h.
const LO_FLAGS_READ_ONLY: u32 = 1;

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

impl LoopInfo64 {
    fn zeroed() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }

    /// `lo_file_name` up to its first NUL.
    fn file_name(&self) -> &[u8] {
        let end = self
            .lo_file_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(LO_NAME_SIZE);
        &self.lo_file_name[..end]
    }
}

/// `struct loop_config` of linux/loop.h (`LOOP_CONFIGURE`, Linux 5.8).
#[repr(C)]
pub struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// From linux/loop.h: "bad" ioctls (plain numbers, not _IO-encoded).
nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_write_ptr_bad!(loop_set_status64, 0x4C04, LoopInfo64);
nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
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

/// The helper's records of the loop devices it attached (its own root-owned dir).
#[derive(Debug, Clone)]
pub struct LoopRecords {
    pub dir: PathBuf,
    pub owner: u32,
}

/// What the helper wrote down when attaching a device.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    tag: String,
    dev: u64,
    ino: u64,
}

impl LoopRecords {
    /// Creates the record dir (0700, root's) or checks an existing one.
    pub fn prepare(dir: PathBuf, owner: u32) -> Result<Self, String> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        let meta = std::fs::symlink_metadata(&dir)
            .map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "the record dir {} must be a directory of uid {me} with mode 0700",
                dir.display()
            ));
        }
        Ok(Self { dir, owner })
    }

    fn path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("loop{index}"))
    }

    fn read(&self, index: u32) -> Option<Record> {
        let text = std::fs::read_to_string(self.path(index)).ok()?;
        let mut fields = text.split_whitespace();
        let tag = fields.next()?.to_owned();
        let dev = fields.next()?.parse().ok()?;
        let ino = fields.next()?.parse().ok()?;
        Some(Record { tag, dev, ino })
    }

    fn write(&self, index: u32, record: &Record) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".loop{index}.new"));
        std::fs::write(
            &tmp,
            format!("{} {} {}\n", record.tag, record.dev, record.ino),
        )?;
        std::fs::rename(&tmp, self.path(index))
    }

    fn forget(&self, index: u32) {
        let _ = std::fs::remove_file(self.path(index));
    }

    /// A fresh random tag for a device attached now.
    fn new_tag(&self) -> Result<String, DiskError> {
        let mut bytes = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| failed(format!("cannot read /dev/urandom: {e}")))?;
        Ok(format!(
            "banger:{}:{:016x}",
            self.owner,
            u64::from_be_bytes(bytes)
        ))
    }
}

/// Attaches the owner's regular file `text` (beneath the state dir) to a free loop device,
/// read-only when asked (the kernel makes the device read-only when its backing file is
/// opened read-only), tags it and records it. Answers `/dev/loopN`.
pub fn loop_attach(
    text: &str,
    read_only: bool,
    root: &OpenRoot,
    records: &LoopRecords,
) -> Result<String, DiskError> {
    let access = if read_only {
        OFlag::O_RDONLY
    } else {
        OFlag::O_RDWR
    };
    let file = root.open_file(text, access)?;
    let record = Record {
        tag: records.new_tag()?,
        dev: file.stat.st_dev,
        ino: file.stat.st_ino,
    };
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
        let index = u32::try_from(index).map_err(|_| failed("bad loop index"))?;
        let device = format!("/dev/loop{index}");
        let node = open_loop(&device, read_only)?;
        match configure(&node, &file.fd, &record.tag, read_only) {
            Ok(()) => {}
            // Another process bound it between GET_FREE and the attach: ask again.
            Err(Errno::EBUSY) => continue,
            Err(e) => return Err(failed(format!("cannot attach {text} to {device}: {e}"))),
        }
        if let Err(e) = records.write(index, &record) {
            // SAFETY: LOOP_CLR_FD takes no argument; `node` is open for the call.
            let _ = unsafe { loop_clr_fd(node.as_raw_fd()) };
            return Err(failed(format!(
                "cannot record {device} in {}: {e}",
                records.dir.display()
            )));
        }
        return Ok(device);
    }
    Err(failed(format!(
        "no free loop device after {ATTACH_ATTEMPTS} attempts (others keep taking them)"
    )))
}

/// Binds `file` to the loop device `node` with `tag` as its `lo_file_name`: atomically with
/// `LOOP_CONFIGURE`, or `LOOP_SET_FD` + `LOOP_SET_STATUS64` on kernels without it.
fn configure(node: &OwnedFd, file: &OwnedFd, tag: &str, read_only: bool) -> Result<(), Errno> {
    let mut info = LoopInfo64::zeroed();
    let len = tag.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..len].copy_from_slice(&tag.as_bytes()[..len]);
    if read_only {
        info.lo_flags = LO_FLAGS_READ_ONLY;
    }
    let config = LoopConfig {
        fd: u32::try_from(file.as_raw_fd()).map_err(|_| Errno::EBADF)?,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` (layout above) through the
    // pointer, valid for the call; both descriptors are open.
    match unsafe { loop_configure(node.as_raw_fd(), &config) } {
        Ok(_) => return Ok(()),
        Err(Errno::EINVAL | Errno::ENOTTY) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: LOOP_SET_FD reads the integer fd argument only; both descriptors are open.
    unsafe { loop_set_fd(node.as_raw_fd(), file.as_raw_fd()) }?;
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64` through the pointer, valid
    // for the call.
    if let Err(e) = unsafe { loop_set_status64(node.as_raw_fd(), &config.info) } {
        // SAFETY: LOOP_CLR_FD takes no argument; `node` is open for the call.
        let _ = unsafe { loop_clr_fd(node.as_raw_fd()) };
        return Err(e);
    }
    Ok(())
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

/// A loop device this helper attached for this owner, opened.
struct OwnedLoop {
    index: u32,
    node: OwnedFd,
    info: LoopInfo64,
}

/// Opens `/dev/loopN` and proves it is this helper's (tag and record agree with what the
/// kernel reports). A stale record (the device detached or re-attached by someone else) is
/// dropped.
fn owned_loop(device: &str, records: &LoopRecords) -> Result<OwnedLoop, Invalid> {
    let index = parse_loop_device(device).ok_or_else(|| Invalid::LoopDevice(device.to_owned()))?;
    let not_owned = || Invalid::LoopNotOwned(device.to_owned());
    let record = records.read(index).ok_or_else(not_owned)?;
    let node =
        open(device, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|_| not_owned())?;
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64` (layout above) through the
    // pointer, valid for the call; `node` is open.
    if unsafe { loop_get_status64(node.as_raw_fd(), &mut info) }.is_err()
        || info.file_name() != record.tag.as_bytes()
        || info.lo_device != record.dev
        || info.lo_inode != record.ino
    {
        records.forget(index);
        return Err(not_owned());
    }
    Ok(OwnedLoop { index, node, info })
}

/// Detaches a loop device this helper attached (and, when `file` is given, still backed by
/// that file: same device and inode). The record goes with it.
pub fn loop_detach(
    device: &str,
    file: Option<&str>,
    root: Option<&OpenRoot>,
    records: &LoopRecords,
) -> Result<(), DiskError> {
    let owned = owned_loop(device, records)?;
    if let (Some(text), Some(root)) = (file, root) {
        // A file that is gone no longer names anything; the tag already proved the device.
        if let Ok(opened) = root.open_file(text, OFlag::O_PATH)
            && (opened.stat.st_dev, opened.stat.st_ino)
                != (owned.info.lo_device, owned.info.lo_inode)
        {
            return Err(Invalid::LoopReused {
                device: device.to_owned(),
                expected: text.to_owned(),
            }
            .into());
        }
    }
    // SAFETY: LOOP_CLR_FD takes no argument; `node` is open for the call. While the device
    // is held open elsewhere (a dm table), the kernel detaches it when the last user closes.
    unsafe { loop_clr_fd(owned.node.as_raw_fd()) }
        .map_err(|e| failed(format!("cannot detach {device}: {e}")))?;
    records.forget(owned.index);
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

/// The VM id of `owner`'s dm name `banger-<owner>-<vm id>`; another owner's name is refused
/// by its name before anything looks at the mapping.
fn dm_name(name: &str, owner: u32) -> Result<&str, Invalid> {
    match parse_dm_name(name) {
        None => Err(Invalid::DmName(name.to_owned())),
        Some((o, _)) if o != owner => Err(Invalid::DmNotOwned(name.to_owned())),
        Some((_, vm_id)) => Ok(vm_id),
    }
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
    records: &LoopRecords,
) -> Result<String, DiskError> {
    let owner = records.owner;
    let vm_id = dm_name(name, owner)?;
    let origin = owned_loop(origin_loop, records)?;
    owned_loop(cow_loop, records)?;
    if origin_loop == cow_loop {
        return Err(Invalid::SameLoop(origin_loop.to_owned()).into());
    }
    if origin.info.lo_flags & LO_FLAGS_READ_ONLY == 0 {
        return Err(Invalid::OriginWritable(origin_loop.to_owned()).into());
    }
    let sys = PathBuf::from(format!("/sys/block/loop{}", origin.index));
    let sectors: u64 = sys_read(&sys, "size")?
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

/// Removes the mapping `name` if it carries this owner's banger uuid (also under the name
/// `banger-<vm id>` mappings had before names carried the uid: the uuid proves the owner).
pub fn dm_remove(name: &str, owner: u32) -> Result<(), DiskError> {
    let vm_id = match parse_legacy_dm_name(name) {
        Some(vm_id) => vm_id,
        None => dm_name(name, owner)?,
    };
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
        let dir = tempfile::tempdir().unwrap();
        let records = LoopRecords {
            dir: dir.path().to_owned(),
            owner: 0,
        };
        assert!(matches!(
            dm_snapshot_create("root", "/dev/loop0", "/dev/loop1", &records),
            Err(DiskError::Invalid(Invalid::DmName(_)))
        ));
        // The old name without the uid, and another owner's name.
        for (name, owner) in [
            ("banger-0123456789abcdef0123456789abcdef", 0),
            ("banger-1000-0123456789abcdef0123456789abcdef", 0),
        ] {
            let records = LoopRecords {
                dir: dir.path().to_owned(),
                owner,
            };
            assert!(
                matches!(
                    dm_snapshot_create(name, "/dev/loop0", "/dev/loop1", &records),
                    Err(DiskError::Invalid(
                        Invalid::DmName(_) | Invalid::DmNotOwned(_)
                    ))
                ),
                "{name}"
            );
        }
        assert!(matches!(
            dm_remove("banger-1000-0123456789abcdef0123456789abcdef", 0),
            Err(DiskError::Invalid(Invalid::DmNotOwned(_)))
        ));
        let name = "banger-0-0123456789abcdef0123456789abcdef";
        assert!(matches!(
            dm_snapshot_create(name, "/dev/sda", "/dev/loop1", &records),
            Err(DiskError::Invalid(Invalid::LoopDevice(_)))
        ));
        // No record: not this helper's, whatever backs it.
        assert!(matches!(
            dm_snapshot_create(name, "/dev/loop0", "/dev/loop1", &records),
            Err(DiskError::Invalid(Invalid::LoopNotOwned(_)))
        ));
        assert!(matches!(
            dm_remove("banger-x; rm -rf /", 0),
            Err(DiskError::Invalid(Invalid::DmName(_)))
        ));
        assert!(matches!(
            loop_detach("/dev/loop0/../sda", None, None, &records),
            Err(DiskError::Invalid(Invalid::LoopDevice(_)))
        ));
    }

    #[test]
    fn loop_info64_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 8 + 232 + 64);
    }
}
