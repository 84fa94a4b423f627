//! Moving banger artifacts to and from an OCI registry (through `oci-client`): pulling a
//! manifest, streaming a zstd layer into a sparse file while its digest is checked, compressing
//! a file into a layer and pushing it. The blocking parts (zstd, hashing, file writes) run on
//! tokio's blocking pool; the async side only moves bytes.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use super::container::{self, ChannelReader, ContainerError};
use super::oci::{self, Layer, OciError};

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Format(#[from] OciError),
    #[error("registry: {0}")]
    Client(#[from] oci_client::errors::OciDistributionError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The bytes served do not match the digest the manifest names (or their stated size).
    #[error(
        "layer {digest} is corrupt: {reason}; nothing was stored (the registry serves bad data)"
    )]
    Corrupt { digest: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let context = context.into();
    move |source| RegistryError::Io { context, source }
}

/// Counters of one running push or pull, read by the progress endpoint.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes to move (compressed layer sizes), once known.
    pub total: AtomicU64,
    /// Bytes moved so far.
    pub done: AtomicU64,
    /// Blobs fetched from or sent to the registry.
    pub blobs: AtomicU64,
    /// Blobs skipped because they were present already.
    pub skipped: AtomicU64,
}

impl Progress {
    pub fn to_api(&self) -> banger_proto::TransferProgress {
        banger_proto::TransferProgress {
            running: true,
            total_bytes: self.total.load(Ordering::Relaxed),
            done_bytes: self.done.load(Ordering::Relaxed),
            blobs: self.blobs.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

/// A registry repository to talk to.
pub struct Remote {
    client: Client,
    reference: Reference,
    /// The reference as the user wrote it (for messages and records).
    shown: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("reference", &self.shown)
            .finish()
    }
}

/// Installs the TLS crypto provider once per process (reqwest is built without a default).
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Remote {
    /// Connects to the registry of `reference`: plain HTTP when `plain_http` (the caller
    /// decides: loopback or `--insecure`), else HTTPS; `credentials` for Basic or token auth.
    pub async fn new(
        reference: &str,
        plain_http: bool,
        credentials: Option<(String, String)>,
    ) -> Result<Self, RegistryError> {
        oci::check_reference(reference)?;
        let parsed: Reference = reference
            .parse()
            .map_err(|_| OciError::BadReference(reference.to_owned()))?;
        install_crypto_provider();
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            use_monolithic_push: true,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        };
        let client = Client::new(config);
        let auth = match credentials {
            Some((user, password)) => RegistryAuth::Basic(user, password),
            None => RegistryAuth::Anonymous,
        };
        client
            .store_auth_if_needed(parsed.resolve_registry(), &auth)
            .await;
        Ok(Self {
            client,
            reference: parsed,
            shown: reference.to_owned(),
        })
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The raw manifest and its digest.
    pub async fn manifest(&self) -> Result<(Vec<u8>, String), RegistryError> {
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(
                &self.reference,
                &RegistryAuth::Anonymous,
                &[oci::MANIFEST_MEDIA_TYPE],
            )
            .await?;
        if bytes.len() > oci::MAX_MANIFEST_BYTES {
            return Err(
                OciError::NotBanger(self.shown.clone(), "manifest too large".into()).into(),
            );
        }
        Ok((bytes.to_vec(), digest))
    }

    /// A small blob (the config), read whole and checked against `digest`.
    pub async fn small_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, RegistryError> {
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, digest)
            .await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| corrupt(digest, e))?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > max {
                return Err(RegistryError::Corrupt {
                    digest: digest.to_owned(),
                    reason: format!("larger than {max} bytes"),
                });
            }
        }
        if oci::sha256_digest(&out) != digest {
            return Err(RegistryError::Corrupt {
                digest: digest.to_owned(),
                reason: "digest mismatch".into(),
            });
        }
        Ok(out)
    }

    /// Streams `layer` into `dest` (created; sparse where the content is zero), decompressing
    /// on the blocking pool. The compressed bytes are checked against the layer digest while
    /// they stream (oci-client's verifying stream) and the uncompressed size against the
    /// manifest's. Returns banger's local digest of the content (sha256 over the length and
    /// the bytes, as [`super::sha256_files`]). On any error `dest` is removed.
    pub async fn pull_layer(
        &self,
        layer: &Layer,
        dest: &Path,
        progress: &Arc<Progress>,
    ) -> Result<String, RegistryError> {
        let result = self.pull_layer_inner(layer, dest, progress).await;
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
    }

    async fn pull_layer_inner(
        &self,
        layer: &Layer,
        dest: &Path,
        progress: &Arc<Progress>,
    ) -> Result<String, RegistryError> {
        let digest = layer.descriptor.digest.clone();
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, digest.as_str())
            .await?;
        progress.blobs.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
        let file = std::fs::File::create(dest)
            .map_err(io_err(format!("cannot create {}", dest.display())))?;
        let expected = layer.size;
        let writer_digest = digest.clone();
        let writer =
            tokio::task::spawn_blocking(move || write_layer(rx, file, expected, &writer_digest));
        let mut received = 0u64;
        let mut failure = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    received += chunk.len() as u64;
                    progress
                        .done
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if received > layer.descriptor.size {
                        failure = Some(RegistryError::Corrupt {
                            digest: digest.clone(),
                            reason: "more bytes than the manifest says".into(),
                        });
                        break;
                    }
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(corrupt(&digest, e));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| io_err("layer writer")(std::io::Error::other(e.to_string())))?;
        if let Some(failure) = failure {
            return Err(failure);
        }
        if received != layer.descriptor.size {
            return Err(RegistryError::Corrupt {
                digest,
                reason: format!(
                    "{received} bytes received, the manifest says {}",
                    layer.descriptor.size
                ),
            });
        }
        written
    }

    /// A container image's manifest (an index resolved to linux/amd64), as its layer
    /// descriptors, its digest and its config (checked against the manifest's digest).
    pub async fn container_manifest(
        &self,
    ) -> Result<(Vec<container::Descriptor>, String, Vec<u8>), RegistryError> {
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(&self.reference, &RegistryAuth::Anonymous)
            .await?;
        let config = config.into_bytes();
        if oci::sha256_digest(&config) != manifest.config.digest {
            return Err(ContainerError::Corrupt {
                digest: manifest.config.digest.clone(),
                reason: "config digest mismatch".into(),
            }
            .into());
        }
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                Ok(container::Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: u64::try_from(l.size).map_err(|_| {
                        ContainerError::Unusable(format!("layer {} has a negative size", l.digest))
                    })?,
                    platform: None,
                    annotations: Default::default(),
                })
            })
            .collect::<Result<Vec<_>, ContainerError>>()?;
        Ok((layers, digest, config))
    }

    /// Streams a container image layer into `dest`, decompressed, its digest and size
    /// checked while it streams (see [`container::unpack_blob`]).
    pub async fn container_layer(
        &self,
        layer: &container::Descriptor,
        dest: &Path,
        progress: &Arc<Progress>,
    ) -> Result<(), RegistryError> {
        let compression = container::compression_of(&layer.media_type)?;
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, layer.digest.as_str())
            .await?;
        progress.blobs.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
        let (digest, size, out) = (layer.digest.clone(), layer.size, dest.to_owned());
        let worker = tokio::task::spawn_blocking(move || {
            container::unpack_blob(ChannelReader::new(rx), compression, &digest, size, &out)
        });
        let mut failure = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    progress
                        .done
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(corrupt(&layer.digest, e));
                    break;
                }
            }
        }
        drop(tx);
        let unpacked = worker
            .await
            .map_err(|e| io_err("layer writer")(std::io::Error::other(e.to_string())))?;
        if let Some(failure) = failure {
            let _ = std::fs::remove_file(dest);
            return Err(failure);
        }
        Ok(unpacked?)
    }

    /// Whether the registry has the blob `digest` in this repository.
    pub async fn has_blob(&self, digest: &str) -> Result<bool, RegistryError> {
        Ok(self.client.blob_exists(&self.reference, digest).await?)
    }

    /// Uploads the compressed layer file `path` as blob `digest` (one streamed PUT).
    pub async fn push_file(
        &self,
        path: &Path,
        digest: &str,
        size: u64,
        progress: &Arc<Progress>,
    ) -> Result<(), RegistryError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        let counter = Arc::clone(progress);
        let stream = futures_util::stream::unfold(file, move |mut file| {
            let counter = Arc::clone(&counter);
            async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 4 << 20];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        counter.done.fetch_add(n as u64, Ordering::Relaxed);
                        Some((Ok(bytes::Bytes::from(buf)), file))
                    }
                    Err(e) => Some((
                        Err(oci_client::errors::OciDistributionError::IoError(e)),
                        file,
                    )),
                }
            }
        });
        self.client
            .push_blob_stream(&self.reference, stream, digest, Some(size))
            .await?;
        progress.blobs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Uploads a small blob held in memory.
    pub async fn push_bytes(&self, bytes: Vec<u8>, digest: &str) -> Result<(), RegistryError> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        self.client
            .push_blob(&self.reference, bytes, digest)
            .await?;
        Ok(())
    }

    /// Uploads the manifest under the reference's tag; returns its digest.
    pub async fn push_manifest(&self, manifest: &oci::Manifest) -> Result<String, RegistryError> {
        let body = serde_json::to_vec(manifest)
            .map_err(|e| io_err("manifest")(std::io::Error::other(e)))?;
        let digest = oci::sha256_digest(&body);
        let content_type = http::HeaderValue::from_static(oci::MANIFEST_MEDIA_TYPE);
        self.client
            .push_manifest_raw(&self.reference, body, content_type)
            .await?;
        Ok(digest)
    }
}

fn corrupt(digest: &str, error: std::io::Error) -> RegistryError {
    let text = error.to_string();
    if text.contains("digest") || text.contains("Digest") {
        RegistryError::Corrupt {
            digest: digest.to_owned(),
            reason: text,
        }
    } else {
        io_err(format!("reading layer {digest}"))(error)
    }
}

/// The blocking half of a layer pull: decompress what arrives on `rx` into `file`, sparse,
/// hashing the uncompressed bytes (prefixed by `expected`, banger's local digest scheme).
fn write_layer(
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    file: std::fs::File,
    expected: u64,
    digest: &str,
) -> Result<String, RegistryError> {
    let mut hasher = Sha256::new();
    hasher.update(expected.to_le_bytes());
    let sink = SparseWriter::new(file, hasher, expected);
    let mut decoder =
        zstd::stream::write::Decoder::new(sink).map_err(io_err("cannot start the zstd decoder"))?;
    let bad = |e: std::io::Error| RegistryError::Corrupt {
        digest: digest.to_owned(),
        reason: format!("cannot decompress: {e}"),
    };
    while let Some(chunk) = rx.blocking_recv() {
        decoder.write_all(&chunk).map_err(bad)?;
    }
    decoder.flush().map_err(bad)?;
    let sink = decoder.into_inner();
    let (hasher, written) = sink.finish().map_err(bad)?;
    if written != expected {
        return Err(RegistryError::Corrupt {
            digest: digest.to_owned(),
            reason: format!("{written} bytes uncompressed, the manifest says {expected}"),
        });
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const SPARSE_BLOCK: usize = 64 * 1024;

/// A writer that hashes everything and writes whole zero blocks as holes (seeks), so a
/// pulled disk image stays as sparse as the one pushed. Refuses to grow past `limit`.
struct SparseWriter {
    file: std::fs::File,
    hasher: Sha256,
    buf: Vec<u8>,
    written: u64,
    limit: u64,
}

impl SparseWriter {
    fn new(file: std::fs::File, hasher: Sha256, limit: u64) -> Self {
        Self {
            file,
            hasher,
            buf: Vec::with_capacity(SPARSE_BLOCK),
            written: 0,
            limit,
        }
    }

    fn flush_block(&mut self) -> std::io::Result<()> {
        if self.buf.iter().all(|b| *b == 0) {
            self.file
                .seek(SeekFrom::Current(self.buf.len() as i64))
                .map(|_| ())?;
        } else {
            self.file.write_all(&self.buf)?;
        }
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered, sets the final length (a trailing hole), syncs.
    fn finish(mut self) -> std::io::Result<(Sha256, u64)> {
        self.flush_block()?;
        self.file.set_len(self.written)?;
        self.file.sync_all()?;
        Ok((self.hasher, self.written))
    }
}

impl Write for SparseWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written + data.len() as u64 > self.limit {
            return Err(std::io::Error::other(
                "more uncompressed bytes than the manifest says",
            ));
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let take = (SPARSE_BLOCK - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == SPARSE_BLOCK {
                self.flush_block()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compressed layer written by [`compress`].
#[derive(Debug, Clone)]
pub struct Compressed {
    pub path: PathBuf,
    /// `sha256:<hex>` of the compressed bytes.
    pub digest: String,
    pub size: u64,
    /// Uncompressed size.
    pub source_size: u64,
}

/// Compresses `source` with zstd into `dest` (blocking; run it on the blocking pool),
/// hashing the output.
pub fn compress(source: &Path, dest: &Path) -> Result<Compressed, RegistryError> {
    struct HashingWriter<W> {
        inner: W,
        hasher: Sha256,
        size: u64,
    }
    impl<W: Write> Write for HashingWriter<W> {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(data)?;
            self.hasher.update(&data[..n]);
            self.size += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let mut input =
        std::fs::File::open(source).map_err(io_err(format!("cannot open {}", source.display())))?;
    let source_size = input
        .metadata()
        .map_err(io_err(format!("cannot stat {}", source.display())))?
        .len();
    let output =
        std::fs::File::create(dest).map_err(io_err(format!("cannot create {}", dest.display())))?;
    let sink = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, output),
        hasher: Sha256::new(),
        size: 0,
    };
    let write_err = io_err(format!("cannot compress {}", source.display()));
    let mut encoder = zstd::stream::write::Encoder::new(sink, 3).map_err(io_err("zstd"))?;
    let mut buf = vec![0u8; 1 << 20];
    let result = (|| -> std::io::Result<HashingWriter<_>> {
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            encoder.write_all(&buf[..n])?;
        }
        let mut sink = encoder.finish()?;
        sink.flush()?;
        Ok(sink)
    })();
    let sink = result.map_err(write_err)?;
    Ok(Compressed {
        path: dest.to_owned(),
        digest: format!("sha256:{}", hex(&sink.hasher.finalize())),
        size: sink.size,
        source_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_then_sparse_decompress_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("disk");
        let mut data = vec![0u8; 3 * SPARSE_BLOCK + 100];
        data[SPARSE_BLOCK + 7] = 42;
        data[3 * SPARSE_BLOCK + 99] = 1;
        std::fs::write(&source, &data).unwrap();
        let compressed = compress(&source, &dir.path().join("disk.zst")).unwrap();
        assert_eq!(compressed.source_size, data.len() as u64);
        let bytes = std::fs::read(&compressed.path).unwrap();
        assert_eq!(oci::sha256_digest(&bytes), compressed.digest);

        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(bytes::Bytes::from(bytes.clone())).unwrap();
        drop(tx);
        let out = dir.path().join("out");
        let file = std::fs::File::create(&out).unwrap();
        let local = write_layer(rx, file, data.len() as u64, "d").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(
            local,
            super::super::sha256_files(&[source.as_path()]).unwrap()
        );

        // A wrong uncompressed size is refused.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(bytes::Bytes::from(bytes)).unwrap();
        drop(tx);
        let file = std::fs::File::create(&out).unwrap();
        assert!(matches!(
            write_layer(rx, file, 10, "d"),
            Err(RegistryError::Corrupt { .. })
        ));
    }
}
