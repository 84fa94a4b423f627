//! A real OCI registry for tests: Debian's `docker-registry`, started on a free 127.0.0.1 port
//! with its own config and storage (and an access log the tests count requests in).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::poll;

/// A `docker-registry` on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the registry, or `None` (with a SKIP line) when the package is not installed.
    pub fn start() -> Option<Self> {
        let binary = Path::new("/usr/bin/docker-registry");
        if !binary.is_file() {
            banger_shared::skip::report(
                "registry tests",
                "docker-registry is not installed (scripts/install-deps)",
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::Builder::new()
            .prefix("registry")
            .tempdir_in("/var/tmp")
            .unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let registry = Self { child, port, dir };
        poll(Duration::from_secs(30), "the registry answering", || {
            (registry.get("/v2/") == Some(200)).then_some(())
        });
        Some(registry)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Status of a plain GET.
    pub fn get(&self, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Blob GETs served so far (the access log's request lines).
    pub fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    /// Manifest GETs served so far.
    pub fn manifest_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/manifests/"))
            .count()
    }

    /// The stored data file of blob `digest` (`sha256:<hex>`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The digests of the layers of manifest `repo:tag` (read from the registry's storage).
    pub fn layer_digests(&self, repo: &str) -> Vec<String> {
        let layers = self
            .dir
            .path()
            .join("storage/docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256");
        std::fs::read_dir(layers)
            .unwrap()
            .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
