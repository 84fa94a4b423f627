//! A Manager (the daemon's logic, in process) whose Firecracker is the fake (banger-fc-fake),
//! with the seams the fake cannot provide: a tap name (banger-helper's job), KVM assumed, no
//! SSH readiness. Shared by the test files that drive the fake (`#[path]` module).

use std::path::Path;

use banger_core::config::Config;
use banger_core::domain::VmmChoice;
use banger_core::layout::Layout;
use banger_core::service::{Manager, Seams};
use banger_core::vmm::Accel;
use banger_core::vmm::accel::AccelChoice;
use banger_proto::ImportImageRequest;

/// The Manager on `dir` (data dir `dir/home`) running `firecracker`, its config adjusted by
/// `tweak`; nothing imported. A second one on the same dir is a daemon restart.
pub fn open(dir: &Path, firecracker: &Path, tweak: impl FnOnce(&mut Config)) -> Manager {
    let home = dir.join("home");
    let layout = Layout::new(home.clone(), home.join("run"), dir.join("config.toml"));
    let mut config = Config::default();
    config.firecracker.binary = firecracker.display().to_string();
    config.defaults.vmm = VmmChoice::Firecracker;
    config.daemon.stop_timeout_secs = 5;
    tweak(&mut config);
    Manager::open(layout, config).unwrap().with_seams(Seams {
        tap: Some("bg-tap-0".into()),
        accel: Some(AccelChoice {
            accel: Accel::Kvm,
            reason: "test seam: KVM assumed".into(),
        }),
        skip_readiness: true,
        host_ops: None,
    })
}

/// Imports the stand-in image `default` (files made in `dir/stub`) into `manager`.
pub async fn import_stub(manager: &Manager, dir: &Path) -> banger_proto::Image {
    let (rootfs, kernel) = banger_e2e::stub_image_files(&dir.join("stub"));
    manager
        .import_image(ImportImageRequest {
            name: "default".into(),
            rootfs: rootfs.display().to_string(),
            kernel: kernel.display().to_string(),
            initrd: None,
            work_seed: None,
        })
        .await
        .unwrap()
}
