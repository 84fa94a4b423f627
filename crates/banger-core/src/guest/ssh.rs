//! SSH to guests with the system OpenSSH client: banger's key pair, per-VM host keys pinned in
//! a per-VM known_hosts under a stable alias (`HostKeyAlias`, so the forwarded port may change),
//! readiness polling and bounded remote commands. The CLI's `vm exec` / `vm ssh` use the same
//! options (see [`SshTarget::options`]) and exec `ssh` directly, so TTYs, signals and exit codes
//! pass through untouched.

use std::path::{Path, PathBuf};
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

/// Where and how to reach one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    pub host_key_alias: String,
    /// Shared-connection socket (OpenSSH `ControlPath`): commands after the first skip the
    /// key exchange, which costs a second or more against a TCG guest. `None` dials each time.
    pub control_path: Option<PathBuf>,
}

/// How long an idle shared connection stays open.
const CONTROL_PERSIST_SECS: u32 = 60;

/// Whether OpenSSH can use `path` as a ControlPath: a master binds it with a 17-byte random
/// suffix, and a Unix socket path holds 107 bytes. Longer paths make ssh fail outright, so
/// banger dials directly instead (slower, never broken).
fn control_path_fits(path: &Path) -> bool {
    path.as_os_str().len() + 17 < 108
}

/// Cipher preference for guest connections: AES-GCM ahead of OpenSSH's default
/// chacha20-poly1305. On x86 with AES-NI (KVM hosts, and QEMU's TCG `-cpu max` emulates it)
/// it is the cheaper one for the guest to decrypt: 100 MiB into a TCG guest took 8 s against
/// 12 s here, and bulk transfers (workspace prepare) are bound by the guest's CPU. `^` keeps
/// the rest of the default list behind it.
pub const CIPHERS: &str = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com";

impl SshTarget {
    /// `-o` options shared by the daemon and the CLI.
    pub fn options(&self) -> Vec<String> {
        let mut options = vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.identity.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("HostKeyAlias={}", self.host_key_alias),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-o".into(),
            format!("Ciphers={CIPHERS}"),
            "-p".into(),
            self.port.to_string(),
            "-l".into(),
            self.user.clone(),
        ];
        if let Some(control) = self.control_path.as_ref().filter(|c| control_path_fits(c)) {
            // `auto`: the first command becomes the master, later ones reuse it; a stale
            // socket (master gone) makes ssh dial directly instead of failing. The master
            // checks the guest every 15 s, so a dead guest ends it (and its sessions) instead
            // of leaving them waiting.
            options.extend([
                "-o".into(),
                "ControlMaster=auto".into(),
                "-o".into(),
                format!("ControlPath={}", control.display()),
                "-o".into(),
                format!("ControlPersist={CONTROL_PERSIST_SECS}"),
                "-o".into(),
                "ServerAliveInterval=15".into(),
                "-o".into(),
                "ServerAliveCountMax=3".into(),
            ]);
        }
        options
    }

    /// The same target dialling its own connection (bounded by `ConnectTimeout`, which does
    /// not apply to sessions through a master): for steps that must give up quickly on a
    /// hung guest, like the sync before a stop.
    pub fn direct(&self) -> Self {
        Self {
            control_path: None,
            ..self.clone()
        }
    }

    /// Runs `script` in the guest (non-interactive), bounded by `connect` for the dial and
    /// `limit` overall. Returns (exit status, stdout, stderr); each keeps at most
    /// [`OUTPUT_CAP`] bytes (the guest is not trusted to be brief), invalid UTF-8 replaced.
    pub async fn run(
        &self,
        script: &str,
        connect: Duration,
        limit: Duration,
    ) -> Result<(Option<i32>, String, String), SshError> {
        let mut child = Command::new("ssh")
            .args(self.options())
            .args(["-o", "BatchMode=yes", "-T"])
            .arg("-o")
            .arg(format!("ConnectTimeout={}", connect.as_secs().max(1)))
            .arg(&self.host)
            .arg(script)
            .stdin(Stdio::null())
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
            })?;
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

    /// Polls until the guest's sshd accepts banger's key and runs `probe` (which must exit 0
    /// whenever the guest is up: it doubles as first-boot setup, saving a connection), the
    /// `alive` check fails (returns `Ok(false)`), or `limit` passes.
    pub async fn wait_ready(
        &self,
        limit: Duration,
        probe: &str,
        mut alive: impl FnMut() -> bool,
    ) -> Result<bool, SshError> {
        let deadline = Instant::now() + limit;
        loop {
            if !alive() {
                return Ok(false);
            }
            if banner(&self.host, self.port).await {
                let left = deadline.saturating_duration_since(Instant::now());
                let bound = left.min(Duration::from_secs(20));
                if let Ok((Some(0), _, _)) = self.run(probe, Duration::from_secs(5), bound).await {
                    return Ok(true);
                }
            }
            if Instant::now() >= deadline {
                return Err(SshError::NotReady(limit.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
            return Err(SshError::Keygen(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ));
        }
    }
    std::fs::read_to_string(&public)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SshError::Io {
            context: format!("cannot read {}", public.display()),
            source,
        })
}

/// Quotes `arg` for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Bytes of one guest output stream that [`SshTarget::run`] keeps; the rest is read and
/// dropped so the guest never blocks on a full pipe.
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

#[cfg(test)]
mod tests {
    use super::{SshTarget, shell_quote};

    #[test]
    fn a_control_path_ssh_cannot_bind_is_left_out() {
        let target = |control: &str| SshTarget {
            host: "127.0.0.1".into(),
            port: 2222,
            user: "root".into(),
            identity: "/k".into(),
            known_hosts: "/kh".into(),
            host_key_alias: "a.vm".into(),
            control_path: Some(control.into()),
        };
        let short = format!("/run/user/1000/banger/vms/{}/ssh-control", "a".repeat(32));
        assert!(
            target(&short)
                .options()
                .iter()
                .any(|o| o.starts_with("ControlPath="))
        );
        let long = format!(
            "/home/someone/{}/run/vms/{}/ssh-control",
            "x".repeat(40),
            "a".repeat(32)
        );
        let options = target(&long).options();
        assert!(
            !options.iter().any(|o| o.starts_with("Control")),
            "{options:?}"
        );
        assert!(
            !target(&short)
                .direct()
                .options()
                .iter()
                .any(|o| o.starts_with("Control"))
        );
    }

    #[test]
    fn quoting_survives_the_remote_shell() {
        assert_eq!(shell_quote("uname"), "uname");
        assert_eq!(shell_quote("exit 7"), "'exit 7'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
