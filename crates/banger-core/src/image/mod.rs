//! The kernel and image store: content-addressed files under the data dir (`kernels/<digest>/`,
//! `images/<digest>/rootfs.ext4`), their import from local files, and the build of the default
//! Debian image from the embedded guest recipe (`guest/` in the repository).

pub mod container;
pub mod kernel;
pub mod mirror;
pub mod oci;
pub mod registry;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::process::Command;

mod recipe {
    include!(concat!(env!("OUT_DIR"), "/guest_files.rs"));
}
pub use recipe::GUEST_FILES;

/// Why an image or kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file to import does not exist or is not a regular file.
    #[error("{what} {path} is not a readable file")]
    MissingFile { what: &'static str, path: String },
    /// The kernel is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel (neither ELF vmlinux nor bzImage)")]
    NotAKernel(String),
    /// Import paths must be absolute: the daemon's working directory is not the user's.
    #[error("{0} is not an absolute path")]
    RelativePath(String),
    /// A build step (script) failed.
    #[error("{step} failed ({status}): {tail}")]
    BuildFailed {
        step: &'static str,
        status: String,
        tail: String,
    },
    /// A tool the build needs is missing.
    #[error("{0} is not installed")]
    MissingTool(&'static str),
    /// No Debian mirror known.
    #[error("no Debian mirror found in the host's apt configuration")]
    NoMirror,
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// A build log, opened to append to.
fn open_log(log: &Path) -> Result<std::fs::File, ImageError> {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("cannot open {}", log.display())))
}

/// Hex sha256 over the contents of `paths`, in order, each prefixed by its length.
pub fn sha256_files(paths: &[&Path]) -> Result<String, ImageError> {
    let mut hasher = Sha256::new();
    for path in paths {
        let mut file =
            std::fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io_err(format!("cannot stat {}", path.display())))?
            .len();
        hasher.update(len.to_le_bytes());
        std::io::copy(&mut file, &mut hasher)
            .map_err(io_err(format!("cannot read {}", path.display())))?;
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Directory of the `image build --from` scripts in the guest recipe.
pub const FROM_IMAGE_DIR: &str = "from-image/";

/// Digest of the embedded image recipe: any change to a script or overlay file changes it
/// (the microVM kernel's files under `microvm-kernel/` and the `--from` scripts under
/// `from-image/` excepted).
pub fn recipe_digest() -> String {
    recipe_digest_with(false)
}

/// Digest of what `image build --from` runs: the image recipe and the `from-image/` scripts.
pub fn from_recipe_digest() -> String {
    recipe_digest_with(true)
}

fn recipe_digest_with(from_image: bool) -> String {
    let mut hasher = Sha256::new();
    // The microVM kernel has its own recipe digest (`kernel::recipe_digest`).
    hash_guest_files(&mut hasher, |path| {
        !kernel::is_recipe_file(path) && (from_image || !path.starts_with(FROM_IMAGE_DIR))
    });
    // The overlay's directory modes become the image's (`/`, `/etc`, `/usr`): they are
    // part of what the recipe makes. Builds that wrote them under the daemon's umask
    // (0700) made images whose non-root services (systemd-networkd, dbus) cannot start;
    // this keeps their cache entries from being reused.
    hasher.update(b"dirs:");
    hasher.update(RECIPE_DIR_MODE.to_le_bytes());
    hex(&hasher.finalize())
}

/// Feeds every embedded guest file `wanted` selects (path, mode, length, content) into
/// `hasher`: the common part of the image's and the kernel's recipe digests.
fn hash_guest_files(hasher: &mut Sha256, wanted: impl Fn(&str) -> bool) {
    for (path, content, mode) in GUEST_FILES {
        if !wanted(path) {
            continue;
        }
        hasher.update(path.as_bytes());
        hasher.update([0]);
        hasher.update(mode.to_le_bytes());
        hasher.update((content.len() as u64).to_le_bytes());
        hasher.update(content);
    }
}

/// Mode of every directory [`write_recipe`] makes, whatever the daemon's umask.
const RECIPE_DIR_MODE: u32 = 0o755;

/// Writes the embedded recipe into `dir` (`dir/build-kernel.sh`, `dir/rootfs/...`). Its
/// directories get mode 0755 whatever the daemon's umask (077): the overlay is tarred into
/// the image as it is, `rootfs/` itself becoming the guest's `/`, so a 0700 directory there
/// would lock every non-root service (dbus, networkd) out of `/`, `/etc` and `/usr`.
pub fn write_recipe(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for (relative, content, mode) in GUEST_FILES {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("cannot create {}", parent.display())))?;
            for ancestor in parent.ancestors().take_while(|a| a.starts_with(dir)) {
                std::fs::set_permissions(
                    ancestor,
                    std::fs::Permissions::from_mode(RECIPE_DIR_MODE),
                )
                .map_err(io_err(format!("cannot chmod {}", ancestor.display())))?;
            }
        }
        // The daemon's umask (077) would make these 0700, and the overlay's directories
        // (`rootfs/` is the guest's `/`, then /etc, /usr, ...) enter the image with their
        // modes: a guest whose / is 0700 fails every service that drops root.
        let mut sub = dir.to_path_buf();
        for part in Path::new(relative)
            .parent()
            .into_iter()
            .flat_map(Path::components)
        {
            sub.push(part);
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err(format!("cannot chmod {}", sub.display())))?;
        }
        std::fs::write(&path, content)
            .map_err(io_err(format!("cannot write {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(io_err(format!("cannot chmod {}", path.display())))?;
    }
    Ok(())
}

/// Checks that `path` is an absolute path to a regular file.
pub fn check_input(what: &'static str, path: &str) -> Result<PathBuf, ImageError> {
    let path_buf = PathBuf::from(path);
    if !path_buf.is_absolute() {
        return Err(ImageError::RelativePath(path.to_owned()));
    }
    if !path_buf.is_file() {
        return Err(ImageError::MissingFile {
            what,
            path: path.to_owned(),
        });
    }
    Ok(path_buf)
}

/// Refuses files that are not an ELF vmlinux or an x86 bzImage.
pub fn validate_kernel(path: &Path) -> Result<(), ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let shown = path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(io_err(format!("cannot open {shown}")))?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(());
    }
    let mut header = [0u8; 4];
    let is_bzimage = file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut header).is_ok()
        && header == *b"HdrS";
    if is_bzimage {
        Ok(())
    } else {
        Err(ImageError::NotAKernel(shown))
    }
}

/// The kernel's build configuration, when it can be read: a `config` file beside the kernel
/// (what `build-kernel.sh` writes; distributions ship `config-<release>` in /boot), else the
/// IKCONFIG blob (`CONFIG_IKCONFIG`: gzip between `IKCFG_ST` and `IKCFG_ED`) inside an ELF
/// vmlinux. A bzImage's embedded config is compressed twice and is not read.
pub fn kernel_config(kernel: &Path) -> Option<String> {
    if let Some(dir) = kernel.parent() {
        let file_name = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let beside = [
            dir.join("config"),
            dir.join(file_name.replacen("vmlinuz", "config", 1)),
            dir.join(file_name.replacen("vmlinux", "config", 1)),
        ];
        for candidate in beside {
            if candidate != kernel
                && let Ok(text) = std::fs::read_to_string(&candidate)
                && text.contains("CONFIG_")
            {
                return Some(text);
            }
        }
    }
    let bytes = std::fs::read(kernel).ok()?;
    let start = find(&bytes, b"IKCFG_ST")? + b"IKCFG_ST".len();
    let end = start + find(&bytes[start..], b"IKCFG_ED")?;
    gunzip(&bytes[start..end])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decompresses with the system's `gzip` (always present on Debian; avoids a dependency for
/// a few hundred KiB read once per import).
fn gunzip(data: &[u8]) -> Option<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().ok()?;
    let _ = writer.join();
    let text = String::from_utf8(output.stdout).ok()?;
    text.contains("CONFIG_").then_some(text)
}

/// What a kernel's configuration says about running under Firecracker, which declares its
/// virtio-mmio devices on the kernel command line (no ACPI, no PCI): `None` when it is fine,
/// else a warning. An unreadable configuration is a warning too.
pub fn firecracker_kernel_warning(config: Option<&str>) -> Option<String> {
    let Some(config) = config else {
        return Some(
            "cannot read this kernel's configuration (no `config` file beside it, no IKCONFIG): \
             Firecracker needs CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y, which is not checked"
                .into(),
        );
    };
    let value = |key: &str| {
        config.lines().find_map(|line| {
            line.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::trim)
        })
    };
    match value("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") {
        Some("y") => {
            let mut missing: Vec<&str> = [
                "CONFIG_VIRTIO_BLK",
                "CONFIG_VIRTIO_NET",
                "CONFIG_SERIO_I8042",
            ]
            .into_iter()
            .filter(|key| value(key) != Some("y"))
            .collect();
            if value("CONFIG_KEYBOARD_ATKBD") != Some("y") {
                missing.push("CONFIG_KEYBOARD_ATKBD");
            }
            (!missing.is_empty()).then(|| {
                format!(
                    "for Firecracker this kernel lacks built-in {} (virtio drivers must not be modules without an initrd that loads them; i8042 + atkbd make SendCtrlAltDel work)",
                    missing.join(", ")
                )
            })
        }
        _ => Some(
            "this kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y: it cannot find Firecracker's \
             virtio-mmio devices (it works with QEMU microvm, which declares them through ACPI); \
             use a kernel built from Firecracker's CI kernel configs"
                .into(),
        ),
    }
}

/// Copies `source` to `dest` through a temporary name, sparse and reflinked where the file
/// system allows, so a crash never leaves a half-written `dest`.
pub async fn copy_into_place(source: &Path, dest: &Path) -> Result<(), ImageError> {
    cp_then_rename(&["--reflink=auto", "--sparse=always"], source, dest).await
}

/// Copies a directory tree (`cp -a`) to `dest` through a temporary name.
pub async fn copy_tree(source: &Path, dest: &Path) -> Result<(), ImageError> {
    cp_then_rename(&["-a"], source, dest).await
}

/// `cp FLAGS source dest.partial`, then renames into place; removes the partial copy on failure.
async fn cp_then_rename(flags: &[&str], source: &Path, dest: &Path) -> Result<(), ImageError> {
    let tmp = dest.with_extension("partial");
    let remove_tmp = || {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
    };
    remove_tmp();
    let output = Command::new("cp")
        .args(flags)
        .arg(source)
        .arg(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(io_err("cannot run cp"))?;
    if !output.status.success() {
        remove_tmp();
        // cp's own words ("No space left on device", "Permission denied") are the cause.
        let cause = crate::cause::of_failure("cp", &output.status, &output.stderr);
        return Err(ImageError::Io {
            context: format!("cannot copy {}", source.display()),
            source: std::io::Error::other(cause),
        });
    }
    crate::fault::point("copy.before_rename")?;
    std::fs::rename(&tmp, dest).map_err(io_err(format!("cannot rename {}", tmp.display())))
}

/// Runs one build script, its output appended to `log`; on failure the error carries the last
/// lines of the log.
pub async fn run_script(
    step: &'static str,
    script: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
) -> Result<(), ImageError> {
    let log_file = open_log(log)?;
    let log_err = log_file
        .try_clone()
        .map_err(io_err(format!("cannot open {}", log.display())))?;
    let mut command = Command::new("bash");
    command
        .arg(script)
        .args(args)
        // mkfs.ext4 -d TARBALL refuses file names it cannot convert from UTF-8 under a
        // daemon started without a UTF-8 locale; C.UTF-8 is in every Debian.
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .kill_on_drop(true);
    // The daemon runs with umask 077 (its files are private); the image's files must get
    // the usual modes, so the build scripts run with 022.
    // SAFETY: umask is async-signal-safe and touches only the child's own mask.
    unsafe {
        command.pre_exec(|| {
            nix::libc::umask(0o022);
            Ok(())
        });
    }
    let status = command.status().await.map_err(io_err("cannot run bash"))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail = crate::cause::last_line(&text, "").unwrap_or_else(|| "no output".into());
    Err(ImageError::BuildFailed {
        step,
        status: status.to_string(),
        tail: format!("{tail} (full log: {})", log.display()),
    })
}

/// Whether `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    crate::which::which(Path::new(tool)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_copy_says_why_and_leaves_nothing() {
        #![allow(clippy::unwrap_used)]
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("rootfs.ext4");
        let err = copy_into_place(&dir.path().join("missing.ext4"), &dest)
            .await
            .unwrap_err();
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            cause.contains("No such file or directory"),
            "{err}: {cause}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn recipe_directories_are_world_traversable_whatever_the_umask() {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        // What the daemon's umask 077 makes (changing the umask here would race other tests).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.path().join("rootfs/etc"))
            .unwrap();
        write_recipe(dir.path()).unwrap();
        for sub in ["rootfs", "rootfs/etc", "rootfs/usr"] {
            let mode = std::fs::metadata(dir.path().join(sub))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755, "{sub}");
        }
    }

    #[test]
    fn recipe_holds_the_build_scripts() {
        let names: Vec<&str> = GUEST_FILES.iter().map(|(p, _, _)| *p).collect();
        assert!(names.contains(&"build-kernel.sh"), "{names:?}");
        assert!(names.contains(&"build-rootfs.sh"), "{names:?}");
        assert_eq!(recipe_digest(), recipe_digest());
    }

    #[test]
    fn the_recipe_directories_are_world_readable_whatever_the_umask() {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        // What a umask of 077 (the daemon's) makes of a new directory.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join("rootfs"))
            .unwrap();
        write_recipe(dir.path()).unwrap();
        let mut dirs = vec![dir.path().join("rootfs")];
        while let Some(d) = dirs.pop() {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "{}", d.display());
            for entry in std::fs::read_dir(&d).unwrap().flatten() {
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(entry.path());
                }
            }
        }
    }

    #[test]
    fn kernels_are_recognised_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        validate_kernel(&elf).unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz_path = dir.path().join("bzImage");
        std::fs::write(&bz_path, &bz).unwrap();
        validate_kernel(&bz_path).unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a kernel at all").unwrap();
        assert!(matches!(
            validate_kernel(&junk),
            Err(ImageError::NotAKernel(_))
        ));
    }

    #[test]
    fn firecracker_kernel_checks() {
        let good = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_NET=y\nCONFIG_SERIO_I8042=y\nCONFIG_KEYBOARD_ATKBD=y\n";
        assert_eq!(firecracker_kernel_warning(Some(good)), None);
        let debian_cloud =
            "CONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n";
        let w = firecracker_kernel_warning(Some(debian_cloud)).unwrap();
        assert!(w.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"), "{w}");
        let modules = good.replace("CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_BLK=m");
        let w = firecracker_kernel_warning(Some(&modules)).unwrap();
        assert!(w.contains("CONFIG_VIRTIO_BLK"), "{w}");
        assert!(
            firecracker_kernel_warning(None)
                .unwrap()
                .contains("cannot read")
        );
    }

    #[test]
    fn kernel_config_is_found_beside_or_inside() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        // IKCONFIG: gzip'd text between the markers inside the ELF.
        let gz = std::process::Command::new("sh")
            .arg("-c")
            .arg("printf 'CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\\n' | gzip -c")
            .output()
            .unwrap()
            .stdout;
        let mut elf = b"\x7fELF junk IKCFG_ST".to_vec();
        elf.extend(&gz);
        elf.extend(b"IKCFG_ED more");
        std::fs::write(&kernel, &elf).unwrap();
        let config = kernel_config(&kernel).unwrap();
        assert!(
            config.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"),
            "{config}"
        );
        // A config file beside it wins.
        std::fs::write(
            dir.path().join("config"),
            "# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n",
        )
        .unwrap();
        assert!(kernel_config(&kernel).unwrap().contains("is not set"));
        std::fs::write(dir.path().join("plain"), b"\x7fELF nothing").unwrap();
        std::fs::remove_file(dir.path().join("config")).unwrap();
        assert_eq!(kernel_config(&dir.path().join("plain")), None);
    }

    #[test]
    fn relative_and_missing_inputs_are_refused() {
        assert!(matches!(
            check_input("rootfs", "rel/x"),
            Err(ImageError::RelativePath(_))
        ));
        assert!(matches!(
            check_input("rootfs", "/nonexistent/x"),
            Err(ImageError::MissingFile { .. })
        ));
    }
}
