//! `vm clone SRC NEW [--snapshot SNAP]`: a new VM whose two disks are new empty qcow2
//! overlays over a named snapshot of SRC (without `--snapshot`, one taken now, `clone-NEW`,
//! live when SRC runs). A memory snapshot's clone boots from its disks; resuming a clone
//! from the memory (`--memory`) is refused: it would be a twin of SRC. Nothing is copied. The clone has its own record, id, name (its
//! hostname and DNS name), MAC and address like any new VM; its machine-id is its id, given
//! to systemd on the kernel command line at every boot (`systemd.machine_id=`), since the
//! one in its system disk is SRC's; and at its first start the guest makes itself a new SSH
//! host key, which the daemon pins in place of SRC's (it connects the first time with SRC's
//! key, which only the clone's disk and SRC's hold). A snapshot with clones cannot be removed
//! and neither can SRC while a clone exists.

use banger_proto::{CloneVmRequest, Vm, VmName};
use tracing::{info, warn};

use super::Manager;
use super::ports::NetChoice;
use crate::Error;
use crate::domain::DiskFormat;
use crate::guest::ssh;
use crate::layout::Layout;
use crate::model::VmRecord;
use crate::qcow2::{self, Backing};
use crate::store::StoreError;

/// Where the guest's sshd reads its host key (the image configures it so).
const GUEST_HOST_KEY: &str = "/root/.banger/ssh_host_ed25519_key";

/// The kernel argument that carries a clone's first-start token.
const CLONE_TOKEN_ARG: &str = "banger.clone_token";

/// The first half of a clone's own host key, in the guest: it proves it is the clone booted
/// with `token` by printing the token from its kernel command line (given only the token's
/// sha256, a guest that answered in the clone's place, holding the same old key, learns
/// nothing it could answer with, and stops with exit 97 before it changes anything), then
/// prints the key in use (`current:`), makes a new key beside it and prints its public half.
/// sshd still uses the old.
fn make_host_key_script(token: &str) -> String {
    use sha2::Digest;
    let hash = crate::workspace::fileset::hex(&sha2::Sha256::digest(token.as_bytes()));
    format!(
        "set -e; t=$(tr ' ' '\\n' </proc/cmdline | sed -n 's/^{CLONE_TOKEN_ARG}=//p'); \
         [ \"$(printf %s \"$t\" | sha256sum | cut -d' ' -f1)\" = {hash} ] || \
         {{ echo 'the guest that answered is not the clone being started' >&2; exit 97; }}; \
         echo \"token:$t\"; k={GUEST_HOST_KEY}; echo \"current:$(cut -d' ' -f1,2 $k.pub)\"; \
         rm -f $k.new $k.new.pub; \
         ssh-keygen -q -t ed25519 -N '' -C \"$(hostname).vm\" -f $k.new; cat $k.new.pub"
    )
}

/// The second half, once the daemon pinned the new key beside the old: the new key (it must
/// be the one made, `key`) replaces the old, and sshd loads it. sshd reloads on SIGHUP to its
/// listener (the unit's main process; sessions keep running): sent directly, since
/// `systemctl reload` first runs `sshd -t`, which cost ~0.4 s of a clone's first start under
/// TCG while the guest still boots. `systemctl reload` stays as the fallback.
fn install_host_key_script(key: &str) -> String {
    format!(
        "set -e; k={GUEST_HOST_KEY}; [ \"$(cut -d' ' -f1,2 $k.new.pub)\" = {} ] || exit 98; \
         mv -f $k.new.pub $k.pub; mv -f $k.new $k; \
         p=$(systemctl show -p MainPID --value ssh 2>/dev/null || true); \
         if [ \"${{p:-0}}\" -gt 0 ] 2>/dev/null && kill -HUP \"$p\" 2>/dev/null; then :; \
         else systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || true; fi",
        ssh::shell_quote(key)
    )
}

/// A clone's boot arguments and, at its first start, its token.
pub(super) struct CloneBoot {
    pub args: String,
    pub token: Option<String>,
}

impl Manager {
    /// Clones VM `source` (see the module doc); returns the new VM, in state created.
    pub async fn clone_vm(&self, source: &str, request: CloneVmRequest) -> Result<Vm, Error> {
        let new_name = VmName::parse(&request.name)?;
        let src = self.locked(source).await?;
        let src_record = self.observed_vm(&src.name).await?;
        self.check_snapshottable(&src_record)?;
        let taken = new_name.to_string();
        if self.db.run(move |s| s.find_vm(&taken)).await?.is_some() {
            return Err(StoreError::VmExists(new_name.to_string()).into());
        }
        let _new = self.locked(new_name.as_str()).await?;
        if request.memory {
            return Err(Error::Refused {
                message: format!(
                    "cannot clone VM {} with --memory: a clone resumed from its memory would run \
                     with {}'s identity (SSH host key, machine-id, addresses)",
                    src_record.name, src_record.name
                ),
                hint: "clone without --memory: the clone boots from the snapshot's disks with its own identity".into(),
            });
        }
        let snapshot = match &request.snapshot {
            Some(snap) => self.named_snapshot(&src_record, snap).await?,
            // A running or paused source is snapshotted live; a suspended one is refused.
            None => {
                let (taken, warnings) = self
                    .take_snapshot(&src_record, format!("clone-{new_name}"), false)
                    .await?;
                for warning in warnings {
                    warn!(vm = %src_record.name, "{warning}");
                }
                taken
            }
        };
        let (pool, isolated) = match self.choose_net(None).await? {
            NetChoice::Bridge(pool) => (Some(pool), false),
            NetChoice::User { isolated } => (None, isolated),
        };
        let mut spec = src_record.spec.clone();
        spec.vmm_reason = format!("cloned from {}", src_record.name);
        let record = VmRecord::new(new_name.clone(), spec);
        let vm_dir = self.layout.vm_dir(&record.id);
        let made = async {
            std::fs::create_dir_all(&vm_dir)
                .map_err(Error::io(format!("cannot create {}", vm_dir.display())))?;
            let files = self.layout.vm_named_snapshot(&src_record.id, &snapshot.id);
            let work_qcow2 = snapshot.work_format == DiskFormat::Qcow2;
            for (backing, top) in [
                (
                    Backing {
                        path: files.system(),
                        format: DiskFormat::Qcow2,
                    },
                    self.layout.vm_system_disk(&record.id),
                ),
                (
                    Backing {
                        path: files.work(work_qcow2),
                        format: snapshot.work_format,
                    },
                    self.layout.vm_work_overlay(&record.id),
                ),
            ] {
                qcow2::create_overlay(&backing, &Layout::vm_overlay_partial(&top), &top).await?;
            }
            // The source's key, under the clone's name, until the clone's first start
            // replaces it.
            let pinned = std::fs::read_to_string(self.layout.vm_known_hosts(&src_record.id))
                .map_err(Error::io(format!(
                    "cannot read the known_hosts of VM {source}"
                )))?;
            let key = pinned
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ");
            let known_hosts = self.layout.vm_known_hosts(&record.id);
            std::fs::write(
                &known_hosts,
                format!("{} {key}\n", super::host_key_alias(&record.name)),
            )
            .map_err(Error::io(format!("cannot write {}", known_hosts.display())))?;
            let (stored, snapshot_id) = (record.clone(), snapshot.id.clone());
            self.db
                .run(move |store| {
                    let lease = store.insert_vm_with_lease(&stored, pool)?;
                    let settings = store
                        .set_isolated(&stored.id, isolated)
                        .and_then(|()| store.add_clone(&stored.id, &snapshot_id));
                    if let Err(e) = settings {
                        let _ = store.delete_vm(stored.name.as_str());
                        return Err(e);
                    }
                    Ok(lease)
                })
                .await
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&vm_dir);
            return Err(e);
        }
        info!(vm = %record.name, id = %record.id, source = %src_record.name, snapshot = %snapshot.name, "VM cloned");
        self.refresh_ssh_config().await;
        Ok(self.vm_api(&record).await)
    }

    /// Kernel arguments a clone boots with: its own machine-id (its disk holds its source's),
    /// and at its first start a token for [`Self::own_host_key`].
    pub(super) async fn clone_boot_args(&self, record: &VmRecord) -> Option<CloneBoot> {
        let vm_id = record.id.clone();
        let (_, fresh) = self
            .db
            .run(move |s| s.clone_source(&vm_id))
            .await
            .ok()
            .flatten()?;
        let token = fresh.then(|| uuid::Uuid::new_v4().simple().to_string());
        let mut args = format!("systemd.machine_id={}", record.id);
        if let Some(token) = &token {
            args.push_str(&format!(" {CLONE_TOKEN_ARG}={token}"));
        }
        Some(CloneBoot { args, token })
    }

    /// At a clone's first start, once SSH answered (with its source's key): the guest makes
    /// its own host key, which replaces the pinned one. A failure is an error: a clone never
    /// runs with its source's key once started. Whoever answered must first show the token
    /// the clone booted with: its source holds the same host key and, on a bridge, could
    /// answer for the clone's address, but never saw that kernel command line. Crash-safe:
    /// the new key is pinned beside the old before the guest switches to it, and alone after,
    /// so whichever key the guest has when a daemon dies between the steps, the next start
    /// connects (and, the identity not recorded done, makes another).
    pub(super) async fn own_host_key(
        &self,
        record: &VmRecord,
        target: &ssh::SshTarget,
        token: Option<&str>,
    ) -> Result<(), Error> {
        let vm_id = record.id.clone();
        let Some((_, true)) = self.db.run(move |s| s.clone_source(&vm_id)).await? else {
            return Ok(());
        };
        let Some(token) = token else {
            return Err(Error::Failed(format!(
                "clone {} booted without its identity token",
                record.name
            )));
        };
        let failed = |why: &str| {
            warn!(vm = %record.name, "cannot give the clone its own host key: {why}");
            Error::Failed(format!(
                "cannot give clone {} its own SSH host key: {why}",
                record.name
            ))
        };
        let last_line = |text: &str| {
            text.lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .to_owned()
        };
        let (code, out, err) = ssh::run(
            target,
            &make_host_key_script(token),
            HOST_KEY_DIAL,
            HOST_KEY_LIMIT,
        )
        .await?;
        if code != Some(0) {
            return Err(failed(&last_line(&err)));
        }
        if !out.lines().any(|l| l.strip_prefix("token:") == Some(token)) {
            return Err(failed(
                "the guest that answered is not the clone being started (its boot token differs)",
            ));
        }
        let Some(key) = out.lines().rev().find_map(ed25519_public_key) else {
            return Err(failed("the guest printed no ed25519 public key"));
        };
        let alias = super::host_key_alias(&record.name);
        let known_hosts = self.layout.vm_known_hosts(&record.id);
        let pinned = tokio::fs::read_to_string(&known_hosts)
            .await
            .map_err(Error::io(format!("cannot read {}", known_hosts.display())))?;
        // The key in use (pinned already: SSH checked it) and the new one; all the pinned
        // ones if the guest names another (it has one of them).
        let current = out
            .lines()
            .find_map(|l| l.strip_prefix("current:"))
            .and_then(ed25519_public_key)
            .filter(|current| pinned.lines().any(|l| l.contains(current.as_str())));
        let kept = match current {
            Some(current) => format!("{alias} {current}\n"),
            None => with_newline(&pinned),
        };
        replace_file(&known_hosts, &format!("{kept}{alias} {key}\n")).await?;
        crate::fault::point("clone.after_pin_both")?;
        let (code, _, err) = ssh::run(
            target,
            &install_host_key_script(&key),
            HOST_KEY_DIAL,
            HOST_KEY_LIMIT,
        )
        .await?;
        if code != Some(0) {
            return Err(failed(&last_line(&err)));
        }
        crate::fault::point("clone.after_guest_key")?;
        replace_file(&known_hosts, &format!("{alias} {key}\n")).await?;
        let vm_id = record.id.clone();
        self.db.run(move |s| s.clone_identity_done(&vm_id)).await?;
        info!(vm = %record.name, "the clone has its own SSH host key now");
        Ok(())
    }
}

/// How long the SSH dial and the whole of each host-key step may take.
const HOST_KEY_DIAL: std::time::Duration = std::time::Duration::from_secs(10);
const HOST_KEY_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// `ssh-ed25519 BASE64` from a line of `ssh-keygen`'s public key file (the comment dropped);
/// `None` for anything else: the guest's output goes into a `known_hosts` file.
fn ed25519_public_key(line: &str) -> Option<String> {
    let mut fields = line.split_whitespace();
    let (kind, key) = (fields.next()?, fields.next()?);
    let base64 = |c: char| c.is_ascii_alphanumeric() || "+/=".contains(c);
    (kind == "ssh-ed25519" && (60..=100).contains(&key.len()) && key.chars().all(base64))
        .then(|| format!("{kind} {key}"))
}

fn with_newline(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    }
}

/// Writes `path` whole or not at all ([`crate::durable::replace`], on the blocking pool).
async fn replace_file(path: &std::path::Path, text: &str) -> Result<(), Error> {
    let (path, text) = (path.to_owned(), text.to_owned());
    tokio::task::spawn_blocking(move || {
        crate::durable::replace(&path, text.as_bytes())
            .map_err(Error::io(format!("cannot write {}", path.display())))
    })
    .await
    .map_err(|e| Error::Failed(format!("writing a known_hosts file panicked: {e}")))?
}

/// `SOURCE/SNAPSHOT` a clone was made from, given every VM's name by id; `None` for a VM that
/// is no clone.
pub(super) fn cloned_from_in(
    store: &mut crate::store::Store,
    names: &std::collections::HashMap<String, String>,
    vm_id: &str,
) -> Result<Option<String>, StoreError> {
    let Some((snapshot_id, _)) = store.clone_source(vm_id)? else {
        return Ok(None);
    };
    let Some(snapshot) = store.snapshot_by_id(&snapshot_id)? else {
        return Ok(None);
    };
    Ok(names
        .get(&snapshot.vm_id)
        .map(|name| format!("{name}/{}", snapshot.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_without_the_token_is_refused_before_anything_changes() {
        // This host's /proc/cmdline has no token: the script stops at once.
        let script = make_host_key_script("0123456789abcdef");
        assert!(
            !script.contains("0123456789abcdef"),
            "the token itself is never sent"
        );
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        assert_eq!(out.status.code(), Some(97), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not the clone"));
    }

    #[test]
    fn only_an_ed25519_key_line_is_pinned() {
        let key = format!("ssh-ed25519 {}", "A".repeat(68));
        assert_eq!(
            ed25519_public_key(&format!("{key} root@cl.vm")),
            Some(key.clone())
        );
        for bad in [
            "token:abc".to_owned(),
            format!("ssh-rsa {}", "A".repeat(68)),
            "ssh-ed25519 short".into(),
            format!("ssh-ed25519 {}*", "A".repeat(68)),
            String::new(),
        ] {
            assert_eq!(ed25519_public_key(&bad), None, "{bad}");
        }
    }
}
