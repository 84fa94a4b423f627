//! Log setup: `tracing` to the log file (`$BANGER_HOME/logs/bangerd.log`) and to stderr, except
//! when the CLI started the daemon detached (`BANGER_DAEMON_DETACHED=1`), whose stderr is a file.
//! Every line of a request carries its `op_id` through the request span.

use std::fs::File;
use std::sync::Mutex;

use anyhow::{Context, Result};
use banger_core::layout::Layout;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. `level` is the configured filter; `RUST_LOG` overrides it.
pub fn init(layout: &Layout, level: &str) -> Result<()> {
    let path = layout.daemon_log();
    let file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .with_context(|| format!("invalid log level {level:?}"))?;
    let file_layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(Mutex::new(file));
    let detached = std::env::var_os("BANGER_DAEMON_DETACHED").is_some_and(|v| v == "1");
    let stderr_layer =
        (!detached).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(filter)
        .with(file_layer)
        .with(stderr_layer)
        .try_init()
        .context("cannot install the log subscriber")
}
