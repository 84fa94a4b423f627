//! `image build NAME --from REF`: a container image the test makes (a small mmdebstrap tree,
//! cached under `BANGER_CACHE_DIR`, plus two layers with a whiteout, an opaque directory, a
//! symlink and a hard link, packed by `umoci` and pushed by `skopeo` to a `docker-registry` on
//! loopback) becomes a banger image, built by an unprivileged owner: the root filesystem
//! holds exactly what the layers say, the VM boots, `vm exec` runs the container image's tool
//! with its ENV and WORKDIR. A non-Debian image and one without apt are refused clearly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_e2e::registry::Registry;
use banger_e2e::{TestEnv, system_tool};

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cache_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("BANGER_CACHE_DIR")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "/var/tmp/banger-test-cache".into()),
    )
}

/// A Debian bookworm minbase tree as a tar (with /dev's device nodes, which banger leaves
/// out), made once and cached; its apt source (the host's mirror) removed: the container
/// image names no mirror.
fn base_tar() -> Option<PathBuf> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).unwrap();
    let tar = cache.join("from-image-base-bookworm-v1.tar");
    let lock = std::fs::File::create(cache.join("from-image-base.lock")).unwrap();
    lock.lock().unwrap();
    if tar.is_file() {
        return Some(tar);
    }
    let Some(mirror) = banger_core::image::mirror::host_debian_mirror(Path::new("/etc/apt")) else {
        banger_shared::skip::report(
            "from_image",
            "no Debian mirror in the host's apt configuration",
        );
        return None;
    };
    let partial = tar.with_extension("partial");
    run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--mode=unshare",
            "--format=tar",
            "--quiet",
        ])
        .arg("--customize-hook=rm -f \"$1/etc/apt/sources.list\"")
        .args(["bookworm"])
        .arg(&partial)
        .arg(&mirror));
    std::fs::rename(&partial, &tar).unwrap();
    Some(tar)
}

/// A tar of `dir`'s contents owned by root.
fn tar_of(dir: &Path, out: &Path) {
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(out)
        .arg("."));
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An OCI layout at `layout`, tag `tag`, with the layers (tars) and config given.
fn umoci_image(layout: &Path, tag: &str, layers: &[&Path], config: &[&str]) {
    if !layout.exists() {
        run(Command::new("umoci").args(["init", "--layout"]).arg(layout));
    }
    let image = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["new", "--image", &image]));
    for layer in layers {
        run(Command::new("umoci")
            .args(["raw", "add-layer", "--image", &image])
            .arg(layer));
    }
    if !config.is_empty() {
        run(Command::new("umoci")
            .args(["config", "--image", &image])
            .args(config));
    }
}

/// `debugfs -R CMD IMAGE` output (stdout and stderr).
fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new(system_tool("debugfs"))
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn names(image: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = debugfs(image, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('/').collect();
            (f.len() >= 7).then(|| f[5].to_owned())
        })
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    names
}

fn inode(image: &Path, path: &str) -> String {
    let text = debugfs(image, &format!("stat {path}"));
    text.split_whitespace()
        .skip_while(|w| *w != "Inode:")
        .nth(1)
        .unwrap_or_else(|| panic!("no inode for {path}: {text}"))
        .to_owned()
}

#[test]
fn a_container_image_becomes_a_bootable_banger_image() {
    for tool in ["umoci", "skopeo", "mmdebstrap"] {
        if !system_tool(tool).is_file() {
            banger_shared::skip::report(
                "from_image",
                &format!("{tool} is not installed (scripts/install-deps)"),
            );
            return;
        }
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let Some(base) = base_tar() else {
        return;
    };
    let work = tempfile::Builder::new()
        .prefix("from-image")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();

    // Layer 2: a tool, files the next layer hides. Layer 3: a whiteout of a base file, an
    // opaque directory, a symlink and a hard link.
    let l2 = w.join("l2");
    write(
        &l2.join("usr/local/bin/hello"),
        "#!/bin/sh\necho hello from the container image\n",
        0o755,
    );
    write(&l2.join("srv/data/old1"), "old\n", 0o644);
    write(&l2.join("srv/data/sub/old2"), "old\n", 0o644);
    let l3 = w.join("l3");
    write(&l3.join("etc/.wh.issue.net"), "", 0o644);
    write(&l3.join("srv/data/.wh..wh..opq"), "", 0o644);
    write(&l3.join("srv/data/new"), "new\n", 0o644);
    write(
        &l3.join("usr/local/bin/tool"),
        "#!/bin/sh\necho tool\n",
        0o755,
    );
    std::fs::hard_link(
        l3.join("usr/local/bin/tool"),
        l3.join("usr/local/bin/tool-hard"),
    )
    .unwrap();
    std::os::unix::fs::symlink("hello", l3.join("usr/local/bin/hello-link")).unwrap();
    let (l2_tar, l3_tar) = (w.join("l2.tar"), w.join("l3.tar"));
    tar_of(&l2, &l2_tar);
    tar_of(&l3, &l3_tar);
    let layout = w.join("layout");
    umoci_image(
        &layout,
        "base",
        &[&base, &l2_tar, &l3_tar],
        &[
            "--config.env=GREETING=hello-from-env",
            "--config.workingdir=/srv/data",
        ],
    );
    let reference = format!("{}/test/base:1", registry.host());
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:base", layout.display()))
        .arg(format!("docker://{reference}")));

    // Not bootable: another distribution, or no apt. Refused with what is missing.
    let alpine = w.join("alpine");
    write(
        &alpine.join("etc/os-release"),
        "ID=alpine\nPRETTY_NAME=\"Alpine Linux v3.20\"\n",
        0o644,
    );
    let noapt = w.join("noapt");
    write(
        &noapt.join("etc/os-release"),
        "ID=debian\nVERSION_CODENAME=bookworm\n",
        0o644,
    );
    let (alpine_tar, noapt_tar) = (w.join("alpine.tar"), w.join("noapt.tar"));
    tar_of(&alpine, &alpine_tar);
    tar_of(&noapt, &noapt_tar);
    let seed = w.join("seed");
    write(&seed.join(".profile"), "echo seeded\n", 0o644);
    umoci_image(&layout, "alpine", &[&alpine_tar], &[]);
    umoci_image(&layout, "noapt", &[&noapt_tar], &[]);
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(w));

    let env = TestEnv::nonroot();
    std::fs::write(
        env.config_file(),
        "[daemon]\nstart_timeout_secs = 900\n[defaults]\nmemory = \"768M\"\n",
    )
    .unwrap();
    env.build_default_image();
    for (tag, expected) in [
        ("alpine", "Alpine Linux v3.20, not Debian-family"),
        ("noapt", "has no apt-get"),
    ] {
        let refused = env.banger(&[
            "image",
            "build",
            tag,
            "--from",
            &format!("oci:{}:{tag}", layout.display()),
            "--work-seed",
            seed.to_str().unwrap(),
        ]);
        assert_ne!(refused.code, 0, "{tag} was accepted");
        assert!(
            refused.stderr.contains(expected),
            "{tag}: no clear error: {}",
            refused.stderr
        );
    }
    // Nothing of the refused builds stays: no image, no work-seed.
    let images = env.banger(&["image", "ls", "--json"]).ok().json();
    assert_eq!(images.as_array().unwrap().len(), 1, "{images}");
    let seeds = env.home().join("work-seeds");
    let left: Vec<_> = std::fs::read_dir(&seeds)
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "a refused build left its work-seed: {left:?}"
    );
    // `default` is the recipe's image: a --from build must be named.
    let unnamed = env.banger(&["image", "build", "--from", &reference]);
    assert_ne!(unnamed.code, 0);
    assert!(
        unnamed.stderr.contains("name the image"),
        "{}",
        unnamed.stderr
    );

    let built = env
        .banger(&["image", "build", "fromc", "--from", &reference, "--json"])
        .ok()
        .json();
    assert_eq!(built["kernel"], "debian", "{built}");
    assert_eq!(built["exec"]["workdir"], "/srv/data", "{built}");
    let rootfs = env
        .home()
        .join("images")
        .join(built["digest"].as_str().unwrap())
        .join("rootfs.ext4");
    // Exactly the layers' result: the whiteout hid the base file, the opaque directory holds
    // only the upper layer's entry, no whiteout file is left, the links are links.
    assert!(
        debugfs(&rootfs, "stat /etc/issue.net").contains("File not found"),
        "the whited-out file is there"
    );
    assert!(names(&rootfs, "/etc").contains(&"issue".to_owned()));
    assert_eq!(names(&rootfs, "/srv/data"), ["new"]);
    assert_eq!(
        names(&rootfs, "/usr/local/bin"),
        ["hello", "hello-link", "tool", "tool-hard"]
    );
    assert_eq!(
        inode(&rootfs, "/usr/local/bin/tool"),
        inode(&rootfs, "/usr/local/bin/tool-hard"),
        "the hard link is not one file"
    );
    let link = debugfs(&rootfs, "stat /usr/local/bin/hello-link");
    assert!(
        link.contains("Type: symlink") && link.contains("\"hello\""),
        "{link}"
    );
    // And the guest contract: sshd, systemd as init, banger's guest setup.
    for path in [
        "/usr/sbin/sshd",
        "/lib/systemd/systemd",
        "/usr/local/lib/banger/guest-setup",
    ] {
        assert!(
            !debugfs(&rootfs, &format!("stat {path}")).contains("File not found"),
            "{path} is missing"
        );
    }

    // It boots, and vm exec runs the container image's tool with its ENV and WORKDIR.
    env.banger(&["vm", "create", "c", "--image", "fromc"]).ok();
    env.banger(&["vm", "start", "c"]).ok();
    let out = env.banger(&["vm", "exec", "c", "--", "hello"]).ok().stdout;
    assert_eq!(out, "hello from the container image\n");
    let out = env
        .banger(&[
            "vm",
            "exec",
            "c",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; ls",
        ])
        .ok()
        .stdout;
    assert_eq!(out, "hello-from-env\n/srv/data\nnew\n");
    env.banger(&["vm", "stop", "c"]).ok();
    env.banger(&["vm", "rm", "c"]).ok();
}
