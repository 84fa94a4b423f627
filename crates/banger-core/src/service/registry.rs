//! Push and pull of images and kernels as OCI artifacts (see [`crate::image::oci`] for the
//! format), and the autopull of `vm create --image REF`.
//!
//! A pull stages every layer in a scratch directory under the data dir, verified while it
//! streams, then renames the files into the content-addressed stores and only then writes the
//! rows: an interrupted or refused pull leaves no image listed. The blob table remembers which
//! registry blob became which local file, so pulling what is already stored fetches no blob and
//! pushing what the registry has sends none.

use crate::layout;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use banger_proto::{
    Image, Kernel, PullPolicy, PullRequest, PullResult, PushRequest, RegistryAccess,
    TransferProgress, TransferResult,
};
use tracing::info;

use super::Manager;
use super::images::check_asset_name;
use crate::Error;
use crate::image::oci::{self, ArtifactConfig, ArtifactKind, KernelConfig, LayerKind};
use crate::image::registry::{self, Progress, Remote};
use crate::image::tree::{LayerMode, Tree};
use crate::image::{self};
use crate::store::BlobRecord;

/// Deregisters a transfer's counters when the transfer ends.
struct TransferGuard<'a> {
    manager: &'a Manager,
    id: Option<String>,
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            self.manager.transfers_map().remove(id);
        }
    }
}

/// The files of a stored image or kernel to push.
struct PushFile {
    kind: LayerKind,
    path: PathBuf,
    /// Digest of the local store directory holding it.
    local: String,
}

impl Manager {
    fn transfers_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<Progress>>> {
        self.transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start_transfer(&self, id: Option<&str>) -> (Arc<Progress>, TransferGuard<'_>) {
        let progress = Arc::new(Progress::default());
        if let Some(id) = id {
            self.transfers_map()
                .insert(id.to_owned(), Arc::clone(&progress));
        }
        (
            progress,
            TransferGuard {
                manager: self,
                id: id.map(str::to_owned),
            },
        )
    }

    /// Removes the scratch directory's contents: called at daemon start, when no build,
    /// import or pull runs, so a pull killed half-way leaves nothing once the daemon is back.
    pub async fn remove_stale_scratch(&self) {
        let dir = self.layout.tmp_dir();
        let removal = tokio::task::spawn_blocking(move || {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let removed =
                    std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                if let Err(e) = removed {
                    tracing::warn!(path = %path.display(), "cannot remove stale scratch: {e}");
                }
            }
        });
        if let Err(e) = removal.await {
            tracing::warn!("stale scratch removal failed: {e}");
        }
    }

    /// Counters of the push or pull registered as `id` (`running: false` when none).
    pub fn transfer_progress(&self, id: &str) -> TransferProgress {
        self.transfers_map()
            .get(id)
            .map(|p| p.to_api())
            .unwrap_or_default()
    }

    /// Connects to the registry of `reference` with the request's credentials, else those of
    /// the user's `~/.docker/config.json`.
    pub(super) async fn remote(
        &self,
        reference: &str,
        access: &RegistryAccess,
    ) -> Result<Remote, Error> {
        oci::check_reference(reference).map_err(bad_request)?;
        let host = oci::registry_host(reference).unwrap_or_default().to_owned();
        let credentials = match (&access.username, &access.password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "give both --username and --password-stdin, or neither".into(),
                ));
            }
            (None, None) => match self.layout.docker_config() {
                Some(file) => {
                    tokio::task::spawn_blocking(move || oci::docker_credentials(&file, &host))
                        .await
                        .map_err(|e| Error::Failed(format!("credential lookup failed: {e}")))?
                        .map_err(bad_request)?
                }
                None => None,
            },
        };
        let host = oci::registry_host(reference).unwrap_or_default();
        Remote::new(
            reference,
            oci::plain_http(host, access.insecure),
            credentials,
        )
        .await
        .map_err(transfer_error)
    }

    /// `image push NAME REF`: the image's rootfs, kernel and initrd as one artifact.
    pub async fn push_image(&self, request: PushRequest) -> Result<TransferResult, Error> {
        let image = self.find_image(&request.name).await?;
        let kernel = self.find_kernel(&image.kernel).await?;
        let mut files = vec![PushFile {
            kind: LayerKind::Rootfs,
            path: self.layout.image_rootfs(&image.digest),
            local: image.digest.clone(),
        }];
        files.extend(self.kernel_files(&kernel));
        if let Some(seed) = &image.work_seed {
            files.push(PushFile {
                kind: LayerKind::WorkSeed,
                path: self.layout.work_seed(seed),
                local: seed.clone(),
            });
        }
        let mut config = self.artifact_config(ArtifactKind::Image, &kernel).await;
        config.exec = image.exec.clone();
        self.push_artifact(ArtifactKind::Image, files, config, &request)
            .await
    }

    /// `kernel push NAME REF`: the kernel and its initrd as one artifact.
    pub async fn push_kernel(&self, request: PushRequest) -> Result<TransferResult, Error> {
        let kernel = self.find_kernel(&request.name).await?;
        let files = self.kernel_files(&kernel);
        let config = self.artifact_config(ArtifactKind::Kernel, &kernel).await;
        self.push_artifact(ArtifactKind::Kernel, files, config, &request)
            .await
    }

    fn kernel_files(&self, kernel: &Kernel) -> Vec<PushFile> {
        let dir = self.layout.kernel_dir(&kernel.digest);
        let mut files = vec![PushFile {
            kind: LayerKind::Kernel,
            path: dir.join(layout::KERNEL_VMLINUX),
            local: kernel.digest.clone(),
        }];
        if kernel.has_initrd {
            files.push(PushFile {
                kind: LayerKind::Initrd,
                path: dir.join(layout::KERNEL_INITRD),
                local: kernel.digest.clone(),
            });
        }
        files
    }

    async fn artifact_config(&self, kind: ArtifactKind, kernel: &Kernel) -> ArtifactConfig {
        let path = self
            .layout
            .kernel_dir(&kernel.digest)
            .join(layout::KERNEL_VMLINUX);
        let capabilities = tokio::task::spawn_blocking(move || {
            oci::kernel_capabilities(image::kernel_config(&path).as_deref())
        })
        .await
        .unwrap_or_default();
        ArtifactConfig {
            kind,
            guest_contract: oci::GUEST_CONTRACT,
            kernel: KernelConfig {
                release: kernel.release.clone(),
                cmdline: Vec::new(),
                capabilities,
            },
            exec: None,
        }
    }

    async fn push_artifact(
        &self,
        kind: ArtifactKind,
        files: Vec<PushFile>,
        config: ArtifactConfig,
        request: &PushRequest,
    ) -> Result<TransferResult, Error> {
        let remote = self.remote(&request.reference, &request.access).await?;
        let (progress, _guard) = self.start_transfer(request.transfer_id.as_deref());
        let scratch = self.scratch_dir("push")?;
        let mut layers = Vec::new();
        for file in files {
            let (kind, local) = (file.kind.as_str(), file.local.clone());
            let known = self
                .db
                .run(move |s| s.blob_for(kind, &local))
                .await?
                .filter(|b| b.kind == file.kind.as_str());
            if let Some(blob) = known
                && remote
                    .has_blob(&blob.digest)
                    .await
                    .map_err(transfer_error)?
            {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
                layers.push(layer_descriptor(
                    file.kind,
                    blob.digest,
                    blob.size,
                    blob.uncompressed,
                ));
                continue;
            }
            let source = if file.kind == LayerKind::WorkSeed {
                // A work-seed is stored as a tree: its canonical tar is what is pushed.
                let tar = scratch.path().join("work-seed.tar");
                let (dir, out) = (file.path.clone(), tar.clone());
                tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::create(&out)
                        .map_err(Error::io(format!("cannot create {}", out.display())))?;
                    Tree::from_dir(&dir)
                        .and_then(|t| t.write_tar(std::io::BufWriter::new(file), |_| false))
                        .map_err(super::images::seed_error)
                })
                .await
                .map_err(|e| Error::Failed(format!("work-seed task failed: {e}")))??;
                tar
            } else {
                file.path.clone()
            };
            let dest = scratch.path().join(file.kind.as_str());
            let compressed =
                tokio::task::spawn_blocking(move || registry::compress(&source, &dest))
                    .await
                    .map_err(|e| Error::Failed(format!("compression failed: {e}")))?
                    .map_err(transfer_error)?;
            progress.total.fetch_add(compressed.size, Ordering::Relaxed);
            if !remote
                .has_blob(&compressed.digest)
                .await
                .map_err(transfer_error)?
            {
                remote
                    .push_file(
                        &compressed.path,
                        &compressed.digest,
                        compressed.size,
                        &progress,
                    )
                    .await
                    .map_err(transfer_error)?;
            } else {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
            }
            let _ = std::fs::remove_file(&compressed.path);
            self.db
                .put_blob(BlobRecord {
                    digest: compressed.digest.clone(),
                    kind: file.kind.as_str().into(),
                    local: file.local.clone(),
                    size: compressed.size,
                    uncompressed: compressed.source_size,
                })
                .await?;
            layers.push(layer_descriptor(
                file.kind,
                compressed.digest,
                compressed.size,
                compressed.source_size,
            ));
        }
        let config_bytes = serde_json::to_vec(&config)
            .map_err(|e| Error::Failed(format!("cannot encode the artifact config: {e}")))?;
        let manifest = oci::manifest(kind, &config_bytes, layers);
        let config_text = String::from_utf8_lossy(&config_bytes).into_owned();
        remote
            .push_bytes(config_bytes, &manifest.config.digest)
            .await
            .map_err(transfer_error)?;
        self.db
            .put_blob(BlobRecord {
                digest: manifest.config.digest.clone(),
                kind: "config".into(),
                local: config_text,
                size: manifest.config.size,
                uncompressed: manifest.config.size,
            })
            .await?;
        let manifest_digest = remote
            .push_manifest(&manifest)
            .await
            .map_err(transfer_error)?;
        info!(name = %request.name, reference = %request.reference, digest = %manifest_digest, "pushed");
        Ok(TransferResult {
            name: request.name.clone(),
            reference: request.reference.clone(),
            manifest_digest,
            blobs: progress.blobs.load(Ordering::Relaxed),
            skipped: progress.skipped.load(Ordering::Relaxed),
            bytes: progress.done.load(Ordering::Relaxed),
        })
    }

    /// `image pull REF [NAME]`: fetches the artifact and stores it as image NAME booting a
    /// kernel of the same name.
    pub async fn pull_image(&self, request: PullRequest) -> Result<PullResult, Error> {
        let (transfer, pulled) = self.pull_artifact(ArtifactKind::Image, &request).await?;
        Ok(PullResult {
            transfer,
            image: pulled.image,
            kernel: pulled.kernel,
        })
    }

    /// `kernel pull REF [NAME]`.
    pub async fn pull_kernel(&self, request: PullRequest) -> Result<PullResult, Error> {
        let (transfer, pulled) = self.pull_artifact(ArtifactKind::Kernel, &request).await?;
        Ok(PullResult {
            transfer,
            image: None,
            kernel: pulled.kernel,
        })
    }

    async fn pull_artifact(
        &self,
        kind: ArtifactKind,
        request: &PullRequest,
    ) -> Result<(TransferResult, Pulled), Error> {
        let reference = request.reference.as_str();
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| oci::default_local_name(reference));
        let what = match kind {
            ArtifactKind::Image => "image",
            ArtifactKind::Kernel => "kernel",
        };
        check_asset_name(what, &name)?;
        let remote = self.remote(reference, &request.access).await?;
        let (progress, _guard) = self.start_transfer(request.transfer_id.as_deref());
        let (manifest_bytes, manifest_digest) = remote.manifest().await.map_err(transfer_error)?;
        let (manifest, layers) =
            oci::check_manifest(reference, &manifest_bytes, kind).map_err(bad_request)?;
        let source = format!("pull:{reference}@{manifest_digest}");
        self.check_pull_target(kind, &name, reference).await?;

        // The config: remembered from an earlier pull, else fetched.
        let config_digest = manifest.config.digest.clone();
        let remembered = self.db.blob(&config_digest).await?;
        let config_bytes = match remembered {
            Some(blob) if blob.kind == "config" => blob.local.into_bytes(),
            _ => {
                progress.blobs.fetch_add(1, Ordering::Relaxed);
                remote
                    .small_blob(&config_digest, oci::MAX_CONFIG_BYTES)
                    .await
                    .map_err(transfer_error)?
            }
        };
        let config = oci::check_config(reference, &config_bytes, kind).map_err(bad_request)?;

        // Each layer: already stored (blob table + file present), else fetched into scratch.
        let scratch = self.scratch_dir("pull")?;
        let mut staged: Vec<(LayerKind, Staged)> = Vec::new();
        let mut to_fetch = Vec::new();
        for layer in &layers {
            let known = self
                .db
                .blob(&layer.descriptor.digest)
                .await?
                .filter(|b| b.kind == layer.kind.as_str())
                .map(|b| b.local)
                .filter(|local| self.stored_file(layer.kind, local).exists());
            match known {
                Some(local) => {
                    progress.skipped.fetch_add(1, Ordering::Relaxed);
                    staged.push((layer.kind, Staged::Stored(local)));
                }
                None => {
                    progress
                        .total
                        .fetch_add(layer.descriptor.size, Ordering::Relaxed);
                    to_fetch.push(layer.clone());
                }
            }
        }
        for layer in &to_fetch {
            let dest = scratch.path().join(layer.kind.as_str());
            let local = remote
                .pull_layer(layer, &dest, &progress)
                .await
                .map_err(transfer_error)?;
            staged.push((layer.kind, Staged::Fetched { path: dest, local }));
        }

        crate::fault::point("pull.after_fetch")?;
        // Into the stores, then the rows.
        let _lock = self.asset_lock.lock().await;
        let find = |k: LayerKind| staged.iter().find(|(kind, _)| *kind == k).map(|(_, s)| s);
        // The work-seed first: a refused one leaves nothing stored.
        let work_seed = match find(LayerKind::WorkSeed) {
            None => None,
            Some(Staged::Stored(local)) => Some(local.clone()),
            Some(Staged::Fetched { path, .. }) => {
                let tar = path.clone();
                Some(
                    self.store_work_seed(move || {
                        let mut tree = Tree::new();
                        tree.apply_layer(&tar, LayerMode::Plain)?;
                        Ok(tree)
                    })
                    .await?,
                )
            }
        };
        let kernel_stage = find(LayerKind::Kernel);
        let initrd_stage = find(LayerKind::Initrd);
        let kernel_digest = match (kernel_stage, initrd_stage) {
            (Some(Staged::Stored(k)), None) => {
                let has_no_initrd = !self
                    .layout
                    .kernel_dir(k)
                    .join(layout::KERNEL_INITRD)
                    .exists();
                has_no_initrd.then(|| k.clone())
            }
            (Some(Staged::Stored(k)), Some(Staged::Stored(i))) if k == i => Some(k.clone()),
            _ => None,
        };
        let kernel_path = |s: &Staged, file: LayerKind| match s {
            Staged::Stored(local) => self.stored_file(file, local),
            Staged::Fetched { path, .. } => path.clone(),
        };
        let kernel_file = kernel_stage
            .map(|s| kernel_path(s, LayerKind::Kernel))
            .ok_or_else(|| Error::Failed("artifact without a kernel".into()))?;
        let initrd_file = initrd_stage.map(|s| kernel_path(s, LayerKind::Initrd));
        let kernel = match kernel_digest {
            Some(digest) => {
                let row = Kernel {
                    name: name.clone(),
                    digest,
                    release: config.kernel.release.clone(),
                    has_initrd: initrd_stage.is_some(),
                    source: source.clone(),
                    created_at: crate::now_rfc3339(),
                    warnings: Vec::new(),
                    // Read from the stored kernel (its config or ELF) when asked for.
                    capabilities: None,
                };
                self.db.put_kernel(&row).await?;
                row
            }
            None => {
                image::validate_kernel(&kernel_file)?;
                self.store_kernel(
                    &name,
                    &kernel_file,
                    initrd_file.as_deref(),
                    None,
                    config.kernel.release.clone(),
                    source.clone(),
                )
                .await?
            }
        };
        let image_row = match find(LayerKind::Rootfs) {
            None => None,
            Some(stage) => {
                let digest = match stage {
                    Staged::Stored(local) => local.clone(),
                    Staged::Fetched { path, local } => {
                        let dest = self.layout.image_rootfs(local);
                        if !dest.is_file() {
                            let parent = dest.parent().map(Path::to_path_buf).unwrap_or_default();
                            std::fs::create_dir_all(&parent).map_err(Error::io(format!(
                                "cannot create {}",
                                parent.display()
                            )))?;
                            std::fs::rename(path, &dest).map_err(Error::io(format!(
                                "cannot move the root filesystem into {}",
                                dest.display()
                            )))?;
                            crate::fault::point("pull.after_rootfs_move")?;
                        }
                        local.clone()
                    }
                };
                let rootfs = self.layout.image_rootfs(&digest);
                let mut row = self
                    .store_image(
                        &name,
                        &rootfs,
                        Some(digest),
                        &kernel.name,
                        source.clone(),
                        work_seed.clone(),
                    )
                    .await?;
                if config.exec.is_some() {
                    row.exec = config.exec.clone();
                    self.db.put_image(&row).await?;
                }
                Some(row)
            }
        };
        // Remember which blob is which local file (after the files are in place).
        for layer in &layers {
            let local = match layer.kind {
                LayerKind::Rootfs => image_row.as_ref().map(|i| i.digest.clone()),
                LayerKind::Kernel | LayerKind::Initrd => Some(kernel.digest.clone()),
                LayerKind::WorkSeed => work_seed.clone(),
            };
            if let Some(local) = local {
                self.db
                    .put_blob(BlobRecord {
                        digest: layer.descriptor.digest.clone(),
                        kind: layer.kind.as_str().into(),
                        local,
                        size: layer.descriptor.size,
                        uncompressed: layer.size,
                    })
                    .await?;
            }
        }
        let config_text = String::from_utf8(config_bytes).unwrap_or_default();
        self.db
            .put_blob(BlobRecord {
                digest: config_digest,
                kind: "config".into(),
                local: config_text,
                size: manifest.config.size,
                uncompressed: manifest.config.size,
            })
            .await?;
        info!(name = %name, reference = %reference, digest = %manifest_digest, blobs = progress.blobs.load(Ordering::Relaxed), "pulled");
        Ok((
            TransferResult {
                name,
                reference: reference.to_owned(),
                manifest_digest,
                blobs: progress.blobs.load(Ordering::Relaxed),
                skipped: progress.skipped.load(Ordering::Relaxed),
                bytes: progress.done.load(Ordering::Relaxed),
            },
            Pulled {
                image: image_row,
                kernel,
            },
        ))
    }

    /// A pull may replace an image or kernel pulled from the same reference that no VM uses,
    /// nothing else.
    async fn check_pull_target(
        &self,
        kind: ArtifactKind,
        name: &str,
        reference: &str,
    ) -> Result<(), Error> {
        let prefix = format!("pull:{reference}@");
        let existing_source = match kind {
            ArtifactKind::Image => self.db.find_image(name).await?.map(|i| i.source),
            ArtifactKind::Kernel => self.db.find_kernel(name).await?.map(|k| k.source),
        };
        let users = match kind {
            ArtifactKind::Image => {
                let name = name.to_owned();
                self.db.run(move |s| s.vms_using_image(&name)).await?
            }
            ArtifactKind::Kernel => Vec::new(),
        };
        let what = match kind {
            ArtifactKind::Image => "image",
            ArtifactKind::Kernel => "kernel",
        };
        match existing_source {
            Some(source) if !source.starts_with(&prefix) => Err(Error::InvalidRequest(format!(
                "{what} {name} exists (from {source}); pull under another name (banger {what} pull {reference} NAME) or remove it first"
            ))),
            Some(_) if !users.is_empty() && kind == ArtifactKind::Image => Err(Error::InUse {
                kind: "image",
                name: name.to_owned(),
                users: format!("VM {}", users.join(", ")),
            }),
            _ => Ok(()),
        }
    }

    /// Where a layer of `kind` lives in the store directory `local`.
    fn stored_file(&self, kind: LayerKind, local: &str) -> PathBuf {
        match kind {
            LayerKind::Rootfs => self.layout.image_rootfs(local),
            LayerKind::Kernel => self.layout.kernel_dir(local).join(layout::KERNEL_VMLINUX),
            LayerKind::Initrd => self.layout.kernel_dir(local).join(layout::KERNEL_INITRD),
            LayerKind::WorkSeed => self.layout.work_seed(local),
        }
    }

    /// `vm create` with `--image REF` (or `defaults.image` a reference): pulls as the
    /// request's policy says and names the local image in the returned request.
    pub(super) async fn autopull(
        &self,
        mut request: banger_proto::CreateVmRequest,
    ) -> Result<banger_proto::CreateVmRequest, Error> {
        let image = request
            .image
            .clone()
            .unwrap_or_else(|| self.config.defaults.image.clone());
        let policy = request.pull.unwrap_or_default();
        let local = self
            .resolve_image_reference(&image, policy, request.transfer_id.clone())
            .await?;
        request.image = Some(local);
        Ok(request)
    }

    /// Resolves `vm create --image`: a name is returned as it is; a registry reference
    /// (`HOST/REPO:TAG`) is pulled as `policy` says and its local name returned.
    pub async fn resolve_image_reference(
        &self,
        image: &str,
        policy: PullPolicy,
        transfer_id: Option<String>,
    ) -> Result<String, Error> {
        if oci::registry_host(image).is_none() {
            if policy == PullPolicy::Always {
                return Err(Error::InvalidRequest(format!(
                    "--pull always needs a registry reference (HOST/REPO:TAG), not the image name {image}"
                )));
            }
            return Ok(image.to_owned());
        }
        let prefix = format!("pull:{image}@");
        let present = self
            .db
            .run(|s| s.list_images())
            .await?
            .into_iter()
            .find(|i| i.source.starts_with(&prefix));
        match (policy, present) {
            (PullPolicy::Missing, Some(found)) | (PullPolicy::Never, Some(found)) => Ok(found.name),
            (PullPolicy::Never, None) => Err(Error::AssetNotFound {
                kind: "image",
                name: image.to_owned(),
            }),
            (_, present) => {
                let name = present.map(|i| i.name);
                let pulled = self
                    .pull_image(PullRequest {
                        reference: image.to_owned(),
                        name,
                        access: RegistryAccess::default(),
                        transfer_id,
                    })
                    .await?;
                pulled
                    .image
                    .map(|i| i.name)
                    .ok_or_else(|| Error::Failed(format!("{image} held no root filesystem")))
            }
        }
    }
}

/// A layer of a pull: already in the store (its directory's digest), or fetched into scratch.
enum Staged {
    Stored(String),
    Fetched { path: PathBuf, local: String },
}

/// What a pull stored.
struct Pulled {
    image: Option<Image>,
    kernel: Kernel,
}

fn layer_descriptor(
    kind: LayerKind,
    digest: String,
    size: u64,
    uncompressed: u64,
) -> oci::Descriptor {
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(oci::SIZE_ANNOTATION.to_owned(), uncompressed.to_string());
    oci::Descriptor {
        media_type: kind.media_type().into(),
        digest,
        size,
        annotations,
    }
}

fn bad_request(error: oci::OciError) -> Error {
    Error::InvalidRequest(error.to_string())
}

pub(super) fn transfer_error(error: registry::RegistryError) -> Error {
    match error {
        registry::RegistryError::Format(e) => bad_request(e),
        other => Error::Transfer(other.to_string()),
    }
}
