//! Image and kernel operations of the [`Manager`]: list, show, import, build, remove.

use std::path::{Path, PathBuf};

use banger_proto::{
    BuildImageRequest, BuildProgress, Image, ImageKernel, ImportImageRequest, ImportKernelRequest,
    Kernel,
};
use tracing::info;

use super::Manager;
use crate::Error;
use crate::image::tree::{Tree, TreeError};
use crate::image::{self, ImageError, mirror};
use crate::layout;
use crate::store::AssetTable;

/// Names of images and kernels: short, no path separators.
pub(super) fn check_asset_name(kind: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "{kind} name {name:?} is not valid; use letters, digits, '-', '_' and '.'"
        )))
    }
}

impl Manager {
    pub(super) async fn find_image(&self, name: &str) -> Result<Image, Error> {
        self.db
            .find_image(name)
            .await?
            .ok_or_else(|| Error::AssetNotFound {
                kind: "image",
                name: name.to_owned(),
            })
    }

    pub(super) async fn find_kernel(&self, name: &str) -> Result<Kernel, Error> {
        self.db
            .find_kernel(name)
            .await?
            .ok_or_else(|| Error::AssetNotFound {
                kind: "kernel",
                name: name.to_owned(),
            })
    }

    /// Whether a stored image or kernel still names `digest` in `table`.
    async fn digest_in_use(&self, table: AssetTable, digest: &str) -> Result<bool, Error> {
        let digest = digest.to_owned();
        self.db.run(move |s| s.digest_in_use(table, &digest)).await
    }

    pub async fn list_images(&self) -> Result<Vec<Image>, Error> {
        self.db.run(|s| s.list_images()).await
    }

    pub async fn get_image(&self, name: &str) -> Result<Image, Error> {
        self.find_image(name).await
    }

    pub async fn list_kernels(&self) -> Result<Vec<Kernel>, Error> {
        let kernels = self.db.run(|s| s.list_kernels()).await?;
        let mut out = Vec::with_capacity(kernels.len());
        for kernel in kernels {
            out.push(self.with_capabilities(kernel).await);
        }
        Ok(out)
    }

    /// Registers a kernel (and initrd) from local files, copying them into the store.
    pub async fn import_kernel(&self, request: ImportKernelRequest) -> Result<Kernel, Error> {
        check_asset_name("kernel", &request.name)?;
        let kernel = image::check_input("kernel", &request.kernel)?;
        let initrd = request
            .initrd
            .as_deref()
            .map(|p| image::check_input("initrd", p))
            .transpose()?;
        image::validate_kernel(&kernel)?;
        let config_path = kernel.clone();
        let config = tokio::task::spawn_blocking(move || image::kernel_config(&config_path))
            .await
            .ok()
            .flatten();
        let warning = image::firecracker_kernel_warning(config.as_deref());
        let _guard = self.asset_lock.lock().await;
        let source = format!("import:{}", kernel.display());
        let mut stored = self
            .store_kernel(
                &request.name,
                &kernel,
                initrd.as_deref(),
                None,
                None,
                source,
            )
            .await?;
        if let Some(config) = &config {
            let dest = self.layout.kernel_config(&stored.digest);
            if !dest.is_file() {
                let tmp = dest.with_extension("partial");
                if std::fs::write(&tmp, config).is_ok() {
                    let _ = std::fs::rename(&tmp, &dest);
                }
            }
        }
        if let Some(warning) = warning {
            tracing::warn!(kernel = %stored.name, "{warning}");
            stored.warnings.push(warning);
        }
        Ok(self.with_capabilities(stored).await)
    }

    /// Copies kernel files into `kernels/<digest>/` and records them under `name`.
    pub(super) async fn store_kernel(
        &self,
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        modules: Option<&Path>,
        release: Option<String>,
        source: String,
    ) -> Result<Kernel, Error> {
        let mut inputs = vec![kernel.to_path_buf()];
        inputs.extend(initrd.map(Path::to_path_buf));
        let digest = hash_files(inputs).await?;
        let dir = self.layout.kernel_dir(&digest);
        if !dir.join(layout::KERNEL_VMLINUX).is_file() {
            let tmp = self.scratch_dir("kernel")?;
            let staged = tmp.path().join("k");
            std::fs::create_dir_all(&staged)
                .map_err(Error::io(format!("cannot create {}", staged.display())))?;
            image::copy_into_place(kernel, &staged.join(layout::KERNEL_VMLINUX)).await?;
            if let Some(initrd) = initrd {
                image::copy_into_place(initrd, &staged.join(layout::KERNEL_INITRD)).await?;
            }
            if let Some(modules) = modules {
                image::copy_tree(modules, &staged.join(layout::KERNEL_MODULES)).await?;
            }
            std::fs::create_dir_all(self.layout.kernels_dir())
                .map_err(Error::io("cannot create the kernel store"))?;
            super::remove_tree(dir.clone()).await;
            std::fs::rename(&staged, &dir).map_err(Error::io(format!(
                "cannot move kernel into {}",
                dir.display()
            )))?;
        }
        crate::fault::point("kernel.after_copy")?;
        let row = Kernel {
            name: name.to_owned(),
            digest,
            release,
            has_initrd: initrd.is_some(),
            source,
            created_at: crate::now_rfc3339(),
            warnings: Vec::new(),
            capabilities: None,
        };
        self.db.put_kernel(&row).await?;
        info!(kernel = %row.name, digest = %row.digest, "kernel stored");
        Ok(row)
    }

    /// Registers a root filesystem (raw ext4) plus a kernel (a stored kernel's name, or a file
    /// imported as a kernel named like the image) as an image.
    pub async fn import_image(&self, request: ImportImageRequest) -> Result<Image, Error> {
        check_asset_name("image", &request.name)?;
        let rootfs = image::check_input("rootfs", &request.rootfs)?;
        // A kernel this import adds goes again when the image cannot be stored (a full disk).
        let new_kernel =
            request.kernel.starts_with('/') && self.db.find_kernel(&request.name).await?.is_none();
        let kernel_name = if request.kernel.starts_with('/') {
            let kernel = self
                .import_kernel(ImportKernelRequest {
                    name: request.name.clone(),
                    kernel: request.kernel.clone(),
                    initrd: request.initrd.clone(),
                })
                .await?;
            kernel.name
        } else {
            if request.initrd.is_some() {
                return Err(Error::InvalidRequest(
                    "--initrd goes with a kernel file, not a stored kernel's name".into(),
                ));
            }
            self.find_kernel(&request.kernel).await?.name
        };
        let work_seed = match &request.work_seed {
            Some(dir) => Some(self.store_work_seed_dir(dir).await?),
            None => None,
        };
        let source = format!("import:{}", rootfs.display());
        let stored = {
            let _guard = self.asset_lock.lock().await;
            self.store_image(
                &request.name,
                &rootfs,
                None,
                &kernel_name,
                source,
                work_seed,
            )
            .await
        };
        if stored.is_err()
            && new_kernel
            && let Err(e) = self.remove_kernel(&kernel_name).await
        {
            tracing::warn!(kernel = %kernel_name, "cannot remove the kernel of a failed import: {e}");
        }
        stored
    }

    /// Copies a root filesystem into `images/<digest>/` and records it under `name`.
    pub(super) async fn store_image(
        &self,
        name: &str,
        rootfs: &Path,
        known_digest: Option<String>,
        kernel: &str,
        source: String,
        work_seed: Option<String>,
    ) -> Result<Image, Error> {
        let digest = match known_digest {
            Some(d) => d,
            None => hash_files(vec![rootfs.to_path_buf()]).await?,
        };
        let dest = self.layout.image_rootfs(&digest);
        if !dest.is_file() {
            let parent = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            std::fs::create_dir_all(&parent)
                .map_err(Error::io(format!("cannot create {}", parent.display())))?;
            if let Err(e) = image::copy_into_place(rootfs, &dest).await {
                // Only when empty: the digest's directory this copy made.
                let _ = std::fs::remove_dir(&parent);
                return Err(e.into());
            }
        }
        crate::fault::point("image.after_copy")?;
        let size_bytes = std::fs::metadata(&dest)
            .map_err(Error::io(format!("cannot stat {}", dest.display())))?
            .len();
        let row = Image {
            name: name.to_owned(),
            digest,
            kernel: kernel.to_owned(),
            size_bytes,
            source,
            created_at: crate::now_rfc3339(),
            work_seed,
            exec: None,
        };
        self.db.put_image(&row).await?;
        info!(image = %row.name, digest = %row.digest, "image stored");
        Ok(row)
    }

    /// Stores the host directory `dir` (an absolute path) as a work-seed; returns its digest.
    pub(super) async fn store_work_seed_dir(&self, dir: &str) -> Result<String, Error> {
        let path = PathBuf::from(dir);
        if !path.is_absolute() {
            return Err(ImageError::RelativePath(dir.to_owned()).into());
        }
        if !path.is_dir() {
            return Err(Error::InvalidRequest(format!(
                "work-seed {dir} is not a directory; give the directory whose tree a new VM's /root starts with"
            )));
        }
        self.store_work_seed(move || Tree::from_dir(&path)).await
    }

    /// Stores the tree `read` makes as a work-seed (checked, materialized in scratch, then
    /// renamed into `work-seeds/<digest>/`); returns its digest: that of the canonical tar of
    /// the stored tree, so pushing it later gives the same bytes.
    pub(super) async fn store_work_seed(
        &self,
        read: impl FnOnce() -> Result<Tree, TreeError> + Send + 'static,
    ) -> Result<String, Error> {
        let scratch = self.scratch_dir("seed")?;
        let store = self.layout.work_seeds_dir();
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || -> Result<String, Error> {
            let tree = read().map_err(seed_error)?;
            tree.check_work_seed("work-seed").map_err(seed_error)?;
            let staged = scratch.path().join("tree");
            tree.materialize(&staged).map_err(seed_error)?;
            drop(tree);
            let tar = scratch.path().join("seed.tar");
            let file = std::fs::File::create(&tar)
                .map_err(Error::io(format!("cannot create {}", tar.display())))?;
            Tree::from_dir(&staged)
                .and_then(|t| t.write_tar(std::io::BufWriter::new(file), |_| false))
                .map_err(seed_error)?;
            let digest = image::sha256_files(&[tar.as_path()])?;
            let dest = layout.work_seed(&digest);
            if !dest.is_dir() {
                std::fs::create_dir_all(&store)
                    .map_err(Error::io(format!("cannot create {}", store.display())))?;
                std::fs::rename(&staged, &dest).map_err(Error::io(format!(
                    "cannot move the work-seed into {}",
                    dest.display()
                )))?;
            }
            Ok(digest)
        })
        .await
        .map_err(|e| Error::Failed(format!("work-seed task failed: {e}")))?
    }

    /// A scratch directory under the data dir, removed when dropped.
    pub(super) fn scratch_dir(&self, prefix: &str) -> Result<tempfile::TempDir, Error> {
        let parent = self.layout.tmp_dir();
        std::fs::create_dir_all(&parent)
            .map_err(Error::io(format!("cannot create {}", parent.display())))?;
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .map_err(Error::io("cannot create a scratch directory"))
    }

    /// Builds the default Debian image from the embedded recipe (kernel first, when the
    /// kernel of this recipe is not stored yet). With `BANGER_CACHE_DIR` set, build outputs are
    /// kept there keyed by the recipe digest and reused (CI keeps this cache between runs).
    pub async fn build_image(&self, request: BuildImageRequest) -> Result<Image, Error> {
        let name = request.name.clone().unwrap_or_else(|| "default".into());
        check_asset_name("image", &name)?;
        if let Some(from) = &request.from
            && name == "default"
        {
            // `default` is the recipe's image, whose kernel every --from image boots.
            return Err(Error::InvalidRequest(format!(
                "name the image built from {from}: banger image build NAME --from {from} (`default` is the recipe's image)"
            )));
        }
        if request.from.is_none()
            && request.kernel == ImageKernel::Microvm
            && name == image::kernel::DEBIAN_NAME
        {
            return Err(Error::InvalidRequest(format!(
                "`{name}` names Debian's cloud kernel: choose another image name, or --kernel debian"
            )));
        }
        let _guard = self.asset_lock.lock().await;
        let work_seed = match &request.work_seed {
            Some(dir) => Some(self.store_work_seed_dir(dir).await?),
            None => None,
        };
        let built = match &request.from {
            Some(from) => {
                self.build_from_container(&name, from, &request, work_seed.clone())
                    .await
            }
            None => {
                self.build_recipe_image(&name, &request, work_seed.clone())
                    .await
            }
        };
        // A seed stored for a build that failed goes, unless an image names it.
        if built.is_err()
            && let Some(seed) = &work_seed
            && !self.digest_in_use(AssetTable::WorkSeeds, seed).await?
        {
            super::remove_tree(self.layout.work_seed(seed)).await;
        }
        built
    }

    /// The recipe's image (the caller holds the asset lock).
    async fn build_recipe_image(
        &self,
        name: &str,
        request: &BuildImageRequest,
        work_seed: Option<String>,
    ) -> Result<Image, Error> {
        let recipe = image::recipe_digest();
        // The image's source names its kernel's too: a new kernel recipe rebuilds the image
        // record (not its root filesystem, cached by the image recipe alone).
        let source = match request.kernel {
            ImageKernel::Debian => format!("build:{recipe}"),
            ImageKernel::Microvm => {
                format!(
                    "build:{recipe}+{}",
                    super::kernels::microvm_kernel_source()?
                )
            }
        };
        if !request.force
            && let Some(existing) = self.db.find_image(name).await?
            && existing.source == source
            && existing.work_seed == work_seed
        {
            return Ok(existing);
        }
        let cache = std::env::var_os("BANGER_CACHE_DIR")
            .filter(|v| !v.is_empty())
            .map(|dir| PathBuf::from(dir).join(format!("guest-{}", &recipe[..16])));
        let scratch = self.scratch_dir("build")?;
        let work = match &cache {
            Some(dir) => dir.clone(),
            None => scratch.path().to_path_buf(),
        };
        // Several instances (tests, CI) may share the cache: one builds, the others wait.
        let _cache_lock = match &cache {
            Some(dir) => Some(lock_file(&dir.with_extension("lock")).await?),
            None => None,
        };
        let kernel_out = work.join("kernel");
        let rootfs_out = work.join("rootfs.ext4");
        let log = self.layout.logs_dir().join(layout::IMAGE_BUILD_LOG);
        let cached = kernel_out.join(layout::KERNEL_VMLINUX).is_file()
            && rootfs_out.is_file()
            && !request.force;
        if !cached {
            self.check_build_tools()?;
            let mirror = request
                .mirror
                .clone()
                .or_else(|| {
                    (!self.config.images.mirror.is_empty())
                        .then(|| self.config.images.mirror.clone())
                })
                .or_else(|| mirror::host_debian_mirror(Path::new("/etc/apt")))
                .ok_or(ImageError::NoMirror)?;
            self.mark_build_start(&log)?;
            let recipe_dir = scratch.path().join("recipe");
            image::write_recipe(&recipe_dir)?;
            std::fs::create_dir_all(&work)
                .map_err(Error::io(format!("cannot create {}", work.display())))?;
            info!(%mirror, log = %log.display(), "building the guest kernel");
            image::run_script(
                "kernel build",
                &recipe_dir.join("build-kernel.sh"),
                &[kernel_out.as_os_str()],
                &log,
            )
            .await?;
            info!("building the guest root filesystem");
            image::run_script(
                "root filesystem build",
                &recipe_dir.join("build-rootfs.sh"),
                &[
                    rootfs_out.as_os_str(),
                    std::ffi::OsStr::new(&mirror),
                    kernel_out.as_os_str(),
                ],
                &log,
            )
            .await?;
        }
        crate::fault::point("build.after_scripts")?;
        let release = std::fs::read_to_string(kernel_out.join("kernel.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("release").and_then(|r| r.as_str()).map(str::to_owned));
        // Debian's cloud kernel is stored as `debian` either way (images built `--from` boot
        // it); the image's own kernel is stored under the image's name: the microVM kernel
        // unless asked otherwise.
        let modules = kernel_out.join(layout::KERNEL_MODULES);
        let mut names = vec![image::kernel::DEBIAN_NAME];
        if request.kernel == ImageKernel::Debian && name != image::kernel::DEBIAN_NAME {
            names.push(name);
        }
        for kernel_name in names {
            let kernel = self
                .store_kernel(
                    kernel_name,
                    &kernel_out.join(layout::KERNEL_VMLINUX),
                    Some(&kernel_out.join(layout::KERNEL_INITRD)),
                    modules.is_dir().then_some(modules.as_path()),
                    release.clone(),
                    format!("build:{recipe}"),
                )
                .await?;
            self.keep_kernel_config(&kernel, &kernel_out.join("config"));
        }
        if request.kernel == ImageKernel::Microvm {
            self.build_microvm_kernel(name, request.force).await?;
        }
        self.store_image(name, &rootfs_out, None, name, source, work_seed)
            .await
    }

    /// Refuses an image build when a tool it needs is missing.
    pub(super) fn check_build_tools(&self) -> Result<(), Error> {
        // No root: mmdebstrap bootstraps in a user namespace (newuidmap and the owner's
        // subordinate ids), the kernel package is unpacked with dpkg-deb -x.
        let mut tools = vec![
            "mmdebstrap",
            "mkfs.ext4",
            "apt-get",
            "dpkg-deb",
            "cpio",
            "busybox",
            "tar",
        ];
        if !nix::unistd::geteuid().is_root() {
            tools.extend(["newuidmap", "newgidmap"]);
        }
        for tool in tools {
            if !image::on_path(tool) && !Path::new("/usr/sbin").join(tool).exists() {
                return Err(Error::HostSetup {
                    message: format!("{tool} is not installed (needed by image build)"),
                    hint: "run `sudo scripts/install-deps`".into(),
                });
            }
        }
        Ok(())
    }

    /// Writes the build marker into the build log (progress lines before it are an earlier
    /// build's).
    pub(super) fn mark_build_start(&self, log: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(self.layout.logs_dir())
            .and_then(|()| {
                use std::io::Write;
                let mut file = std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(log)?;
                writeln!(file, "{BUILD_MARKER} {}", crate::now_rfc3339())
            })
            .map_err(Error::io(format!("cannot write {}", log.display())))?;
        Ok(())
    }

    /// The running build's latest progress line (the build scripts print their steps with
    /// sizes into the build log; a marker line starts each build).
    pub fn build_progress(&self) -> BuildProgress {
        let running = self.asset_lock.try_lock().is_err();
        // An image build that compiles the microVM kernel shows the compile's progress.
        let kernel = self.kernel_build_progress();
        let step = if running && kernel.running {
            Some(format!(
                "compiling the microVM kernel (once per recipe, minutes): {}% {}",
                kernel.percent, kernel.step
            ))
        } else {
            running
                .then(|| last_build_step(&self.layout.logs_dir().join(layout::IMAGE_BUILD_LOG)))
                .flatten()
        };
        BuildProgress { running, step }
    }

    /// Removes an image no VM uses; its files go when no other image shares them.
    pub async fn remove_image(&self, name: &str) -> Result<(), Error> {
        let _guard = self.asset_lock.lock().await;
        let image = self.find_image(name).await?;
        let used_by = name.to_owned();
        let users = self.db.run(move |s| s.vms_using_image(&used_by)).await?;
        if !users.is_empty() {
            return Err(Error::InUse {
                kind: "image",
                name: name.to_owned(),
                users: format!("VM {}", users.join(", ")),
            });
        }
        let doomed = name.to_owned();
        self.db.run(move |s| s.delete_image(&doomed)).await?;
        if !self
            .digest_in_use(AssetTable::Images, &image.digest)
            .await?
        {
            super::remove_tree(self.layout.images_dir().join(&image.digest)).await;
        }
        if let Some(seed) = &image.work_seed
            && !self.digest_in_use(AssetTable::WorkSeeds, seed).await?
        {
            super::remove_tree(self.layout.work_seed(seed)).await;
        }
        info!(image = %name, "image removed");
        Ok(())
    }

    /// Removes a kernel no image uses.
    pub async fn remove_kernel(&self, name: &str) -> Result<(), Error> {
        let _guard = self.asset_lock.lock().await;
        let kernel = self.find_kernel(name).await?;
        let used_by = name.to_owned();
        let users = self
            .db
            .run(move |s| s.images_using_kernel(&used_by))
            .await?;
        if !users.is_empty() {
            return Err(Error::InUse {
                kind: "kernel",
                name: name.to_owned(),
                users: format!("image {}", users.join(", ")),
            });
        }
        let doomed = name.to_owned();
        self.db.run(move |s| s.delete_kernel(&doomed)).await?;
        if !self
            .digest_in_use(AssetTable::Kernels, &kernel.digest)
            .await?
        {
            super::remove_tree(self.layout.kernel_dir(&kernel.digest)).await;
        }
        info!(kernel = %name, "kernel removed");
        Ok(())
    }
}

/// [`image::sha256_files`] on the blocking pool: an image is gigabytes.
async fn hash_files(paths: Vec<PathBuf>) -> Result<String, Error> {
    tokio::task::spawn_blocking(move || {
        let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        image::sha256_files(&paths)
    })
    .await
    .map_err(|e| Error::Failed(format!("hashing task failed: {e}")))?
    .map_err(Error::from)
}

/// A work-seed that cannot be stored: refused input is the request's fault.
pub(super) fn seed_error(error: TreeError) -> Error {
    match error {
        TreeError::Io { context, source } => Error::Io { context, source },
        refused => Error::InvalidRequest(format!("work-seed refused: {refused}")),
    }
}

/// Marks the start of a build in the build log: progress lines before it are an earlier
/// build's.
const BUILD_MARKER: &str = "banger: image build starts";

/// The last line of the build scripts (`build-kernel: ` or `build-rootfs: `) after the last
/// [`BUILD_MARKER`] in `log` (its last 64 KiB).
fn last_build_step(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let current = text.rsplit_once(BUILD_MARKER)?.1;
    current
        .lines()
        .rev()
        .find(|l| l.starts_with("build-kernel: ") || l.starts_with("build-rootfs: "))
        .map(|l| l.chars().filter(|c| !c.is_control()).take(200).collect())
}

/// Takes an exclusive `flock` on `path` (created if needed), waiting for other holders.
pub(super) async fn lock_file(path: &Path) -> Result<std::fs::File, Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(Error::io(format!("cannot create {}", parent.display())))?;
    }
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("cannot open {}", path.display())))?;
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| Error::Failed(format!("lock task failed: {e}")))?
        .map_err(Error::io(format!("cannot lock {shown}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_step_is_the_last_script_line_of_the_current_build() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(layout::IMAGE_BUILD_LOG);
        assert_eq!(last_build_step(&log), None, "no log");
        std::fs::write(
            &log,
            format!(
                "{BUILD_MARKER} t1\nbuild-rootfs: done: old.ext4 (497M apparent)\n\
                 {BUILD_MARKER} t2\nbuild-kernel: downloaded linux.deb (26M)\n\
                 I: mmdebstrap noise\nbuild-rootfs: step 1/4: mmdebstrap (3s)\nCreated symlink\n"
            ),
        )
        .unwrap();
        assert_eq!(
            last_build_step(&log).as_deref(),
            Some("build-rootfs: step 1/4: mmdebstrap (3s)")
        );
        // A build that printed nothing yet shows nothing, not the previous build's end.
        std::fs::write(
            &log,
            format!(
                "{BUILD_MARKER} t1\nbuild-rootfs: done\n{BUILD_MARKER} t2\nnoise\x1b]0;x\x07\n"
            ),
        )
        .unwrap();
        assert_eq!(last_build_step(&log), None);
        std::fs::write(
            &log,
            format!("{BUILD_MARKER}\nbuild-kernel: a\x1b]0;title\x07b\n"),
        )
        .unwrap();
        assert_eq!(
            last_build_step(&log).as_deref(),
            Some("build-kernel: a]0;titleb")
        );
    }
}
