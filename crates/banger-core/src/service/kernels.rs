//! Kernel builds and capabilities of the [`Manager`]: `banger kernel build` (banger's microVM
//! kernel from Debian's linux-source, no root needed, cached by recipe digest under
//! `$BANGER_CACHE_DIR`), its progress, and what each stored kernel can boot.

use std::path::PathBuf;

use banger_proto::{BuildKernelRequest, Kernel, KernelBuildProgress, KernelCapabilities};
use tracing::info;

use super::Manager;
use crate::Error;
use crate::image::{self, kernel as microvm};
use crate::model::VmRecord;

/// The guest's own stop for a kernel without ACPI: sync, then reboot (which ends the VMM).
pub(super) const REBOOT_STOP_SCRIPT: &str =
    "sync && (systemctl reboot --no-block || reboot) >/dev/null 2>&1";

impl Manager {
    /// What the stored `kernel` can boot: read once from its configuration or ELF file, then
    /// kept beside it (`capabilities.json`; the directory is content-addressed).
    pub(super) async fn kernel_capabilities(&self, kernel: &Kernel) -> KernelCapabilities {
        let cached = self.layout.kernel_capabilities(&kernel.digest);
        if let Some(caps) = std::fs::read(&cached)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<KernelCapabilities>(&bytes).ok())
        {
            return caps;
        }
        let vmlinux = self.layout.kernel_dir(&kernel.digest).join("vmlinux");
        let caps = tokio::task::spawn_blocking(move || microvm::capabilities_of(&vmlinux))
            .await
            .unwrap_or_else(|_| microvm::capabilities_of(std::path::Path::new("")));
        if let Ok(text) = serde_json::to_vec_pretty(&caps) {
            // A cache: on failure the next call reads the kernel again.
            let tmp = cached.with_extension("json.partial");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &cached);
            }
        }
        caps
    }

    /// `kernel` with its capabilities filled in.
    pub(super) async fn with_capabilities(&self, mut kernel: Kernel) -> Kernel {
        kernel.capabilities = Some(self.kernel_capabilities(&kernel).await);
        kernel
    }

    /// Whether the VM's kernel takes its devices on the command line (no ACPI: a guest
    /// power-off does not end the VMM, a reboot does).
    pub(super) async fn kernel_takes_devices_on_cmdline(&self, record: &VmRecord) -> bool {
        let Ok(image) = self.find_image(&record.spec.image).await else {
            return false;
        };
        let Ok(kernel) = self.find_kernel(&image.kernel).await else {
            return false;
        };
        self.backend(record).capabilities().cmdline_devices_only
            || microvm::devices_on_cmdline(&self.kernel_capabilities(&kernel).await)
    }

    /// One stored kernel, with its capabilities.
    pub async fn get_kernel(&self, name: &str) -> Result<Kernel, Error> {
        let kernel = self.find_kernel(name).await?;
        Ok(self.with_capabilities(kernel).await)
    }

    /// The running kernel build's progress (`running = false` when none runs).
    pub fn kernel_build_progress(&self) -> KernelBuildProgress {
        self.kernel_build
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_kernel_build_progress(&self, progress: KernelBuildProgress) {
        *self.kernel_build.lock().unwrap_or_else(|p| p.into_inner()) = progress;
    }

    /// Builds banger's microVM kernel (`guest/microvm-kernel/`) and stores it as `name`
    /// (default `microvm`). Reuses a stored kernel of the same recipe, and with
    /// `BANGER_CACHE_DIR` set, a cached build (CI keeps this cache between runs).
    pub async fn build_kernel(&self, request: BuildKernelRequest) -> Result<Kernel, Error> {
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| microvm::DEFAULT_NAME.into());
        super::images::check_asset_name("kernel", &name)?;
        let source = microvm_kernel_source()?;
        let existing = self.db.find_kernel(&name).await?;
        if !request.force
            && let Some(existing) = existing
            && existing.source == source
        {
            return Ok(self.with_capabilities(existing).await);
        }
        let _guard = self.asset_lock.lock().await;
        self.build_microvm_kernel(&name, request.force).await
    }

    /// [`Self::build_kernel`] for a caller that holds the asset lock (`image build` too):
    /// reuses a stored kernel `name` of this recipe unless `force`.
    pub(super) async fn build_microvm_kernel(
        &self,
        name: &str,
        force: bool,
    ) -> Result<Kernel, Error> {
        let source_tarball = microvm::source_tarball();
        let recipe = microvm::recipe_digest(&source_tarball)?;
        let source = format!("build-microvm:{}", &recipe[..16]);
        if !force
            && let Some(existing) = self.db.find_kernel(name).await?
            && existing.source == source
        {
            return Ok(self.with_capabilities(existing).await);
        }
        let cache = std::env::var_os("BANGER_CACHE_DIR")
            .filter(|v| !v.is_empty())
            .map(|dir| PathBuf::from(dir).join(format!("microvm-kernel-{}", &recipe[..16])));
        let scratch = self.scratch_dir("kernel-build")?;
        let out = match &cache {
            Some(dir) => dir.clone(),
            None => scratch.path().join("out"),
        };
        // Several instances (tests, CI) may share the cache: one builds, the others wait.
        let _cache_lock = match &cache {
            Some(dir) => Some(super::images::lock_file(&dir.with_extension("lock")).await?),
            None => None,
        };
        let vmlinux = out.join("vmlinux");
        if force || !vmlinux.is_file() {
            for tool in ["make", "gcc", "flex", "bison", "bc"] {
                if !image::on_path(tool) {
                    return Err(Error::HostSetup {
                        message: format!("{tool} is not installed (needed by kernel build)"),
                        hint: "run scripts/install-deps".into(),
                    });
                }
            }
            let recipe_dir = scratch.path().join("recipe");
            image::write_recipe(&recipe_dir)?;
            std::fs::create_dir_all(self.layout.logs_dir())
                .map_err(Error::io("cannot create the log directory"))?;
            let log = self.layout.kernel_build_log();
            info!(log = %log.display(), source = %source_tarball.display(), "building the microVM kernel");
            self.set_kernel_build_progress(KernelBuildProgress {
                running: true,
                percent: 0,
                step: "starting".into(),
            });
            let result = microvm::run_build(
                &recipe_dir.join(microvm::BUILD_SCRIPT),
                &out,
                &source_tarball,
                &log,
                |percent, step| {
                    self.set_kernel_build_progress(KernelBuildProgress {
                        running: true,
                        percent,
                        step,
                    });
                },
            )
            .await;
            self.set_kernel_build_progress(KernelBuildProgress::default());
            result?;
        }
        let release = std::fs::read_to_string(out.join("kernel.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("release").and_then(|r| r.as_str()).map(str::to_owned));
        let kernel = self
            .store_kernel(name, &vmlinux, None, None, release, source)
            .await?;
        self.keep_kernel_config(&kernel, &out.join("config"));
        Ok(self.with_capabilities(kernel).await)
    }

    /// Copies a kernel's build configuration into its store directory (capabilities are read
    /// from it).
    pub(super) fn keep_kernel_config(&self, kernel: &Kernel, config: &std::path::Path) {
        let dest = self.layout.kernel_config(&kernel.digest);
        if config.is_file() && !dest.is_file() {
            let tmp = dest.with_extension("partial");
            if std::fs::copy(config, &tmp).is_ok() {
                let _ = std::fs::rename(&tmp, &dest);
            }
        }
    }
}

/// The `source` a stored kernel built from this recipe (and source tarball) has.
pub(super) fn microvm_kernel_source() -> Result<String, Error> {
    let recipe = microvm::recipe_digest(&microvm::source_tarball())?;
    Ok(format!("build-microvm:{}", &recipe[..16]))
}
