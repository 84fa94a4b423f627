//! banger's microVM kernel (`banger kernel build`, the default image's kernel): built from
//! Debian's linux-source-6.1 without root, its capabilities read and shown, and a real VM
//! booted from it to SSH under QEMU microvm with ACPI off (`qemu.devices = "cmdline"`), its
//! virtio-mmio devices declared on the kernel command line and no initrd: Firecracker's boot
//! path, minus KVM. Firecracker refuses Debian's cloud kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use banger_e2e::{Run, TestEnv, processes_with_cmdline};

const SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

fn cache_dir() -> String {
    std::env::var("BANGER_CACHE_DIR")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/var/tmp/banger-test-cache".into())
}

/// `banger kernel build` with the shared cache (the first run of a recipe compiles, minutes).
fn build_kernel(env: &TestEnv) -> serde_json::Value {
    let output = env
        .command(&["kernel", "build", "--json"])
        .env("BANGER_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    Run::from_output(output).ok().json()
}

#[test]
fn the_microvm_kernel_boots_to_ssh_with_its_devices_on_the_command_line() {
    if !Path::new(SOURCE).is_file() {
        banger_shared::skip::report(
            "the_microvm_kernel_boots_to_ssh_with_its_devices_on_the_command_line",
            &format!("{SOURCE} is missing (Debian's linux-source-6.1; scripts/install-deps)"),
        );
        return;
    }
    let env = TestEnv::new();
    env.build_default_image();
    let kernel = build_kernel(&env);
    assert_eq!(kernel["name"], "microvm");
    assert_eq!(kernel["has_initrd"], false);
    let caps = &kernel["capabilities"];
    assert_eq!(caps["virtio_mmio_cmdline"], true, "{kernel}");
    // Built with ACPI but without PCI, whose ACPI cannot load QEMU microvm's tables: its
    // devices go on the command line under every backend.
    assert_eq!(caps["acpi_virtio"], false, "{kernel}");
    assert_eq!(caps["needs_initrd"], false, "{kernel}");
    assert_eq!(caps["pvh"], true, "{kernel}");
    assert_eq!(caps["from"], "config", "{kernel}");
    let release = kernel["release"].as_str().unwrap().to_owned();
    assert!(release.ends_with("-banger"), "{release}");

    // Built again: the stored kernel of this recipe is reused at once; it is the default
    // image's kernel.
    let again = build_kernel(&env);
    assert_eq!(again["digest"], kernel["digest"]);
    let default = env
        .banger(&["kernel", "show", "default", "--json"])
        .ok()
        .json();
    assert_eq!(default["digest"], kernel["digest"], "{default}");

    // `kernel ls` tells which backends each kernel boots under.
    let ls = env.banger(&["kernel", "ls"]).ok();
    let line = |name: &str| {
        ls.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("microvm").contains("qemu,firecracker"),
        "{}",
        ls.stdout
    );
    assert!(
        line("default").contains("qemu,firecracker"),
        "{}",
        ls.stdout
    );
    assert!(!line("debian").contains("firecracker"), "{}", ls.stdout);
    let show = env.banger(&["kernel", "show", "debian"]).ok();
    assert!(
        show.stdout.contains("virtio-mmio cmdline"),
        "{}",
        show.stdout
    );

    // The default image's root file system, with each kernel.
    let image = env
        .banger(&["image", "show", "default", "--json"])
        .ok()
        .json();
    assert_eq!(image["kernel"], "default", "{image}");
    let rootfs = env
        .home()
        .join("images")
        .join(image["digest"].as_str().unwrap())
        .join("rootfs.ext4");
    for (name, kernel) in [("cloud", "debian"), ("micro", "microvm")] {
        env.banger(&[
            "image",
            "import",
            name,
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            kernel,
        ])
        .ok();
    }

    // Firecracker cannot boot Debian's cloud kernel: refused before anything is made (the
    // fake stands in for the binary, so the kernel is the blocker). QEMU is told to declare
    // devices on the command line from now on.
    std::fs::write(
        env.config_file(),
        format!(
            "[firecracker]\nbinary = \"{}\"\n[qemu]\ndevices = \"cmdline\"\n",
            banger_e2e::bin("banger-fc-fake").display()
        ),
    )
    .unwrap();
    env.banger(&["daemon", "stop"]).ok();
    let refused = env.banger(&[
        "vm",
        "create",
        "fc",
        "--image",
        "cloud",
        "--vmm",
        "firecracker",
    ]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("Firecracker cannot boot kernel debian"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("--vmm qemu"), "{}", refused.stderr);
    let vms = env.banger(&["vm", "ls", "--json"]).ok().json();
    assert_eq!(vms.as_array().map(Vec::len), Some(0), "{vms}");

    env.banger(&["vm", "run", "m", "--image", "micro", "--vmm", "qemu"])
        .ok();

    // QEMU runs with ACPI off (`qemu.devices = "cmdline"`) and no initrd.
    let pids = env.qemu_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let qemu_cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let qemu_cmdline = String::from_utf8_lossy(&qemu_cmdline).replace('\0', " ");
    assert!(qemu_cmdline.contains("acpi=off"), "{qemu_cmdline}");
    assert!(!qemu_cmdline.contains("-initrd"), "{qemu_cmdline}");

    // The guest runs this kernel, found its disks and NIC from the command line, has no
    // ACPI, and mounted its work disk.
    let exec = |script: &str| {
        env.banger(&["vm", "exec", "m", "--", "sh", "-c", script])
            .ok()
            .stdout
    };
    assert_eq!(exec("uname -r").trim(), release);
    let cmdline = exec("cat /proc/cmdline");
    assert!(cmdline.contains("virtio_mmio.device="), "{cmdline}");
    assert!(cmdline.contains("root=/dev/vda"), "{cmdline}");
    assert_eq!(
        exec("test -d /sys/firmware/acpi && echo acpi || echo none").trim(),
        "none"
    );
    assert_eq!(exec("findmnt -n -o SOURCE /root").trim(), "/dev/vdb");
    assert_eq!(exec("findmnt -n -o SOURCE /").trim(), "/dev/vda");

    // Stop: the guest reboots (no ACPI power-off), which ends QEMU.
    let stop = env.banger(&["vm", "stop", "m", "--json"]).ok().json();
    assert_eq!(stop["vm"]["state"], "stopped", "{stop}");
    assert!(env.qemu_pids().is_empty(), "QEMU is gone after stop");
    env.banger(&["vm", "rm", "m"]).ok();
    assert!(
        processes_with_cmdline("qemu-system-x86", &env.home().display().to_string()).is_empty()
    );
}
