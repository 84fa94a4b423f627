//! `banger vm …`: create, run, start, stop, pause, resume, suspend, exec, ssh, logs, ls,
//! show, set, rm, snapshot.

use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use banger_proto::{
    ByteSize, CloneVmRequest, ConsoleChunk, CreateSnapshotRequest, CreateVmRequest,
    LifecycleResult, PortChangeRequest, PortList, PullPolicy, SetVmRequest, SetVmResult,
    SnapshotList, SshInfo, StopVmRequest, Vm, VmName, VmSnapshot, VmState,
};
use hyper::Method;

use crate::cli::{CreateArgs, PortAction, PortArgs, PullArg, SnapshotCommand, VmCommand};
use crate::client::{Client, ClientError};
use crate::commands::{print_json, with_progress, workspace};
use crate::output;

pub async fn run(client: &Client, command: VmCommand) -> Result<u8, ClientError> {
    match command {
        VmCommand::Create(args) => create(client, args).await,
        VmCommand::Run(args) => {
            let name = args.name.clone();
            let json = args.json.json;
            create(
                client,
                CreateArgs {
                    json: crate::cli::JsonFlag { json: false },
                    ..args
                },
            )
            .await?;
            start(client, &name, json).await
        }
        VmCommand::Start { name, json } => start(client, &name, json.json).await,
        VmCommand::Stop { name, force, json } => {
            let result: LifecycleResult = with_progress(
                &format!("stopping {name}"),
                client.call(
                    Method::POST,
                    &format!("/v1/vms/{name}/stop"),
                    Some(&StopVmRequest { force }),
                ),
            )
            .await?;
            if json.json {
                print_json(&result)?;
            } else if result.changed {
                println!(
                    "Stopped VM {name} ({})",
                    result.stop_method.map_or("stopped", |m| m.as_str())
                );
            } else {
                println!("VM {name} is not running");
            }
            Ok(0)
        }
        VmCommand::Pause { name, json } => {
            let result: LifecycleResult = client
                .call(Method::POST, &format!("/v1/vms/{name}/pause"), None::<&()>)
                .await?;
            if json.json {
                print_json(&result)?;
            } else if result.changed {
                println!("Paused VM {name}; `banger vm resume {name}` continues it");
            } else {
                println!("VM {name} is already paused");
            }
            Ok(0)
        }
        VmCommand::Resume { name, json } => {
            let result: LifecycleResult = client
                .call(Method::POST, &format!("/v1/vms/{name}/resume"), None::<&()>)
                .await?;
            if json.json {
                print_json(&result)?;
            } else if result.changed {
                println!("Resumed VM {name}");
            } else {
                println!("VM {name} is not paused (it runs)");
            }
            Ok(0)
        }
        VmCommand::Suspend { name, json } => {
            let result: LifecycleResult = with_progress(
                &format!("suspending {name}"),
                client.call(
                    Method::POST,
                    &format!("/v1/vms/{name}/suspend"),
                    None::<&()>,
                ),
            )
            .await?;
            print_warnings(&result);
            if json.json {
                print_json(&result)?;
            } else if result.changed {
                println!("Suspended VM {name}; `banger vm start {name}` restores it");
            } else {
                println!("VM {name} is already suspended");
            }
            Ok(0)
        }
        VmCommand::Exec {
            name,
            auto_prepare,
            command,
        } => {
            let mut info = ssh_info(client, &name).await?;
            check_workspace(client, &name, &mut info, auto_prepare).await?;
            let mut remote = command
                .iter()
                .map(|arg| banger_shared::ssh::shell_quote(arg))
                .collect::<Vec<_>>()
                .join(" ");
            // The image's defaults (a container image's ENV and USER).
            if !info.env.is_empty() {
                let pairs: Vec<String> = info
                    .env
                    .iter()
                    .map(|pair| banger_shared::ssh::shell_quote(pair))
                    .collect();
                remote = format!("env {} {remote}", pairs.join(" "));
            }
            if let Some(user) = &info.exec_user {
                remote = format!(
                    "runuser -u {} -- {remote}",
                    banger_shared::ssh::shell_quote(user)
                );
            }
            if let Some(dir) = info.workdir.as_ref().or(info.exec_workdir.as_ref()) {
                remote = format!("cd {} && {remote}", banger_shared::ssh::shell_quote(dir));
            }
            let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
            Err(exec_ssh(
                &info,
                &[if tty { "-t" } else { "-T" }],
                Some(&remote),
            ))
        }
        VmCommand::Ssh { name, ssh_args } => {
            let info = ssh_info(client, &name).await?;
            let mut args = vec!["-t"];
            args.extend(ssh_args.iter().map(String::as_str));
            Err(exec_ssh(&info, &args, None))
        }
        VmCommand::Workspace(command) => workspace::run(client, command).await,
        VmCommand::Cp { src, dst, json } => super::cp::run(client, &src, &dst, json.json).await,
        VmCommand::Logs { name, follow } => logs(client, &name, follow).await,
        VmCommand::Stats {
            names,
            guest,
            watch,
            json,
        } => stats(client, &names, guest, watch, json.json).await,
        VmCommand::Ls(flag) => {
            let vms: Vec<Vm> = client.call(Method::GET, "/v1/vms", None::<&()>).await?;
            if flag.json {
                print_json(&vms)?;
            } else {
                print!("{}", output::vm_table(&vms));
            }
            Ok(0)
        }
        VmCommand::Port(args) => port(client, args).await,
        VmCommand::Snapshot(command) => snapshot(client, command).await,
        VmCommand::Clone {
            src,
            new,
            snapshot,
            memory,
            json,
        } => {
            let request = CloneVmRequest {
                name: new.to_string(),
                snapshot,
                memory,
            };
            let vm: Vm = with_progress(
                &format!("cloning {src} to {new}"),
                client.call(
                    Method::POST,
                    &format!("/v1/vms/{src}/clone"),
                    Some(&request),
                ),
            )
            .await?;
            if json.json {
                print_json(&vm)?;
            } else {
                println!(
                    "VM {new} cloned from {}; start it with `banger vm start {new}`",
                    vm.cloned_from.as_deref().unwrap_or(src.as_str())
                );
            }
            Ok(0)
        }
        VmCommand::Set {
            name,
            cpus,
            memory,
            disk,
            system_disk,
            json,
        } => {
            let request = SetVmRequest {
                cpus,
                memory_mib: memory.map(ByteSize::mib),
                disk_size_bytes: disk.map(|d| d.0),
                system_disk_size_bytes: system_disk.map(|d| d.0),
            };
            let result: SetVmResult = with_progress(
                &format!("changing {name}"),
                client.call(Method::PATCH, &format!("/v1/vms/{name}"), Some(&request)),
            )
            .await?;
            for warning in &result.warnings {
                eprintln!("{}", output::warning(warning));
            }
            if json.json {
                print_json(&result.vm.spec)?;
            } else {
                print!("{}", output::set_summary(&result));
            }
            Ok(0)
        }
        VmCommand::Show { name, json } => {
            let vm: Vm = client
                .call(Method::GET, &format!("/v1/vms/{name}"), None::<&()>)
                .await?;
            if json.json {
                print_json(&vm)?;
            } else {
                print!("{}", output::vm_details(&vm));
            }
            Ok(0)
        }
        VmCommand::Rm { names, force } => {
            for name in names {
                if force {
                    let _: LifecycleResult = client
                        .call(
                            Method::POST,
                            &format!("/v1/vms/{name}/stop"),
                            Some(&StopVmRequest { force: true }),
                        )
                        .await?;
                }
                client
                    .call::<()>(Method::DELETE, &format!("/v1/vms/{name}"), None::<&()>)
                    .await?;
                println!("Removed VM {name}");
            }
            Ok(0)
        }
    }
}

async fn start(client: &Client, name: &VmName, json: bool) -> Result<u8, ClientError> {
    let result: LifecycleResult = with_progress(
        &format!("starting {name} (waiting for SSH)"),
        client.call(Method::POST, &format!("/v1/vms/{name}/start"), None::<&()>),
    )
    .await?;
    print_warnings(&result);
    if json {
        print_json(&result)?;
    } else if result.changed {
        let from = if result.restored {
            " from its snapshot"
        } else {
            ""
        };
        let how = result
            .vm
            .runtime
            .as_ref()
            .map(|r| {
                let jailed = if r.jail.is_some() { ", jailed" } else { "" };
                format!(" with {} ({}{jailed})", r.vmm, r.accel)
            })
            .unwrap_or_default();
        println!(
            "Started VM {name}{from}{how}; `banger vm exec {name} -- CMD` runs commands in it"
        );
    } else {
        println!("VM {name} is already running");
    }
    Ok(0)
}

/// One `banger: warning: …` line on stderr per warning of a lifecycle operation.
fn print_warnings(result: &LifecycleResult) {
    for warning in &result.warnings {
        eprintln!("{}", output::warning(warning));
    }
}

async fn ssh_info(client: &Client, name: &VmName) -> Result<SshInfo, ClientError> {
    client
        .call(Method::GET, &format!("/v1/vms/{name}/ssh"), None::<&()>)
        .await
}

/// Before `vm exec`: when a workspace was prepared, warns (one line on stderr) if the host
/// differs from it, or with `auto_prepare` resyncs it. With `auto_prepare` and no workspace
/// yet, prepares the current repository. A failing check warns and lets the command run.
async fn check_workspace(
    client: &Client,
    name: &VmName,
    info: &mut SshInfo,
    auto_prepare: bool,
) -> Result<(), ClientError> {
    if info.workdir.is_none() {
        if auto_prepare {
            let path = workspace::host_path(None, false)?;
            let result = workspace::prepare(client, name, &path, false).await?;
            workspace::print_prepared(name, &result);
            info.workdir = Some(banger_shared::GUEST_WORKSPACE_DIR.to_owned());
        }
        return Ok(());
    }
    let status = match workspace::status(client, name, false).await {
        Ok(status) => status,
        Err(e) => {
            eprintln!(
                "{}",
                output::warning(&format!("cannot check the workspace of {name}: {e}"))
            );
            return Ok(());
        }
    };
    if !status.host_dirty {
        return Ok(());
    }
    if auto_prepare {
        let path = status.host_path.clone().unwrap_or_default();
        let result = workspace::prepare(client, name, &path, !status.git).await?;
        workspace::print_prepared(name, &result);
    } else {
        eprintln!("{}", workspace::dirty_warning(name, &status));
    }
    Ok(())
}

/// Replaces this process with `ssh` to the guest, so the terminal, signals, stdin/stdout/
/// stderr and the exit code are the remote command's own. Returns only on failure.
fn exec_ssh(info: &SshInfo, extra: &[&str], remote: Option<&str>) -> ClientError {
    let target = banger_shared::ssh::SshTarget {
        host: info.host.clone(),
        port: info.port,
        user: info.user.clone(),
        identity: info.identity_file.clone().into(),
        known_hosts: info.known_hosts_file.clone().into(),
        host_key_alias: info.host_key_alias.clone(),
        // Connection sharing: repeated execs skip the key exchange.
        control_path: Some(info.control_path.clone().into()),
    };
    // A guest that stopped answering fails the command instead of hanging it.
    let mut args = vec!["-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15"];
    args.extend_from_slice(extra);
    let mut command = target.command(&args);
    if let Some(remote) = remote {
        command.arg("--").arg(remote);
    }
    let err = command.exec();
    ClientError::Other(anyhow::anyhow!(
        "cannot run ssh: {err}; hint: install openssh-client"
    ))
}

async fn logs(client: &Client, name: &VmName, follow: bool) -> Result<u8, ClientError> {
    let mut offset = 0u64;
    let mut stdout = std::io::stdout();
    loop {
        let chunk: ConsoleChunk = client
            .call(
                Method::GET,
                &format!("/v1/vms/{name}/console?offset={offset}"),
                None::<&()>,
            )
            .await?;
        // The console is the guest's: control sequences are shown, not sent.
        let _ = stdout.write_all(crate::output::escape_text(&chunk.data).as_bytes());
        let _ = stdout.flush();
        let more = chunk.next_offset > offset;
        offset = chunk.next_offset;
        if !more && (!follow || !chunk.running) {
            // Why it is not running (e.g. Firecracker's reason for exiting), after its output.
            if let Some(error) = &chunk.last_error {
                eprintln!(
                    "banger: VM {name} is not running: {}",
                    crate::output::escape_line(error)
                );
            }
            return Ok(0);
        }
        if !more {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn snapshot(client: &Client, command: SnapshotCommand) -> Result<u8, ClientError> {
    match command {
        SnapshotCommand::Create {
            name,
            snapshot,
            memory,
            json,
        } => {
            let request = CreateSnapshotRequest {
                name: snapshot,
                memory,
            };
            let taken: VmSnapshot = with_progress(
                &format!("snapshotting {name}"),
                client.call(
                    Method::POST,
                    &format!("/v1/vms/{name}/snapshots"),
                    Some(&request),
                ),
            )
            .await?;
            for warning in &taken.warnings {
                eprintln!("banger: warning: {warning}");
            }
            if json.json {
                print_json(&taken)?;
            } else {
                let what = if taken.memory { " (with memory)" } else { "" };
                println!("snapshot {} of VM {name} taken{what}", taken.name);
            }
        }
        SnapshotCommand::Ls { name, json } => {
            let list: SnapshotList = client
                .call(
                    Method::GET,
                    &format!("/v1/vms/{name}/snapshots"),
                    None::<&()>,
                )
                .await?;
            if json.json {
                print_json(&list)?;
            } else if list.snapshots.is_empty() {
                println!("VM {name} has no snapshots");
            } else {
                print!("{}", output::snapshot_table(&list));
            }
        }
        SnapshotCommand::Restore {
            name,
            snapshot,
            json,
        } => {
            let vm: Vm = with_progress(
                &format!("restoring {name} to {snapshot}"),
                client.call(
                    Method::POST,
                    &format!("/v1/vms/{name}/snapshots/{snapshot}/restore"),
                    None::<&()>,
                ),
            )
            .await?;
            if json.json {
                print_json(&vm)?;
            } else {
                match vm.state {
                    VmState::Suspended => println!(
                        "VM {name} restored to snapshot {snapshot}, with its memory: `banger vm start {name}` resumes it"
                    ),
                    _ => println!("VM {name} restored to snapshot {snapshot}"),
                }
            }
        }
        SnapshotCommand::Rm {
            name,
            snapshot,
            json,
        } => {
            with_progress(
                &format!("removing snapshot {snapshot} of {name}"),
                client.call::<()>(
                    Method::DELETE,
                    &format!("/v1/vms/{name}/snapshots/{snapshot}"),
                    None::<&()>,
                ),
            )
            .await?;
            if json.json {
                print_json(&serde_json::json!({ "vm": name.to_string(), "removed": snapshot }))?;
            } else {
                println!("snapshot {snapshot} of VM {name} removed");
            }
        }
    }
    Ok(0)
}

async fn port(client: &Client, args: PortArgs) -> Result<u8, ClientError> {
    let (name, change, json) = match args.action {
        Some(PortAction::Ls { name, json }) => (name, None, json.json),
        Some(PortAction::Add { name, ports, json }) => (
            name,
            Some(PortChangeRequest {
                add: ports,
                remove: vec![],
            }),
            json.json,
        ),
        Some(PortAction::Rm { name, ports, json }) => (
            name,
            Some(PortChangeRequest {
                add: vec![],
                remove: ports,
            }),
            json.json,
        ),
        None => match args.name {
            Some(name) => (name, None, args.json.json),
            None => {
                eprintln!(
                    "banger: vm port needs a VM name; hint: banger vm port NAME, or banger vm port add|rm NAME PORT..."
                );
                return Ok(1);
            }
        },
    };
    let path = format!("/v1/vms/{name}/ports");
    let list: PortList = match &change {
        None => client.call(Method::GET, &path, None::<&()>).await?,
        Some(change) => client.call(Method::POST, &path, Some(change)).await?,
    };
    if json {
        print_json(&list)?;
    } else if list.ports.is_empty() {
        println!("VM {name} publishes no ports");
    } else {
        for p in &list.ports {
            println!(
                "{}:{} -> {}/{}",
                p.host_ip,
                p.host_port,
                p.guest_port,
                p.proto.as_str()
            );
        }
        if !list.live {
            println!("(VM {name} is not running: they apply at its next start)");
        }
    }
    Ok(0)
}

async fn create(client: &Client, args: CreateArgs) -> Result<u8, ClientError> {
    let request = CreateVmRequest {
        name: args.name.to_string(),
        image: args.image,
        cpus: args.cpus,
        memory_mib: args.memory.map(ByteSize::mib),
        disk_size_bytes: args.disk.map(|d| d.0),
        vmm: args.vmm,
        network: args.network,
        ports: args.publish,
        pull: args.pull.map(|p| match p {
            PullArg::Never => PullPolicy::Never,
            PullArg::Missing => PullPolicy::Missing,
            PullArg::Always => PullPolicy::Always,
        }),
        transfer_id: Some(crate::commands::image::transfer_id()),
    };
    let id = request.transfer_id.clone().unwrap_or_default();
    let vm: Vm = crate::commands::image::with_transfer_progress(
        client,
        &id,
        "pulling the image",
        client.call(Method::POST, "/v1/vms", Some(&request)),
    )
    .await?;
    if args.json.json {
        print_json(&vm)?;
    } else {
        println!(
            "Created VM {} ({} vCPUs, {} memory, {} disk, image {}, {})",
            vm.name,
            vm.spec.cpus,
            ByteSize(vm.spec.memory_mib << 20),
            ByteSize(vm.spec.disk_size_bytes),
            vm.spec.image,
            vm.spec.vmm
        );
    }
    Ok(0)
}

/// `vm stats`: one table (or JSON array), or with `watch` a refresh every 2 s until interrupted
/// (NDJSON, one object per VM and round, with `--json`).
async fn stats(
    client: &Client,
    names: &[VmName],
    guest: bool,
    watch: bool,
    json: bool,
) -> Result<u8, ClientError> {
    let names: Vec<String> = names.iter().map(ToString::to_string).collect();
    let path = format!("/v1/stats?names={}&guest={guest}", names.join(","));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let stats: Vec<banger_proto::VmStats> =
            client.call(Method::GET, &path, None::<&()>).await?;
        match (watch, json) {
            (false, true) => print_json(&stats)?,
            (true, true) => {
                for vm in &stats {
                    println!("{}", serde_json::to_string(vm).unwrap_or_default());
                }
            }
            (true, false) if tty => {
                // Clear the screen and home the cursor, then the fresh table.
                print!("\x1b[2J\x1b[H{}", output::stats_table(&stats));
            }
            _ => print!("{}", output::stats_table(&stats)),
        }
        if !watch {
            return Ok(0);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
