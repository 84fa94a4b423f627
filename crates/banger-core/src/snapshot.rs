//! A memory snapshot as the daemon trusts it: the files the VMM wrote, made durable (fsync),
//! their sizes and sha256 in a manifest written last and atomically (temp file, fsync,
//! rename, fsync of the directory), with the identity of the VM's disks at that moment
//! (device, inode, size, mtime). A snapshot is loaded only when the manifest is there, every
//! file still has its size and checksum, and every disk its identity: a torn or damaged file
//! would load as garbage, and memory paired with disks that moved on corrupts them. Blocking
//! (hashing, fsync): callers run it on the blocking pool.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest format this banger writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// Why a snapshot cannot be sealed or trusted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No manifest: the suspend never completed (or an older banger wrote the snapshot).
    #[error("the snapshot is incomplete (no {0})")]
    Incomplete(String),
    /// The manifest cannot be read.
    #[error("the snapshot's manifest {path} is unreadable: {message}")]
    Manifest { path: String, message: String },
    /// A snapshot file is missing, or its size or checksum differs from the manifest's.
    #[error("snapshot file {file} is damaged: {why}")]
    Damaged { file: String, why: String },
    /// A disk is not the one the snapshot was taken with (written, replaced or resized since).
    #[error("disk {disk} changed since the snapshot was taken ({why})")]
    DiskChanged { disk: String, why: String },
    /// The VM's CPUs or memory are not those the snapshot was taken with.
    #[error("the snapshot was taken with {then}, the VM has {now}")]
    MachineChanged { then: Machine, now: Machine },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { context, source }
}

/// What a sealed snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    /// The VMM that wrote it (`qemu`, `firecracker`).
    pub vmm: String,
    pub files: Vec<FileSum>,
    pub disks: Vec<DiskIdentity>,
    /// The machine the memory belongs to (absent in manifests of older bangers): a VMM
    /// loads it only into the same CPUs and memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
}

/// The shape of the machine a snapshot's memory and devices were taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl Machine {
    /// The machine `spec` describes.
    pub fn of(spec: &crate::model::VmSpec) -> Self {
        Self {
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = if self.cpus == 1 { "" } else { "s" };
        write!(f, "{} CPU{plural} and {} MiB", self.cpus, self.memory_mib)
    }
}

impl Manifest {
    /// The bytes the snapshot's files take.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// One file of a snapshot, by its name in the snapshot's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Which disk file a snapshot pairs with, as the file system tells it apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskIdentity {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

impl DiskIdentity {
    /// The identity of the disk at `path` now.
    pub fn of(path: &Path) -> Result<Self, SnapshotError> {
        let meta =
            std::fs::metadata(path).map_err(io_err(format!("cannot stat {}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        })
    }

    /// How `now` differs from this identity, if it does.
    fn difference(&self, now: &Self) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("it is another file now".into())
        } else if self.size != now.size {
            Some(format!("size {} then, {} now", self.size, now.size))
        } else if (self.mtime_sec, self.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) {
            Some("it was written since".into())
        } else {
            None
        }
    }
}

fn sync_file(path: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot flush {}", path.display())))
}

fn checksum(path: &Path) -> Result<String, SnapshotError> {
    crate::image::sha256_files(&[path]).map_err(|e| SnapshotError::Io {
        context: format!("cannot hash {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Seals a snapshot: flushes the `files` the VMM wrote (those of them that exist; at least one
/// must) and the `disks`, hashes the files, records the disks' identity, and writes the
/// manifest at `manifest` atomically, with the `machine` they were taken from. The files
/// must sit in the manifest's directory.
pub fn seal(
    vmm: &str,
    machine: Machine,
    files: &[PathBuf],
    disks: &[PathBuf],
    manifest: &Path,
) -> Result<Manifest, SnapshotError> {
    let mut sums = Vec::new();
    for file in files.iter().filter(|f| f.is_file()) {
        sync_file(file)?;
        let size = std::fs::metadata(file)
            .map_err(io_err(format!("cannot stat {}", file.display())))?
            .len();
        sums.push(FileSum {
            name: file_name(file),
            size,
            sha256: checksum(file)?,
        });
    }
    if sums.is_empty() {
        return Err(SnapshotError::Damaged {
            file: files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            why: "the VMM wrote no file".into(),
        });
    }
    let sealed = Manifest {
        version: MANIFEST_VERSION,
        vmm: vmm.to_owned(),
        files: sums,
        disks: disk_identities(disks)?,
        machine: Some(machine),
    };
    write(&sealed, manifest)?;
    Ok(sealed)
}

/// Seals, for the disks `disks`, files sealed before under `sealed` (a named memory
/// snapshot's state, linked into the VM's directory by a restore, under the same names):
/// the files are not hashed again (a load verifies them), the disks are flushed and their
/// identity recorded.
pub fn reseal(
    sealed: &Manifest,
    disks: &[PathBuf],
    manifest: &Path,
) -> Result<Manifest, SnapshotError> {
    let resealed = Manifest {
        disks: disk_identities(disks)?,
        ..sealed.clone()
    };
    write(&resealed, manifest)?;
    Ok(resealed)
}

fn disk_identities(disks: &[PathBuf]) -> Result<Vec<DiskIdentity>, SnapshotError> {
    let mut identities = Vec::new();
    for disk in disks {
        sync_file(disk)?;
        identities.push(DiskIdentity::of(disk)?);
    }
    Ok(identities)
}

/// Writes `sealed` at `manifest` atomically ([`crate::durable::replace`]; a `.partial` a
/// crash leaves is removed at daemon start).
fn write(sealed: &Manifest, manifest: &Path) -> Result<(), SnapshotError> {
    let text = serde_json::to_vec_pretty(sealed).map_err(|e| SnapshotError::Manifest {
        path: manifest.display().to_string(),
        message: e.to_string(),
    })?;
    crate::durable::replace(manifest, &text)
        .map_err(io_err(format!("cannot write {}", manifest.display())))
}

/// Reads the manifest at `manifest`, if any (no check of the files).
pub fn read(manifest: &Path) -> Result<Manifest, SnapshotError> {
    let text = match std::fs::read(manifest) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Incomplete(file_name(manifest)));
        }
        Err(e) => return Err(io_err(format!("cannot read {}", manifest.display()))(e)),
    };
    let parsed: Manifest = serde_json::from_slice(&text).map_err(|e| SnapshotError::Manifest {
        path: manifest.display().to_string(),
        message: e.to_string(),
    })?;
    if parsed.version != MANIFEST_VERSION {
        return Err(SnapshotError::Manifest {
            path: manifest.display().to_string(),
            message: format!(
                "format {} (this banger reads {MANIFEST_VERSION})",
                parsed.version
            ),
        });
    }
    Ok(parsed)
}

/// Checks a sealed snapshot before it is loaded into `machine`: the manifest is there, it was
/// taken from the same machine (when it says), every file has its size and checksum, and
/// `disks` are, in order, the very disks it was sealed with.
pub fn verify(
    manifest: &Path,
    disks: &[PathBuf],
    machine: Machine,
) -> Result<Manifest, SnapshotError> {
    let sealed = read(manifest)?;
    if let Some(then) = sealed.machine
        && then != machine
    {
        return Err(SnapshotError::MachineChanged { then, now: machine });
    }
    let dir = manifest.parent().unwrap_or(Path::new("."));
    for sum in &sealed.files {
        if sum.name.contains('/') || sum.name.is_empty() {
            return Err(SnapshotError::Manifest {
                path: manifest.display().to_string(),
                message: format!("file name {:?}", sum.name),
            });
        }
        let path = dir.join(&sum.name);
        let damaged = |why: String| SnapshotError::Damaged {
            file: path.display().to_string(),
            why,
        };
        let size = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) => return Err(damaged(e.to_string())),
        };
        if size != sum.size {
            return Err(damaged(format!("{size} bytes, sealed with {}", sum.size)));
        }
        if checksum(&path)? != sum.sha256 {
            return Err(damaged("its checksum differs".into()));
        }
    }
    if sealed.disks.len() != disks.len()
        || sealed.disks.iter().zip(disks).any(|(d, p)| &d.path != p)
    {
        return Err(SnapshotError::DiskChanged {
            disk: disks
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            why: "the VM's disks are other files than the snapshot's".into(),
        });
    }
    for then in &sealed.disks {
        let now = DiskIdentity::of(&then.path).map_err(|e| SnapshotError::DiskChanged {
            disk: then.path.display().to_string(),
            why: e.to_string(),
        })?;
        if let Some(why) = then.difference(&now) {
            return Err(SnapshotError::DiskChanged {
                disk: then.path.display().to_string(),
                why,
            });
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    const MACHINE: Machine = Machine {
        cpus: 2,
        memory_mib: 1024,
    };

    struct Fixture {
        _dir: tempfile::TempDir,
        state: PathBuf,
        memory: PathBuf,
        disk: PathBuf,
        manifest: PathBuf,
    }

    impl Fixture {
        /// Seals the state file with the disk.
        fn seal(&self) -> Manifest {
            seal(
                "qemu",
                MACHINE,
                std::slice::from_ref(&self.state),
                std::slice::from_ref(&self.disk),
                &self.manifest,
            )
            .unwrap()
        }

        fn verify(&self) -> Result<Manifest, SnapshotError> {
            verify(&self.manifest, std::slice::from_ref(&self.disk), MACHINE)
        }
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture {
            state: dir.path().join("snapshot.state"),
            memory: dir.path().join("snapshot.mem"),
            disk: dir.path().join("work.ext4"),
            manifest: dir.path().join("snapshot.json"),
            _dir: dir,
        };
        std::fs::write(&f.state, vec![7u8; 100_000]).unwrap();
        std::fs::write(&f.disk, b"disk").unwrap();
        f
    }

    #[test]
    fn a_sealed_snapshot_verifies_and_lists_only_the_files_written() {
        let f = fixture();
        let sealed = seal(
            "qemu",
            MACHINE,
            &[f.state.clone(), f.memory.clone()],
            std::slice::from_ref(&f.disk),
            &f.manifest,
        )
        .unwrap();
        assert_eq!(sealed.files.len(), 1, "no memory file: {sealed:?}");
        assert_eq!(sealed.size(), 100_000);
        assert_eq!(f.verify().unwrap(), sealed);
    }

    #[test]
    fn a_damaged_file_or_a_written_disk_is_refused() {
        let f = fixture();
        f.seal();
        // Same size, one byte flipped.
        let mut bytes = std::fs::read(&f.state).unwrap();
        bytes[500] ^= 0xff;
        std::fs::write(&f.state, &bytes).unwrap();
        let err = f.verify().unwrap_err();
        assert!(matches!(err, SnapshotError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");

        f.seal();
        std::fs::File::options()
            .append(true)
            .open(&f.disk)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        let err = f.verify().unwrap_err();
        assert!(matches!(err, SnapshotError::DiskChanged { .. }), "{err}");

        // A disk replaced by another file of the same size and times.
        f.seal();
        let other = f.disk.with_extension("new");
        std::fs::write(&other, std::fs::read(&f.disk).unwrap()).unwrap();
        std::fs::rename(&other, &f.disk).unwrap();
        let err = f.verify().unwrap_err();
        assert!(err.to_string().contains("another file"), "{err}");
    }

    #[test]
    fn a_resealed_copy_pairs_the_same_files_with_other_disks() {
        // A named memory snapshot: sealed with no disk, its state linked into a VM's
        // directory beside new disks, resealed for them there.
        let named = fixture();
        let sealed = seal(
            "qemu",
            MACHINE,
            std::slice::from_ref(&named.state),
            &[],
            &named.manifest,
        )
        .unwrap();
        let vm = tempfile::tempdir().unwrap();
        let (state, disk, manifest) = (
            vm.path().join("snapshot.state"),
            vm.path().join("system.qcow2"),
            vm.path().join("snapshot.json"),
        );
        std::fs::hard_link(&named.state, &state).unwrap();
        std::fs::write(&disk, b"new top").unwrap();
        let resealed = reseal(&sealed, std::slice::from_ref(&disk), &manifest).unwrap();
        assert_eq!(resealed.files, sealed.files);
        assert_eq!(
            verify(&manifest, std::slice::from_ref(&disk), MACHINE).unwrap(),
            resealed
        );
        // Still a check of the disks and the files.
        std::fs::write(&disk, b"written since").unwrap();
        let err = verify(&manifest, std::slice::from_ref(&disk), MACHINE).unwrap_err();
        assert!(matches!(err, SnapshotError::DiskChanged { .. }), "{err}");
        reseal(&sealed, std::slice::from_ref(&disk), &manifest).unwrap();
        std::fs::remove_file(&state).unwrap();
        std::fs::write(&state, b"torn").unwrap();
        let err = verify(&manifest, std::slice::from_ref(&disk), MACHINE).unwrap_err();
        assert!(matches!(err, SnapshotError::Damaged { .. }), "{err}");
    }

    #[test]
    fn memory_of_another_machine_is_refused_and_an_older_manifest_still_loads() {
        let f = fixture();
        let sealed = f.seal();
        assert_eq!(sealed.machine, Some(MACHINE));
        let bigger = Machine {
            memory_mib: 2048,
            ..MACHINE
        };
        let err = verify(&f.manifest, std::slice::from_ref(&f.disk), bigger).unwrap_err();
        assert!(matches!(err, SnapshotError::MachineChanged { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the snapshot was taken with 2 CPUs and 1024 MiB, the VM has 2 CPUs and 2048 MiB"
        );
        // Written before manifests named their machine: loaded into whatever the VM has.
        let mut text: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&f.manifest).unwrap()).unwrap();
        text.as_object_mut().unwrap().remove("machine");
        std::fs::write(&f.manifest, serde_json::to_vec(&text).unwrap()).unwrap();
        assert_eq!(
            verify(&f.manifest, std::slice::from_ref(&f.disk), bigger)
                .unwrap()
                .machine,
            None
        );
    }

    #[test]
    fn no_manifest_means_incomplete() {
        let f = fixture();
        let err = f.verify().unwrap_err();
        assert!(matches!(err, SnapshotError::Incomplete(_)), "{err}");
        std::fs::write(&f.manifest, b"{").unwrap();
        let err = f.verify().unwrap_err();
        assert!(matches!(err, SnapshotError::Manifest { .. }), "{err}");
    }

    #[test]
    fn nothing_written_cannot_be_sealed() {
        let f = fixture();
        let err = seal(
            "qemu",
            MACHINE,
            std::slice::from_ref(&f.memory),
            &[],
            &f.manifest,
        )
        .unwrap_err();
        assert!(matches!(err, SnapshotError::Damaged { .. }), "{err}");
        assert!(!f.manifest.exists());
    }
}
