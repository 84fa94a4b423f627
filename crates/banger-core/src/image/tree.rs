//! A file tree held as an index (path → metadata and where its bytes are), never as files on
//! the host until it is judged whole. Used for the layers of container images (`image build
//! --from`), work-seeds pulled from a registry, and work-seeds read from a host directory.
//!
//! Layers are hostile input. [`Tree::apply_layer`] applies one tar on top of what is there,
//! exactly as the OCI image spec's changeset rules say: in [`LayerMode::Oci`] a `.wh.NAME`
//! entry removes `NAME` (and what is below it) of the lower layers, a `.wh..wh..opq` entry
//! removes every lower-layer child of its directory (the directory stays), both only against
//! lower layers (removals happen before the layer's additions), and whiteout entries never
//! appear in the result. Every entry is judged before it enters the index:
//! - absolute paths and `..` are refused (a path is its normal components);
//! - a path below a symlink or a file of the tree is refused (nothing is ever written through
//!   a symlink); missing parent directories are implied (0755, root's);
//! - a hard link must name a regular file already in the tree (lower layers or earlier in
//!   the same layer): it becomes the same file, never a path outside;
//! - devices are skipped (the guest's /dev is a devtmpfs); other kinds are refused;
//! - at most [`MAX_ENTRIES`] entries and [`MAX_BYTES`] content bytes; paths of at most
//!   [`PATH_MAX`] bytes, [`NAME_MAX`] per component, [`MAX_DEPTH`] deep; extension headers
//!   are bounded before the tar crate reads them ([`TarGuard`]).
//!
//! A judged tree is written out as one canonical tar ([`Tree::write_tar`]: sorted, parents
//! first, hard links as links to the first path, fixed header fields, so the same tree gives
//! the same bytes) or made into a directory ([`Tree::materialize`], for work-seeds: regular
//! files, directories, symlinks and hard links only; the owner's bits always allow the
//! daemon to read and remove them, setuid, setgid and sticky bits are dropped).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::workspace::tar_guard::TarGuard;

/// Entries of a tree at most.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// Content bytes of a tree at most.
pub const MAX_BYTES: u64 = 64 << 30;
/// Bytes of a path or link target at most (Linux `PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// Bytes of one path component at most (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Components of a path at most.
pub const MAX_DEPTH: usize = 256;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Why a tree could not be read, judged or written.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// An entry the rules refuse.
    #[error("{source_name}: {path}: {why}")]
    Refused {
        source_name: String,
        path: String,
        why: String,
    },
    /// Too many entries or bytes.
    #[error("{source_name}: {why}")]
    TooLarge { source_name: String, why: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TreeError {
    let context = context.into();
    move |source| TreeError::Io { context, source }
}

/// How a layer's names are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMode {
    /// An OCI image layer: whiteouts and opaque directories apply.
    Oci,
    /// A plain tar (a work-seed): every name is literal.
    Plain,
}

/// What an index entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    /// `size` bytes at `offset` of source `source`; `link` groups hard-linked paths (0: none).
    File {
        source: usize,
        offset: u64,
        size: u64,
        link: u64,
    },
    Symlink(Vec<u8>),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    node: Node,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl Entry {
    fn implied_dir() -> Self {
        Self {
            node: Node::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }
}

/// A judged file tree; see the module doc.
#[derive(Debug, Default)]
pub struct Tree {
    /// Relative paths (components joined by `/`) in byte order: a parent sorts before its
    /// children.
    entries: BTreeMap<Vec<u8>, Entry>,
    /// Files holding the content: uncompressed layer tars, or host files.
    sources: Vec<PathBuf>,
    bytes: u64,
    next_link: u64,
    /// Device entries skipped.
    pub skipped_devices: u64,
}

/// One entry of a layer, read before any is applied.
struct Pending {
    path: Vec<u8>,
    kind: PendingKind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

enum PendingKind {
    Node(Node),
    HardLink(Vec<u8>),
    Whiteout,
    Opaque,
}

/// The normal components of `raw` joined by `/`: `.` and empty components dropped; absolute
/// paths, `..` and over-long names refused.
fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if raw.len() > PATH_MAX {
        return Err(format!("path longer than {PATH_MAX} bytes"));
    }
    if raw.contains(&0) {
        return Err("NUL in path".into());
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut depth = 0;
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("`..` in path".into()),
            part if part.len() > NAME_MAX => {
                return Err(format!("a name longer than {NAME_MAX} bytes"));
            }
            part => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("deeper than {MAX_DEPTH} components"));
                }
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part);
            }
        }
    }
    Ok(out)
}

fn parent_and_name(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = parent.to_vec();
    if !out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Content bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether `path` (normal components) is in the tree.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.as_bytes())
    }

    /// The bytes of regular file `path` (at most `max`), following symlinks inside the tree
    /// (absolute targets from its root); `None` when it is not a file or is larger.
    pub fn read_file(&self, path: &str, max: u64) -> Option<Vec<u8>> {
        let key = self.resolve(path.as_bytes(), 0)?;
        match &self.entries.get(&key)?.node {
            Node::File {
                source,
                offset,
                size,
                ..
            } if *size <= max => {
                let mut file = std::fs::File::open(&self.sources[*source]).ok()?;
                file.seek(SeekFrom::Start(*offset)).ok()?;
                let mut out = Vec::new();
                file.take(*size).read_to_end(&mut out).ok()?;
                Some(out)
            }
            _ => None,
        }
    }

    /// Whether `path` resolves (symlinks inside the tree followed) to a regular file.
    pub fn is_file(&self, path: &str) -> bool {
        self.resolve(path.as_bytes(), 0)
            .and_then(|key| self.entries.get(&key))
            .is_some_and(|e| matches!(e.node, Node::File { .. }))
    }

    /// The index key `path` leads to, its symlinks resolved lexically inside the tree.
    fn resolve(&self, path: &[u8], hops: u32) -> Option<Vec<u8>> {
        if hops > 40 {
            return None;
        }
        let mut done: Vec<u8> = Vec::new();
        let parts: Vec<&[u8]> = path
            .split(|b| *b == b'/')
            .filter(|p| !p.is_empty() && *p != b".")
            .collect();
        for (i, part) in parts.iter().enumerate() {
            if *part == b".." {
                let (parent, _) = parent_and_name(&done);
                done = parent.to_vec();
                continue;
            }
            let next = join(&done, part);
            match self.entries.get(&next).map(|e| &e.node) {
                Some(Node::Symlink(target)) => {
                    let mut rest = if target.first() == Some(&b'/') {
                        target.clone()
                    } else {
                        join(&done, target)
                    };
                    for more in &parts[i + 1..] {
                        rest = join(&rest, more);
                    }
                    return self.resolve(&rest, hops + 1);
                }
                Some(_) => done = next,
                None => return None,
            }
        }
        Some(done)
    }

    fn refused(&self, source_name: &str, path: &[u8], why: impl Into<String>) -> TreeError {
        TreeError::Refused {
            source_name: source_name.to_owned(),
            path: shown(path),
            why: why.into(),
        }
    }

    /// Removes `path` and everything below it.
    fn remove_all(&mut self, path: &[u8]) {
        self.entries.remove(path);
        self.remove_children(path);
    }

    /// Removes everything below `path` (the tree's root when empty).
    fn remove_children(&mut self, path: &[u8]) {
        let keys: Vec<Vec<u8>> = if path.is_empty() {
            self.entries.keys().cloned().collect()
        } else {
            let mut low = path.to_vec();
            low.push(b'/');
            let mut high = path.to_vec();
            high.push(b'/' + 1);
            self.entries
                .range(low..high)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in keys {
            if let Some(Entry {
                node: Node::File { size, .. },
                ..
            }) = self.entries.remove(&key)
            {
                self.bytes = self.bytes.saturating_sub(size);
            }
        }
    }

    /// Makes sure every directory above `path` exists as a directory: a missing one is
    /// implied; a symlink or file there is refused (nothing is written through it).
    fn ensure_parents(&mut self, source_name: &str, path: &[u8]) -> Result<(), TreeError> {
        let mut end = 0;
        while let Some(i) = path[end..].iter().position(|b| *b == b'/') {
            let prefix = &path[..end + i];
            match self.entries.get(prefix).map(|e| &e.node) {
                Some(Node::Dir) => {}
                Some(Node::Symlink(_)) => {
                    return Err(self.refused(
                        source_name,
                        path,
                        format!("below the symlink {}", shown(prefix)),
                    ));
                }
                Some(_) => {
                    return Err(self.refused(
                        source_name,
                        path,
                        format!("below the file {}", shown(prefix)),
                    ));
                }
                None => {
                    self.check_count(source_name, 1)?;
                    self.entries.insert(prefix.to_vec(), Entry::implied_dir());
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    fn check_count(&self, source_name: &str, more: u64) -> Result<(), TreeError> {
        if self.entries.len() as u64 + more > MAX_ENTRIES {
            return Err(TreeError::TooLarge {
                source_name: source_name.to_owned(),
                why: format!("more than {MAX_ENTRIES} entries"),
            });
        }
        Ok(())
    }

    /// Puts `entry` at `path` (parents checked): a directory over a directory keeps the
    /// children and takes the new metadata; anything else replaces what was there.
    fn insert(&mut self, source_name: &str, path: Vec<u8>, entry: Entry) -> Result<(), TreeError> {
        self.ensure_parents(source_name, &path)?;
        if let Node::File { size, .. } = entry.node {
            let total = self.bytes.saturating_add(size);
            if total > MAX_BYTES {
                return Err(TreeError::TooLarge {
                    source_name: source_name.to_owned(),
                    why: format!("more than {MAX_BYTES} bytes of content"),
                });
            }
        }
        let both_dirs =
            entry.node == Node::Dir && self.entries.get(&path).is_some_and(|e| e.node == Node::Dir);
        if !both_dirs {
            self.remove_all(&path);
            self.check_count(source_name, 1)?;
        }
        if let Node::File { size, .. } = entry.node {
            self.bytes += size;
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Applies the tar at `tar` (uncompressed) on top of the tree; see the module doc. On an
    /// error the tree is left partly applied and must be dropped.
    pub fn apply_layer(&mut self, tar: &Path, mode: LayerMode) -> Result<(), TreeError> {
        let source_name = tar
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file =
            std::fs::File::open(tar).map_err(io_err(format!("cannot open {}", tar.display())))?;
        let source = self.sources.len();
        self.sources.push(tar.to_owned());
        let pending = self.read_layer(&source_name, file, mode)?;
        // Whiteouts apply to the lower layers only: all of them before any addition.
        for p in &pending {
            match p.kind {
                PendingKind::Opaque => self.remove_children(&p.path),
                PendingKind::Whiteout => self.remove_all(&p.path),
                _ => {}
            }
        }
        for p in pending {
            let node = match p.kind {
                PendingKind::Whiteout | PendingKind::Opaque => continue,
                PendingKind::Node(Node::File {
                    offset, size, link, ..
                }) => Node::File {
                    source,
                    offset,
                    size,
                    link,
                },
                PendingKind::Node(node) => node,
                PendingKind::HardLink(target) => {
                    if target == p.path {
                        return Err(self.refused(&source_name, &p.path, "a hard link to itself"));
                    }
                    let Some(existing) = self.entries.get(&target).cloned() else {
                        return Err(self.refused(
                            &source_name,
                            &p.path,
                            format!(
                                "a hard link to {}, which is not a file of the tree",
                                shown(&target)
                            ),
                        ));
                    };
                    let Node::File {
                        source,
                        offset,
                        size,
                        link,
                    } = existing.node
                    else {
                        return Err(self.refused(
                            &source_name,
                            &p.path,
                            format!("a hard link to {}, which is not a file", shown(&target)),
                        ));
                    };
                    let link = if link == 0 {
                        self.next_link += 1;
                        let group = self.next_link;
                        if let Some(Entry {
                            node: Node::File { link, .. },
                            ..
                        }) = self.entries.get_mut(&target)
                        {
                            *link = group;
                        }
                        group
                    } else {
                        link
                    };
                    // One inode: the link has the target's metadata.
                    let entry = Entry {
                        node: Node::File {
                            source,
                            offset,
                            size,
                            link,
                        },
                        ..existing
                    };
                    self.insert(&source_name, p.path, entry)?;
                    continue;
                }
            };
            let entry = Entry {
                node,
                mode: p.mode,
                uid: p.uid,
                gid: p.gid,
                mtime: p.mtime,
            };
            self.insert(&source_name, p.path, entry)?;
        }
        Ok(())
    }

    /// Reads every header of a layer (no content), judging paths and kinds.
    fn read_layer(
        &mut self,
        source_name: &str,
        file: std::fs::File,
        mode: LayerMode,
    ) -> Result<Vec<Pending>, TreeError> {
        let bad_tar = |e: std::io::Error| TreeError::Refused {
            source_name: source_name.to_owned(),
            path: String::new(),
            why: format!("not a usable tar: {e}"),
        };
        let mut archive = tar::Archive::new(TarGuard::new(std::io::BufReader::with_capacity(
            1 << 20,
            file,
        )));
        let mut pending = Vec::new();
        let mut layer_bytes = 0u64;
        for entry in archive.entries().map_err(bad_tar)? {
            let entry = entry.map_err(bad_tar)?;
            if pending.len() as u64 + self.entries.len() as u64 >= MAX_ENTRIES {
                return Err(TreeError::TooLarge {
                    source_name: source_name.to_owned(),
                    why: format!("more than {MAX_ENTRIES} entries"),
                });
            }
            let raw = entry.path_bytes().into_owned();
            let path = normalize(&raw).map_err(|why| self.refused(source_name, &raw, why))?;
            let header = entry.header();
            let kind = header.entry_type();
            let meta = (
                header.mode().map_err(bad_tar)? & 0o7777,
                header.uid().map_err(bad_tar)?,
                header.gid().map_err(bad_tar)?,
                header.mtime().unwrap_or(0),
            );
            let (parent, name) = parent_and_name(&path);
            if mode == LayerMode::Oci && name.starts_with(WHITEOUT_PREFIX) {
                let kind = if name == OPAQUE {
                    PendingKind::Opaque
                } else if name.starts_with(b".wh..wh.") {
                    // Reserved for other metadata: not part of the tree.
                    continue;
                } else {
                    let target = &name[WHITEOUT_PREFIX.len()..];
                    if target.is_empty() || target == b"." || target == b".." {
                        return Err(self.refused(source_name, &raw, "a whiteout of nothing"));
                    }
                    pending.push(Pending {
                        path: join(parent, target),
                        kind: PendingKind::Whiteout,
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                    });
                    continue;
                };
                pending.push(Pending {
                    path: parent.to_vec(),
                    kind,
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                });
                continue;
            }
            if path.is_empty() {
                // The root directory itself: its metadata is the guest's own.
                continue;
            }
            let kind = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.size();
                    layer_bytes = layer_bytes.saturating_add(size);
                    if self.bytes.saturating_add(layer_bytes) > MAX_BYTES {
                        return Err(TreeError::TooLarge {
                            source_name: source_name.to_owned(),
                            why: format!("more than {MAX_BYTES} bytes of content"),
                        });
                    }
                    PendingKind::Node(Node::File {
                        source: 0,
                        offset: entry.raw_file_position(),
                        size,
                        link: 0,
                    })
                }
                tar::EntryType::Directory => PendingKind::Node(Node::Dir),
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    if target.is_empty() || target.len() > PATH_MAX || target.contains(&0) {
                        return Err(self.refused(source_name, &raw, "a bad symlink target"));
                    }
                    PendingKind::Node(Node::Symlink(target))
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let target = normalize(&target).map_err(|why| {
                        self.refused(source_name, &raw, format!("hard link target: {why}"))
                    })?;
                    PendingKind::HardLink(target)
                }
                tar::EntryType::Fifo => PendingKind::Node(Node::Fifo),
                tar::EntryType::Char | tar::EntryType::Block => {
                    self.skipped_devices += 1;
                    continue;
                }
                // PAX global headers carry no file.
                tar::EntryType::XGlobalHeader => continue,
                other => {
                    return Err(self.refused(
                        source_name,
                        &raw,
                        format!("an entry of tar type {:?}", other.as_byte() as char),
                    ));
                }
            };
            pending.push(Pending {
                path,
                kind,
                mode: meta.0,
                uid: meta.1,
                gid: meta.2,
                mtime: meta.3,
            });
        }
        Ok(pending)
    }

    /// Reads a host directory (a work-seed given to `image build --work-seed`): symlinks are
    /// kept as links (never followed), hard links inside it stay links, every owner becomes
    /// the guest's root, files keep their mtimes (directories and symlinks get 0). Devices,
    /// FIFOs and sockets are refused.
    pub fn from_dir(dir: &Path) -> Result<Self, TreeError> {
        let source_name = dir.display().to_string();
        let meta = std::fs::metadata(dir).map_err(io_err(format!("cannot read {source_name}")))?;
        if !meta.is_dir() {
            return Err(TreeError::Refused {
                source_name,
                path: String::new(),
                why: "not a directory".into(),
            });
        }
        let mut tree = Self::new();
        let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(dir.to_owned(), Vec::new())];
        while let Some((host, rel)) = stack.pop() {
            let mut names: Vec<_> = std::fs::read_dir(&host)
                .map_err(io_err(format!("cannot read {}", host.display())))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err(format!("cannot read {}", host.display())))?;
            names.sort();
            for name in names {
                let path = host.join(&name);
                let key = join(&rel, name.as_bytes());
                if key.len() > PATH_MAX || name.len() > NAME_MAX {
                    return Err(tree.refused(&source_name, &key, "name too long"));
                }
                let meta = std::fs::symlink_metadata(&path)
                    .map_err(io_err(format!("cannot stat {}", path.display())))?;
                let kind = meta.file_type();
                let node = if kind.is_dir() {
                    stack.push((path.clone(), key.clone()));
                    Node::Dir
                } else if kind.is_symlink() {
                    let target = std::fs::read_link(&path)
                        .map_err(io_err(format!("cannot read {}", path.display())))?;
                    Node::Symlink(target.into_os_string().into_vec())
                } else if kind.is_file() {
                    if meta.nlink() > 1
                        && let Some(first) = inodes.get(&(meta.dev(), meta.ino()))
                    {
                        let first = first.clone();
                        let mut pending_link = tree.entries.get(&first).cloned();
                        if let Some(Entry {
                            node: Node::File { link, .. },
                            ..
                        }) = &mut pending_link
                            && *link == 0
                        {
                            tree.next_link += 1;
                            *link = tree.next_link;
                        }
                        if let Some(entry) = pending_link {
                            tree.entries.insert(first, entry.clone());
                            tree.insert(&source_name, key, entry)?;
                            continue;
                        }
                    }
                    if meta.nlink() > 1 {
                        inodes.insert((meta.dev(), meta.ino()), key.clone());
                    }
                    let source = tree.sources.len();
                    tree.sources.push(path.clone());
                    Node::File {
                        source,
                        offset: 0,
                        size: meta.len(),
                        link: 0,
                    }
                } else {
                    return Err(tree.refused(
                        &source_name,
                        &key,
                        "a device, FIFO or socket (a work-seed holds files, directories and symlinks)",
                    ));
                };
                // Directories and symlinks get mtime 0: storing the tree changes theirs, and
                // the same tree must give the same canonical tar.
                let mtime = match node {
                    Node::File { .. } => u64::try_from(meta.mtime()).unwrap_or(0),
                    _ => 0,
                };
                let entry = Entry {
                    node,
                    mode: meta.mode() & 0o7777,
                    uid: 0,
                    gid: 0,
                    mtime,
                };
                tree.insert(&source_name, key, entry)?;
            }
        }
        Ok(tree)
    }

    /// Refuses names that banger's tools cannot pass on safely (control characters, `"`
    /// and `\`: `debugfs` gets the work-seed's paths in its command language) and kinds other
    /// than files, directories and symlinks.
    pub fn check_work_seed(&self, source_name: &str) -> Result<(), TreeError> {
        for (path, entry) in &self.entries {
            let plain = std::str::from_utf8(path)
                .is_ok_and(|p| !p.contains(['"', '\\']) && !p.chars().any(char::is_control));
            if !plain {
                return Err(self.refused(
                    source_name,
                    path,
                    "a name with a control character, quote or backslash (not allowed in a work-seed)",
                ));
            }
            if entry.node == Node::Fifo {
                return Err(self.refused(source_name, path, "a FIFO in a work-seed"));
            }
        }
        Ok(())
    }

    /// Writes the tree as one canonical tar (see the module doc), leaving out paths for
    /// which `skip` is true (and what is below them).
    pub fn write_tar(&self, out: impl Write, skip: impl Fn(&str) -> bool) -> Result<(), TreeError> {
        let fail = io_err("cannot write the tar");
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Complete);
        let mut first_of_link: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut skipped: Option<Vec<u8>> = None;
        for (path, entry) in &self.entries {
            if let Some(prefix) = &skipped
                && path.starts_with(prefix)
                && path.get(prefix.len()) == Some(&b'/')
            {
                continue;
            }
            if skip(&String::from_utf8_lossy(path)) {
                skipped = Some(path.clone());
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_mode(entry.mode);
            header.set_uid(entry.uid);
            header.set_gid(entry.gid);
            header.set_mtime(entry.mtime);
            let name = Path::new(OsStr::from_bytes(path));
            match &entry.node {
                Node::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    let mut dir_name = path.clone();
                    dir_name.push(b'/');
                    builder
                        .append_data(
                            &mut header,
                            Path::new(OsStr::from_bytes(&dir_name)),
                            std::io::empty(),
                        )
                        .map_err(|e| io_err(format!("cannot write {}", shown(path)))(e))?;
                }
                Node::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, name, Path::new(OsStr::from_bytes(target)))
                        .map_err(|e| io_err(format!("cannot write {}", shown(path)))(e))?;
                }
                Node::Fifo => {
                    header.set_entry_type(tar::EntryType::Fifo);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, name, std::io::empty())
                        .map_err(|e| io_err(format!("cannot write {}", shown(path)))(e))?;
                }
                Node::File {
                    source,
                    offset,
                    size,
                    link,
                } => {
                    if *link != 0
                        && let Some(first) = first_of_link.get(link)
                    {
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        builder
                            .append_link(&mut header, name, Path::new(OsStr::from_bytes(first)))
                            .map_err(|e| io_err(format!("cannot write {}", shown(path)))(e))?;
                        continue;
                    }
                    if *link != 0 {
                        first_of_link.insert(*link, path.clone());
                    }
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(*size);
                    let data = self.open_data(*source, *offset, *size)?;
                    builder
                        .append_data(&mut header, name, data)
                        .map_err(|e| io_err(format!("cannot write {}", shown(path)))(e))?;
                }
            }
        }
        builder.finish().map_err(fail)?;
        Ok(())
    }

    /// Exactly `size` bytes at `offset` of source `source` (a shorter source is an error).
    fn open_data(&self, source: usize, offset: u64, size: u64) -> Result<impl Read, TreeError> {
        let path = &self.sources[source];
        let mut file =
            std::fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        Ok(ExactReader {
            inner: file.take(size),
            left: size,
        })
    }

    /// Creates the tree in `dest` (which must not exist; its parent is private to the
    /// daemon). Work-seeds only: regular files, directories, symlinks and hard links.
    pub fn materialize(&self, dest: &Path) -> Result<(), TreeError> {
        std::fs::create_dir(dest).map_err(io_err(format!("cannot create {}", dest.display())))?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("cannot chmod {}", dest.display())))?;
        let mut first_of_link: HashMap<u64, PathBuf> = HashMap::new();
        for (path, entry) in &self.entries {
            let target = dest.join(OsStr::from_bytes(path));
            let shown_target = target.display().to_string();
            match &entry.node {
                Node::Dir => {
                    std::fs::create_dir(&target)
                        .map_err(io_err(format!("cannot create {shown_target}")))?;
                    std::fs::set_permissions(
                        &target,
                        std::fs::Permissions::from_mode((entry.mode | 0o700) & 0o777),
                    )
                    .map_err(io_err(format!("cannot chmod {shown_target}")))?;
                }
                Node::Symlink(link) => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(link), &target)
                        .map_err(io_err(format!("cannot create {shown_target}")))?;
                }
                Node::Fifo => {
                    return Err(self.refused("work-seed", path, "a FIFO"));
                }
                Node::File {
                    source,
                    offset,
                    size,
                    link,
                } => {
                    if *link != 0
                        && let Some(first) = first_of_link.get(link)
                    {
                        std::fs::hard_link(first, &target)
                            .map_err(io_err(format!("cannot link {shown_target}")))?;
                        continue;
                    }
                    let mut out = std::fs::File::options()
                        .write(true)
                        .create_new(true)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(&target)
                        .map_err(io_err(format!("cannot create {shown_target}")))?;
                    let mut data = self.open_data(*source, *offset, *size)?;
                    std::io::copy(&mut data, &mut out)
                        .map_err(io_err(format!("cannot write {shown_target}")))?;
                    out.set_permissions(std::fs::Permissions::from_mode(
                        (entry.mode | 0o400) & 0o777,
                    ))
                    .map_err(io_err(format!("cannot chmod {shown_target}")))?;
                    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(entry.mtime);
                    let _ = out.set_modified(mtime);
                    if *link != 0 {
                        first_of_link.insert(*link, target);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A reader that fails when its source ends before `left` bytes (a file changed under us).
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the source is shorter than recorded",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Links the stored work-seed `seed` into a new VM's seed directory `dest` (which exists):
/// directories are created, files hard-linked (copied when the store is on another file
/// system), symlinks recreated. banger's own files win: `.banger/` and `.ssh/authorized_keys`
/// of the seed are left out.
pub fn link_seed(seed: &Path, dest: &Path) -> Result<(), TreeError> {
    let mut stack = vec![(seed.to_owned(), dest.to_owned(), 0usize)];
    while let Some((from, to, depth)) = stack.pop() {
        let entries =
            std::fs::read_dir(&from).map_err(io_err(format!("cannot read {}", from.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("cannot read {}", from.display())))?;
            let name = entry.file_name();
            let reserved = (depth == 0 && name == ".banger")
                || (depth == 1 && name == "authorized_keys" && from.ends_with(".ssh"));
            if reserved {
                continue;
            }
            let source = entry.path();
            let target = to.join(&name);
            let meta = std::fs::symlink_metadata(&source)
                .map_err(io_err(format!("cannot stat {}", source.display())))?;
            let shown_target = target.display().to_string();
            if meta.is_dir() {
                match std::fs::create_dir(&target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(format!("cannot create {shown_target}"))(e)),
                }
                std::fs::set_permissions(&target, meta.permissions())
                    .map_err(io_err(format!("cannot chmod {shown_target}")))?;
                stack.push((source, target, depth + 1));
            } else if meta.file_type().is_symlink() {
                let link = std::fs::read_link(&source)
                    .map_err(io_err(format!("cannot read {}", source.display())))?;
                std::os::unix::fs::symlink(link, &target)
                    .map_err(io_err(format!("cannot create {shown_target}")))?;
            } else if std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target)
                    .map_err(io_err(format!("cannot copy {}", source.display())))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar built entry by entry with raw names (the tar crate's safe setters refuse `..`).
    struct RawTar(Vec<u8>);

    impl RawTar {
        fn new() -> Self {
            Self(Vec::new())
        }

        fn entry(mut self, kind: tar::EntryType, path: &str, link: &str, data: &[u8]) -> Self {
            let mut header = tar::Header::new_gnu();
            {
                let gnu = header.as_gnu_mut().unwrap();
                gnu.name[..path.len()].copy_from_slice(path.as_bytes());
                gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_size(data.len() as u64);
            header.set_cksum();
            self.0.extend_from_slice(header.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.extend(std::iter::repeat_n(0, pad));
            self
        }

        fn file(self, path: &str, data: &str) -> Self {
            self.entry(tar::EntryType::Regular, path, "", data.as_bytes())
        }

        fn dir(self, path: &str) -> Self {
            self.entry(tar::EntryType::Directory, path, "", b"")
        }

        fn symlink(self, path: &str, target: &str) -> Self {
            self.entry(tar::EntryType::Symlink, path, target, b"")
        }

        fn hardlink(self, path: &str, target: &str) -> Self {
            self.entry(tar::EntryType::Link, path, target, b"")
        }

        fn write(mut self, dir: &Path, name: &str) -> PathBuf {
            self.0.extend(std::iter::repeat_n(0, 1024));
            let path = dir.join(name);
            std::fs::write(&path, &self.0).unwrap();
            path
        }
    }

    fn listing(tree: &Tree) -> Vec<String> {
        tree.entries
            .iter()
            .map(|(k, e)| {
                let kind = match &e.node {
                    Node::Dir => "d".to_owned(),
                    Node::File { .. } => "f".to_owned(),
                    Node::Symlink(t) => format!("l->{}", shown(t)),
                    Node::Fifo => "p".to_owned(),
                };
                format!("{} {kind}", shown(k))
            })
            .collect()
    }

    fn refused(layer: PathBuf) -> String {
        let mut tree = Tree::new();
        match tree.apply_layer(&layer, LayerMode::Oci) {
            Err(TreeError::Refused { why, .. }) => why,
            other => panic!("{} was not refused: {other:?}", layer.display()),
        }
    }

    #[test]
    fn whiteouts_and_opaque_dirs_apply_to_lower_layers_only() {
        let dir = tempfile::tempdir().unwrap();
        let lower = RawTar::new()
            .dir("etc/")
            .file("etc/keep", "k")
            .file("etc/gone", "g")
            .dir("opq/")
            .file("opq/old", "o")
            .dir("opq/sub/")
            .file("opq/sub/deep", "d")
            .dir("tree/")
            .file("tree/a", "a")
            .write(dir.path(), "l0.tar");
        let upper = RawTar::new()
            .file("etc/.wh.gone", "")
            .file("opq/.wh..wh..opq", "")
            .file("opq/new", "n")
            .file(".wh.tree", "")
            // Same layer: a whiteout does not hide what its own layer adds.
            .file("fresh", "f")
            .file(".wh.fresh", "")
            .write(dir.path(), "l1.tar");
        let mut tree = Tree::new();
        tree.apply_layer(&lower, LayerMode::Oci).unwrap();
        tree.apply_layer(&upper, LayerMode::Oci).unwrap();
        assert_eq!(
            listing(&tree),
            ["etc d", "etc/keep f", "fresh f", "opq d", "opq/new f"]
        );
        assert_eq!(tree.read_file("etc/keep", 10).unwrap(), b"k");
        assert_eq!(tree.read_file("opq/new", 10).unwrap(), b"n");
        // The canonical tar of it reads back to the same tree.
        let out = dir.path().join("merged.tar");
        tree.write_tar(std::fs::File::create(&out).unwrap(), |_| false)
            .unwrap();
        let mut again = Tree::new();
        again.apply_layer(&out, LayerMode::Oci).unwrap();
        assert_eq!(listing(&again), listing(&tree));
        let again_out = dir.path().join("again.tar");
        again
            .write_tar(std::fs::File::create(&again_out).unwrap(), |_| false)
            .unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&again_out).unwrap(),
            "the canonical tar is not stable"
        );
    }

    #[test]
    fn symlinks_stay_links_and_hard_links_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let layer = RawTar::new()
            .file("bin/tool", "#!/bin/sh\n")
            .symlink("usr-bin", "bin")
            .symlink("abs", "/etc/passwd")
            .hardlink("bin/tool2", "bin/tool")
            .write(dir.path(), "l.tar");
        let mut tree = Tree::new();
        tree.apply_layer(&layer, LayerMode::Oci).unwrap();
        assert_eq!(
            listing(&tree),
            [
                "abs l->/etc/passwd",
                "bin d",
                "bin/tool f",
                "bin/tool2 f",
                "usr-bin l->bin"
            ]
        );
        assert!(tree.is_file("usr-bin/tool"));
        // Materialized: the hard link is one inode, the symlinks are links.
        let out = dir.path().join("out");
        tree.materialize(&out).unwrap();
        let a = std::fs::metadata(out.join("bin/tool")).unwrap();
        let b = std::fs::metadata(out.join("bin/tool2")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(
            std::fs::read_link(out.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        // And in the canonical tar, the second path is a link to the first.
        let tar_path = dir.path().join("t.tar");
        tree.write_tar(std::fs::File::create(&tar_path).unwrap(), |p| p == "abs")
            .unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
        let kinds: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("bin/".to_owned(), tar::EntryType::Directory),
                ("bin/tool".to_owned(), tar::EntryType::Regular),
                ("bin/tool2".to_owned(), tar::EntryType::Link),
                ("usr-bin".to_owned(), tar::EntryType::Symlink),
            ]
        );
    }

    #[test]
    fn hostile_layers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let why = refused(RawTar::new().file("../x", "x").write(d, "dotdot.tar"));
        assert!(why.contains(".."), "{why}");
        let why = refused(RawTar::new().file("a/../../x", "x").write(d, "dotdot2.tar"));
        assert!(why.contains(".."), "{why}");
        let why = refused(RawTar::new().file("/etc/x", "x").write(d, "abs.tar"));
        assert!(why.contains("absolute"), "{why}");
        // A symlink to outside, then a file written through it.
        let why = refused(
            RawTar::new()
                .symlink("escape", "/etc")
                .file("escape/passwd", "owned")
                .write(d, "symlink.tar"),
        );
        assert!(why.contains("below the symlink escape"), "{why}");
        let why = refused(
            RawTar::new()
                .symlink("up", "../..")
                .file("up/x", "x")
                .write(d, "symlink2.tar"),
        );
        assert!(why.contains("symlink"), "{why}");
        // A symlink from a lower layer is no way out either.
        let lower = RawTar::new()
            .symlink("etc", "/host-etc")
            .write(d, "lower.tar");
        let upper = RawTar::new().file("etc/shadow", "x").write(d, "upper.tar");
        let mut tree = Tree::new();
        tree.apply_layer(&lower, LayerMode::Oci).unwrap();
        assert!(matches!(
            tree.apply_layer(&upper, LayerMode::Oci),
            Err(TreeError::Refused { .. })
        ));
        // Hard links to outside the tree, to nothing, to a directory, through `..`.
        for (name, target) in [
            ("hl-abs.tar", "/etc/shadow"),
            ("hl-up.tar", "../outside"),
            ("hl-missing.tar", "not/there"),
            ("hl-dir.tar", "d"),
        ] {
            let why = refused(
                RawTar::new()
                    .dir("d/")
                    .file("d/f", "x")
                    .hardlink("link", target)
                    .write(d, name),
            );
            assert!(why.contains("hard link"), "{name}: {why}");
        }
        // A hard link through a symlink names no file of the tree.
        let why = refused(
            RawTar::new()
                .dir("d/")
                .file("d/f", "x")
                .symlink("s", "d")
                .hardlink("link", "s/f")
                .write(d, "hl-sym.tar"),
        );
        assert!(why.contains("hard link"), "{why}");
        // Not a tar at all.
        std::fs::write(d.join("junk.tar"), vec![7u8; 2048]).unwrap();
        let mut tree = Tree::new();
        assert!(
            tree.apply_layer(&d.join("junk.tar"), LayerMode::Oci)
                .is_err()
        );
    }

    #[test]
    fn host_dirs_become_trees_with_links_kept() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("seed");
        std::fs::create_dir_all(src.join(".config/app")).unwrap();
        std::fs::write(src.join(".bashrc"), "alias ll='ls -l'\n").unwrap();
        std::fs::write(src.join(".config/app/x"), "x").unwrap();
        std::fs::hard_link(src.join(".config/app/x"), src.join("x-again")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.join("host")).unwrap();
        std::os::unix::fs::symlink(".config", src.join("cfg")).unwrap();
        let tree = Tree::from_dir(&src).unwrap();
        tree.check_work_seed("seed").unwrap();
        assert_eq!(
            listing(&tree),
            [
                ".bashrc f",
                ".config d",
                ".config/app d",
                ".config/app/x f",
                "cfg l->.config",
                "host l->/etc/hostname",
                "x-again f"
            ]
        );
        let out = dir.path().join("stored");
        tree.materialize(&out).unwrap();
        assert_eq!(
            std::fs::read_link(out.join("host")).unwrap(),
            Path::new("/etc/hostname")
        );
        assert_eq!(
            std::fs::metadata(out.join("x-again")).unwrap().ino(),
            std::fs::metadata(out.join(".config/app/x")).unwrap().ino()
        );
        // The same tree read back gives the same canonical tar.
        let a = dir.path().join("a.tar");
        let b = dir.path().join("b.tar");
        tree.write_tar(std::fs::File::create(&a).unwrap(), |_| false)
            .unwrap();
        Tree::from_dir(&out)
            .unwrap()
            .write_tar(std::fs::File::create(&b).unwrap(), |_| false)
            .unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

        // A seed linked into a VM's seed: banger's own files are left out.
        std::fs::create_dir_all(out.join(".ssh")).unwrap();
        std::fs::write(out.join(".ssh/authorized_keys"), "theirs").unwrap();
        std::fs::write(out.join(".ssh/config"), "Host *").unwrap();
        std::fs::create_dir_all(out.join(".banger")).unwrap();
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        link_seed(&out, &vm).unwrap();
        assert!(vm.join(".ssh/config").is_file());
        assert!(!vm.join(".ssh/authorized_keys").exists());
        assert!(!vm.join(".banger").exists());
        assert_eq!(
            std::fs::read_link(vm.join("cfg")).unwrap(),
            Path::new(".config")
        );

        // Special files and names debugfs cannot take are refused.
        let bad = dir.path().join("bad");
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("a\"b"), "").unwrap();
        assert!(
            Tree::from_dir(&bad)
                .unwrap()
                .check_work_seed("bad")
                .is_err()
        );
        let fifo = dir.path().join("fifo");
        std::fs::create_dir(&fifo).unwrap();
        nix::unistd::mkfifo(&fifo.join("p"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(Tree::from_dir(&fifo).is_err());
    }
}
