//! SSH to guests with the system OpenSSH client, the daemon's side: bounded remote commands,
//! readiness polling and key generation. The command line itself ([`SshTarget`], shared with
//! the CLI, whose `vm exec` / `vm ssh` exec `ssh` directly so TTYs, signals and exit codes pass
//! through untouched) lives in banger-shared.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Why an SSH step failed.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh-keygen failed: {0}")]
    Keygen(String),
    #[error("ssh is not installed")]
    MissingSsh,
    #[error("the guest's SSH server did not answer within {0}s")]
    NotReady(u64),
    #[error("remote command timed out after {0}s")]
    Timeout(u64),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub use banger_shared::ssh::{CIPHERS, SshTarget, shell_quote};

/// Runs `script` in the guest (non-interactive), bounded by `connect` for the dial and
/// `limit` overall. Returns (exit status, stdout, stderr); each keeps at most
/// [`OUTPUT_CAP`] bytes (the guest is not trusted to be brief), invalid UTF-8 replaced.
pub async fn run(
    target: &SshTarget,
    script: &str,
    connect: Duration,
    limit: Duration,
) -> Result<(Option<i32>, String, String), SshError> {
    let mut child = spawn(target, connect, script, Stdio::null())?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        let (out, err) = tokio::join!(read_capped(stdout), read_capped(stderr));
        let status = child.wait().await;
        (status, out, err)
    };
    match tokio::time::timeout(limit, work).await {
        Ok((Ok(status), out, err)) => Ok((status.code(), out, err)),
        Ok((Err(e), _, _)) => Err(SshError::Io {
            context: "ssh failed".into(),
            source: e,
        }),
        Err(_) => Err(SshError::Timeout(limit.as_secs())),
    }
}

/// The guest side of [`freeze`]: `sync`, a watchdog that thaws after `WATCHDOG` seconds
/// whatever happens, both filesystems frozen (the work disk's `/root`, then `/`), `frozen`
/// printed; then it waits for a line or the end of its input (the daemon's thaw, or ssh
/// ending because the daemon died) and thaws. Nothing in it writes to a filesystem once they
/// are frozen (`read`, `echo` are builtins; `fsfreeze -u` only reads its binary).
const FREEZE_SCRIPT: &str = "sync
( sleep WATCHDOG; fsfreeze -u / ; fsfreeze -u /root ) </dev/null >/dev/null 2>&1 &
w=$!
thaw() { fsfreeze -u / 2>/dev/null; fsfreeze -u /root 2>/dev/null; kill $w 2>/dev/null; }
trap 'thaw; exit 1' HUP INT TERM PIPE
if ! { fsfreeze -f /root && fsfreeze -f /; }; then thaw; exit 3; fi
echo frozen
read -r line
thaw
echo thawed
";

/// A guest whose filesystems [`freeze`] froze. [`Frozen::thaw`] thaws them; so does
/// dropping it (ssh is killed, the guest reads the end of its input) and, should even that
/// not reach the guest, the guest's own watchdog.
#[derive(Debug)]
pub struct Frozen {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// `ssh` running `script` in the guest, its output piped, killed when dropped.
fn spawn(
    target: &SshTarget,
    connect: Duration,
    script: &str,
    stdin: Stdio,
) -> Result<tokio::process::Child, SshError> {
    Command::from(target.batch_command(connect))
        .arg(script)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SshError::MissingSsh,
            _ => SshError::Io {
                context: "cannot run ssh".into(),
                source: e,
            },
        })
}

/// Syncs and freezes the guest's `/root` and `/` (`fsfreeze`), so their disks hold a clean
/// filesystem until [`Frozen::thaw`]; the guest thaws by itself after `watchdog`. Bounded
/// by `limit` (the sync may take a while).
pub async fn freeze(
    target: &SshTarget,
    connect: Duration,
    watchdog: Duration,
    limit: Duration,
) -> Result<Frozen, SshError> {
    use tokio::io::AsyncBufReadExt;
    let script = FREEZE_SCRIPT.replace("WATCHDOG", &watchdog.as_secs().max(1).to_string());
    let mut child = spawn(target, connect, &script, Stdio::piped())?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().ok_or_else(|| SshError::Io {
        context: "ssh has no stdout".into(),
        source: std::io::Error::other("no pipe"),
    })?;
    let mut frozen = Frozen {
        child,
        stdin,
        stdout: tokio::io::BufReader::new(stdout).lines(),
    };
    match tokio::time::timeout(limit, frozen.wait_for("frozen")).await {
        Ok(Ok(())) => Ok(frozen),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SshError::Timeout(limit.as_secs())),
    }
}

impl Frozen {
    /// Reads the remote's output up to the line `word`; its end first is a failure, told
    /// with what it wrote to stderr.
    async fn wait_for(&mut self, word: &str) -> Result<(), SshError> {
        loop {
            match self.stdout.next_line().await {
                Ok(Some(line)) if line.trim() == word => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let stderr = self.child.stderr.take();
                    let err = read_capped(stderr).await;
                    let status = self.child.wait().await.ok().and_then(|s| s.code());
                    return Err(SshError::Io {
                        context: format!(
                            "the guest did not say {word} (exit {status:?}): {}",
                            err.trim()
                        ),
                        source: std::io::Error::other("fsfreeze"),
                    });
                }
            }
        }
    }

    /// Thaws the guest's filesystems and waits (up to `limit`) for it to say so.
    pub async fn thaw(mut self, limit: Duration) -> Result<(), SshError> {
        use tokio::io::AsyncWriteExt;
        if let Some(mut stdin) = self.stdin.take() {
            // A failed write means ssh is gone: the guest then reads the end of its input.
            let _ = stdin.write_all(b"thaw\n").await;
            drop(stdin);
        }
        match tokio::time::timeout(limit, self.wait_for("thawed")).await {
            Ok(result) => {
                let _ = tokio::time::timeout(limit, self.child.wait()).await;
                result
            }
            Err(_) => Err(SshError::Timeout(limit.as_secs())),
        }
    }
}

/// Polls until the guest's sshd accepts banger's key and runs `probe` (which must exit 0
/// whenever the guest is up: it doubles as first-boot setup, saving a connection), the
/// `alive` check fails (returns `Ok(false)`), or `limit` passes.
pub async fn wait_ready(
    target: &SshTarget,
    limit: Duration,
    probe: &str,
    mut alive: impl FnMut() -> bool,
) -> Result<bool, SshError> {
    let deadline = Instant::now() + limit;
    loop {
        if !alive() {
            return Ok(false);
        }
        if banner(&target.host, target.port).await {
            let left = deadline.saturating_duration_since(Instant::now());
            let bound = left.min(Duration::from_secs(20));
            if let Ok((Some(0), _, _)) = run(target, probe, Duration::from_secs(5), bound).await {
                return Ok(true);
            }
        }
        if Instant::now() >= deadline {
            return Err(SshError::NotReady(limit.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether an SSH server greets on host:port within a second. QEMU's user-mode forwarding
/// accepts connections before the guest listens, so a connect alone proves nothing.
async fn banner(host: &str, port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let mut buf = [0u8; 8];
        let mut read = 0;
        while read < 4 {
            let n = stream.read(&mut buf[read..]).await.ok()?;
            if n == 0 {
                return None;
            }
            read += n;
        }
        (&buf[..4] == b"SSH-").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(()))
    )
}

/// Generates an ed25519 key pair at `path` (and `path.pub`) unless it exists; returns the
/// public key line.
pub async fn ensure_key(path: &Path, comment: &str) -> Result<String, SshError> {
    let public = path.with_extension("pub");
    if !path.exists() {
        let output = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| SshError::Keygen(e.to_string()))?;
        if !output.status.success() {
            return Err(SshError::Keygen(crate::cause::of_failure(
                "ssh-keygen",
                &output.status,
                &output.stderr,
            )));
        }
    }
    std::fs::read_to_string(&public)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SshError::Io {
            context: format!("cannot read {}", public.display()),
            source,
        })
}

/// Bytes of one guest output stream that [`run`] keeps; the rest is read and dropped so the
/// guest never blocks on a full pipe.
pub const OUTPUT_CAP: u64 = 16 << 20;

/// Reads `pipe` to its end, keeping the first [`OUTPUT_CAP`] bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let _ = (&mut pipe).take(OUTPUT_CAP).read_to_end(&mut kept).await;
    let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&kept).into_owned()
}
