//! The helper's server: accepts connections on its Unix socket, refuses every peer whose uid
//! (SO_PEERCRED) is not the owner in the accept loop itself (so no other uid counts toward
//! the connection limit), reads one frame at a time, validates the operation's
//! arguments and runs it (network operations in `net`, loop and device-mapper ones in `disk`,
//! the jailer in `jail`; paths beneath the state dir's descriptor from `confine`). A bad frame
//! or a refused argument gets an error reply; the server keeps serving. A connection whose
//! framing broke is closed, since nothing after it can be trusted. Refused connections (other
//! uids, over the connection limit) are logged at most [`REFUSALS_PER_WINDOW`] times a minute,
//! then counted, so nobody can flood the log.

use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use banger_proto::helper::{
    FrameError, HelperErrorCode, HelperInfo, HelperOp, HelperReply, HelperRequest, HelperResult,
    read_frame,
};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg, sockopt};
use tracing::{error, info, info_span, warn};

use crate::confine::{OpenRoot, RootError, StateRoot};
use crate::disk::{self, LoopRecords};
use crate::jail::{self, JailConfig, JailError};
use crate::net::{self, NetConfig};
use crate::validate;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// An idle connection is closed after this long.
const IDLE: Duration = Duration::from_secs(120);
/// Refused connections logged per [`REFUSAL_WINDOW`]; the rest are counted.
const REFUSALS_PER_WINDOW: u32 = 10;
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Rate limit of the refused-connection log lines.
#[derive(Debug)]
struct RefusalLog {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether to log one more refusal now; when a new window opens, also how many were
    /// left unlogged in the last one.
    fn allow(&mut self, now: Instant) -> (bool, u64) {
        let mut carried = 0;
        if now.duration_since(self.window) >= REFUSAL_WINDOW {
            carried = std::mem::take(&mut self.suppressed);
            self.window = now;
            self.logged = 0;
        }
        if self.logged < REFUSALS_PER_WINDOW {
            self.logged += 1;
            (true, carried)
        } else {
            self.suppressed += 1;
            (false, carried)
        }
    }
}

/// Everything a request may need.
#[derive(Debug)]
pub struct Server {
    pub net: NetConfig,
    /// The owner's state dir (opened per request: it may appear after the helper starts).
    pub state_dir: StateRoot,
    /// Where jails are built and as whom the jailed Firecracker runs.
    pub jail: JailConfig,
    /// The loop devices this helper attached.
    pub loops: LoopRecords,
    /// Serialises operations that change the network.
    lock: std::sync::Mutex<()>,
    active: AtomicUsize,
    refusals: std::sync::Mutex<RefusalLog>,
}

impl Server {
    pub fn new(net: NetConfig, state_dir: StateRoot, jail: JailConfig, loops: LoopRecords) -> Self {
        Self {
            net,
            state_dir,
            jail,
            loops,
            lock: std::sync::Mutex::new(()),
            active: AtomicUsize::new(0),
            refusals: std::sync::Mutex::new(RefusalLog {
                window: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Logs a refused connection unless over the rate limit.
    fn log_refusal(&self, log: impl FnOnce()) {
        let (allowed, carried) = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(Instant::now());
        if carried > 0 {
            warn!(
                suppressed = carried,
                "refused connections not logged in the last minute"
            );
        }
        if allowed {
            log();
        }
    }

    /// Serves until the listener fails.
    pub fn serve(self: Arc<Self>, listener: UnixListener) -> anyhow::Result<()> {
        info!(owner = self.net.owner, subnet = %self.net.subnet, state_dir = %self.state_dir.path().display(), jailer = ?self.jail.binaries, cgroups = ?self.jail.cgroups, "banger-helper ready");
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            };
            // Another uid is refused here, before it could take one of the owner's slots.
            if !self.peer_is_owner(&stream) {
                continue;
            }
            if self.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.log_refusal(|| warn!("too many connections; refusing one"));
                continue;
            }
            let server = self.clone();
            server.active.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                server.connection(stream);
                server.active.fetch_sub(1, Ordering::SeqCst);
            });
        }
        Ok(())
    }

    /// Whether the peer (SO_PEERCRED) is the owner. Anyone else gets a refusal sent without
    /// blocking (a new connection's buffer takes the short reply) and the connection closed,
    /// all in the accept loop, so no uid but the owner's ever counts toward the limit.
    fn peer_is_owner(&self, stream: &UnixStream) -> bool {
        let peer = match nix::sys::socket::getsockopt(stream, sockopt::PeerCredentials) {
            Ok(cred) => cred,
            Err(e) => {
                self.log_refusal(|| warn!("cannot read peer credentials: {e}"));
                return false;
            }
        };
        if peer.uid() == self.net.owner {
            return true;
        }
        self.log_refusal(|| {
            warn!(
                peer_uid = peer.uid(),
                peer_pid = peer.pid(),
                owner = self.net.owner,
                "refused a client that is not the owner"
            )
        });
        let reply = error_reply(
            HelperErrorCode::Invalid,
            format!(
                "uid {} is not this helper's owner (uid {})",
                peer.uid(),
                self.net.owner
            ),
        );
        let mut frame = Vec::new();
        if stream.set_nonblocking(true).is_ok()
            && banger_proto::helper::write_frame(&mut frame, &reply).is_ok()
        {
            let mut writer: &UnixStream = stream;
            let _ = writer.write_all(&frame);
        }
        false
    }

    fn connection(&self, mut stream: UnixStream) {
        let peer = match nix::sys::socket::getsockopt(&stream, sockopt::PeerCredentials) {
            Ok(cred) => cred,
            Err(e) => {
                warn!("cannot read peer credentials: {e}");
                return;
            }
        };
        let _ = stream.set_read_timeout(Some(IDLE));
        let _ = stream.set_write_timeout(Some(IDLE));
        loop {
            let request: HelperRequest = match read_frame(&mut stream) {
                Ok(r) => r,
                Err(FrameError::Closed) => return,
                Err(FrameError::Io(e)) => {
                    info!("connection ended: {e}");
                    return;
                }
                Err(e) => {
                    warn!(peer_pid = peer.pid(), "refused a bad frame: {e}");
                    let _ = send(
                        &mut stream,
                        &error_reply(HelperErrorCode::BadFrame, e.to_string()),
                        None,
                    );
                    return;
                }
            };
            let op_id = if valid_op_id(&request.op_id) {
                request.op_id.as_str()
            } else {
                "invalid"
            };
            let span = info_span!("helper", op_id = %op_id, op = request.op.name());
            let _entered = span.enter();
            let (reply, fd) = self.handle(&request.op);
            match &reply {
                HelperReply::Ok { .. } => info!("done"),
                HelperReply::Error { code, message } => {
                    warn!(?code, "refused or failed: {message}")
                }
            }
            if let Err(e) = send(&mut stream, &reply, fd.as_ref()) {
                warn!("cannot send the reply: {e}");
                return;
            }
        }
    }

    fn info(&self) -> HelperInfo {
        HelperInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            owner: self.net.owner,
            bridge: self.net.bridge(),
            subnet: self.net.subnet.to_string(),
            gateway: self.net.gateway,
            prefix_len: self.net.subnet.prefix_len(),
        }
    }

    /// Validates and runs one operation.
    fn handle(&self, op: &HelperOp) -> (HelperReply, Option<OwnedFd>) {
        let invalid =
            |e: validate::Invalid| (error_reply(HelperErrorCode::Invalid, e.to_string()), None);
        let failed =
            |e: &dyn std::fmt::Display| (error_reply(HelperErrorCode::Failed, e.to_string()), None);
        let ok = |result| (HelperReply::Ok { result }, None);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match op {
            HelperOp::Hello => ok(HelperResult::Info(self.info())),
            HelperOp::NetworkStatus => ok(HelperResult::Status(net::status(&self.net))),
            HelperOp::NetworkUp { pool_size } => match validate::pool_size(*pool_size) {
                Err(e) => invalid(e),
                Ok(size) => match net::up(&self.net, size) {
                    Ok(()) => ok(HelperResult::Done),
                    Err(e) => failed(&display_chain(&e)),
                },
            },
            HelperOp::NetworkDown => match net::down(&self.net) {
                Ok(()) => ok(HelperResult::Done),
                Err(e) => failed(&display_chain(&e)),
            },
            HelperOp::EnsureTap { name } => match validate::tap(name, self.net.owner) {
                Err(e) => invalid(e),
                Ok(name) => match net::ensure_tap(&self.net, name) {
                    Ok(()) => ok(HelperResult::Done),
                    Err(e) => failed(&display_chain(&e)),
                },
            },
            HelperOp::OpenTap { name } => match validate::tap(name, self.net.owner) {
                Err(e) => invalid(e),
                Ok(name) => match net::open_tap(&self.net, name) {
                    Ok(fd) => (
                        HelperReply::Ok {
                            result: HelperResult::Done,
                        },
                        Some(fd),
                    ),
                    Err(e) => failed(&display_chain(&e)),
                },
            },
            HelperOp::DeleteTap { name } => match validate::tap(name, self.net.owner) {
                Err(e) => invalid(e),
                Ok(name) => match net::delete_tap(name) {
                    Ok(()) => ok(HelperResult::Done),
                    Err(e) => failed(&display_chain(&e)),
                },
            },
            HelperOp::CheckAddress { ip } => {
                match validate::guest_address(ip, self.net.subnet, self.net.gateway) {
                    Err(e) => invalid(e),
                    Ok(_) => ok(HelperResult::Done),
                }
            }
            HelperOp::BindDns => match std::net::UdpSocket::bind((self.net.gateway, 53)) {
                Ok(socket) => (
                    HelperReply::Ok {
                        result: HelperResult::Done,
                    },
                    Some(OwnedFd::from(socket)),
                ),
                Err(e) => failed(&format!(
                    "cannot bind {}:53 (is the network up?): {e}",
                    self.net.gateway
                )),
            },
            HelperOp::RouteDns => match net::route_dns(&self.net) {
                Ok(routed) => ok(HelperResult::Routed { routed }),
                Err(e) => failed(&display_chain(&e)),
            },
            HelperOp::LoopAttach { file, read_only } => self.disk(|| {
                let root = self.state_dir.open().map_err(root_refused)?;
                disk::loop_attach(file, *read_only, &root, &self.loops)
                    .map(|device| HelperResult::Device { device })
            }),
            HelperOp::LoopDetach { device, file } => self.disk(|| {
                // The device's identity is its tag; the state dir only checks `file`.
                let root = file.as_ref().and_then(|_| self.state_dir.open().ok());
                disk::loop_detach(device, file.as_deref(), root.as_ref(), &self.loops)
                    .map(|()| HelperResult::Done)
            }),
            HelperOp::DmSnapshotCreate {
                name,
                origin_loop,
                cow_loop,
            } => self.disk(|| {
                disk::dm_snapshot_create(name, origin_loop, cow_loop, &self.loops)
                    .map(|device| HelperResult::Device { device })
            }),
            HelperOp::DmRemove { name } => {
                self.disk(|| disk::dm_remove(name, self.net.owner).map(|()| HelperResult::Done))
            }
            HelperOp::SpawnJailed {
                vm_id,
                files,
                cpus,
                memory_mib,
            } => {
                let request = jail::SpawnRequest {
                    vm_id,
                    files,
                    cpus: *cpus,
                    memory_mib: *memory_mib,
                };
                let root: Result<OpenRoot, RootError> = self.state_dir.open();
                match root {
                    Err(e) => (error_reply(HelperErrorCode::Invalid, e.to_string()), None),
                    Ok(root) => match jail::spawn(&self.jail, &root, &request) {
                        Ok((pid, root)) => ok(HelperResult::Jailed {
                            pid,
                            root: root.display().to_string(),
                        }),
                        Err(e) => jail_error(e),
                    },
                }
            }
            HelperOp::RemoveJail { vm_id } => match jail::remove(&self.jail, vm_id) {
                Ok(()) => ok(HelperResult::Done),
                Err(e) => jail_error(e),
            },
        }
    }

    /// Runs a disk operation, mapping its errors to replies.
    fn disk(
        &self,
        run: impl FnOnce() -> Result<HelperResult, disk::DiskError>,
    ) -> (HelperReply, Option<OwnedFd>) {
        match run() {
            Ok(result) => (HelperReply::Ok { result }, None),
            Err(disk::DiskError::Invalid(e)) => {
                (error_reply(HelperErrorCode::Invalid, e.to_string()), None)
            }
            Err(disk::DiskError::Failed(e)) => (error_reply(HelperErrorCode::Failed, e), None),
        }
    }
}

/// A state dir that cannot be the confinement root, as a disk refusal.
fn root_refused(e: RootError) -> disk::DiskError {
    disk::DiskError::Invalid(validate::Invalid::StateDir(e.to_string()))
}

/// Refusals (bad arguments) and failures of a jail operation, as replies.
fn jail_error(e: JailError) -> (HelperReply, Option<OwnedFd>) {
    let code = match e {
        JailError::Io { .. } | JailError::Jailer(_) => HelperErrorCode::Failed,
        _ => HelperErrorCode::Invalid,
    };
    (error_reply(code, display_chain(&e)), None)
}

fn error_reply(code: HelperErrorCode, message: String) -> HelperReply {
    HelperReply::Error { code, message }
}

/// An error and its sources on one line.
fn display_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn valid_op_id(op_id: &str) -> bool {
    !op_id.is_empty()
        && op_id.len() <= 64
        && op_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Sends one reply frame, with `fd` attached (SCM_RIGHTS) to its first byte when given.
fn send(stream: &mut UnixStream, reply: &HelperReply, fd: Option<&OwnedFd>) -> anyhow::Result<()> {
    let mut frame = Vec::new();
    banger_proto::helper::write_frame(&mut frame, reply)?;
    let Some(fd) = fd else {
        stream.write_all(&frame)?;
        return Ok(());
    };
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&frame)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )?;
    stream.write_all(&frame[sent..])?;
    if sent == 0 {
        error!("sendmsg sent nothing");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_log_lines_are_capped_per_window_and_the_rest_counted() {
        let start = Instant::now();
        let mut log = RefusalLog {
            window: start,
            logged: 0,
            suppressed: 0,
        };
        let allowed = (0..25).filter(|_| log.allow(start).0).count();
        assert_eq!(allowed, REFUSALS_PER_WINDOW as usize);
        // The next window logs again and reports what the last one left out.
        let later = start + REFUSAL_WINDOW;
        assert_eq!(
            log.allow(later),
            (true, 25 - u64::from(REFUSALS_PER_WINDOW))
        );
        assert_eq!(log.allow(later), (true, 0));
    }
}
