//! The leak check: a [`Snapshot`] of what one banger instance can leave on the host, and
//! [`assert_no_leaks`], which fails with a readable list of whatever a later snapshot adds.
//!
//! What is counted, each as one line of text (no pids, so a VM that was running before and
//! runs after is the same line):
//! - processes (other than the daemon and the root helper) whose command line or environment
//!   names the instance's directory: QEMU, Firecracker, the jailer, ssh masters;
//! - network links and nftables tables, in a network namespace the test made (all of them)
//!   or in the host's (only banger's: links named `bg…`, tables named `banger…`);
//! - loop devices whose backing file is under a watched directory (`losetup -J`);
//! - mounts under a watched directory (`/proc/self/mountinfo`);
//! - files in the runtime dir (the daemon's own socket, lock and pid file aside);
//! - temporary and partial files in the home: `*.partial` anywhere, whatever is in `tmp/`;
//! - the stored directories `vms/<id>`, `images/<digest>`, `kernels/<digest>`: one made by a
//!   failed operation is a leak too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a [`Snapshot`] looks at.
#[derive(Debug, Clone)]
pub struct LeakScope {
    /// The instance's directory: processes naming it, loops and mounts under it.
    dir: PathBuf,
    /// The instance's data dir (`BANGER_HOME`).
    home: PathBuf,
    /// Its runtime dir.
    runtime: PathBuf,
    /// A network namespace to list every link and table of (else the host's, filtered).
    netns: Option<String>,
    /// More directories whose loops and mounts count (a jail base, a loop-mounted home).
    extra: Vec<PathBuf>,
}

impl LeakScope {
    /// The instance in `dir` whose data dir is `home` and runtime dir `home/run` (how
    /// [`crate::TestEnv`] and the in-process Manager tests lay them out).
    pub fn new(dir: &Path, home: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            home: home.to_path_buf(),
            runtime: home.join("run"),
            netns: None,
            extra: Vec::new(),
        }
    }

    /// Lists the links and nftables tables of network namespace `name` instead of the
    /// host's banger ones.
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Also counts loop devices backed by files under `path` and mounts under it.
    pub fn watching(mut self, path: &Path) -> Self {
        self.extra.push(path.to_path_buf());
        self
    }

    fn watched(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.dir.as_path()).chain(self.extra.iter().map(PathBuf::as_path))
    }
}

impl crate::TestEnv {
    /// The leak scope of this instance (its directory, home and network namespace).
    pub fn leak_scope(&self) -> LeakScope {
        let scope = LeakScope::new(self.dir(), &self.home());
        match &self.netns {
            Some(ns) => scope.in_netns(ns),
            None => scope,
        }
    }

    /// A snapshot of what this instance holds on the host now.
    pub fn leak_snapshot(&self) -> Snapshot {
        Snapshot::take(&self.leak_scope())
    }
}

/// What an instance holds on the host at one moment, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    entries: BTreeMap<&'static str, BTreeSet<String>>,
}

impl Snapshot {
    /// Looks at everything `scope` covers.
    pub fn take(scope: &LeakScope) -> Self {
        let mut snapshot = Self::default();
        snapshot.put("process", processes(scope));
        snapshot.put("link", links(scope.netns.as_deref()));
        snapshot.put("nft table", nft_tables(scope.netns.as_deref()));
        snapshot.put("loop device", loops(scope));
        snapshot.put("mount", mounts(scope));
        snapshot.put("runtime file", runtime_files(&scope.runtime));
        snapshot.put("temp file", temp_files(&scope.home));
        snapshot.put("stored dir", stored_dirs(&scope.home));
        snapshot
    }

    fn put(&mut self, kind: &'static str, items: impl IntoIterator<Item = String>) {
        self.entries.entry(kind).or_default().extend(items);
    }

    /// What `self` holds that `before` did not.
    pub fn added_since(&self, before: &Snapshot) -> Snapshot {
        let mut added = Snapshot::default();
        for (kind, items) in &self.entries {
            let old = before.entries.get(kind);
            added.put(
                kind,
                items
                    .iter()
                    .filter(|i| old.is_none_or(|o| !o.contains(*i)))
                    .cloned(),
            );
        }
        added.entries.retain(|_, items| !items.is_empty());
        added
    }

    pub fn is_empty(&self) -> bool {
        self.entries.values().all(BTreeSet::is_empty)
    }

    /// The items of one kind (e.g. `"process"`), for tests of the check itself.
    pub fn items(&self, kind: &str) -> Vec<String> {
        self.entries
            .get(kind)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (kind, items) in &self.entries {
            for item in items {
                writeln!(f, "  {kind}: {item}")?;
            }
        }
        Ok(())
    }
}

/// Fails the test, listing each leftover, when `after` holds anything `before` did not.
#[track_caller]
pub fn assert_no_leaks(before: &Snapshot, after: &Snapshot, what: &str) {
    let added = after.added_since(before);
    assert!(
        added.is_empty(),
        "{what} left behind what was not there before:\n{added}"
    );
}

/// Processes naming a watched directory in their arguments or environment, except the daemon
/// and the root helper (which an instance keeps by design) and this test process.
fn processes(scope: &LeakScope) -> Vec<String> {
    let own = std::process::id();
    let needles: Vec<String> = scope.watched().map(|p| p.display().to_string()).collect();
    let names = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        needles.iter().any(|n| text.contains(n.as_str()))
    };
    crate::live_processes()
        .into_iter()
        .filter(|p| p.pid != own && !["bangerd", "banger-helper", "banger"].contains(&&*p.name))
        .filter(|p| {
            names(&p.cmdline) || std::fs::read(p.dir.join("environ")).is_ok_and(|e| names(&e))
        })
        .map(|p| {
            let args = String::from_utf8_lossy(&p.cmdline).replace('\0', " ");
            let args: String = args.trim().chars().take(300).collect();
            format!("{} [{args}]", p.name)
        })
        .collect()
}

/// `ip`/`nft` with `args`, in namespace `netns` when given; stdout, empty when it fails.
fn net_tool(netns: Option<&str>, tool: &str, args: &[&str]) -> String {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, tool]);
            c
        }
        None => Command::new(tool),
    };
    command
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Link names (`ip -o link`): all in a namespace, banger's (`bg…`) in the host's.
fn links(netns: Option<&str>) -> Vec<String> {
    net_tool(netns, "ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| netns.is_some() || name.starts_with("bg"))
        .collect()
}

/// nftables tables (`nft list tables`): all in a namespace, banger's in the host's.
fn nft_tables(netns: Option<&str>) -> Vec<String> {
    net_tool(netns, "nft", &["list", "tables"])
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty() && (netns.is_some() || l.contains("banger")))
        .collect()
}

/// Loop devices backed by a file under a watched directory (`losetup -J`).
fn loops(scope: &LeakScope) -> Vec<String> {
    let Ok(out) = Command::new("losetup").arg("-J").output() else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["loopdevices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let file = d["back-file"].as_str()?;
            let path = Path::new(file.trim_end_matches(" (deleted)"));
            scope
                .watched()
                .any(|w| path.starts_with(w))
                .then(|| format!("{} <- {file}", d["name"].as_str().unwrap_or("?")))
        })
        .collect()
}

/// Mount points under a watched directory (`/proc/self/mountinfo`, field 5, octal escapes
/// undone), the watched directories themselves aside (a test may mount its home).
fn mounts(scope: &LeakScope) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|point| {
            let point = Path::new(point);
            scope
                .watched()
                .any(|w| point.starts_with(w) && point != w && point != scope.home)
        })
        .collect()
}

/// Undoes mountinfo's `\NNN` octal escapes (space, tab, newline, backslash).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every path below `root`, relative to it (directories too), not following symlinks.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_path_buf());
            }
        }
    }
    out
}

/// Files in the runtime dir but the daemon's own (`bangerd.*` at its top).
fn runtime_files(runtime: &Path) -> Vec<String> {
    walk(runtime)
        .into_iter()
        .filter(|p| {
            let daemons = p.components().count() == 1 && p.to_string_lossy().starts_with("bangerd");
            !daemons && !runtime.join(p).is_dir()
        })
        .map(|p| format!("run/{}", p.display()))
        .collect()
}

/// `*.partial` anywhere in the home and whatever is in its `tmp/`.
fn temp_files(home: &Path) -> Vec<String> {
    let mut found: Vec<String> = walk(home)
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "partial")
                || (p.starts_with("tmp") && p != Path::new("tmp"))
        })
        .map(|p| p.display().to_string())
        .collect();
    // Only the top of a scratch dir: its contents would only repeat it.
    found.retain(|p| !p.starts_with("tmp/") || p.matches('/').count() == 1);
    found
}

/// The entries of `vms/`, `images/` and `kernels/`.
fn stored_dirs(home: &Path) -> Vec<String> {
    ["vms", "images", "kernels"]
        .iter()
        .flat_map(|kind| {
            std::fs::read_dir(home.join(kind))
                .into_iter()
                .flatten()
                .flatten()
                .map(move |e| format!("{kind}/{}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
