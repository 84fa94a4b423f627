//! `bangerd`: the per-user daemon. Takes the instance lock (one daemon per runtime dir), opens
//! the state, and serves the `/v1` API on a Unix socket until SIGTERM, SIGINT or
//! `POST /v1/shutdown`. VMs are not stopped when the daemon exits.

mod api;
mod logging;
mod private;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{Context, Result};
use banger_core::config::Config;
use banger_core::layout::Layout;
use banger_core::service::Manager;
use clap::Parser;
use tokio::net::UnixListener;
use tracing::{info, warn};

/// banger's daemon. Normally started by the `banger` CLI; see `banger daemon --help`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Print the OpenAPI description of the API (docs/api.yaml) and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn main() -> std::process::ExitCode {
    add_sbin_to_path();
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", api::openapi_yaml());
        return std::process::ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("bangerd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The daemon runs mkfs.ext4, resize2fs & co., which Debian installs in /usr/sbin: a directory
/// an ordinary user's PATH lacks. Appended (after the user's own directories) when missing.
fn add_sbin_to_path() {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> = std::env::split_paths(&current).collect();
    let before = dirs.len();
    for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == std::path::Path::new(sbin)) {
            dirs.push(sbin.into());
        }
    }
    if dirs.len() == before {
        return;
    }
    if let Ok(path) = std::env::join_paths(dirs) {
        // SAFETY: called first thing in main, before the runtime or any other thread exists,
        // so nothing reads the environment concurrently.
        unsafe { std::env::set_var("PATH", path) };
    }
}

fn run() -> Result<()> {
    private::restrict_umask();
    let layout = Layout::from_env()?;
    let config = Config::load(layout.config_file())?;
    create_private_dir(layout.data_dir())?;
    create_private_dir(layout.runtime_dir())?;
    let uid = nix::unistd::getuid().as_raw();
    private::enforce(layout.data_dir(), uid)?;
    if !layout.runtime_dir().starts_with(layout.data_dir()) {
        private::enforce(layout.runtime_dir(), uid)?;
    }
    std::fs::create_dir_all(layout.logs_dir())
        .with_context(|| format!("cannot create {}", layout.logs_dir().display()))?;
    logging::init(&layout, &config.daemon.log_level)?;

    // One daemon per runtime dir: the loser of a start race exits quietly, the winner serves.
    let lock_path = layout.daemon_lock();
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            info!(lock = %lock_path.display(), "another bangerd holds the lock; exiting");
            return Ok(());
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(layout, config));
    drop(lock);
    result
}

/// Creates `dir` (and parents) readable by the owner only; an existing one is checked by
/// [`private::enforce`].
fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))
}

async fn serve(layout: Layout, config: Config) -> Result<()> {
    let socket = layout.socket();
    let manager = Arc::new(Manager::open(layout.clone(), config)?);
    // What a daemon that died left half-made, then the VMs (this one holds the lock).
    manager
        .recover()
        .await
        .context("cannot reconcile VM state")?;
    manager.start_network().await;
    // Console logs stay under their cap, including those a VM wrote while no daemon ran.
    {
        let manager = manager.clone();
        tokio::spawn(async move {
            let period = std::time::Duration::from_secs(
                banger_core::service::console_cap::CONSOLE_CHECK_SECS,
            );
            loop {
                let m = manager.clone();
                let _ = tokio::task::spawn_blocking(move || m.cap_console_logs()).await;
                tokio::time::sleep(period).await;
            }
        });
    }

    // We hold the lock, so a socket file left here is from a daemon that died.
    match std::fs::remove_file(&socket) {
        Ok(()) => warn!(socket = %socket.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", socket.display())),
    }
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("cannot bind {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", socket.display()))?;

    let shutdown = Arc::new(tokio::sync::Notify::new());
    let state = api::AppState::new(manager, shutdown.clone());
    let app = api::router(state);
    info!(socket = %socket.display(), pid = std::process::id(), version = banger_core::VERSION, "bangerd ready");

    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(shutdown))
        .await
        .context("server failed");
    let _ = std::fs::remove_file(&socket);
    info!("bangerd stopped");
    served
}

/// Resolves on SIGTERM, SIGINT or a `POST /v1/shutdown`.
async fn shutdown_signal(requested: Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch SIGTERM: {e}");
            requested.notified().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = requested.notified() => info!("shutdown requested"),
    }
}
