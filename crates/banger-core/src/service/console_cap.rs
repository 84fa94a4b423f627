//! The serial console logs stay bounded: the VMM appends to the log file (QEMU's file
//! chardev with `append=on`, Firecracker's stdout opened for appending), and the daemon cuts
//! a log that passed `daemon.console_log_max_bytes` (default [`CONSOLE_LOG_CAP`]) back to a one-line marker, every
//! [`CONSOLE_CHECK_SECS`] and at start. A VM that outlives the daemon writes unchecked until
//! the next daemon starts and cuts it; `vm logs` readers whose offset passed the new end
//! start over. Each check also takes group/other bits off the log (QEMU creates it 0640).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::{info, warn};

use super::Manager;

/// Bytes a console log may reach before it is cut, unless the config says otherwise.
pub const CONSOLE_LOG_CAP: u64 = 8 << 20;
/// How often the daemon checks the console logs of its VMs.
pub const CONSOLE_CHECK_SECS: u64 = 5;

impl Manager {
    /// Cuts every VM's console log (and the previous boot's) that passed the cap. Blocking:
    /// run it on a blocking thread.
    pub fn cap_console_logs(&self) {
        let vms = match self.store().list_vms() {
            Ok(vms) => vms,
            Err(e) => {
                warn!("cannot list VMs to cap their console logs: {e}");
                return;
            }
        };
        let cap = self.config.daemon.console_log_max_bytes.max(4096);
        for vm in vms {
            let log = self.layout.vm_console_log(&vm.id);
            for path in [log.with_extension("log.prev"), log] {
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
    let size = meta.len();
    if size <= cap {
        return Ok(None);
    }
    file.set_len(0)?;
    let mut file = file;
    writeln!(
        file,
        "[banger: the console log passed {cap} bytes ({size}) and was cut here]"
    )?;
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
            text.starts_with("[banger: the console log passed 8192 bytes"),
            "{text}"
        );
        assert!(text.ends_with("cut here]\nafter\n"), "{text}");
        assert_eq!(cap_file(&dir.path().join("none"), 1).unwrap(), None);
    }
}
