//! The serial console logs stay bounded: the VMM appends to the log file (QEMU's file
//! chardev with `append=on`, Firecracker's stdout opened for appending), and the daemon cuts
//! a log that passed `daemon.console_log_max_bytes` (default [`CONSOLE_LOG_CAP`]) back to a one-line marker, every
//! [`CONSOLE_CHECK_SECS`] and at start. A VM that outlives the daemon writes unchecked until
//! the next daemon starts and cuts it; `vm logs` readers whose offset passed the new end
//! start over. Each check also takes group/other bits off the log (QEMU creates it 0640).
//!
//! Firecracker's own log (in the VM's data dir) is cut the same way at
//! [`FIRECRACKER_LOG_CAP`]. Firecracker writes it at its own offset, not appending: after a
//! cut its next line lands past a hole, so the file's disk use is what is measured (the
//! blocks it holds), and readers drop the NULs of the hole.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::{info, warn};

use super::Manager;

/// Bytes a console log may reach before it is cut, unless the config says otherwise.
pub const CONSOLE_LOG_CAP: u64 = 8 << 20;
/// Bytes of disk Firecracker's log of one VM may take before it is cut.
pub const FIRECRACKER_LOG_CAP: u64 = 1 << 20;
/// How often the daemon checks the console logs of its VMs.
pub const CONSOLE_CHECK_SECS: u64 = 5;

impl Manager {
    /// Cuts every VM's console log (and the previous boot's) that passed the cap. Blocking:
    /// run it on a blocking thread.
    pub fn cap_console_logs(&self) {
        let vms = match self.db.blocking(|s| s.list_vms()) {
            Ok(vms) => vms,
            Err(e) => {
                warn!("cannot list VMs to cap their console logs: {e}");
                return;
            }
        };
        let cap = self.config.daemon.console_log_max_bytes.max(4096);
        for vm in vms {
            let log = self.layout.vm_console_log(&vm.id);
            let vmm_log = self.layout.vm_firecracker_log(&vm.id);
            for (path, cap) in [
                (log.with_extension("log.prev"), cap),
                (log, cap),
                (vmm_log, FIRECRACKER_LOG_CAP),
            ] {
                match cap_file(&path, cap) {
                    Ok(Some(size)) => {
                        info!(vm = %vm.name, path = %path.display(), size, "console log cut at its cap")
                    }
                    Ok(None) => {}
                    Err(e) => warn!(path = %path.display(), "cannot cap the console log: {e}"),
                }
            }
        }
    }
}

/// Cuts `path` to a marker line when it is larger than `cap`; returns the size it had.
pub fn cap_file(path: &Path, cap: u64) -> std::io::Result<Option<u64>> {
    let file = match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    // QEMU creates its file chardev 0640 whatever the umask: the log is the owner's alone.
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    use std::os::unix::fs::MetadataExt;
    // What it holds on disk: a file written past a hole (see the module doc) is not more.
    let size = meta.len().min(meta.blocks().saturating_mul(512));
    if size <= cap {
        return Ok(None);
    }
    file.set_len(0)?;
    // One write: the VMM appends while this runs, and `writeln!` would write the marker in
    // pieces that the VMM's bytes can land between.
    let marker = format!("[banger: this log passed {cap} bytes ({size}) and was cut here]\n");
    (&file).write_all(marker.as_bytes())?;
    Ok(Some(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_the_cap_is_cut_and_appends_continue_at_its_new_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        writer.write_all(&[b'x'; 4096]).unwrap();
        assert_eq!(cap_file(&path, 8192).unwrap(), None);
        writer.write_all(&[b'x'; 8192]).unwrap();
        assert_eq!(cap_file(&path, 8192).unwrap(), Some(12288));
        writer.write_all(b"after\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("[banger: this log passed 8192 bytes"),
            "{text}"
        );
        assert!(text.ends_with("cut here]\nafter\n"), "{text}");
        assert_eq!(cap_file(&dir.path().join("none"), 1).unwrap(), None);
    }

    #[test]
    fn the_marker_stays_whole_while_the_vmm_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, [b'x'; 8192]).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    file.write_all(b"x").unwrap();
                }
            })
        };
        for _ in 0..200 {
            // Past the cap again, then cut: the marker is one piece whatever the writer does.
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(&[b'x'; 8192])
                .unwrap();
            assert!(cap_file(&path, 4096).unwrap().is_some());
            let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
            assert!(
                text.contains("[banger: this log passed 4096 bytes (")
                    && text.contains(") and was cut here]\n"),
                "{text:?}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn a_log_written_at_its_own_offset_is_cut_once_and_read_without_the_hole() {
        // Firecracker's log: opened without O_APPEND, so after a cut it writes past a hole.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("firecracker.log");
        std::fs::File::create(&path).unwrap();
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all(&[b'x'; 65536]).unwrap();
        assert_eq!(cap_file(&path, 8192).unwrap(), Some(65536));
        writer.write_all(b"[id:main:ERROR] the reason\n").unwrap();
        // The file is long but holds a few blocks: not cut again (the line stays).
        assert_eq!(cap_file(&path, 8192).unwrap(), None);
        let text = crate::vmm::firecracker::read_tail(&path);
        assert!(text.contains("was cut here]\n"), "{text:?}");
        assert!(text.ends_with("[id:main:ERROR] the reason\n"), "{text:?}");
    }
}
