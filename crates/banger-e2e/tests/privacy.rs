//! Finding 8 of the trust-boundary review: another local user (`bangerevil`, created here)
//! can read nothing of the owner's banger data — not `state.db`, not a VM's work disk (which
//! holds the guest's SSH host key), not a directory listing — neither as the daemon creates
//! them nor after an older banger left them world-readable (the daemon fixes that at start).
//! Needs no booted VM: `vm create` makes the disks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_e2e::TestEnv;

const EVIL: &str = "bangerevil";

/// Creates the attacker account once (idempotent).
fn ensure_user(name: &str) {
    let known = Command::new("id").arg(name).output().unwrap();
    if !known.status.success() {
        let made = Command::new("useradd")
            .args(["--create-home", name])
            .status()
            .unwrap();
        assert!(made.success(), "useradd {name} failed");
    }
}

/// Every path under `root` (root included), not following symlinks.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let path = out[i].clone();
        i += 1;
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                out.push(entry.unwrap().path());
            }
        }
    }
    out
}

/// The paths under `root` that user `EVIL` can read (a file's bytes or a dir's listing).
fn readable_by_evil(root: &Path) -> Vec<String> {
    let paths = tree(root);
    let out = Command::new("runuser")
        .args(["-u", EVIL, "--", "sh", "-c"])
        .arg(
            r#"for p in "$@"; do
                 if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "$p";
                 elif [ -f "$p" ]; then head -c1 "$p" >/dev/null 2>&1 && echo "$p"; fi
               done; true"#,
        )
        .arg("sh")
        .args(&paths)
        .output()
        .unwrap();
    assert!(out.status.success(), "runuser failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn another_user_reads_nothing_of_the_owners_data() {
    ensure_user(EVIL);
    let env = TestEnv::new();
    // The test's scratch dir is traversable, as a home directory usually is: only banger's
    // own modes stand between the attacker and the data.
    std::fs::set_permissions(env.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.import_stub_image();
    env.banger(&["vm", "create", "dev"]).ok();
    let home = env.home();
    let paths = tree(&home);
    assert!(
        paths.iter().any(|p| p.ends_with("state.db"))
            && paths.iter().any(|p| p.to_string_lossy().contains("work")),
        "expected state.db and a work disk under {}: {paths:?}",
        home.display()
    );
    let leaked = readable_by_evil(&home);
    assert!(leaked.is_empty(), "readable by {EVIL}: {leaked:?}");

    // An older banger's modes: everything world-readable. The next daemon start fixes them.
    env.banger(&["daemon", "stop"]).ok();
    let loosen = Command::new("chmod")
        .args(["-R", "go+rX"])
        .arg(&home)
        .status()
        .unwrap();
    assert!(loosen.success());
    assert!(
        !readable_by_evil(&home).is_empty(),
        "the loosened tree should be readable before the daemon starts"
    );
    env.banger(&["vm", "ls"]).ok();
    let leaked = readable_by_evil(&home);
    assert!(
        leaked.is_empty(),
        "readable by {EVIL} after a restart: {leaked:?}"
    );
    let mode = std::fs::metadata(&home).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode");
    let run = home.join("run");
    let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "runtime dir mode");
}
