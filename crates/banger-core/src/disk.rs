//! Per-VM disks. The system disk is a qcow2 overlay over the image's raw root filesystem
//! (kept until `vm rm`); the work disk is a fresh ext4 (lazy init, label `banger-work`)
//! populated at creation from a seed directory with `mkfs.ext4 -d`, so per-VM files (keys)
//! reach the guest without mounting anything on the host; every seeded file is then owned by
//! the guest's root (`debugfs`), whatever the host uid. The system disk has a virtual size of
//! its own (`defaults.system_disk_size`, at least the image's), which the guest's root
//! filesystem grows into at boot. The work disk holds the user's data
//! and is never recreated. Raw system disks for Firecracker: reflink clone, device-mapper
//! snapshot (its loop and dm steps go through banger-helper, [`HostOps`]), or sparse copy.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use banger_proto::helper::HelperOp;
use tokio::process::Command;

use crate::host::{HostError, HostOps};

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
    /// banger-helper refused or failed a device-mapper step.
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DiskError {
    /// Maps a failure to start `tool`: not found means not installed.
    pub fn spawn(tool: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |e| match e.kind() {
            std::io::ErrorKind::NotFound => Self::MissingTool(tool),
            _ => Self::Tool {
                tool,
                message: e.to_string(),
            },
        }
    }
}

/// Path of system tool `name`: on PATH, else in /usr/sbin or /sbin (Debian installs
/// e2fsprogs there, and an ordinary user's PATH lacks them); the bare name when not found, so
/// running it reports it missing.
pub fn system_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

async fn run(tool: &'static str, command: &mut Command) -> Result<(), DiskError> {
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(DiskError::spawn(tool))?;
    if output.status.success() {
        return Ok(());
    }
    Err(DiskError::Tool {
        tool,
        message: crate::cause::of_failure(tool, &output.status, &output.stderr),
    })
}

/// Creates `overlay` as a qcow2 file backed by the raw image `base` (absolute path), of
/// virtual size `size_bytes` or the image's size when that is larger: the guest grows its root
/// filesystem into the rest at boot, and only what it writes takes space on the host.
pub async fn create_system_overlay(
    base: &Path,
    overlay: &Path,
    size_bytes: u64,
) -> Result<(), DiskError> {
    let base_len = std::fs::metadata(base)
        .map_err(|source| DiskError::Io {
            context: format!("cannot stat {}", base.display()),
            source,
        })?
        .len();
    run(
        "qemu-img",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(overlay)
            .arg(size_bytes.max(base_len).to_string()),
    )
    .await
}

/// Grows the qcow2 image `path` to a virtual size of `size_bytes` (`qemu-img resize`, which
/// refuses to shrink without `--shrink`, never given here). The VM must be stopped.
pub async fn grow_qcow2(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    run(
        "qemu-img",
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size_bytes.to_string()),
    )
    .await
}

/// Extends the raw system disk `path` (a clone or copy of the image) to `size_bytes` with a
/// hole, when it is smaller: the guest grows its root filesystem into it at boot.
pub fn grow_raw_system_disk(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let io = |source| DiskError::Io {
        context: format!("cannot extend {}", path.display()),
        source,
    };
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .map_err(io)?;
    if file.metadata().map_err(io)?.len() < size_bytes {
        file.set_len(size_bytes).map_err(io)?;
    }
    Ok(())
}

/// Creates the work disk `path` of `size_bytes` from `seed_dir`. Every seeded file is owned
/// by the guest's root: `mkfs.ext4 -d` copies the host owners (the daemon's uid), which guest
/// git refuses in /root/repo ("dubious ownership") and sshd's StrictModes would refuse in
/// /root/.ssh.
pub async fn create_work_disk(
    path: &Path,
    size_bytes: u64,
    seed_dir: &Path,
) -> Result<(), DiskError> {
    let inodes = (size_bytes / WORK_BYTES_PER_INODE).clamp(16_384, 1 << 26);
    // A new sparse file reads as zeros, so the inode tables and journal need no zeroing: with
    // lazy init the guest kernel wrote them at first mount instead (256 MiB for 8 GiB, during
    // the first boot). `create_new` never formats over an existing disk.
    std::fs::File::create_new(path)
        .and_then(|file| file.set_len(size_bytes))
        .map_err(|e| DiskError::Tool {
            tool: "mkfs.ext4",
            message: format!("cannot create {}: {e}", path.display()),
        })?;
    let extended = work_disk_extended_options(mkfs_knows_prezeroed(Path::new("mkfs.ext4")).await);
    run(
        "mkfs.ext4",
        Command::new(system_tool("mkfs.ext4"))
            .args(["-q", "-F", "-L", WORK_LABEL, "-t", "ext4"])
            .args(["-E", extended])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(seed_dir)
            .arg(path)
            .arg(format!("{}k", size_bytes / 1024)),
    )
    .await?;
    give_seed_to_guest_root(path, seed_dir).await
}

/// `debugfs` commands setting owner 0:0 on every entry under `seed_dir` that the host owns
/// otherwise (the paths as they are in the image, relative to its root); empty when all are
/// root's already.
fn guest_root_commands(seed_dir: &Path) -> Result<String, DiskError> {
    use std::os::unix::fs::MetadataExt;
    let mut commands = String::new();
    let mut stack = vec![seed_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| DiskError::Io {
            context: format!("cannot read {}", dir.display()),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DiskError::Io {
                context: format!("cannot read {}", dir.display()),
                source,
            })?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|source| DiskError::Io {
                context: format!("cannot stat {}", path.display()),
                source,
            })?;
            if meta.is_dir() {
                stack.push(path.clone());
            }
            if meta.uid() == 0 && meta.gid() == 0 {
                continue;
            }
            let relative = path.strip_prefix(seed_dir).unwrap_or(&path);
            let shown = relative
                .to_str()
                .filter(|p| !p.contains(['"', '\\', '\n']) && !p.chars().any(char::is_control));
            let Some(shown) = shown else {
                // banger makes the seed; its names are plain. Never hand debugfs a name it
                // would parse differently.
                return Err(DiskError::Tool {
                    tool: "debugfs",
                    message: format!("unexpected seed file name {relative:?}"),
                });
            };
            for field in ["uid", "gid"] {
                commands.push_str(&format!("set_inode_field \"/{shown}\" {field} 0\n"));
            }
        }
    }
    Ok(commands)
}

/// Sets owner 0:0 in `image` on every file seeded from `seed_dir` (`debugfs -w`, no mount).
async fn give_seed_to_guest_root(image: &Path, seed_dir: &Path) -> Result<(), DiskError> {
    let commands = guest_root_commands(seed_dir)?;
    if commands.is_empty() {
        return Ok(());
    }
    let script = tempfile::NamedTempFile::new().map_err(|source| DiskError::Io {
        context: "cannot create a debugfs script".into(),
        source,
    })?;
    std::fs::write(script.path(), commands).map_err(|source| DiskError::Io {
        context: format!("cannot write {}", script.path().display()),
        source,
    })?;
    // debugfs exits 0 even when a command fails; it reports failures on stderr, so any
    // output there is a failure.
    let output = Command::new(system_tool("debugfs"))
        .arg("-w")
        .arg("-f")
        .arg(script.path())
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(DiskError::spawn("debugfs"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failure = stderr
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with("debugfs "));
    if !output.status.success() || failure.is_some() {
        return Err(DiskError::Tool {
            tool: "debugfs",
            message: failure.unwrap_or("failed").to_owned(),
        });
    }
    Ok(())
}

/// The `-E` options for a new work disk. e2fsprogs 1.47 has `assume_storage_prezeroed`: the
/// sparse file reads as zeros, so inode tables and journal are neither written now nor by
/// the guest later. Older mkfs.ext4 (Ubuntu 22.04's 1.46.5) refuses it; there lazy init
/// leaves the inode tables to the guest kernel (and the journal, safe on a file of zeros).
pub fn work_disk_extended_options(prezeroed: bool) -> &'static str {
    if prezeroed {
        "assume_storage_prezeroed=1,root_owner=0:0"
    } else {
        "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0"
    }
}

/// Whether the list of extended options a mkfs.ext4 prints (for an unknown `-E` option)
/// names `assume_storage_prezeroed`.
pub fn lists_prezeroed(help: &str) -> bool {
    help.contains("assume_storage_prezeroed")
}

/// The extended options `mkfs` (a path, or a name on PATH) knows, as it lists them when
/// given an unknown one (`-E help`, dry run `-n` on a scratch file). `None` when it does not
/// run.
pub async fn mkfs_extended_options_help(mkfs: &Path) -> Option<String> {
    let dir = tempfile::tempdir().ok()?;
    let scratch = dir.path().join("probe.img");
    std::fs::File::create(&scratch)
        .and_then(|f| f.set_len(1 << 20))
        .ok()?;
    let output = Command::new(mkfs)
        .args(["-q", "-n", "-E", "help"])
        .arg(&scratch)
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Some(text)
}

/// Whether `mkfs` knows `assume_storage_prezeroed`; asked once per process for mkfs.ext4 on
/// PATH, each time for another path.
pub async fn mkfs_knows_prezeroed(mkfs: &Path) -> bool {
    static ON_PATH: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    let ask = async || {
        mkfs_extended_options_help(mkfs)
            .await
            .is_some_and(|help| lists_prezeroed(&help))
    };
    if mkfs == Path::new("mkfs.ext4") {
        *ON_PATH.get_or_init(ask).await
    } else {
        ask().await
    }
}

pub use crate::domain::SystemDiskStrategy;

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
/// else a device-mapper snapshot where `dm_available` (device-mapper and banger-helper),
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
                format!("{no_reflink}; device-mapper snapshots through banger-helper"),
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

/// A device-mapper snapshot system disk and the loop devices under it (saved beside the VM's
/// disks so `vm rm` can tear down what this boot attached).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmDisk {
    pub name: String,
    /// `/dev/mapper/NAME`, what the VMM opens.
    pub device: PathBuf,
    pub base_loop: String,
    pub cow_loop: String,
    /// The files attached to the loops, so a teardown after a host reboot (when the recorded
    /// loop names may serve other disks) leaves loops backing other files alone. Absent in
    /// records written before they were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_file: Option<PathBuf>,
}

/// Builds a persistent dm snapshot `name` of the image `base` with copy-on-write store
/// `cow` (a sparse file of `cow_bytes`, created here), through banger-helper: base attached
/// read-only, cow attached, `snapshot` target with persistent exceptions and 4 KiB chunks.
/// Undone on failure.
pub fn dm_snapshot_create(
    host: &dyn HostOps,
    op_id: &str,
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
    dm_snapshot_attach(host, op_id, name, base, cow)
}

/// Sets up the mapping `name` over an existing copy-on-write store (after a host reboot the
/// loop devices and the mapping are gone; the persistent exceptions in `cow` are not).
/// What was attached is detached again when a later step fails.
pub fn dm_snapshot_attach(
    host: &dyn HostOps,
    op_id: &str,
    name: &str,
    base: &Path,
    cow: &Path,
) -> Result<DmDisk, DiskError> {
    let base_loop = host.loop_attach(op_id, base, true)?;
    let cow_loop = match host.loop_attach(op_id, cow, false) {
        Ok(device) => device,
        Err(e) => {
            detach(host, op_id, &base_loop, base);
            return Err(e.into());
        }
    };
    let device = match host.dm_snapshot_create(op_id, name, &base_loop, &cow_loop) {
        Ok(device) => device,
        Err(e) => {
            detach(host, op_id, &cow_loop, cow);
            detach(host, op_id, &base_loop, base);
            return Err(e.into());
        }
    };
    Ok(DmDisk {
        name: name.to_owned(),
        device: PathBuf::from(device),
        base_loop,
        cow_loop,
        base_file: Some(base.to_path_buf()),
        cow_file: Some(cow.to_path_buf()),
    })
}

fn loop_detach(device: &str, file: Option<&Path>) -> HelperOp {
    HelperOp::LoopDetach {
        device: device.to_owned(),
        file: file.map(|f| f.display().to_string()),
    }
}

/// Best-effort detach while undoing a failed setup (the setup's error is the one reported).
fn detach(host: &dyn HostOps, op_id: &str, device: &str, file: &Path) {
    if let Err(e) = host.run(op_id, loop_detach(device, Some(file))) {
        tracing::warn!(device, "cannot detach while undoing a dm setup: {e}");
    }
}

/// Tears a dm snapshot down: the mapping first, then its loop devices (every step tried; the
/// first error is reported).
pub fn dm_snapshot_remove(host: &dyn HostOps, op_id: &str, disk: &DmDisk) -> Result<(), DiskError> {
    let results = [
        HelperOp::DmRemove {
            name: disk.name.clone(),
        },
        loop_detach(&disk.cow_loop, disk.cow_file.as_deref()),
        loop_detach(&disk.base_loop, disk.base_file.as_deref()),
    ]
    .map(|op| host.run(op_id, op));
    match results.into_iter().find_map(Result::err) {
        Some(e) => Err(DiskError::Host(e)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::RecordingHost;

    #[test]
    fn the_layouts_dm_name_is_one_the_helper_makes_for_its_owner() {
        let layout = crate::layout::Layout::from_lookup(|k| {
            (k == "BANGER_HOME").then(|| std::path::PathBuf::from("/b"))
        })
        .unwrap();
        let id = "0123456789abcdef0123456789abcdef";
        let name = layout.vm_dm_name(1000, id);
        assert_eq!(name, banger_proto::helper::dm_name(1000, id));
        assert_eq!(banger_proto::helper::parse_dm_name(&name), Some((1000, id)));
    }

    /// `debugfs -R "stat PATH"`'s owner line, e.g. "User:     0   Group:     0".
    fn owner_in_image(image: &Path, path: &str) -> (u32, u32) {
        let out = std::process::Command::new(system_tool("debugfs"))
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text
            .lines()
            .find(|l| l.trim_start().starts_with("User:"))
            .unwrap_or_else(|| panic!("no owner for {path}: {text}"))
            .split_whitespace()
            .collect();
        (words[1].parse().unwrap(), words[3].parse().unwrap())
    }

    #[tokio::test]
    async fn seeded_files_belong_to_the_guest_root_whatever_the_host_uid() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        for sub in ["repo/sub", ".ssh", ".banger"] {
            std::fs::create_dir_all(seed.join(sub)).unwrap();
        }
        std::fs::write(seed.join(".ssh/authorized_keys"), "key\n").unwrap();
        std::fs::write(seed.join("repo/sub/file"), "x").unwrap();
        if nix::unistd::geteuid().is_root() {
            // As root the files are root's already: hand them to another uid, as a non-root
            // daemon's would be (one above 65535, so the high 16 bits count too).
            for entry in [
                "",
                "repo",
                "repo/sub",
                "repo/sub/file",
                ".ssh",
                ".ssh/authorized_keys",
                ".banger",
            ] {
                std::os::unix::fs::lchown(seed.join(entry), Some(70_001), Some(70_002)).unwrap();
            }
        }
        let host_uid = std::fs::metadata(seed.join("repo")).unwrap().uid();
        assert_ne!(
            host_uid, 0,
            "the seed must not be root's for this test to mean anything"
        );
        let image = dir.path().join("work.ext4");
        create_work_disk(&image, 64 << 20, &seed).await.unwrap();
        for path in [
            "/",
            "/repo",
            "/repo/sub",
            "/repo/sub/file",
            "/.ssh",
            "/.ssh/authorized_keys",
            "/.banger",
        ] {
            assert_eq!(owner_in_image(&image, path), (0, 0), "{path}");
        }
    }

    fn image(dir: &Path) -> PathBuf {
        let base = dir.join("rootfs.ext4");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        base
    }

    fn attach(file: &Path, read_only: bool) -> HelperOp {
        HelperOp::LoopAttach {
            file: file.display().to_string(),
            read_only,
        }
    }

    fn detach(device: &str, file: &Path) -> HelperOp {
        HelperOp::LoopDetach {
            device: device.into(),
            file: Some(file.display().to_string()),
        }
    }

    #[test]
    fn dm_snapshot_runs_exactly_these_helper_operations() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path());
        let cow = dir.path().join("system.cow");
        let host = RecordingHost::new();
        let disk = dm_snapshot_create(&host, "op", "banger-abc", &base, &cow, 1 << 30).unwrap();
        assert_eq!(disk.device, Path::new("/dev/mapper/banger-abc"));
        assert_eq!(
            std::fs::metadata(&cow).unwrap().len(),
            1 << 30,
            "sparse cow store"
        );
        dm_snapshot_remove(&host, "op", &disk).unwrap();
        assert_eq!(
            host.calls(),
            vec![
                attach(&base, true),
                attach(&cow, false),
                HelperOp::DmSnapshotCreate {
                    name: "banger-abc".into(),
                    origin_loop: "/dev/loop0".into(),
                    cow_loop: "/dev/loop1".into(),
                },
                HelperOp::DmRemove {
                    name: "banger-abc".into()
                },
                detach("/dev/loop1", &cow),
                detach("/dev/loop0", &base),
            ]
        );
    }

    #[test]
    fn a_failed_dm_create_detaches_both_loops() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path());
        let cow = dir.path().join("system.cow");
        let host = RecordingHost::failing_on(|op| matches!(op, HelperOp::DmSnapshotCreate { .. }));
        let err = dm_snapshot_create(&host, "op", "banger-x", &base, &cow, 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("dm_snapshot_create") && err.to_string().contains("refused"),
            "{err}"
        );
        assert_eq!(
            host.calls(),
            [
                attach(&base, true),
                attach(&cow, false),
                HelperOp::DmSnapshotCreate {
                    name: "banger-x".into(),
                    origin_loop: "/dev/loop0".into(),
                    cow_loop: "/dev/loop1".into(),
                },
                detach("/dev/loop1", &cow),
                detach("/dev/loop0", &base),
            ]
        );
    }

    #[test]
    fn a_failed_cow_attach_detaches_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path());
        let cow = dir.path().join("system.cow");
        let host = RecordingHost::failing_on(
            |op| matches!(op, HelperOp::LoopAttach { read_only, .. } if !read_only),
        );
        let err = dm_snapshot_create(&host, "op", "banger-x", &base, &cow, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("loop_attach"), "{err}");
        assert_eq!(
            host.calls(),
            [
                attach(&base, true),
                attach(&cow, false),
                detach("/dev/loop0", &base)
            ]
        );
    }

    #[test]
    fn a_failed_base_attach_stops_there() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path());
        let cow = dir.path().join("system.cow");
        let host = RecordingHost::failing_on(|op| matches!(op, HelperOp::LoopAttach { .. }));
        dm_snapshot_create(&host, "op", "banger-x", &base, &cow, 1 << 20).unwrap_err();
        assert_eq!(host.calls(), [attach(&base, true)]);
    }

    #[test]
    fn teardown_tries_every_step_and_reports_the_first_failure() {
        let host = RecordingHost::failing_on(|op| matches!(op, HelperOp::DmRemove { .. }));
        let disk = DmDisk {
            name: "banger-y".into(),
            device: "/dev/mapper/banger-y".into(),
            base_loop: "/dev/loop3".into(),
            cow_loop: "/dev/loop4".into(),
            base_file: None,
            cow_file: Some("/state/vms/y/system.cow".into()),
        };
        let err = dm_snapshot_remove(&host, "op", &disk).unwrap_err();
        assert!(err.to_string().contains("dm_remove"), "{err}");
        assert_eq!(
            host.calls(),
            [
                HelperOp::DmRemove {
                    name: "banger-y".into()
                },
                // A record without the base's file (written before files were kept).
                detach("/dev/loop4", Path::new("/state/vms/y/system.cow")),
                HelperOp::LoopDetach {
                    device: "/dev/loop3".into(),
                    file: None,
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

    /// An e2fsprogs 1.46 stand-in: lists its extended options without
    /// assume_storage_prezeroed and refuses that option, as Ubuntu 22.04's mkfs.ext4 does.
    fn old_mkfs(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("mkfs.ext4");
        std::fs::write(
            &path,
            "#!/bin/sh\ncase \"$*\" in *assume_storage_prezeroed*|*help*)\n\
             printf '\\nBad option(s) specified: x\\n\\nValid extended options are:\\n\\tlazy_itable_init=<0 to disable, 1 to enable>\\n\\troot_owner=<uid>:<gid>\\n' >&2; exit 1;;\nesac\n\
             exec mkfs.ext4 \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn work_disk_options_follow_what_mkfs_knows() {
        let dir = tempfile::tempdir().unwrap();
        if !crate::image::on_path("mkfs.ext4") {
            banger_shared::skip::report(
                "work_disk_options_follow_what_mkfs_knows",
                "mkfs.ext4 is not installed",
            );
            return;
        }
        let real = mkfs_extended_options_help(Path::new("mkfs.ext4"))
            .await
            .unwrap();
        assert!(real.contains("root_owner"), "{real}");
        let old = old_mkfs(dir.path());
        assert!(!mkfs_knows_prezeroed(&old).await);
        let options = work_disk_extended_options(false);
        assert!(!options.contains("prezeroed"));
        // The fallback options make a file system the old stand-in (and the real one) accepts.
        let disk = dir.path().join("work.ext4");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let status = std::process::Command::new(&old)
            .args(["-q", "-F", "-t", "ext4", "-E", options])
            .arg(&disk)
            .status()
            .unwrap();
        assert!(status.success());
        let fsck = std::process::Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
