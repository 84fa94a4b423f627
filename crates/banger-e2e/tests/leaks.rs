//! The leak check itself (banger_e2e::leaks): each kind of leftover it promises to find is
//! made for real (a process naming the instance, a partial file, a scratch dir, a runtime
//! file, a stored dir; as root also a loop device, a mount, a link and an nftables table in a
//! namespace the test made), found in the diff with a readable line, and gone once undone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_e2e::leaks::{LeakScope, Snapshot, assert_no_leaks};
use banger_e2e::{poll, root_or_skip};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_leak_check_finds_what_an_instance_leaves() {
    let dir = tempfile::Builder::new()
        .prefix("bgleak")
        .tempdir_in("/tmp")
        .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("run")).unwrap();
    std::fs::write(home.join("run/bangerd.sock"), "").unwrap();
    let scope = LeakScope::new(dir.path(), &home);
    let before = Snapshot::take(&scope);
    assert_no_leaks(&before, &Snapshot::take(&scope), "nothing");

    // Files and a process.
    std::fs::create_dir_all(home.join("images/abc")).unwrap();
    std::fs::write(home.join("images/abc/rootfs.partial"), "x").unwrap();
    std::fs::create_dir_all(home.join("tmp/pull123/deep")).unwrap();
    std::fs::create_dir_all(home.join("run/vms/0123")).unwrap();
    std::fs::write(home.join("run/vms/0123/qmp.sock"), "").unwrap();
    std::fs::create_dir_all(home.join("vms/0123")).unwrap();
    let marker = dir.path().join("vms/0123/fc.sock");
    // A process whose arguments name the instance (its argv[0] here).
    let mut child = Command::new("sleep")
        .arg0(marker.display().to_string())
        .arg("600")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Until it has exec'd, the child's command line is this test's.
    let pid = child.id();
    poll(Duration::from_secs(10), "the child's command line", || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .filter(|c| String::from_utf8_lossy(c).contains("fc.sock"))
            .map(drop)
    });
    let after = Snapshot::take(&scope);
    let added = after.added_since(&before);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        added.items("temp file"),
        ["images/abc/rootfs.partial", "tmp/pull123"]
    );
    assert_eq!(added.items("runtime file"), ["run/vms/0123/qmp.sock"]);
    assert_eq!(
        added.items("stored dir"),
        ["images/abc", "vms/0123"],
        "{added}"
    );
    let processes = added.items("process");
    assert_eq!(processes.len(), 1, "{added}");
    assert!(
        processes[0].starts_with("sleep [/tmp/bgleak") && processes[0].ends_with("fc.sock 600]"),
        "{added}"
    );
    let failure = std::panic::catch_unwind(|| assert_no_leaks(&before, &after, "the operation"))
        .expect_err("the leftovers fail the check");
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(
        message.starts_with("the operation left behind what was not there before:\n")
            && message.contains("  temp file: tmp/pull123\n")
            && message.contains("  process: sleep [/tmp/bgleak"),
        "{message}"
    );
    for path in ["images", "tmp", "run/vms", "vms"] {
        std::fs::remove_dir_all(home.join(path)).unwrap();
    }
    assert_no_leaks(&before, &Snapshot::take(&scope), "after cleaning up");

    if !root_or_skip(
        "the_leak_check_finds_what_an_instance_leaves (loops, mounts, links, tables)",
        "losetup, mount and network namespaces",
    ) {
        return;
    }
    // A namespace of the test's own; a loop device, a mount, a link and a table.
    let ns = format!("bgleak-{}", std::process::id());
    let _ = Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(Stdio::null())
        .status();
    run("ip", &["netns", "add", &ns]);
    let scope = scope.in_netns(&ns);
    let before = Snapshot::take(&scope);
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let device = run("losetup", &["--find", "--show", backing.to_str().unwrap()]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &["-t", "tmpfs", "bgleak", mnt.to_str().unwrap()]);
    run(
        "ip",
        &[
            "-n", &ns, "link", "add", "bgleak0", "type", "veth", "peer", "name", "bgleak1",
        ],
    );
    let nft = Command::new("ip")
        .args([
            "netns", "exec", &ns, "nft", "add", "table", "inet", "bgleak",
        ])
        .status()
        .is_ok_and(|s| s.success());
    let added = Snapshot::take(&scope).added_since(&before);
    run("ip", &["netns", "del", &ns]);
    run("umount", &[mnt.to_str().unwrap()]);
    run("losetup", &["-d", &device]);
    assert_eq!(
        added.items("loop device"),
        [format!("{device} <- {}", backing.display())],
        "{added}"
    );
    assert_eq!(added.items("mount"), [mnt.display().to_string()], "{added}");
    assert_eq!(added.items("link"), ["bgleak0", "bgleak1"], "{added}");
    if nft {
        assert_eq!(added.items("nft table"), ["table inet bgleak"], "{added}");
    } else {
        banger_shared::skip::report(
            "the_leak_check_finds_what_an_instance_leaves (nft table)",
            "nft is not installed",
        );
    }
    // The namespace is gone with its link and table (nothing listed there now).
    assert_no_leaks(&before, &Snapshot::take(&scope), "after undoing them");
}
