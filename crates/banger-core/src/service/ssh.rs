//! `vm ssh` and `vm exec`: how the daemon and the CLI reach a running guest.

use banger_proto::{SshInfo, VmName, VmState};

use super::{Manager, host_key_alias, not_running};
use crate::Error;
use crate::guest::ssh::SshTarget;
use crate::model::VmRecord;

impl Manager {
    /// How the daemon and the CLI reach the guest.
    pub(super) fn ssh_target(&self, record: &VmRecord) -> Result<SshTarget, Error> {
        let runtime = record.runtime.as_ref().ok_or_else(|| Error::InvalidState {
            name: record.name.to_string(),
            state: record.state,
            hint: "start it with `banger vm start NAME`",
        })?;
        Ok(SshTarget {
            host: runtime.ssh_host.clone(),
            port: runtime.ssh_port,
            user: "root".into(),
            identity: self.layout.client_key(),
            known_hosts: self.layout.vm_known_hosts(&record.id),
            host_key_alias: host_key_alias(&record.name),
            control_path: Some(self.layout.vm_ssh_control(&record.id)),
        })
    }

    /// What `vm exec` and `vm ssh` need; refused unless the VM runs.
    pub async fn ssh_info(&self, name: &str) -> Result<SshInfo, Error> {
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name).await?;
        if record.state != VmState::Running {
            return Err(not_running(&name, record.state));
        }
        let target = self.ssh_target(&record)?;
        let (id, image) = (record.id.clone(), record.spec.image.clone());
        let (prepared, image) = self
            .db
            .run(move |s| {
                Ok::<_, crate::store::StoreError>((
                    s.workspace(&id)?.is_some(),
                    s.find_image(&image)?,
                ))
            })
            .await?;
        // The image may be gone (removed after the VM was made): no defaults then.
        let exec = image.and_then(|image| image.exec).unwrap_or_default();
        let workdir = super::workspace::workdir(prepared);
        Ok(SshInfo {
            host: target.host,
            port: target.port,
            user: target.user,
            identity_file: target.identity.display().to_string(),
            known_hosts_file: target.known_hosts.display().to_string(),
            host_key_alias: target.host_key_alias,
            control_path: self.layout.vm_ssh_control(&record.id).display().to_string(),
            workdir,
            exec_workdir: exec.workdir,
            env: exec.env,
            exec_user: exec.user,
        })
    }
}
