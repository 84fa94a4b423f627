//! `image build NAME --from REF`: a banger image from a container image. The layers are
//! fetched (registry or OCI layout, [`crate::image::container`]), applied into one judged tree
//! ([`crate::image::tree`]), written as one tar, and made bootable without root by
//! `guest/from-image/build.sh` (the image's own apt-get installs the guest contract's
//! packages from the host's apt mirror, in a user namespace), then stored as a normal image
//! booting the default kernel. ENV, WORKDIR and USER of the container image become the
//! image's `vm exec` defaults.

use std::path::{Path, PathBuf};

use banger_proto::{BuildImageRequest, ExecDefaults, Image, RegistryAccess};
use tracing::info;

use super::Manager;
use crate::Error;
use crate::image::container::{self, ContainerError, ImageConfig, Source};
use crate::image::tree::{LayerMode, Tree};
use crate::image::{self, mirror};

/// The kernel images built `--from` boot: Debian's cloud kernel, which `banger image build`
/// stores (with the modules tree the image gets).
const DEFAULT_KERNEL: &str = crate::image::kernel::DEBIAN_NAME;

/// What a container image's root filesystem says about its distribution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distro {
    pub id: String,
    pub codename: String,
}

/// Reads `/etc/os-release` (or `/usr/lib/os-release`) and checks for apt: banger makes only
/// Debian-family images with apt-get bootable.
pub fn inspect(tree: &Tree, shown: &str) -> Result<Distro, ContainerError> {
    let text = tree
        .read_file("etc/os-release", 64 << 10)
        .or_else(|| tree.read_file("usr/lib/os-release", 64 << 10))
        .ok_or_else(|| {
            ContainerError::Unusable(format!(
                "{shown} has no /etc/os-release: cannot tell its distribution (banger makes \
                 Debian-family images with apt-get bootable)"
            ))
        })?;
    let text = String::from_utf8_lossy(&text);
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').trim_matches('\'').to_owned())
        })
    };
    let id = field("ID").unwrap_or_default();
    let like = field("ID_LIKE").unwrap_or_default();
    let debian_family = id == "debian" || like.split_whitespace().any(|l| l == "debian");
    if !debian_family {
        let name = field("PRETTY_NAME").unwrap_or_else(|| id.clone());
        return Err(ContainerError::Unusable(format!(
            "{shown} is {name}, not Debian-family: banger installs systemd and openssh-server \
             with apt-get and cannot make it bootable; use a Debian or Ubuntu based image"
        )));
    }
    if !tree.is_file("usr/bin/apt-get") {
        return Err(ContainerError::Unusable(format!(
            "{shown} has no apt-get (/usr/bin/apt-get): banger needs the image's own apt to \
             install systemd and openssh-server into it"
        )));
    }
    if !tree.is_file("usr/bin/dpkg") {
        return Err(ContainerError::Unusable(format!(
            "{shown} has no dpkg (/usr/bin/dpkg): apt-get cannot install packages into it"
        )));
    }
    let codename = field("VERSION_CODENAME")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            ContainerError::Unusable(format!(
                "{shown}'s os-release names no VERSION_CODENAME: cannot tell which suite to \
                 install from"
            ))
        })?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    if !plain(&id) || !plain(&codename) {
        return Err(ContainerError::Unusable(format!(
            "{shown}'s os-release has an unexpected ID or VERSION_CODENAME"
        )));
    }
    Ok(Distro { id, codename })
}

/// The `vm exec` defaults kept of a container config: well-formed `NAME=VALUE` pairs, an
/// absolute WORKDIR, a USER that names someone other than root (its user part, when it is a
/// name: `runuser` takes names).
pub fn exec_defaults(config: &ImageConfig) -> Option<ExecDefaults> {
    let env: Vec<String> = config
        .env
        .iter()
        .filter(|pair| {
            pair.split_once('=').is_some_and(|(name, value)| {
                !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !value.contains('\0')
            })
        })
        .cloned()
        .collect();
    let workdir = config
        .working_dir
        .clone()
        .filter(|w| w.starts_with('/') && !w.contains('\0'));
    let user = config
        .user
        .as_deref()
        .map(|u| u.split(':').next().unwrap_or(u))
        .filter(|u| {
            !u.is_empty()
                && *u != "root"
                && !u.bytes().all(|b| b.is_ascii_digit())
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        })
        .map(str::to_owned);
    let defaults = ExecDefaults { env, workdir, user };
    (defaults != ExecDefaults::default()).then_some(defaults)
}

fn unusable(error: ContainerError) -> Error {
    match error {
        ContainerError::Io { context, source } => Error::Io { context, source },
        other => Error::InvalidRequest(format!("cannot build from this image: {other}")),
    }
}

/// The first `ID=` of the host's os-release.
fn host_distro_id() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines().find_map(|line| {
        Some(
            line.strip_prefix("ID=")?
                .trim()
                .trim_matches('"')
                .to_owned(),
        )
    })
}

impl Manager {
    /// `image build NAME --from REF` (the caller holds the asset lock).
    pub(super) async fn build_from_container(
        &self,
        name: &str,
        from: &str,
        request: &BuildImageRequest,
        work_seed: Option<String>,
    ) -> Result<Image, Error> {
        let kernel = self
            .find_kernel(DEFAULT_KERNEL)
            .await
            .map_err(|_| Error::HostSetup {
                message: format!("image build --from boots Debian's cloud kernel ({DEFAULT_KERNEL}), which is not stored"),
                hint: "run `banger image build` once first".into(),
            })?;
        let kernel_dir = self.layout.kernel_dir(&kernel.digest);
        let release = kernel
            .release
            .clone()
            .filter(|_| kernel_dir.join("modules").is_dir());
        let Some(release) = release else {
            return Err(Error::HostSetup {
                message: format!(
                    "kernel {DEFAULT_KERNEL} has no modules tree (pulled and imported kernels carry none)"
                ),
                hint: "run `banger image build --force` to build the default kernel here".into(),
            });
        };
        let source = Source::parse(from).map_err(unusable)?;
        let scratch = self.scratch_dir("from")?;
        let log = self.layout.logs_dir().join("image-build.log");
        self.mark_build_start(&log)?;

        // The manifest and config; the layers only when no cached build exists.
        let progress = std::sync::Arc::new(image::registry::Progress::default());
        let (manifest_digest, config, layers) = match &source {
            Source::Registry(reference) => {
                let remote = self
                    .remote(
                        reference,
                        &RegistryAccess {
                            insecure: request.insecure,
                            ..RegistryAccess::default()
                        },
                    )
                    .await?;
                let (layers, digest, config) = remote
                    .container_manifest()
                    .await
                    .map_err(super::registry::transfer_error)?;
                let config = container::parse_config(&config).map_err(unusable)?;
                container::check_layers(&layers).map_err(unusable)?;
                (digest, config, Some((remote, layers)))
            }
            Source::Layout { .. } => (String::new(), ImageConfig::default(), None),
        };
        let mut from_source = format!("from:{from}@{manifest_digest}");
        let key = {
            use sha2::Digest;
            let hash = sha2::Sha256::digest(format!(
                "{}\n{}\n{}\n{}",
                image::from_recipe_digest(),
                from,
                manifest_digest,
                kernel.digest
            ));
            hash.iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let cache = std::env::var_os("BANGER_CACHE_DIR")
            .filter(|v| !v.is_empty() && !manifest_digest.is_empty())
            .map(|dir| PathBuf::from(dir).join(format!("from-{key}")));
        let out = match &cache {
            Some(dir) => dir.join("rootfs.ext4"),
            None => scratch.path().join("rootfs.ext4"),
        };
        if let Some(existing) = self.db.find_image(name).await?
            && !request.force
            && !manifest_digest.is_empty()
            && existing.source == from_source
            && existing.work_seed == work_seed
        {
            return Ok(existing);
        }
        let mut config = config;
        let mut known_users: Option<Vec<String>> = None;
        if request.force || !out.is_file() {
            let tars = match (&source, layers) {
                (_, Some((remote, layers))) => {
                    let mut tars = Vec::new();
                    for (i, layer) in layers.iter().enumerate() {
                        let dest = scratch.path().join(format!("layer-{i}.tar"));
                        remote
                            .container_layer(layer, &dest, &progress)
                            .await
                            .map_err(super::registry::transfer_error)?;
                        tars.push(dest);
                    }
                    tars
                }
                (Source::Layout { dir, tag }, None) => {
                    let (dir, tag, into) = (dir.clone(), tag.clone(), scratch.path().to_path_buf());
                    let (digest, layout_config, tars) = tokio::task::spawn_blocking(move || {
                        container::fetch_layout(&dir, tag.as_deref(), &into)
                    })
                    .await
                    .map_err(|e| Error::Failed(format!("layout task failed: {e}")))?
                    .map_err(unusable)?;
                    info!(%digest, "read the OCI layout");
                    config = layout_config;
                    from_source = format!("from:{from}@{digest}");
                    tars
                }
                (Source::Registry(_), None) => {
                    return Err(Error::Failed("registry layers missing".into()));
                }
            };
            let tree_tar = scratch.path().join("tree.tar");
            let (shown, tree_out) = (from.to_owned(), tree_tar.clone());
            let (distro, users) =
                tokio::task::spawn_blocking(move || -> Result<(Distro, Vec<String>), Error> {
                    let mut tree = Tree::new();
                    for tar in &tars {
                        tree.apply_layer(tar, LayerMode::Oci)
                            .map_err(|e| Error::InvalidRequest(format!("layer refused: {e}")))?;
                    }
                    let distro = inspect(&tree, &shown).map_err(unusable)?;
                    // The users the image knows: USER applies only when it names one of them.
                    let users: Vec<String> = tree
                        .read_file("etc/passwd", 4 << 20)
                        .map(|p| {
                            String::from_utf8_lossy(&p)
                                .lines()
                                .filter_map(|l| l.split(':').next())
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default();
                    let file = std::fs::File::create(&tree_out)
                        .map_err(Error::io(format!("cannot create {}", tree_out.display())))?;
                    // The guest's /dev is a devtmpfs: device nodes are never needed (and a user
                    // namespace cannot make them).
                    tree.write_tar(std::io::BufWriter::new(file), |p| p.starts_with("dev/"))
                        .map_err(|e| Error::Failed(e.to_string()))?;
                    drop(tree);
                    for tar in &tars {
                        let _ = std::fs::remove_file(tar);
                    }
                    Ok((distro, users))
                })
                .await
                .map_err(|e| Error::Failed(format!("layer task failed: {e}")))??;
            known_users = Some(users);
            let mirror = self.mirror_for_distro(request, &distro)?;
            self.check_build_tools()?;
            let recipe_dir = scratch.path().join("recipe");
            image::write_recipe(&recipe_dir)?;
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(Error::io(format!("cannot create {}", parent.display())))?;
            }
            info!(from = %from, suite = %distro.codename, log = %log.display(), "building an image from a container image");
            image::run_script(
                "root filesystem build",
                &recipe_dir.join(image::FROM_IMAGE_DIR).join("build.sh"),
                &[
                    tree_tar.as_os_str(),
                    out.as_os_str(),
                    std::ffi::OsStr::new(&mirror),
                    std::ffi::OsStr::new(&distro.codename),
                    std::ffi::OsStr::new("main"),
                    kernel_dir.as_os_str(),
                    std::ffi::OsStr::new(&release),
                ],
                &log,
            )
            .await?;
        } else if matches!(source, Source::Layout { .. }) {
            // Unreachable: layouts are never cached (no manifest digest before reading).
            return Err(Error::Failed("cached layout build".into()));
        }
        let mut stored = self
            .store_image(name, &out, None, &kernel.name, from_source, work_seed)
            .await?;
        let mut exec = exec_defaults(&config);
        if let (Some(defaults), Some(users)) = (exec.as_mut(), &known_users)
            && defaults.user.as_ref().is_some_and(|u| !users.contains(u))
        {
            tracing::warn!(user = ?defaults.user, "the image's USER is not in its /etc/passwd: vm exec runs as root");
            defaults.user = None;
        }
        stored.exec = exec.filter(|d| *d != ExecDefaults::default());
        self.db.put_image(&stored).await?;
        Ok(stored)
    }

    /// The apt mirror for `distro`: `--mirror`, else `images.mirror`, else the host's apt
    /// mirror when the host runs the same distribution.
    fn mirror_for_distro(
        &self,
        request: &BuildImageRequest,
        distro: &Distro,
    ) -> Result<String, Error> {
        if let Some(mirror) = &request.mirror {
            return Ok(mirror.clone());
        }
        let host = host_distro_id().unwrap_or_default();
        if !self.config.images.mirror.is_empty() && host == distro.id {
            return Ok(self.config.images.mirror.clone());
        }
        if host == distro.id
            && let Some(mirror) = mirror::host_debian_mirror(Path::new("/etc/apt"))
        {
            return Ok(mirror);
        }
        Err(Error::InvalidRequest(format!(
            "no apt mirror for a {} image: the host's apt sources are for {}; give one with --mirror URL",
            distro.id,
            if host.is_empty() {
                "another system"
            } else {
                &host
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with(files: &[(&str, &str)], links: &[(&str, &str)]) -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        for (path, target) in links {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, path).unwrap();
        }
        let tree = Tree::from_dir(dir.path()).unwrap();
        (dir, tree)
    }

    #[test]
    fn only_debian_family_images_with_apt_are_taken() {
        // Debian's layout: /etc/os-release is a relative symlink into /usr/lib.
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_CODENAME=bookworm\n";
        let (_d, tree) = tree_with(
            &[
                ("usr/lib/os-release", debian),
                ("usr/bin/apt-get", ""),
                ("usr/bin/dpkg", ""),
            ],
            &[("etc/os-release", "../usr/lib/os-release")],
        );
        assert_eq!(
            inspect(&tree, "r").unwrap(),
            Distro {
                id: "debian".into(),
                codename: "bookworm".into()
            }
        );
        let ubuntu = "ID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n";
        let (_d, tree) = tree_with(
            &[
                ("etc/os-release", ubuntu),
                ("usr/bin/apt-get", ""),
                ("usr/bin/dpkg", ""),
            ],
            &[],
        );
        assert_eq!(inspect(&tree, "r").unwrap().codename, "noble");
        let (_d, tree) = tree_with(&[("etc/os-release", "ID=fedora\n")], &[]);
        let e = inspect(&tree, "r").unwrap_err().to_string();
        assert!(e.contains("not Debian-family"), "{e}");
        let (_d, tree) = tree_with(&[("etc/os-release", debian)], &[]);
        let e = inspect(&tree, "r").unwrap_err().to_string();
        assert!(e.contains("no apt-get"), "{e}");
        let (_d, tree) = tree_with(&[("usr/bin/apt-get", "")], &[]);
        let e = inspect(&tree, "r").unwrap_err().to_string();
        assert!(e.contains("no /etc/os-release"), "{e}");
    }

    #[test]
    fn exec_defaults_keep_what_makes_sense() {
        let config = ImageConfig {
            env: vec![
                "PATH=/usr/local/cargo/bin:/usr/bin".into(),
                "1BAD=x".into(),
                "NO_VALUE".into(),
                "RUSTUP_HOME=/usr/local/rustup".into(),
            ],
            working_dir: Some("/srv/app".into()),
            user: Some("app:staff".into()),
            ..ImageConfig::default()
        };
        let d = exec_defaults(&config).unwrap();
        assert_eq!(
            d.env,
            [
                "PATH=/usr/local/cargo/bin:/usr/bin",
                "RUSTUP_HOME=/usr/local/rustup"
            ]
        );
        assert_eq!(d.workdir.as_deref(), Some("/srv/app"));
        assert_eq!(d.user.as_deref(), Some("app"));
        for user in ["root", "0", "0:0", "1000"] {
            let c = ImageConfig {
                user: Some(user.into()),
                ..ImageConfig::default()
            };
            assert_eq!(exec_defaults(&c), None, "{user}");
        }
    }
}
