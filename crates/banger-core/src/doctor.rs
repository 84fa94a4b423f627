//! `banger doctor`: checks of the host banger runs on (KVM, QEMU and its microvm machine, the
//! tools the daemon runs, free disk space, /dev/net/tun), each a [`DoctorCheck`] row whose
//! `fix` says what to do when it is not `ok`. The checks are plain functions over what they
//! inspect (paths, a PATH value, command output), so tests can feed them fakes;
//! [`run_checks`] applies them to this host. The default-image check needs the store and is
//! added by [`crate::service::Manager::doctor`].

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use banger_proto::{CheckStatus, DoctorCheck, DoctorReport, Image};

use crate::config::Config;
use crate::domain::AccelMode;
use crate::layout::Layout;
use crate::vmm::accel::kvm_ruled_out;

const GIB: u64 = 1 << 30;
/// Below this much free space in the data dir's file system: `warn`.
pub const WARN_FREE_BYTES: u64 = 5 * GIB;
/// Below this much: `fail` (a single work disk, even sparse, will not fit for long).
pub const FAIL_FREE_BYTES: u64 = GIB;
/// Oldest e2fsprogs whose `mkfs.ext4` has `-d` (populate from a directory).
pub const MIN_E2FSPROGS: [u32; 2] = [1, 43];
/// How long a `--version`-style probe of a tool may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Directories holding admin tools that are often not on a normal user's PATH.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];
/// Suffix of every fix that installs a Debian package.
const INSTALL_DEPS: &str = "(or run scripts/install-deps)";

/// A row with status `ok`.
fn ok(name: &str, detail: impl Into<String>) -> DoctorCheck {
    DoctorCheck {
        name: name.to_owned(),
        status: CheckStatus::Ok,
        detail: detail.into(),
        fix: None,
    }
}

/// A `warn` or `fail` row; these always say how to fix them.
fn problem(
    name: &str,
    status: CheckStatus,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> DoctorCheck {
    DoctorCheck {
        name: name.to_owned(),
        status,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Runs every host check against this machine, in the order `banger doctor` prints them.
pub async fn run_checks(config: &Config, layout: &Layout) -> DoctorReport {
    let path_var = std::env::var_os("PATH");
    let path_var = path_var.as_deref();
    let mut checks = vec![
        check_kvm(
            config.qemu.accel,
            Path::new("/dev/kvm"),
            Path::new("/sys/module"),
        ),
        check_qemu(&config.qemu.binary, path_var).await,
    ];
    for tool in &TOOLS {
        checks.push(check_tool(tool, path_var).await);
    }
    checks.push(check_disk_space(layout.data_dir()));
    checks.push(check_tun(Path::new("/dev/net/tun")));
    DoctorReport::from_checks(checks)
}

/// KVM or only TCG. Without usable KVM banger still works (TCG), only slower: `warn`, unless
/// the config forces KVM, which then cannot start VMs: `fail`.
pub fn check_kvm(accel: AccelMode, dev_kvm: &Path, sys_module: &Path) -> DoctorCheck {
    const NAME: &str = "kvm";
    if accel == AccelMode::Tcg {
        return ok(NAME, "TCG forced by config (qemu.accel = \"tcg\")");
    }
    let Some(why) = kvm_ruled_out(dev_kvm, sys_module) else {
        return ok(
            NAME,
            format!(
                "KVM device usable{} (a probe boot at first start confirms)",
                if accel == AccelMode::Kvm {
                    ", forced by config"
                } else {
                    ""
                }
            ),
        );
    };
    if accel == AccelMode::Kvm {
        return problem(
            NAME,
            CheckStatus::Fail,
            format!("qemu.accel = \"kvm\" in the config, but {why}"),
            "set qemu.accel = \"auto\" in the config file so VMs fall back to TCG",
        );
    }
    let fix = if sys_module.join("kvm_pvm").exists() {
        "nothing is broken: VMs run under TCG; for KVM speed run banger on a host with \
         hardware virtualization (set qemu.accel = \"tcg\" to accept TCG and silence this)"
            .to_owned()
    } else {
        format!(
            "enable hardware virtualization (VT-x/AMD-V) in the firmware, load the module \
             (`modprobe kvm_intel` or `modprobe kvm_amd`) and give bangerd's user read-write \
             access to {} (`usermod -aG kvm USER`)",
            dev_kvm.display()
        )
    };
    problem(
        NAME,
        CheckStatus::Warn,
        format!("{why}; VMs run under TCG (software emulation, slower)"),
        fix,
    )
}

/// The QEMU binary: present, answers `--version`, and has the `microvm` machine type.
pub async fn check_qemu(binary: &str, path_var: Option<&OsStr>) -> DoctorCheck {
    const NAME: &str = "qemu";
    let fix = format!(
        "apt-get install qemu-system-x86 {INSTALL_DEPS}; for another QEMU, set qemu.binary \
         in the config file to its path"
    );
    let Some(path) = resolve_binary(binary, path_var) else {
        let detail = if binary.contains('/') {
            format!("{binary} (qemu.binary) does not exist or is not executable")
        } else {
            format!("{binary} (qemu.binary) is not on bangerd's PATH")
        };
        return problem(NAME, CheckStatus::Fail, detail, fix);
    };
    let shown = path.display();
    let version = match probe(&path, &["--version"]).await {
        Ok(text) => match parse_qemu_version(&text) {
            Some(version) => version,
            None => {
                return problem(
                    NAME,
                    CheckStatus::Fail,
                    format!(
                        "{shown} --version does not look like QEMU: {}",
                        first_line(&text)
                    ),
                    fix,
                );
            }
        },
        Err(why) => return problem(NAME, CheckStatus::Fail, why, fix),
    };
    match probe(&path, &["-M", "help"]).await {
        Ok(text) if has_microvm(&text) => ok(
            NAME,
            format!("QEMU {version} ({shown}), machine type microvm available"),
        ),
        Ok(_) => problem(
            NAME,
            CheckStatus::Fail,
            format!("QEMU {version} ({shown}) lacks the microvm machine type"),
            format!("install QEMU 4.2 or newer built with microvm: {fix}"),
        ),
        Err(why) => problem(NAME, CheckStatus::Fail, why, fix),
    }
}

/// The version in `qemu --version` output ("QEMU emulator version 7.2.22 (Debian …)").
pub fn parse_qemu_version(text: &str) -> Option<String> {
    let (_, rest) = first_line(text).split_once("QEMU emulator version ")?;
    let version = rest.split_whitespace().next()?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}

/// Whether `qemu -M help` lists the microvm machine type.
pub fn has_microvm(machine_help: &str) -> bool {
    machine_help
        .lines()
        .any(|line| line.split_whitespace().next() == Some("microvm"))
}

/// The version in `mkfs.ext4 -V` output ("mke2fs 1.47.0 (5-Feb-2023)"), as numbers.
pub fn parse_e2fsprogs_version(text: &str) -> Option<Vec<u32>> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("mke2fs "))?;
    parse_dotted(line.split_whitespace().nth(1)?)
}

/// "1.46.5" → [1, 46, 5]; each part's leading digits count ("5-2ubuntu" → 5).
fn parse_dotted(text: &str) -> Option<Vec<u32>> {
    text.split('.')
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

fn dotted(version: &[u32]) -> String {
    version
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// A tool the daemon runs.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    /// The Debian package that ships it.
    pub package: &'static str,
    /// What needs it, for the row's detail.
    pub needed_by: &'static str,
    /// Missing means core commands fail (`fail`), rather than only `image build` (`warn`).
    pub required: bool,
    /// The daemon runs it by name, so it must be on bangerd's PATH; `image build` tools run
    /// as root and are also accepted in /usr/sbin and /sbin.
    pub must_be_on_path: bool,
}

/// The tools `banger doctor` looks for, in order.
pub const TOOLS: [Tool; 9] = [
    Tool {
        name: "qemu-img",
        package: "qemu-utils",
        needed_by: "vm create (qcow2 system disks)",
        required: true,
        must_be_on_path: true,
    },
    Tool {
        name: "mkfs.ext4",
        package: "e2fsprogs",
        needed_by: "vm create (work disks)",
        required: true,
        must_be_on_path: true,
    },
    Tool {
        name: "ssh",
        package: "openssh-client",
        needed_by: "vm start, exec and ssh",
        required: true,
        must_be_on_path: true,
    },
    Tool {
        name: "ssh-keygen",
        package: "openssh-client",
        needed_by: "vm create (SSH keys)",
        required: true,
        must_be_on_path: true,
    },
    Tool {
        name: "debugfs",
        package: "e2fsprogs",
        needed_by: "vm create (work disk owners)",
        required: true,
        must_be_on_path: false,
    },
    Tool {
        name: "mmdebstrap",
        package: "mmdebstrap",
        needed_by: "image build",
        required: false,
        must_be_on_path: false,
    },
    Tool {
        name: "newuidmap",
        package: "uidmap",
        needed_by: "image build as a non-root user",
        required: false,
        must_be_on_path: false,
    },
    Tool {
        name: "cpio",
        package: "cpio",
        needed_by: "image build (the initrd)",
        required: false,
        must_be_on_path: false,
    },
    Tool {
        name: "busybox",
        package: "busybox-static",
        needed_by: "image build (the initrd)",
        required: false,
        must_be_on_path: false,
    },
];

/// Where a tool was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    /// Found through PATH (rather than in one of the extra directories).
    pub on_path: bool,
}

/// The first executable `tool` in the directories of `path_var`, then in `extra_dirs`.
pub fn find_tool(tool: &str, path_var: Option<&OsStr>, extra_dirs: &[&Path]) -> Option<Found> {
    if let Some(path) = crate::which::in_path(tool, path_var) {
        return Some(Found {
            path,
            on_path: true,
        });
    }
    extra_dirs
        .iter()
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .map(|path| Found {
            path,
            on_path: false,
        })
}

use crate::which::is_executable;

/// `binary` as the daemon would run it: a path as given, a bare name through PATH.
fn resolve_binary(binary: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if binary.contains('/') {
        let path = PathBuf::from(binary);
        is_executable(&path).then_some(path)
    } else {
        crate::which::in_path(binary, path_var)
    }
}

/// One [`Tool`]: found where the daemon can run it, and for mkfs.ext4 new enough for `-d`.
pub async fn check_tool(tool: &Tool, path_var: Option<&OsStr>) -> DoctorCheck {
    let install = format!("apt-get install {} {INSTALL_DEPS}", tool.package);
    let missing_status = if tool.required {
        CheckStatus::Fail
    } else {
        CheckStatus::Warn
    };
    let sbin: Vec<&Path> = SBIN_DIRS.iter().map(Path::new).collect();
    let Some(found) = find_tool(tool.name, path_var, &sbin) else {
        return problem(
            tool.name,
            missing_status,
            format!("not installed (needed by {})", tool.needed_by),
            install,
        );
    };
    let shown = found.path.display().to_string();
    if !found.on_path && tool.must_be_on_path {
        let dir = found
            .path
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        return problem(
            tool.name,
            missing_status,
            format!(
                "found at {shown}, but {dir} is not on bangerd's PATH (needed by {})",
                tool.needed_by
            ),
            format!(
                "add {dir} to PATH (`export PATH=$PATH:{dir}`), then `banger daemon stop` so \
                 the next command starts bangerd with it"
            ),
        );
    }
    if tool.name == "mkfs.ext4" {
        return match probe(&found.path, &["-V"]).await {
            Ok(text) => {
                let mut check = mkfs_version_check(&shown, &text);
                // What `vm create` does with this mkfs.ext4 (disk::work_disk_extended_options).
                if check.status == CheckStatus::Ok {
                    let prezeroed = crate::disk::mkfs_knows_prezeroed(&found.path).await;
                    check.detail.push_str(if prezeroed {
                        "; work disks: assume_storage_prezeroed"
                    } else {
                        "; work disks: lazy init (no assume_storage_prezeroed before 1.47)"
                    });
                }
                check
            }
            Err(why) => problem(tool.name, CheckStatus::Fail, why, install),
        };
    }
    ok(tool.name, shown)
}

/// The mkfs.ext4 row from its `-V` output: `-d` needs e2fsprogs 1.43.
pub fn mkfs_version_check(path: &str, version_output: &str) -> DoctorCheck {
    const NAME: &str = "mkfs.ext4";
    let install = format!("apt-get install e2fsprogs {INSTALL_DEPS} (1.43 or newer)");
    match parse_e2fsprogs_version(version_output) {
        Some(version) if version.as_slice() >= MIN_E2FSPROGS.as_slice() => {
            ok(NAME, format!("{path} (e2fsprogs {})", dotted(&version)))
        }
        Some(version) => problem(
            NAME,
            CheckStatus::Fail,
            format!(
                "{path} is e2fsprogs {}; work disks need 1.43 or newer (mkfs.ext4 -d)",
                dotted(&version)
            ),
            install,
        ),
        None => problem(
            NAME,
            CheckStatus::Warn,
            format!(
                "{path}: cannot tell the e2fsprogs version from `-V`: {}",
                first_line(version_output)
            ),
            install,
        ),
    }
}

/// Free space of the file system holding `dir` (or its nearest existing ancestor).
pub fn check_disk_space(dir: &Path) -> DoctorCheck {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    match nix::sys::statvfs::statvfs(existing) {
        Ok(stat) => {
            // Blocks available to unprivileged users, in fragment-size units (x86_64: u64).
            let free = stat.blocks_available().saturating_mul(stat.fragment_size());
            disk_space_check(dir, free)
        }
        Err(e) => problem(
            "disk-space",
            CheckStatus::Warn,
            format!("cannot tell the free space of {}: {e}", existing.display()),
            format!("check that {} is readable by bangerd", existing.display()),
        ),
    }
}

/// The disk-space row for `free_bytes` available to bangerd in `dir`'s file system.
pub fn disk_space_check(dir: &Path, free_bytes: u64) -> DoctorCheck {
    const NAME: &str = "disk-space";
    let gib = free_bytes as f64 / GIB as f64;
    let detail = format!("{gib:.1} GiB free in {} (the data dir)", dir.display());
    let status = if free_bytes < FAIL_FREE_BYTES {
        CheckStatus::Fail
    } else if free_bytes < WARN_FREE_BYTES {
        CheckStatus::Warn
    } else {
        return ok(NAME, detail);
    };
    problem(
        NAME,
        status,
        format!("{detail}; images and VM disks need at least 5 GiB"),
        "free space on that file system (`banger vm rm` VMs you no longer need, `banger image \
         rm` unused images), or point BANGER_HOME at a larger one",
    )
}

/// /dev/net/tun, which bridge networking will need.
pub fn check_tun(dev_tun: &Path) -> DoctorCheck {
    const NAME: &str = "tun";
    if dev_tun.exists() {
        ok(NAME, format!("{} present", dev_tun.display()))
    } else {
        problem(
            NAME,
            CheckStatus::Warn,
            format!(
                "{} is missing (bridge networking will need it; user networking works)",
                dev_tun.display()
            ),
            "modprobe tun (and add `tun` to /etc/modules to keep it)",
        )
    }
}

/// Whether the image `vm create` uses by default (`defaults.image`) is in the store.
pub fn default_image_check(name: &str, image: Option<&Image>) -> DoctorCheck {
    const NAME: &str = "default-image";
    match image {
        Some(image) => ok(
            NAME,
            format!("image {name:?} present (kernel {:?})", image.kernel),
        ),
        None => problem(
            NAME,
            CheckStatus::Warn,
            format!("no image {name:?} (defaults.image); `vm create` without --image needs it"),
            "run `banger image build` (as root), or `banger image import` a root filesystem",
        ),
    }
}

/// The Firecracker row: its version, or why VMs use QEMU.
pub fn firecracker_check(version: Result<(u32, u32, u32), String>) -> DoctorCheck {
    const NAME: &str = "firecracker";
    match version {
        Ok((a, b, c)) => ok(
            NAME,
            format!("firecracker {a}.{b}.{c} (needs KVM and bridge networking too)"),
        ),
        Err(why) => problem(
            NAME,
            CheckStatus::Warn,
            format!("not usable ({why}); VMs use QEMU"),
            "install Firecracker >= 1.5 on PATH or set firecracker.binary; see docs/firecracker.md",
        ),
    }
}

/// The containment row: Firecracker's jailer when `firecracker.jailer` is set (and whether
/// it is there), else the per-VM cgroup v2 leaf.
pub fn jailer_check(configured: &str, resolved: Result<Option<String>, String>) -> DoctorCheck {
    const NAME: &str = "jailer";
    match resolved {
        Ok(Some(path)) => ok(
            NAME,
            format!("Firecracker VMs start through the jailer {path} (run by banger-helper)"),
        ),
        Ok(None) => ok(
            NAME,
            "not configured: Firecracker VMs run unjailed in a cgroup v2 leaf when writable \
             (set firecracker.jailer to use Firecracker's jailer)",
        ),
        Err(why) => problem(
            NAME,
            CheckStatus::Fail,
            format!("firecracker.jailer = {configured:?}: {why}"),
            "install Firecracker's `jailer` there, or remove firecracker.jailer from the config file",
        ),
    }
}

/// Which raw system-disk strategy Firecracker VMs get on this data dir, and why; and whether
/// the `dm` strategy could be used (it needs banger-helper and /dev/mapper/control), when the
/// reason does not say it already.
pub fn system_disk_check(
    strategy: crate::disk::SystemDiskStrategy,
    reason: &str,
    dm: &Result<(), String>,
) -> DoctorCheck {
    use crate::disk::SystemDiskStrategy;
    let dm_note = match (strategy, dm) {
        (SystemDiskStrategy::Reflink, Ok(())) => {
            "; dm: available (banger-helper answers, /dev/mapper/control exists)".to_owned()
        }
        (SystemDiskStrategy::Reflink, Err(why)) => format!("; dm: unavailable ({why})"),
        _ => String::new(),
    };
    ok(
        "system-disk",
        format!(
            "QEMU: qcow2 overlays; raw (Firecracker): {} ({reason}){dm_note}",
            strategy.as_str()
        ),
    )
}

/// What `banger network status` found, as doctor rows: helper, bridge, nft table, DNS.
pub fn network_checks(status: &banger_proto::NetworkStatus) -> Vec<DoctorCheck> {
    if status.mode == "user" {
        return vec![ok(
            "helper",
            "network.mode = \"user\": VMs use user-mode networking",
        )];
    }
    if !status.helper {
        return vec![problem(
            "helper",
            CheckStatus::Warn,
            format!(
                "no root helper answers on {} ({}); VMs use user-mode networking, no NAME.vm",
                status.helper_socket,
                status.helper_error.as_deref().unwrap_or("not reachable")
            ),
            "sudo banger helper install, then systemctl enable --now banger-helper@$(id -u).socket",
        )];
    }
    let on_demand = "it is made at the first bridge VM start (or `banger vm start` one)";
    let row = |name: &str, up: bool, detail: String| {
        if up {
            ok(name, detail)
        } else {
            problem(name, CheckStatus::Warn, detail, on_demand)
        }
    };
    vec![
        ok(
            "helper",
            format!("root helper answers on {}", status.helper_socket),
        ),
        row(
            "bridge",
            status.bridge_up,
            format!(
                "{} {} (gateway {})",
                status.bridge.as_deref().unwrap_or("bridge"),
                if status.bridge_up { "up" } else { "down" },
                status.gateway.as_deref().unwrap_or("unknown")
            ),
        ),
        row(
            "nft-table",
            status.nft_table,
            format!(
                "nftables table ip {} {}",
                status.table.as_deref().unwrap_or("banger_<uid>"),
                if status.nft_table {
                    "present"
                } else {
                    "absent"
                }
            ),
        ),
        row(
            "dns",
            status.dns.is_some(),
            match &status.dns {
                Some(addr) => format!("NAME.vm answered on {addr}"),
                None => "the NAME.vm DNS server is not running".into(),
            },
        ),
    ]
}

/// Whether the host sends `*.vm` queries to banger's DNS: `resolvectl status BRIDGE`
/// output (None when resolvectl is absent).
pub fn vm_routing_check(
    resolvectl: Option<&str>,
    bridge: &str,
    gateway: Option<&str>,
) -> DoctorCheck {
    const NAME: &str = "vm-routing";
    let gateway = gateway.unwrap_or("172.30.0.1");
    match resolvectl {
        Some(out) if out.contains("~vm") => {
            ok(NAME, format!("systemd-resolved routes ~vm to {bridge}"))
        }
        Some(_) => problem(
            NAME,
            CheckStatus::Warn,
            format!("systemd-resolved does not route .vm names to {bridge}"),
            format!("resolvectl dns {bridge} {gateway}; resolvectl domain {bridge} ~vm"),
        ),
        None => problem(
            NAME,
            CheckStatus::Warn,
            "no systemd-resolved: the host does not resolve NAME.vm (ssh NAME.vm works through `banger ssh-config`)",
            format!(
                "with dnsmasq: server=/vm/{gateway}; or add `nameserver {gateway}` for .vm lookups"
            ),
        ),
    }
}

/// Runs `program args` with a deadline; its stdout and stderr together when it exits 0, else
/// why not (tools print versions on either stream).
async fn probe(program: &Path, args: &[&str]) -> Result<String, String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let output = match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("cannot run {shown}: {e}")),
        Err(_) => {
            return Err(format!(
                "{shown} did not answer within {}s",
                PROBE_TIMEOUT.as_secs()
            ));
        }
    };
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            output.status,
            first_line(&text)
        ))
    }
}

fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
}

#[cfg(test)]
mod network_row_tests {
    use super::*;

    fn status(helper: bool, up: bool) -> banger_proto::NetworkStatus {
        banger_proto::NetworkStatus {
            mode: "auto".into(),
            helper_socket: "/run/banger-helper.sock".into(),
            helper,
            helper_error: (!helper).then(|| "connection refused".into()),
            subnet: Some("172.30.0.0/24".into()),
            gateway: Some("172.30.0.1".into()),
            bridge: Some("bg0".into()),
            table: Some("banger_0".into()),
            bridge_up: up,
            nft_table: up,
            taps: vec![],
            dns: up.then(|| "172.30.0.1:53".into()),
            leases: vec![],
        }
    }

    #[test]
    fn network_rows_follow_the_status() {
        let rows = network_checks(&status(false, false));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, CheckStatus::Warn);
        assert!(rows[0].fix.as_deref().unwrap().contains("helper install"));
        let rows = network_checks(&status(true, true));
        assert!(rows.iter().all(|r| r.status == CheckStatus::Ok), "{rows:?}");
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["helper", "bridge", "nft-table", "dns"]);
        let rows = network_checks(&status(true, false));
        assert!(
            rows[1..]
                .iter()
                .all(|r| r.status == CheckStatus::Warn && r.fix.is_some())
        );
    }

    #[test]
    fn routing_and_firecracker_rows_say_how_to_fix() {
        assert_eq!(
            vm_routing_check(Some("DNS Domain: ~vm"), "bg1000", None).status,
            CheckStatus::Ok
        );
        let row = vm_routing_check(Some("Link 5 (bg1000)"), "bg1000", Some("10.9.0.1"));
        assert!(row.fix.unwrap().contains("resolvectl domain bg1000 ~vm"));
        assert!(
            vm_routing_check(None, "bg1000", None)
                .fix
                .unwrap()
                .contains("server=/vm/")
        );
        assert_eq!(firecracker_check(Ok((1, 7, 0))).status, CheckStatus::Ok);
        let row = firecracker_check(Err("not installed".into()));
        assert_eq!(row.status, CheckStatus::Warn);
        assert!(row.detail.contains("QEMU"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version_is_parsed_from_the_first_line() {
        let text = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                    Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_qemu_version(text).as_deref(), Some("7.2.22"));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.0.0\n").as_deref(),
            Some("9.0.0")
        );
        assert_eq!(parse_qemu_version("bash: qemu: not found"), None);
        assert_eq!(parse_qemu_version(""), None);
    }

    #[test]
    fn microvm_is_found_in_the_machine_list() {
        let help = "Supported machines are:\nmicrovm              microvm (i386)\n\
                    pc                   Standard PC\n";
        assert!(has_microvm(help));
        assert!(!has_microvm(
            "Supported machines are:\npc   Standard PC (microvm-less)\n"
        ));
    }

    #[test]
    fn e2fsprogs_versions_are_compared_numerically() {
        let new = "mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0\n";
        assert_eq!(parse_e2fsprogs_version(new), Some(vec![1, 47, 0]));
        let check = mkfs_version_check("/usr/sbin/mkfs.ext4", new);
        assert_eq!(check.status, CheckStatus::Ok);
        assert!(check.detail.contains("1.47.0"), "{}", check.detail);

        let exact = mkfs_version_check("m", "mke2fs 1.43 (17-May-2016)");
        assert_eq!(exact.status, CheckStatus::Ok, "{}", exact.detail);

        let old = mkfs_version_check("m", "mke2fs 1.42.9 (4-Feb-2014)\n");
        assert_eq!(old.status, CheckStatus::Fail);
        assert!(old.detail.contains("1.42.9"), "{}", old.detail);
        assert!(old.fix.unwrap().contains("e2fsprogs"));

        let odd = mkfs_version_check("m", "something else");
        assert_eq!(odd.status, CheckStatus::Warn);
        assert!(odd.fix.is_some());
        assert_eq!(parse_dotted("1.46.5-2ubuntu"), Some(vec![1, 46, 5]));
    }

    #[test]
    fn disk_space_thresholds() {
        let dir = Path::new("/data");
        let plenty = disk_space_check(dir, 20 * GIB);
        assert_eq!(plenty.status, CheckStatus::Ok);
        assert!(
            plenty.detail.starts_with("20.0 GiB free"),
            "{}",
            plenty.detail
        );
        assert_eq!(plenty.fix, None);
        assert_eq!(
            disk_space_check(dir, WARN_FREE_BYTES).status,
            CheckStatus::Ok
        );
        let low = disk_space_check(dir, WARN_FREE_BYTES - 1);
        assert_eq!(low.status, CheckStatus::Warn);
        assert!(low.fix.is_some());
        assert_eq!(
            disk_space_check(dir, FAIL_FREE_BYTES).status,
            CheckStatus::Warn
        );
        let full = disk_space_check(dir, FAIL_FREE_BYTES / 2);
        assert_eq!(full.status, CheckStatus::Fail);
        assert!(full.detail.contains("0.5 GiB"), "{}", full.detail);
    }

    #[test]
    fn disk_space_of_a_missing_dir_uses_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let check = check_disk_space(&dir.path().join("not/yet"));
        assert!(check.detail.contains("GiB free"), "{}", check.detail);
    }

    fn fake_tool(dir: &Path, name: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn tools_are_found_on_path_then_in_extra_dirs() {
        let bin = tempfile::tempdir().unwrap();
        let sbin = tempfile::tempdir().unwrap();
        fake_tool(bin.path(), "ssh", 0o755);
        fake_tool(bin.path(), "not-executable", 0o644);
        fake_tool(sbin.path(), "debootstrap", 0o755);
        let path_var = std::env::join_paths([Path::new("/nonexistent"), bin.path()]).unwrap();
        let path_var = Some(path_var.as_os_str());
        let extra = [sbin.path()];

        let ssh = find_tool("ssh", path_var, &extra).unwrap();
        assert_eq!(ssh.path, bin.path().join("ssh"));
        assert!(ssh.on_path);
        let debootstrap = find_tool("debootstrap", path_var, &extra).unwrap();
        assert_eq!(debootstrap.path, sbin.path().join("debootstrap"));
        assert!(!debootstrap.on_path);
        assert_eq!(find_tool("not-executable", path_var, &extra), None);
        assert_eq!(find_tool("ssh", None, &[]), None);
    }

    #[tokio::test]
    async fn missing_tools_fail_or_warn_with_a_fix() {
        let empty = tempfile::tempdir().unwrap();
        let path_var = Some(empty.path().as_os_str());
        let ssh = TOOLS.iter().find(|t| t.name == "ssh").unwrap();
        let check = check_tool(ssh, path_var).await;
        assert_eq!(check.status, CheckStatus::Fail);
        assert!(check.fix.unwrap().contains("openssh-client"));

        let bin = tempfile::tempdir().unwrap();
        fake_tool(bin.path(), "ssh", 0o755);
        let check = check_tool(ssh, Some(bin.path().as_os_str())).await;
        assert_eq!(check.status, CheckStatus::Ok, "{}", check.detail);
        assert_eq!(check.detail, bin.path().join("ssh").display().to_string());

        let cpio = TOOLS.iter().find(|t| t.name == "cpio").unwrap();
        if find_tool("cpio", None, &[Path::new("/usr/sbin"), Path::new("/sbin")]).is_none() {
            let check = check_tool(cpio, path_var).await;
            assert_eq!(check.status, CheckStatus::Warn);
            assert!(check.fix.unwrap().contains("apt-get install cpio"));
        }
    }

    #[tokio::test]
    async fn a_missing_qemu_fails_with_a_fix() {
        let check = check_qemu("/nonexistent/qemu", None).await;
        assert_eq!(check.status, CheckStatus::Fail);
        assert!(
            check.detail.contains("/nonexistent/qemu"),
            "{}",
            check.detail
        );
        assert!(check.fix.unwrap().contains("qemu-system-x86"));
        let empty = tempfile::tempdir().unwrap();
        let check = check_qemu("qemu-system-x86_64", Some(empty.path().as_os_str())).await;
        assert_eq!(check.status, CheckStatus::Fail);
        assert!(check.detail.contains("PATH"), "{}", check.detail);
    }

    #[test]
    fn kvm_rows() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kvm");
        assert_eq!(
            check_kvm(AccelMode::Tcg, &missing, dir.path()).status,
            CheckStatus::Ok
        );
        let auto = check_kvm(AccelMode::Auto, &missing, dir.path());
        assert_eq!(auto.status, CheckStatus::Warn);
        assert!(auto.detail.contains("TCG"), "{}", auto.detail);
        assert!(auto.fix.unwrap().contains("modprobe"));
        assert_eq!(
            check_kvm(AccelMode::Kvm, &missing, dir.path()).status,
            CheckStatus::Fail
        );

        let dev = dir.path().join("kvm-dev");
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(
            check_kvm(AccelMode::Auto, &dev, dir.path()).status,
            CheckStatus::Ok
        );
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        let pvm = check_kvm(AccelMode::Auto, &dev, dir.path());
        assert_eq!(pvm.status, CheckStatus::Warn);
        assert!(pvm.detail.contains("PVM"), "{}", pvm.detail);
        assert!(pvm.fix.unwrap().contains("qemu.accel"));
    }

    #[test]
    fn tun_and_default_image_rows() {
        let dir = tempfile::tempdir().unwrap();
        let tun = check_tun(&dir.path().join("tun"));
        assert_eq!(tun.status, CheckStatus::Warn);
        assert!(tun.fix.unwrap().contains("modprobe tun"));
        assert_eq!(check_tun(dir.path()).status, CheckStatus::Ok);

        let none = default_image_check("default", None);
        assert_eq!(none.status, CheckStatus::Warn);
        assert!(none.fix.unwrap().contains("banger image build"));
        let image = Image {
            name: "default".into(),
            digest: "d".into(),
            kernel: "k".into(),
            size_bytes: 1,
            source: "import:/x".into(),
            created_at: "2024-01-01T00:00:00Z".into(),
            work_seed: None,
            exec: None,
        };
        assert_eq!(
            default_image_check("default", Some(&image)).status,
            CheckStatus::Ok
        );
    }

    #[test]
    fn the_report_is_ok_unless_something_fails() {
        let warn = problem("a", CheckStatus::Warn, "d", "f");
        let fail = problem("b", CheckStatus::Fail, "d", "f");
        assert!(DoctorReport::from_checks(vec![ok("x", "d"), warn.clone()]).ok);
        assert!(!DoctorReport::from_checks(vec![warn, fail]).ok);
    }
}
