//! A minimal QMP client: greeting, `qmp_capabilities`, one command, its answer. QMP is
//! line-delimited JSON on a Unix socket; events that arrive before the answer are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::VmmError;

/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

fn control_err(path: &Path, message: impl Into<String>) -> VmmError {
    VmmError::Control {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Runs `command` (e.g. `system_powerdown`, `quit`) on the QMP socket at `path`.
pub async fn execute(path: &Path, command: &str) -> Result<Value, VmmError> {
    execute_with(path, command, None).await
}

/// Runs a QEMU monitor (HMP) command line, e.g. `hostfwd_add n0 tcp::8080-:80`, through QMP's
/// `human-monitor-command`; returns the monitor's output (empty when all went well: HMP
/// commands report failures as text).
pub async fn human_monitor_command(path: &Path, command_line: &str) -> Result<String, VmmError> {
    let answer = execute_with(
        path,
        "human-monitor-command",
        Some(json!({ "command-line": command_line })),
    )
    .await?;
    Ok(answer.as_str().unwrap_or_default().to_owned())
}

pub async fn execute_with(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, VmmError> {
    tokio::time::timeout(QMP_TIMEOUT, execute_inner(path, command, arguments))
        .await
        .map_err(|_| control_err(path, format!("{command}: no answer within 5s")))?
}

async fn execute_inner(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, VmmError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| control_err(path, e.to_string()))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut next = async || -> Result<Value, VmmError> {
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| control_err(path, e.to_string()))?
                .ok_or_else(|| control_err(path, "closed"))?;
            let value: Value =
                serde_json::from_str(&line).map_err(|e| control_err(path, e.to_string()))?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    };
    let greeting = next().await?;
    if greeting.get("QMP").is_none() {
        return Err(control_err(path, "no QMP greeting"));
    }
    for cmd in ["qmp_capabilities", command] {
        let mut message = json!({ "execute": cmd });
        if cmd == command
            && let Some(arguments) = &arguments
        {
            message["arguments"] = arguments.clone();
        }
        let mut text = message.to_string();
        text.push('\n');
        write
            .write_all(text.as_bytes())
            .await
            .map_err(|e| control_err(path, e.to_string()))?;
        // `quit` may close the socket before answering.
        let answer = match next().await {
            Ok(answer) => answer,
            Err(_) if cmd == "quit" => return Ok(Value::Null),
            Err(e) => return Err(e),
        };
        if let Some(error) = answer.get("error") {
            return Err(control_err(path, format!("{cmd}: {error}")));
        }
        if cmd == command {
            return Ok(answer.get("return").cloned().unwrap_or(Value::Null));
        }
    }
    Ok(Value::Null)
}
