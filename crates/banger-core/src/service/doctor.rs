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
        let image = self.store().find_image(name)?;
        checks.push(doctor::default_image_check(name, image.as_ref()));
        Ok(DoctorReport::from_checks(checks))
    }
}
