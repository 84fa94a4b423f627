//! Container images (OCI or Docker) as the input of `image build --from`: where one comes
//! from (a registry reference, or a local OCI layout `oci:DIR[:TAG]`), its config (ENV,
//! WORKDIR, USER; the platform), and its layers unpacked to plain tars in scratch, each
//! checked against its digest and size while it is read and bounded when decompressed.
//! Applying the layers is [`super::tree`]'s work; making the result bootable is the
//! service's (`service/from_image.rs`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Uncompressed bytes of one layer at most.
pub const MAX_LAYER_BYTES: u64 = 64 << 30;
/// Layers of an image at most.
pub const MAX_LAYERS: usize = 128;
/// Bytes of a manifest, index or config at most.
pub const MAX_JSON_BYTES: u64 = 4 << 20;

/// Why a container image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Unusable(String),
    #[error("blob {digest} is corrupt: {reason}")]
    Corrupt { digest: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let context = context.into();
    move |source| ContainerError::Io { context, source }
}

/// Where a container image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]`.
    Registry(String),
    /// `oci:DIR[:TAG]`: an OCI image layout on this host (absolute path).
    Layout { dir: PathBuf, tag: Option<String> },
}

impl Source {
    pub fn parse(text: &str) -> Result<Self, ContainerError> {
        let Some(rest) = text.strip_prefix("oci:") else {
            return Ok(Self::Registry(text.to_owned()));
        };
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.contains('/') => (dir, Some(tag.to_owned())),
            _ => (rest, None),
        };
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(ContainerError::Unusable(format!(
                "{text}: the OCI layout directory must be an absolute path"
            )));
        }
        Ok(Self::Layout { dir, tag })
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type names; other media types are refused.
pub fn compression_of(media_type: &str) -> Result<Compression, ContainerError> {
    let known = [
        ("application/vnd.oci.image.layer.v1.tar", Compression::None),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            Compression::None,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            Compression::Gzip,
        ),
    ];
    known
        .iter()
        .find(|(m, _)| *m == media_type)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            ContainerError::Unusable(format!(
                "a layer of media type {media_type} (not a container image layer banger reads)"
            ))
        })
}

/// What `vm exec` keeps of an image config (`config.Env`, `config.WorkingDir`,
/// `config.User`), and the platform it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub os: String,
    pub architecture: String,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Parses an OCI/Docker image config and checks its platform is linux/amd64.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, ContainerError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
        #[serde(default)]
        config: Option<Run>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Run {
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
    }
    let file: File = serde_json::from_slice(bytes)
        .map_err(|e| ContainerError::Unusable(format!("its config is not an image config: {e}")))?;
    if file.os != "linux" || file.architecture != "amd64" {
        return Err(ContainerError::Unusable(format!(
            "it is a {}/{} image; banger's guests are linux/amd64",
            file.os, file.architecture
        )));
    }
    let run = file.config.unwrap_or_default();
    Ok(ImageConfig {
        os: file.os,
        architecture: file.architecture,
        env: run.env.unwrap_or_default(),
        working_dir: run.working_dir.filter(|w| !w.is_empty()),
        user: run.user.filter(|u| !u.is_empty()),
    })
}

/// A layer descriptor of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

/// An image manifest or an index.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// Checks a manifest's layer list (count, media types, digests).
pub fn check_layers(layers: &[Descriptor]) -> Result<(), ContainerError> {
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(ContainerError::Unusable(format!(
            "it has {} layers (1 to {MAX_LAYERS} are read)",
            layers.len()
        )));
    }
    for layer in layers {
        compression_of(&layer.media_type)?;
        sha256_hex(&layer.digest)?;
    }
    Ok(())
}

/// The hex of a `sha256:` digest; other algorithms are refused.
pub fn sha256_hex(digest: &str) -> Result<&str, ContainerError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ContainerError::Unusable(format!("digest {digest:?} is not sha256")))
}

/// Reads `reader` (a blob of `size` bytes with `digest`), hashing it, and writes it
/// decompressed to `dest` (at most [`MAX_LAYER_BYTES`]); blocking. A digest or size mismatch
/// removes `dest`.
pub fn unpack_blob(
    reader: impl Read,
    compression: Compression,
    digest: &str,
    size: u64,
    dest: &Path,
) -> Result<(), ContainerError> {
    let result = (move || -> Result<(), ContainerError> {
        let expected = sha256_hex(digest)?.to_owned();
        let corrupt = |reason: String| ContainerError::Corrupt {
            digest: digest.to_owned(),
            reason,
        };
        let mut hashing = HashingReader {
            inner: reader.take(size.saturating_add(1)),
            hasher: Sha256::new(),
            read: 0,
        };
        let out = std::fs::File::create(dest)
            .map_err(io_err(format!("cannot create {}", dest.display())))?;
        let mut out = LimitedWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, out),
            left: MAX_LAYER_BYTES,
        };
        let copied = match compression {
            Compression::None => std::io::copy(&mut hashing, &mut out),
            Compression::Gzip => std::io::copy(
                &mut flate2::read::MultiGzDecoder::new(&mut hashing),
                &mut out,
            ),
            Compression::Zstd => zstd::stream::read::Decoder::new(&mut hashing)
                .and_then(|mut d| std::io::copy(&mut d, &mut out)),
        };
        if let Err(e) = copied {
            return Err(corrupt(format!("cannot decompress: {e}")));
        }
        // Whatever the decompressor left unread still counts for the digest.
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|e| corrupt(format!("cannot read: {e}")))?;
        out.inner
            .flush()
            .map_err(io_err(format!("cannot write {}", dest.display())))?;
        if hashing.read != size {
            return Err(corrupt(format!(
                "{} bytes, the manifest says {size}",
                hashing.read
            )));
        }
        let got: String = hashing
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != expected {
            return Err(corrupt("digest mismatch".into()));
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

struct LimitedWriter<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for LimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other(format!(
                "a layer larger than {MAX_LAYER_BYTES} bytes uncompressed"
            )));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A blocking reader over chunks sent from async code.
#[derive(Debug)]
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    chunk: bytes::Bytes,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Self {
        Self {
            rx,
            chunk: bytes::Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// A container image in a local OCI layout, read (blocking): the manifest digest, the
/// config, and the layers unpacked into `scratch` (`layer-N.tar`, in order).
pub fn fetch_layout(
    dir: &Path,
    tag: Option<&str>,
    scratch: &Path,
) -> Result<(String, ImageConfig, Vec<PathBuf>), ContainerError> {
    let shown = dir.display().to_string();
    let blob = |digest: &str| -> Result<PathBuf, ContainerError> {
        Ok(dir.join("blobs/sha256").join(sha256_hex(digest)?))
    };
    let read_json = |path: &Path, digest: Option<&str>| -> Result<Vec<u8>, ContainerError> {
        let file =
            std::fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        if bytes.len() as u64 > MAX_JSON_BYTES {
            return Err(ContainerError::Unusable(format!(
                "{} is larger than {MAX_JSON_BYTES} bytes",
                path.display()
            )));
        }
        if let Some(digest) = digest
            && crate::image::oci::sha256_digest(&bytes) != digest
        {
            return Err(ContainerError::Corrupt {
                digest: digest.to_owned(),
                reason: "digest mismatch".into(),
            });
        }
        Ok(bytes)
    };
    let index: Manifest = serde_json::from_slice(&read_json(&dir.join("index.json"), None)?)
        .map_err(|e| ContainerError::Unusable(format!("{shown}/index.json: {e}")))?;
    let named = |d: &&Descriptor| {
        tag.is_none_or(|t| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .is_some_and(|n| n == t)
        })
    };
    let candidates: Vec<&Descriptor> = index.manifests.iter().filter(named).collect();
    let mut descriptor = match candidates.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(ContainerError::Unusable(format!(
                "{shown} holds no image tagged {}",
                tag.unwrap_or("(any)")
            )));
        }
        _ => {
            return Err(ContainerError::Unusable(format!(
                "{shown} holds several images: name one (oci:{shown}:TAG)"
            )));
        }
    };
    // An index in the layout: the linux/amd64 manifest of it.
    for _ in 0..4 {
        let bytes = read_json(&blob(&descriptor.digest)?, Some(&descriptor.digest))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            ContainerError::Unusable(format!("manifest {}: {e}", descriptor.digest))
        })?;
        let is_index = !manifest.manifests.is_empty()
            || manifest
                .media_type
                .as_deref()
                .is_some_and(|m| m.contains("index") || m.contains("list"));
        if is_index {
            descriptor = manifest
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .cloned()
                .ok_or_else(|| {
                    ContainerError::Unusable(format!("{shown} has no linux/amd64 image"))
                })?;
            continue;
        }
        let config_desc = manifest.config.ok_or_else(|| {
            ContainerError::Unusable(format!("{shown}: a manifest without config"))
        })?;
        let config = parse_config(&read_json(
            &blob(&config_desc.digest)?,
            Some(&config_desc.digest),
        )?)?;
        check_layers(&manifest.layers)?;
        let mut tars = Vec::new();
        for (i, layer) in manifest.layers.iter().enumerate() {
            let path = blob(&layer.digest)?;
            let file = std::fs::File::open(&path)
                .map_err(io_err(format!("cannot open {}", path.display())))?;
            let dest = scratch.join(format!("layer-{i}.tar"));
            unpack_blob(
                std::io::BufReader::new(file),
                compression_of(&layer.media_type)?,
                &layer.digest,
                layer.size,
                &dest,
            )?;
            tars.push(dest);
        }
        return Ok((descriptor.digest, config, tars));
    }
    Err(ContainerError::Unusable(format!(
        "{shown}: indexes nested too deep"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_media_types() {
        assert_eq!(
            Source::parse("127.0.0.1:5000/x/y:1").unwrap(),
            Source::Registry("127.0.0.1:5000/x/y:1".into())
        );
        assert_eq!(
            Source::parse("oci:/tmp/layout:v1").unwrap(),
            Source::Layout {
                dir: "/tmp/layout".into(),
                tag: Some("v1".into())
            }
        );
        assert!(Source::parse("oci:rel/dir").is_err());
        assert_eq!(
            compression_of("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Gzip
        );
        assert!(compression_of("application/vnd.banger.rootfs.v1.ext4+zstd").is_err());
    }

    #[test]
    fn configs_keep_env_workdir_user_and_refuse_other_platforms() {
        let config = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/bin:/usr/bin","A=b"],"WorkingDir":"/srv","User":"app"}}"#,
        )
        .unwrap();
        assert_eq!(config.env, ["PATH=/usr/local/bin:/usr/bin", "A=b"]);
        assert_eq!(config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(config.user.as_deref(), Some("app"));
        let arm = parse_config(br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(arm.to_string().contains("linux/arm64"), "{arm}");
    }

    #[test]
    fn blobs_are_checked_while_unpacked() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"layer bytes").unwrap();
        let blob = gz.finish().unwrap();
        let digest = crate::image::oci::sha256_digest(&blob);
        let dest = dir.path().join("l.tar");
        unpack_blob(
            &blob[..],
            Compression::Gzip,
            &digest,
            blob.len() as u64,
            &dest,
        )
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"layer bytes");
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            unpack_blob(
                &bad[..],
                Compression::Gzip,
                &digest,
                bad.len() as u64,
                &dest
            ),
            Err(ContainerError::Corrupt { .. })
        ));
        assert!(!dest.exists(), "a refused blob left its file");
        assert!(matches!(
            unpack_blob(&blob[..], Compression::Gzip, &digest, 3, &dest),
            Err(ContainerError::Corrupt { .. })
        ));
    }
}
