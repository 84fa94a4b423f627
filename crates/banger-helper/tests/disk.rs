//! The real helper binary (as root, owner uid 0) attaching and detaching real loop devices for
//! the `dm` system-disk strategy, and refusing what is not the owner's: files outside the state
//! dir or reached through a symlink, loop devices the helper did not attach (wherever their
//! backing file is, the state dir included), names that are not banger's.
//! device-mapper itself does not exist on the test machines: the snapshot operations are
//! checked for their validation and for a one-line error naming the missing control node.
//! Every loop device a test makes is detached on drop, also when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_proto::helper::{HelperOp, HelperReply, HelperResult};

mod common;

use common::{refused, request};

/// The common helper plus a directory beside its state dir (outside it).
struct Helper {
    inner: common::Helper,
    outside: PathBuf,
}

impl std::ops::Deref for Helper {
    type Target = common::Helper;
    fn deref(&self) -> &common::Helper {
        &self.inner
    }
}

fn start_helper() -> Helper {
    let inner = common::start(common::temp_dir("bghd"), &[], &[]);
    std::fs::create_dir_all(inner.state.join("images/abc")).unwrap();
    std::fs::create_dir_all(inner.state.join("vms/def")).unwrap();
    let outside = inner.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    Helper {
        outside: outside.canonicalize().unwrap(),
        inner,
    }
}

/// A sparse file of `mib` MiB.
fn file(path: &Path, mib: u64) -> PathBuf {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    path.to_path_buf()
}

/// Detaches, on drop, every loop device backed by a file under the test's directory (the
/// state dir and the "outside" dir both are), whoever attached it: a failing test, or a helper
/// that wrongly accepted a request, leaks none, and other processes' devices are left alone.
struct Loops(PathBuf);

impl Loops {
    fn under(helper: &Helper) -> Self {
        Self(helper.state.parent().unwrap().to_path_buf())
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for device in loop_devices_backed_under(&self.0) {
            let _ = Command::new("losetup").args(["-d", &device]).status();
        }
    }
}

fn loop_devices_backed_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let device = format!("/dev/{name}");
        if name.starts_with("loop") && backing_file(&device).is_some_and(|b| b.starts_with(dir)) {
            found.push(device);
        }
    }
    found
}

fn sys(device: &str, file: &str) -> Option<String> {
    let name = device.strip_prefix("/dev/")?;
    std::fs::read_to_string(format!("/sys/block/{name}/{file}"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn backing_file(device: &str) -> Option<PathBuf> {
    sys(device, "loop/backing_file").map(PathBuf::from)
}

/// Waits until `device` is detached: the kernel detaches a device still open elsewhere (udev
/// probing it) when the last opener closes.
#[track_caller]
fn wait_detached(device: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Some(backing) = backing_file(device) {
        assert!(
            std::time::Instant::now() < deadline,
            "{device} still attached to {}",
            backing.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A read-only loop device attached by root's `losetup`, not by the helper.
fn losetup(backing: &Path) -> String {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(backing)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[track_caller]
fn attached(reply: HelperReply) -> String {
    match reply {
        HelperReply::Ok {
            result: HelperResult::Device { device },
        } => device,
        other => panic!("expected a device, got {other:?}"),
    }
}

fn attach(helper: &Helper, file: &Path, read_only: bool) -> HelperReply {
    request(
        &helper.socket,
        HelperOp::LoopAttach {
            file: file.display().to_string(),
            read_only,
        },
    )
}

#[test]
fn loop_devices_are_attached_and_detached_inside_the_state_dir_only() {
    let helper = start_helper();
    let _loops = Loops::under(&helper);
    let base = file(&helper.state.join("images/abc/rootfs.ext4"), 8);
    let cow = file(&helper.state.join("vms/def/system.cow"), 8);

    // The image, read-only.
    let base_loop = attached(attach(&helper, &base, true));
    assert_eq!(backing_file(&base_loop).as_deref(), Some(base.as_path()));
    assert_eq!(sys(&base_loop, "ro").as_deref(), Some("1"));
    assert_eq!(sys(&base_loop, "size").as_deref(), Some("16384"));
    // The copy-on-write store, writable.
    let cow_loop = attached(attach(&helper, &cow, false));
    assert_ne!(cow_loop, base_loop);
    assert_eq!(backing_file(&cow_loop).as_deref(), Some(cow.as_path()));
    assert_eq!(sys(&cow_loop, "ro").as_deref(), Some("0"));
    // Tagged as the helper's own, and recorded in its record dir.
    let records = helper.dir.path().join("records");
    let index = cow_loop.trim_start_matches("/dev/loop");
    let record = std::fs::read_to_string(records.join(format!("loop{index}"))).unwrap();
    assert!(record.starts_with("banger:0:"), "{record}");

    // A device recorded for one file that backs another of the owner's files now (loop
    // names recorded before a host reboot) is left attached.
    refused(
        request(
            &helper.socket,
            HelperOp::LoopDetach {
                device: cow_loop.clone(),
                file: Some(base.display().to_string()),
            },
        ),
        "left attached",
    );
    assert_eq!(backing_file(&cow_loop).as_deref(), Some(cow.as_path()));
    // Detached: the cow named with its file, the base with no file given (records from
    // before files were kept).
    let cow_text = cow.display().to_string();
    for (device, file) in [(&cow_loop, Some(cow_text)), (&base_loop, None)] {
        let reply = request(
            &helper.socket,
            HelperOp::LoopDetach {
                device: device.clone(),
                file,
            },
        );
        assert!(
            matches!(
                reply,
                HelperReply::Ok {
                    result: HelperResult::Done
                }
            ),
            "{reply:?}"
        );
        wait_detached(device);
        let index = device.trim_start_matches("/dev/loop");
        assert!(
            !records.join(format!("loop{index}")).exists(),
            "record left"
        );
    }
    assert!(loop_devices_backed_under(&helper.state).is_empty());

    // Refused: a file outside, a symlink escaping, a symlink staying inside, a directory, a
    // missing file, another's file; every refusal below the state dir reads the same.
    const NOT_OWNERS: &str = "is not a regular file of the owner beneath the state dir";
    let secret = file(&helper.outside.join("secret.img"), 1);
    refused(attach(&helper, &secret, true), "outside the state dir");
    std::os::unix::fs::symlink(&secret, helper.state.join("images/abc/escape")).unwrap();
    refused(
        attach(&helper, &helper.state.join("images/abc/escape"), false),
        NOT_OWNERS,
    );
    std::os::unix::fs::symlink(&helper.outside, helper.state.join("updir")).unwrap();
    refused(
        attach(&helper, &helper.state.join("updir/secret.img"), true),
        NOT_OWNERS,
    );
    std::os::unix::fs::symlink(&cow, helper.state.join("cow-link")).unwrap();
    refused(
        attach(&helper, &helper.state.join("cow-link"), false),
        NOT_OWNERS,
    );
    refused(
        attach(&helper, &helper.state.join("images"), true),
        NOT_OWNERS,
    );
    // A file inside the state dir that is not the owner's (e.g. a root file hard-linked in).
    let foreign = file(&helper.state.join("images/abc/foreign.img"), 1);
    std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
    refused(attach(&helper, &foreign, true), NOT_OWNERS);
    refused(
        attach(&helper, &helper.state.join("images/nothing"), true),
        NOT_OWNERS,
    );
    refused(
        request(
            &helper.socket,
            HelperOp::LoopAttach {
                file: "images/abc/rootfs.ext4".into(),
                read_only: true,
            },
        ),
        "absolute path",
    );
    assert!(
        loop_devices_backed_under(&helper.outside).is_empty(),
        "nothing attached to the refused file"
    );

    // A loop device attached outside banger is not the helper's to detach, whether backed
    // elsewhere or by the owner's own file in the state dir (root's losetup): identity, not
    // the backing file's path.
    for backing in [&secret, &base] {
        let foreign = losetup(backing);
        refused(
            request(
                &helper.socket,
                HelperOp::LoopDetach {
                    device: foreign.clone(),
                    file: None,
                },
            ),
            "not attached by this helper",
        );
        assert_eq!(
            backing_file(&foreign).as_deref(),
            Some(backing.as_path()),
            "still attached"
        );
    }
    for bad in ["/dev/sda", "/dev/loop-control", "/dev/loop01", "loop0"] {
        refused(
            request(
                &helper.socket,
                HelperOp::LoopDetach {
                    device: bad.into(),
                    file: None,
                },
            ),
            "not a loop device",
        );
    }
}

#[test]
fn device_mapper_operations_validate_and_name_what_is_missing() {
    let helper = start_helper();
    let _loops = Loops::under(&helper);
    let base = file(&helper.state.join("images/abc/rootfs.ext4"), 4);
    let cow = file(&helper.state.join("vms/def/system.cow"), 4);
    let base_loop = attached(attach(&helper, &base, true));
    let cow_loop = attached(attach(&helper, &cow, false));
    let name = "banger-0-0123456789abcdef0123456789abcdef".to_owned();
    let create = |name: &str, origin: &str, cow: &str| {
        request(
            &helper.socket,
            HelperOp::DmSnapshotCreate {
                name: name.into(),
                origin_loop: origin.into(),
                cow_loop: cow.into(),
            },
        )
    };

    for bad in [
        "root",
        "banger-",
        "banger-0123456789ABCDEF0123456789ABCDEF",
        "banger-abc",
        "banger-0123456789abcdef0123456789abcdef/../../control",
        "other-0123456789abcdef0123456789abcdef",
        "banger-00-0123456789abcdef0123456789abcdef",
    ] {
        refused(
            create(bad, &base_loop, &cow_loop),
            "not a banger device-mapper name",
        );
        refused(
            request(&helper.socket, HelperOp::DmRemove { name: bad.into() }),
            "not a banger device-mapper name",
        );
    }
    // The name without the owner's uid is made no more (only removed).
    refused(
        create(
            "banger-0123456789abcdef0123456789abcdef",
            &base_loop,
            &cow_loop,
        ),
        "not a banger device-mapper name",
    );
    // Another owner's name (a VM id is no secret): refused by the name alone.
    let theirs = "banger-1000-0123456789abcdef0123456789abcdef";
    refused(
        create(theirs, &base_loop, &cow_loop),
        "not a device-mapper mapping banger made for this owner",
    );
    refused(
        request(
            &helper.socket,
            HelperOp::DmRemove {
                name: theirs.into(),
            },
        ),
        "not a device-mapper mapping banger made for this owner",
    );
    refused(create(&name, "/dev/sda", &cow_loop), "not a loop device");
    refused(create(&name, &base_loop, &base_loop), "both the origin");
    refused(create(&name, &cow_loop, &base_loop), "is not read-only");
    // A loop device the helper did not attach cannot be the origin or the store, even when
    // it is backed by the owner's file in the state dir.
    let secret = file(&helper.outside.join("secret.img"), 4);
    for backing in [&secret, &base] {
        let foreign = losetup(backing);
        refused(
            create(&name, &foreign, &cow_loop),
            "not attached by this helper",
        );
        refused(
            create(&name, &base_loop, &foreign),
            "not attached by this helper",
        );
    }

    if Path::new("/dev/mapper/control").exists() {
        // A host with device-mapper: the snapshot is made, given to the owner, removed.
        let reply = create(&name, &base_loop, &cow_loop);
        assert!(
            matches!(&reply, HelperReply::Ok { result: HelperResult::Device { device } } if *device == format!("/dev/mapper/{name}")),
            "{reply:?}"
        );
        let reply = request(&helper.socket, HelperOp::DmRemove { name: name.clone() });
        assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    } else {
        // This machine: one line naming what is missing, for create and remove alike.
        banger_shared::skip::report(
            "real device-mapper snapshot create/remove",
            "/dev/mapper/control is missing (no device-mapper here); the refusal was tested",
        );
        let message = refused(
            create(&name, &base_loop, &cow_loop),
            "/dev/mapper/control is missing",
        );
        assert!(message.contains("device-mapper"), "{message}");
        refused(
            request(&helper.socket, HelperOp::DmRemove { name: name.clone() }),
            "/dev/mapper/control is missing",
        );
    }
    // The loops are still the owner's to detach.
    for device in [&cow_loop, &base_loop] {
        let reply = request(
            &helper.socket,
            HelperOp::LoopDetach {
                device: device.clone(),
                file: None,
            },
        );
        assert!(matches!(reply, HelperReply::Ok { .. }), "{reply:?}");
    }
    for device in [&cow_loop, &base_loop] {
        wait_detached(device);
    }
}
