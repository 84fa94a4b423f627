//! Workspace operations of the [`Manager`]: prepare (full, then incremental from the
//! manifest), status (host side from the manifest, guest side by size/mtime over SSH),
//! export (the guest's changes since prepare as a patch or files), and the git identity that
//! reaches the guest at start.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::{
    ExportResult, ExportWorkspaceRequest, PrepareProgress, PrepareResult, PrepareWorkspaceRequest,
    VmName, VmState, WorkspaceDiff, WorkspaceStatus,
};
use tracing::info;

use super::Manager;
use crate::Error;
use crate::guest::ssh::{SshTarget, shell_quote};
use crate::model::VmRecord;
use crate::store::WorkspaceRecord;
use crate::workspace::fileset::{self, Diff, Kind, Manifest};
use crate::workspace::transfer::{self, Progress};
use crate::workspace::{self, GUEST_DIR, WorkspaceError, extract, patch};

/// Paths listed per category in a status.
const LIST_LIMIT: usize = 100;
/// Bound on guest-side status and export commands.
const GUEST_LIMIT: Duration = Duration::from_secs(600);

impl Manager {
    /// The record of a VM that must be running for `what`.
    pub(super) async fn running_vm(&self, name: &VmName) -> Result<VmRecord, Error> {
        let record = self.observed_vm(name).await?;
        if record.state != VmState::Running {
            return Err(super::not_running(name, record.state));
        }
        Ok(record)
    }

    /// Copies the host directory into the guest's /root/repo, sending only what changed since
    /// the last prepare and deleting in the guest what the host no longer has.
    pub async fn prepare_workspace(
        &self,
        name: &str,
        request: PrepareWorkspaceRequest,
    ) -> Result<PrepareResult, Error> {
        let started = Instant::now();
        let name = VmName::parse(name)?;
        let path = PathBuf::from(&request.path);
        if !path.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "workspace path {:?} is not absolute",
                request.path
            )));
        }
        let _vm = self.locked(name.as_str()).await?;
        let record = self.running_vm(&name).await?;
        let target = self.ssh_target(&record)?;
        let channel = self.layout.vm_workspace_channel(&record.id);
        let git = !request.no_git;
        let id = record.id.clone();
        let old = self.db.run(move |s| s.manifest(&id)).await?;
        let fresh = old.is_empty();
        let progress = Arc::new(Progress::default());
        let _running = Running::new(self, &name, &progress);
        crate::fault::point("workspace.before_transfer")?;
        let (root, head, plan, sent) = tokio::task::spawn_blocking(move || {
            let root = fileset::resolve_root(&path, git)?;
            let head = if git { fileset::head(&root) } else { None };
            let scan = fileset::scan(&root, git)?;
            let mut plan = fileset::plan(&old, scan);
            progress.set_totals(&plan);
            let sent = transfer::send(
                &target,
                &root,
                &mut plan,
                git,
                fresh,
                Some(&channel),
                &progress,
                &crate::workspace::receive_script,
            )?;
            Ok::<_, WorkspaceError>((root, head, plan, sent))
        })
        .await
        .map_err(|e| Error::Failed(format!("prepare worker failed: {e}")))??;
        crate::fault::point("workspace.after_transfer")?;
        let host_path = root.display().to_string();
        let ws = WorkspaceRecord {
            host_path: host_path.clone(),
            git,
            head: head.clone(),
            base_tree: sent.base_tree.clone(),
            prepared_at: crate::now_rfc3339(),
        };
        let files_total = plan.next.len() as u64;
        let (id, saved, next) = (record.id.clone(), ws, plan.next);
        self.db
            .run(move |s| s.save_workspace(&id, &saved, &next))
            .await?;
        let result = PrepareResult {
            host_path,
            commit: head,
            files_total,
            files_sent: sent.files,
            bytes_sent: sent.bytes,
            wire_bytes: sent.wire_bytes,
            files_deleted: sent.deleted,
            elapsed_ms: started.elapsed().as_millis() as u64,
            channel: sent.channel,
        };
        info!(vm = %name, path = %result.host_path, sent = result.files_sent, bytes = result.bytes_sent, deleted = result.files_deleted, channel = ?result.channel, "workspace prepared");
        Ok(result)
    }

    /// Counters of the prepare running in VM `name`, if any.
    pub fn prepare_progress(&self, name: &str) -> Result<PrepareProgress, Error> {
        let name = VmName::parse(name)?;
        let prepares = self.prepares.lock().unwrap_or_else(|p| p.into_inner());
        Ok(prepares
            .get(name.as_str())
            .map(|p| p.to_api())
            .unwrap_or_default())
    }

    /// What was prepared and how the host (and with `guest`, the guest) differs now.
    pub async fn workspace_status(
        &self,
        name: &str,
        guest: bool,
    ) -> Result<WorkspaceStatus, Error> {
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name).await?;
        let id = record.id.clone();
        let (ws, manifest) = self
            .db
            .run(move |s| {
                Ok::<_, crate::store::StoreError>(match s.workspace(&id)? {
                    Some(ws) => Some((ws, s.manifest(&id)?)),
                    None => None,
                })
            })
            .await?
            .unzip();
        let (Some(ws), Some(manifest)) = (ws, manifest) else {
            return Ok(WorkspaceStatus::default());
        };
        let guest_diff = if guest {
            let record = self.running_vm(&name).await?;
            Some(self.guest_diff(&record, &manifest).await?)
        } else {
            None
        };
        let (git, host_path) = (ws.git, ws.host_path.clone());
        let (head_now, host) = tokio::task::spawn_blocking(move || {
            let root = fileset::resolve_root(Path::new(&host_path), git)?;
            let head = if git { fileset::head(&root) } else { None };
            let scan = fileset::scan(&root, git)?;
            let diff = fileset::host_diff(&root, &manifest, &scan)?;
            Ok::<_, WorkspaceError>((head, diff))
        })
        .await
        .map_err(|e| Error::Failed(format!("status worker failed: {e}")))??;
        let host = to_api(host);
        Ok(WorkspaceStatus {
            prepared: true,
            host_dirty: host.total() > 0 || head_now != ws.head,
            host_path: Some(ws.host_path),
            git: ws.git,
            commit: ws.head,
            head_now,
            prepared_at: Some(ws.prepared_at),
            host: Some(host),
            guest: guest_diff,
        })
    }

    /// Guest files (outside `.git`) that differ from the manifest by type, size or mtime.
    async fn guest_diff(
        &self,
        record: &VmRecord,
        manifest: &Manifest,
    ) -> Result<WorkspaceDiff, Error> {
        let target = self.ssh_target(record)?;
        let (code, stdout, stderr) = crate::guest::ssh::run(
            &target,
            workspace::GUEST_LIST_SCRIPT,
            Duration::from_secs(10),
            GUEST_LIMIT,
        )
        .await?;
        if code != Some(0) {
            return Err(WorkspaceError::Remote {
                code,
                stderr: crate::cause::last_line(&stderr, "").unwrap_or_default(),
            }
            .into());
        }
        let mut diff = Diff::default();
        let mut seen = std::collections::HashSet::new();
        let fields: Vec<&str> = stdout.split('\0').collect();
        for record in fields.chunks_exact(4) {
            let (path, kind, size, mtime) = (record[0], record[1], record[2], record[3]);
            seen.insert(path);
            let secs = mtime.split('.').next().and_then(|s| s.parse::<i64>().ok());
            match manifest.get(path) {
                None if kind != "d" => diff.added.push(path.to_owned()),
                None => {}
                Some(entry) => {
                    let same = match entry.kind {
                        Kind::File => {
                            kind == "f"
                                && size.parse::<u64>().ok() == Some(entry.size)
                                && secs == Some(entry.mtime_ns.div_euclid(1_000_000_000))
                        }
                        Kind::Symlink => kind == "l",
                        Kind::Dir => kind == "d",
                    };
                    if !same {
                        diff.modified.push(path.to_owned());
                    }
                }
            }
        }
        for path in manifest.keys() {
            if !fileset::in_git_dir(path) && !seen.contains(path.as_str()) {
                diff.removed.push(path.clone());
            }
        }
        diff.added.sort();
        diff.modified.sort();
        Ok(to_api(diff))
    }

    /// Writes the guest's changes since the last prepare to a patch file or a directory.
    pub async fn export_workspace(
        &self,
        name: &str,
        request: ExportWorkspaceRequest,
    ) -> Result<ExportResult, Error> {
        let name = VmName::parse(name)?;
        let (dest, as_patch) = match (&request.patch, &request.to) {
            (Some(p), None) => (PathBuf::from(p), true),
            (None, Some(d)) => (PathBuf::from(d), false),
            _ => {
                return Err(Error::InvalidRequest(
                    "export needs exactly one of `patch` and `to`".into(),
                ));
            }
        };
        if !dest.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "export destination {} is not absolute",
                dest.display()
            )));
        }
        let _vm = self.locked(name.as_str()).await?;
        let record = self.running_vm(&name).await?;
        let id = record.id.clone();
        let ws = self.db.run(move |s| s.workspace(&id)).await?;
        let Some(base) = ws.and_then(|w| w.base_tree) else {
            return Err(WorkspaceError::NotPrepared(name.to_string()).into());
        };
        let target = self.ssh_target(&record)?;
        let result = tokio::task::spawn_blocking(move || {
            if as_patch {
                export_patch(&target, &base, &dest)
            } else {
                export_files(&target, &base, &dest)
            }
        })
        .await
        .map_err(|e| Error::Failed(format!("export worker failed: {e}")))??;
        info!(vm = %name, written = %result.written, bytes = result.bytes, "workspace exported");
        Ok(result)
    }

    /// The readiness probe of a start: it also writes the host's git identity (user.name,
    /// user.email of the daemon's user) into the guest's ~/.gitconfig, in the same SSH
    /// connection. Best effort: it exits 0 whatever git says, so readiness never depends on it.
    pub(super) async fn readiness_probe(&self) -> String {
        let mut script = Vec::new();
        let mut identity = Vec::new();
        for key in ["user.name", "user.email"] {
            let value = tokio::process::Command::new("git")
                .args(["config", "--global", "--get", key])
                .stdin(Stdio::null())
                .output()
                .await;
            if let Ok(out) = value
                && out.status.success()
            {
                let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !value.is_empty() {
                    script.push(format!("git config --global {key} {}", shell_quote(&value)));
                    identity.push(format!("{key}={value}"));
                }
            }
        }
        if script.is_empty() {
            return "true".into();
        }
        // Git is slow to start under TCG: run it only when the identity differs from the one
        // written last time (recorded on the work disk), so a restart pays nothing.
        let identity = shell_quote(&identity.join(" "));
        format!(
            "{{ m=/root/.banger/git-identity; cur=; read -r cur < \"$m\"; \
             [ \"$cur\" = {identity} ] || {{ {} && printf '%s\\n' {identity} > \"$m\"; }}; }} \
             >/dev/null 2>&1; true",
            script.join(" && ")
        )
    }
}

/// Registers a transfer's counters (a prepare's or a copy's) for `prepare_progress` while
/// it runs.
pub(super) struct Running<'a> {
    manager: &'a Manager,
    name: String,
}

impl<'a> Running<'a> {
    pub(super) fn new(manager: &'a Manager, name: &VmName, progress: &Arc<Progress>) -> Self {
        manager
            .prepares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), progress.clone());
        Self {
            manager,
            name: name.to_string(),
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.manager
            .prepares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// Guest stderr kept at most (the rest is read and dropped).
pub(super) const STDERR_CAP: usize = 16 << 20;
/// Bytes of a guest patch at most.
const PATCH_CAP: u64 = 1 << 30;

/// Runs `script` in the guest and hands its stdout to `consume` as it streams; returns what
/// `consume` returned and the first [`STDERR_CAP`] bytes of stderr. When `consume` fails,
/// ssh is killed; a guest that exits non-zero is an error with its last stderr line.
pub(super) fn stream_from_guest<T>(
    target: &SshTarget,
    script: &str,
    consume: impl FnOnce(&mut dyn Read) -> Result<T, WorkspaceError>,
) -> Result<(T, Vec<u8>), WorkspaceError> {
    let mut child = target
        .batch_command(Duration::from_secs(10))
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(WorkspaceError::io("cannot run ssh"))?;
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(pipe) = stderr {
            let mut pipe = pipe;
            let _ = (&mut pipe).take(STDERR_CAP as u64).read_to_end(&mut kept);
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        }
        kept
    });
    let mut overran = false;
    let consumed = match child.stdout.take() {
        Some(mut out) => {
            let result = consume(&mut out);
            if result.is_err() {
                let _ = child.kill();
            }
            // Whatever is left (the tar's trailing blocks) is drained so ssh can exit, within
            // bounds: a guest that keeps writing is cut off (killing ssh ends the drain).
            if !drain_bounded(out, DRAIN_CAP, DRAIN_LIMIT) {
                overran = true;
                let _ = child.kill();
            }
            result
        }
        None => Err(WorkspaceError::Io {
            context: "ssh has no stdout".into(),
            source: std::io::Error::other("no pipe"),
        }),
    };
    let status = child.wait().map_err(WorkspaceError::io("ssh failed"));
    let stderr = reader.join().unwrap_or_default();
    let status = status?;
    if overran && consumed.is_ok() {
        return Err(WorkspaceError::Refused(format!(
            "the guest kept writing after its output (over {DRAIN_CAP} bytes or {} s)",
            DRAIN_LIMIT.as_secs()
        )));
    }
    if !status.success() && consumed.is_ok() {
        return Err(WorkspaceError::Remote {
            code: status.code(),
            stderr: crate::cause::last_line(&String::from_utf8_lossy(&stderr), "")
                .unwrap_or_default(),
        });
    }
    Ok((consumed?, stderr))
}

/// Bytes of the guest's stdout read after the consumer is done (a tar's trailing blocks).
const DRAIN_CAP: u64 = 1 << 20;
/// How long the guest may take to close its stdout after the consumer is done.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Reads `out` to its end on a thread, up to `cap` bytes within `limit`: whether it ended
/// in bounds. Past them the thread keeps reading until the writer goes (the caller kills it).
fn drain_bounded(out: impl Read + Send + 'static, cap: u64, limit: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = out;
        let read = std::io::copy(&mut (&mut out).take(cap + 1), &mut std::io::sink());
        let _ = tx.send(matches!(read, Ok(n) if n <= cap));
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    rx.recv_timeout(limit).unwrap_or(false)
}

/// `export --patch`: the guest's patch, streamed to a private file beside `dest`, checked
/// ([`patch::check`]) and renamed into place only when it is safe.
fn export_patch(
    target: &SshTarget,
    base: &str,
    dest: &Path,
) -> Result<ExportResult, WorkspaceError> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".banger-patch-")
        .tempfile_in(parent)
        .map_err(WorkspaceError::io(format!(
            "cannot write in {}",
            parent.display()
        )))?;
    let (bytes, _) = stream_from_guest(target, &workspace::export_patch_script(base), |out| {
        let copied = std::io::copy(&mut out.take(PATCH_CAP + 1), tmp.as_file_mut())
            .map_err(WorkspaceError::io("cannot read the guest's patch"))?;
        if copied > PATCH_CAP {
            return Err(WorkspaceError::Refused(format!(
                "the patch is larger than {PATCH_CAP} bytes"
            )));
        }
        Ok(copied)
    })?;
    let file = tmp
        .reopen()
        .map_err(WorkspaceError::io("cannot read the patch back"))?;
    patch::check(std::io::BufReader::new(file))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(WorkspaceError::io(format!(
            "cannot write {}",
            dest.display()
        )))?;
    tmp.persist(dest).map_err(|e| WorkspaceError::Io {
        context: format!("cannot write {}", dest.display()),
        source: e.error,
    })?;
    Ok(ExportResult {
        written: dest.display().to_string(),
        bytes,
        files: 0,
        deleted: Vec::new(),
    })
}

/// `export --to`: the guest's changed files through the safe extractor
/// ([`extract::stage_for_dir`]); the deleted paths are reported, never applied.
fn export_files(
    target: &SshTarget,
    base: &str,
    dest: &Path,
) -> Result<ExportResult, WorkspaceError> {
    // Staged while the guest streams; moved into place only once the guest exited 0 too.
    let (staged, err) = stream_from_guest(target, &workspace::export_files_script(base), |out| {
        extract::stage_for_dir(out, dest, &extract::Rules::strict())
    })?;
    let extracted = staged.install(dest)?;
    let deleted = String::from_utf8_lossy(&err)
        .split_once(&format!("{}\n", workspace::DELETED_MARKER))
        .map(|(_, list)| {
            list.split('\0')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(ExportResult {
        written: dest.display().to_string(),
        bytes: extracted.bytes,
        files: extracted.entries,
        deleted,
    })
}

fn to_api(diff: Diff) -> WorkspaceDiff {
    let cap = |v: &Vec<String>| v.iter().take(LIST_LIMIT).cloned().collect();
    WorkspaceDiff {
        added: cap(&diff.added),
        modified: cap(&diff.modified),
        removed: cap(&diff.removed),
        added_count: diff.added.len() as u64,
        modified_count: diff.modified.len() as u64,
        removed_count: diff.removed.len() as u64,
    }
}

/// Where `vm exec` runs: /root/repo once a workspace was prepared.
pub(super) fn workdir(prepared: bool) -> Option<String> {
    prepared.then(|| GUEST_DIR.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_drain_of_guest_output_is_bounded_in_bytes_and_time() {
        // A tar's trailing blocks: drained.
        let (mut guest, host) = UnixStream::pair().expect("pair");
        guest.write_all(&[0; 10240]).expect("write");
        drop(guest);
        assert!(drain_bounded(host, 1 << 20, Duration::from_secs(30)));
        // An endless stream: cut off at the byte cap.
        assert!(!drain_bounded(
            std::io::repeat(7),
            1 << 20,
            Duration::from_secs(30)
        ));
        // A guest that neither writes nor closes: cut off at the time limit.
        let (guest, host) = UnixStream::pair().expect("pair");
        let started = Instant::now();
        assert!(!drain_bounded(host, 1 << 20, Duration::from_millis(200)));
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(guest);
    }
}
