//! The helper's confinement root: the owner's state dir, named by the helper's own root-owned
//! configuration (`--state-dir`, or the owner's passwd home + `.local/share/banger`) and opened
//! per request as a directory descriptor by an fd-based walk from `/`, and every request path
//! resolved beneath that descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV)`. A string is never trusted to name what is opened: the text of a request
//! path is only checked to start with the configured dir (to turn it into a path relative to
//! the descriptor).
//!
//! The walk follows a symlink only inside a root-controlled directory (root-owned, not
//! writable by group or others: a symlink there is root's configuration, e.g. `/home ->
//! /var/home`), crosses a mount point only from such a directory, accepts on the way only
//! directories owned by root or the owner (group/other-writable ones only when sticky), and
//! the state dir itself must belong to the owner and not be writable by group or others. So
//! the owner replacing `~/.local/share/banger` (or anything above it that is theirs) by a
//! symlink, or mounting something there, is refused; swapping it after the walk changes
//! nothing, because everything after the walk goes through the descriptor.
//!
//! Every refusal of a file beneath the root reads the same whatever the reason (missing, not
//! readable, a symlink, a mount point, a directory, another's): the helper runs as root and
//! must not tell the owner whether a path under a directory they cannot read exists.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::validate::Invalid;

/// Symlinks followed in root-controlled directories before the walk gives up.
const MAX_HOPS: usize = 40;

/// Why the state dir cannot serve as the confinement root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    #[error("the state dir {0:?} is not an absolute path without `.` or `..`")]
    Shape(PathBuf),
    #[error("the state dir {dir:?} does not exist yet (component {at:?}); start bangerd once")]
    Missing { dir: PathBuf, at: PathBuf },
    #[error(
        "the state dir {dir:?} is refused: {at:?} is a symlink in a directory the owner controls \
         (the helper follows symlinks only where root alone can write)"
    )]
    Symlink { dir: PathBuf, at: PathBuf },
    #[error(
        "the state dir {dir:?} is refused: {at:?} is a mount point in a directory the owner controls"
    )]
    MountPoint { dir: PathBuf, at: PathBuf },
    #[error(
        "the state dir {dir:?} is refused: {at:?} must be a directory owned by root or uid {owner}, \
         not writable by group or others unless sticky"
    )]
    Untrusted {
        dir: PathBuf,
        at: PathBuf,
        owner: u32,
    },
    #[error(
        "the state dir {dir:?} must be a directory owned by uid {owner} that group and others \
         cannot write; hint: chmod go-w it"
    )]
    NotOwners { dir: PathBuf, owner: u32 },
    #[error("cannot open the state dir {dir:?} at {at:?}: {errno}")]
    Open {
        dir: PathBuf,
        at: PathBuf,
        errno: Errno,
    },
    #[error("the state dir {0:?}: more than {MAX_HOPS} root-owned symlinks on the way")]
    Hops(PathBuf),
}

/// The configured state dir of one owner.
#[derive(Debug, Clone)]
pub struct StateRoot {
    path: PathBuf,
    owner: u32,
}

/// The state dir, opened and checked: every path of one request is resolved beneath `fd`.
#[derive(Debug)]
pub struct OpenRoot {
    fd: OwnedFd,
    path: PathBuf,
    owner: u32,
}

/// A file opened beneath the root, with its status at open time.
#[derive(Debug)]
pub struct OpenedFile {
    pub fd: OwnedFd,
    pub stat: FileStat,
}

fn normal_components(path: &Path) -> Option<Vec<OsString>> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n.to_owned()),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn is_dir(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Root-owned and not writable by group or others: only root can change what is in it.
fn root_controlled(stat: &FileStat) -> bool {
    stat.st_uid == 0 && stat.st_mode & 0o022 == 0
}

impl StateRoot {
    /// The configured state dir (absolute, no `.`/`..`; checked again at every open).
    pub fn new(path: PathBuf, owner: u32) -> Result<Self, RootError> {
        if normal_components(&path).is_none() {
            return Err(RootError::Shape(path));
        }
        Ok(Self { path, owner })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Walks from `/` to the state dir (see the module doc) and returns its descriptor.
    pub fn open(&self) -> Result<OpenRoot, RootError> {
        let dir = &self.path;
        let mut queue = normal_components(dir).ok_or_else(|| RootError::Shape(dir.clone()))?;
        queue.reverse(); // popped from the end
        let open_err = |at: &Path, errno| RootError::Open {
            dir: dir.clone(),
            at: at.to_owned(),
            errno,
        };
        let root = nix::fcntl::open(
            "/",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| open_err(Path::new("/"), e))?;
        let mut current = root;
        let mut current_stat = fstat(&current).map_err(|e| open_err(Path::new("/"), e))?;
        let mut walked = PathBuf::from("/");
        let mut hops = 0;
        while let Some(name) = queue.pop() {
            let at = walked.join(&name);
            let trusted = root_controlled(&current_stat);
            let mut resolve = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS;
            if !trusted {
                resolve |= ResolveFlag::RESOLVE_NO_XDEV;
            }
            let how = OpenHow::new()
                // No O_NOFOLLOW: with O_PATH it would open a final symlink itself, where
                // RESOLVE_NO_SYMLINKS answers ELOOP.
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(resolve);
            match openat2(&current, name.as_os_str(), how) {
                Ok(fd) => {
                    let stat = fstat(&fd).map_err(|e| open_err(&at, e))?;
                    let sticky = stat.st_mode & 0o1000 != 0;
                    let owner_ok = stat.st_uid == 0 || stat.st_uid == self.owner;
                    if !is_dir(&stat) || !owner_ok || (stat.st_mode & 0o022 != 0 && !sticky) {
                        if queue.is_empty() {
                            return Err(RootError::NotOwners {
                                dir: dir.clone(),
                                owner: self.owner,
                            });
                        }
                        return Err(RootError::Untrusted {
                            dir: dir.clone(),
                            at,
                            owner: self.owner,
                        });
                    }
                    current = fd;
                    current_stat = stat;
                    walked = at;
                }
                // A symlink in a directory only root controls: root's configuration. Its
                // target is resolved and walked again from `/`, component by component.
                Err(Errno::ELOOP) if trusted => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(RootError::Hops(dir.clone()));
                    }
                    let target = std::fs::canonicalize(&at).map_err(|e| {
                        open_err(&at, Errno::from_raw(e.raw_os_error().unwrap_or(0)))
                    })?;
                    let mut more = normal_components(&target)
                        .ok_or_else(|| RootError::Shape(target.clone()))?;
                    more.reverse();
                    queue.extend(more);
                    current = nix::fcntl::open(
                        "/",
                        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| open_err(Path::new("/"), e))?;
                    current_stat = fstat(&current).map_err(|e| open_err(Path::new("/"), e))?;
                    walked = PathBuf::from("/");
                }
                Err(Errno::ELOOP) => {
                    return Err(RootError::Symlink {
                        dir: dir.clone(),
                        at,
                    });
                }
                Err(Errno::EXDEV) => {
                    return Err(RootError::MountPoint {
                        dir: dir.clone(),
                        at,
                    });
                }
                Err(Errno::ENOENT) => {
                    return Err(RootError::Missing {
                        dir: dir.clone(),
                        at,
                    });
                }
                Err(Errno::ENOTDIR) => {
                    return Err(RootError::Untrusted {
                        dir: dir.clone(),
                        at,
                        owner: self.owner,
                    });
                }
                Err(e) => return Err(open_err(&at, e)),
            }
        }
        if current_stat.st_uid != self.owner || current_stat.st_mode & 0o022 != 0 {
            return Err(RootError::NotOwners {
                dir: dir.clone(),
                owner: self.owner,
            });
        }
        Ok(OpenRoot {
            fd: current,
            path: dir.clone(),
            owner: self.owner,
        })
    }
}

impl OpenRoot {
    /// The part of `text` below the state dir: `text` must be absolute, without `.`/`..`,
    /// and start with the configured dir. A pure string check that touches nothing (so it
    /// reveals nothing); what it names is opened beneath the descriptor.
    pub fn relative(&self, text: &str) -> Result<PathBuf, Invalid> {
        let path = Path::new(text);
        if text.contains('\0') || normal_components(path).is_none() {
            return Err(Invalid::PathShape(text.to_owned()));
        }
        let rest = path
            .strip_prefix(&self.path)
            .map_err(|_| Invalid::PathEscapes {
                path: text.to_owned(),
                root: self.path.clone(),
            })?;
        if rest.as_os_str().is_empty() {
            return Err(Invalid::NotOwnersFile(text.to_owned()));
        }
        Ok(rest.to_owned())
    }

    /// Opens `text` beneath the state dir as a regular file of the owner (`access`:
    /// `O_RDONLY`, `O_RDWR` or `O_PATH`). Symlinks, mount points and `..` are refused by the
    /// kernel during the resolution; every refusal reads the same.
    pub fn open_file(&self, text: &str, access: OFlag) -> Result<OpenedFile, Invalid> {
        let rel = self.relative(text)?;
        let refused = || Invalid::NotOwnersFile(text.to_owned());
        // openat2 refuses O_PATH with anything but O_DIRECTORY/O_NOFOLLOW/O_CLOEXEC.
        let extra = if access.contains(OFlag::O_PATH) {
            OFlag::empty()
        } else {
            OFlag::O_NOCTTY | OFlag::O_NONBLOCK
        };
        let how = OpenHow::new()
            .flags(access | extra | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        let fd = openat2(&self.fd, rel.as_os_str().as_bytes(), how).map_err(|_| refused())?;
        let stat = fstat(&fd).map_err(|_| refused())?;
        let regular = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG;
        if !regular || stat.st_uid != self.owner {
            return Err(refused());
        }
        Ok(OpenedFile { fd, stat })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn owner() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        (dir, state)
    }

    #[test]
    fn the_state_dir_opens_and_files_resolve_beneath_it() {
        let (dir, state) = setup();
        std::fs::write(state.join("f"), "x").unwrap();
        std::fs::write(dir.path().join("outside"), "x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), state.join("link")).unwrap();
        std::os::unix::fs::symlink("f", state.join("rel")).unwrap();
        std::fs::create_dir(state.join("sub")).unwrap();
        let root = StateRoot::new(state.clone(), owner())
            .unwrap()
            .open()
            .unwrap();
        let text = |n: &str| state.join(n).display().to_string();
        assert!(root.open_file(&text("f"), OFlag::O_RDONLY).is_ok());
        assert!(root.open_file(&text("f"), OFlag::O_PATH).is_ok());
        // Every refusal below the root reads the same.
        let same = |n: &str| {
            let e = root.open_file(&text(n), OFlag::O_RDONLY).unwrap_err();
            assert_eq!(e, Invalid::NotOwnersFile(text(n)), "{n}");
        };
        for name in ["link", "rel", "sub", "missing", "sub/missing/deeper"] {
            same(name);
        }
        assert!(matches!(
            root.open_file(&format!("{}/../outside", state.display()), OFlag::O_RDONLY),
            Err(Invalid::PathShape(_))
        ));
        assert!(matches!(
            root.open_file("/etc/passwd", OFlag::O_RDONLY),
            Err(Invalid::PathEscapes { .. })
        ));
        // A sibling sharing the prefix as a string is outside.
        assert!(matches!(
            root.open_file(&format!("{}x/f", state.display()), OFlag::O_RDONLY),
            Err(Invalid::PathEscapes { .. })
        ));
    }

    #[test]
    fn a_loose_or_missing_state_dir_is_refused() {
        let (dir, state) = setup();
        assert!(
            StateRoot::new(state.clone(), owner())
                .unwrap()
                .open()
                .is_ok()
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            StateRoot::new(state.clone(), owner()).unwrap().open(),
            Err(RootError::NotOwners { .. })
        ));
        assert!(matches!(
            StateRoot::new(dir.path().join("missing"), owner())
                .unwrap()
                .open(),
            Err(RootError::Missing { .. })
        ));
        assert!(StateRoot::new("relative".into(), 0).is_err());
        assert!(StateRoot::new("/a/../b".into(), 0).is_err());
    }
}
