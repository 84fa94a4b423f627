//! The workspace against a real VM (one boot, reused across the checks): prepare of a fixture
//! repo with every awkward kind of file, hashes equal on both sides, the dirty warning and
//! `--auto-prepare`, incremental resync by transfer stats, deletions, survival across
//! stop/start, copy-back with `export --patch`/`--to`, git identity at start, paths that
//! must never be followed, and the workspace channel (used, failing cleanly, absent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use banger_e2e::{Run, TestEnv};

const MARKER: &str = "host-secret-0f9c2a";

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "fixture")
        .env("GIT_AUTHOR_EMAIL", "fixture@example.com")
        .env("GIT_COMMITTER_NAME", "fixture")
        .env("GIT_COMMITTER_EMAIL", "fixture@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn exec(env: &TestEnv, args: &[&str]) -> Run {
    let mut full = vec!["vm", "exec", "dev", "--"];
    full.extend_from_slice(args);
    env.banger(&full)
}

/// Regular files of the workspace as git lists them (symlinks excluded), sorted.
fn regular_files(repo: &Path) -> Vec<String> {
    let listed = sh(repo, "git ls-files -z -co --exclude-standard");
    let mut files: Vec<String> = listed
        .split('\0')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            std::fs::symlink_metadata(repo.join(p))
                .map(|m| m.is_file())
                .unwrap_or(false)
        })
        .map(str::to_owned)
        .collect();
    files.sort();
    files
}

fn host_sums(repo: &Path, files: &[String]) -> String {
    let out = Command::new("sha256sum")
        .arg("--")
        .args(files)
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn workspace_prepare_resync_export_and_safety() {
    let fx = tempfile::tempdir_in("/tmp").unwrap();
    let gitconfig = fx.path().join("gitconfig");
    std::fs::write(
        &gitconfig,
        "[user]\n\tname = Test Person\n\temail = test.person@example.com\n",
    )
    .unwrap();
    let env = TestEnv::new()
        .with_env("GIT_CONFIG_GLOBAL", gitconfig.to_str().unwrap())
        .with_env("GIT_CONFIG_NOSYSTEM", "1");
    env.build_default_image();

    // Fixture: a repo with tracked, untracked, ignored, symlinked (inside, outside, absolute),
    // executable, empty, unicode- and space-named files and a 2 MiB binary; a secret outside.
    // Old mtimes keep git's index from being "racily clean", so a host `git status` never
    // rewrites it behind the test's back.
    let repo = fx.path().join("repo");
    let outside = fx.path().join("outside");
    let plain = fx.path().join("plain");
    for dir in [&repo, &outside, &plain] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::write(outside.join("secret"), MARKER).unwrap();
    sh(
        &repo,
        "git init -q . && printf 'ignored.log\\nbuild/\\n' > .gitignore \
         && echo 'hello' > tracked.txt && mkdir -p sub/deeper && : > sub/empty \
         && echo spaced > 'with space.txt' && echo unicode > 'ünïcödé ✓.txt' \
         && printf '#!/bin/sh\\necho ran\\n' > run.sh && chmod +x run.sh \
         && echo deep > sub/deeper/file.txt && echo gone-soon > delete-me.txt \
         && head -c 2097152 /dev/urandom > big.bin \
         && ln -s tracked.txt link && ln -s ../outside escape && ln -s /etc abs \
         && find . -exec touch -h -d '2020-01-01 00:00:00' {} + \
         && git add -A && git commit -qm init \
         && echo untracked > untracked.txt && echo noise > ignored.log \
         && mkdir build && echo out > build/artifact",
    );
    std::os::unix::fs::symlink(&outside, plain.join("outside-link")).unwrap();
    std::fs::write(plain.join("plain.txt"), "plain").unwrap();
    let repo_s = repo.to_str().unwrap();

    env.banger(&["vm", "create", "dev"]).ok();
    // Refused on a stopped VM, with the state named.
    let stopped = env.banger(&["vm", "workspace", "prepare", "dev", repo_s]);
    assert_eq!(stopped.code, 4, "{}", stopped.stderr);
    assert!(stopped.stderr.contains("start it"), "{}", stopped.stderr);
    env.banger(&["vm", "start", "dev"]).ok();

    // authsync: the host's git identity reached the guest at start.
    let name = exec(&env, &["git", "config", "--global", "user.name"]).ok();
    assert_eq!(name.stdout.trim(), "Test Person");
    let email = exec(&env, &["git", "config", "--global", "user.email"]).ok();
    assert_eq!(email.stdout.trim(), "test.person@example.com");
    // Without a workspace, exec runs in /root.
    assert_eq!(exec(&env, &["pwd"]).ok().stdout.trim(), "/root");

    // Non-git paths and subdirectories are refused, and `..` is resolved before the check.
    let not_git = env.banger(&[
        "vm",
        "workspace",
        "prepare",
        "dev",
        outside.to_str().unwrap(),
    ]);
    assert_eq!(not_git.code, 1);
    assert!(
        not_git.stderr.contains("not a git repository") && not_git.stderr.contains("--no-git"),
        "{}",
        not_git.stderr
    );
    let subdir = env.banger(&[
        "vm",
        "workspace",
        "prepare",
        "dev",
        &format!("{repo_s}/sub"),
    ]);
    assert!(
        subdir.stderr.contains("not the top level"),
        "{}",
        subdir.stderr
    );
    let dotdot = format!("{repo_s}/sub/../../outside");
    let tricked = env.banger(&["vm", "workspace", "prepare", "dev", &dotdot]);
    assert_eq!(tricked.code, 1, "{}", tricked.stderr);

    // --no-git copies a plain directory; the symlinked directory stays a symlink, never walked.
    env.banger(&[
        "vm",
        "workspace",
        "prepare",
        "dev",
        plain.to_str().unwrap(),
        "--no-git",
    ])
    .ok();
    let link = exec(&env, &["readlink", "outside-link"]).ok();
    assert_eq!(link.stdout.trim(), outside.to_str().unwrap());
    let grep = exec(&env, &["grep", "-r", MARKER, "/root/repo"]);
    assert_eq!(
        grep.code, 1,
        "the secret reached the guest: {}",
        grep.stdout
    );

    // The repo (a different path: the plain directory's files are deleted in the guest).
    let first = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert_eq!(first["files_sent"], first["files_total"], "{first}");
    assert!(first["bytes_sent"].as_u64().unwrap() > 2 << 20, "{first}");
    // Over 1 MiB: the tar took the VM's workspace channel, not the SSH session.
    assert_eq!(first["channel"], "virtio-serial", "{first}");
    assert_eq!(exec(&env, &["pwd"]).ok().stdout.trim(), "/root/repo");
    assert_eq!(exec(&env, &["test", "-e", "plain.txt"]).code, 1);

    // Same file set and contents; git agrees the worktree is the host's.
    let files = regular_files(&repo);
    let mut args = vec!["sha256sum", "--"];
    args.extend(files.iter().map(String::as_str));
    assert_eq!(exec(&env, &args).ok().stdout, host_sums(&repo, &files));
    // The guest's git status starts clean: files untracked on the host arrived (hashes above)
    // but are listed in the guest's excludes, so status shows only what changes there.
    assert!(
        sh(&repo, "git status --porcelain").contains("?? untracked.txt"),
        "the fixture has an untracked file"
    );
    assert_eq!(
        exec(&env, &["git", "status", "--porcelain"]).ok().stdout,
        ""
    );
    // Those settings apply to /root/repo only: another repository in the guest keeps git's
    // defaults.
    let other = exec(
        &env,
        &[
            "sh",
            "-c",
            "git init -q /root/other && cd /root/other \
             && echo \"$(git config core.checkStat || echo unset) \
             $(git config core.excludesFile || echo unset)\"",
        ],
    )
    .ok();
    assert_eq!(other.stdout.trim(), "unset unset", "{}", other.stderr);
    assert_eq!(
        exec(&env, &["cat", "untracked.txt"]).ok().stdout,
        "untracked\n"
    );
    for (path, target) in [
        ("link", "tracked.txt"),
        ("escape", "../outside"),
        ("abs", "/etc"),
    ] {
        assert_eq!(exec(&env, &["readlink", path]).ok().stdout.trim(), target);
    }
    assert_eq!(exec(&env, &["./run.sh"]).ok().stdout.trim(), "ran");
    exec(
        &env,
        &["sh", "-c", "test -f sub/empty && ! test -s sub/empty"],
    )
    .ok();
    exec(
        &env,
        &["sh", "-c", "! test -e ignored.log && ! test -e build"],
    )
    .ok();
    assert_eq!(exec(&env, &["grep", "-r", MARKER, "/root/repo"]).code, 1);
    // Exit codes still pass through from /root/repo.
    assert_eq!(exec(&env, &["sh", "-c", "exit 3"]).code, 3);

    // Nothing changed: a prepare sends nothing.
    let noop = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert_eq!(noop["files_sent"], 0, "{noop}");
    assert_eq!(noop["bytes_sent"], 0, "{noop}");

    // One host edit: exec warns (one line naming one file), --auto-prepare resyncs first.
    std::fs::write(repo.join("tracked.txt"), "changed on the host\n").unwrap();
    let warned = exec(&env, &["true"]).ok();
    let warning: Vec<&str> = warned
        .stderr
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(warning.len(), 1, "{}", warned.stderr);
    assert!(warning[0].contains("1 file differs"), "{}", warning[0]);
    let status = env
        .banger(&["vm", "workspace", "status", "dev", "--json"])
        .ok()
        .json();
    assert_eq!(status["host_dirty"], true);
    assert_eq!(status["host"]["modified"][0], "tracked.txt");
    let auto = env
        .banger(&[
            "vm",
            "exec",
            "dev",
            "--auto-prepare",
            "--",
            "cat",
            "tracked.txt",
        ])
        .ok();
    assert_eq!(auto.stdout, "changed on the host\n");
    assert!(!auto.stderr.contains("warning"), "{}", auto.stderr);
    assert_eq!(
        env.banger(&["vm", "workspace", "status", "dev", "--json"])
            .ok()
            .json()["host_dirty"],
        false
    );

    // Incremental: one more edit sends that file (and no more than a little .git metadata),
    // never the 2 MiB binary again.
    std::fs::write(repo.join("sub/deeper/file.txt"), "deeper edit\n").unwrap();
    let step = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    let sent = step["bytes_sent"].as_u64().unwrap();
    assert!((12..64 * 1024).contains(&sent), "{step}");
    assert!(step["files_sent"].as_u64().unwrap() <= 3, "{step}");
    assert_eq!(step["files_deleted"], 0, "{step}");
    assert_eq!(
        step["channel"], "ssh",
        "small transfers stay on SSH: {step}"
    );

    // The worst case for stat-based change detection in the guest: same size and the same
    // whole-second mtime as what the guest saw last (the tar carries whole seconds). The
    // prepared-state tree must still record the new content, or the export patch below would
    // not apply. `git status` in the guest agrees too.
    let before = std::fs::metadata(repo.join("tracked.txt"))
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::fs::write(repo.join("tracked.txt"), "CHANGED ON THE HOST\n").unwrap();
    sh(&repo, &format!("touch -d @{before}.5 tracked.txt"));
    let same_stat = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert!(
        same_stat["files_sent"].as_u64().unwrap() >= 1,
        "{same_stat}"
    );
    assert_eq!(
        exec(&env, &["cat", "tracked.txt"]).ok().stdout,
        "CHANGED ON THE HOST\n"
    );

    // A host deletion is deleted in the guest by the next prepare.
    std::fs::remove_file(repo.join("delete-me.txt")).unwrap();
    let del = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert_eq!(del["files_deleted"], 1, "{del}");
    assert_eq!(exec(&env, &["test", "-e", "delete-me.txt"]).code, 1);

    // The workspace survives stop/start; exec on the stopped VM is refused.
    exec(&env, &["sh", "-c", "echo kept > marker.txt"]).ok();
    env.banger(&["vm", "stop", "dev"]).ok();
    assert_eq!(exec(&env, &["true"]).code, 4);
    env.banger(&["vm", "start", "dev"]).ok();
    assert_eq!(exec(&env, &["cat", "marker.txt"]).ok().stdout, "kept\n");
    let files = regular_files(&repo);
    let mut args = vec!["sha256sum", "--"];
    args.extend(files.iter().map(String::as_str));
    assert_eq!(exec(&env, &args).ok().stdout, host_sums(&repo, &files));
    exec(&env, &["rm", "marker.txt"]).ok();

    // Copy-back: guest edits become a patch the host applies.
    exec(
        &env,
        &[
            "sh",
            "-c",
            "echo 'guest line' >> tracked.txt && echo new > 'guest new.txt' && rm run.sh \
             && echo 'guest edit' >> untracked.txt",
        ],
    )
    .ok();
    // A resync of a host change in between does not take those guest edits into the base
    // of export (they are still exported below); the host change itself is in the base.
    std::fs::write(repo.join("sub/deeper/file.txt"), "deeper edit, again\n").unwrap();
    let between = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert_eq!(between["files_sent"], 1, "{between}");
    // The guest's git shows the host's uncommitted tracked changes (its index is the host's)
    // plus what changed in the guest, but not edits to host-untracked files, which it
    // excludes (status --guest and export below do see them).
    let host_tracked: String = sh(&repo, "git status --porcelain")
        .lines()
        .filter(|l| !l.starts_with("??"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(host_tracked.contains(" M tracked.txt"), "{host_tracked}");
    let mut want: Vec<String> = host_tracked.lines().map(str::to_owned).collect();
    want.push(" D run.sh".into());
    want.sort();
    want.push("?? \"guest new.txt\"".into());
    let guest_status = exec(&env, &["git", "status", "--porcelain"]).ok().stdout;
    assert_eq!(guest_status.lines().collect::<Vec<_>>(), want);
    let guest = env
        .banger(&["vm", "workspace", "status", "dev", "--guest", "--json"])
        .ok()
        .json();
    assert_eq!(guest["guest"]["added"][0], "guest new.txt", "{guest}");
    assert_eq!(guest["guest"]["modified"][0], "tracked.txt", "{guest}");
    assert_eq!(guest["guest"]["modified"][1], "untracked.txt", "{guest}");
    assert_eq!(guest["guest"]["removed"][0], "run.sh", "{guest}");
    let patch = fx.path().join("guest.patch");
    env.banger(&[
        "vm",
        "workspace",
        "export",
        "dev",
        "--patch",
        patch.to_str().unwrap(),
    ])
    .ok();
    sh(&repo, &format!("git apply --check '{}'", patch.display()));
    sh(&repo, &format!("git apply '{}'", patch.display()));
    assert_eq!(
        std::fs::read_to_string(repo.join("tracked.txt")).unwrap(),
        "CHANGED ON THE HOST\nguest line\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("untracked.txt")).unwrap(),
        "untracked\nguest edit\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("guest new.txt")).unwrap(),
        "new\n"
    );
    assert!(!repo.join("run.sh").exists());

    let out = fx.path().join("exported");
    let files = env
        .banger(&[
            "vm",
            "workspace",
            "export",
            "dev",
            "--to",
            out.to_str().unwrap(),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(files["deleted"][0], "run.sh", "{files}");
    assert_eq!(
        std::fs::read_to_string(out.join("tracked.txt")).unwrap(),
        "CHANGED ON THE HOST\nguest line\n"
    );
    assert!(out.join("guest new.txt").is_file());
    assert!(
        !out.join("big.bin").exists(),
        "only changed files are exported"
    );

    // The guest's end of the channel dies mid-transfer (a `tar` that reads a little and
    // exits): the prepare fails with the guest's error instead of waiting for ever on a
    // port nobody reads, and the next prepare repairs the workspace.
    exec(
        &env,
        &[
            "sh",
            "-c",
            "printf '#!/bin/sh\\nhead -c 65536 >/dev/null\\necho tar wrapper gave up >&2\\nexit 7\\n' \
             > /usr/local/bin/tar && chmod +x /usr/local/bin/tar",
        ],
    )
    .ok();
    let sums_match = |env: &TestEnv| {
        let files = regular_files(&repo);
        let mut args = vec!["sha256sum", "--"];
        args.extend(files.iter().map(String::as_str));
        assert_eq!(exec(env, &args).ok().stdout, host_sums(&repo, &files));
    };
    // 24 MiB: more than the socket, QEMU and the guest's port buffer between them.
    sh(&repo, "head -c 25165824 /dev/urandom > big.bin");
    let broken = env.banger_within(
        Duration::from_secs(300),
        &["vm", "workspace", "prepare", "dev", repo_s],
    );
    assert_ne!(broken.code, 0, "{}", broken.stderr);
    assert!(
        broken.stderr.contains("tar wrapper gave up"),
        "{}",
        broken.stderr
    );
    exec(&env, &["rm", "/usr/local/bin/tar"]).ok();
    let repaired = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert_eq!(repaired["channel"], "virtio-serial", "{repaired}");
    sums_match(&env);

    // Without the channel's socket (a VM started by an older banger, or Firecracker) a large
    // transfer still works, over SSH.
    let id = env.banger(&["vm", "show", "dev", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(env.home().join(format!("run/vms/{id}/workspace.sock"))).unwrap();
    sh(&repo, "head -c 3145728 /dev/urandom > big.bin");
    let over_ssh = env
        .banger(&["vm", "workspace", "prepare", "dev", repo_s, "--json"])
        .ok()
        .json();
    assert_eq!(over_ssh["channel"], "ssh", "{over_ssh}");
    assert!(
        over_ssh["bytes_sent"].as_u64().unwrap() >= 3 << 20,
        "{over_ssh}"
    );
    sums_match(&env);
}

/// Finding 3 of the trust review, against a real VM: a compromised guest answers `export`
/// with a tar (its `tar` replaced) or a patch (its `git diff` replaced) of its choosing. Each
/// attack is refused with nothing written (no partial output, nothing outside DIR or under
/// `.git`), or neutered (setuid and 0777 masked). Guest text reaching the terminal (error
/// messages with guest stderr, `status --guest` paths, `vm logs`) is escaped.
#[test]
fn export_refuses_or_neuters_a_compromised_guest() {
    let fx = tempfile::tempdir_in("/tmp").unwrap();
    let env = TestEnv::new();
    // A small console cap, so a guest can flood past it quickly under TCG.
    std::fs::write(
        env.config_file(),
        "[daemon]\nconsole_log_max_bytes = 65536\n",
    )
    .unwrap();
    env.build_default_image();
    let repo = fx.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    sh(
        &repo,
        "git init -q . && echo hello > tracked.txt && git add -A && git commit -qm init",
    );
    env.banger(&["vm", "create", "dev"]).ok();
    env.banger(&["vm", "start", "dev"]).ok();
    env.banger(&["vm", "workspace", "prepare", "dev", repo.to_str().unwrap()])
        .ok();
    let marker = format!("/tmp/banger-pwned-{}", std::process::id());
    // The compromised guest: its `tar` runs /root/case instead, which writes its own tar
    // with the real one (GNU tar: -P keeps `..` and absolute names).
    exec(
        &env,
        &[
            "sh",
            "-c",
            "printf '#!/bin/sh\\nexec sh /root/case\\n' > /usr/local/bin/tar \
             && chmod +x /usr/local/bin/tar && mkdir -p /root/atk",
        ],
    )
    .ok();
    let outside = fx.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let export_to = |case: &str, dest: &Path| -> Run {
        let script = format!("cd /root/atk && {case}");
        exec(
            &env,
            &[
                "sh",
                "-c",
                "printf '%s\\n' \"$1\" > /root/case",
                "sh",
                &script,
            ],
        )
        .ok();
        env.banger(&[
            "vm",
            "workspace",
            "export",
            "dev",
            "--to",
            dest.to_str().unwrap(),
        ])
    };
    let refused: &[(&str, String)] = &[
        (
            "fsmonitor",
            format!(
                "echo ok > good.txt && mkdir -p .git && printf '[core]\\n\\tfsmonitor = \"touch {marker}\"\\n' > .git/config && /bin/tar -c good.txt .git/config"
            ),
        ),
        (
            "hook",
            format!(
                "mkdir -p .git/hooks && printf '#!/bin/sh\\ntouch {marker}\\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit && /bin/tar -c .git/hooks/pre-commit"
            ),
        ),
        (
            "uppercase",
            "mkdir -p sub/.GIT && echo x > sub/.GIT/config && /bin/tar -c sub/.GIT/config".into(),
        ),
        (
            "link-out",
            format!("ln -sfn {} out && /bin/tar -c out", outside.display()),
        ),
        (
            "dotdot",
            "echo x > f && /bin/tar -c -P --transform 's,^f$,../escaped,' f".into(),
        ),
        (
            "absolute",
            format!("echo x > f && /bin/tar -c -P --transform 's,^f$,{marker},' f"),
        ),
        (
            "fifo",
            "rm -f pipe && mkfifo pipe && /bin/tar -c pipe".into(),
        ),
    ];
    for (name, case) in refused {
        let dest = fx.path().join(format!("out-{name}"));
        let run = export_to(case, &dest);
        assert_ne!(run.code, 0, "{name}: accepted\n{}", run.stdout);
        assert!(run.stderr.contains("refusing"), "{name}: {}", run.stderr);
        assert!(
            !dest.exists(),
            "{name}: partial output in {}",
            dest.display()
        );
        assert!(!fx.path().join("escaped").exists(), "{name}: wrote outside");
        assert!(!Path::new(&marker).exists(), "{name}: wrote {marker}");
    }
    // A path through a symlink that already exists in DIR on the host.
    let dest = fx.path().join("out-through");
    std::fs::create_dir(&dest).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("link")).unwrap();
    let run = export_to(
        "rm -rf link && mkdir -p link && echo x > link/planted && /bin/tar -c link/planted",
        &dest,
    );
    assert_ne!(run.code, 0, "through a host symlink: accepted");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 1);
    // Neutered: setuid and world-writable modes are masked.
    let dest = fx.path().join("out-modes");
    let run = export_to(
        "rm -rf open && : > suid && chmod 4777 suid && mkdir open && chmod 0777 open \
         && : > open/f && chmod 0666 open/f && /bin/tar -c suid open",
        &dest,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dest.join("suid")), 0o755);
    assert_eq!(mode(&dest.join("open")), 0o755);
    assert_eq!(mode(&dest.join("open/f")), 0o644);
    // Guest stderr in an error reaches the terminal escaped.
    let dest = fx.path().join("out-esc");
    let run = export_to("printf 'boom \\033]0;pwned\\007\\n' >&2; exit 3", &dest);
    assert_ne!(run.code, 0);
    assert!(!dest.exists(), "a failed guest left {}", dest.display());
    assert!(!run.stderr.contains('\x1b'), "raw ESC: {:?}", run.stderr);
    assert!(
        run.stderr.contains("\\x1b]0;pwned\\x07"),
        "{:?}",
        run.stderr
    );
    exec(&env, &["rm", "-f", "/usr/local/bin/tar"]).ok();

    // The same guest answers `export --patch` with patches of its choosing (`git diff`
    // replaced): each is refused, and no patch file is written.
    exec(
        &env,
        &[
            "sh",
            "-c",
            "printf '#!/bin/sh\\nfor a in \"$@\"; do [ \"$a\" = diff ] && exec cat /root/patch; done\\nexec /usr/bin/git \"$@\"\\n' \
             > /usr/local/bin/git && chmod +x /usr/local/bin/git",
        ],
    )
    .ok();
    let patches = [
        "diff --git a/.git/config b/.git/config\nnew file mode 100644\n--- /dev/null\n+++ b/.git/config\n@@ -0,0 +1,2 @@\n+[core]\n+\tfsmonitor = \"touch /tmp/x\"\n",
        "diff --git a/tracked.txt b/.git/hooks/post-checkout\nsimilarity index 100%\nrename from tracked.txt\nrename to .git/hooks/post-checkout\n",
        "diff --git a/../outside b/../outside\nnew file mode 100644\n--- /dev/null\n+++ b/../outside\n@@ -0,0 +1 @@\n+x\n",
        "diff --git a/x b/x\nnew file mode 104755\n--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+x\n",
    ];
    for (i, patch) in patches.iter().enumerate() {
        exec(
            &env,
            &["sh", "-c", "printf '%s' \"$1\" > /root/patch", "sh", patch],
        )
        .ok();
        let file = fx.path().join(format!("evil-{i}.patch"));
        let run = env.banger(&[
            "vm",
            "workspace",
            "export",
            "dev",
            "--patch",
            file.to_str().unwrap(),
        ]);
        assert_ne!(run.code, 0, "patch {i} accepted");
        assert!(run.stderr.contains("refusing"), "{}", run.stderr);
        assert!(!file.exists(), "patch {i} was written");
    }
    exec(&env, &["rm", "-f", "/usr/local/bin/git"]).ok();
    let leftovers: Vec<_> = std::fs::read_dir(fx.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".banger"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // A guest flooding its console (200 KiB) stays within the cap: the log is cut back.
    let id = env.banger(&["vm", "show", "dev", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let console = env.home().join(format!("vms/{id}/console.log"));
    exec(
        &env,
        &[
            "sh",
            "-c",
            "head -c 204800 /dev/zero | tr '\\0' x > /dev/ttyS0",
        ],
    )
    .ok();
    // (Read whole: between the cut and its marker line the file is empty for a moment.)
    banger_e2e::poll(
        Duration::from_secs(60),
        "console log cut to its cap",
        || {
            let text = std::fs::read(&console).unwrap_or_default();
            (text.len() <= 65536
                && String::from_utf8_lossy(&text).contains("[banger: this log passed 65536 bytes"))
            .then_some(())
        },
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&console).unwrap().mode() & 0o077, 0);

    // Guest-chosen names in `status --guest` and the console in `vm logs` are escaped.
    exec(
        &env,
        &[
            "sh",
            "-c",
            "printf x > \"/root/repo/evil$(printf '\\033]0;pwned\\007')\" \
             && printf '\\033]0;pwned-console\\007\\n' > /dev/ttyS0",
        ],
    )
    .ok();
    let status = env
        .banger(&["vm", "workspace", "status", "dev", "--guest"])
        .ok();
    assert!(!status.stdout.contains('\x1b'), "{:?}", status.stdout);
    assert!(
        status.stdout.contains("evil\\x1b]0;pwned\\x07"),
        "{:?}",
        status.stdout
    );
    let logs = env.banger(&["vm", "logs", "dev"]).ok();
    assert!(!logs.stdout.contains('\x1b'), "raw ESC in vm logs");
    assert!(
        logs.stdout.contains("\\x1b]0;pwned-console\\x07"),
        "{}",
        &logs.stdout[logs.stdout.len().saturating_sub(2000)..]
    );
}
