//! `vm cp` against a real VM (one boot): a 50 MiB file and a tree with a symlink, an empty
//! directory and an executable, both ways, with digests, kinds and modes equal; the large
//! copy into the guest takes the workspace channel; guest-planted symlinks pointing out of
//! the destination are skipped, never followed; a path through a host symlink is refused
//! with nothing written; bad arguments fail with a hint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use banger_e2e::{Run, TestEnv};

/// `path kind mode` of every entry under the current directory, then the sha256 of every
/// regular file, sorted: the same script runs on the host and in the guest.
const LISTING: &str = "find . -mindepth 1 -printf '%P %y %m\\n' | LC_ALL=C sort && \
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum";

fn host_listing(dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(LISTING)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn guest_listing(env: &TestEnv, dir: &str) -> String {
    exec(env, &format!("cd {dir} && {LISTING}")).ok().stdout
}

fn exec(env: &TestEnv, script: &str) -> Run {
    env.banger(&["vm", "exec", "dev", "--", "sh", "-c", script])
}

fn cp(env: &TestEnv, src: &str, dst: &str) -> serde_json::Value {
    env.banger(&["vm", "cp", src, dst, "--json"]).ok().json()
}

#[test]
fn cp_both_ways_keeps_content_and_modes_and_never_follows() {
    let fx = tempfile::tempdir_in("/tmp").unwrap();
    let env = TestEnv::new();
    env.build_default_image();
    let tree = fx.path().join("tree");
    let run = Command::new("sh")
        .arg("-c")
        .arg(
            "mkdir -p tree/empty tree/sub/deeper && cd tree \
             && printf '#!/bin/sh\\necho ran\\n' > run.sh && chmod 0755 run.sh \
             && echo data > sub/deeper/data.txt && chmod 0644 sub/deeper/data.txt \
             && head -c 1048576 /dev/urandom > sub/blob && ln -s sub/deeper/data.txt link \
             && ln -s ../run.sh sub/up && cd .. && head -c 52428800 /dev/urandom > big.bin \
             && chmod 0755 tree/empty tree/sub tree/sub/deeper",
        )
        .current_dir(fx.path())
        .status()
        .unwrap();
    assert!(run.success());
    env.banger(&["vm", "create", "dev"]).ok();
    env.banger(&["vm", "start", "dev"]).ok();

    // Host → guest: the tree into an existing directory, the big file to a new name.
    let sent = cp(&env, tree.to_str().unwrap(), "dev:/root/");
    assert_eq!(sent["written"], "/root", "{sent}");
    assert_eq!(guest_listing(&env, "/root/tree"), host_listing(&tree));
    let big = fx.path().join("big.bin");
    let sent = cp(&env, big.to_str().unwrap(), "dev:/root/big-copy.bin");
    assert_eq!(sent["channel"], "virtio-serial", "{sent}");
    assert_eq!(sent["bytes"], 52428800, "{sent}");
    let host_sum = Command::new("sha256sum").arg(&big).output().unwrap().stdout;
    let host_sum = String::from_utf8(host_sum).unwrap();
    let guest_sum = exec(&env, "sha256sum /root/big-copy.bin").ok().stdout;
    assert_eq!(
        guest_sum.split_whitespace().next(),
        host_sum.split_whitespace().next()
    );

    // Guest → host: to a new name (becomes the copy) and into an existing directory.
    let back = fx.path().join("back");
    let got = cp(&env, "dev:/root/tree", back.to_str().unwrap());
    assert_eq!(got["skipped_count"], 0, "{got}");
    assert_eq!(host_listing(&back), host_listing(&tree));
    let into = fx.path().join("into");
    std::fs::create_dir(&into).unwrap();
    cp(&env, "dev:/root/big-copy.bin", into.to_str().unwrap());
    let back_sum = Command::new("sha256sum")
        .arg(into.join("big-copy.bin"))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        String::from_utf8(back_sum)
            .unwrap()
            .split_whitespace()
            .next(),
        host_sum.split_whitespace().next()
    );

    // A compromised guest plants symlinks out of the copy, a setuid file, a 0777 dir and a
    // .git/config; they are skipped or neutered, and nothing outside is touched.
    let outside = fx.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    exec(
        &env,
        &format!(
            "cd /root/tree && ln -s {} evil && ln -s ../../../../../.. sub/evil2 \
             && ln -s /etc/shadow shadow && : > suid && chmod 4755 suid \
             && mkdir open && chmod 0777 open && mkdir -p .git && echo '[core]' > .git/config",
            outside.display()
        ),
    )
    .ok();
    let hostile = fx.path().join("hostile");
    let got = cp(&env, "dev:/root/tree", hostile.to_str().unwrap());
    assert_eq!(got["skipped_count"], 5, "{got}");
    for gone in ["evil", "sub/evil2", "shadow", ".git"] {
        assert!(
            std::fs::symlink_metadata(hostile.join(gone)).is_err(),
            "{gone} was written: {got}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&hostile.join("suid")), 0o755);
    assert_eq!(mode(&hostile.join("open")), 0o755);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A host destination whose path goes through a symlink (planted there earlier, say) is
    // refused as a whole: nothing is written through it, nor anywhere else.
    let planted = fx.path().join("planted");
    std::fs::create_dir_all(planted.join("tree")).unwrap();
    std::os::unix::fs::symlink(&outside, planted.join("tree/sub")).unwrap();
    let refused = env.banger(&["vm", "cp", "dev:/root/tree", planted.to_str().unwrap()]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(refused.stderr.contains("symlink"), "{}", refused.stderr);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let left: Vec<_> = std::fs::read_dir(planted.join("tree")).unwrap().collect();
    assert_eq!(left.len(), 1, "partial output left: {left:?}");
    assert!(
        std::fs::read_dir(&planted).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("staging")),
        "a staging directory was left"
    );

    // Usage errors: a hint, exit 1, nothing copied.
    let both_host = env.banger(&["vm", "cp", "/tmp/a", "/tmp/b"]);
    assert_eq!(both_host.code, 1);
    assert!(both_host.stderr.contains("hint:"), "{}", both_host.stderr);
    let missing = env.banger(&["vm", "cp", "dev:/root/nope", fx.path().to_str().unwrap()]);
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("does not exist in the guest"),
        "{}",
        missing.stderr
    );
}
