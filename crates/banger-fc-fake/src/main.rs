//! `banger-fc-fake`: a test-only stand-in for the `firecracker` binary. It cannot run a guest;
//! it holds banger's client to Firecracker's real API contract. It serves HTTP/1.1 on the
//! `--api-sock` Unix socket like Firecracker, validates every request against the OpenAPI
//! (swagger 2.0) file loaded at start (`--spec`, `BANGER_FC_SPEC`, default
//! `spec/firecracker-1.17.0-dev.yaml` in this crate, the vendored reference copy) and answers bad
//! ones with 400 and `{"fault_message": ...}`, and enforces Firecracker's state machine.
//!
//! Options a real Firecracker also takes: `--api-sock PATH`, `--id ID`, `--version`,
//! `--log-path PATH` (an existing file: its log from the first line, in Firecracker's format
//! `<time> [<id>:<thread>(:<LEVEL>)] <message>`; without it the startup lines go to stdout, the
//! serial console, as Firecracker's do), `--level LEVEL`, `--show-level`, and the ones the
//! jailer adds (`--start-time-us`, `--start-time-cpu-us`, `--parent-cpu-time-us`);
//! `--flag=value` works like `--flag value`.
//! Fake-only: `--chroot DIR` (set by `banger-jailer-fake`: the jail's root, inside which the
//! API socket and every path of a request are resolved, as for a chrooted Firecracker), `--spec PATH`, `--ctrl-alt-del exit|ignore` (what the "guest" does on
//! SendCtrlAltDel: exit like a guest with i8042 and `reboot=k`, default; or ignore it),
//! `--record FILE` (one JSON line per request: method, path, body, status),
//! `--ignore-sigterm` (a hung VMM: only SIGKILL ends it), `--die-after-boot MS` (the guest
//! dies MS ms after `InstanceStart`: Firecracker's own ERROR lines for a vCPU shutdown in its
//! log, its error on stderr, exit code 1, as the real one does for a triple-faulting guest).

mod spec;
mod state;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use spec::Spec;
use state::{After, CtrlAltDel, Machine};

/// Where the spec is when neither `--spec` nor `BANGER_FC_SPEC` says.
const DEFAULT_SPEC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/spec/firecracker-1.17.0-dev.yaml"
);

#[derive(Debug)]
struct Args {
    api_sock: Option<PathBuf>,
    id: String,
    version: bool,
    spec: PathBuf,
    ctrl_alt_del: CtrlAltDel,
    record: Option<PathBuf>,
    ignore_sigterm: bool,
    chroot: Option<PathBuf>,
    log_path: Option<String>,
    show_level: bool,
    die_after_boot: Option<u64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        api_sock: None,
        id: "anonymous-instance".into(),
        version: false,
        spec: std::env::var_os("BANGER_FC_SPEC")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SPEC)),
        ctrl_alt_del: CtrlAltDel::Exit,
        record: None,
        ignore_sigterm: false,
        chroot: None,
        log_path: None,
        show_level: false,
        die_after_boot: None,
    };
    let mut iter = std::env::args().skip(1).flat_map(|arg| {
        // `--flag=value` is `--flag value`.
        match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                vec![flag.to_owned(), value.to_owned()]
            }
            _ => vec![arg],
        }
    });
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| iter.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--chroot" => args.chroot = Some(value("--chroot")?.into()),
            "--log-path" => args.log_path = Some(value("--log-path")?),
            "--level" => {
                let level = value("--level")?;
                if !["off", "trace", "debug", "info", "warn", "warning", "error"]
                    .contains(&level.to_ascii_lowercase().as_str())
                {
                    bail!("Invalid value for logger level: {level}");
                }
            }
            "--show-level" => args.show_level = true,
            "--die-after-boot" => {
                let text = value("--die-after-boot")?;
                let ms = text
                    .parse::<u64>()
                    .with_context(|| format!("--die-after-boot {text}: not a number"))?;
                args.die_after_boot = Some(ms);
            }
            "--start-time-us" | "--start-time-cpu-us" | "--parent-cpu-time-us" => {
                let text = value(&arg)?;
                text.parse::<u64>()
                    .with_context(|| format!("{arg} {text}: not a number"))?;
            }
            "--api-sock" => args.api_sock = Some(value("--api-sock")?.into()),
            "--id" => args.id = value("--id")?,
            "--version" => args.version = true,
            "--ignore-sigterm" => args.ignore_sigterm = true,
            "--spec" => args.spec = value("--spec")?.into(),
            "--record" => args.record = Some(value("--record")?.into()),
            "--ctrl-alt-del" => {
                args.ctrl_alt_del = match value("--ctrl-alt-del")?.as_str() {
                    "exit" => CtrlAltDel::Exit,
                    "ignore" => CtrlAltDel::Ignore,
                    other => bail!("--ctrl-alt-del {other}: expected exit or ignore"),
                }
            }
            other => bail!("Found argument '{other}' which wasn't expected"),
        }
    }
    Ok(args)
}

struct Server {
    spec: Spec,
    machine: Mutex<Machine>,
    record: Option<std::sync::Mutex<std::fs::File>>,
    exiting: AtomicBool,
    log: Log,
    die_after_boot: Option<u64>,
}

/// Firecracker's log: a file opened at start (`--log-path`), else stdout.
struct Log {
    file: Option<std::sync::Mutex<std::fs::File>>,
    id: String,
    show_level: bool,
}

impl Log {
    /// One line as Firecracker writes it: `<time> [<id>:<thread>:<LEVEL>] <message>`.
    fn line(&self, thread: &str, level: &str, message: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let level = if self.show_level {
            format!(":{level}")
        } else {
            String::new()
        };
        let text = format!(
            "{}.{:09} [{}:{thread}{level}] {message}\n",
            now.as_secs(),
            now.subsec_nanos(),
            self.id
        );
        match &self.file {
            Some(file) => {
                if let Ok(mut file) = file.lock() {
                    let _ = file.write_all(text.as_bytes());
                }
            }
            None => {
                let mut out = std::io::stdout();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let spec = Spec::load(&args.spec)?;
    if args.version {
        println!("Firecracker v{}\n", spec.version());
        return Ok(());
    }
    if args.ignore_sigterm {
        let mut terms = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        tokio::spawn(async move { while terms.recv().await.is_some() {} });
    }
    let socket = args
        .api_sock
        .context("--api-sock is required (the fake has no --no-api mode)")?;
    let socket = state::host_path(args.chroot.as_deref(), &socket.to_string_lossy());
    // Firecracker opens, never creates, its log file.
    let log_file = args
        .log_path
        .as_deref()
        .map(|path| {
            let host = state::host_path(args.chroot.as_deref(), path);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&host)
                .with_context(|| format!("Failed to open the log file {}", host.display()))
        })
        .transpose()?
        .map(std::sync::Mutex::new);
    let log = Log {
        file: log_file,
        id: args.id.clone(),
        show_level: args.show_level,
    };
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("Failed to open the API socket at {}", socket.display()))?;
    let record = args
        .record
        .map(|path| {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))
        })
        .transpose()?
        .map(std::sync::Mutex::new);
    let version = spec.version().to_owned();
    log.line("main", "INFO", &format!("Running Firecracker v{version}"));
    log.line(
        "main",
        "INFO",
        &format!(
            "Listening on API socket ({:?}).",
            socket.display().to_string()
        ),
    );
    let server = Arc::new(Server {
        spec,
        machine: Mutex::new(Machine::new(
            args.id,
            version,
            args.ctrl_alt_del,
            args.chroot,
        )),
        record,
        exiting: AtomicBool::new(false),
        log,
        die_after_boot: args.die_after_boot,
    });
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.context("accept failed")?;
                let server = server.clone();
                let exit_tx = exit_tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req| handle(server.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if server.exiting.load(Ordering::SeqCst) {
                        let _ = exit_tx.send(()).await;
                    }
                });
            }
            _ = exit_rx.recv() => {
                // The guest reset (Ctrl-Alt-Del with `reboot=k`): Firecracker exits.
                let _ = std::io::stdout().flush();
                std::process::exit(0);
            }
        }
    }
}

async fn handle(
    server: Arc<Server>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    // Firecracker's HTTP server knows GET, PUT, PATCH and DELETE only; any other method is a 400
    // whose body has an `error`, not a `fault_message`.
    let reply = if !matches!(method.as_str(), "GET" | "PUT" | "PATCH" | "DELETE") {
        state::Reply {
            status: 400,
            body: Some(json!({
                "error": "Invalid HTTP Method: Unsupported HTTP method.\nAll previous unanswered requests will be dropped."
            })),
            after: After::Nothing,
        }
    } else {
        match server.spec.operation(&method, &path) {
            Err(message) => state::fault(message),
            Ok(op) => match server.spec.check_body(&op, &method, &body) {
                Err(message) => state::fault(message),
                Ok(value) => server.machine.lock().await.apply(&op.id, &op.params, value),
            },
        }
    };
    if reply.after == After::Exit {
        server.exiting.store(true, Ordering::SeqCst);
    }
    let started = method == "PUT"
        && path == "/actions"
        && reply.status == 204
        && serde_json::from_slice::<Value>(&body)
            .is_ok_and(|b| b["action_type"] == "InstanceStart");
    if let (true, Some(ms)) = (started, server.die_after_boot) {
        let server = server.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            // What the real one logs for a guest that triple-faults (KVM_EXIT_SHUTDOWN).
            let log = &server.log;
            log.line(
                "fc_vcpu 0",
                "ERROR",
                "Unexpected exit reason on vcpu run: Shutdown",
            );
            log.line("main", "INFO", "Vmm is stopping.");
            log.line(
                "main",
                "ERROR",
                "RunWithApiError error: MicroVM stopped with an error: GenericError",
            );
            log.line(
                "main",
                "ERROR",
                "Firecracker exiting with error. exit_code=1",
            );
            eprintln!("Error: RunWithApi(MicroVMStoppedWithError(GenericError))");
            let _ = std::io::stdout().flush();
            std::process::exit(1);
        });
    }
    if let Some(record) = &server.record {
        let line = json!({
            "method": method,
            "path": path,
            "body": serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            "status": reply.status,
            "fault": reply.body.as_ref().and_then(|b| b.get("fault_message")).cloned(),
        });
        if let Ok(mut file) = record.lock() {
            let _ = writeln!(file, "{line}");
        }
    }
    let mut builder = Response::builder().status(reply.status);
    let bytes = match reply.body {
        Some(body) => {
            builder = builder.header("Content-Type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    // A response built from a valid status and header cannot fail.
    Ok(builder
        .body(Full::new(bytes))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}
