//! Bounded fuzzing of the running helper's request parsing (runs in the normal test run, a
//! few seconds): garbage bytes, frames with lying length headers, mutated valid frames and
//! valid frames carrying arbitrary strings in every path/name field, each on a fresh
//! connection. The helper never panics, never hangs (every connection gets a reply or is
//! closed within a deadline) and still answers `hello` after each case. It runs as root in a
//! network namespace of its own, for owner uid 0, so nothing generated can reach the host's
//! network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use banger_proto::helper::{
    HelperOp, HelperReply, HelperRequest, HelperResult, JailFiles, write_frame,
};
use proptest::prelude::*;

mod common;

/// A network namespace deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("bghf-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The helper shared by every case (started once per test).
struct Target {
    helper: common::Helper,
    _ns: Netns,
}

fn target(tag: &str) -> Target {
    let ns = Netns::new(tag);
    let helper = common::start(
        common::temp_dir("bghf"),
        &["ip", "netns", "exec", &ns.0],
        &[],
    );
    Target { helper, _ns: ns }
}

/// Sends raw bytes on a fresh connection, half-closes, and reads whatever comes back; the
/// helper must answer or close within the deadline.
fn send_raw(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the helper did not answer or close within 10 s: {e}"),
    }
    reply
}

#[track_caller]
fn still_serving(target: &Target) {
    let reply = common::request(&target.helper.socket, HelperOp::Hello);
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

/// Operations that touch only validation, loops, dm and jails (never the network), with
/// arbitrary text where paths, names and devices go.
fn op() -> impl Strategy<Value = HelperOp> {
    let text = || "(/dev/loop[0-9]{1,3}|banger-[0-9a-f]{0,33}|/[ -~]{0,40}|\\PC{0,20})";
    prop_oneof![
        Just(HelperOp::Hello),
        (text(), any::<bool>())
            .prop_map(|(file, read_only)| HelperOp::LoopAttach { file, read_only }),
        (text(), proptest::option::of(text()))
            .prop_map(|(device, file)| HelperOp::LoopDetach { device, file }),
        (text(), text(), text()).prop_map(|(name, origin_loop, cow_loop)| {
            HelperOp::DmSnapshotCreate {
                name,
                origin_loop,
                cow_loop,
            }
        }),
        text().prop_map(|name| HelperOp::DmRemove { name }),
        text().prop_map(|ip| HelperOp::CheckAddress { ip }),
        (text(), text(), any::<u32>(), any::<u64>()).prop_map(|(vm_id, path, cpus, memory_mib)| {
            HelperOp::SpawnJailed {
                vm_id,
                files: JailFiles {
                    kernel: path.clone(),
                    initrd: None,
                    system_disk: path.clone(),
                    work_disk: path.clone(),
                    console_log: path,
                    log: None,
                },
                cpus,
                memory_mib,
            }
        }),
        text().prop_map(|vm_id| HelperOp::RemoveJail { vm_id }),
    ]
}

fn frame(request: &HelperRequest) -> Vec<u8> {
    let mut buf = Vec::new();
    write_frame(&mut buf, request).unwrap();
    buf
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 50,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn garbage_never_stops_the_helper() {
    let target = target("g");
    proptest!(config(150), |(bytes in proptest::collection::vec(any::<u8>(), 0..600))| {
        send_raw(&target.helper.socket, &bytes);
        still_serving(&target);
    });
    // Headers that lie about the length (up to the limit, and over it) with short bodies.
    proptest!(config(50), |(len in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..64))| {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(body);
        send_raw(&target.helper.socket, &bytes);
        still_serving(&target);
    });
}

#[test]
fn mutated_and_arbitrary_requests_are_answered() {
    let target = target("m");
    proptest!(config(150), |(op in op(), op_id in "\\PC{0,80}", at in any::<prop::sample::Index>(), byte in any::<u8>(), mutate in any::<bool>())| {
        let mut bytes = frame(&HelperRequest { op_id, op });
        if mutate {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let reply = send_raw(&target.helper.socket, &bytes);
        if !mutate {
            // A well-formed frame always gets a well-formed reply (most are refusals).
            let parsed: Result<HelperReply, _> = banger_proto::helper::read_frame(&mut reply.as_slice());
            prop_assert!(parsed.is_ok(), "{:?}", String::from_utf8_lossy(&reply));
        }
        still_serving(&target);
    });
    // Nothing was attached or jailed by any of it.
    let records = std::fs::read_dir(target.helper.dir.path().join("records"))
        .unwrap()
        .count();
    assert_eq!(records, 0);
}
