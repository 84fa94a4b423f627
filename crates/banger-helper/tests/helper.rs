//! The real helper binary, run as root inside a network namespace this test creates: the
//! network operations really make a bridge, taps and an nftables table there (and remove
//! them), and every refusal the issue lists is answered with an error while the helper keeps
//! serving. Needs root (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use banger_proto::helper::{
    HelperOp, HelperReply, HelperRequest, HelperResult, MAX_FRAME, read_frame, write_frame,
};

/// A network namespace deleted on drop (also when the test fails).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("bgh-{tag}-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name}");
        Self(name)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

mod common;

use common::{Helper, refused, request};

fn start_helper(ns: &Netns) -> Helper {
    common::start(
        common::temp_dir("bgh"),
        &["ip", "netns", "exec", &ns.0],
        &["--subnet".as_ref(), "172.30.0.0/24".as_ref()],
    )
}

#[track_caller]
fn still_serving(socket: &Path) {
    let reply = request(socket, HelperOp::Hello);
    assert!(
        matches!(
            reply,
            HelperReply::Ok {
                result: HelperResult::Info(_)
            }
        ),
        "{reply:?}"
    );
}

fn links(ns: &Netns) -> Vec<String> {
    let out = ns.exec(&["ip", "-j", "link"]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect()
}

fn tables(ns: &Netns) -> Vec<String> {
    let out = ns.exec(&["nft", "-j", "list", "tables"]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("table"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn network_up_and_down_in_a_namespace() {
    let ns = Netns::new("net");
    let helper = start_helper(&ns);
    let reply = request(&helper.socket, HelperOp::NetworkUp { pool_size: 2 });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    // Twice: idempotent.
    let reply = request(&helper.socket, HelperOp::NetworkUp { pool_size: 2 });
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let names = links(&ns);
    for name in ["bg0", "bg0t0", "bg0t1"] {
        assert!(
            names.contains(&name.to_owned()),
            "{name} missing in {names:?}"
        );
    }
    assert_eq!(tables(&ns), ["banger_0"]);
    let addr = ns.exec(&["ip", "-j", "addr", "show", "dev", "bg0"]);
    assert!(String::from_utf8_lossy(&addr.stdout).contains("172.30.0.1"));
    let tap = ns.exec(&[
        "cat",
        "/sys/class/net/bg0t1/owner",
        "/sys/class/net/bg0t1/master/uevent",
    ]);
    let text = String::from_utf8_lossy(&tap.stdout);
    assert!(
        text.starts_with("0\n") && text.contains("INTERFACE=bg0"),
        "{text}"
    );
    match request(&helper.socket, HelperOp::NetworkStatus) {
        HelperReply::Ok {
            result: HelperResult::Status(state),
        } => {
            assert!(state.bridge_up && state.nft_table);
            assert_eq!(state.taps, ["bg0t0", "bg0t1"]);
        }
        other => panic!("{other:?}"),
    }

    // A tap on demand, then gone again.
    let reply = request(
        &helper.socket,
        HelperOp::EnsureTap {
            name: "bg0t7".into(),
        },
    );
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(links(&ns).contains(&"bg0t7".to_owned()));
    let reply = request(
        &helper.socket,
        HelperOp::DeleteTap {
            name: "bg0t7".into(),
        },
    );
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    assert!(!links(&ns).contains(&"bg0t7".to_owned()));

    // The DNS socket arrives as a file descriptor bound to the gateway.
    let mut stream = UnixStream::connect(&helper.socket).unwrap();
    write_frame(
        &mut stream,
        &HelperRequest {
            op_id: "dns".into(),
            op: HelperOp::BindDns,
        },
    )
    .unwrap();
    let (reply, fd) = recv_with_fd(&stream);
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let socket = std::net::UdpSocket::from(fd.expect("an fd with the reply"));
    assert_eq!(socket.local_addr().unwrap().to_string(), "172.30.0.1:53");

    // A tap queue arrives as a file descriptor attached to that tap (made on demand, on the
    // bridge); while it is open the tap carries (IFF_UP|LOWER_UP once attached).
    let mut stream = UnixStream::connect(&helper.socket).unwrap();
    write_frame(
        &mut stream,
        &HelperRequest {
            op_id: "tap".into(),
            op: HelperOp::OpenTap {
                name: "bg0t5".into(),
            },
        },
    )
    .unwrap();
    let (reply, fd) = recv_with_fd(&stream);
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let fd = fd.expect("a tap queue with the reply");
    assert_eq!(tap_name_of(&fd), "bg0t5");
    let master = ns.exec(&["readlink", "/sys/class/net/bg0t5/master"]);
    assert!(
        String::from_utf8_lossy(&master.stdout)
            .trim()
            .ends_with("/bg0")
    );
    // Another owner's tap name is refused before anything is opened.
    refused(
        request(
            &helper.socket,
            HelperOp::OpenTap {
                name: "bg1000t0".into(),
            },
        ),
        "not of this helper's owner",
    );
    drop(fd);

    let reply = request(&helper.socket, HelperOp::NetworkDown);
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    let names = links(&ns);
    assert!(
        names.iter().all(|n| n == "lo"),
        "links left after down: {names:?}"
    );
    assert!(tables(&ns).is_empty());
    // Down again: idempotent.
    let reply = request(&helper.socket, HelperOp::NetworkDown);
    assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
}

/// The name of the tap a tun queue is attached to (TUNGETIFF).
fn tap_name_of(fd: &std::os::fd::OwnedFd) -> String {
    use std::os::fd::AsRawFd;
    nix::ioctl_read_bad!(tun_get_iff, 0x8004_54d2, [u8; 40]);
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes one 40-byte `struct ifreq`; the descriptor is open.
    unsafe { tun_get_iff(fd.as_raw_fd(), &mut ifreq) }.unwrap();
    let end = ifreq[..16].iter().position(|b| *b == 0).unwrap_or(16);
    String::from_utf8_lossy(&ifreq[..end]).into_owned()
}

fn recv_with_fd(stream: &UnixStream) -> (HelperReply, Option<std::os::fd::OwnedFd>) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = vec![0u8; MAX_FRAME + 4];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut fd = None;
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these fds in this process for us.
            fd = fds
                .first()
                .map(|f| unsafe { std::os::fd::OwnedFd::from_raw_fd(*f) });
        }
    }
    let n = msg.bytes;
    let reply = read_frame(&mut &buf[..n]).unwrap();
    (reply, fd)
}

#[test]
fn refusals_leave_the_helper_serving() {
    let ns = Netns::new("ref");
    let helper = start_helper(&ns);
    let socket = &helper.socket;

    // Another uid: `nobody` runs the helper's own client.
    let out = Command::new(env!("CARGO_BIN_EXE_banger-helper"))
        .args(["call", "--socket"])
        .arg(socket)
        .arg(r#"{"kind":"hello"}"#)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("uid 65534 is not this helper's owner"),
        "{stdout}"
    );
    still_serving(socket);

    // Names outside the pattern.
    for name in ["eth0", "bg0t01", "bg0t1;id", "bg0", "../bg0t1", "bg-tap-1"] {
        refused(
            request(socket, HelperOp::EnsureTap { name: name.into() }),
            "not a banger tap name",
        );
        refused(
            request(socket, HelperOp::DeleteTap { name: name.into() }),
            "not a banger tap name",
        );
    }
    // Another owner's tap, by name: refused before anything looks at the interface.
    refused(
        request(
            socket,
            HelperOp::DeleteTap {
                name: "bg1000t0".into(),
            },
        ),
        "not of this helper's owner",
    );
    assert!(links(&ns).iter().all(|n| n == "lo"));
    still_serving(socket);

    // Addresses outside the subnet or reserved in it.
    refused(
        request(
            socket,
            HelperOp::CheckAddress {
                ip: "10.0.0.5".into(),
            },
        ),
        "outside the subnet",
    );
    refused(
        request(
            socket,
            HelperOp::CheckAddress {
                ip: "172.30.0.1".into(),
            },
        ),
        "reserved",
    );
    refused(
        request(
            socket,
            HelperOp::CheckAddress {
                ip: "172.30.0.x".into(),
            },
        ),
        "not an IPv4 address",
    );
    let ok = request(
        socket,
        HelperOp::CheckAddress {
            ip: "172.30.0.9".into(),
        },
    );
    assert!(matches!(ok, HelperReply::Ok { .. }), "{ok:?}");

    // Malformed frames: not JSON, an unknown operation, a truncated body, an oversized header.
    for body in [
        &b"not json"[..],
        br#"{"op_id":"x","op":{"kind":"exec","cmd":"sh"}}"#,
    ] {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .write_all(&(body.len() as u32).to_be_bytes())
            .unwrap();
        stream.write_all(body).unwrap();
        refused(read_frame(&mut stream).unwrap(), "malformed frame");
        still_serving(socket);
    }
    {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(&100u32.to_be_bytes()).unwrap();
        stream.write_all(b"{\"op_id\"").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        refused(read_frame(&mut stream).unwrap(), "truncated");
    }
    {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
        refused(read_frame(&mut stream).unwrap(), "over the");
        // The connection is closed after a broken frame.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    refused(
        request(socket, HelperOp::NetworkUp { pool_size: 100_000 }),
        "above the limit",
    );
    still_serving(socket);
}
