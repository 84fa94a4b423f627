//! The owner's data stays the owner's: the daemon runs with umask 077 (so everything it and
//! the VMMs it spawns create is 0600/0700), and at start [`enforce`] walks the data and
//! runtime dirs without following symlinks and takes group/other bits off whatever an
//! older banger or another tool left looser. A top dir owned by someone else is refused.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

/// Sets the process umask to 077; called before any thread or file exists.
pub fn restrict_umask() {
    // SAFETY: umask only swaps the process's file-mode creation mask; it cannot fail.
    unsafe {
        nix::libc::umask(0o077);
    }
}

/// What [`enforce`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fixed {
    /// Entries whose mode lost group/other bits.
    pub restricted: u64,
    /// Entries owned by another uid (left as they are, reported).
    pub foreign: u64,
}

/// Makes `root` (the data or runtime dir, which must exist) and everything below it private
/// to `uid`: directories 0700 or tighter, files without group/other bits. `root` itself may
/// be a symlink the owner made (it is the configured place); nothing below is followed.
pub fn enforce(root: &Path, uid: u32) -> Result<Fixed> {
    let meta =
        std::fs::metadata(root).with_context(|| format!("cannot inspect {}", root.display()))?;
    if meta.uid() != uid {
        bail!(
            "{} is owned by uid {}, not by this daemon's user (uid {uid}); banger keeps its \
             state private to its owner; hint: chown it to yourself, or point BANGER_HOME elsewhere",
            root.display(),
            meta.uid()
        );
    }
    let mut fixed = Fixed::default();
    restrict(root, &meta, &mut fixed)?;
    walk(root, uid, &mut fixed)?;
    if fixed.restricted > 0 {
        info!(dir = %root.display(), entries = fixed.restricted, "made files private to the owner");
    }
    Ok(fixed)
}

fn restrict(path: &Path, meta: &std::fs::Metadata, fixed: &mut Fixed) -> Result<()> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))
        .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
    fixed.restricted += 1;
    Ok(())
}

fn walk(dir: &Path, uid: u32, fixed: &mut Fixed) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.uid() != uid {
            // e.g. a file root made through the helper: not ours to chmod.
            if meta.mode() & 0o077 != 0 {
                fixed.foreign += 1;
                warn!(path = %path.display(), uid = meta.uid(), "readable by others and not owned by this daemon's user");
            }
            continue;
        }
        restrict(&path, &meta, fixed)?;
        if meta.is_dir() {
            walk(&path, uid, fixed)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn loose_modes_are_fixed_and_symlinks_not_followed() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("data");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(root.join("vms/x")).unwrap();
        std::fs::write(&outside, "o").unwrap();
        std::fs::write(root.join("state.db"), "s").unwrap();
        std::fs::write(root.join("vms/x/run"), "r").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        for (path, m) in [
            (&root, 0o755),
            (&root.join("vms"), 0o775),
            (&root.join("vms/x"), 0o700),
            (&root.join("state.db"), 0o644),
            (&root.join("vms/x/run"), 0o775),
            (&outside, 0o644),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let uid = nix::unistd::getuid().as_raw();
        let fixed = enforce(&root, uid).unwrap();
        assert_eq!(fixed.restricted, 4);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("vms")), 0o700);
        assert_eq!(mode(&root.join("state.db")), 0o600);
        assert_eq!(mode(&root.join("vms/x/run")), 0o700);
        assert_eq!(mode(&outside), 0o644, "a symlink's target is not touched");
        assert_eq!(enforce(&root, uid).unwrap(), Fixed::default());
        let err = enforce(&root, uid + 1).unwrap_err().to_string();
        assert!(err.contains("not by this daemon's user"), "{err}");
    }
}
