//! banger's microVM kernel and what any kernel can boot.
//!
//! The kernel recipe (`guest/microvm-kernel/`: `build.sh` and `microvm.config`, applied to
//! Debian's linux-source-6.1 tarball) has a digest of its own, apart from the image recipe, so
//! a change to one rebuilds nothing of the other. A kernel's [`KernelCapabilities`] come from
//! its build configuration when one is known, else from its ELF file.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use banger_proto::KernelCapabilities;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::{ImageError, io_err};

/// Where the kernel recipe lives inside the guest recipe.
pub const RECIPE_DIR: &str = "microvm-kernel/";
/// The build script, relative to a written recipe.
pub const BUILD_SCRIPT: &str = "microvm-kernel/build.sh";
/// The source tarball Debian's `linux-source-6.1` package installs.
pub const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The name `banger kernel build` stores its kernel under by default.
pub const DEFAULT_NAME: &str = "microvm";
/// The name a recipe image build stores Debian's cloud kernel under (images built `--from`
/// boot it: it has the modules tree they install).
pub const DEBIAN_NAME: &str = "debian";

/// Whether a guest recipe file belongs to the kernel recipe (and not to the image's).
pub fn is_recipe_file(path: &str) -> bool {
    path.starts_with(RECIPE_DIR)
}

/// The source tarball to build from: `$BANGER_KERNEL_SOURCE`, else Debian's package's.
pub fn source_tarball() -> PathBuf {
    std::env::var_os("BANGER_KERNEL_SOURCE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOURCE), PathBuf::from)
}

/// Digest of the kernel recipe and of the source tarball it builds (its name, size and
/// modification time: a new package version changes them).
pub fn recipe_digest(source: &Path) -> Result<String, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(source).map_err(|_| ImageError::MissingFile {
        what: "kernel source",
        path: format!(
            "{} (install Debian's linux-source-6.1 package: scripts/install-deps)",
            source.display()
        ),
    })?;
    let mut hasher = Sha256::new();
    super::hash_guest_files(&mut hasher, is_recipe_file);
    hasher.update(source.as_os_str().as_encoded_bytes());
    hasher.update(meta.len().to_le_bytes());
    hasher.update(meta.mtime().to_le_bytes());
    Ok(super::hex(&hasher.finalize()))
}

/// Reads `CONFIG_X=value` lines.
fn config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config.lines().find_map(|line| {
        line.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::trim)
    })
}

/// Capabilities from a kernel's build configuration.
pub fn capabilities_from_config(config: &str) -> KernelCapabilities {
    let is = |key: &str, want: &str| config_value(config, key) == Some(want);
    let built_in = |key: &str| is(key, "y");
    let mmio = built_in("CONFIG_VIRTIO_MMIO");
    KernelCapabilities {
        virtio_mmio_cmdline: mmio && built_in("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
        // ACPI without PCI cannot load QEMU microvm's tables: ACPICA fails "During Region
        // initialization" (AE_BAD_PARAMETER, seen with 6.1) and no device is found, so such a
        // kernel takes its devices on the command line.
        acpi_virtio: built_in("CONFIG_ACPI")
            && built_in("CONFIG_PCI")
            && (mmio || is("CONFIG_VIRTIO_MMIO", "m")),
        needs_initrd: !(mmio
            && built_in("CONFIG_VIRTIO_BLK")
            && built_in("CONFIG_EXT4_FS")
            && built_in("CONFIG_DEVTMPFS")),
        pvh: built_in("CONFIG_PVH"),
        from: "config".into(),
    }
}

/// Capabilities from an ELF vmlinux without a configuration: a built-in virtio-mmio driver
/// with command-line devices has the `virtio_mmio.device` parameter in the kernel's
/// parameter table, its ACPI match the `LNRO0005` id (used only with PCI built in, seen by
/// x86's PCI setup message); a PVH entry is an ELF note `Xen` of
/// type 18 (XEN_ELFNOTE_PHYS32_ENTRY). Whether the root's drivers are built in cannot be
/// read: a kernel without built-in virtio-mmio is taken to need an initrd.
pub fn capabilities_from_elf(bytes: &[u8]) -> KernelCapabilities {
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let cmdline = has(b"virtio_mmio.device");
    KernelCapabilities {
        virtio_mmio_cmdline: cmdline,
        // As from a config: ACPI discovery only with PCI built in (x86's PCI setup message).
        acpi_virtio: has(b"LNRO0005") && has(b"PCI: Using configuration type"),
        needs_initrd: !cmdline,
        pvh: has(b"\x04\x00\x00\x00\x04\x00\x00\x00\x12\x00\x00\x00Xen\x00")
            || has(b"\x04\x00\x00\x00\x08\x00\x00\x00\x12\x00\x00\x00Xen\x00"),
        from: "elf".into(),
    }
}

/// Capabilities of the kernel file `kernel`: from its configuration (a `config` beside it or
/// IKCONFIG), else from its ELF file. Blocking: reads the whole kernel.
pub fn capabilities_of(kernel: &Path) -> KernelCapabilities {
    if let Some(config) = super::kernel_config(kernel) {
        return capabilities_from_config(&config);
    }
    match std::fs::read(kernel) {
        Ok(bytes) => capabilities_from_elf(&bytes),
        Err(_) => KernelCapabilities {
            virtio_mmio_cmdline: false,
            acpi_virtio: false,
            needs_initrd: true,
            pvh: false,
            from: "unreadable".into(),
        },
    }
}

/// Why Firecracker cannot boot a kernel with `caps` (and an initrd or not), if it cannot.
pub fn firecracker_blocker(caps: &KernelCapabilities, has_initrd: bool) -> Option<String> {
    if !caps.virtio_mmio_cmdline {
        return Some(
            "cannot find virtio-mmio devices declared on its command line, as Firecracker \
             declares them (no built-in CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)"
                .into(),
        );
    }
    if caps.needs_initrd && !has_initrd {
        return Some("needs an initrd for its root file system and has none".into());
    }
    None
}

/// How QEMU must declare a kernel's virtio-mmio devices: through ACPI where the kernel reads
/// it (Debian's cloud kernel), else on the command line with ACPI off (Firecracker's way).
pub fn devices_on_cmdline(caps: &KernelCapabilities) -> bool {
    caps.virtio_mmio_cmdline && !caps.acpi_virtio
}

/// A `progress PERCENT WHAT` line of `build.sh`.
pub fn parse_progress(line: &str) -> Option<(u8, String)> {
    let rest = line.strip_prefix("progress ")?;
    let (percent, what) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((percent.parse::<u8>().ok()?.min(100), what.to_owned()))
}

/// Runs the kernel build script `script` into `out_dir`, make's output appended to `log`,
/// each progress line handed to `on_progress`. On failure the error carries the log's tail.
pub async fn run_build(
    script: &Path,
    out_dir: &Path,
    source: &Path,
    log: &Path,
    mut on_progress: impl FnMut(u8, String),
) -> Result<(), ImageError> {
    let log_file = super::open_log(log)?;
    let mut child = Command::new("bash")
        .arg(script)
        .arg(out_dir)
        .env("BANGER_KERNEL_SOURCE", source)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err("cannot run bash"))?;
    if let Some(stdout) = child.stdout.take() {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((percent, what)) = parse_progress(&line) {
                on_progress(percent, what);
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(io_err("cannot wait for the kernel build"))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail = crate::cause::last_line(&text, "").unwrap_or_else(|| "no output".into());
    Err(ImageError::BuildFailed {
        step: "kernel build",
        status: status.to_string(),
        tail: format!("{tail} (full log: {})", log.display()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MICROVM: &str = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n\
        CONFIG_VIRTIO_BLK=y\nCONFIG_EXT4_FS=y\nCONFIG_DEVTMPFS=y\nCONFIG_PVH=y\n\
        # CONFIG_ACPI is not set\n";
    const CLOUD: &str = "CONFIG_ACPI=y\nCONFIG_PCI=y\nCONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_BLK=m\n\
        CONFIG_EXT4_FS=y\nCONFIG_DEVTMPFS=y\nCONFIG_PVH=y\n";

    #[test]
    fn the_microvm_config_boots_firecracker_and_takes_devices_on_the_command_line() {
        let caps = capabilities_from_config(MICROVM);
        assert!(caps.virtio_mmio_cmdline && !caps.acpi_virtio && !caps.needs_initrd && caps.pvh);
        assert_eq!(firecracker_blocker(&caps, false), None);
        assert!(devices_on_cmdline(&caps));
    }

    #[test]
    fn acpi_without_pci_is_not_taken_for_acpi_discovery() {
        let caps = capabilities_from_config(&format!("{MICROVM}CONFIG_ACPI=y\n"));
        assert!(caps.virtio_mmio_cmdline && !caps.acpi_virtio);
        assert!(devices_on_cmdline(&caps));
        let caps = capabilities_from_config(&format!("{MICROVM}CONFIG_ACPI=y\nCONFIG_PCI=y\n"));
        assert!(caps.acpi_virtio && !devices_on_cmdline(&caps));
    }

    #[test]
    fn the_cloud_config_is_refused_for_firecracker_and_uses_acpi() {
        let caps = capabilities_from_config(CLOUD);
        assert!(!caps.virtio_mmio_cmdline && caps.acpi_virtio && caps.needs_initrd);
        let why = firecracker_blocker(&caps, true).unwrap();
        assert!(why.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"), "{why}");
        assert!(!devices_on_cmdline(&caps));
    }

    #[test]
    fn elf_scan_finds_the_parameter_and_the_pvh_note() {
        let mut bytes = b"\x7fELF....virtio_mmio.device\0".to_vec();
        bytes.extend_from_slice(b"\x04\x00\x00\x00\x08\x00\x00\x00\x12\x00\x00\x00Xen\x00");
        let caps = capabilities_from_elf(&bytes);
        assert!(caps.virtio_mmio_cmdline && caps.pvh && !caps.acpi_virtio);
        let caps = capabilities_from_elf(b"\x7fELF LNRO0005 PCI: Using configuration type %d");
        assert!(!caps.virtio_mmio_cmdline && caps.acpi_virtio && caps.needs_initrd);
        // banger's microVM kernel: ACPI's virtio match but no PCI.
        let caps = capabilities_from_elf(b"\x7fELF LNRO0005 virtio_mmio.device");
        assert!(caps.virtio_mmio_cmdline && !caps.acpi_virtio && devices_on_cmdline(&caps));
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress("progress 42 compiling (300 steps)"),
            Some((42, "compiling (300 steps)".into()))
        );
        assert_eq!(parse_progress("progress 300 x").map(|p| p.0), None);
        assert_eq!(parse_progress("  CC kernel/fork.o"), None);
    }

    #[test]
    fn the_kernel_recipe_is_embedded_and_apart_from_the_image_recipe() {
        let names: Vec<&str> = super::super::GUEST_FILES.iter().map(|f| f.0).collect();
        assert!(names.contains(&BUILD_SCRIPT), "{names:?}");
        assert!(
            names.contains(&"microvm-kernel/microvm.config"),
            "{names:?}"
        );
        assert!(is_recipe_file(BUILD_SCRIPT) && !is_recipe_file("build-rootfs.sh"));
    }
}
