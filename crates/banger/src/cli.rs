//! The command-line definition (clap derive). Parsing does no I/O; help, completions and the
//! man page all come from these definitions.

use banger_proto::{ByteSize, PortMapping, VmName};
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
    /// Build, import, list and remove images (root filesystem + kernel).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Import, list and remove kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Inspect or stop the background daemon (bangerd).
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Check the host: KVM, QEMU, tools, disk space; each problem says how to fix it.
    ///
    /// Exits 0 when nothing fails (warnings allowed), 1 when a check fails.
    Doctor(JsonFlag),
    /// Bridge networking: status, and removing everything banger made.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Write ~/.ssh/config.d/banger (a `Host NAME.vm` block per VM) so `ssh NAME.vm` works.
    SshConfig {
        /// Also add one `Include` line to ~/.ssh/config (idempotent).
        #[arg(long)]
        install: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The root helper (bridge, taps, nftables): systemd units.
    #[command(subcommand)]
    Helper(HelperCommand),
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
    /// Create a VM and start it (`create` + `start`).
    Run(CreateArgs),
    /// Start a VM; returns when its SSH server answers. A running VM is left as it is.
    Start {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Stop a VM without losing data: sync, power off, and force only if the guest hangs.
    /// Stopping a stopped VM does nothing and succeeds.
    Stop {
        name: VmName,
        /// Skip the graceful power-off (a bounded sync is still tried first).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Pause a running VM's vCPUs (like `docker pause`); memory and devices stay as they are.
    /// `vm exec`/`ssh` are refused until `vm resume`. Pausing a paused VM does nothing.
    Pause {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Resume a paused VM. Resuming a running VM does nothing.
    Resume {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Suspend a VM to disk (like `multipass suspend`): sync, pause, save memory and device
    /// state in the VM's directory (checksummed), end the VMM. `vm start` restores it.
    Suspend {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Run a command in a running VM; its stdin, stdout, stderr and exit code pass through.
    ///
    /// Runs in /root/repo once a workspace was prepared (else in /root), and warns on stderr
    /// when the host repository differs from what was prepared.
    Exec {
        name: VmName,
        /// Resync the workspace first when the host differs from the last prepare.
        #[arg(long)]
        auto_prepare: bool,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Copy a host git repository into the VM (/root/repo), check it, copy changes back.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Copy a file, symlink or directory between the host and a running VM.
    ///
    /// Exactly one of SRC and DST is in the VM, written NAME:PATH (a relative PATH is under
    /// /root; write a host path containing ':' as ./PATH). Like `cp -r`: an existing
    /// directory receives SRC under its own name, anything else becomes the copy. Modes and
    /// symlinks are kept; symlinks are never followed. From the VM, the guest is not trusted:
    /// modes are masked to 0644/0755, and `.git` paths, special files and symlinks pointing
    /// out of the copy are skipped (and listed); nothing is written unless all of it is.
    Cp {
        /// Source: a host path or NAME:PATH.
        src: String,
        /// Destination: a host path or NAME:PATH.
        dst: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Open an interactive shell in a running VM (OpenSSH client).
    Ssh {
        name: VmName,
        /// Extra arguments for ssh (after `--`).
        #[arg(last = true)]
        ssh_args: Vec<String>,
    },
    /// Print the VM's serial console.
    Logs {
        name: VmName,
        /// Keep printing new output while the VM runs.
        #[arg(short, long)]
        follow: bool,
    },
    /// Show what VMs cost: VMM CPU and memory, disk bytes allocated on the host, network,
    /// uptime (all VMs when no name is given). Figures that cannot be known are left out.
    Stats {
        names: Vec<VmName>,
        /// Also ask each running guest (load, memory, filesystems, interface counters).
        #[arg(long)]
        guest: bool,
        /// Refresh every 2 s, like `docker stats` (a table on a terminal, NDJSON with --json).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List VMs.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// List or change a VM's published ports (`-p` of `vm create|run`).
    Port(PortArgs),
    /// Named snapshots of a QEMU VM's disks: take, list, restore, remove.
    ///
    /// A snapshot freezes both disks of a stopped VM without copying them (the VM continues
    /// on new qcow2 overlays over them). `*` in `ls` marks the snapshot the VM's disks
    /// continue from.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Make a new VM from a snapshot of a QEMU VM, without copying its disks.
    ///
    /// Without --snapshot, a snapshot `clone-NEW` of SRC is taken first (of its disks as they
    /// are; a running SRC is frozen for an instant and runs on). The clone gets its own name,
    /// MAC, address and machine-id, and at its first start its own SSH host key. SRC cannot
    /// be removed while the clone exists. A memory snapshot's clone boots from its disks.
    Clone {
        src: VmName,
        new: VmName,
        /// Clone this snapshot of SRC instead of taking one.
        #[arg(long)]
        snapshot: Option<String>,
        /// Resume the clone from a memory snapshot instead of booting it: refused (the
        /// clone would run with its source's identity in memory).
        #[arg(long, hide = true)]
        memory: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Change a VM's vCPUs, memory or disk sizes. CPUs, memory and the system disk change
    /// while the VM is stopped (its next start uses them); the work disk also grows while a
    /// QEMU VM runs (/root grows at once). Disks only grow; a smaller size is refused and
    /// nothing changes. More vCPUs or memory than this host has are refused.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)
        .args(["cpus", "memory", "disk", "system_disk"])))]
    Set {
        name: VmName,
        /// Number of vCPUs (at most the host's CPUs).
        #[arg(long)]
        cpus: Option<u32>,
        /// Guest memory, e.g. 2G or 1536 (MiB); at most the host's memory.
        #[arg(long, value_parser = ByteSize::parse_mib)]
        memory: Option<ByteSize>,
        /// Work disk size (/root), e.g. 20G: at least its current size.
        #[arg(long, value_parser = ByteSize::parse)]
        disk: Option<ByteSize>,
        /// System disk size (/), e.g. 16G: at least its current size; the guest grows / into
        /// it at its next boot.
        #[arg(long, value_parser = ByteSize::parse)]
        system_disk: Option<ByteSize>,
        /// Print the new spec as JSON.
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show one VM.
    Show {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove VMs and their disks. Running VMs must be stopped first, or given `--force`.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<VmName>,
        /// Stop a running, paused or suspended VM first, as `vm stop --force` does (a bounded
        /// guest sync, then the VMM ends).
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a VM's disks (stopped, running or paused; a running guest's
    /// filesystems are frozen for the instant of the switch).
    Create {
        name: VmName,
        /// The snapshot's name [default: snap-YYYYMMDD-HHMMSS, UTC].
        snapshot: Option<String>,
        /// Also save the running VM's memory and devices (QEMU, running or paused VM): after
        /// `vm snapshot restore`, `vm start` resumes it where it was instead of booting.
        #[arg(long)]
        memory: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List a VM's snapshots, oldest first.
    #[command(alias = "list")]
    Ls {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Put a stopped VM's disks back to a snapshot: what was written since is lost. A
    /// memory snapshot leaves the VM suspended there: `vm start` resumes it.
    Restore {
        name: VmName,
        snapshot: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove a snapshot. What continues from it (later snapshots, the VM's disks) is
    /// rebased off it first (this copies into them what only it held; the VM must be stopped
    /// then). Refused while a clone continues from it.
    #[command(alias = "remove")]
    Rm {
        name: VmName,
        snapshot: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Copy a git repository (tracked + untracked-not-ignored files and .git) into the VM's
    /// /root/repo; later prepares send only what changed and delete what was deleted.
    Prepare {
        name: VmName,
        /// Directory to copy [default: the current git repository's top level].
        path: Option<std::path::PathBuf>,
        /// Copy a plain directory (every file under it) instead of a git repository.
        #[arg(long)]
        no_git: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show what was prepared (host path, commit, time) and what differs now.
    Status {
        name: VmName,
        /// Also compare the guest's files with what was prepared (VM must run).
        #[arg(long)]
        guest: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Copy the guest's changes since the last prepare back: a patch for `git apply`, or files.
    #[command(group(clap::ArgGroup::new("dest").required(true).args(["patch", "to"])))]
    Export {
        name: VmName,
        /// Write a git patch (binary-safe) to FILE.
        #[arg(long, value_name = "FILE")]
        patch: Option<std::path::PathBuf>,
        /// Write the added and modified files under DIR.
        #[arg(long, value_name = "DIR")]
        to: Option<std::path::PathBuf>,
        #[command(flatten)]
        json: JsonFlag,
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
    /// VMM backend: auto (Firecracker when usable, else QEMU), firecracker or qemu
    /// [default: from config, auto].
    #[arg(long, value_parser = ["auto", "firecracker", "qemu"])]
    pub vmm: Option<String>,
    /// Network: `bridge` (root helper; NAME.vm resolves), `user` (rootless, outbound
    /// network) or `isolated` (rootless, no outbound network)
    /// [default: bridge when the helper answers, else user (isolated with network.egress = false)].
    #[arg(long, visible_alias = "net", value_parser = ["bridge", "user", "isolated"])]
    pub network: Option<String>,
    /// When --image is a registry reference (HOST/REPO:TAG): pull it `never`, when
    /// `missing` (default) or `always`.
    #[arg(long, value_enum)]
    pub pull: Option<PullArg>,
    /// Publish a guest port on the host: [HOSTIP:]HOSTPORT:GUESTPORT[/udp] (docker's syntax;
    /// host address 127.0.0.1 unless given). Repeatable. User and isolated networks.
    #[arg(short = 'p', long = "publish", value_name = "PORT", value_parser = parse_port)]
    pub publish: Vec<PortMapping>,
    #[command(flatten)]
    pub json: JsonFlag,
}

/// `image build --kernel` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KernelArg {
    Microvm,
    Debian,
}

/// `--pull` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PullArg {
    Never,
    Missing,
    Always,
}

/// How to reach a registry.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry user name [default: from ~/.docker/config.json].
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password (or token) from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
}

fn parse_port(text: &str) -> Result<PortMapping, String> {
    PortMapping::parse(text).map_err(|e| e.to_string())
}

/// `vm port NAME`, or `vm port add|rm|ls NAME ...`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PortArgs {
    #[command(subcommand)]
    pub action: Option<PortAction>,
    /// The VM whose published ports to list.
    pub name: Option<VmName>,
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Subcommand)]
pub enum PortAction {
    /// List the VM's published ports.
    Ls {
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Publish ports; a running VM gets them at once, without a restart.
    Add {
        name: VmName,
        /// [HOSTIP:]HOSTPORT:GUESTPORT[/udp], one or more.
        #[arg(required = true, value_parser = parse_port)]
        ports: Vec<PortMapping>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Unpublish ports (named by their host side; the guest port may be anything).
    Rm {
        name: VmName,
        /// [HOSTIP:]HOSTPORT[:GUESTPORT][/udp], one or more.
        #[arg(required = true, value_parser = parse_host_port)]
        ports: Vec<PortMapping>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// A host side for `vm port rm`: `[HOSTIP:]HOSTPORT[/udp]`, or a whole mapping.
fn parse_host_port(text: &str) -> Result<PortMapping, String> {
    if let Ok(p) = PortMapping::parse(text) {
        return Ok(p);
    }
    // Without the guest port: give it one (ignored when matching).
    let (ports, proto) = match text.rsplit_once('/') {
        Some((ports, proto)) => (ports, format!("/{proto}")),
        None => (text, String::new()),
    };
    PortMapping::parse(&format!("{ports}:1{proto}")).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Show the helper, bridge, taps, nftables table, DNS server and leases.
    Status(JsonFlag),
    /// Remove every tap, the bridge and the nftables table (bridge VMs must be stopped).
    Down(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum HelperCommand {
    /// Write the systemd units (banger-helper@.socket/.service) and say how to enable them;
    /// with --print, print them instead. With --jailer and --firecracker, also the drop-in
    /// that lets the helper run Firecracker's jailer with those binaries (pinned in the
    /// helper's command line: the daemon never names what root runs).
    Install {
        /// Print the units on stdout instead of writing them.
        #[arg(long)]
        print: bool,
        /// Where to write the units.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: std::path::PathBuf,
        /// Firecracker's jailer (absolute; root-owned, nobody else may write it or a
        /// directory above it).
        #[arg(long, requires = "firecracker")]
        jailer: Option<std::path::PathBuf>,
        /// The Firecracker binary the jailer runs (same rules; its name contains
        /// "firecracker").
        #[arg(long, requires = "jailer")]
        firecracker: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, Args)]
pub struct JsonFlag {
    /// Print JSON (the API's shapes, see docs/api.yaml) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the default Debian image (mmdebstrap, no root needed) and its kernel, or an
    /// image from a container image (--from).
    Build {
        /// Image name.
        #[arg(default_value = "default")]
        name: String,
        /// Debian mirror URL [default: the host's apt configuration].
        #[arg(long)]
        mirror: Option<String>,
        /// Rebuild even when the image of this recipe exists.
        #[arg(long)]
        force: bool,
        /// A directory whose tree each new VM's /root (work disk) starts with: dotfiles,
        /// pre-fetched caches. Stored with the image (symlinks kept as links), pushed and
        /// pulled with it; every file is the guest root's.
        #[arg(long, value_name = "DIR")]
        work_seed: Option<std::path::PathBuf>,
        /// Build from a container image instead: HOST[:PORT]/REPO[:TAG] in a registry, or
        /// oci:DIR[:TAG] (an OCI image layout). Its layers become the root filesystem;
        /// systemd, openssh-server and banger's guest setup are added with its own apt
        /// (Debian-family images only) from the host's apt mirror (or --mirror); its ENV,
        /// WORKDIR and USER become `vm exec`'s defaults; it boots the default kernel.
        #[arg(long, value_name = "REF")]
        from: Option<String>,
        /// Allow plain HTTP to a --from registry that is not on loopback.
        #[arg(long, requires = "from")]
        insecure: bool,
        /// The kernel a recipe image boots: `microvm` (banger's own: no initrd, faster
        /// boots; compiled once per recipe, minutes, then cached) or `debian` (Debian's cloud
        /// kernel with its initrd and modules).
        #[arg(long, value_enum, default_value = "microvm", conflicts_with = "from")]
        kernel: KernelArg,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Register local files as an image.
    Import {
        name: String,
        /// Raw ext4 root filesystem.
        #[arg(long)]
        rootfs: std::path::PathBuf,
        /// Kernel file (ELF vmlinux or bzImage), or the name of a stored kernel.
        #[arg(long)]
        kernel: String,
        /// Initrd for a kernel file.
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        /// A directory whose tree each new VM's /root starts with (as for `image build`).
        #[arg(long, value_name = "DIR")]
        work_seed: Option<std::path::PathBuf>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List images.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Show one image.
    Show {
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove an image no VM uses.
    #[command(alias = "remove")]
    Rm { name: String },
    /// Push an image (rootfs, kernel, initrd) to a registry as one OCI artifact.
    Push {
        name: String,
        /// Where to: HOST[:PORT]/REPOSITORY:TAG.
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Pull an image from a registry (only the blobs not stored yet).
    Pull {
        /// HOST[:PORT]/REPOSITORY:TAG or …@sha256:DIGEST.
        reference: String,
        /// Local name [default: the repository's last component and the tag, e.g. dev-1].
        name: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Register a kernel (and initrd) from local files.
    Import {
        name: String,
        /// Kernel file (ELF vmlinux or bzImage).
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Build banger's microVM kernel from Debian's linux-source-6.1 package (no root needed).
    ///
    /// Boots under Firecracker and under QEMU with its devices on the kernel command line, no
    /// initrd. Minutes on a small machine the first time; cached by recipe digest (and under
    /// $BANGER_CACHE_DIR when set).
    Build {
        /// Kernel name.
        #[arg(default_value = "microvm")]
        name: String,
        /// Rebuild even when this recipe's kernel is stored or cached.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List kernels and what they can boot.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Show one kernel and what it can boot.
    Show {
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove a kernel no image uses.
    #[command(alias = "remove")]
    Rm { name: String },
    /// Push a kernel (and initrd) to a registry as one OCI artifact.
    Push {
        name: String,
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Pull a kernel from a registry.
    Pull {
        reference: String,
        name: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        json: JsonFlag,
    },
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
