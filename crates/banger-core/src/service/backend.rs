//! Which backend serves a VM and how to reach its running VMM: the backend a record names,
//! its live process with its control socket, and the acceleration (decided once per daemon).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Manager;
use crate::Error;
use crate::domain::{AccelMode, FirecrackerKvm, VmmKind};
use crate::model::VmRecord;
use crate::vmm::{VmBackend, VmProcess, accel};

impl Manager {
    /// The backend a VM was created with.
    pub(super) fn backend(&self, record: &VmRecord) -> Arc<dyn VmBackend> {
        self.backends.get(record.spec.vmm)
    }

    /// The backend of `kind` (a VM being created has no record yet).
    pub(super) fn backend_of(&self, kind: VmmKind) -> Arc<dyn VmBackend> {
        self.backends.get(kind)
    }

    /// The backend of `record` and its live process `pid` with its control socket (reattach
    /// by pid).
    pub(super) fn control(&self, record: &VmRecord, pid: u32) -> (Arc<dyn VmBackend>, VmProcess) {
        crate::fault::vmm_running(&record.id, pid);
        let backend = self.backend(record);
        let control = VmProcess {
            pid,
            control_socket: backend.control_socket(&self.layout.vm_runtime_dir(&record.id)),
            jail: record
                .runtime
                .as_ref()
                .and_then(|r| r.jail.as_ref())
                .map(PathBuf::from),
        };
        (backend, control)
    }

    /// Removes the VM's jail, if its backend keeps one (idempotent), on the blocking pool.
    pub(super) async fn remove_jail(&self, record: &VmRecord) {
        let backend = self.backend(record);
        let id = record.id.clone();
        let op_id = crate::net::current_op_id();
        match tokio::task::spawn_blocking(move || backend.remove_jail(&op_id, &id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %record.name, "{e}"),
            Err(e) => tracing::warn!(vm = %record.name, "jail removal task failed: {e}"),
        }
    }

    /// Why `record`'s VMM ended, in the VMM's own words when it left them (Firecracker's log
    /// in the VM's data dir).
    pub(super) fn exit_reason(&self, record: &VmRecord, backend: &dyn VmBackend) -> Option<String> {
        backend.exit_reason(&self.layout.vm_dir(&record.id))
    }

    /// The acceleration a VM on `backend` runs with: for a backend that runs only under KVM
    /// (Firecracker), `firecracker.kvm` decides whether it has KVM; else [`Self::accel_choice`].
    pub(super) async fn vmm_accel(
        &self,
        backend: &dyn VmBackend,
        kernel: &Path,
    ) -> Result<accel::AccelChoice, Error> {
        if !backend.capabilities().requires_kvm || self.seams.accel.is_some() {
            return self.accel_choice(kernel).await;
        }
        let assumed = |accel, reason: &str| accel::AccelChoice {
            accel,
            reason: reason.into(),
        };
        Ok(match self.config.firecracker.kvm {
            FirecrackerKvm::Yes => assumed(
                accel::Accel::Kvm,
                "KVM assumed (firecracker.kvm = \"yes\", unchecked)",
            ),
            FirecrackerKvm::No => assumed(
                accel::Accel::Tcg,
                "no KVM for Firecracker (firecracker.kvm = \"no\")",
            ),
            FirecrackerKvm::Auto if self.config.qemu.accel == AccelMode::Auto => {
                self.accel_choice(kernel).await?
            }
            // `qemu.accel` forces QEMU's choice; Firecracker's still goes by evidence.
            FirecrackerKvm::Auto => {
                let scratch = self.layout.runtime_dir().to_path_buf();
                self.evidence_accel
                    .get_or_init(|| async {
                        accel::choose(
                            AccelMode::Auto,
                            self.backends.qemu().binary(),
                            kernel,
                            &scratch,
                        )
                        .await
                    })
                    .await
                    .clone()
            }
        })
    }

    pub(super) async fn accel_choice(&self, kernel: &Path) -> Result<accel::AccelChoice, Error> {
        if let Some(choice) = &self.seams.accel {
            return Ok(choice.clone());
        }
        let scratch = self.layout.runtime_dir().to_path_buf();
        Ok(self
            .accel
            .get_or_init(|| async {
                accel::choose(
                    self.config.qemu.accel,
                    self.backends.qemu().binary(),
                    kernel,
                    &scratch,
                )
                .await
            })
            .await
            .clone())
    }
}
