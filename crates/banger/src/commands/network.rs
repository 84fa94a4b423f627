//! `banger network status|down`, `banger ssh-config` and `banger helper install` (the systemd
//! units of the root helper, shipped in contrib/systemd and embedded here).

use banger_proto::{NetworkStatus, SshConfigRequest, SshConfigResult};
use hyper::Method;

use crate::cli::{HelperCommand, NetworkCommand};
use crate::client::{Client, ClientError};
use crate::commands::print_json;
use crate::output::escape_line;

const SOCKET_UNIT: &str = include_str!("../../../../contrib/systemd/banger-helper@.socket");
const SERVICE_UNIT: &str = include_str!("../../../../contrib/systemd/banger-helper@.service");
const JAILER_DROP_IN: &str = include_str!("../../../../contrib/systemd/banger-helper-jailer.conf");

/// The jailer drop-in with the binaries filled in (the `ExecStart` line names them).
fn jailer_drop_in(jailer: &std::path::Path, firecracker: &std::path::Path) -> String {
    JAILER_DROP_IN
        .replace("/usr/local/bin/jailer", &jailer.display().to_string())
        .replace(
            "/usr/local/bin/firecracker",
            &firecracker.display().to_string(),
        )
}

pub async fn run(client: &Client, command: NetworkCommand) -> Result<u8, ClientError> {
    let (status, json): (NetworkStatus, bool) = match command {
        NetworkCommand::Status(flag) => (
            client.call(Method::GET, "/v1/network", None::<&()>).await?,
            flag.json,
        ),
        NetworkCommand::Down(flag) => (
            client
                .call(Method::POST, "/v1/network/down", None::<&()>)
                .await?,
            flag.json,
        ),
    };
    if json {
        print_json(&status)?;
        return Ok(0);
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    // Daemon text, escaped like every printed value (output.rs).
    let socket = escape_line(&status.helper_socket);
    match (&status.helper, &status.helper_error) {
        (true, _) => println!("helper:    {socket} (answers)"),
        (false, Some(e)) => println!("helper:    {socket} ({})", escape_line(e)),
        (false, None) => println!("helper:    {socket} (not used)"),
    }
    println!("mode:      {}", status.mode);
    if let (Some(subnet), Some(gw)) = (&status.subnet, &status.gateway) {
        println!("subnet:    {subnet} (gateway {gw})");
    }
    println!("bridge up: {}", yes(status.bridge_up));
    println!("nft table: {}", yes(status.nft_table));
    println!("taps:      {}", escape_line(&status.taps.join(" ")));
    println!(
        "dns:       {}",
        escape_line(status.dns.as_deref().unwrap_or("-"))
    );
    for lease in &status.leases {
        let line = format!("{} {} {}", lease.vm, lease.ip, lease.tap);
        println!("lease:     {}", escape_line(&line));
    }
    Ok(0)
}

pub async fn ssh_config(client: &Client, install: bool, json: bool) -> Result<u8, ClientError> {
    let result: SshConfigResult = client
        .call(
            Method::POST,
            "/v1/ssh-config",
            Some(&SshConfigRequest { install }),
        )
        .await?;
    if json {
        print_json(&result)?;
        return Ok(0);
    }
    println!("wrote {} ({} hosts)", result.path, result.hosts.len());
    match (&result.user_config, result.include_added) {
        (Some(user), true) => println!("added `Include {}` to {user}", result.path),
        (Some(user), false) => println!("{user} already includes it"),
        (None, _) => {
            println!("hint: `banger ssh-config --install` adds the Include line to ~/.ssh/config")
        }
    }
    Ok(0)
}

pub fn helper(command: HelperCommand) -> Result<u8, ClientError> {
    let HelperCommand::Install {
        print,
        unit_dir,
        jailer,
        firecracker,
    } = command;
    let mut files = vec![
        ("banger-helper@.socket".to_owned(), SOCKET_UNIT.to_owned()),
        ("banger-helper@.service".to_owned(), SERVICE_UNIT.to_owned()),
    ];
    if let (Some(jailer), Some(firecracker)) = (&jailer, &firecracker) {
        if !jailer.is_absolute() || !firecracker.is_absolute() {
            return Err(ClientError::Other(anyhow::anyhow!(
                "--jailer and --firecracker must be absolute paths (the helper runs them as root)"
            )));
        }
        files.push((
            "banger-helper@.service.d/jailer.conf".to_owned(),
            jailer_drop_in(jailer, firecracker),
        ));
    }
    if print {
        for (name, text) in &files {
            println!("# {name}\n{text}");
        }
        return Ok(0);
    }
    for (name, text) in &files {
        let path = unit_dir.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                ClientError::Other(anyhow::anyhow!(
                    "cannot create {}: {e}; hint: run it as root, or use --print",
                    dir.display()
                ))
            })?;
        }
        std::fs::write(&path, text).map_err(|e| {
            ClientError::Other(anyhow::anyhow!(
                "cannot write {}: {e}; hint: run it as root, or use --print",
                path.display()
            ))
        })?;
        println!("wrote {}", path.display());
    }
    // The user who will run banger: the one behind sudo, else this process's owner.
    let owner = std::env::var("SUDO_UID").unwrap_or_else(|_| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self")
            .map(|m| m.uid().to_string())
            .unwrap_or_else(|_| "UID".into())
    });
    println!(
        "next: install banger-helper to /usr/local/bin, then\n  systemctl daemon-reload && systemctl enable --now banger-helper@{owner}.socket"
    );
    Ok(0)
}
