//! The command-line definition (clap derive). Parsing does no I/O; help, completions and the
//! man page all come from these definitions.

use banger_proto::{ByteSize, VmName};
use clap::{Args, Parser, Subcommand};

/// Run microVMs as persistent, disposable developer sandboxes.
///
/// Exit codes: 0 ok, 1 usage or validation error, 2 not found, 3 daemon unreachable,
/// 4 the VM is in the wrong state for the command.
#[derive(Debug, Parser)]
#[command(name = "banger", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, inspect and remove VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Inspect or stop the background daemon (bangerd).
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (its record and disks; it does not start).
    Create(CreateArgs),
    /// List VMs.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Show one VM.
    Show {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove VMs and their disks. Running VMs must be stopped first.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<VmName>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the VM: a DNS label (a-z, 0-9, '-'), reachable later as NAME.vm.
    pub name: VmName,
    /// Image to boot [default: from config, "default"].
    #[arg(long)]
    pub image: Option<String>,
    /// Number of vCPUs [default: from config, 2].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory, e.g. 2G or 1536 (MiB) [default: from config, 1024M].
    #[arg(long, value_parser = ByteSize::parse_mib)]
    pub memory: Option<ByteSize>,
    /// Work disk size (mounted at /root), e.g. 20G [default: from config, 8G].
    #[arg(long, value_parser = ByteSize::parse)]
    pub disk: Option<ByteSize>,
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Clone, Copy, Args)]
pub struct JsonFlag {
    /// Print JSON (the API's shapes, see docs/api.yaml) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Say whether the daemon runs (exit 3 when it does not); never starts it.
    Status(JsonFlag),
    /// Start the daemon if it is not running.
    Start,
    /// Stop the daemon. Running VMs keep running.
    Stop,
}
