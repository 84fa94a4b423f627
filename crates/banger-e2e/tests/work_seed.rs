//! Work-seeds: an image carrying a tree for the work disk. Its files (dotfiles, a symlink
//! kept as a link, a hard link, an executable) appear in a new VM's /root, owned by the
//! guest's root although an unprivileged owner made them, and not in a VM of another image;
//! the seed survives push → rm → pull through a real registry on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_e2e::registry::Registry;
use banger_e2e::{TestEnv, system_tool};

/// `debugfs -R "ls -p DIR"` of an ext4 image: (name, uid) of each entry but `.` and `..`.
fn ls(image: &Path, dir: &str) -> Vec<(String, u32)> {
    let out = Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg(format!("ls -p {dir}"))
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // /ino/mode/uid/gid/name/size/
        .filter_map(|l| {
            let fields: Vec<&str> = l.split('/').collect();
            (fields.len() >= 7).then(|| (fields[5].to_owned(), fields[3].parse().unwrap()))
        })
        .filter(|(name, _)| name != "." && name != "..")
        .collect()
}

fn names(entries: &[(String, u32)]) -> Vec<String> {
    let mut names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names
}

/// `debugfs -R "cat PATH"`.
fn cat(image: &Path, path: &str) -> String {
    let out = Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn work_disk(env: &TestEnv, vm: &serde_json::Value) -> PathBuf {
    env.home()
        .join("vms")
        .join(vm["id"].as_str().unwrap())
        .join("work.ext4")
}

fn make_seed(dir: &Path) {
    std::fs::create_dir_all(dir.join(".config/tool")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join(".bashrc"), "export SEEDED=yes\n").unwrap();
    std::fs::write(dir.join(".config/tool/settings"), "answer = 42\n").unwrap();
    std::fs::hard_link(
        dir.join(".config/tool/settings"),
        dir.join(".config/settings-link"),
    )
    .unwrap();
    let hello = dir.join("bin/hello");
    std::fs::write(&hello, "#!/bin/sh\necho hello from the seed\n").unwrap();
    std::fs::set_permissions(&hello, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Absolute: on the host it names the host's file; it must stay a link to the guest's.
    std::os::unix::fs::symlink("/etc/hostname", dir.join("hostname-link")).unwrap();
    std::os::unix::fs::symlink(".config/tool", dir.join("tool")).unwrap();
    // banger's own files win over the seed's.
    std::fs::create_dir_all(dir.join(".ssh")).unwrap();
    std::fs::write(
        dir.join(".ssh/authorized_keys"),
        "ssh-ed25519 AAAA not-banger\n",
    )
    .unwrap();
}

#[test]
fn a_work_seed_reaches_new_vms_of_its_image_only_and_survives_push_and_pull() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let env = TestEnv::nonroot();
    std::fs::write(
        env.config_file(),
        "[daemon]\nstart_timeout_secs = 900\n[defaults]\nmemory = \"768M\"\n",
    )
    .unwrap();
    env.build_default_image();
    let seed = env.dir().join("seed");
    make_seed(&seed);
    env.chown_to_owner(&seed);
    let rootfs = env.image_rootfs("default");
    let import = |name: &str| {
        env.banger(&[
            "image",
            "import",
            name,
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            "default",
            "--work-seed",
            seed.to_str().unwrap(),
            "--json",
        ])
        .ok()
        .json()
    };
    let seeded = import("seeded");
    let seed_digest = seeded["work_seed"].as_str().unwrap().to_owned();
    // The same tree twice is the same seed.
    let again = import("seeded2");
    assert_eq!(again["work_seed"], seeded["work_seed"]);
    env.banger(&["image", "rm", "seeded2"]).ok();
    // A special file is refused with a clear error.
    let bad = env.dir().join("bad-seed");
    std::fs::create_dir_all(&bad).unwrap();
    nix::unistd::mkfifo(&bad.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    env.chown_to_owner(&bad);
    let refused = env.banger(&[
        "image",
        "build",
        "bad",
        "--work-seed",
        bad.to_str().unwrap(),
    ]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("FIFO"), "{}", refused.stderr);

    // A VM of the seeded image has the seed on its work disk, the guest root's; a VM of
    // the default image does not.
    let with = env
        .banger(&["vm", "create", "with", "--image", "seeded", "--json"])
        .ok()
        .json();
    let without = env
        .banger(&["vm", "create", "without", "--image", "default", "--json"])
        .ok()
        .json();
    let disk = work_disk(&env, &with);
    let top = ls(&disk, "/");
    assert_eq!(
        names(&top),
        [
            ".banger",
            ".bashrc",
            ".config",
            ".ssh",
            "bin",
            "hostname-link",
            "lost+found",
            "repo",
            "tool"
        ]
    );
    for (path, entries) in [
        ("/", top.clone()),
        ("/.config", ls(&disk, "/.config")),
        ("/.config/tool", ls(&disk, "/.config/tool")),
        ("/bin", ls(&disk, "/bin")),
    ] {
        for (name, uid) in entries {
            assert_eq!(uid, 0, "{path}/{name} is not the guest root's");
        }
    }
    let keys = cat(&disk, "/.ssh/authorized_keys");
    assert!(!keys.contains("not-banger"), "the seed's key won: {keys}");
    let other = ls(&work_disk(&env, &without), "/");
    assert_eq!(
        names(&other),
        [".banger", ".ssh", "lost+found", "repo"],
        "the other image's VM got the seed"
    );
    env.banger(&["vm", "rm", "without"]).ok();

    // In the guest: the files, the links as links, the executable runs.
    env.banger(&["vm", "start", "with"]).ok();
    let out = env
        .banger(&[
            "vm",
            "exec",
            "with",
            "--",
            "sh",
            "-c",
            "cat /root/.bashrc; readlink /root/hostname-link; readlink /root/tool; \
             cat /root/tool/settings; /root/bin/hello; \
             stat -c '%u:%g %h' /root/.bashrc /root/.config/tool/settings",
        ])
        .ok()
        .stdout;
    assert_eq!(
        out,
        "export SEEDED=yes\n/etc/hostname\n.config/tool\nanswer = 42\nhello from the seed\n\
         0:0 1\n0:0 2\n",
    );
    env.banger(&["vm", "stop", "with"]).ok();
    env.banger(&["vm", "rm", "with"]).ok();

    // Push, remove, pull: the same seed comes back and seeds a new VM.
    let reference = format!("{}/banger/seeded:1", registry.host());
    env.banger(&["image", "push", "seeded", &reference]).ok();
    env.banger(&["image", "rm", "seeded"]).ok();
    let store = env.home().join("work-seeds");
    let left: Vec<_> = std::fs::read_dir(&store).unwrap().collect();
    assert!(
        left.is_empty(),
        "the removed image's seed remains: {left:?}"
    );
    let pulled = env
        .banger(&["image", "pull", &reference, "back", "--json"])
        .ok()
        .json();
    assert_eq!(
        pulled["image"]["work_seed"],
        seed_digest.as_str(),
        "{pulled}"
    );
    let back = env
        .banger(&["vm", "create", "back", "--image", "back", "--json"])
        .ok()
        .json();
    let disk = work_disk(&env, &back);
    assert_eq!(names(&ls(&disk, "/")), names(&top));
    assert_eq!(cat(&disk, "/.config/tool/settings"), "answer = 42\n");
    assert_eq!(
        cat(&disk, "/bin/hello"),
        "#!/bin/sh\necho hello from the seed\n"
    );
    env.banger(&["vm", "rm", "back"]).ok();
}
