//! The `ssh` command line to a guest, the same for the daemon and the CLI: banger's key pair,
//! the VM's host key pinned in its own known_hosts under a stable alias (`HostKeyAlias`, so
//! the forwarded port may change), connection sharing, and quoting for the remote shell.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
pub const CONTROL_PERSIST_SECS: u32 = 60;

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

    /// The one `ssh` command line to the guest: banger's options, then `extra`, then the
    /// host; the caller adds the remote command (and stdio).
    pub fn command(&self, extra: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("ssh");
        command.args(self.options()).args(extra).arg(&self.host);
        command
    }

    /// [`Self::command`] for a non-interactive command: no prompts, no tty, the dial bounded
    /// by `connect`.
    pub fn batch_command(&self, connect: Duration) -> std::process::Command {
        let timeout = format!("ConnectTimeout={}", connect.as_secs().max(1));
        self.command(&["-o", "BatchMode=yes", "-T", "-o", &timeout])
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
