//! `banger vm workspace …`: prepare, status, export; and the workspace check `vm exec` runs
//! before the command (dirty warning or `--auto-prepare`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use banger_proto::{
    ExportResult, ExportWorkspaceRequest, PrepareProgress, PrepareResult, PrepareWorkspaceRequest,
    TransferChannel, VmName, WorkspaceDiff, WorkspaceStatus,
};
use hyper::Method;

use crate::cli::WorkspaceCommand;
use crate::client::{Client, ClientError};
use crate::commands::{print_json, with_progress};
use crate::output::escape_line;

pub async fn run(client: &Client, command: WorkspaceCommand) -> Result<u8, ClientError> {
    match command {
        WorkspaceCommand::Prepare {
            name,
            path,
            no_git,
            json,
        } => {
            let path = host_path(path, no_git)?;
            let result = prepare(client, &name, &path, no_git).await?;
            if json.json {
                print_json(&result)?;
            } else {
                print_prepared(&name, &result);
            }
            Ok(0)
        }
        WorkspaceCommand::Status { name, guest, json } => {
            let status = status(client, &name, guest).await?;
            if json.json {
                print_json(&status)?;
            } else {
                print!("{}", render_status(&name, &status));
            }
            Ok(0)
        }
        WorkspaceCommand::Export {
            name,
            patch,
            to,
            json,
        } => {
            let request = ExportWorkspaceRequest {
                patch: patch.map(absolute).transpose()?,
                to: to.map(absolute).transpose()?,
            };
            let result: ExportResult = with_progress(
                &format!("exporting the workspace of {name}"),
                client.call(
                    Method::POST,
                    &format!("/v1/vms/{name}/workspace/export"),
                    Some(&request),
                ),
            )
            .await?;
            if json.json {
                print_json(&result)?;
            } else if request.patch.is_some() {
                println!(
                    "Wrote {} ({}); apply it with `git apply {}`",
                    result.written,
                    human(result.bytes),
                    result.written
                );
            } else {
                println!(
                    "Wrote {} files ({}) under {}",
                    result.files,
                    human(result.bytes),
                    result.written
                );
                for path in &result.deleted {
                    println!("deleted in the guest: {}", escape_line(path));
                }
            }
            Ok(0)
        }
    }
}

/// The directory to prepare: PATH made absolute, or the current repository's top level (the
/// current directory with `--no-git`).
pub fn host_path(path: Option<PathBuf>, no_git: bool) -> Result<String, ClientError> {
    if let Some(path) = path {
        return absolute(path);
    }
    let top = std::process::Command::new("git")
        .args(["rev-parse", "--show-toplevel"])
        .stderr(std::process::Stdio::null())
        .output();
    match top {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        _ if no_git => absolute(PathBuf::from(".")),
        _ => Err(ClientError::Other(anyhow::anyhow!(
            "the current directory is not in a git repository; hint: pass PATH, or --no-git to copy a plain directory"
        ))),
    }
}

fn absolute(path: PathBuf) -> Result<String, ClientError> {
    std::path::absolute(&path)
        .map(|p| p.display().to_string())
        .map_err(|e| ClientError::Other(anyhow::anyhow!("cannot resolve {}: {e}", path.display())))
}

pub async fn prepare(
    client: &Client,
    name: &VmName,
    path: &str,
    no_git: bool,
) -> Result<PrepareResult, ClientError> {
    let request = PrepareWorkspaceRequest {
        path: path.to_owned(),
        no_git,
    };
    let route = format!("/v1/vms/{name}/workspace/prepare");
    let call = client.call(Method::POST, &route, Some(&request));
    if !std::io::stderr().is_terminal() {
        return call.await;
    }
    with_progress_bar(client, name, format!("scanning {path}"), call, |bar, p| {
        if p.files_total > 0 {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_sent);
            bar.set_message(format!("{}/{} files", p.files_sent, p.files_total));
        }
    })
    .await
}

/// Runs `call` (a prepare or a copy of VM `name`) under a progress bar that `show` updates
/// from the daemon's transfer counters, polled while the call runs.
pub async fn with_progress_bar<T>(
    client: &Client,
    name: &VmName,
    message: String,
    call: impl Future<Output = Result<T, ClientError>>,
    show: impl Fn(&indicatif::ProgressBar, &PrepareProgress),
) -> Result<T, ClientError> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                let progress: Result<PrepareProgress, _> = client
                    .call(Method::GET, &format!("/v1/vms/{name}/workspace/progress"), None::<&()>)
                    .await;
                if let Ok(p) = progress && p.running {
                    show(&bar, &p);
                }
            }
        }
    };
    bar.finish_and_clear();
    result
}

pub fn print_prepared(name: &VmName, result: &PrepareResult) {
    let secs = result.elapsed_ms as f64 / 1000.0;
    let rate = if secs > 0.0 {
        human((result.wire_bytes as f64 / secs) as u64)
    } else {
        "-".into()
    };
    let via = match result.channel {
        TransferChannel::Ssh => "",
        TransferChannel::VirtioSerial => ", via the workspace channel",
    };
    eprintln!(
        "Prepared {} in {name}:/root/repo: sent {} of {} files ({}), deleted {}, in {secs:.1}s ({rate}/s{via})",
        result.host_path,
        result.files_sent,
        result.files_total,
        human(result.bytes_sent),
        result.files_deleted,
    );
}

pub async fn status(
    client: &Client,
    name: &VmName,
    guest: bool,
) -> Result<WorkspaceStatus, ClientError> {
    client
        .call(
            Method::GET,
            &format!("/v1/vms/{name}/workspace?guest={guest}"),
            None::<&()>,
        )
        .await
}

/// The one-line warning `vm exec` prints when the host differs from the last prepare.
pub fn dirty_warning(name: &VmName, status: &WorkspaceStatus) -> String {
    let files = status.host.as_ref().map(WorkspaceDiff::total).unwrap_or(0);
    let mut what = Vec::new();
    if status.commit != status.head_now {
        what.push("HEAD moved".to_owned());
    }
    if files > 0 {
        what.push(format!(
            "{files} file{} differ{}",
            if files == 1 { "" } else { "s" },
            if files == 1 { "s" } else { "" }
        ));
    }
    format!(
        "banger: warning: the workspace in {name} is stale: {} on the host since the last prepare from {}; run `banger vm workspace prepare {name}` or pass --auto-prepare",
        what.join(", "),
        status.host_path.as_deref().unwrap_or("?")
    )
}

fn render_status(name: &VmName, status: &WorkspaceStatus) -> String {
    if !status.prepared {
        return format!("No workspace prepared in {name}\n");
    }
    let mut out = String::new();
    let short = |c: &Option<String>| {
        c.as_deref()
            .map(|c| c.chars().take(12).collect::<String>())
            .unwrap_or_else(|| "-".into())
    };
    out.push_str(&format!(
        "Prepared from {} at {} (commit {}) into {name}:/root/repo\n",
        status.host_path.as_deref().unwrap_or("?"),
        status.prepared_at.as_deref().unwrap_or("?"),
        short(&status.commit)
    ));
    if status.git && status.commit != status.head_now {
        out.push_str(&format!("HEAD moved: now {}\n", short(&status.head_now)));
    }
    for (side, diff) in [("host", &status.host), ("guest", &status.guest)] {
        let Some(diff) = diff else { continue };
        if diff.total() == 0 {
            out.push_str(&format!("{side}: no changes\n"));
            continue;
        }
        out.push_str(&format!(
            "{side}: {} added, {} modified, {} removed\n",
            diff.added_count, diff.modified_count, diff.removed_count
        ));
        for (mark, list) in [
            ("A", &diff.added),
            ("M", &diff.modified),
            ("D", &diff.removed),
        ] {
            for path in list {
                out.push_str(&format!("  {mark} {}\n", escape_line(path)));
            }
        }
    }
    out
}

/// Bytes for people: `812 B`, `4.1 MiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_well() {
        assert_eq!(super::human(812), "812 B");
        assert_eq!(super::human(4_269_636), "4.1 MiB");
        assert_eq!(super::human(3 << 30), "3.0 GiB");
    }
}
