//! `banger-fc-fake`: a test-only stand-in for the `firecracker` binary. It cannot run a guest;
//! it holds banger's client to Firecracker's real API contract. It serves HTTP/1.1 on the
//! `--api-sock` Unix socket like Firecracker, validates every request against the OpenAPI
//! (swagger 2.0) file loaded at start (`--spec`, `BANGER_FC_SPEC`, default
//! `spec/firecracker-1.17.0-dev.yaml` in this crate, the vendored reference copy) and answers bad
//! ones with 400 and `{"fault_message": ...}`, and enforces Firecracker's state machine.
//!
//! Options a real Firecracker also takes: `--api-sock PATH`, `--id ID`, `--version`, and the
//! ones the jailer adds (`--start-time-us`, `--start-time-cpu-us`, `--parent-cpu-time-us`);
//! `--flag=value` works like `--flag value`.
//! Fake-only: `--chroot DIR` (set by `banger-jailer-fake`: the jail's root, inside which the
//! API socket and every path of a request are resolved, as for a chrooted Firecracker), `--spec PATH`, `--ctrl-alt-del exit|ignore` (what the "guest" does on
//! SendCtrlAltDel: exit like a guest with i8042 and `reboot=k`, default; or ignore it),
//! `--record FILE` (one JSON line per request: method, path, body, status),
//! `--ignore-sigterm` (a hung VMM: only SIGKILL ends it).

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
