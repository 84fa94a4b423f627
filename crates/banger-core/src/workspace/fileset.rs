//! The workspace's file set and manifest. A scan lists what a prepare would send: for a git
//! repo the files `git ls-files -co --exclude-standard` names (tracked + untracked, not
//! ignored) plus everything under `.git`; with `--no-git` the whole tree. Nothing is
//! followed: symlinks are entries of their own, paths below a symlinked directory are
//! refused, and so are absolute paths and `..`. A [`Plan`] compares a scan with the manifest
//! of the last prepare by size, mode and mtime (content is hashed only for what changed).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::WorkspaceError;

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Symlink,
    Dir,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Symlink => "symlink",
            Self::Dir => "dir",
        }
    }

    pub fn from_wire(text: &str) -> Option<Self> {
        [Self::File, Self::Symlink, Self::Dir]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// One path of the workspace as it was sent (manifest) or is now (scan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the workspace root, `/`-separated, UTF-8.
    pub path: String,
    pub kind: Kind,
    /// Bytes of a file; 0 otherwise.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// sha256 (hex) of a file's content or a symlink's target; empty for directories and for
    /// scanned files not hashed yet.
    pub hash: String,
}

impl Entry {
    /// Whether `self` (scanned now) looks unchanged from `old` without reading content.
    fn same_stat(&self, old: &Entry) -> bool {
        self.kind == old.kind
            && self.mode == old.mode
            && match self.kind {
                Kind::Dir => true,
                Kind::Symlink => self.hash == old.hash,
                Kind::File => self.size == old.size && self.mtime_ns == old.mtime_ns,
            }
    }
}

/// Manifest of a prepared workspace, by path.
pub type Manifest = BTreeMap<String, Entry>;

/// The workspace as it is now on the host.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub entries: Manifest,
    /// Paths git reports as untracked (`??`), a subset of `entries`: the guest hides them
    /// from its `git status` (see [`exclude_patterns`]).
    pub untracked: Vec<String>,
}

/// Checks that `path` (from git or the walk) stays inside the root: relative, no `..`, no
/// `.`; returns it as a `/`-separated string.
pub fn safe_relative(path: &Path) -> Result<String, WorkspaceError> {
    let text = path
        .to_str()
        .ok_or_else(|| WorkspaceError::NotUtf8(path.display().to_string()))?;
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(
                part.to_str()
                    .ok_or_else(|| WorkspaceError::NotUtf8(path.display().to_string()))?,
            ),
            _ => return Err(WorkspaceError::UnsafePath(text.to_owned())),
        }
    }
    if parts.is_empty() {
        return Err(WorkspaceError::UnsafePath(text.to_owned()));
    }
    Ok(parts.join("/"))
}

/// Runs git in `root` and returns its stdout.
pub fn git(root: &Path, args: &[&str]) -> Result<Vec<u8>, WorkspaceError> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(Stdio::null())
        .output()
        .map_err(WorkspaceError::io("cannot run git"))?;
    if !output.status.success() {
        return Err(WorkspaceError::Git {
            args: args.join(" "),
            stderr: crate::cause::of_failure("git", &output.status, &output.stderr),
        });
    }
    Ok(output.stdout)
}

/// The commit HEAD names, if any (an empty repo has none).
pub fn head(root: &Path) -> Option<String> {
    git(root, &["rev-parse", "-q", "--verify", "HEAD"])
        .ok()
        .map(|out| String::from_utf8_lossy(&out).trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Resolves the directory to prepare from: canonical, a directory, and for `git` the top level
/// of its repository with a real `.git` directory.
pub fn resolve_root(path: &Path, git_mode: bool) -> Result<std::path::PathBuf, WorkspaceError> {
    let shown = path.display().to_string();
    let root = std::fs::canonicalize(path)
        .map_err(WorkspaceError::io(format!("cannot resolve {shown}")))?;
    if !root.is_dir() {
        return Err(WorkspaceError::NotADirectory(shown));
    }
    if !git_mode {
        return Ok(root);
    }
    let top = git(&root, &["rev-parse", "--show-toplevel"])
        .map_err(|_| WorkspaceError::NotGit(root.display().to_string()))?;
    let top = String::from_utf8_lossy(&top).trim().to_owned();
    let top_canon = std::fs::canonicalize(&top).unwrap_or_else(|_| top.clone().into());
    if top_canon != root {
        return Err(WorkspaceError::NotTopLevel {
            path: root.display().to_string(),
            top,
        });
    }
    let dot_git = std::fs::symlink_metadata(root.join(".git")).map_err(WorkspaceError::io(
        format!("cannot stat {}/.git", root.display()),
    ))?;
    if !dot_git.is_dir() {
        return Err(WorkspaceError::GitFile(root.display().to_string()));
    }
    Ok(root)
}

/// Lists the workspace under `root` (already resolved). Symlinks are never followed.
pub fn scan(root: &Path, git_mode: bool) -> Result<Scan, WorkspaceError> {
    let mut scan = Scan::default();
    let mut real_dirs = HashSet::new();
    if git_mode {
        // `-t` tags each path: `H ` tracked, `? ` untracked.
        let listed = git(root, &["ls-files", "-z", "-co", "-t", "--exclude-standard"])?;
        for tagged in listed.split(|b| *b == 0).filter(|s| !s.is_empty()) {
            let (tag, raw) = tagged.split_at(tagged.len().min(2));
            let rel = Path::new(std::ffi::OsStr::from_bytes(raw));
            let rel_text = safe_relative(rel)?;
            check_ancestors(root, &rel_text, &mut real_dirs)?;
            let Some(entry) = stat_entry(root, &rel_text)? else {
                continue; // deleted in the worktree: absent on both sides
            };
            // A directory here is a gitlink or a nested repo: not part of this file set.
            if entry.kind != Kind::Dir {
                if tag == b"? " {
                    scan.untracked.push(rel_text.clone());
                }
                scan.entries.insert(rel_text, entry);
            }
        }
        walk(root, ".git", &mut scan)?;
    } else {
        walk_children(root, "", &mut scan)?;
    }
    Ok(scan)
}

/// Lists `name` (a file, symlink or directory directly in `parent`) and everything below it,
/// keyed `name`, `name/...`; nothing is followed. For `vm cp` to the guest.
pub fn scan_one(parent: &Path, name: &str) -> Result<Scan, WorkspaceError> {
    let mut scan = Scan::default();
    walk(parent, name, &mut scan)?;
    if scan.entries.is_empty() {
        return Err(WorkspaceError::Io {
            context: format!("cannot copy {}", parent.join(name).display()),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a file, directory or symlink",
            ),
        });
    }
    Ok(scan)
}

/// Whether `path` (workspace-relative) is `.git` or below it.
pub fn in_git_dir(path: &str) -> bool {
    path == ".git" || path.starts_with(".git/")
}

/// Refuses `rel` when one of its parent directories is a symlink (or not a directory).
fn check_ancestors(
    root: &Path,
    rel: &str,
    real_dirs: &mut HashSet<String>,
) -> Result<(), WorkspaceError> {
    let mut prefix = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if real_dirs.contains(&prefix) {
            continue;
        }
        match std::fs::symlink_metadata(root.join(&prefix)) {
            Ok(meta) if meta.is_dir() => {
                real_dirs.insert(prefix.clone());
            }
            Ok(_) => return Err(WorkspaceError::UnsafePath(rel.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(WorkspaceError::Io {
                    context: format!("cannot stat {prefix}"),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// The entry for `rel` from `lstat`, or `None` when it does not exist or is not a file,
/// symlink or directory. Symlinks carry the hash of their target text.
fn stat_entry(root: &Path, rel: &str) -> Result<Option<Entry>, WorkspaceError> {
    let full = root.join(rel);
    let meta = match std::fs::symlink_metadata(&full) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(WorkspaceError::Io {
                context: format!("cannot stat {rel}"),
                source: e,
            });
        }
    };
    let file_type = meta.file_type();
    let (kind, hash) = if file_type.is_symlink() {
        let target = std::fs::read_link(&full)
            .map_err(WorkspaceError::io(format!("cannot read link {rel}")))?;
        (
            Kind::Symlink,
            hex(&Sha256::digest(target.as_os_str().as_bytes())),
        )
    } else if file_type.is_file() {
        (Kind::File, String::new())
    } else if file_type.is_dir() {
        (Kind::Dir, String::new())
    } else {
        return Ok(None);
    };
    Ok(Some(Entry {
        path: rel.to_owned(),
        kind,
        size: if kind == Kind::File { meta.len() } else { 0 },
        mode: meta.mode() & 0o7777,
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        hash,
    }))
}

/// Adds `rel` and, for a real directory, everything below it.
fn walk(root: &Path, rel: &str, scan: &mut Scan) -> Result<(), WorkspaceError> {
    let Some(entry) = stat_entry(root, rel)? else {
        return Ok(());
    };
    let is_dir = entry.kind == Kind::Dir;
    scan.entries.insert(rel.to_owned(), entry);
    if is_dir {
        walk_children(root, rel, scan)?;
    }
    Ok(())
}

fn walk_children(root: &Path, rel: &str, scan: &mut Scan) -> Result<(), WorkspaceError> {
    let dir = root.join(rel);
    let entries =
        std::fs::read_dir(&dir).map_err(WorkspaceError::io(format!("cannot list {rel}")))?;
    for entry in entries {
        let entry = entry.map_err(WorkspaceError::io(format!("cannot list {rel}")))?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| WorkspaceError::NotUtf8(entry.path().display().to_string()))?;
        let child = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        walk(root, &child, scan)?;
    }
    Ok(())
}

/// sha256 (hex) of a file's content, read without following a symlink.
pub fn hash_file(path: &Path) -> Result<String, WorkspaceError> {
    let mut file = open_nofollow(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(WorkspaceError::io(format!(
            "cannot read {}",
            path.display()
        )))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Opens a regular file for reading, refusing a symlink at the last component.
pub fn open_nofollow(path: &Path) -> Result<std::fs::File, WorkspaceError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(WorkspaceError::io(format!(
            "cannot open {}",
            path.display()
        )))
}

/// The guest's exclude file for `untracked` paths: one anchored gitignore pattern per path,
/// special characters escaped, so the guest's `git status` starts clean and shows what changed
/// there since prepare. A name with a newline cannot be written as a pattern and stays visible.
pub fn exclude_patterns(untracked: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for path in untracked.iter().filter(|p| !p.contains('\n')) {
        out.push(b'/');
        let trailing_spaces = path.len() - path.trim_end_matches(' ').len();
        let body = &path[..path.len() - trailing_spaces];
        for byte in body.bytes() {
            if matches!(byte, b'\\' | b'*' | b'?' | b'[') {
                out.push(b'\\');
            }
            out.push(byte);
        }
        // Trailing spaces are dropped from patterns unless escaped.
        for _ in 0..trailing_spaces {
            out.extend_from_slice(b"\\ ");
        }
        out.push(b'\n');
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a prepare does: the paths to send, the paths to delete in the guest first, and the
/// manifest after it (hashes of sent files are filled in while sending).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub send: Vec<String>,
    pub delete: Vec<String>,
    pub next: Manifest,
    /// The scan's untracked paths.
    pub untracked: Vec<String>,
}

impl Plan {
    /// Content bytes of the files to send (as scanned).
    pub fn send_bytes(&self) -> u64 {
        self.send
            .iter()
            .filter_map(|p| self.next.get(p))
            .map(|e| e.size)
            .sum()
    }
}

/// Differences between a scan and a manifest, by count and a few example paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub modified: Vec<String>,
    pub removed: Vec<String>,
}

impl Diff {
    pub fn total(&self) -> usize {
        self.added.len() + self.modified.len() + self.removed.len()
    }
}

/// Plans a prepare of `scan` over a guest holding `old`. Files whose size, mode and mtime are
/// unchanged are trusted (like git's index); everything else is sent. Paths that vanished,
/// or changed kind, are deleted in the guest before the tar is extracted.
pub fn plan(old: &Manifest, scan: Scan) -> Plan {
    let mut plan = Plan {
        untracked: scan.untracked,
        ..Plan::default()
    };
    for (path, entry) in &scan.entries {
        match old.get(path) {
            Some(before) if entry.same_stat(before) => {
                let mut kept = entry.clone();
                kept.hash.clone_from(&before.hash);
                plan.next.insert(path.clone(), kept);
                continue;
            }
            Some(before) if before.kind != entry.kind => plan.delete.push(path.clone()),
            _ => {}
        }
        plan.send.push(path.clone());
        plan.next.insert(path.clone(), entry.clone());
    }
    for path in old.keys() {
        if !scan.entries.contains_key(path) {
            plan.delete.push(path.clone());
        }
    }
    plan.delete.sort();
    plan
}

/// How the host now differs from `old`, hashing only files whose stat changed so a touched
/// but identical file is not reported. `.git` is left out: HEAD is compared on its own.
pub fn host_diff(root: &Path, old: &Manifest, scan: &Scan) -> Result<Diff, WorkspaceError> {
    let mut diff = Diff::default();
    for (path, entry) in scan.entries.iter().filter(|(p, _)| !in_git_dir(p)) {
        match old.get(path) {
            None => diff.added.push(path.clone()),
            Some(before) if entry.same_stat(before) => {}
            Some(before) => {
                let content_same = entry.kind == before.kind
                    && entry.mode == before.mode
                    && match entry.kind {
                        Kind::File => hash_file(&root.join(path))? == before.hash,
                        _ => entry.hash == before.hash,
                    };
                if !content_same {
                    diff.modified.push(path.clone());
                }
            }
        }
    }
    for path in old.keys().filter(|p| !in_git_dir(p)) {
        if !scan.entries.contains_key(path) {
            diff.removed.push(path.clone());
        }
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sh(dir: &Path, script: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    }

    fn fixture() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), "secret").unwrap();
        sh(
            &repo,
            "git init -q . && echo ignored.log > .gitignore && echo hi > tracked.txt \
             && mkdir -p sub && printf '' > sub/empty && echo x > 'with space.txt' \
             && echo u > 'ünïcode.txt' && printf '#!/bin/sh\\n' > run.sh && chmod +x run.sh \
             && ln -s tracked.txt link && ln -s ../outside escape && ln -s /etc abs \
             && git add -A && git commit -qm init && echo new > untracked.txt \
             && echo no > ignored.log",
        );
        (dir, repo)
    }

    #[test]
    fn exclude_patterns_hide_exactly_the_untracked_files_from_git_status() {
        let (dir, repo) = fixture();
        let odd = [
            "star*.txt",
            "q?.txt",
            "[br].txt",
            "back\\slash",
            "#hash",
            "!bang",
            "trailing ",
            "sub/nested untracked",
        ];
        for name in odd {
            std::fs::write(repo.join(name), name).unwrap();
        }
        // A sibling the patterns must not hide: `star*.txt` would match it unescaped.
        let root = resolve_root(&repo, true).unwrap();
        let mut scanned = scan(&root, true).unwrap();
        scanned.untracked.sort();
        let mut want: Vec<String> = odd.iter().map(|s| s.to_string()).collect();
        want.push("untracked.txt".into());
        want.sort();
        assert_eq!(scanned.untracked, want);
        let excludes = dir.path().join("excludes");
        std::fs::write(&excludes, exclude_patterns(&scanned.untracked)).unwrap();
        std::fs::write(repo.join("starry.txt"), "later").unwrap();
        let status = git(
            &repo,
            &[
                "-c",
                &format!("core.excludesFile={}", excludes.display()),
                "status",
                "--porcelain",
            ],
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&status), "?? starry.txt\n");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", ".", ""] {
            assert!(safe_relative(Path::new(bad)).is_err(), "{bad}");
        }
        assert_eq!(safe_relative(Path::new("a/b c/ü")).unwrap(), "a/b c/ü");
    }

    #[test]
    fn scan_lists_tracked_untracked_and_git_never_ignored_or_outside() {
        let (_dir, repo) = fixture();
        let root = resolve_root(&repo, true).unwrap();
        let scan = scan(&root, true).unwrap();
        let paths: Vec<&str> = scan.entries.keys().map(String::as_str).collect();
        for want in [
            ".gitignore",
            "tracked.txt",
            "sub/empty",
            "with space.txt",
            "ünïcode.txt",
            "run.sh",
            "link",
            "escape",
            "abs",
            "untracked.txt",
            ".git",
            ".git/HEAD",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        assert!(!paths.contains(&"ignored.log"));
        assert!(!paths.iter().any(|p| p.contains("secret")));
        assert_eq!(scan.entries["escape"].kind, Kind::Symlink);
        assert_eq!(scan.entries["run.sh"].mode & 0o111, 0o111);
        // A plain walk does not descend through the symlinked directory either.
        let plain = super::scan(&root, false).unwrap();
        assert!(plain.entries.contains_key("escape"));
        assert!(!plain.entries.keys().any(|p| p.contains("secret")));
    }

    #[test]
    fn resolve_refuses_non_git_and_subdirectories() {
        let (dir, repo) = fixture();
        assert!(matches!(
            resolve_root(&dir.path().join("outside"), true),
            Err(WorkspaceError::NotGit(_))
        ));
        assert!(matches!(
            resolve_root(&repo.join("sub"), true),
            Err(WorkspaceError::NotTopLevel { .. })
        ));
        // `..` in the argument is resolved before the checks.
        let tricky = repo.join("sub/../../outside");
        assert!(resolve_root(&tricky, true).is_err());
        assert!(resolve_root(&repo.join("sub/.."), true).is_ok());
    }

    #[test]
    fn plan_sends_only_changes_and_deletes_removals() {
        let (_dir, repo) = fixture();
        let first = plan(&Manifest::new(), scan(&repo, true).unwrap());
        assert!(first.delete.is_empty());
        assert_eq!(first.send.len(), first.next.len());
        let manifest = first.next;
        // Nothing changed: nothing to send.
        let again = plan(&manifest, scan(&repo, true).unwrap());
        assert!(
            again.send.is_empty() && again.delete.is_empty(),
            "{again:?}"
        );
        // One edit, one deletion, one addition, one kind change.
        std::fs::write(repo.join("tracked.txt"), "changed\n").unwrap();
        std::fs::remove_file(repo.join("with space.txt")).unwrap();
        std::fs::write(repo.join("added.txt"), "a").unwrap();
        std::fs::remove_file(repo.join("link")).unwrap();
        std::fs::write(repo.join("link"), "now a file").unwrap();
        let next = scan(&repo, true).unwrap();
        let diff = host_diff(&repo, &manifest, &next).unwrap();
        assert_eq!(diff.added, ["added.txt"]);
        assert_eq!(diff.modified, ["link", "tracked.txt"]);
        assert_eq!(diff.removed, ["with space.txt"]);
        let step = plan(&manifest, next);
        let sent: Vec<&str> = step
            .send
            .iter()
            .map(String::as_str)
            .filter(|p| !p.starts_with(".git"))
            .collect();
        assert_eq!(sent, ["added.txt", "link", "tracked.txt"]);
        assert_eq!(step.delete, ["link", "with space.txt"]);
    }

    #[test]
    fn a_touched_identical_file_is_not_reported() {
        let (_dir, repo) = fixture();
        let mut manifest = plan(&Manifest::new(), scan(&repo, true).unwrap()).next;
        let entry = manifest.get_mut("tracked.txt").unwrap();
        entry.hash = hash_file(&repo.join("tracked.txt")).unwrap();
        entry.mtime_ns -= 5_000_000_000;
        let diff = host_diff(&repo, &manifest, &scan(&repo, true).unwrap()).unwrap();
        assert_eq!(diff.total(), 0, "{diff:?}");
    }
}
