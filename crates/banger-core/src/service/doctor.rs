//! `banger doctor` in the [`Manager`]: the host checks of [`crate::doctor`] plus the one that
//! needs the store (is the default image there?).

use banger_proto::DoctorReport;

use super::Manager;
use crate::Error;
use crate::doctor;

impl Manager {
    /// Checks the host and this instance; never changes anything.
    pub async fn doctor(&self) -> Result<DoctorReport, Error> {
        let mut checks = doctor::run_checks(&self.config, &self.layout).await.checks;
        let name = &self.config.defaults.image;
        let image = self.db.find_image(name).await?;
        checks.push(doctor::default_image_check(name, image.as_ref()));
        checks.push(doctor::firecracker_check(
            self.backends
                .firecracker()
                .version()
                .await
                .map_err(|e| e.to_string()),
        ));
        checks.push(doctor::jailer_check(
            &self.config.firecracker.jailer,
            self.backends
                .firecracker()
                .jailer_path()
                .map(|p| p.map(|p| p.display().to_string()))
                .map_err(|e| e.to_string()),
        ));
        let dm = self.dm_available().await;
        let (strategy, reason) =
            crate::disk::choose_raw_strategy(&self.layout.images_dir(), dm.clone());
        checks.push(doctor::system_disk_check(strategy, &reason, &dm));
        let network = self.network_status().await?;
        checks.extend(doctor::network_checks(&network));
        if network.helper {
            let bridge = network.bridge.clone().unwrap_or_default();
            let resolvectl = tokio::process::Command::new("resolvectl")
                .args(["status", &bridge])
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .ok()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
            checks.push(doctor::vm_routing_check(
                resolvectl.as_deref(),
                &bridge,
                network.gateway.as_deref(),
            ));
        }
        Ok(DoctorReport::from_checks(checks))
    }
}
