//! The Firecracker backend: `firecracker --api-sock <vm runtime dir>/fc.sock --id <vm id>`
//! spawned in its own process group (it outlives the daemon; the serial console is its
//! stdout, sent to the console log), then configured over its HTTP API: logger, metrics,
//! machine config, boot source, the two raw drives, the tap NIC, entropy, `InstanceStart`.
//! Stop is `SendCtrlAltDel` (the guest kernel needs i8042; `reboot=k` makes the guest's
//! reset end the process); pause/resume is `PATCH /vm`; snapshots are `PUT /snapshot/create`
//! and `/snapshot/load`.
//!
//! With `firecracker.jailer` set, the process is started by Firecracker's jailer instead,
//! through the root helper ([`HelperOp::SpawnJailed`]): the kernel, disks and console log
//! are placed in the jail under fixed names, every path sent to the API is the in-jail one,
//! and `<vm runtime dir>/fc.sock` is a symlink to the API socket inside the jail, so stop,
//! pause and reattach work the same. The jail is removed through the helper when the VM
//! stops or the launch fails ([`Hypervisor::remove_jail`]).
//!
//! [`ApiClient`] speaks HTTP/1.1 on the Unix socket (hyper), one connection per request, each
//! bounded by a timeout; Firecracker's `fault_message` becomes the error text.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::helper::{self, HelperOp, JailFiles};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::{
    Capabilities, DiskRefusal, Hypervisor, LaunchSpec, Snapshot, VmProcess, VmmError, process,
};
use crate::domain::{SystemDiskStrategy, VmmKind};
use crate::host::HostOps;
use crate::layout::{VM_FIRECRACKER_LOG, VM_FIRECRACKER_STDERR, vm_runtime};

/// Oldest Firecracker whose API matches what banger sends (`mem_backend` on snapshot load,
/// `/entropy`, the drive `io_engine` field).
pub const MIN_VERSION: (u32, u32, u32) = (1, 5, 0);
/// Boot arguments Firecracker's docs recommend: `reboot=k` + `panic=1` so a guest reboot or
/// panic ends the process; the i8042 ones skip probing for devices Firecracker does not have
/// (tens of ms) while keeping the keyboard controller that `SendCtrlAltDel` needs.
pub const BOOT_ARGS: &str = super::NO_ACPI_BOOT_ARGS;
/// Bound on one API request.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the API socket appearing after spawn.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// Firecracker's log settings after `--log-path`: levels shown, so its reason for exiting
/// (an ERROR line) can be told from its startup lines.
pub const LOG_ARGS: [&str; 3] = ["--level", "Info", "--show-level"];
/// How the daemon notes, in Firecracker's stderr file, the exit status of a Firecracker it
/// reaped (a signal leaves nothing in its log).
const EXIT_NOTE: &str = "[banger] firecracker ended: ";

/// An HTTP/1.1 client for Firecracker's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: API_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn control_err(&self, message: impl Into<String>) -> VmmError {
        VmmError::Control {
            path: self.socket.display().to_string(),
            message: message.into(),
        }
    }

    /// Sends one request; a 2xx answer returns its JSON body (if any), anything else an
    /// error carrying Firecracker's `fault_message`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VmmError> {
        tokio::time::timeout(self.timeout, self.call_inner(method, path, body))
            .await
            .map_err(|_| {
                self.control_err(format!(
                    "{method} {path}: no answer within {}s",
                    self.timeout.as_secs()
                ))
            })?
    }

    async fn call_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VmmError> {
        let fail = |e: &dyn std::fmt::Display| self.control_err(format!("{method} {path}: {e}"));
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| fail(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(&e))?;
        let driver = tokio::spawn(connection);
        let bytes = body.map(Value::to_string).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| fail(&e))?;
        let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
        let status = response.status();
        let data = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(&e))?
            .to_bytes();
        drop(sender);
        let _ = driver.await;
        let value: Option<Value> = serde_json::from_slice(&data).ok();
        if status.is_success() {
            return Ok(value);
        }
        let fault = value
            .as_ref()
            .and_then(|v| v.get("fault_message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&data).trim().to_owned());
        Err(VmmError::Api {
            request: format!("{method} {path}"),
            status: status.as_u16(),
            fault,
        })
    }
}

/// A parsed `firecracker --version`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let word = text.split_whitespace().find_map(|w| {
        w.strip_prefix('v')
            .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
    })?;
    let core = word.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// `name` as an absolute path: itself when it has a `/`, else the first executable file of
/// that name on PATH.
pub fn resolve_binary(name: &Path) -> Option<PathBuf> {
    crate::which::which(name)?.canonicalize().ok()
}

/// Running Firecracker through its jailer, which the root helper starts.
#[derive(Debug, Clone)]
pub struct Jailer {
    /// `firecracker.jailer` as configured (a path, or a name looked up on PATH).
    pub binary: PathBuf,
    pub host: Arc<dyn HostOps>,
}

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    binary: PathBuf,
    extra_args: Vec<String>,
    jailer: Option<Jailer>,
}

impl Firecracker {
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            extra_args: Vec::new(),
            jailer: None,
        }
    }

    /// Starts VMs through Firecracker's jailer (`firecracker.jailer`).
    pub fn with_jailer(mut self, jailer: Jailer) -> Self {
        self.jailer = Some(jailer);
        self
    }

    /// The jailer's resolved path when one is configured: `None` when not asked for, an
    /// error naming the fix when asked for and missing.
    pub fn jailer_path(&self) -> Result<Option<PathBuf>, VmmError> {
        let Some(jailer) = &self.jailer else {
            return Ok(None);
        };
        resolve_binary(&jailer.binary)
            .map(Some)
            .ok_or_else(|| VmmError::MissingJailer(jailer.binary.display().to_string()))
    }

    /// Arguments passed before banger's own (tests point a wrapper at the fake this way).
    pub fn with_extra_args(mut self, args: Vec<String>) -> Self {
        self.extra_args = args;
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `firecracker --version`, parsed and checked against [`MIN_VERSION`].
    pub async fn version(&self) -> Result<(u32, u32, u32), VmmError> {
        let shown = self.binary.display().to_string();
        let output = tokio::process::Command::new(&self.binary)
            .args(&self.extra_args)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(VmmError::spawn(&shown))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let version = parse_version(&text).ok_or_else(|| VmmError::LaunchFailed {
            binary: shown.clone(),
            message: format!("cannot read a version from `--version`: {:?}", text.trim()),
        })?;
        if version < MIN_VERSION {
            return Err(VmmError::TooOld {
                binary: shown,
                found: format!("{}.{}.{}", version.0, version.1, version.2),
                minimum: format!("{}.{}.{}", MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2),
            });
        }
        Ok(version)
    }

    /// The API requests that configure and boot `spec`, in order (pure; tests read it).
    pub fn boot_requests(spec: &LaunchSpec, tap: &str) -> Vec<(&'static str, String, Value)> {
        let mut boot = json!({
            "kernel_image_path": spec.kernel.display().to_string(),
            "boot_args": spec.cmdline,
        });
        if let Some(initrd) = &spec.initrd {
            boot["initrd_path"] = json!(initrd.display().to_string());
        }
        let drive = |id: &str, path: &Path| {
            json!({
                "drive_id": id,
                "path_on_host": path.display().to_string(),
                // The kernel command line names root=/dev/vda; drive order gives vda, vdb.
                "is_root_device": false,
                "is_read_only": false,
                "cache_type": "Unsafe",
                "io_engine": "Sync",
            })
        };
        vec![
            (
                "PUT",
                "/machine-config".into(),
                json!({ "vcpu_count": spec.cpus, "mem_size_mib": spec.memory_mib, "smt": false }),
            ),
            ("PUT", "/boot-source".into(), boot),
            ("PUT", "/drives/sys".into(), drive("sys", &spec.system_disk)),
            ("PUT", "/drives/work".into(), drive("work", &spec.work_disk)),
            (
                "PUT",
                "/network-interfaces/eth0".into(),
                json!({ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": spec.mac }),
            ),
            ("PUT", "/entropy".into(), json!({})),
            (
                "PUT",
                "/actions".into(),
                json!({ "action_type": "InstanceStart" }),
            ),
        ]
    }

    /// Spawns the process (its log going to [`VM_FIRECRACKER_LOG`] from the first line),
    /// waits for its socket and sets up metrics. On error the process is killed.
    async fn spawn(&self, spec: &LaunchSpec) -> Result<(VmProcess, ApiClient), VmmError> {
        if let Some(jailer) = self.jailer_path()? {
            return self.spawn_jailed(spec, jailer).await;
        }
        let shown = self.binary.display().to_string();
        let io_err = |context: String| move |source| VmmError::Io { context, source };
        let socket = api_socket(&spec.runtime_dir);
        let _ = std::fs::remove_file(&socket);
        // Firecracker opens (never creates) its log and metrics files; the log starts empty at
        // each boot and outlives the runtime dir (see `exit_reason`).
        let log = vm_file(spec, VM_FIRECRACKER_LOG);
        let metrics = spec.runtime_dir.join(vm_runtime::FIRECRACKER_METRICS);
        for file in [&log, &metrics] {
            std::fs::File::create(file)
                .map_err(io_err(format!("cannot create {}", file.display())))?;
        }
        // Appending, so the daemon can cut it to its cap (see service::console_cap).
        let console = std::fs::File::create(&spec.console_log)
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&spec.console_log)
            })
            .map_err(io_err(format!(
                "cannot create {}",
                spec.console_log.display()
            )))?;
        let stderr_path = vm_file(spec, VM_FIRECRACKER_STDERR);
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(io_err(format!("cannot create {}", stderr_path.display())))?;
        let mut child = tokio::process::Command::new(&self.binary)
            .args(&self.extra_args)
            .arg("--api-sock")
            .arg(&socket)
            .arg("--id")
            .arg(&spec.vm_id)
            .arg("--log-path")
            .arg(&log)
            .args(LOG_ARGS)
            // Its own process group: the daemon's signals and exit never reach it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr)
            .spawn()
            .map_err(VmmError::spawn(&shown))?;
        let pid = child.id().ok_or_else(|| VmmError::LaunchFailed {
            binary: shown.clone(),
            message: "exited at once".into(),
        })?;
        let deadline = Instant::now() + SOCKET_WAIT;
        loop {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let message = exit_reason_in(&log, &stderr_path)
                    .unwrap_or_else(|| format!("Firecracker exited ({status})"));
                return Err(VmmError::LaunchFailed {
                    binary: shown,
                    message,
                });
            }
            if Instant::now() >= deadline {
                process::kill(pid, &spec.vm_id).await;
                return Err(VmmError::LaunchFailed {
                    binary: shown,
                    message: format!(
                        "no API socket {} within {}s",
                        socket.display(),
                        SOCKET_WAIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Reap it when it exits while this daemon lives, noting how it ended where its log
        // cannot (a signal); after a daemon restart init reaps it.
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let note = format!("{EXIT_NOTE}{status}\n");
                let appended = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&stderr_path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, note.as_bytes()));
                if let Err(e) = appended {
                    tracing::debug!("cannot note Firecracker's exit: {e}");
                }
            }
        });
        let process = VmProcess {
            pid,
            control_socket: socket.clone(),
            jail: None,
        };
        let client = ApiClient::new(&socket);
        let setup = client
            .call(
                "PUT",
                "/metrics",
                Some(&json!({ "metrics_path": metrics.display().to_string() })),
            )
            .await;
        if let Err(e) = setup {
            let e = died(e, &process, spec);
            process::kill(pid, &spec.vm_id).await;
            return Err(e);
        }
        Ok((process, client))
    }
}

impl Firecracker {
    /// Kills a spawned process and removes its jail, if any.
    async fn undo_spawn(&self, process: &VmProcess, vm_id: &str) {
        process::kill(process.pid, vm_id).await;
        if process.jail.is_some() {
            let this = self.clone();
            let (op_id, id) = (crate::net::current_op_id(), vm_id.to_owned());
            let removed = tokio::task::spawn_blocking(move || this.remove_jail(&op_id, &id)).await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(vm_id, "{e}");
            }
        }
    }

    /// Spawns through the jailer (the helper runs it as root), links the runtime dir's API
    /// socket to the jail's and configures logger, metrics and the serial console with
    /// in-jail paths. On error nothing is left: process killed, jail removed.
    async fn spawn_jailed(
        &self,
        spec: &LaunchSpec,
        jailer: PathBuf,
    ) -> Result<(VmProcess, ApiClient), VmmError> {
        let io_err = |context: String| move |source| VmmError::Io { context, source };
        let Some(host) = self.jailer.as_ref().map(|j| j.host.clone()) else {
            return Err(VmmError::Unsupported(
                "run the jailer without the root helper",
            ));
        };
        // The jailer and Firecracker binaries are the helper's own configuration (a request
        // never names what root runs); `jailer` here only names the start in errors.
        // The console log and Firecracker's log must exist to be placed in the jail; the log
        // stays in the VM's data dir when the jail goes.
        let log = vm_file(spec, VM_FIRECRACKER_LOG);
        for file in [&spec.console_log, &log] {
            std::fs::File::create(file)
                .map_err(io_err(format!("cannot create {}", file.display())))?;
        }
        let text = |p: &Path| p.display().to_string();
        let (vm_id, cpus, memory_mib) = (spec.vm_id.clone(), spec.cpus, spec.memory_mib);
        let files = JailFiles {
            kernel: text(&spec.kernel),
            initrd: spec.initrd.as_deref().map(text),
            system_disk: text(&spec.system_disk),
            work_disk: text(&spec.work_disk),
            console_log: text(&spec.console_log),
            log: Some(text(&log)),
        };
        let op_id = crate::net::current_op_id();
        let (pid, root) = tokio::task::spawn_blocking(move || {
            host.spawn_jailed(&op_id, &vm_id, files, cpus, memory_mib)
        })
        .await
        .map_err(|e| VmmError::LaunchFailed {
            binary: text(&jailer),
            message: format!("helper call panicked: {e}"),
        })?
        .map_err(|e| VmmError::LaunchFailed {
            binary: text(&jailer),
            message: e.to_string(),
        })?;
        let process = VmProcess {
            pid,
            control_socket: api_socket(&spec.runtime_dir),
            jail: Some(root.clone()),
        };
        let setup = async {
            let socket = api_socket(&spec.runtime_dir);
            let _ = std::fs::remove_file(&socket);
            let target = root.join(helper::JAIL_API_SOCKET.trim_start_matches('/'));
            std::os::unix::fs::symlink(&target, &socket)
                .map_err(io_err(format!("cannot link {}", socket.display())))?;
            let client = ApiClient::new(&socket);
            // The helper started it with `--log-path` (JAIL_LOG, the VM's own log file).
            for (path, body) in [
                ("/metrics", json!({ "metrics_path": helper::JAIL_METRICS })),
                (
                    "/serial",
                    json!({ "serial_out_path": helper::JAIL_CONSOLE }),
                ),
            ] {
                client.call("PUT", path, Some(&body)).await?;
            }
            Ok::<_, VmmError>(client)
        };
        match setup.await {
            Ok(client) => Ok((process, client)),
            Err(e) => {
                let e = died(e, &process, spec);
                self.undo_spawn(&process, &spec.vm_id).await;
                Err(e)
            }
        }
    }
}

/// `spec` with the in-jail paths the helper placed the files at.
pub fn jailed_spec(spec: &LaunchSpec) -> LaunchSpec {
    let mut jailed = spec.clone();
    jailed.kernel = helper::JAIL_KERNEL.into();
    jailed.initrd = spec.initrd.as_ref().map(|_| helper::JAIL_INITRD.into());
    jailed.system_disk = helper::JAIL_SYSTEM_DISK.into();
    jailed.work_disk = helper::JAIL_WORK_DISK.into();
    jailed
}

/// The API socket in a VM's runtime dir.
pub fn api_socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(vm_runtime::FIRECRACKER_API_SOCKET)
}

/// A file beside the console log: in the VM's data dir, which outlives the runtime dir.
fn vm_file(spec: &LaunchSpec, name: &str) -> PathBuf {
    spec.console_log.with_file_name(name)
}

/// `error` of a request to a Firecracker that is gone by now: the reason it gave instead of
/// (or after) a broken connection.
fn died(error: VmmError, process: &VmProcess, spec: &LaunchSpec) -> VmmError {
    if process::is_alive(process.pid, &spec.vm_id) {
        return error;
    }
    let log = vm_file(spec, VM_FIRECRACKER_LOG);
    let stderr = vm_file(spec, VM_FIRECRACKER_STDERR);
    match exit_reason_in(&log, &stderr) {
        Some(reason) => VmmError::LaunchFailed {
            binary: "firecracker".into(),
            message: format!("{reason} (while banger sent: {error})"),
        },
        None => error,
    }
}

/// How much of the end of Firecracker's log and stderr is read for its exit reason.
const REASON_TAIL: u64 = 64 << 10;

/// The last [`REASON_TAIL`] bytes of `path` as text, without the NULs of a log the daemon
/// cut while Firecracker kept writing at its own offset (see `console_cap`). Empty when
/// missing.
pub fn read_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut data = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(REASON_TAIL)))
        .is_err()
        || file.take(REASON_TAIL).read_to_end(&mut data).is_err()
    {
        return String::new();
    }
    data.retain(|b| *b != 0);
    String::from_utf8_lossy(&data).into_owned()
}

/// [`exit_reason`] of the log and stderr files (blocking, small reads).
pub fn exit_reason_in(log: &Path, stderr: &Path) -> Option<String> {
    exit_reason(&read_tail(log), &read_tail(stderr))
}

/// Why Firecracker exited, in its own words, from its log (`--show-level` lines:
/// `<time> [<id>:<thread>:<LEVEL>] <message>`) and its stderr; `None` when neither says.
///
/// The reason is the last ERROR line that is not one of the generic closing lines
/// ("Firecracker exiting with error", "RunWithApiError ...") nor a refused API request (those
/// reach the caller with the request), with the exit code when the log has it. A clean exit
/// (code 0, no error) is the guest resetting the machine: with `reboot=k` a reboot, or a panic
/// with `panic=1`. Else stderr's last line (a Rust panic), else how the daemon saw it end (a
/// signal, noted by the reaper).
pub fn exit_reason(log: &str, stderr: &str) -> Option<String> {
    let mut errors = Vec::new();
    let mut exit_code = None;
    for line in log.lines() {
        let Some((level, message)) = log_line(line) else {
            continue;
        };
        if let Some(code) = message.split("exit_code=").nth(1) {
            exit_code = code.trim().parse::<i32>().ok();
        }
        if level == "ERROR" && !message.starts_with("Received Error. Status code") {
            errors.push(message);
        }
    }
    let generic =
        |m: &&str| m.starts_with("Firecracker exiting") || m.starts_with("RunWithApiError");
    let chosen = errors
        .iter()
        .rev()
        .find(|m| !generic(m))
        .or_else(|| {
            errors
                .iter()
                .rev()
                .find(|m| m.starts_with("RunWithApiError"))
        })
        .map(|m| m.trim_start_matches("RunWithApiError error: ").to_owned());
    let code = |text: String| match exit_code {
        Some(code) => format!("{text} (exit code {code})"),
        None => text,
    };
    if let Some(reason) = chosen {
        return Some(code(format!("Firecracker: {reason}")));
    }
    let stderr_lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note:"))
        .collect();
    let own = stderr_lines
        .iter()
        .rev()
        .find(|l| !l.starts_with(EXIT_NOTE.trim_end()))
        .copied();
    if let Some(line) = own {
        return Some(code(format!("Firecracker: {line}")));
    }
    if exit_code == Some(0) {
        return Some(
            "Firecracker exited normally: the guest reset the machine (a reboot, or a panic with panic=1)"
                .into(),
        );
    }
    stderr_lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(EXIT_NOTE.trim_end()))
        .map(|status| format!("Firecracker ended: {}", status.trim()))
}

/// `(LEVEL, message)` of one `--show-level` log line.
fn log_line(line: &str) -> Option<(&str, &str)> {
    let open = line.find('[')?;
    let close = open + line[open..].find("] ")?;
    let level = line[open + 1..close].rsplit(':').next()?;
    matches!(level, "ERROR" | "WARN" | "INFO" | "DEBUG" | "TRACE")
        .then(|| (level, line[close + 2..].trim()))
}

impl Hypervisor for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn display_name(&self) -> &'static str {
        "Firecracker"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            needs_tap: true,
            supports_qcow2: false,
            requires_kvm: true,
            supports_memory_snapshot: true,
            supports_pause: true,
            cmdline_devices_only: true,
            tap_fd: false,
        }
    }

    fn boot_args(&self) -> &'static str {
        BOOT_ARGS
    }

    /// A guest power-off leaves Firecracker running (no ACPI on x86); a reboot ends it
    /// (`reboot=k`), so the guest is asked to reboot.
    fn guest_stop_script(&self) -> &'static str {
        "sync && (systemctl reboot --no-block || reboot) >/dev/null 2>&1"
    }

    fn control_socket(&self, runtime_dir: &Path) -> PathBuf {
        api_socket(runtime_dir)
    }

    fn preflight(&self) -> Result<(), VmmError> {
        self.jailer_path().map(drop)
    }

    fn jailed(&self) -> bool {
        self.jailer.is_some()
    }

    fn dm_disks(&self) -> Result<(), String> {
        match self.jailer {
            Some(_) => Err("the jailer's chroot takes regular files only".into()),
            None => Ok(()),
        }
    }

    fn check_system_disk(&self, strategy: SystemDiskStrategy) -> Result<(), DiskRefusal> {
        match strategy {
            SystemDiskStrategy::Qcow2 => Err(DiskRefusal::Format(
                "Firecracker takes raw disks only; defaults.system_disk = \"qcow2\" works with QEMU only".into(),
            )),
            SystemDiskStrategy::DmSnapshot if self.jailer.is_some() => Err(DiskRefusal::Setup {
                message: "a device-mapper system disk cannot be placed in the jailer's chroot".into(),
                hint: "set defaults.system_disk = \"reflink\" or \"copy\", or remove firecracker.jailer".into(),
            }),
            SystemDiskStrategy::DmSnapshot | SystemDiskStrategy::Reflink | SystemDiskStrategy::Copy => Ok(()),
        }
    }

    /// Removes a VM's jail (and its cgroup) through the helper; blocking. A no-op without a
    /// configured jailer.
    fn remove_jail(&self, op_id: &str, vm_id: &str) -> Result<(), VmmError> {
        let Some(jailer) = &self.jailer else {
            return Ok(());
        };
        jailer
            .host
            .run(
                op_id,
                HelperOp::RemoveJail {
                    vm_id: vm_id.to_owned(),
                },
            )
            .map_err(|e| VmmError::JailRemoval(e.to_string()))
    }

    fn shutdown_signal(&self) -> &'static str {
        "ctrl-alt-del"
    }

    fn exit_reason(&self, vm_dir: &Path) -> Option<String> {
        exit_reason_in(
            &vm_dir.join(VM_FIRECRACKER_LOG),
            &vm_dir.join(VM_FIRECRACKER_STDERR),
        )
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<VmProcess, VmmError> {
        let tap = spec.tap.clone().ok_or(VmmError::NeedsTap)?;
        let (process, client) = self.spawn(spec).await?;
        // Under the jailer Firecracker sees the files at their in-jail paths only.
        let sent = match process.jail {
            Some(_) => jailed_spec(spec),
            None => spec.clone(),
        };
        for (method, path, body) in Self::boot_requests(&sent, &tap) {
            if let Err(e) = client.call(method, &path, Some(&body)).await {
                let e = died(e, &process, spec);
                self.undo_spawn(&process, &spec.vm_id).await;
                return Err(e);
            }
        }
        Ok(process)
    }

    async fn request_shutdown(&self, process: &VmProcess) -> Result<(), VmmError> {
        ApiClient::new(&process.control_socket)
            .call(
                "PUT",
                "/actions",
                Some(&json!({ "action_type": "SendCtrlAltDel" })),
            )
            .await
            .map(drop)
    }

    /// Firecracker has no "quit" request: SIGTERM ends the process without the guest.
    async fn quit(&self, process: &VmProcess) -> Result<(), VmmError> {
        let pid = i32::try_from(process.pid).map_err(|_| VmmError::Control {
            path: process.control_socket.display().to_string(),
            message: format!("pid {} out of range", process.pid),
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| VmmError::Control {
            path: process.control_socket.display().to_string(),
            message: format!("SIGTERM: {e}"),
        })
    }

    async fn pause(&self, process: &VmProcess) -> Result<(), VmmError> {
        ApiClient::new(&process.control_socket)
            .call("PATCH", "/vm", Some(&json!({ "state": "Paused" })))
            .await
            .map(drop)
    }

    async fn resume(&self, process: &VmProcess) -> Result<(), VmmError> {
        ApiClient::new(&process.control_socket)
            .call("PATCH", "/vm", Some(&json!({ "state": "Resumed" })))
            .await
            .map(drop)
    }

    /// `GET /` (InstanceInfo) says `state`: `Not started`, `Running` or `Paused`.
    async fn is_paused(&self, process: &VmProcess) -> Result<bool, VmmError> {
        let info = ApiClient::new(&process.control_socket)
            .call("GET", "/", None)
            .await?;
        Ok(info
            .as_ref()
            .and_then(|i| i.get("state"))
            .and_then(Value::as_str)
            == Some("Paused"))
    }

    /// A full snapshot of a paused VM. It does not flush guest disks: callers sync the guest
    /// (or freeze its file systems) first.
    async fn snapshot(&self, process: &VmProcess, snapshot: &Snapshot) -> Result<(), VmmError> {
        if process.jail.is_some() {
            // The snapshot files would have to be placed in the jail first.
            return Err(VmmError::Unsupported("snapshot a VM that runs jailed"));
        }
        ApiClient::new(&process.control_socket)
            .with_timeout(Duration::from_secs(120))
            .call(
                "PUT",
                "/snapshot/create",
                Some(&json!({
                    "snapshot_type": "Full",
                    "snapshot_path": snapshot.state.display().to_string(),
                    "mem_file_path": snapshot.memory.display().to_string(),
                })),
            )
            .await
            .map(drop)
    }

    async fn restore(&self, spec: &LaunchSpec, snapshot: &Snapshot) -> Result<VmProcess, VmmError> {
        if self.jailer.is_some() {
            return Err(VmmError::Unsupported(
                "restore a snapshot through the jailer",
            ));
        }
        let (process, client) = self.spawn(spec).await?;
        let loaded = client
            .clone()
            .with_timeout(Duration::from_secs(120))
            .call(
                "PUT",
                "/snapshot/load",
                Some(&json!({
                    "snapshot_path": snapshot.state.display().to_string(),
                    "mem_backend": {
                        "backend_type": "File",
                        "backend_path": snapshot.memory.display().to_string(),
                    },
                    "resume_vm": true,
                })),
            )
            .await;
        if let Err(e) = loaded {
            let e = died(e, &process, spec);
            self.undo_spawn(&process, &spec.vm_id).await;
            return Err(e);
        }
        Ok(process)
    }
}

#[cfg(test)]
mod tests {
    use super::{exit_reason, parse_version};

    /// The real Firecracker v1.17 (`--show-level`) for a guest that triple-faults right after
    /// InstanceStart, as logged here.
    const SHUTDOWN_LOG: &str = "\
2026-11-29T22:30:07.879014773 [t1:main:INFO] Running Firecracker v1.17.0-dev
2026-11-29T22:30:07.982062578 [t1:fc_api:INFO] The API server received a Put request on \"/actions\" with body \"{\\\"action_type\\\":\\\"InstanceStart\\\"}\".
2026-11-29T22:30:07.995750419 [t1:fc_vcpu 0:WARN] Received a VcpuEvent::Resume message with immediate_exit enabled. immediate_exit was disabled before proceeding
2026-11-29T22:30:07.995925459 [t1:fc_vcpu 0:ERROR] Unexpected exit reason on vcpu run: Shutdown
2026-11-29T22:30:07.995978398 [t1:main:INFO] Vmm is stopping.
2026-11-29T22:30:07.995994171 [t1:fc_api:INFO] The request was executed successfully. Status code: 204 No Content.
2026-11-29T22:30:07.997398385 [t1:main:INFO] Killing vCPU threads
2026-11-29T22:30:08.026310769 [t1:main:ERROR] RunWithApiError error: MicroVM stopped with an error: GenericError
2026-11-29T22:30:08.026352481 [t1:main:ERROR] Firecracker exiting with error. exit_code=1
";

    #[test]
    fn the_exit_reason_is_firecrackers_own_error_line() {
        let stderr = "Error: RunWithApi(MicroVMStoppedWithError(GenericError))\n";
        assert_eq!(
            exit_reason(SHUTDOWN_LOG, stderr).as_deref(),
            Some("Firecracker: Unexpected exit reason on vcpu run: Shutdown (exit code 1)")
        );
        // Only the generic lines: the most specific of them.
        let generic: String = SHUTDOWN_LOG
            .lines()
            .filter(|l| !l.contains("vcpu run"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            exit_reason(&generic, "").as_deref(),
            Some("Firecracker: MicroVM stopped with an error: GenericError (exit code 1)")
        );
        // A refused request is not why it exited; a clean exit is the guest's reset.
        let clean = "\
1.0 [t1:fc_api:ERROR] Received Error. Status code: 400 Bad Request. Message: nope
2.0 [t1:main:INFO] Vmm is stopping.
3.0 [t1:main:INFO] Firecracker exiting successfully. exit_code=0
";
        let reason = exit_reason(clean, "").unwrap();
        assert!(
            reason.starts_with("Firecracker exited normally: the guest reset"),
            "{reason}"
        );
        // The banner alone says nothing; stderr then (a panic), else how it ended.
        let banner = "1.0 [t1:main:INFO] Running Firecracker v1.17.0-dev\n";
        assert_eq!(exit_reason(banner, ""), None);
        assert_eq!(
            exit_reason(
                banner,
                "thread 'main' panicked at src/main.rs:1:1:\nboom\nnote: run with `RUST_BACKTRACE=1`\n[banger] firecracker ended: exit status: 101\n"
            )
            .as_deref(),
            Some("Firecracker: boom")
        );
        assert_eq!(
            exit_reason(banner, "[banger] firecracker ended: signal: 9 (SIGKILL)\n").as_deref(),
            Some("Firecracker ended: signal: 9 (SIGKILL)")
        );
    }

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("Firecracker v1.7.0\n\nSupported snapshot"),
            Some((1, 7, 0))
        );
        assert_eq!(parse_version("Firecracker v1.17.0-dev\n"), Some((1, 17, 0)));
        assert_eq!(parse_version("Firecracker v0.25\n"), Some((0, 25, 0)));
        assert_eq!(parse_version("nonsense"), None);
    }
}
