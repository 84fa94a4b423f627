//! `vm cp` of the [`Manager`]: a file, symlink or directory copied between the host and a
//! running guest, both ways, as a tar. To the guest it is the workspace transfer
//! ([`transfer::send`]: the workspace channel for large copies, SSH otherwise) with a
//! guest script that places the copy; from the guest, the guest's `tar -c` streams over SSH
//! into the one guest-tar extractor ([`extract`], lenient rules: `.git`, special files and
//! symlinks pointing out are skipped and reported), staged beside the destination and moved
//! into place only when all was accepted. Destinations work like `cp -r`: an existing
//! directory receives the source under its own name, anything else becomes the copy.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use banger_proto::{CopyDirection, CopyRequest, CopyResult, TransferChannel, VmName};
use tracing::info;

use super::Manager;
use super::workspace::{Running, stream_from_guest};
use crate::Error;
use crate::guest::ssh::{SshTarget, shell_quote};
use crate::workspace::fileset::{self, Manifest};
use crate::workspace::transfer::{self, Progress};
use crate::workspace::{Receive, WorkspaceError, extract, read_tar};

impl Manager {
    /// Copies between the host and the guest of running VM `name` (see the module doc).
    pub async fn copy(&self, name: &str, request: CopyRequest) -> Result<CopyResult, Error> {
        let started = Instant::now();
        let name = VmName::parse(name)?;
        let host = PathBuf::from(&request.host_path);
        if !host.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "host path {:?} is not absolute",
                request.host_path
            )));
        }
        let guest = guest_path(&request.guest_path)?;
        let lock = self.vm_lock(&name);
        let _guard = lock.lock().await;
        let record = self.running_vm(&name).await?;
        let target = self.ssh_target(&record)?;
        let progress = Arc::new(Progress::default());
        let _running = Running::new(self, &name, &progress);
        let mut result = match request.direction {
            CopyDirection::ToGuest => {
                let channel = self.layout.vm_workspace_channel(&record.id);
                tokio::task::spawn_blocking(move || {
                    to_guest(&target, &host, &guest, &channel, &progress)
                })
                .await
            }
            CopyDirection::FromGuest => {
                tokio::task::spawn_blocking(move || from_guest(&target, &guest, &host, &progress))
                    .await
            }
        }
        .map_err(|e| Error::Failed(format!("copy worker failed: {e}")))??;
        result.elapsed_ms = started.elapsed().as_millis() as u64;
        info!(vm = %name, direction = ?request.direction, written = %result.written, entries = result.entries, bytes = result.bytes, skipped = result.skipped_count, "copied");
        Ok(result)
    }
}

/// A guest path as an absolute path with a final name (relative ones are under /root);
/// `/`, and paths ending in `.` or `..`, name no single object to copy.
fn guest_path(text: &str) -> Result<String, Error> {
    let trimmed = text.trim_end_matches('/');
    let full = if trimmed.starts_with('/') {
        trimmed.to_owned()
    } else {
        format!("/root/{trimmed}")
    };
    let last = full.rsplit('/').next().unwrap_or("");
    if text.is_empty() || last.is_empty() || last == "." || last == ".." || text.contains('\0') {
        return Err(Error::InvalidRequest(format!(
            "guest path {text:?} does not name a file or directory"
        )));
    }
    Ok(full)
}

/// The final component of an absolute path with one.
fn final_name(path: &Path) -> Result<&str, WorkspaceError> {
    path.file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| WorkspaceError::NotUtf8(path.display().to_string()))
}

/// Host → guest: a tar of `host` (as `NAME`, `NAME/...`), placed at `guest` by the guest.
fn to_guest(
    target: &SshTarget,
    host: &Path,
    guest: &str,
    channel: &Path,
    progress: &Arc<Progress>,
) -> Result<CopyResult, WorkspaceError> {
    let name = final_name(host)?.to_owned();
    let parent = host.parent().unwrap_or(Path::new("/"));
    let scan = fileset::scan_one(parent, &name)?;
    let mut plan = fileset::plan(&Manifest::new(), scan);
    progress.set_totals(&plan);
    let script = |receive: &Receive| place_in_guest_script(guest, &name, receive);
    let sent = transfer::send(
        target,
        parent,
        &mut plan,
        false,
        true,
        Some(channel),
        progress,
        &script,
    )?;
    Ok(CopyResult {
        written: guest.to_owned(),
        entries: sent.files,
        bytes: sent.bytes,
        channel: sent.channel,
        ..CopyResult::default()
    })
}

/// The guest script of a copy to the guest: an existing directory `dest` receives `name`;
/// otherwise the tar goes to a fresh directory beside `dest` and `name` is renamed to
/// `dest` (replacing a file there), so a failed copy leaves nothing half-written.
/// (`read_tar` uses `p` and `t` before it runs the extraction; this script's own variables
/// are set again or unused after it.)
fn place_in_guest_script(dest: &str, name: &str, receive: &Receive) -> String {
    let extract = read_tar(
        receive.channel_token.as_deref(),
        "tar -x --no-same-owner -p -f -",
    );
    let (d, b) = (shell_quote(dest), shell_quote(name));
    format!(
        "set -e; d={d}; if [ -d \"$d\" ]; then cd \"$d\"; {extract} else \
         p=$(dirname -- \"$d\"); if [ ! -d \"$p\" ]; then \
         echo \"banger: $p is not a directory in the guest\" >&2; exit 1; fi; \
         s=$(mktemp -d \"$p/.banger-cp.XXXXXX\"); trap 'rm -rf \"$s\"' EXIT; cd \"$s\"; \
         {extract} mv -fT -- \"$s\"/{b} \"$d\"; fi"
    )
}

/// Guest → host: the guest's `tar -c` of `guest` through the extractor, placed at `host`.
fn from_guest(
    target: &SshTarget,
    guest: &str,
    host: &Path,
    progress: &Arc<Progress>,
) -> Result<CopyResult, WorkspaceError> {
    let name = guest.rsplit('/').next().unwrap_or_default().to_owned();
    let parent = match guest.rsplit_once('/') {
        Some(("", _)) | None => "/".to_owned(),
        Some((p, _)) => p.to_owned(),
    };
    // Where the copy goes: into an existing directory under its name, or as `host`.
    let (dest, into) = match std::fs::metadata(host) {
        Ok(meta) if meta.is_dir() => {
            let dir = host.canonicalize().map_err(WorkspaceError::io(format!(
                "cannot resolve {}",
                host.display()
            )))?;
            (dir.join(&name), dir)
        }
        _ => {
            let parent = host.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(WorkspaceError::NotADirectory(parent.display().to_string()));
            }
            (host.to_path_buf(), parent.to_path_buf())
        }
    };
    let staging = tempfile::Builder::new()
        .prefix(".banger-staging-")
        .tempdir_in(&into)
        .map_err(WorkspaceError::io(format!(
            "cannot create a staging directory in {}",
            into.display()
        )))?;
    let tree = staging.path().join("tree");
    let script = format!(
        "set -e; cd -- {}; b={}; if [ ! -e \"$b\" ] && [ ! -L \"$b\" ]; then \
         printf 'banger: %s does not exist in the guest\\n' {} >&2; exit 1; fi; \
         tar -c -f - -- \"$b\"",
        shell_quote(&parent),
        shell_quote(&name),
        shell_quote(guest)
    );
    let (extracted, _) = stream_from_guest(target, &script, |out| {
        let counted = Counted {
            inner: out,
            progress,
        };
        extract::extract(
            counted,
            &tree,
            Some(OsStr::new(&name)),
            &extract::Rules::lenient(),
        )
    })?;
    if extracted.root.is_none() {
        return Err(WorkspaceError::Refused(format!(
            "the guest sent nothing for {guest}"
        )));
    }
    extract::install(&tree, &dest)?;
    Ok(CopyResult {
        written: dest.display().to_string(),
        entries: extracted.entries,
        bytes: extracted.bytes,
        skipped: extracted.skipped,
        skipped_count: extracted.skipped_count,
        channel: TransferChannel::Ssh,
        elapsed_ms: 0,
    })
}

/// Counts the bytes read through it into the copy's progress.
struct Counted<'a, R> {
    inner: R,
    progress: &'a Progress,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest script, run here with sh on a tar of `name`: into an existing directory,
    /// and to a new name (through a temporary directory that is gone afterwards). Without the
    /// channel device the script reads stdin.
    #[test]
    fn the_guest_script_places_the_copy_like_cp_r() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("item/sub")).unwrap();
        std::fs::write(src.join("item/sub/f"), "x").unwrap();
        let tar = std::process::Command::new("tar")
            .arg("-C")
            .arg(&src)
            .args(["-cf", "-", "item"])
            .output()
            .unwrap()
            .stdout;
        let run = |dest: &Path| {
            let receive = Receive {
                channel_token: Some("0123abcd".into()),
                ..Receive::default()
            };
            let script = place_in_guest_script(dest.to_str().unwrap(), "item", &receive);
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&tar).unwrap();
            assert!(child.wait().unwrap().success(), "{script}");
        };
        let into = dir.path().join("into");
        std::fs::create_dir(&into).unwrap();
        run(&into);
        assert_eq!(
            std::fs::read_to_string(into.join("item/sub/f")).unwrap(),
            "x"
        );
        let renamed = dir.path().join("renamed");
        run(&renamed);
        assert_eq!(std::fs::read_to_string(renamed.join("sub/f")).unwrap(), "x");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 3, "a temporary directory was left: {left:?}");
    }

    #[test]
    fn guest_paths_name_one_object() {
        assert_eq!(guest_path("/etc/hosts").unwrap(), "/etc/hosts");
        assert_eq!(guest_path("repo/").unwrap(), "/root/repo");
        for bad in ["", "/", "/tmp/.", "/tmp/..", "a/..", "x\0y"] {
            assert!(guest_path(bad).is_err(), "{bad:?}");
        }
    }
}
