//! banger for an ordinary user: the daemon, its image build and its VMs run as an
//! unprivileged owner ([`TestEnv::nonroot`]: `bangertest` when the tests run as root).
//! The whole QEMU flow (image build without root, create, start, exec, workspace prepare,
//! git in the guest, export, stop, rm), files owned by the guest's root whatever the host uid,
//! and room to install (the system disk's configured size, grown into at boot).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use banger_e2e::{Run, TestEnv, process_uid};

fn exec(env: &TestEnv, script: &str) -> Run {
    env.banger(&["vm", "exec", "dev", "--", "sh", "-c", script])
}

#[test]
fn an_unprivileged_owner_builds_an_image_and_works_in_a_vm() {
    let env = TestEnv::nonroot();
    let owner = env.owner();
    assert_ne!(owner.uid, 0, "the owner must not be root");
    // A system disk size other than the default shows it is the configured one. Six
    // sessions share two cores here: a TCG boot can take minutes.
    std::fs::write(
        env.config_file(),
        "[defaults]\nsystem_disk_size = \"6G\"\nmemory = \"768M\"\n\
         [daemon]\nstart_timeout_secs = 900\n",
    )
    .unwrap();

    // Image build as the owner, without root (mmdebstrap in a user namespace).
    env.build_default_image();
    let daemon = env.wait_for_daemon();
    assert_eq!(
        process_uid(daemon),
        owner.uid,
        "the daemon runs as the owner"
    );

    env.banger(&["vm", "run", "dev"]).ok();
    let qemu = env.qemu_pids();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    assert_eq!(process_uid(qemu[0]), owner.uid, "QEMU runs as the owner");
    assert_eq!(exec(&env, "id -u").ok().stdout.trim(), "0");

    // Every file of the image and of the seeded work disk is the guest root's, whoever
    // built and created them (finding 10: mkfs.ext4 -d copied the host uid).
    let owners = exec(
        &env,
        "stat -c '%u:%g %n' /root /root/repo /root/.ssh /root/.ssh/authorized_keys \
         /root/.banger /root/.banger/ssh_host_ed25519_key /usr/bin/passwd /etc/ssh \
         /usr/local/lib/banger/growfs $(ls /lib/modules/*/modules.dep | head -n 1)",
    )
    .ok();
    for line in owners.stdout.lines() {
        assert!(line.starts_with("0:0 "), "not root's: {line}");
    }
    // Files that are not root's in Debian keep their owners (not all flattened to root).
    assert_eq!(
        exec(&env, "stat -c '%U:%G' /etc/shadow").ok().stdout.trim(),
        "root:shadow"
    );
    assert_eq!(
        exec(&env, "stat -c '%a' /usr/bin/passwd")
            .ok()
            .stdout
            .trim(),
        "4755"
    );

    // Room to install: the root filesystem grew to the configured 6 GiB at boot, and 2 GiB
    // fit under /usr/local; the host stores only what the guest wrote.
    let size: u64 = exec(&env, "df -B1 --output=size / | tail -n 1")
        .ok()
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!(
        size > 5_900 << 20 && size <= 6 << 30,
        "df / says {size} bytes, not ~6 GiB"
    );
    exec(
        &env,
        "fallocate -l 2G /usr/local/big && dd if=/dev/urandom of=/usr/local/small bs=1M count=16 \
         status=none && sync && test $(stat -c %s /usr/local/big) -eq 2147483648",
    )
    .ok();
    let id = env.banger(&["vm", "show", "dev", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let overlay = env.home().join("vms").join(&id).join("system.qcow2");
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&overlay).unwrap()) * 512;
    assert!(
        allocated < 1 << 30,
        "the overlay holds {allocated} bytes after a 2 GiB fallocate"
    );

    // Workspace from a repository the owner made: git works on it in the guest, and the
    // export comes back to the owner.
    env.workspace_round_trip("dev");

    // Stop keeps what was written; rm leaves no process and no VM directory.
    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "start", "dev"]).ok();
    assert_eq!(
        exec(
            &env,
            "cat /root/repo/b.txt && df -B1 --output=size / | tail -n 1"
        )
        .ok()
        .stdout
        .lines()
        .collect::<Vec<_>>(),
        ["new", &size.to_string()]
    );
    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "rm", "dev"]).ok();
    assert!(env.qemu_pids().is_empty());
    assert!(!env.home().join("vms").join(&id).exists());
}
