//! The daemon client: HTTP/1.1 over the Unix socket, the op_id header, and autostart of
//! `bangerd` when nothing answers (unless `BANGER_NO_AUTOSTART=1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use banger_proto::{ApiError, ErrorBody, ErrorCode, OP_ID_HEADER};
use banger_shared::layout::Layout;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// How long a freshly spawned daemon may take to answer.
const AUTOSTART_DEADLINE: Duration = Duration::from_secs(20);

/// A failure talking to the daemon, classified for the exit code.
#[derive(Debug)]
pub enum ClientError {
    /// No daemon answers on the socket (exit 3).
    Unreachable(String),
    /// The daemon answered with an error body.
    Api(ApiError),
    /// Anything else (exit 1).
    Other(anyhow::Error),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(m) => f.write_str(m),
            Self::Api(e) => write!(f, "{e}"),
            Self::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The CLI exit code (see docs/cli.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Unreachable(_) => 3,
            Self::Api(e) => e.code.exit_code(),
            Self::Other(_) => 1,
        }
    }
}

impl From<anyhow::Error> for ClientError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// A connection target plus the op_id of this CLI invocation.
#[derive(Debug, Clone)]
pub struct Client {
    layout: Layout,
    op_id: String,
}

impl Client {
    pub fn new(layout: Layout, op_id: String) -> Self {
        Self { layout, op_id }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Sends a request, starting the daemon first when none answers (and autostart is on).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).context("cannot encode request")?),
            None => None,
        };
        let stream = self.connect_or_start().await?;
        let (status, bytes) = self.send(stream, method, path, body).await?;
        decode(status, &bytes)
    }

    /// Sends a request only if a daemon already answers; `Ok(None)` when none does.
    pub async fn call_if_running<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<Option<T>, ClientError> {
        let Ok(stream) = UnixStream::connect(self.layout.socket()).await else {
            return Ok(None);
        };
        let (status, bytes) = self.send(stream, method, path, None).await?;
        decode(status, &bytes).map(Some)
    }

    async fn send(
        &self,
        stream: UnixStream,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the daemon failed")?;
        let driver = tokio::spawn(connection);
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://bangerd{path}"))
            .header("host", "bangerd")
            .header(OP_ID_HEADER, &self.op_id);
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("cannot build request")?;
        let response = sender
            .send_request(request)
            .await
            .context("the daemon closed the connection")?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("cannot read the daemon's answer")?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    /// Connects to the socket, starting `bangerd` when nothing answers.
    async fn connect_or_start(&self) -> Result<UnixStream, ClientError> {
        let socket = self.layout.socket();
        if let Ok(stream) = UnixStream::connect(&socket).await {
            return Ok(stream);
        }
        if std::env::var_os("BANGER_NO_AUTOSTART").is_some_and(|v| !v.is_empty() && v != "0") {
            return Err(ClientError::Unreachable(format!(
                "no daemon answers on {}; hint: start it with `banger daemon start` or unset BANGER_NO_AUTOSTART",
                socket.display()
            )));
        }
        self.start_daemon().await?;
        UnixStream::connect(&socket).await.map_err(|e| {
            ClientError::Unreachable(format!("cannot connect to {}: {e}", socket.display()))
        })
    }

    /// Spawns a detached `bangerd` and waits until its socket accepts connections. Racing
    /// CLIs may each spawn one: the daemon's lock lets exactly one of them serve.
    pub async fn start_daemon(&self) -> Result<(), ClientError> {
        let logs = self.layout.logs_dir();
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let stderr_path = self.layout.daemon_stderr();
        let stderr = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .with_context(|| format!("cannot open {}", stderr_path.display()))?;
        let binary = daemon_binary();
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(&binary)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .env("BANGER_DAEMON_DETACHED", "1")
                // Its own process group: a Ctrl-C in this terminal must not reach the daemon.
                .process_group(0)
                .spawn()
                .map_err(|e| {
                    ClientError::Unreachable(format!(
                        "cannot start the daemon {}: {e}; hint: install bangerd next to banger or set BANGER_DAEMON_BIN",
                        binary.display()
                    ))
                })?
        };
        let deadline = Instant::now() + AUTOSTART_DEADLINE;
        let socket = self.layout.socket();
        let mut exited_ok = false;
        loop {
            if UnixStream::connect(&socket).await.is_ok() {
                return Ok(());
            }
            if !exited_ok && let Ok(Some(status)) = child.try_wait() {
                if !status.success() {
                    return Err(ClientError::Unreachable(format!(
                        "the daemon exited at start ({status}): {}; hint: see {}",
                        last_line(&stderr_path),
                        self.layout.daemon_log().display()
                    )));
                }
                // It lost the start race to another daemon, which will answer shortly.
                exited_ok = true;
            }
            if Instant::now() > deadline {
                return Err(ClientError::Unreachable(format!(
                    "the daemon did not answer on {} within {}s; hint: see {}",
                    socket.display(),
                    AUTOSTART_DEADLINE.as_secs(),
                    self.layout.daemon_log().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `$BANGER_DAEMON_BIN`, else `bangerd` beside this executable, else `bangerd` on PATH.
fn daemon_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BANGER_DAEMON_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("bangerd")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("bangerd"))
}

fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no output".into())
}

/// Turns a response into `T`, or its error body into [`ClientError::Api`].
fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, ClientError> {
    if status.is_success() {
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { bytes };
        return serde_json::from_slice(bytes)
            .with_context(|| format!("the daemon's answer ({status}) is not what this CLI expects"))
            .map_err(ClientError::Other);
    }
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => Err(ClientError::Api(body.error)),
        Err(_) => Err(ClientError::Api(ApiError::new(
            ErrorCode::Internal,
            format!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(bytes).trim()
            ),
        ))),
    }
}
