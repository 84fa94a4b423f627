//! `banger-helper`: banger's only root code. Serves one owner uid on a Unix socket (its own,
//! or one passed by systemd socket activation) with a closed set of operations
//! (`banger_proto::helper::HelperOp`): the bridge, taps, nftables table and DNS socket of
//! banger's network, the loop devices and device-mapper snapshots of `dm` system disks, and
//! Firecracker's jailer (which must start as root). `banger-helper call` is a small client
//! for tests and debugging.
//!
//! Its configuration is its command line, which only root sets (the systemd unit and its
//! drop-ins, root-owned files): the owner, the state dir (the confinement root of every path
//! in a request), the jail base, the jailer and Firecracker binaries, the loop record dir.
//! Nothing in a request can change any of them.

mod confine;
mod disk;
mod jail;
mod net;
mod server;
mod validate;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use banger_proto::helper::{HelperReply, HelperRequest, read_frame, write_frame};
use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;

/// banger's root helper: bridge, taps, nftables, the DNS socket and device-mapper system disks
/// for one user's VMs.
///
/// Normally run by systemd (`banger helper install`); `--foreground --socket PATH --owner UID`
/// runs it by hand.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Run in the foreground, logging to stderr (also what the systemd unit does).
    #[arg(long)]
    foreground: bool,
    /// The only uid allowed to connect.
    #[arg(long)]
    owner: Option<u32>,
    /// Socket to listen on (ignored when systemd passes one)
    /// [default: /run/banger-helper/<owner>.sock, where bangerd looks].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The owner's banger data dir: every path in a request must resolve beneath it, opened
    /// without following a symlink or crossing a mount point where the owner could place
    /// one [default: the owner's passwd home + .local/share/banger].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where Firecracker jails are built (`jailer --chroot-base-dir`)
    /// [default: /srv/banger-jail/<owner>].
    #[arg(long)]
    jail_base: Option<PathBuf>,
    /// Firecracker's jailer, run as root for `spawn_jailed` (root-owned, nobody else may
    /// write it or a directory above it). Without it jailed VMs are refused.
    #[arg(long, requires = "firecracker")]
    jailer: Option<PathBuf>,
    /// The Firecracker binary the jailer copies into each jail (same rules as --jailer).
    #[arg(long, requires = "jailer")]
    firecracker: Option<PathBuf>,
    /// The helper's own records of the loop devices it attached (root's, 0700)
    /// [default: /run/banger-helper/owner-<owner>].
    #[arg(long)]
    record_dir: Option<PathBuf>,
    /// The owner's VMs' subnet; the owner's bridge takes the first address (the gateway)
    /// [default: 172.30.<uid mod 256>.0/24].
    #[arg(long)]
    subnet: Option<Ipv4Net>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send one operation (JSON, e.g. '{"kind":"hello"}') and print the reply.
    Call {
        #[arg(long)]
        socket: PathBuf,
        /// The operation as JSON.
        op: String,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match &args.command {
        Some(Cmd::Call { socket, op }) => call(socket, op),
        None => serve(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("banger-helper: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn call(socket: &std::path::Path, op: &str) -> Result<()> {
    let op = serde_json::from_str(op).context("the operation is not valid JSON")?;
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    // A refused peer gets its reply before the request is read, so a failed write may
    // still leave a reply to read.
    let written = write_frame(
        &mut stream,
        &HelperRequest {
            op_id: format!("call-{}", std::process::id()),
            op,
        },
    );
    let reply: HelperReply = match read_frame(&mut stream) {
        Ok(reply) => reply,
        Err(e) => {
            written?;
            return Err(e).context("no reply");
        }
    };
    let text = serde_json::to_string(&reply)?;
    std::io::stdout().write_all(format!("{text}\n").as_bytes())?;
    match reply {
        HelperReply::Ok { .. } => Ok(()),
        HelperReply::Error { message, .. } => bail!("{message}"),
    }
}

fn serve(args: &Args) -> Result<()> {
    let Some(owner) = args.owner else {
        bail!("--owner UID is required; hint: `banger helper install` writes the systemd units");
    };
    if !args.foreground && std::env::var_os("LISTEN_FDS").is_none() {
        bail!("run it under systemd (`banger helper install`) or with --foreground");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if nix::unistd::geteuid().as_raw() != 0 {
        tracing::warn!("not running as root: network operations will fail");
    }
    let subnet = args
        .subnet
        .unwrap_or_else(|| net::default_subnet(owner))
        .trunc();
    if subnet.prefix_len() > 30 {
        bail!("subnet {subnet} is too small (needs at least a /30)");
    }
    let gateway = subnet
        .hosts()
        .next()
        .context("the subnet has no host addresses")?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
        .context("cannot look up the owner")?;
    let state_dir = match (&args.state_dir, &user) {
        (Some(dir), _) => dir.clone(),
        (None, Some(user)) => user.dir.join(".local/share/banger"),
        (None, None) => bail!("no user with uid {owner}; pass --state-dir"),
    };
    // The owner's primary group; a uid without a passwd entry gets the same number.
    let gid = user.as_ref().map_or(owner, |u| u.gid.as_raw());
    let state_dir = confine::StateRoot::new(state_dir, owner)?;
    let jail = jail::JailConfig {
        base: args
            .jail_base
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/srv/banger-jail/{owner}"))),
        uid: owner,
        gid,
        binaries: args.jailer.clone().zip(args.firecracker.clone()),
        cgroups: jail::Cgroups::detect(),
    };
    jail::check(&jail).context("the configured jailer cannot be used")?;
    if jail.binaries.is_some() {
        jail::prepare_base(&jail).context("the jail base cannot be used")?;
    }
    let record_dir = args
        .record_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/banger-helper/owner-{owner}")));
    let loops = disk::LoopRecords::prepare(record_dir, owner).map_err(anyhow::Error::msg)?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/banger-helper/{owner}.sock")));
    let listener = listener(&socket)?;
    let server = Arc::new(server::Server::new(
        net::NetConfig {
            subnet,
            gateway,
            owner,
        },
        state_dir,
        jail,
        loops,
    ));
    server.serve(listener)
}

/// The socket systemd passed (sd_listen_fds protocol), or a new one at `path`.
fn listener(path: &std::path::Path) -> Result<UnixListener> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if ours && count >= 1 {
        // SAFETY: under the sd_listen_fds protocol (checked: LISTEN_PID is us, LISTEN_FDS >= 1)
        // fd 3 is an open listening socket handed to this process and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(3) };
        return Ok(UnixListener::from(fd));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    // Anyone may connect; the peer uid check (SO_PEERCRED) decides who is served.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}
