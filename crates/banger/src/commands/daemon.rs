//! `banger daemon status|start|stop`. None of these autostart the daemon by accident:
//! status and stop only talk to a daemon that already runs.

use std::time::{Duration, Instant};

use banger_proto::DaemonStatus;
use hyper::Method;

use crate::cli::DaemonCommand;
use crate::client::{Client, ClientError};
use crate::commands::print_json;

/// How long `daemon stop` waits for the socket to go away.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

pub async fn run(client: &Client, command: DaemonCommand) -> Result<u8, ClientError> {
    match command {
        DaemonCommand::Status(flag) => {
            let status: Option<DaemonStatus> =
                client.call_if_running(Method::GET, "/v1/status").await?;
            let Some(status) = status else {
                return Err(ClientError::Unreachable(format!(
                    "bangerd is not running (socket {}); hint: `banger daemon start`",
                    client.layout().socket().display()
                )));
            };
            if flag.json {
                print_json(&status)?;
            } else {
                let memory = status
                    .rss_bytes
                    .map(|b| format!(", {} resident", crate::output::human_bytes(b)))
                    .unwrap_or_default();
                println!(
                    "bangerd {} running: pid {}, up {}s{memory}, {} VM(s) running\nsocket: {}\ndata:   {}\nlog:    {}",
                    status.version,
                    status.pid,
                    status.uptime_secs,
                    status.running_vms,
                    status.socket,
                    status.data_dir,
                    status.log_file
                );
            }
            Ok(0)
        }
        DaemonCommand::Start => {
            let status: DaemonStatus = client.call(Method::GET, "/v1/status", None::<&()>).await?;
            println!("bangerd running: pid {}", status.pid);
            Ok(0)
        }
        DaemonCommand::Stop => {
            let status: Option<DaemonStatus> =
                client.call_if_running(Method::GET, "/v1/status").await?;
            let Some(status) = status else {
                println!("bangerd is not running");
                return Ok(0);
            };
            client
                .call_if_running::<()>(Method::POST, "/v1/shutdown")
                .await?;
            let deadline = Instant::now() + STOP_DEADLINE;
            while pid_alive(status.pid) {
                if Instant::now() > deadline {
                    return Err(ClientError::Other(anyhow::anyhow!(
                        "bangerd (pid {}) did not exit within {}s",
                        status.pid,
                        STOP_DEADLINE.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("bangerd stopped (VMs keep running)");
            Ok(0)
        }
    }
}

/// Whether `pid` names a live (non-zombie) process.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
