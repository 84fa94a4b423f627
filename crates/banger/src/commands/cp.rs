//! `banger vm cp [NAME:]SRC [NAME:]DST`: one side is in a VM (NAME:PATH), the other on the
//! host. A progress bar (fed by the daemon's transfer counters) runs on a TTY.

use std::io::IsTerminal;
use std::path::PathBuf;

use banger_proto::{CopyDirection, CopyRequest, CopyResult, VmName};
use hyper::Method;

use crate::client::{Client, ClientError};
use crate::commands::print_json;
use crate::output::escape_line;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    Host(PathBuf),
    Guest(VmName, String),
}

/// `NAME:PATH` when the text before the first ':' is a VM name (no '/'), else a host path.
fn side(arg: &str) -> Side {
    if let Some((name, path)) = arg.split_once(':')
        && let Ok(name) = VmName::parse(name)
    {
        return Side::Guest(name, path.to_owned());
    }
    Side::Host(PathBuf::from(arg))
}

fn usage(message: &str) -> ClientError {
    ClientError::Other(anyhow::anyhow!(
        "{message}; hint: `banger vm cp dev:/root/out ./out` or `banger vm cp ./in dev:/root/`"
    ))
}

pub async fn run(client: &Client, src: &str, dst: &str, json: bool) -> Result<u8, ClientError> {
    let (name, direction, host, guest) = match (side(src), side(dst)) {
        (Side::Host(host), Side::Guest(name, guest)) => (name, CopyDirection::ToGuest, host, guest),
        (Side::Guest(name, guest), Side::Host(host)) => {
            (name, CopyDirection::FromGuest, host, guest)
        }
        (Side::Host(_), Side::Host(_)) => return Err(usage("one side must be NAME:PATH in a VM")),
        (Side::Guest(..), Side::Guest(..)) => {
            return Err(usage("only one side can be in a VM"));
        }
    };
    let host_path = std::path::absolute(&host)
        .map_err(|e| usage(&format!("cannot resolve {}: {e}", host.display())))?;
    let request = CopyRequest {
        direction,
        host_path: host_path.display().to_string(),
        guest_path: guest,
    };
    let route = format!("/v1/vms/{name}/cp");
    let call = client.call::<CopyResult>(Method::POST, &route, Some(&request));
    let result = if std::io::stderr().is_terminal() && !json {
        with_bar(client, &name, call).await?
    } else {
        call.await?
    };
    if json {
        print_json(&result)?;
        return Ok(0);
    }
    for skipped in &result.skipped {
        eprintln!("banger: skipped {}", escape_line(skipped));
    }
    if result.skipped_count > result.skipped.len() as u64 {
        eprintln!(
            "banger: skipped {} more",
            result.skipped_count - result.skipped.len() as u64
        );
    }
    eprintln!(
        "Copied {} entries ({} bytes) to {}{} in {:.1}s",
        result.entries,
        result.bytes,
        match direction {
            CopyDirection::ToGuest => format!("{name}:"),
            CopyDirection::FromGuest => String::new(),
        },
        escape_line(&result.written),
        result.elapsed_ms as f64 / 1000.0
    );
    Ok(0)
}

/// Runs `call` with a progress bar polled from the daemon's transfer counters.
async fn with_bar(
    client: &Client,
    name: &VmName,
    call: impl Future<Output = Result<CopyResult, ClientError>>,
) -> Result<CopyResult, ClientError> {
    super::workspace::with_progress_bar(client, name, "copying".into(), call, |bar, p| {
        bar.set_length(p.bytes_total.max(p.bytes_sent));
        bar.set_position(p.bytes_sent);
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse_like_docker_cp() {
        assert_eq!(
            side("dev:/root/x"),
            Side::Guest(VmName::parse("dev").unwrap(), "/root/x".into())
        );
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/tmp/x"), Side::Host("/tmp/x".into()));
        assert_eq!(side("Not_A_Name:x"), Side::Host("Not_A_Name:x".into()));
    }
}
