//! The root helper's wire protocol: [`HelperRequest`] (a closed set of [`HelperOp`]s) and
//! [`HelperReply`], each sent as one frame on a Unix stream socket: a 4-byte big-endian length,
//! then that many bytes of JSON. Frames above [`MAX_FRAME`] are refused before anything is
//! allocated. A reply to [`HelperOp::BindDns`] or [`HelperOp::OpenTap`] carries a file
//! descriptor (SCM_RIGHTS) next to its frame; that part is the transport's business, not this module's.
//!
//! The codec is generic over `std::io::Read`/`Write`, so both sides (and the fuzz test) use the
//! same code.

use std::io::{Read, Write};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Largest frame body either side accepts (the biggest real message is a few hundred bytes).
pub const MAX_FRAME: usize = 64 * 1024;

/// Every network object a helper makes carries its owner's uid, so one owner's helper never
/// names (and so never touches) another owner's: bridge `bg<uid>`, taps `bg<uid>t<N>`,
/// nftables table `ip banger_<uid>`.
pub const NAME_PREFIX: &str = "bg";

/// Highest tap index.
pub const MAX_TAP_INDEX: u32 = 65_535;

/// Longest interface name the kernel takes (IFNAMSIZ less the NUL).
pub const IFNAME_MAX: usize = 15;

/// The bridge of `owner`'s VMs: `bg<uid>` (at most 12 characters).
pub fn bridge_name(owner: u32) -> String {
    format!("{NAME_PREFIX}{owner}")
}

/// The nftables table (family `ip`) of `owner`'s network: `banger_<uid>`.
pub fn nft_table(owner: u32) -> String {
    format!("banger_{owner}")
}

/// Prefix of every device-mapper name banger makes: `banger-<owner uid>-<vm id>`.
pub const DM_PREFIX: &str = "banger-";

/// The device-mapper name of `owner`'s VM `vm_id`: `banger-<owner uid>-<vm id>`. Device-mapper
/// names are host-wide and VM ids are not secret: the uid keeps one owner from taking the
/// name another owner's VM needs.
pub fn dm_name(owner: u32, vm_id: &str) -> String {
    format!("{DM_PREFIX}{owner}-{vm_id}")
}

/// One request: the operation and the op_id of the daemon request that caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperRequest {
    /// Ties the helper's log lines to the CLI command (`X-Banger-Op-Id`).
    pub op_id: String,
    pub op: HelperOp,
}

/// Everything the helper can be asked to do. Nothing else exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HelperOp {
    /// The helper's version and network settings ([`HelperResult::Info`]).
    Hello,
    /// The owner's bridge with the gateway address, the owner's nftables table, forwarding
    /// on the bridge and the uplink, and taps `bg<uid>t0` .. `bg<uid>t{pool_size-1}`.
    /// Idempotent.
    NetworkUp { pool_size: u32 },
    /// What exists of the owner's network ([`HelperResult::Status`]).
    NetworkStatus,
    /// Removes the owner's taps, bridge and nftables table (nobody else's). Idempotent.
    NetworkDown,
    /// Makes sure the tap (named for the owner) exists, is owned by the owner, attached to
    /// the owner's bridge and up.
    EnsureTap { name: String },
    /// [`HelperOp::EnsureTap`], then a queue of that tap opened by the helper
    /// (`/dev/net/tun`, TUNSETIFF as a tap without packet info, with virtio-net headers),
    /// passed back with SCM_RIGHTS: the owner's VMM uses it as its NIC where `/dev/net/tun`
    /// is not open to the owner.
    OpenTap { name: String },
    /// Removes the tap if it exists.
    DeleteTap { name: String },
    /// Checks that `ip` may be leased: inside the subnet, not the network, gateway or broadcast
    /// address. A guard the daemon calls before writing a lease.
    CheckAddress { ip: String },
    /// A UDP socket bound to the owner's gateway address, port 53, passed back with
    /// SCM_RIGHTS. The nftables table lets only the owner's subnet reach it.
    BindDns,
    /// Routes `~vm` to the gateway on the bridge through systemd-resolved, when it runs.
    RouteDns,
    /// Attaches a regular file of the owner under the owner's state dir (resolved beneath the
    /// helper's descriptor of that dir, no symlink or mount point crossed) to a free loop
    /// device, read-only when asked, and tags the device as this helper's
    /// ([`HelperResult::Device`]).
    LoopAttach { file: String, read_only: bool },
    /// Detaches `/dev/loopN`, which this helper must have attached (its tag and record) and,
    /// when `file` is given, must still be backed by that file (same device and inode): a
    /// device recorded before a host reboot may back another file by now, which is then left
    /// alone.
    LoopDetach {
        device: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
    },
    /// Creates the device-mapper snapshot `name` (`banger-<vm id>`): origin `origin_loop`
    /// (read-only) with persistent exceptions in `cow_loop`, 4 KiB chunks, both loops attached
    /// by this helper. The node is given to the owner ([`HelperResult::Device`]).
    DmSnapshotCreate {
        name: String,
        origin_loop: String,
        cow_loop: String,
    },
    /// Removes the device-mapper device `name`, which this helper must have created.
    DmRemove { name: String },
    /// Starts a Firecracker VM through the jailer (which must start as root): builds the jail
    /// `<jail base>/<exec file name>/<vm_id>/root` under the helper's own base dir, places
    /// the files there (hard link, or a bind mount across file systems) under the fixed
    /// in-jail names of [`JailFiles`], and runs the jailer and Firecracker binaries of the
    /// helper's own configuration (never named by a request) in a new session, with the
    /// helper's owner uid/gid ([`HelperResult::Jailed`]). Files must resolve beneath the
    /// owner's state dir, be regular files and belong to the owner.
    SpawnJailed {
        vm_id: String,
        files: JailFiles,
        cpus: u32,
        memory_mib: u64,
    },
    /// Removes a VM's jail (bind mounts first) and its cgroup. Idempotent.
    RemoveJail { vm_id: String },
}

/// Host paths of the files a jailed Firecracker needs; each appears in the jail under the
/// fixed name of the matching `JAIL_*` constant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailFiles {
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub system_disk: String,
    pub work_disk: String,
    /// Receives the serial console (`PUT /serial`).
    pub console_log: String,
    /// Firecracker's log (`--log-path`), kept in the VM's data dir so it outlives the jail;
    /// absent: the helper makes an empty one in the jail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// In-jail paths (as the jailed Firecracker sees them) of the files in [`JailFiles`], and of
/// what the helper creates there.
pub const JAIL_KERNEL: &str = "/vmlinux";
pub const JAIL_INITRD: &str = "/initrd.img";
pub const JAIL_SYSTEM_DISK: &str = "/system.raw";
pub const JAIL_WORK_DISK: &str = "/work.ext4";
pub const JAIL_CONSOLE: &str = "/console.log";
pub const JAIL_LOG: &str = "/firecracker.log";
pub const JAIL_METRICS: &str = "/firecracker.metrics";
/// The API socket inside the jail (the jailer creates `/run` owned by the uid).
pub const JAIL_API_SOCKET: &str = "/run/firecracker.socket";

/// Whether `id` is a banger VM id (32 lowercase hex digits), which also satisfies the
/// jailer's id rule (alphanumerics and hyphens, at most 64).
pub fn is_vm_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl HelperOp {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::NetworkUp { .. } => "network_up",
            Self::NetworkStatus => "network_status",
            Self::NetworkDown => "network_down",
            Self::EnsureTap { .. } => "ensure_tap",
            Self::OpenTap { .. } => "open_tap",
            Self::DeleteTap { .. } => "delete_tap",
            Self::CheckAddress { .. } => "check_address",
            Self::BindDns => "bind_dns",
            Self::RouteDns => "route_dns",
            Self::LoopAttach { .. } => "loop_attach",
            Self::LoopDetach { .. } => "loop_detach",
            Self::DmSnapshotCreate { .. } => "dm_snapshot_create",
            Self::DmRemove { .. } => "dm_remove",
            Self::SpawnJailed { .. } => "spawn_jailed",
            Self::RemoveJail { .. } => "remove_jail",
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum HelperReply {
    Ok {
        result: HelperResult,
    },
    Error {
        code: HelperErrorCode,
        message: String,
    },
}

/// Why the helper refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperErrorCode {
    /// The frame was not a valid request.
    BadFrame,
    /// An argument failed validation (name pattern, subnet, path).
    Invalid,
    /// The operation ran and failed.
    Failed,
}

/// What an operation returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HelperResult {
    Info(HelperInfo),
    Status(NetworkState),
    /// Done; for `bind_dns` the socket travels with this frame.
    Done,
    /// `route_dns`: whether systemd-resolved now routes `~vm` (false: not running here).
    Routed {
        routed: bool,
    },
    /// `loop_attach`, `dm_snapshot_create`: the block device made (`/dev/loopN`,
    /// `/dev/mapper/NAME`).
    Device {
        device: String,
    },
    /// `spawn_jailed`: the jailed Firecracker's pid (the jailer execs it in place) and the
    /// jail's root directory on the host.
    Jailed {
        pid: u32,
        root: String,
    },
}

/// The helper's fixed settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperInfo {
    pub version: String,
    /// The uid this helper serves; its network objects carry it.
    pub owner: u32,
    pub bridge: String,
    /// The subnet, e.g. `172.30.0.0/24`.
    pub subnet: String,
    /// The bridge's address, the guests' gateway and DNS server.
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
}

/// What exists of banger's network on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkState {
    pub bridge_up: bool,
    pub taps: Vec<String>,
    pub nft_table: bool,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection before a frame started.
    #[error("connection closed")]
    Closed,
    /// The announced length is above [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not the expected JSON.
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame I/O")]
    Io(#[from] std::io::Error),
}

/// Writes `value` as one frame.
pub fn write_frame(out: &mut impl Write, value: &impl Serialize) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

/// Parses a frame's 4-byte header into the body length, refusing oversized frames.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Parses a frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one frame and parses it. [`FrameError::Closed`] when the stream ends cleanly first.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match input.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Malformed("truncated frame header".into()));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Malformed(format!("truncated frame body (expected {len} bytes)"))
        } else {
            FrameError::Io(e)
        }
    })?;
    decode_body(&body)
}

/// A decimal number without sign or leading zeros.
fn parse_decimal(digits: &str) -> Option<u32> {
    if digits.is_empty()
        || digits.len() > 10
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` is a tap name banger makes (`bg<uid>t<N>`); returns (uid, N).
pub fn parse_tap_name(name: &str) -> Option<(u32, u32)> {
    if name.len() > IFNAME_MAX {
        return None;
    }
    let (owner, index) = name.strip_prefix(NAME_PREFIX)?.split_once('t')?;
    let owner = parse_decimal(owner)?;
    let index = parse_decimal(index)?;
    (index <= MAX_TAP_INDEX).then_some((owner, index))
}

/// Whether `name` is a device-mapper name banger makes ([`dm_name`]): [`DM_PREFIX`], the
/// owner's uid (decimal, no leading zeros), `-`, a VM id (32 lowercase hex digits, a simple
/// UUID). Returns the uid and the VM id.
pub fn parse_dm_name(name: &str) -> Option<(u32, &str)> {
    let (owner, id) = name.strip_prefix(DM_PREFIX)?.split_once('-')?;
    let owner = parse_decimal(owner)?;
    is_dm_vm_id(id).then_some((owner, id))
}

/// Whether `name` is the name banger gave a mapping before names carried the owner's uid
/// (`banger-<vm id>`); returns the VM id. Only removal still accepts it.
pub fn parse_legacy_dm_name(name: &str) -> Option<&str> {
    let id = name.strip_prefix(DM_PREFIX)?;
    is_dm_vm_id(id).then_some(id)
}

fn is_dm_vm_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `device` is a loop device path (`/dev/loopN`, N without leading zeros); returns N.
pub fn parse_loop_device(device: &str) -> Option<u32> {
    let digits = device.strip_prefix("/dev/loop")?;
    if digits.is_empty()
        || digits.len() > 7
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// `owner`'s tap with index `n`: `bg<uid>t<N>`; `None` when the index is above
/// [`MAX_TAP_INDEX`] or the name would not fit an interface name (a 10-digit uid leaves room
/// for indexes up to 99).
pub fn tap_name(owner: u32, index: u32) -> Option<String> {
    let name = format!("{NAME_PREFIX}{owner}t{index}");
    (index <= MAX_TAP_INDEX && name.len() <= IFNAME_MAX).then_some(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_round_trip() {
        let request = HelperRequest {
            op_id: "abc".into(),
            op: HelperOp::EnsureTap {
                name: "bg1000t3".into(),
            },
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &request).unwrap();
        let back: HelperRequest = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn unknown_ops_and_fields_are_refused() {
        for body in [
            r#"{"op_id":"x","op":{"kind":"run_shell","cmd":"id"}}"#,
            r#"{"op_id":"x","op":{"kind":"hello"},"extra":1}"#,
            r#"{"op_id":"x","op":{"kind":"delete_tap","name":"bg0t1","force":true}}"#,
        ] {
            assert!(
                decode_body::<HelperRequest>(body.as_bytes()).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(frame_len(header), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn dm_names_and_loop_devices_follow_the_pattern() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(dm_name(1000, id), format!("banger-1000-{id}"));
        assert_eq!(parse_dm_name(&dm_name(1000, id)), Some((1000, id)));
        assert_eq!(parse_dm_name(&dm_name(0, id)), Some((0, id)));
        assert_eq!(parse_legacy_dm_name(&format!("banger-{id}")), Some(id));
        assert_eq!(parse_dm_name(&format!("banger-{id}")), None);
        assert_eq!(parse_legacy_dm_name(&dm_name(1000, id)), None);
        for bad in [
            "banger-",
            "banger-01000-0123456789abcdef0123456789abcdef",
            "banger--0123456789abcdef0123456789abcdef",
            "banger-1000-0123456789ABCDEF0123456789abcdef",
            "banger-1000-../../control",
            "banger-0123456789ABCDEF0123456789abcdef",
            "banger-0123456789abcdef0123456789abcde",
            "banger-0123456789abcdef0123456789abcdef0",
            "other-0123456789abcdef0123456789abcdef",
            "banger-../../control",
            "root",
        ] {
            assert_eq!(parse_dm_name(bad), None, "{bad}");
        }
        assert_eq!(parse_loop_device("/dev/loop0"), Some(0));
        assert_eq!(parse_loop_device("/dev/loop17"), Some(17));
        for bad in [
            "/dev/loop",
            "/dev/loop01",
            "/dev/loop-control",
            "/dev/sda",
            "loop0",
            "/dev/loop0/../sda",
            "/dev/loop99999999",
        ] {
            assert_eq!(parse_loop_device(bad), None, "{bad}");
        }
    }

    #[test]
    fn tap_names_follow_the_pattern_and_carry_the_owner() {
        assert_eq!(parse_tap_name("bg0t0"), Some((0, 0)));
        assert_eq!(parse_tap_name("bg1000t65535"), Some((1000, 65_535)));
        assert_eq!(parse_tap_name("bg4294967295t99"), Some((u32::MAX, 99)));
        assert_eq!(tap_name(1000, 7).as_deref(), Some("bg1000t7"));
        assert_eq!(tap_name(u32::MAX, 100), None);
        assert_eq!(tap_name(0, MAX_TAP_INDEX + 1), None);
        // One owner's names never parse as another's.
        assert_ne!(parse_tap_name("bg1t23"), parse_tap_name("bg12t3"));
        assert_eq!(bridge_name(1000), "bg1000");
        assert_eq!(nft_table(1000), "banger_1000");
        for bad in [
            "bgt0",
            "bg1000t",
            "bg1000t01",
            "bg01000t1",
            "bg1000t65536",
            "bg1000t1a",
            "bg-1t1",
            "bg1000t-1",
            "bg1000t1 ",
            "bg1000",
            "bg-tap-1",
            "eth0",
            "bg4294967296t1",
            "bg4294967295t100",
        ] {
            assert_eq!(parse_tap_name(bad), None, "{bad}");
        }
    }
}
