//! `vm ls` answers at once while the root helper hangs removing a jail: finding a jailed VM
//! whose VMM died starts the jail's removal, and the listing does not wait for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_core::config::Config;
use banger_core::domain::{Accel, SystemDiskStrategy, VmmKind};
use banger_core::host::{HostError, HostOps, HostReply};
use banger_core::layout::Layout;
use banger_core::model::{VmRecord, VmRuntime, VmSpec};
use banger_core::service::Manager;
use banger_core::store::Store;
use banger_proto::helper::HelperOp;
use banger_proto::{VmName, VmState};

/// A helper whose `RemoveJail` hangs until the test lets it go (bounded, so a broken test
/// cannot hang for ever); every other operation fails.
#[derive(Debug)]
struct HangingHelper {
    entered: Mutex<mpsc::Sender<String>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl HostOps for HangingHelper {
    fn call(&self, _op_id: &str, op: HelperOp) -> Result<HostReply, HostError> {
        let HelperOp::RemoveJail { vm_id } = op else {
            return Err(HostError::Refused {
                op: "test",
                message: format!("not expected here: {op:?}"),
            });
        };
        let _ = self.entered.lock().unwrap().send(vm_id);
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30));
        Err(HostError::Failed {
            op: "remove_jail",
            message: "the test double gave up".into(),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_ls_answers_while_a_jail_removal_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(
        dir.path().join("data"),
        dir.path().join("run"),
        dir.path().join("config.toml"),
    );
    std::fs::create_dir_all(layout.data_dir()).unwrap();

    // A jailed Firecracker VM recorded as running whose VMM is gone (a pid that exited).
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let mut record = VmRecord::new(
        VmName::parse("jailed").unwrap(),
        VmSpec {
            cpus: 1,
            memory_mib: 256,
            disk_size_bytes: 1 << 30,
            image: "default".into(),
            vmm: VmmKind::Firecracker,
            vmm_reason: "test".into(),
            system_disk: SystemDiskStrategy::Copy,
        },
    );
    record.state = VmState::Running;
    record.runtime = Some(VmRuntime {
        vmm: VmmKind::Firecracker,
        accel: Accel::Kvm,
        reason: "test".into(),
        pid: Some(dead_pid),
        ssh_host: "127.0.0.1".into(),
        ssh_port: 22,
        jail: Some(dir.path().join("jail").display().to_string()),
    });
    Store::open(&layout.state_db())
        .unwrap()
        .insert_vm(&record)
        .unwrap();

    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let helper = Arc::new(HangingHelper {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    });
    let mut config = Config::default();
    // Any executable stands in for the jailer: nothing is launched here.
    config.firecracker.jailer = "/bin/true".into();
    let manager = Manager::with_host(
        layout,
        config,
        helper as Arc<dyn HostOps>,
        dir.path().join("helper.sock"),
    )
    .unwrap();

    let started = Instant::now();
    let vms = tokio::time::timeout(Duration::from_secs(5), manager.list_vms())
        .await
        .expect("vm ls did not answer")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Stopped, "{vms:?}");
    // The removal really started, and hangs now.
    let removing = entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the jail's removal never reached the helper");
    assert_eq!(removing, record.id);
    assert!(
        took < Duration::from_secs(1),
        "vm ls took {took:?} while the helper hung"
    );
    // Still hanging: a second listing is as quick.
    let started = Instant::now();
    let vm = manager.get_vm("jailed").await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(started.elapsed() < Duration::from_secs(1));
    release_tx.send(()).unwrap();
}
