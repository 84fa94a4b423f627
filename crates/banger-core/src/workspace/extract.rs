//! The one extractor for tars that come from the guest (`vm workspace export --to`, `vm cp`
//! guest→host). The guest is assumed compromised, so every entry is judged before anything
//! reaches the destination:
//! - paths: absolute paths, `..`, and paths below a symlink (or a file) of the same tar are
//!   refused; so is a path through a symlink or a file that already exists at the destination
//!   (nothing is written through a symlink, none is followed);
//! - `.git` (any case, any depth) is refused or skipped ([`Rules::lenient`]): a guest-written
//!   `.git/config` or hook runs commands on the host at the next `git status`;
//! - only regular files, directories and symlinks whose target stays inside the copied tree
//!   (relative, leading `..` only, never into `.git`) are written; hard links, devices, FIFOs
//!   are refused or skipped;
//! - modes are masked: files 0644, or 0755 when the owner could execute; directories 0755
//!   (no setuid/setgid/sticky, no group or other write); an existing directory keeps its mode;
//! - at most [`Rules::max_entries`] entries (directories created for a path count too) and
//!   [`Rules::max_bytes`] content bytes (the size a PAX record gives counts, and no more is
//!   ever copied); paths and symlink targets of at most [`PATH_MAX`] bytes, at most
//!   [`MAX_DEPTH`] components deep; long names and PAX headers of at most
//!   [`super::tar_guard::MAX_EXTENSION`] bytes (checked before the tar crate reads them);
//! - a symlink as the copied object itself (`vm cp`) is refused: its target resolves beside
//!   the destination, outside the copy;
//! - after extraction, a directory that git would open as a repository (a bare repository:
//!   `HEAD` with `objects` and `refs`, or `HEAD` with `commondir`, any case) is refused at
//!   [`install`], counting what already exists at the destination: git runs such a
//!   repository's configured commands (pager, fsmonitor) in it.
//!
//! Everything is extracted into a private staging directory beside the destination and moved
//! into place only when the whole tar was accepted ([`install`]): a failure leaves no partial
//! output. Moving first checks every name at the destination, then renames.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::WorkspaceError;
use super::tar_guard::TarGuard;

/// Entries of a guest tar at most (a huge file count is refused, not written).
pub const MAX_ENTRIES: u64 = 500_000;
/// Content bytes of a guest tar at most.
pub const MAX_BYTES: u64 = 64 << 30;
/// Bytes of a path or symlink target at most (Linux `PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// Bytes of one path component at most (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Components of a path at most.
pub const MAX_DEPTH: usize = 256;

/// What an extraction accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Skip (and count) `.git` entries, special files and symlinks pointing out of the tree
    /// instead of refusing the whole tar (`vm cp`); `false` refuses them (export, whose tar
    /// never holds them unless the guest forged it).
    pub lenient: bool,
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Rules {
    /// All-or-nothing (workspace export).
    pub fn strict() -> Self {
        Self {
            lenient: false,
            max_entries: MAX_ENTRIES,
            max_bytes: MAX_BYTES,
        }
    }

    /// Skips what it may not write (vm cp).
    pub fn lenient() -> Self {
        Self {
            lenient: true,
            ..Self::strict()
        }
    }
}

/// What an extraction wrote into the staging tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Entries written (files, directories, symlinks).
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
    /// Entries skipped under [`Rules::lenient`], with why (first 100).
    pub skipped: Vec<String>,
    pub skipped_count: u64,
    /// What the tree's root is (None: the tar was empty).
    pub root: Option<NodeKind>,
}

/// The kind of a written entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
}

/// The mode a file gets on the host: 0644, or 0755 when its owner could execute it.
pub fn file_mode(mode: u32) -> u32 {
    if mode & 0o100 != 0 { 0o755 } else { 0o644 }
}

/// The mode a directory gets on the host.
pub const DIR_MODE: u32 = 0o755;

/// Whether a path component is `.git` in any case.
fn is_git(component: &[u8]) -> bool {
    component.eq_ignore_ascii_case(b".git")
}

/// The normal components of a tar path: `.` and empty components are dropped; an absolute
/// path or `..` is refused.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if raw.contains(&0) {
        return Err("NUL in path".into());
    }
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("`..` in path".into()),
            part => out.push(part),
        }
    }
    Ok(out)
}

/// Checks a symlink at depth `depth` (components above it inside the tree) whose target is
/// `target`: relative, leading `..` only and no more of them than `depth`, never into
/// `.git`. Lexical resolution is exact here because every directory above the link is a
/// real directory (nothing is created below a symlink).
pub fn link_stays_inside(depth: usize, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty symlink target".into());
    }
    if target.first() == Some(&b'/') {
        return Err("symlink to an absolute path".into());
    }
    if target.contains(&0) {
        return Err("NUL in symlink target".into());
    }
    let mut ups = 0usize;
    let mut descended = false;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if descended => return Err("symlink target with `..` after a name".into()),
            b".." => ups += 1,
            part if is_git(part) => return Err("symlink into .git".into()),
            _ => descended = true,
        }
    }
    if ups > depth {
        return Err("symlink pointing outside the tree".into());
    }
    Ok(())
}

/// Extracts `reader` (a tar from the guest) into `tree`, which must not exist yet and whose
/// parent is the private staging directory. With `strip`, every path must start with that
/// component, which is removed (the copied object itself becomes `tree`); without, `tree`
/// is created as a directory and holds the entries.
pub fn extract(
    reader: impl Read,
    tree: &Path,
    strip: Option<&OsStr>,
    rules: &Rules,
) -> Result<Extracted, WorkspaceError> {
    let mut out = Extracted::default();
    // What each written path is, as a tree: (id of the directory holding it, its name) ->
    // (its id, kind); `tree` itself is id 0, its kind `out.root`. Only names are stored, so
    // memory grows with the entries (capped), not with their path lengths.
    let mut nodes: HashMap<(usize, Vec<u8>), (usize, NodeKind)> = HashMap::new();
    let mut last_id = 0usize;
    if strip.is_none() {
        make_dir(tree)?;
        out.root = Some(NodeKind::Dir);
    }
    let mut archive = tar::Archive::new(TarGuard::new(reader));
    let bad_tar = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            // The guard's refusals.
            WorkspaceError::Refused(format!("the guest's tar: {e}"))
        } else {
            WorkspaceError::Io {
                context: "cannot read the guest's tar".into(),
                source: e,
            }
        }
    };
    let mut seen = 0u64;
    for entry in archive.entries().map_err(bad_tar)? {
        let mut entry = entry.map_err(bad_tar)?;
        seen += 1;
        if seen > rules.max_entries {
            return Err(WorkspaceError::Refused(format!(
                "the guest's tar has more than {} entries",
                rules.max_entries
            )));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |why: String| WorkspaceError::UnsafeEntry {
            path: shown.clone(),
            why,
        };
        let kind = entry.header().entry_type();
        if raw.len() > PATH_MAX {
            return Err(refuse(format!("a path longer than {PATH_MAX} bytes")));
        }
        let mut parts = components(&raw).map_err(&refuse)?;
        if parts.len() > MAX_DEPTH {
            return Err(refuse(format!("a path deeper than {MAX_DEPTH} components")));
        }
        if parts.iter().any(|p| p.len() > NAME_MAX) {
            return Err(refuse(format!("a name longer than {NAME_MAX} bytes")));
        }
        if let Some(first) = strip {
            match parts.first() {
                Some(p) if *p == first.as_bytes() => {
                    parts.remove(0);
                }
                _ if parts.is_empty() && kind.is_dir() => continue,
                _ => return Err(refuse(format!("not under {}", first.to_string_lossy()))),
            }
        }
        let node = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => Some(NodeKind::File),
            tar::EntryType::Directory => Some(NodeKind::Dir),
            tar::EntryType::Symlink => Some(NodeKind::Symlink),
            // pax global headers carry no file.
            tar::EntryType::XGlobalHeader => continue,
            _ => None,
        };
        let skip = |why: String, out: &mut Extracted| -> Result<(), WorkspaceError> {
            if !rules.lenient {
                return Err(refuse(why));
            }
            out.skipped_count += 1;
            if out.skipped.len() < 100 {
                out.skipped.push(format!("{shown}: {why}"));
            }
            Ok(())
        };
        if parts.iter().any(|p| is_git(p)) {
            skip("a .git path".into(), &mut out)?;
            continue;
        }
        let Some(node) = node else {
            skip(
                format!("not a file, directory or symlink ({kind:?})"),
                &mut out,
            )?;
            continue;
        };
        if parts.is_empty() && strip.is_none() {
            // The tree root itself (`.`): it exists and keeps the directory mode.
            if node != NodeKind::Dir {
                return Err(refuse("the root is not a directory".into()));
            }
            continue;
        }
        let link_target = if node == NodeKind::Symlink {
            if parts.is_empty() {
                // The copied object itself: even `a/b` resolves beside the destination.
                return Err(refuse(
                    "a symlink as the copied object (its target is outside the copy)".into(),
                ));
            }
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            if target.len() > PATH_MAX {
                return Err(refuse(format!(
                    "a symlink target longer than {PATH_MAX} bytes"
                )));
            }
            if let Err(why) = link_stays_inside(parts.len().saturating_sub(1), &target) {
                skip(why, &mut out)?;
                continue;
            }
            Some(target)
        } else {
            None
        };
        // Parents: directories of this tar (created on the way), never a symlink or file.
        // `current` is what `parts[..depth]` is, `holder` the directory that holds it.
        let mut path = tree.to_path_buf();
        let mut current = out.root.map(|kind| (0usize, kind));
        let mut holder = 0usize;
        for (depth, name) in parts.iter().enumerate() {
            let dir = match current {
                Some((id, NodeKind::Dir)) => id,
                Some(_) => return Err(refuse("below a symlink or file of the tar".into())),
                None => {
                    // Created directories count as entries: deep paths cannot multiply
                    // what one entry creates.
                    seen += 1;
                    if seen > rules.max_entries {
                        return Err(WorkspaceError::Refused(format!(
                            "the guest's tar has more than {} entries",
                            rules.max_entries
                        )));
                    }
                    make_dir(&path)?;
                    if depth == 0 {
                        out.root = Some(NodeKind::Dir);
                        0
                    } else {
                        last_id += 1;
                        nodes.insert(
                            (holder, parts[depth - 1].to_vec()),
                            (last_id, NodeKind::Dir),
                        );
                        last_id
                    }
                }
            };
            path.push(OsStr::from_bytes(name));
            holder = dir;
            current = nodes.get(&(dir, name.to_vec())).copied();
        }
        match (current, node) {
            (None, _) => {}
            (Some((_, NodeKind::Dir)), NodeKind::Dir) => continue,
            (Some(_), _) => return Err(refuse("appears twice".into())),
        }
        let mode = entry.header().mode().unwrap_or(0o644);
        let mtime = entry.header().mtime().ok();
        match node {
            NodeKind::Dir => make_dir(&path)?,
            NodeKind::Symlink => {
                let target = link_target.unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(
                    WorkspaceError::io(format!("cannot create {}", path.display())),
                )?;
            }
            NodeKind::File => {
                // `entry.size()`: what the tar crate copies (a PAX `size=` overrides the
                // header's field).
                let remaining = rules.max_bytes.saturating_sub(out.bytes);
                let too_big = || {
                    WorkspaceError::Refused(format!(
                        "the guest's tar holds more than {} bytes",
                        rules.max_bytes
                    ))
                };
                if entry.size() > remaining {
                    return Err(too_big());
                }
                let mode = file_mode(mode);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(WorkspaceError::io(format!(
                        "cannot create {}",
                        path.display()
                    )))?;
                let written = std::io::copy(&mut (&mut entry).take(remaining + 1), &mut file)
                    .map_err(|e| bad_tar_or(e, &path))?;
                if written > remaining {
                    return Err(too_big());
                }
                // The umask must not change what the guest's mode (masked) says.
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(WorkspaceError::io(format!(
                        "cannot chmod {}",
                        path.display()
                    )))?;
                if let Some(secs) = mtime {
                    let _ = file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
                }
                out.bytes += written;
            }
        }
        match parts.last() {
            None => out.root = Some(node),
            Some(name) => {
                last_id += 1;
                nodes.insert((holder, name.to_vec()), (last_id, node));
            }
        }
        out.entries += 1;
    }
    Ok(out)
}

/// Creates directory `path` with [`DIR_MODE`] (set after creation: the umask must not
/// change it).
fn make_dir(path: &Path) -> Result<(), WorkspaceError> {
    std::fs::create_dir(path).map_err(WorkspaceError::io(format!(
        "cannot create {}",
        path.display()
    )))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE)).map_err(
        WorkspaceError::io(format!("cannot chmod {}", path.display())),
    )
}

/// A failed copy of entry data to `path`: the guard's refusal or a read/write error.
fn bad_tar_or(e: std::io::Error, path: &Path) -> WorkspaceError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        WorkspaceError::Refused(format!("the guest's tar: {e}"))
    } else {
        WorkspaceError::Io {
            context: format!("cannot write {}", path.display()),
            source: e,
        }
    }
}

/// A private staging directory beside `dest` (same file system, so [`install`] renames);
/// removed with what it holds when dropped.
pub fn staging_for(dest: &Path) -> Result<tempfile::TempDir, WorkspaceError> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    tempfile::Builder::new()
        .prefix(".banger-staging-")
        .tempdir_in(parent)
        .map_err(WorkspaceError::io(format!(
            "cannot create a staging directory in {}",
            parent.display()
        )))
}

/// Moves the extracted `from` (in the staging directory) to `dest`: renamed there when
/// `dest` does not exist; merged into `dest` when both are directories (existing
/// directories keep their mode, existing files and symlinks are replaced, never written
/// through); anything else is refused. Every name is checked before the first move.
pub fn install(from: &Path, dest: &Path) -> Result<(), WorkspaceError> {
    refuse_git_dirs(from, dest)?;
    check(from, dest)?;
    place(from, dest)
}

fn lstat(path: &Path) -> Result<Option<std::fs::Metadata>, WorkspaceError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WorkspaceError::Io {
            context: format!("cannot inspect {}", path.display()),
            source: e,
        }),
    }
}

fn conflict(dest: &Path, why: &str) -> WorkspaceError {
    WorkspaceError::Conflict {
        path: dest.display().to_string(),
        why: why.into(),
    }
}

/// What git looks for to open a directory as a repository (`is_git_directory`): `HEAD` with
/// `objects` and `refs`, or `HEAD` with `commondir`. Names in any case (a case-insensitive
/// file system matches them too).
#[derive(Debug, Default)]
pub struct GitDirNames {
    head: bool,
    objects: bool,
    refs: bool,
    commondir: bool,
}

impl GitDirNames {
    /// Notes one name in the directory.
    pub fn add(&mut self, name: &[u8]) {
        if name.eq_ignore_ascii_case(b"HEAD") {
            self.head = true;
        } else if name.eq_ignore_ascii_case(b"objects") {
            self.objects = true;
        } else if name.eq_ignore_ascii_case(b"refs") {
            self.refs = true;
        } else if name.eq_ignore_ascii_case(b"commondir") {
            self.commondir = true;
        }
    }

    /// Whether `name` is one of the names git looks for.
    pub fn is_git_name(name: &[u8]) -> bool {
        let mut probe = Self::default();
        probe.add(name);
        probe.head || probe.objects || probe.refs || probe.commondir
    }

    /// Whether git would take the directory for a git dir.
    pub fn is_git_dir(&self) -> bool {
        self.head && (self.commondir || (self.objects && self.refs))
    }

    /// Whether the directory holds `HEAD` beside any other git dir name (what a patch may
    /// complete with files the host tree already has).
    pub fn may_be_git_dir(&self) -> bool {
        self.head && (self.commondir || self.objects || self.refs)
    }
}

/// The names in directory `dir` (none when it is not a directory; symlinks not followed).
fn names_in(dir: &Path, into: &mut GitDirNames) -> Result<(), WorkspaceError> {
    if !lstat(dir)?.is_some_and(|m| m.is_dir()) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)
        .map_err(WorkspaceError::io(format!("cannot list {}", dir.display())))?
    {
        let entry = entry.map_err(WorkspaceError::io(format!("cannot list {}", dir.display())))?;
        into.add(entry.file_name().as_bytes());
    }
    Ok(())
}

/// Refuses the staged `from` when, moved to `dest`, some directory would be one git opens
/// as a repository (a bare repository the guest planted: git obeys its config, e.g. runs
/// `core.pager` or `core.fsmonitor`). Counts what exists at the destination too.
fn refuse_git_dirs(from: &Path, dest: &Path) -> Result<(), WorkspaceError> {
    let refuse = |dir: &Path| WorkspaceError::UnsafeEntry {
        path: dir.display().to_string(),
        why: "it would be a git repository (HEAD with objects and refs, or with commondir): \
              git would run commands from its config"
            .into(),
    };
    // The directory `dest` goes into gains its name.
    if let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) {
        let mut names = GitDirNames::default();
        names_in(parent, &mut names)?;
        names.add(name.as_bytes());
        if names.is_git_dir() {
            return Err(refuse(parent));
        }
    }
    fn walk(
        from: &Path,
        dest: &Path,
        refuse: &dyn Fn(&Path) -> WorkspaceError,
    ) -> Result<(), WorkspaceError> {
        if !lstat(from)?.is_some_and(|m| m.is_dir()) {
            return Ok(());
        }
        let mut names = GitDirNames::default();
        names_in(from, &mut names)?;
        names_in(dest, &mut names)?;
        if names.is_git_dir() {
            return Err(refuse(dest));
        }
        for entry in std::fs::read_dir(from).map_err(WorkspaceError::io(format!(
            "cannot list {}",
            from.display()
        )))? {
            let entry = entry.map_err(WorkspaceError::io(format!(
                "cannot list {}",
                from.display()
            )))?;
            walk(&entry.path(), &dest.join(entry.file_name()), refuse)?;
        }
        Ok(())
    }
    walk(from, dest, &refuse)
}

fn check(from: &Path, dest: &Path) -> Result<(), WorkspaceError> {
    let Some(there) = lstat(dest)? else {
        return Ok(());
    };
    let ours = std::fs::symlink_metadata(from).map_err(WorkspaceError::io(format!(
        "cannot inspect {}",
        from.display()
    )))?;
    let there = there.file_type();
    if there.is_symlink() && ours.is_dir() {
        return Err(conflict(dest, "is a symlink on the host (not followed)"));
    }
    match (ours.is_dir(), there.is_dir()) {
        (true, true) => for_each_child(from, dest, check),
        (true, false) => Err(conflict(dest, "exists and is not a directory")),
        (false, true) => Err(conflict(dest, "is a directory")),
        (false, false) if there.is_file() || there.is_symlink() => Ok(()),
        (false, false) => Err(conflict(dest, "exists and is not a regular file")),
    }
}

fn place(from: &Path, dest: &Path) -> Result<(), WorkspaceError> {
    let merge =
        from.is_dir() && !from.is_symlink() && lstat(dest)?.is_some_and(|m| m.file_type().is_dir());
    if !merge {
        return std::fs::rename(from, dest).map_err(WorkspaceError::io(format!(
            "cannot move into {}",
            dest.display()
        )));
    }
    for_each_child(from, dest, place)
}

/// Calls `step(child, dest/child's name)` for every entry of directory `from`.
fn for_each_child(
    from: &Path,
    dest: &Path,
    step: fn(&Path, &Path) -> Result<(), WorkspaceError>,
) -> Result<(), WorkspaceError> {
    let listing = || WorkspaceError::io(format!("cannot list {}", from.display()));
    for entry in std::fs::read_dir(from).map_err(listing())? {
        let entry = entry.map_err(listing())?;
        step(&entry.path(), &dest.join(entry.file_name()))?;
    }
    Ok(())
}

/// A guest tar extracted into a private staging directory beside its destination, not yet
/// in place: [`Staged::install`] moves it; dropping it removes everything.
#[derive(Debug)]
pub struct Staged {
    staging: tempfile::TempDir,
    pub extracted: Extracted,
}

impl Staged {
    /// Moves the staged tree into `dest` (see [`install`]).
    pub fn install(self, dest: &Path) -> Result<Extracted, WorkspaceError> {
        install(&self.staging.path().join("tree"), dest)?;
        Ok(self.extracted)
    }
}

/// Extracts a guest tar for directory `dest` (created, or merged into later) into a staging
/// directory beside it; nothing reaches `dest` until [`Staged::install`].
pub fn stage_for_dir(
    reader: impl Read,
    dest: &Path,
    rules: &Rules,
) -> Result<Staged, WorkspaceError> {
    if let Some(meta) = lstat(dest)?
        && !meta.is_dir()
    {
        return Err(conflict(
            dest,
            if meta.file_type().is_symlink() {
                "is a symlink (give the directory it points to)"
            } else {
                "exists and is not a directory"
            },
        ));
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(WorkspaceError::io(format!(
            "cannot create {}",
            parent.display()
        )))?;
    }
    let staging = staging_for(dest)?;
    let tree = staging.path().join("tree");
    let extracted = extract(reader, &tree, None, rules)?;
    Ok(Staged { staging, extracted })
}

/// Extracts a guest tar into `dest` (a directory: created, or merged into) with nothing
/// written unless all of it is accepted.
pub fn extract_to_dir(
    reader: impl Read,
    dest: &Path,
    rules: &Rules,
) -> Result<Extracted, WorkspaceError> {
    stage_for_dir(reader, dest, rules)?.install(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar as a guest could write it: entries (path, type, mode, body or link target),
    /// headers set by hand so nothing is normalised on the way.
    fn tar(entries: &[Spec]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, mode, body) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(*mode);
            header.set_mtime(1_700_000_000);
            {
                // Raw name bytes: the tar crate's setters refuse `..` and absolute paths.
                let gnu = header.as_gnu_mut().expect("gnu header");
                gnu.name = [0; 100];
                gnu.name[..path.len()].copy_from_slice(path.as_bytes());
            }
            if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
                header.set_size(0);
                let gnu = header.as_gnu_mut().expect("gnu header");
                gnu.linkname = [0; 100];
                gnu.linkname[..body.len()].copy_from_slice(body);
                header.set_cksum();
                builder.append(&header, std::io::empty()).expect("append");
            } else {
                header.set_size(body.len() as u64);
                header.set_cksum();
                builder.append(&header, *body).expect("append");
            }
        }
        builder.into_inner().expect("tar")
    }

    use tar::EntryType as T;

    /// One tar entry of a test: path, type, mode, body or link target.
    type Spec<'a> = (&'a str, tar::EntryType, u32, &'a [u8]);

    /// Every path under `root`, sorted, as `path kind mode`.
    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).expect("lstat");
                let rel = path
                    .strip_prefix(root)
                    .expect("inside")
                    .display()
                    .to_string();
                let kind = if meta.file_type().is_symlink() {
                    "l"
                } else if meta.is_dir() {
                    "d"
                } else {
                    "f"
                };
                out.push(format!("{rel} {kind} {:o}", meta.mode() & 0o7777));
                if meta.is_dir() {
                    walk(root, &path, out);
                }
            }
        }
        walk(root, root, &mut out);
        out.sort();
        out
    }

    fn run(entries: &[Spec]) -> (tempfile::TempDir, Result<Extracted, WorkspaceError>) {
        let base = tempfile::tempdir().expect("tempdir");
        let dest = base.path().join("out");
        let result = extract_to_dir(tar(entries).as_slice(), &dest, &Rules::strict());
        (base, result)
    }

    /// Nothing but `keep` exists in `base` after a refused tar.
    fn assert_nothing_written(base: &Path) {
        let left = listing(base);
        assert!(left.is_empty(), "partial output left: {left:?}");
    }

    #[test]
    fn plain_tree_is_written_with_masked_modes() {
        let (base, result) = run(&[
            ("a/", T::Directory, 0o777, b""),
            ("a/run.sh", T::Regular, 0o4777, b"#!/bin/sh\n"),
            ("a/data", T::Regular, 0o666, b"data"),
            ("a/link", T::Symlink, 0o777, b"data"),
            ("b/c/d", T::Regular, 0o2644, b"x"),
            ("up", T::Symlink, 0o777, b"a/../a/data"),
        ]);
        let result = result.err();
        // `a/../a/data`: `..` after a name is refused (lexical checks stay exact).
        assert!(
            matches!(result, Some(WorkspaceError::UnsafeEntry { .. })),
            "{result:?}"
        );
        assert_nothing_written(base.path());

        let (base, result) = run(&[
            ("a/", T::Directory, 0o777, b""),
            ("a/run.sh", T::Regular, 0o4777, b"#!/bin/sh\n"),
            ("a/data", T::Regular, 0o666, b"data"),
            ("a/link", T::Symlink, 0o777, b"data"),
            ("b/c/d", T::Regular, 0o2644, b"x"),
            ("b/c/up", T::Symlink, 0o777, b"../../a/data"),
        ]);
        let result = result.expect("accepted");
        assert_eq!(result.entries, 6);
        assert_eq!(
            listing(&base.path().join("out")),
            [
                "a d 755",
                "a/data f 644",
                "a/link l 777",
                "a/run.sh f 755",
                "b d 755",
                "b/c d 755",
                "b/c/d f 644",
                "b/c/up l 777",
            ]
        );
    }

    #[test]
    fn git_paths_are_refused_in_any_case_and_form() {
        for path in [
            ".git/config",
            ".GIT/config",
            "./.git/hooks/pre-commit",
            "sub/.Git/config",
            ".git",
        ] {
            let (base, result) = run(&[
                ("ok", T::Regular, 0o644, b"fine"),
                (
                    path,
                    T::Regular,
                    0o644,
                    b"[core]\n\tfsmonitor = touch /tmp/pwned\n",
                ),
            ]);
            assert!(
                matches!(result, Err(WorkspaceError::UnsafeEntry { .. })),
                "{path}: {result:?}"
            );
            assert_nothing_written(base.path());
        }
        // `a/../.git`: refused for the `..` already.
        let (base, result) = run(&[("a/../.git/config", T::Regular, 0o644, b"x")]);
        assert!(matches!(result, Err(WorkspaceError::UnsafeEntry { .. })));
        assert_nothing_written(base.path());
    }

    #[test]
    fn escapes_and_specials_are_refused() {
        let cases: &[&[Spec]] = &[
            &[("../evil", T::Regular, 0o644, b"x")],
            &[("/tmp/evil", T::Regular, 0o644, b"x")],
            &[("a/../../evil", T::Regular, 0o644, b"x")],
            &[("out", T::Symlink, 0o777, b"/etc")],
            &[("out", T::Symlink, 0o777, b"..")],
            &[("a/out", T::Symlink, 0o777, b"../../x")],
            &[("g", T::Symlink, 0o777, b".git/config")],
            &[
                ("l", T::Symlink, 0o777, b"sub"),
                ("l/file", T::Regular, 0o644, b"x"),
            ],
            &[
                ("f", T::Regular, 0o644, b"x"),
                ("f/g", T::Regular, 0o644, b"x"),
            ],
            &[
                ("f", T::Regular, 0o644, b"x"),
                ("f", T::Regular, 0o644, b"y"),
            ],
            &[("hard", T::Link, 0o644, b"/etc/shadow")],
            &[("dev", T::Char, 0o644, b"")],
            &[("fifo", T::Fifo, 0o644, b"")],
        ];
        for case in cases {
            let (base, result) = run(case);
            assert!(
                matches!(result, Err(WorkspaceError::UnsafeEntry { .. })),
                "{case:?}: {result:?}"
            );
            assert_nothing_written(base.path());
        }
    }

    #[test]
    fn a_huge_file_count_is_refused_and_leaves_nothing() {
        let names: Vec<String> = (0..50).map(|i| format!("d/f{i}")).collect();
        let entries: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), T::Regular, 0o644, &b"x"[..]))
            .collect();
        let base = tempfile::tempdir().expect("tempdir");
        let dest = base.path().join("out");
        let rules = Rules {
            max_entries: 49,
            ..Rules::strict()
        };
        let result = extract_to_dir(tar(&entries).as_slice(), &dest, &rules);
        assert!(
            matches!(result, Err(WorkspaceError::Refused(_))),
            "{result:?}"
        );
        assert_nothing_written(base.path());
        let rules = Rules {
            max_bytes: 49,
            ..Rules::strict()
        };
        let result = extract_to_dir(tar(&entries).as_slice(), &dest, &rules);
        assert!(
            matches!(result, Err(WorkspaceError::Refused(_))),
            "{result:?}"
        );
        assert_nothing_written(base.path());
    }

    #[test]
    fn a_truncated_tar_leaves_nothing() {
        let mut bytes = tar(&[("a", T::Regular, 0o644, &[7u8; 4096][..])]);
        bytes.truncate(1024);
        let base = tempfile::tempdir().expect("tempdir");
        let result = extract_to_dir(bytes.as_slice(), &base.path().join("out"), &Rules::strict());
        assert!(result.is_err());
        assert_nothing_written(base.path());
    }

    #[test]
    fn existing_destination_symlinks_are_never_written_through() {
        let base = tempfile::tempdir().expect("tempdir");
        let outside = base.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let dest = base.path().join("out");
        std::fs::create_dir(&dest).expect("mkdir");
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::symlink(&outside, dest.join("link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("f"), dest.join("filelink")).expect("symlink");
        let bytes = tar(&[("link/planted", T::Regular, 0o644, b"x")]);
        let result = extract_to_dir(bytes.as_slice(), &dest, &Rules::strict());
        assert!(
            matches!(result, Err(WorkspaceError::Conflict { .. })),
            "{result:?}"
        );
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
        // A file over an existing symlink replaces the link, not its target.
        let bytes = tar(&[("filelink", T::Regular, 0o644, b"x")]);
        extract_to_dir(bytes.as_slice(), &dest, &Rules::strict()).expect("accepted");
        assert!(!outside.join("f").exists());
        assert!(
            !std::fs::symlink_metadata(dest.join("filelink"))
                .expect("lstat")
                .is_symlink()
        );
        // The existing directory kept its mode; no staging directory is left.
        assert_eq!(
            std::fs::metadata(&dest).expect("stat").mode() & 0o777,
            0o700
        );
        let names: Vec<_> = std::fs::read_dir(base.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A destination that is itself a symlink is refused.
        let bytes = tar(&[("x", T::Regular, 0o644, b"x")]);
        let result = extract_to_dir(bytes.as_slice(), &dest.join("link"), &Rules::strict());
        assert!(
            matches!(result, Err(WorkspaceError::Conflict { .. })),
            "{result:?}"
        );
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
    }

    #[test]
    fn lenient_rules_skip_and_report() {
        let base = tempfile::tempdir().expect("tempdir");
        let staging = base.path().join("s");
        std::fs::create_dir(&staging).expect("mkdir");
        let bytes = tar(&[
            ("item/", T::Directory, 0o755, b""),
            ("item/.git/config", T::Regular, 0o644, b"x"),
            ("item/out", T::Symlink, 0o777, b"/etc/passwd"),
            ("item/fifo", T::Fifo, 0o644, b""),
            ("item/ok", T::Regular, 0o755, b"x"),
        ]);
        let tree = staging.join("tree");
        let result = extract(
            bytes.as_slice(),
            &tree,
            Some(OsStr::new("item")),
            &Rules::lenient(),
        )
        .expect("accepted");
        assert_eq!(result.skipped_count, 3, "{result:?}");
        assert_eq!(result.root, Some(NodeKind::Dir));
        assert_eq!(listing(&tree), ["ok f 755"]);
        // Outside the stripped component: refused even when lenient.
        let bytes = tar(&[("other/x", T::Regular, 0o644, b"x")]);
        let result = extract(
            bytes.as_slice(),
            &staging.join("tree2"),
            Some(OsStr::new("item")),
            &Rules::lenient(),
        );
        assert!(matches!(result, Err(WorkspaceError::UnsafeEntry { .. })));
    }

    /// A raw entry: a header of `kind` claiming `size`, then `data` (padded).
    fn raw(
        builder: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        size: u64,
        data: &[u8],
    ) {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_path(name).expect("name");
        header.set_size(size);
        header.set_cksum();
        builder.append(&header, data).expect("append");
    }

    /// A PAX record `key=value` with its length prefix.
    fn pax(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    fn extract_bytes(
        bytes: &[u8],
        rules: &Rules,
    ) -> (tempfile::TempDir, Result<Extracted, WorkspaceError>) {
        let base = tempfile::tempdir().expect("tempdir");
        let result = extract_to_dir(bytes, &base.path().join("out"), rules);
        (base, result)
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_they_are_read() {
        let big = vec![b'a'; 1 << 20];
        for kind in [T::GNULongName, T::GNULongLink, T::XHeader, T::XGlobalHeader] {
            let mut builder = tar::Builder::new(Vec::new());
            raw(&mut builder, kind, "././@LongLink", big.len() as u64, &big);
            raw(&mut builder, T::Regular, "f", 1, b"x");
            let (base, result) =
                extract_bytes(&builder.into_inner().expect("tar"), &Rules::strict());
            assert!(
                matches!(result, Err(WorkspaceError::Refused(_))),
                "{kind:?}: {result:?}"
            );
            assert_nothing_written(base.path());
        }
        // Claimed huge but cut short: refused on the claim alone (nothing is buffered).
        let mut builder = tar::Builder::new(Vec::new());
        raw(&mut builder, T::GNULongName, "././@LongLink", 1 << 40, b"");
        let (base, result) = extract_bytes(&builder.into_inner().expect("tar"), &Rules::strict());
        assert!(
            matches!(result, Err(WorkspaceError::Refused(_))),
            "{result:?}"
        );
        assert_nothing_written(base.path());
    }

    #[test]
    fn a_pax_size_counts_toward_the_byte_cap() {
        // Header size 0, PAX size=1 MiB, 1 MiB of data: the tar crate copies 1 MiB.
        let rules = Rules {
            max_bytes: 1000,
            ..Rules::strict()
        };
        let tar_with = |size: usize| {
            let mut builder = tar::Builder::new(Vec::new());
            let records = pax("size", &size.to_string());
            raw(
                &mut builder,
                T::XHeader,
                "pax",
                records.len() as u64,
                &records,
            );
            raw(&mut builder, T::Regular, "f", 0, &vec![b'z'; size]);
            raw(&mut builder, T::Regular, "g", 2, b"ok");
            builder.into_inner().expect("tar")
        };
        let (base, result) = extract_bytes(&tar_with(1 << 20), &rules);
        assert!(
            matches!(result, Err(WorkspaceError::Refused(_))),
            "{result:?}"
        );
        assert_nothing_written(base.path());
        // Under the cap the PAX size is followed exactly: the next header is found.
        let (base, result) = extract_bytes(&tar_with(700), &rules);
        let result = result.expect("accepted");
        assert_eq!(result.bytes, 702);
        assert_eq!(
            std::fs::read(base.path().join("out/f")).expect("f").len(),
            700
        );
        assert_eq!(std::fs::read(base.path().join("out/g")).expect("g"), b"ok");
    }

    #[test]
    fn deep_and_long_paths_are_bounded() {
        // Directories a path creates count as entries.
        let names: Vec<String> = (0..10)
            .map(|i| format!("{i}/a/b/c/d/e/f/g/h/i/file"))
            .collect();
        let entries: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), T::Regular, 0o644, &b"x"[..]))
            .collect();
        let rules = Rules {
            max_entries: 50,
            ..Rules::strict()
        };
        let (base, result) = extract_bytes(&tar(&entries), &rules);
        assert!(
            matches!(result, Err(WorkspaceError::Refused(_))),
            "{result:?}"
        );
        assert_nothing_written(base.path());
        // Too deep, too long (a GNU long name under the extension cap), a name too long.
        for path in [
            "d/".repeat(MAX_DEPTH) + "f",
            format!("{}/f", "n".repeat(200)).repeat(25),
            "n".repeat(NAME_MAX + 1),
        ] {
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(T::Regular);
            header.set_mode(0o644);
            header.set_size(1);
            builder
                .append_data(&mut header, &path, &b"x"[..])
                .expect("append");
            let (base, result) =
                extract_bytes(&builder.into_inner().expect("tar"), &Rules::strict());
            assert!(
                matches!(result, Err(WorkspaceError::UnsafeEntry { .. })),
                "{}: {result:?}",
                path.len()
            );
            assert_nothing_written(base.path());
        }
    }

    /// Real tars (GNU long names, PAX records) pass the guard intact.
    #[test]
    fn gnu_and_pax_tars_from_tar_are_read_whole() {
        let src = tempfile::tempdir().expect("tempdir");
        let long = format!("{}/{}", "a".repeat(150), "b".repeat(150));
        std::fs::create_dir_all(src.path().join("t").join(&long)).expect("mkdir");
        std::fs::write(
            src.path().join("t").join(&long).join("f"),
            vec![9u8; 70_000],
        )
        .expect("write");
        std::os::unix::fs::symlink(
            format!("{}/f", "b".repeat(150)),
            src.path().join("t").join("a".repeat(150)).join("l"),
        )
        .expect("ln");
        std::fs::write(src.path().join("t/small"), "x").expect("write");
        for format in ["gnu", "pax"] {
            let out = std::process::Command::new("tar")
                .args(["-c", "-f", "-", &format!("--format={format}"), "-C"])
                .arg(src.path().join("t"))
                .arg(".")
                .output();
            let Ok(out) = out.map_err(|e| {
                banger_shared::skip::report("extract of tar archives", &format!("no tar here: {e}"))
            }) else {
                return;
            };
            assert!(out.status.success(), "{format}");
            let (base, result) = extract_bytes(&out.stdout, &Rules::strict());
            let result = result.unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(result.bytes, 70_001, "{format}");
            let tree = base.path().join("out");
            assert_eq!(
                std::fs::read(tree.join(&long).join("f")).expect("f").len(),
                70_000
            );
            assert_eq!(
                std::fs::read(tree.join("a".repeat(150)).join("l"))
                    .expect("via link")
                    .len(),
                70_000
            );
            assert_eq!(std::fs::read(tree.join("small")).expect("small"), b"x");
        }
    }

    #[test]
    fn a_symlink_as_the_copied_object_is_refused() {
        // `vm cp vm:out.txt ~/`: out.txt -> .ssh/authorized_keys would resolve in ~.
        let base = tempfile::tempdir().expect("tempdir");
        let bytes = tar(&[("out.txt", T::Symlink, 0o777, b".ssh/authorized_keys")]);
        let result = extract(
            bytes.as_slice(),
            &base.path().join("tree"),
            Some(OsStr::new("out.txt")),
            &Rules::lenient(),
        );
        assert!(
            matches!(result, Err(WorkspaceError::UnsafeEntry { .. })),
            "{result:?}"
        );
        assert_nothing_written(base.path());
    }

    #[test]
    fn a_planted_bare_repository_is_refused() {
        let config: &[u8] = b"[core]\n\tpager = touch /tmp/pwned; cat\n";
        let cases: &[&[Spec]] = &[
            &[
                ("docs/HEAD", T::Regular, 0o644, b"ref: refs/heads/main\n"),
                ("docs/config", T::Regular, 0o644, config),
                ("docs/objects/", T::Directory, 0o755, b""),
                ("docs/refs/", T::Directory, 0o755, b""),
            ],
            &[
                ("head", T::Regular, 0o644, b"ref: refs/heads/main\n"),
                ("config", T::Regular, 0o644, config),
                ("Objects/x", T::Regular, 0o644, b""),
                ("REFS/y", T::Regular, 0o644, b""),
            ],
            &[
                ("a/b/HEAD", T::Regular, 0o644, b"ref: refs/heads/main\n"),
                ("a/b/commondir", T::Regular, 0o644, b"../c\n"),
            ],
        ];
        for case in cases {
            let (base, result) = run(case);
            assert!(
                matches!(result, Err(WorkspaceError::UnsafeEntry { .. })),
                "{case:?}: {result:?}"
            );
            assert_nothing_written(base.path());
        }
        // Completed by what the destination already holds: refused, the destination as it was.
        let base = tempfile::tempdir().expect("tempdir");
        let dest = base.path().join("out");
        std::fs::create_dir_all(dest.join("docs/objects")).expect("mkdir");
        std::fs::write(dest.join("docs/HEAD"), "x").expect("write");
        let bytes = tar(&[("docs/refs/heads/main", T::Regular, 0o644, b"0")]);
        let result = extract_to_dir(bytes.as_slice(), &dest, &Rules::strict());
        assert!(
            matches!(result, Err(WorkspaceError::UnsafeEntry { .. })),
            "{result:?}"
        );
        assert!(!dest.join("docs/refs").exists());
        assert_eq!(std::fs::read_dir(base.path()).expect("ls").count(), 1);
        // Two of the three names are fine.
        let (_base, result) = run(&[
            ("docs/HEAD", T::Regular, 0o644, b"x"),
            ("docs/refs/x", T::Regular, 0o644, b"x"),
        ]);
        result.expect("accepted");
    }

    #[test]
    fn link_rule() {
        assert!(link_stays_inside(0, b"a/b").is_ok());
        assert!(link_stays_inside(1, b"../a").is_ok());
        assert!(link_stays_inside(1, b"./../a/./b").is_ok());
        assert!(link_stays_inside(0, b"../a").is_err());
        assert!(link_stays_inside(2, b"a/../..").is_err());
        assert!(link_stays_inside(3, b"/x").is_err());
        assert!(link_stays_inside(3, b"").is_err());
        assert!(link_stays_inside(3, b"x/.GiT").is_err());
    }
}
