//! banger's OCI artifact format: the media types of an image or kernel artifact, its small JSON
//! config, the manifest that ties them together, and the checks a pulled manifest must pass.
//! Also where a registry's credentials come from (`~/.docker/config.json`) and when plain HTTP
//! is allowed (loopback, or an explicit `--insecure`).
//!
//! One artifact is one OCI image manifest (`application/vnd.oci.image.manifest.v1+json`) whose
//! `artifactType` and config media type say banger; each file is one zstd-compressed layer
//! whose media type says what it is, annotated with its uncompressed size.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The OCI image manifest media type (all banger artifacts use it).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// `artifactType` of an image artifact (rootfs + kernel + initrd [+ work-seed]).
pub const IMAGE_ARTIFACT: &str = "application/vnd.banger.image.v1";
/// `artifactType` of a kernel artifact (kernel [+ initrd]).
pub const KERNEL_ARTIFACT: &str = "application/vnd.banger.kernel.v1";
/// Media type of the config blob ([`ArtifactConfig`] as JSON).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.banger.config.v1+json";
/// Annotation on each layer: the uncompressed size in bytes.
pub const SIZE_ANNOTATION: &str = "dev.banger.uncompressed-size";
/// The guest contract (what the guest setup inside the rootfs expects from the host) this
/// banger speaks; a pulled image naming another one is refused.
pub const GUEST_CONTRACT: u32 = 1;
/// Largest config blob read (it is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Largest manifest read.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Largest uncompressed layer accepted (a rootfs is a few GiB at most).
pub const MAX_LAYER_BYTES: u64 = 256 * 1024 * 1024 * 1024;

/// What one layer of an artifact holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKind {
    /// The raw ext4 root filesystem.
    Rootfs,
    /// The kernel (ELF vmlinux or bzImage).
    Kernel,
    /// The initrd.
    Initrd,
    /// The work-seed: a tar of the tree a new VM's /root starts with (images only).
    WorkSeed,
}

impl LayerKind {
    pub const ALL: [LayerKind; 4] = [
        LayerKind::Rootfs,
        LayerKind::Kernel,
        LayerKind::Initrd,
        LayerKind::WorkSeed,
    ];

    /// The layer's media type.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerKind::Rootfs => "application/vnd.banger.rootfs.v1.ext4+zstd",
            LayerKind::Kernel => "application/vnd.banger.kernel.v1.vmlinux+zstd",
            LayerKind::Initrd => "application/vnd.banger.initrd.v1+zstd",
            LayerKind::WorkSeed => "application/vnd.banger.work-seed.v1.tar+zstd",
        }
    }

    pub fn from_media_type(media_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.media_type() == media_type)
    }

    /// The name stored in the blob table.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Rootfs => "rootfs",
            LayerKind::Kernel => "kernel",
            LayerKind::Initrd => "initrd",
            LayerKind::WorkSeed => "work-seed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// Whether an artifact is an image or a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Image,
    Kernel,
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArtifactKind::Image => "image",
            ArtifactKind::Kernel => "kernel",
        })
    }
}

impl ArtifactKind {
    pub fn artifact_type(self) -> &'static str {
        match self {
            ArtifactKind::Image => IMAGE_ARTIFACT,
            ArtifactKind::Kernel => KERNEL_ARTIFACT,
        }
    }
}

/// The artifact's config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactConfig {
    pub kind: ArtifactKind,
    /// The guest contract the rootfs was built for (see [`GUEST_CONTRACT`]).
    pub guest_contract: u32,
    pub kernel: KernelConfig,
    /// `vm exec` defaults of an image (one built `--from` a container image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<banger_proto::ExecDefaults>,
}

/// What the config says about the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelConfig {
    /// `uname -r`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// Kernel command-line arguments the image needs beyond banger's own.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// What the kernel can do (`qemu-microvm`, `firecracker`), when its configuration was
    /// readable at push.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// One layer descriptor of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The OCI image manifest of a banger artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    #[serde(default)]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A layer of a checked manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub kind: LayerKind,
    pub descriptor: Descriptor,
    /// The uncompressed size (annotation).
    pub size: u64,
}

/// Why a manifest or config is not a usable banger artifact, or a reference or credential is
/// not usable.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0} is not a banger artifact: {1}")]
    NotBanger(String, String),
    #[error("{0} is a banger {1} artifact, not {2} (use banger {1} pull)")]
    WrongKind(String, ArtifactKind, ArtifactKind),
    #[error("{0} was made for guest contract {1}; this banger speaks {GUEST_CONTRACT}")]
    Contract(String, u32),
    #[error("{0:?} is not a valid reference (REGISTRY/REPOSITORY[:TAG][@DIGEST])")]
    BadReference(String),
    #[error(
        "{0} is not a loopback registry: plain HTTP is refused (use TLS, or --insecure to allow it)"
    )]
    NotLoopback(String),
    #[error("cannot read {path}: {reason}")]
    DockerConfig { path: String, reason: String },
}

/// A descriptor for `bytes` with `media_type`.
pub fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: sha256_digest(bytes),
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Builds the manifest of an artifact from its config blob and layers.
pub fn manifest(kind: ArtifactKind, config: &[u8], layers: Vec<Descriptor>) -> Manifest {
    Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.into(),
        artifact_type: Some(kind.artifact_type().into()),
        config: descriptor(CONFIG_MEDIA_TYPE, config),
        layers,
        annotations: BTreeMap::new(),
    }
}

/// Parses and checks a pulled manifest: it is banger's, of `kind`, each layer known, at most
/// once, with a plausible size; an image has a rootfs and a kernel, a kernel artifact a kernel.
pub fn check_manifest(
    reference: &str,
    bytes: &[u8],
    kind: ArtifactKind,
) -> Result<(Manifest, Vec<Layer>), OciError> {
    let not_banger = |why: &str| OciError::NotBanger(reference.to_owned(), why.to_owned());
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| not_banger(&format!("bad manifest: {e}")))?;
    if manifest.config.media_type != CONFIG_MEDIA_TYPE {
        return Err(not_banger(&format!(
            "config media type {}",
            manifest.config.media_type
        )));
    }
    let found = match manifest.artifact_type.as_deref() {
        Some(IMAGE_ARTIFACT) => ArtifactKind::Image,
        Some(KERNEL_ARTIFACT) => ArtifactKind::Kernel,
        other => return Err(not_banger(&format!("artifact type {other:?}"))),
    };
    if found != kind {
        return Err(OciError::WrongKind(reference.to_owned(), found, kind));
    }
    if manifest.config.size > MAX_CONFIG_BYTES || !is_sha256(&manifest.config.digest) {
        return Err(not_banger("config descriptor"));
    }
    let mut layers: Vec<Layer> = Vec::new();
    for descriptor in &manifest.layers {
        let kind = LayerKind::from_media_type(&descriptor.media_type)
            .ok_or_else(|| not_banger(&format!("unknown layer type {}", descriptor.media_type)))?;
        if layers.iter().any(|l| l.kind == kind) || !is_sha256(&descriptor.digest) {
            return Err(not_banger(&format!("layer {}", descriptor.digest)));
        }
        let size = descriptor
            .annotations
            .get(SIZE_ANNOTATION)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s <= MAX_LAYER_BYTES)
            .ok_or_else(|| not_banger(&format!("layer {} has no size", descriptor.digest)))?;
        layers.push(Layer {
            kind,
            descriptor: descriptor.clone(),
            size,
        });
    }
    let has = |k: LayerKind| layers.iter().any(|l| l.kind == k);
    let complete = match kind {
        ArtifactKind::Image => has(LayerKind::Rootfs) && has(LayerKind::Kernel),
        ArtifactKind::Kernel => {
            has(LayerKind::Kernel) && !has(LayerKind::Rootfs) && !has(LayerKind::WorkSeed)
        }
    };
    if !complete {
        return Err(not_banger("missing layers"));
    }
    Ok((manifest, layers))
}

/// Parses and checks a config blob.
pub fn check_config(
    reference: &str,
    bytes: &[u8],
    kind: ArtifactKind,
) -> Result<ArtifactConfig, OciError> {
    let config: ArtifactConfig = serde_json::from_slice(bytes)
        .map_err(|e| OciError::NotBanger(reference.to_owned(), format!("bad config: {e}")))?;
    if config.kind != kind {
        return Err(OciError::WrongKind(reference.to_owned(), config.kind, kind));
    }
    if config.guest_contract != GUEST_CONTRACT {
        return Err(OciError::Contract(
            reference.to_owned(),
            config.guest_contract,
        ));
    }
    Ok(config)
}

fn is_sha256(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The hex part of a `sha256:<hex>` digest (checked by [`check_manifest`]).
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Capabilities of a kernel from its build configuration.
pub fn kernel_capabilities(config: Option<&str>) -> Vec<String> {
    let Some(text) = config else {
        return Vec::new();
    };
    let mut caps = vec!["qemu-microvm".to_owned()];
    if super::firecracker_kernel_warning(Some(text)).is_none() {
        caps.push("firecracker".into());
    }
    caps
}

/// The registry host of `reference` (`host[:port]`), the part before the first `/` when it
/// looks like a host (has a `.` or `:`, or is `localhost`).
pub fn registry_host(reference: &str) -> Option<&str> {
    let (first, _) = reference.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

/// Checks the shape of a reference: an explicit registry host, a repository, and a tag or
/// digest; only characters OCI allows.
pub fn check_reference(reference: &str) -> Result<(), OciError> {
    let bad = || OciError::BadReference(reference.to_owned());
    let host = registry_host(reference).ok_or_else(bad)?;
    let rest = &reference[host.len() + 1..];
    let ok_chars = reference.len() <= 255
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b));
    if !ok_chars || rest.is_empty() || rest.starts_with('/') || rest.contains("//") {
        return Err(bad());
    }
    Ok(())
}

/// Whether `host` (`name[:port]`) is a loopback address or `localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether to speak plain HTTP to `host`: loopback always (a local registry is HTTP), other
/// hosts only with `insecure`.
pub fn plain_http(host: &str, insecure: bool) -> bool {
    insecure || is_loopback_host(host)
}

/// Credentials for `host` from a Docker `config.json` (`auths.<host>.auth` = base64
/// `user:password`, or `username`/`password`); `None` when the file or the entry is missing.
/// Credential helpers (`credsStore`) are not run.
pub fn docker_credentials(
    config_file: &Path,
    host: &str,
) -> Result<Option<(String, String)>, OciError> {
    let text = match std::fs::read_to_string(config_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(OciError::DockerConfig {
                path: config_file.display().to_string(),
                reason: e.to_string(),
            });
        }
    };
    let fail = |reason: String| OciError::DockerConfig {
        path: config_file.display().to_string(),
        reason,
    };
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, DockerAuth>,
    }
    #[derive(Deserialize)]
    struct DockerAuth {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
    }
    let config: DockerConfig = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let entry = config.auths.iter().find_map(|(key, auth)| {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let key = key.split('/').next().unwrap_or(key);
        (key == host).then_some(auth)
    });
    let Some(entry) = entry else {
        return Ok(None);
    };
    if let Some(encoded) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| fail(format!("auth of {host}: {e}")))?;
        let text =
            String::from_utf8(decoded).map_err(|_| fail(format!("auth of {host} is not UTF-8")))?;
        let (user, password) = text
            .split_once(':')
            .ok_or_else(|| fail(format!("auth of {host} is not user:password")))?;
        return Ok(Some((user.to_owned(), password.to_owned())));
    }
    Ok(entry
        .username
        .clone()
        .zip(entry.password.clone())
        .filter(|(u, _)| !u.is_empty()))
}

/// The local name a pulled artifact gets when none is given: the repository's last component
/// and the tag (`127.0.0.1:5000/banger/dev:1` → `dev-1`).
pub fn default_local_name(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let name = match last.split_once(':') {
        Some((repo, tag)) => format!("{repo}-{tag}"),
        None => last.to_owned(),
    };
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    name.trim_start_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(kind: LayerKind, size: u64) -> Descriptor {
        let mut d = descriptor(kind.media_type(), kind.as_str().as_bytes());
        d.annotations
            .insert(SIZE_ANNOTATION.into(), size.to_string());
        d
    }

    #[test]
    fn manifests_round_trip_and_are_checked() {
        let config = serde_json::to_vec(&ArtifactConfig {
            kind: ArtifactKind::Image,
            guest_contract: GUEST_CONTRACT,
            kernel: KernelConfig::default(),
            exec: None,
        })
        .unwrap();
        let m = manifest(
            ArtifactKind::Image,
            &config,
            vec![layer(LayerKind::Rootfs, 10), layer(LayerKind::Kernel, 5)],
        );
        let bytes = serde_json::to_vec(&m).unwrap();
        let (parsed, layers) = check_manifest("r", &bytes, ArtifactKind::Image).unwrap();
        assert_eq!(parsed, m);
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].size, 10);
        assert!(matches!(
            check_manifest("r", &bytes, ArtifactKind::Kernel),
            Err(OciError::WrongKind(..))
        ));
        check_config("r", &config, ArtifactKind::Image).unwrap();
        let other = String::from_utf8(config)
            .unwrap()
            .replace("\"guestContract\":1", "\"guestContract\":9");
        assert!(matches!(
            check_config("r", other.as_bytes(), ArtifactKind::Image),
            Err(OciError::Contract(_, 9))
        ));
        // A duplicated layer, a missing size, a missing rootfs: refused.
        for layers in [
            vec![layer(LayerKind::Rootfs, 1), layer(LayerKind::Rootfs, 1)],
            vec![layer(LayerKind::Kernel, 1)],
            vec![
                Descriptor {
                    annotations: BTreeMap::new(),
                    ..layer(LayerKind::Rootfs, 1)
                },
                layer(LayerKind::Kernel, 1),
            ],
        ] {
            let m = manifest(ArtifactKind::Image, b"{}", layers);
            let bytes = serde_json::to_vec(&m).unwrap();
            assert!(check_manifest("r", &bytes, ArtifactKind::Image).is_err());
        }
        let container = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(matches!(
            check_manifest("r", container, ArtifactKind::Image),
            Err(OciError::NotBanger(..))
        ));
    }

    #[test]
    fn references_and_plain_http() {
        check_reference("127.0.0.1:5000/banger/dev:1").unwrap();
        check_reference("localhost/x@sha256:ab").unwrap();
        for bad in [
            "dev:1",
            "banger/dev",
            "127.0.0.1:5000/",
            "h.io/a b",
            "h.io//a",
        ] {
            assert!(check_reference(bad).is_err(), "{bad}");
        }
        assert!(plain_http("127.0.0.1:5000", false));
        assert!(plain_http("localhost:80", false));
        assert!(plain_http("[::1]:5000", false));
        assert!(!plain_http("registry.example:5000", false));
        assert!(!plain_http("10.0.0.1:5000", false));
        assert!(plain_http("10.0.0.1:5000", true));
        assert_eq!(default_local_name("127.0.0.1:5000/banger/dev:1"), "dev-1");
        assert_eq!(default_local_name("h.io/a/b@sha256:ab"), "b");
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        assert_eq!(docker_credentials(&file, "h:1").unwrap(), None);
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &file,
            format!(
                r#"{{"auths":{{"https://h:1/v1/":{{"auth":"{auth}"}},"other":{{"username":"bob","password":"pw"}}}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            docker_credentials(&file, "h:1").unwrap(),
            Some(("alice".into(), "s3cr:et".into()))
        );
        assert_eq!(
            docker_credentials(&file, "other").unwrap(),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(docker_credentials(&file, "none").unwrap(), None);
        std::fs::write(&file, "not json").unwrap();
        assert!(docker_credentials(&file, "h:1").is_err());
    }
}
