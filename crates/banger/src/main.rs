//! `banger`: the CLI. Parses arguments, then talks only to the daemon (starting it when
//! needed). Errors are one line on stderr with a hint; exit codes are documented in
//! docs/cli.md and on `banger --help`.

mod cli;
mod client;
mod commands;
mod output;

use std::process::ExitCode;

use banger_shared::layout::Layout;
use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};
use crate::client::{Client, ClientError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let op_id = std::env::var("BANGER_OP_ID")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    match run(cli, op_id.clone()) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            // Errors may carry guest stderr: one line, control characters shown.
            let shown = err.to_string();
            eprintln!("banger: {} [op {op_id}]", output::escape_line(&shown));
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(1))
        }
    }
}

/// Prints clap's help/version as usual; a usage error becomes one line and exit 1.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = err.print();
        return if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    eprintln!("banger: {first}; hint: see `banger --help`");
    ExitCode::from(1)
}

fn run(cli: Cli, op_id: String) -> Result<u8, ClientError> {
    match cli.command {
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "banger", &mut std::io::stdout());
            return Ok(0);
        }
        Command::Helper(command) => return commands::network::helper(command),
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| ClientError::Other(e.into()))?;
            return Ok(0);
        }
        _ => {}
    }
    let layout = Layout::from_env().map_err(|e| ClientError::Other(e.into()))?;
    let client = Client::new(layout, op_id);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Other(e.into()))?;
    runtime.block_on(async {
        match cli.command {
            Command::Vm(command) => commands::vm::run(&client, command).await,
            Command::Daemon(command) => commands::daemon::run(&client, command).await,
            Command::Doctor(flag) => commands::doctor::run(&client, flag).await,
            Command::Image(command) => commands::image::run_image(&client, command).await,
            Command::Kernel(command) => commands::image::run_kernel(&client, command).await,
            Command::Network(command) => commands::network::run(&client, command).await,
            Command::SshConfig { install, json } => {
                commands::network::ssh_config(&client, install, json.json).await
            }
            Command::Completions { .. } | Command::Man | Command::Helper(_) => Ok(0),
        }
    })
}
