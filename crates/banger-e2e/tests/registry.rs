//! Images and kernels through a real OCI registry (Debian's `docker-registry`, started here on
//! 127.0.0.1 with its own config and storage): push, remove, pull back with equal files,
//! a second pull that fetches no blob (counted in the registry's access log), `vm create
//! --image REF` on a fresh instance that pulls once and boots, a corrupted blob refused with
//! nothing left behind, and a pull killed half-way that succeeds when retried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_e2e::registry::Registry;
use banger_e2e::{TestEnv, poll_or_none};

/// sha256sum of every regular file under `dir`, by path relative to it.
fn file_digests(dir: &Path) -> Vec<(String, String)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f ! -name '*.lock' -print0 | sort -z | xargs -0 -r sha256sum")
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (hash, path) = l.split_once("  ").unwrap();
            (path.to_owned(), hash.to_owned())
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(dir)
        .args(["-type", "f"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn push_pull_dedup_autopull_boot_corruption_and_interrupted_pull() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let host = registry.host();
    let image_ref = format!("{host}/banger/dev:1");
    let kernel_ref = format!("{host}/banger/kernel:1");

    // --- Push an image and a kernel, remove them, pull them back: equal files.
    let env = TestEnv::new();
    env.build_default_image();
    // Only the default image and its kernel (the microVM kernel: no initrd) in the store.
    env.banger(&["kernel", "rm", "debian"]).ok();
    let stores = |env: &TestEnv| {
        let mut all = file_digests(&env.home().join("images"));
        all.extend(file_digests(&env.home().join("kernels")));
        // The artifact's files; a built kernel's `config` and `capabilities.json` beside it
        // are read from it locally and are not part of the artifact.
        all.retain(|(p, _)| {
            !p.contains("/modules/")
                && !p.ends_with("/config")
                && !p.ends_with("/capabilities.json")
        });
        all
    };
    let before = stores(&env);
    assert!(
        before.iter().any(|(p, _)| p.ends_with("rootfs.ext4")),
        "{before:?}"
    );
    let pushed = env
        .banger(&["image", "push", "default", &image_ref, "--json"])
        .ok()
        .json();
    assert!(pushed["blobs"].as_u64().unwrap() >= 2, "{pushed}");
    env.banger(&["kernel", "push", "default", &kernel_ref, "--json"])
        .ok();
    env.banger(&["image", "rm", "default"]).ok();
    env.banger(&["kernel", "rm", "default"]).ok();
    assert!(
        stores(&env).is_empty(),
        "removed image files remain: {:?}",
        stores(&env)
    );

    let gets_before = registry.blob_gets();
    let pulled = env
        .banger(&["image", "pull", &image_ref, "dev", "--json"])
        .ok()
        .json();
    assert_eq!(pulled["image"]["name"], "dev", "{pulled}");
    let fetched = registry.blob_gets() - gets_before;
    assert_eq!(
        fetched, 2,
        "rootfs and kernel fetched (no initrd; config known from the push)"
    );
    env.banger(&["kernel", "pull", &kernel_ref, "k"]).ok();
    let after = stores(&env);
    assert_eq!(
        after, before,
        "pulled files differ from the pushed ones (path, sha256)"
    );
    // The kernel artifact's layers are the image's: stored once, not fetched again (and its
    // config is remembered from the push).
    assert_eq!(registry.blob_gets() - gets_before, fetched);

    // --- Pulling again transfers no blob (one manifest request).
    let blobs = registry.blob_gets();
    let manifests = registry.manifest_gets();
    let again = env
        .banger(&["image", "pull", &image_ref, "dev", "--json"])
        .ok()
        .json();
    assert_eq!(again["transfer"]["blobs"], 0, "{again}");
    assert_eq!(registry.blob_gets(), blobs, "a second pull fetched blobs");
    assert_eq!(registry.manifest_gets(), manifests + 1);
    drop(env);

    // --- `vm create --image REF` on a host without it: pulled once, boots.
    let env = TestEnv::new();
    // A TCG boot on a loaded 2-core host can pass the default 300 s.
    std::fs::write(env.config_file(), "[daemon]\nstart_timeout_secs = 900\n").unwrap();
    let blobs = registry.blob_gets();
    let create = env.banger(&["vm", "create", "pulled", "--image", &image_ref, "--json"]);
    let create = create.ok();
    let vm = create.json();
    assert_eq!(vm["spec"]["image"], "dev-1", "{vm}");
    let fetched = registry.blob_gets() - blobs;
    assert!(fetched >= 3, "{fetched} blobs fetched by the autopull");
    // A second create finds it stored: no blob fetched.
    env.banger(&["vm", "create", "second", "--image", &image_ref])
        .ok();
    assert_eq!(registry.blob_gets() - blobs, fetched);
    env.banger(&["vm", "rm", "second"]).ok();
    let never = env.banger(&[
        "vm",
        "create",
        "nope",
        "--image",
        &format!("{host}/banger/absent:1"),
        "--pull",
        "never",
    ]);
    assert_ne!(never.code, 0);

    let booter = env;

    // --- A registry serving wrong bytes: refused, nothing stored.
    let env = TestEnv::new();
    let layers = registry.layer_digests("banger/dev");
    let largest = layers
        .iter()
        .max_by_key(|d| std::fs::metadata(registry.blob_file(d)).unwrap().len())
        .unwrap()
        .clone();
    let blob_file = registry.blob_file(&largest);
    let original = std::fs::read(&blob_file).unwrap();
    let mut corrupt = original.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    std::fs::write(&blob_file, &corrupt).unwrap();
    let refused = env.banger(&["image", "pull", &image_ref, "dev"]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused.stderr.contains("corrupt"),
        "no clear error: {}",
        refused.stderr
    );
    let images = env.banger(&["image", "ls", "--json"]).ok().json();
    assert_eq!(images.as_array().unwrap().len(), 0, "{images}");
    let kernels = env.banger(&["kernel", "ls", "--json"]).ok().json();
    assert_eq!(kernels.as_array().unwrap().len(), 0, "{kernels}");
    for dir in ["images", "kernels", "tmp"] {
        let left = files_under(&env.home().join(dir));
        assert!(left.is_empty(), "{dir} after a refused pull: {left:?}");
    }
    std::fs::write(&blob_file, &original).unwrap();

    // --- A pull killed half-way (the daemon dies), then retried: succeeds.
    let mut child = env
        .command(&["image", "pull", &image_ref, "dev"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = env.home().join("tmp");
    let partial = poll_or_none(Duration::from_secs(120), || {
        files_under(&tmp).into_iter().find(|f| {
            f.ends_with("/rootfs") && std::fs::metadata(f).is_ok_and(|m| m.len() > (4 << 20))
        })
    });
    let Some(partial) = partial else {
        let _ = child.kill();
        panic!(
            "the pull never reached 4 MiB of the rootfs in {}",
            tmp.display()
        );
    };
    env.kill_daemon();
    let _ = child.wait();
    assert!(
        Path::new(&partial).exists(),
        "the pull finished before the kill; nothing was tested"
    );
    let images = env.banger(&["image", "ls", "--json"]).ok().json();
    assert_eq!(
        images.as_array().unwrap().len(),
        0,
        "a half pull is listed: {images}"
    );
    env.banger(&["image", "pull", &image_ref, "dev"]).ok();
    let images = env.banger(&["image", "ls", "--json"]).ok().json();
    assert_eq!(images[0]["name"], "dev", "{images}");
    assert!(
        files_under(&tmp).is_empty(),
        "scratch files left: {:?}",
        files_under(&tmp)
    );

    // --- The VM made by the autopull boots (last: the slowest part).
    drop(env);
    eprintln!("registry: push/pull/dedup/autopull/corruption/interrupt checks passed; booting");
    let started = booter.banger(&["vm", "start", "pulled"]);
    if started.code != 0 {
        booter.dump_diagnostics();
    }
    started.ok();
    let os = booter
        .banger(&["vm", "exec", "pulled", "--", "cat", "/etc/os-release"])
        .ok();
    assert!(os.stdout.contains("Debian"), "{}", os.stdout);
    booter.banger(&["vm", "stop", "pulled"]).ok();
    booter.banger(&["vm", "rm", "pulled"]).ok();
}
