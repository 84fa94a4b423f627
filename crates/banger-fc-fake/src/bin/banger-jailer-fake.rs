//! `banger-jailer-fake`: a test-only stand-in for Firecracker's `jailer`, held to its
//! documented contract (Firecracker's docs/jailer.md, "Jailer Usage" and "Jailer Operation"):
//! the same argument set (unknown flags and missing required ones refused, the id rule, an
//! exec file whose name contains `firecracker`), the same chroot layout
//! (`<chroot base>/<exec file name>/<id>/root` with the exec file copied in, `/dev`,
//! `/dev/net` and `/run` owned by uid:gid, the root dir given to uid:gid), the
//! `<exec file name>.pid` file the real jailer (v1.7+) writes in the chroot on every start,
//! and the exec of the copied binary as uid:gid with `--id` and the start-time arguments,
//! followed by everything after `--`. Without `--daemonize` it execs in place (the pid file
//! holds its own pid, which becomes Firecracker's). With `--daemonize` it behaves as the real
//! jailer since Firecracker v1.6: it forks, the child calls `setsid()` with stdio on
//! /dev/null and execs Firecracker, the pid file names that child, and the jailer itself exits
//! 0 at once (so a caller that waits for the jailer's pid to be Firecracker's sees it exit).
//!
//! What it cannot do: chroot/pivot_root (the exec'd fake Firecracker gets `--chroot DIR` and
//! resolves every path it receives inside the jail instead, so a host path sent to the API
//! fails as it would under the real jailer), real `/dev/kvm` and `/dev/net/tun` nodes
//! (placeholders), a PID namespace (`--new-pid-ns` forks instead) and cgroup writes (the
//! `--cgroup` values are only checked for the documented `<file>=<value>` form).

use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

#[derive(Debug, Default)]
struct Args {
    id: Option<String>,
    exec_file: Option<String>,
    uid: Option<String>,
    gid: Option<String>,
    parent_cgroup: Option<String>,
    cgroup_version: Option<String>,
    cgroups: Vec<String>,
    chroot_base: Option<String>,
    netns: Option<String>,
    resource_limits: Vec<String>,
    daemonize: bool,
    new_pid_ns: bool,
    extra: Vec<String>,
}

fn parse(argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args::default();
    let mut iter = argv.peekable();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| iter.next())
                .ok_or_else(|| format!("Argument '{name}' requires a value"))
        };
        match flag.as_str() {
            "--" => {
                args.extra = iter.by_ref().collect();
                break;
            }
            "--id" => args.id = Some(value("id")?),
            "--exec-file" => args.exec_file = Some(value("exec-file")?),
            "--uid" => args.uid = Some(value("uid")?),
            "--gid" => args.gid = Some(value("gid")?),
            "--parent-cgroup" => args.parent_cgroup = Some(value("parent-cgroup")?),
            "--cgroup-version" => args.cgroup_version = Some(value("cgroup-version")?),
            "--cgroup" => args.cgroups.push(value("cgroup")?),
            "--chroot-base-dir" => args.chroot_base = Some(value("chroot-base-dir")?),
            "--netns" => args.netns = Some(value("netns")?),
            "--resource-limit" => args.resource_limits.push(value("resource-limit")?),
            "--daemonize" => args.daemonize = true,
            "--new-pid-ns" => args.new_pid_ns = true,
            other => return Err(format!("Found argument '{other}' which wasn't expected")),
        }
    }
    Ok(args)
}

fn required(value: Option<String>, name: &str) -> Result<String, String> {
    value.ok_or_else(|| format!("Argument '{name}' required, but not found."))
}

/// The jailer's id rule: alphanumerics and hyphens, 1 to 64 characters.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    let id = required(args.id, "id")?;
    if !valid_id(&id) {
        return Err(format!(
            "Invalid instance ID: {id:?} (alphanumerics and hyphens, at most 64)"
        ));
    }
    let exec_file = required(args.exec_file, "exec-file")?;
    let exec_path = std::fs::canonicalize(&exec_file)
        .map_err(|e| format!("Failed to canonicalize path {exec_file}: {e}"))?;
    if !exec_path.is_file() {
        return Err(format!("{} is not a file", exec_path.display()));
    }
    let exec_name = exec_path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.contains("firecracker"))
        .ok_or_else(|| {
            format!(
                "Invalid filename. The filename of `--exec-file` option must contain \"firecracker\": {}",
                exec_path.display()
            )
        })?
        .to_owned();
    let uid_text = required(args.uid, "uid")?;
    let uid: u32 = uid_text
        .parse()
        .map_err(|_| format!("Invalid uid: {uid_text}"))?;
    let gid_text = required(args.gid, "gid")?;
    let gid: u32 = gid_text
        .parse()
        .map_err(|_| format!("Invalid gid: {gid_text}"))?;
    let version = args.cgroup_version.unwrap_or_else(|| "1".into());
    if version != "1" && version != "2" {
        return Err(format!("Invalid cgroup version: {version}"));
    }
    if let Some(parent) = &args.parent_cgroup
        && Path::new(parent).components().any(|c| {
            matches!(
                c,
                Component::CurDir | Component::ParentDir | Component::RootDir
            )
        })
    {
        return Err(format!("Invalid parent cgroup path: {parent}"));
    }
    for cgroup in &args.cgroups {
        let parts: Vec<&str> = cgroup.split('=').collect();
        if parts.len() != 2 || parts[1].is_empty() || !parts[0].contains('.') {
            return Err(format!("Invalid format for cgroups: {cgroup}"));
        }
    }
    for limit in &args.resource_limits {
        let (name, value) = limit
            .split_once('=')
            .ok_or_else(|| format!("Invalid format for resources limits: {limit}"))?;
        value
            .parse::<u64>()
            .map_err(|e| format!("Invalid limit value {value}: {e}"))?;
        if name != "fsize" && name != "no-file" {
            return Err(format!("Invalid resource argument: {name}"));
        }
    }
    if let Some(netns) = &args.netns {
        std::fs::File::open(netns).map_err(|e| format!("Failed to open {netns}: {e}"))?;
    }
    let base_text = args.chroot_base.unwrap_or_else(|| "/srv/jailer".into());
    let base = std::fs::canonicalize(&base_text)
        .map_err(|e| format!("Failed to canonicalize path {base_text}: {e}"))?;
    if !base.is_dir() {
        return Err(format!("{} is not a directory", base.display()));
    }
    let chroot: PathBuf = base.join(&exec_name).join(&id).join("root");
    // Nothing is done if the path already exists.
    std::fs::create_dir_all(&chroot)
        .map_err(|e| format!("Failed to create directory {}: {e}", chroot.display()))?;
    let jailed_exec = chroot.join(&exec_name);
    std::fs::copy(&exec_path, &jailed_exec).map_err(|e| {
        format!(
            "Failed to copy {} to {}: {e}",
            exec_path.display(),
            jailed_exec.display()
        )
    })?;
    let own = |path: &Path| {
        chown(path, Some(uid), Some(gid))
            .map_err(|e| format!("Failed to change owner for {}: {e}", path.display()))
    };
    for dir in ["", "dev", "dev/net", "run"] {
        let path = chroot.join(dir);
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("Failed to create directory {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("Failed to chmod {}: {e}", path.display()))?;
        own(&path)?;
    }
    for dev in ["dev/kvm", "dev/net/tun"] {
        let path = chroot.join(dev);
        std::fs::write(&path, b"")
            .map_err(|e| format!("Failed to create {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("Failed to chmod {}: {e}", path.display()))?;
        own(&path)?;
    }
    let mut command = Command::new(&jailed_exec);
    command
        .args(["--id", &id])
        .args(["--start-time-us", "0", "--start-time-cpu-us", "0"])
        .args(["--parent-cpu-time-us", "0"])
        .arg("--chroot")
        .arg(&chroot)
        .args(&args.extra)
        // Like the real jailer: a clean environment, except where the fake finds the spec.
        .env_clear()
        .envs(std::env::var_os("BANGER_FC_SPEC").map(|v| ("BANGER_FC_SPEC", v)))
        .uid(uid)
        .gid(gid);
    let write_pid = |pid: u32| -> Result<(), String> {
        use std::io::Write;
        let pid_file = chroot.join(format!("{exec_name}.pid"));
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&pid_file)
            .map_err(|e| format!("Failed to open {}: {e}", pid_file.display()))?;
        write!(file, "{pid}").map_err(|e| format!("Failed to write to {}: {e}", pid_file.display()))
    };
    if args.daemonize || args.new_pid_ns {
        if args.daemonize {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: runs in the forked child before exec; setsid(2) is async-signal-safe
            // and the closure allocates nothing.
            unsafe {
                command.pre_exec(|| {
                    nix::unistd::setsid()
                        .map(drop)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = command
            .spawn()
            .map_err(|e| format!("Failed to exec into Firecracker: {e}"))?;
        return write_pid(child.id());
    }
    write_pid(std::process::id())?;
    Err(format!(
        "Failed to exec into Firecracker: {}",
        command.exec()
    ))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("Jailer error: {message}");
            ExitCode::FAILURE
        }
    }
}
