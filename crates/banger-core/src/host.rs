//! [`HostOps`]: every privileged action goes through this one seam (youki's Syscall idea):
//! the network (bridge, taps, nftables, DNS socket) and the `dm` system disks (loop devices,
//! device-mapper snapshots) and Firecracker's jailer, so the daemon itself does nothing
//! privileged. The real implementation,
//! [`HelperClient`], talks to `banger-helper` over its Unix socket (frames of
//! `banger_proto::helper`, the DNS socket arriving by SCM_RIGHTS); [`RecordingHost`] records the
//! operations for tests that cannot, or need not, run the helper.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use banger_proto::helper::{
    HelperErrorCode, HelperInfo, HelperOp, HelperReply, HelperRequest, HelperResult, JailFiles,
    MAX_FRAME, NetworkState, frame_len, write_frame,
};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// Why a privileged action failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The helper's socket does not answer.
    #[error("the root helper at {socket} does not answer")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// The helper refused the request (validation, or not our uid).
    #[error("the root helper refused {op}: {message}")]
    Refused { op: &'static str, message: String },
    /// The helper ran the operation and it failed.
    #[error("the root helper failed {op}: {message}")]
    Failed { op: &'static str, message: String },
    /// The conversation broke.
    #[error("the root helper's reply to {op}: {message}")]
    Protocol { op: &'static str, message: String },
}

/// What an operation returned.
#[derive(Debug)]
pub struct HostReply {
    pub result: HelperResult,
    /// The file descriptor that came with the reply (`bind_dns`).
    pub fd: Option<OwnedFd>,
}

/// Privileged actions. Blocking: callers run them on a blocking thread. An implementation
/// provides [`HostOps::call`] (one operation of the wire protocol); callers use the typed
/// methods, which check the reply's shape.
pub trait HostOps: Send + Sync + std::fmt::Debug {
    fn call(&self, op_id: &str, op: HelperOp) -> Result<HostReply, HostError>;

    /// Runs `op`, whose reply carries nothing but success.
    fn run(&self, op_id: &str, op: HelperOp) -> Result<(), HostError> {
        self.call(op_id, op).map(drop)
    }

    /// The helper's settings, if it answers.
    fn hello(&self, op_id: &str) -> Result<HelperInfo, HostError> {
        match self.call(op_id, HelperOp::Hello)?.result {
            HelperResult::Info(info) => Ok(info),
            other => Err(unexpected("hello", other)),
        }
    }

    /// What exists of the owner's network (bridge, nftables table, taps).
    fn network_status(&self, op_id: &str) -> Result<NetworkState, HostError> {
        match self.call(op_id, HelperOp::NetworkStatus)?.result {
            HelperResult::Status(state) => Ok(state),
            other => Err(unexpected("network_status", other)),
        }
    }

    /// The DNS server's UDP socket, bound by the helper on the gateway's port 53.
    fn bind_dns(&self, op_id: &str) -> Result<OwnedFd, HostError> {
        self.call(op_id, HelperOp::BindDns)?
            .fd
            .ok_or_else(|| HostError::Protocol {
                op: "bind_dns",
                message: "no socket came with the reply".into(),
            })
    }

    /// Routes `~vm` to the bridge through systemd-resolved; `false` when it does not run here.
    fn route_dns(&self, op_id: &str) -> Result<bool, HostError> {
        match self.call(op_id, HelperOp::RouteDns)?.result {
            HelperResult::Routed { routed } => Ok(routed),
            other => Err(unexpected("route_dns", other)),
        }
    }

    /// Makes the tap `name` (idempotent), for a backend that opens it itself.
    fn ensure_tap(&self, op_id: &str, name: &str) -> Result<(), HostError> {
        let op = HelperOp::EnsureTap {
            name: name.to_owned(),
        };
        self.run(op_id, op)
    }

    /// A queue of the tap `name`, opened by the helper (`/dev/net/tun` may be root's only),
    /// if one came with the reply.
    fn open_tap(&self, op_id: &str, name: &str) -> Result<Option<OwnedFd>, HostError> {
        let op = HelperOp::OpenTap {
            name: name.to_owned(),
        };
        Ok(self.call(op_id, op)?.fd)
    }

    /// Attaches `file` to a free loop device; answers the device (`/dev/loopN`).
    fn loop_attach(
        &self,
        op_id: &str,
        file: &std::path::Path,
        read_only: bool,
    ) -> Result<String, HostError> {
        let op = HelperOp::LoopAttach {
            file: file.display().to_string(),
            read_only,
        };
        device(self.call(op_id, op)?.result, "loop_attach")
    }

    /// Maps the snapshot `name` of `origin_loop` with copy-on-write store `cow_loop`;
    /// answers the device (`/dev/mapper/NAME`).
    fn dm_snapshot_create(
        &self,
        op_id: &str,
        name: &str,
        origin_loop: &str,
        cow_loop: &str,
    ) -> Result<String, HostError> {
        let op = HelperOp::DmSnapshotCreate {
            name: name.to_owned(),
            origin_loop: origin_loop.to_owned(),
            cow_loop: cow_loop.to_owned(),
        };
        device(self.call(op_id, op)?.result, "dm_snapshot_create")
    }

    /// Runs the jailer for VM `vm_id`; answers the jailed Firecracker's pid and the jail's
    /// root directory.
    fn spawn_jailed(
        &self,
        op_id: &str,
        vm_id: &str,
        files: JailFiles,
        cpus: u32,
        memory_mib: u64,
    ) -> Result<(u32, PathBuf), HostError> {
        let op = HelperOp::SpawnJailed {
            vm_id: vm_id.to_owned(),
            files,
            cpus,
            memory_mib,
        };
        match self.call(op_id, op)?.result {
            HelperResult::Jailed { pid, root } => Ok((pid, PathBuf::from(root))),
            other => Err(unexpected("spawn_jailed", other)),
        }
    }
}

/// The error for a reply of the wrong shape.
fn unexpected(op: &'static str, result: HelperResult) -> HostError {
    HostError::Protocol {
        op,
        message: format!("unexpected result {result:?}"),
    }
}

/// The block device a reply names.
fn device(result: HelperResult, op: &'static str) -> Result<String, HostError> {
    match result {
        HelperResult::Device { device } => Ok(device),
        other => Err(unexpected(op, other)),
    }
}

/// The real helper, reached over its Unix socket.
#[derive(Debug, Clone)]
pub struct HelperClient {
    socket: PathBuf,
    timeout: Duration,
}

impl HelperClient {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            timeout: Duration::from_secs(60),
        }
    }
}

impl HostOps for HelperClient {
    fn call(&self, op_id: &str, op: HelperOp) -> Result<HostReply, HostError> {
        let name = op.name();
        let protocol = |message: String| HostError::Protocol { op: name, message };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| HostError::Unreachable {
                socket: self.socket.display().to_string(),
                source,
            })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| protocol(e.to_string()))?;
        let written = write_frame(
            &mut stream,
            &HelperRequest {
                op_id: op_id.to_owned(),
                op,
            },
        );
        // A refused peer gets its reply before the request is read: read even if the write
        // failed, and report the write error only when there is no reply.
        let (reply, fd) = match recv_reply(&stream) {
            Ok(got) => got,
            Err(e) => {
                written.map_err(|w| protocol(w.to_string()))?;
                return Err(protocol(e));
            }
        };
        match reply {
            HelperReply::Ok { result } => Ok(HostReply { result, fd }),
            HelperReply::Error { code, message } => Err(match code {
                HelperErrorCode::Failed => HostError::Failed { op: name, message },
                HelperErrorCode::Invalid | HelperErrorCode::BadFrame => {
                    HostError::Refused { op: name, message }
                }
            }),
        }
    }
}

/// Reads one reply frame with `recvmsg`, collecting a file descriptor passed with it.
fn recv_reply(stream: &UnixStream) -> Result<(HelperReply, Option<OwnedFd>), String> {
    let mut buf = vec![0u8; MAX_FRAME + 4];
    let mut got = 0;
    let mut fd = None;
    let mut need = 4;
    while got < need {
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| e.to_string())?;
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    for raw in fds {
                        // SAFETY: the kernel installed these descriptors in this process for
                        // this message; nothing else owns them.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
        }
        if msg.bytes == 0 {
            return Err("connection closed before a reply".into());
        }
        got += msg.bytes;
        if got >= 4 && need == 4 {
            let header = [buf[0], buf[1], buf[2], buf[3]];
            need = 4 + frame_len(header).map_err(|e| e.to_string())?;
        }
    }
    let reply = banger_proto::helper::decode_body(&buf[4..need]).map_err(|e| e.to_string())?;
    Ok((reply, fd))
}

/// A fake helper that records operations and answers like a helper whose network works and
/// whose loop and device-mapper operations succeed (loop devices numbered from /dev/loop0 in
/// attach order, mappings at /dev/mapper/NAME). [`RecordingHost::failing_on`] makes matching
/// operations fail, to test what callers undo.
#[derive(Debug)]
pub struct RecordingHost {
    pub info: HelperInfo,
    pub calls: Mutex<Vec<HelperOp>>,
    fail_on: Option<fn(&HelperOp) -> bool>,
}

impl RecordingHost {
    pub fn new() -> Self {
        Self {
            info: HelperInfo {
                version: "fake".into(),
                owner: 0,
                bridge: banger_proto::helper::bridge_name(0),
                subnet: "172.30.0.0/24".into(),
                gateway: std::net::Ipv4Addr::new(172, 30, 0, 1),
                prefix_len: 24,
            },
            calls: Mutex::new(Vec::new()),
            fail_on: None,
        }
    }

    /// A recording fake whose operations matching `fail_on` fail (after being recorded).
    pub fn failing_on(fail_on: fn(&HelperOp) -> bool) -> Self {
        Self {
            fail_on: Some(fail_on),
            ..Self::new()
        }
    }

    /// The operations so far.
    pub fn calls(&self) -> Vec<HelperOp> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for RecordingHost {
    fn default() -> Self {
        Self::new()
    }
}

impl HostOps for RecordingHost {
    fn call(&self, _op_id: &str, op: HelperOp) -> Result<HostReply, HostError> {
        let attached = {
            let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            calls.push(op.clone());
            calls
                .iter()
                .filter(|c| matches!(c, HelperOp::LoopAttach { .. }))
                .count()
        };
        if self.fail_on.is_some_and(|f| f(&op)) {
            return Err(HostError::Failed {
                op: op.name(),
                message: "refused by the test".into(),
            });
        }
        let result = match op {
            HelperOp::LoopAttach { .. } => HelperResult::Device {
                device: format!("/dev/loop{}", attached - 1),
            },
            HelperOp::DmSnapshotCreate { name, .. } => HelperResult::Device {
                device: format!("/dev/mapper/{name}"),
            },
            HelperOp::Hello => HelperResult::Info(self.info.clone()),
            HelperOp::NetworkStatus => HelperResult::Status(Default::default()),
            HelperOp::RouteDns => HelperResult::Routed { routed: false },
            HelperOp::BindDns => {
                let socket =
                    std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| HostError::Failed {
                        op: "bind_dns",
                        message: e.to_string(),
                    })?;
                return Ok(HostReply {
                    result: HelperResult::Done,
                    fd: Some(OwnedFd::from(socket)),
                });
            }
            _ => HelperResult::Done,
        };
        Ok(HostReply { result, fd: None })
    }
}
