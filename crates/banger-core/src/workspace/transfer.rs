//! Sends a [`Plan`] to the guest in one SSH session: the NUL-separated delete list, (git) the
//! list of sent worktree paths and the exclude file of untracked paths, then a tar of the
//! changed paths built here (the `tar` crate, GNU headers for long names), extracted by the
//! guest's `tar -x` into /root/repo. A large tar goes over the VM's workspace channel (a
//! virtio-serial port, QEMU) instead of the SSH session when the VM has one: the guest then
//! skips decrypting it, which under TCG took as long as extracting it. Files are opened with
//! `O_NOFOLLOW` and hashed while they stream, so the manifest records exactly the bytes that
//! were sent.

use std::io::{BufRead, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use banger_proto::TransferChannel;
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use super::fileset::{Kind, Plan, exclude_patterns, hex, in_git_dir, open_nofollow};
use super::{CHANNEL_ABSENT, CHANNEL_READY, Receive, WorkspaceError};
use crate::guest::ssh::{OUTPUT_CAP, SshTarget};

/// Counters of a running or finished transfer; shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    /// What this transfer will send, known once the plan is made.
    pub total_files: AtomicU64,
    pub total_bytes: AtomicU64,
}

impl Progress {
    /// Records the totals of `plan`.
    pub fn set_totals(&self, plan: &Plan) {
        self.total_files
            .store(plan.send.len() as u64, Ordering::Relaxed);
        self.total_bytes.store(plan.send_bytes(), Ordering::Relaxed);
    }

    /// The API view.
    pub fn to_api(&self) -> banger_proto::PrepareProgress {
        banger_proto::PrepareProgress {
            running: true,
            files_sent: self.files.load(Ordering::Relaxed),
            files_total: self.total_files.load(Ordering::Relaxed),
            bytes_sent: self.bytes.load(Ordering::Relaxed),
            bytes_total: self.total_bytes.load(Ordering::Relaxed),
        }
    }
}

/// What a transfer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// Entries sent (files, symlinks, directories).
    pub files: u64,
    /// File content bytes sent.
    pub bytes: u64,
    /// Bytes written to the SSH session (delete list + tar, with headers and padding).
    pub wire_bytes: u64,
    /// Paths deleted in the guest.
    pub deleted: u64,
    /// Tree id of the prepared state in the guest (git workspaces).
    pub base_tree: Option<String>,
    /// Which way the tar went.
    pub channel: TransferChannel,
}

/// NUL-terminated `paths`.
fn nul_list<'a>(paths: impl Iterator<Item = &'a String>) -> Vec<u8> {
    let mut out = Vec::new();
    for path in paths {
        out.extend_from_slice(path.as_bytes());
        out.push(0);
    }
    out
}

/// Transfers with fewer content bytes than this go over SSH: for them, the channel's extra
/// step (the guest's answer before the tar starts) costs more than the encryption it saves.
pub const CHANNEL_MIN_BYTES: u64 = 1 << 20;

/// Sends `plan` from `root` to the guest; fills in the hashes of the sent files in
/// `plan.next`. `fresh`: the guest holds no earlier prepare. `channel`: the host end of the
/// VM's workspace channel (see [`crate::layout::WORKSPACE_CHANNEL_SOCKET`]), used for the tar
/// of a large transfer when it accepts a connection and the guest has the port; the lists
/// and anything smaller go over SSH. `script` makes the guest's script from what it must
/// read: [`super::receive_script`] for a workspace prepare (`vm cp` runs its own, built around
/// [`super::read_tar`]). Blocking: run it on a blocking thread.
#[allow(clippy::too_many_arguments)]
pub fn send(
    target: &SshTarget,
    root: &Path,
    plan: &mut Plan,
    git: bool,
    fresh: bool,
    channel: Option<&Path>,
    progress: &Arc<Progress>,
    script: &dyn Fn(&Receive) -> String,
) -> Result<Sent, WorkspaceError> {
    let deletes = nul_list(plan.delete.iter());
    let (changed, excludes) = if git {
        // A fresh tree index is built from scratch: the list would only be ignored.
        let changed = if fresh {
            Vec::new()
        } else {
            let paths = plan.send.iter().chain(&plan.delete);
            nul_list(paths.filter(|p| !in_git_dir(p)))
        };
        (changed, exclude_patterns(&plan.untracked))
    } else {
        (Vec::new(), Vec::new())
    };
    // Connected before the guest looks for the port, so the guest finds the host there. The
    // second handle unblocks a writer stuck on a channel whose guest end stopped reading.
    let (channel, channel_abort) = channel
        .filter(|_| plan.send_bytes() >= CHANNEL_MIN_BYTES)
        .and_then(|path| {
            let connected = UnixStream::connect(path).and_then(|s| Ok((s.try_clone()?, s)));
            match connected {
                Ok((abort, stream)) => Some((stream, abort)),
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "workspace channel unavailable; using ssh");
                    None
                }
            }
        })
        .unzip();
    let token = channel
        .as_ref()
        .map(|_| uuid::Uuid::new_v4().simple().to_string());
    let receive = Receive {
        delete_len: deletes.len(),
        changed_len: changed.len(),
        exclude_len: excludes.len(),
        git,
        fresh,
        channel_token: token.clone(),
    };
    let mut head = deletes;
    head.extend_from_slice(&changed);
    head.extend_from_slice(&excludes);
    let started = Instant::now();
    let mut child = target
        .batch_command(Duration::from_secs(10))
        .arg(script(&receive))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(WorkspaceError::io("cannot run ssh"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (answer_tx, answer_rx) = mpsc::channel::<Option<String>>();
    let wants_answer = token.is_some();
    let deleted = plan.delete.len() as u64;
    std::thread::scope(|scope| {
        // Stdout and stderr are drained on threads so a chatty guest cannot block the stream;
        // with a channel, the guest's answer (which way the tar goes) is passed on first.
        let stdout = scope.spawn(move || {
            let mut text = Vec::new();
            let Some(pipe) = stdout else {
                return String::new();
            };
            // The guest is not trusted to be brief: at most OUTPUT_CAP bytes are kept, the
            // rest is drained so ssh never blocks.
            let mut reader = std::io::BufReader::new(pipe.take(OUTPUT_CAP));
            if wants_answer {
                let mut answer = None;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let word = line.trim();
                    if word == CHANNEL_READY || word == CHANNEL_ABSENT {
                        answer = Some(word.to_owned());
                        break;
                    }
                    line.clear();
                }
                let _ = answer_tx.send(answer);
            }
            let _ = reader.read_to_end(&mut text);
            let _ = std::io::copy(&mut reader.into_inner().into_inner(), &mut std::io::sink());
            String::from_utf8_lossy(&text).into_owned()
        });
        let stderr = scope.spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = stderr {
                let _ = (&mut pipe).take(OUTPUT_CAP).read_to_end(&mut text);
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            }
            String::from_utf8_lossy(&text).into_owned()
        });
        let head = &head;
        let writer = scope.spawn(move || {
            let way = channel.zip(token);
            let written = write_tar(stdin, way, &answer_rx, root, plan, head, progress);
            (written, Instant::now())
        });
        let status = child.wait().map_err(WorkspaceError::io("ssh failed"));
        let finished = Instant::now();
        if let Some(abort) = channel_abort {
            let _ = abort.shutdown(Shutdown::Both);
        }
        let (written, streamed) = writer.join().unwrap_or_else(|_| {
            let panicked = WorkspaceError::Io {
                context: "the transfer thread panicked".into(),
                source: std::io::Error::other("panic"),
            };
            (Err(panicked), Instant::now())
        });
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let status = status?;
        if !status.success() {
            return Err(WorkspaceError::Remote {
                code: status.code(),
                stderr: crate::cause::last_line(&stderr, "").unwrap_or_default(),
            });
        }
        let (files, bytes, wire_bytes, channel) = written?;
        // Where a slow prepare spent its time: sending, or the guest's work after the last
        // byte (the end of extraction, the prepared-state tree).
        info!(
            ?channel,
            stream_ms = streamed.duration_since(started).as_millis() as u64,
            guest_tail_ms = finished.duration_since(streamed).as_millis() as u64,
            "workspace transfer done"
        );
        let base_tree = stdout
            .lines()
            .last()
            .map(str::trim)
            .filter(|s| s.len() >= 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned);
        Ok(Sent {
            files,
            bytes,
            wire_bytes,
            deleted,
            base_tree,
            channel,
        })
    })
}

/// Writes `head` (the lists) to ssh's stdin and the tar after it, or, with a channel (and
/// its token) and the guest's answer that it reads the port, the tar to the channel. Returns
/// (entries, content bytes, wire bytes, which way the tar went).
fn write_tar(
    stdin: Option<std::process::ChildStdin>,
    channel: Option<(UnixStream, String)>,
    answer: &mpsc::Receiver<Option<String>>,
    root: &Path,
    plan: &mut Plan,
    head: &[u8],
    progress: &Progress,
) -> Result<(u64, u64, u64, TransferChannel), WorkspaceError> {
    let Some(mut stdin) = stdin else {
        return Err(WorkspaceError::Io {
            context: "ssh has no stdin".into(),
            source: std::io::Error::other("no pipe"),
        });
    };
    let Some((channel, token)) = channel else {
        let (files, bytes, wire) = stream(stdin, root, plan, head, progress)?;
        return Ok((files, bytes, wire, TransferChannel::Ssh));
    };
    stdin
        .write_all(head)
        .map_err(WorkspaceError::io("the SSH session closed early"))?;
    let head_len = head.len() as u64;
    match answer.recv().ok().flatten().as_deref() {
        Some(CHANNEL_READY) => {
            drop(stdin);
            let (files, bytes, wire) = stream(&channel, root, plan, token.as_bytes(), progress)?;
            // The guest stops at the tar's end; this end-of-file is for tidiness.
            let _ = channel.shutdown(Shutdown::Write);
            Ok((files, bytes, wire + head_len, TransferChannel::VirtioSerial))
        }
        Some(_) => {
            let (files, bytes, wire) = stream(stdin, root, plan, &[], progress)?;
            Ok((files, bytes, wire + head_len, TransferChannel::Ssh))
        }
        None => Err(WorkspaceError::Io {
            context: "the SSH session closed early".into(),
            source: std::io::Error::other("no answer from the guest"),
        }),
    }
}

/// Writes `head` (the lists) and the tar; returns (entries, content bytes, wire bytes).
fn stream(
    stdin: impl Write,
    root: &Path,
    plan: &mut Plan,
    head: &[u8],
    progress: &Progress,
) -> Result<(u64, u64, u64), WorkspaceError> {
    let broken = WorkspaceError::io("the SSH session closed early");
    let mut out = Counting {
        inner: std::io::BufWriter::with_capacity(1 << 17, stdin),
        count: 0,
    };
    if let Err(e) = out.write_all(head) {
        return Err(broken(e));
    }
    let mut builder = tar::Builder::new(out);
    let (mut files, mut bytes) = (0u64, 0u64);
    for path in &plan.send {
        let Some(entry) = plan.next.get_mut(path) else {
            continue;
        };
        let full = root.join(path);
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(entry.mode);
        header.set_mtime(u64::try_from(entry.mtime_ns.div_euclid(1_000_000_000)).unwrap_or(0));
        match entry.kind {
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .map_err(WorkspaceError::io(format!("cannot send {path}")))?;
            }
            Kind::Symlink => {
                let target = match std::fs::read_link(&full) {
                    Ok(target) => target,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        entry.mtime_ns = -1;
                        entry.hash.clear();
                        continue;
                    }
                    Err(e) => {
                        return Err(WorkspaceError::Io {
                            context: format!("cannot read link {path}"),
                            source: e,
                        });
                    }
                };
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, path, &target)
                    .map_err(WorkspaceError::io(format!("cannot send {path}")))?;
            }
            Kind::File => {
                let file = match open_nofollow(&full) {
                    Ok(file) => file,
                    Err(WorkspaceError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        // Gone since the scan (e.g. `git gc` packed a loose object): not sent,
                        // and recorded as stale so the next prepare deletes or resends it.
                        entry.mtime_ns = -1;
                        entry.hash.clear();
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(entry.size);
                let mut reader = Exact {
                    inner: file,
                    left: entry.size,
                    hasher: Sha256::new(),
                    progress,
                };
                builder
                    .append_data(&mut header, path, &mut reader)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => WorkspaceError::Changed(path.clone()),
                        _ => WorkspaceError::Io {
                            context: format!("cannot send {path}"),
                            source: e,
                        },
                    })?;
                entry.hash = hex(&reader.hasher.finalize());
                bytes += entry.size;
            }
        }
        files += 1;
        progress.files.fetch_add(1, Ordering::Relaxed);
    }
    let mut out = builder
        .into_inner()
        .map_err(WorkspaceError::io("cannot finish the tar stream"))?;
    out.flush()
        .map_err(WorkspaceError::io("cannot finish the tar stream"))?;
    Ok((files, bytes, out.count))
}

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads exactly `left` bytes (the size in the tar header), hashing them; a file that shrank
/// is an `UnexpectedEof`, one that grew is cut at the recorded size (its next prepare sees the
/// new size and sends it again).
struct Exact<'a, R> {
    inner: R,
    left: u64,
    hasher: Sha256,
    progress: &'a Progress,
}

impl<R: Read> Read for Exact<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
