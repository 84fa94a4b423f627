//! Test harness for end-to-end tests: an isolated banger instance (its own `BANGER_HOME`,
//! socket and daemon) driven through the real `banger` binary and raw HTTP on its socket.
//! The binaries come from the same target dir as the test (`cargo build --workspace --bins`
//! first; scripts/test does that).
//!
//! [`TestEnv::new`] runs everything as the test's own user. [`TestEnv::nonroot`] runs the
//! CLI, and so the daemon and its VMs, as an unprivileged owner: the user [`NONROOT_USER`]
//! (created when missing) when the test runs as root, else the test's own (non-root) user.
//! Files a test makes for such an owner go through [`TestEnv::chown_to_owner`]; commands it
//! runs as the owner (git in the owner's repo) through [`TestEnv::owner_command`]; the root
//! helper for the owner through [`TestEnv::start_helper`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod leaks;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod registry;

/// The unprivileged user that owns [`TestEnv::nonroot`] instances when tests run as root.
pub const NONROOT_USER: &str = "bangertest";

/// A local user an instance's commands run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The user's home directory (from the password database).
    pub home: PathBuf,
}

impl Owner {
    /// The user running the test.
    pub fn current() -> Self {
        let uid = nix::unistd::getuid();
        let user = nix::unistd::User::from_uid(uid).ok().flatten();
        Self {
            name: user.as_ref().map(|u| u.name.clone()).unwrap_or_default(),
            uid: uid.as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            home: user.map(|u| u.dir).unwrap_or_else(|| "/".into()),
        }
    }

    /// Local user `name`, created with `useradd --create-home` (which also gives it the
    /// /etc/subuid and /etc/subgid ranges an unprivileged image build needs) when missing.
    /// Needs root for the creation; several tests may race to create it.
    pub fn ensure_user(name: &str) -> Self {
        let lookup = || nix::unistd::User::from_name(name).ok().flatten();
        if lookup().is_none() {
            let out = Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/bash", name])
                .output()
                .expect("run useradd");
            // Exit 9: another test created it meanwhile.
            assert!(
                out.status.success() || out.status.code() == Some(9),
                "useradd {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let user = lookup().unwrap_or_else(|| panic!("user {name} missing after useradd"));
        for (file, flag) in [
            ("/etc/subuid", "--add-subuids"),
            ("/etc/subgid", "--add-subgids"),
        ] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if !text.lines().any(|l| l.starts_with(&format!("{name}:"))) {
                let range = "1065536-1131071";
                let status = Command::new("usermod")
                    .args([flag, range, name])
                    .status()
                    .expect("run usermod");
                assert!(status.success(), "usermod {flag} {range} {name} failed");
            }
        }
        Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        }
    }
}

/// Whether every directory above `path` lets others search it and `path` lets others
/// read and execute it: what another user needs to run a binary there.
fn others_can_run(path: &Path) -> bool {
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(path) & 0o005 == 0o005 && path.ancestors().skip(1).all(|dir| mode(dir) & 0o001 != 0)
}

/// The root helper of one instance, killed on drop.
#[derive(Debug)]
pub struct HelperProcess {
    child: Child,
    /// The helper's socket (what the instance's config names as `network.helper_socket`).
    pub socket: PathBuf,
    /// The helper's stderr.
    pub log: PathBuf,
}

impl HelperProcess {
    /// The helper's pid (`ip netns exec` execs it, so this is the helper itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Directory holding the workspace's binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The smallest x86-64 ELF kernel Firecracker loads: one PT_LOAD at 16 MiB holding `code`,
/// entered in long mode (the loader checks only the layout; what the code does decides how
/// the "guest" behaves where KVM runs it).
pub fn tiny_elf_kernel(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x100_0000;
    let size = 64 + 56 + code.len() as u64;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + 120).to_le_bytes()); // entry: the code
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&0u64.to_le_bytes());
    for word in [BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Path of a workspace binary, with a clear failure when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the e2e tests",
        path.display()
    );
    path
}

/// One isolated banger instance.
#[derive(Debug)]
pub struct TestEnv {
    dir: tempfile::TempDir,
    extra_env: Vec<(String, String)>,
    /// Network namespace every command (and so the daemon and its VMs) runs in.
    netns: Option<String>,
    /// Whom commands run as when it is not the test's own user ([`TestEnv::nonroot`]).
    owner: Option<Owner>,
    /// Where the owner runs the binaries from (`bin_dir()`, or copies when others cannot
    /// reach the target dir).
    owner_bins: Option<PathBuf>,
}

/// A finished CLI invocation.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with the whole output unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// A fresh instance under a new temporary directory. Nothing runs until the first command.
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("bg")
                .tempdir_in("/tmp")
                .unwrap(),
            extra_env: Vec::new(),
            netns: None,
            owner: None,
            owner_bins: None,
        }
    }

    /// A fresh instance owned by an unprivileged user: every command (and so the daemon and
    /// its VMs) runs as [`NONROOT_USER`] (created when missing) when the test runs as root,
    /// else as the test's own user, which is unprivileged already. The instance's directory
    /// belongs to the owner (mode 0700); the binaries are copied there when the owner cannot
    /// reach the target dir.
    pub fn nonroot() -> Self {
        let mut env = Self::new();
        if !nix::unistd::geteuid().is_root() {
            return env;
        }
        let owner = Owner::ensure_user(NONROOT_USER);
        std::fs::set_permissions(env.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let bins = if ["banger", "bangerd"]
            .iter()
            .all(|b| others_can_run(&bin(b)))
        {
            bin_dir()
        } else {
            let dir = env.dir().join("bin");
            std::fs::create_dir_all(&dir).unwrap();
            for name in ["banger", "bangerd"] {
                std::fs::copy(bin(name), dir.join(name)).unwrap();
            }
            dir
        };
        env.owner = Some(owner);
        env.owner_bins = Some(bins);
        env.chown_to_owner(env.dir());
        env
    }

    /// The user commands run as: the [`TestEnv::nonroot`] owner, else the test's own user.
    pub fn owner(&self) -> Owner {
        self.owner.clone().unwrap_or_else(Owner::current)
    }

    /// Whether commands run as a user other than the test's (root running them as
    /// [`NONROOT_USER`]).
    pub fn runs_as_other_user(&self) -> bool {
        self.owner.is_some()
    }

    /// Hands `path` (recursively) to the owner: for files a root test makes that the
    /// owner's daemon must write. Does nothing when the owner is the test's own user.
    pub fn chown_to_owner(&self, path: &Path) {
        if let Some(owner) = &self.owner {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", owner.uid, owner.gid))
                .arg(path)
                .status()
                .unwrap();
            assert!(status.success(), "chown -R {}", path.display());
        }
    }

    /// A command that runs `program` as the owner (in the instance's network namespace if
    /// any), with the owner's `HOME`, `USER` and `LOGNAME` and supplementary groups.
    pub fn owner_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut prefix: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            prefix.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        if let Some(owner) = &self.owner {
            prefix.extend(
                [
                    "setpriv".to_owned(),
                    format!("--reuid={}", owner.uid),
                    format!("--regid={}", owner.gid),
                    "--init-groups".to_owned(),
                    "--".to_owned(),
                ]
                .map(Into::into),
            );
        }
        let mut command = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program.as_ref());
                c
            }
            None => Command::new(program.as_ref()),
        };
        if let Some(owner) = &self.owner {
            // A login's environment for that user; PATH as Debian gives ordinary users
            // (no sbin): the daemon must find mkfs.ext4 & co. by itself.
            command
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", &owner.home)
                .env("USER", &owner.name)
                .env("LOGNAME", &owner.name);
        }
        command
    }

    /// Starts the root helper (`banger-helper --foreground`) for this instance's owner, in
    /// its network namespace if any, with the instance's home as the state dir; returns
    /// when its socket answers. `None` (after a `SKIP:` line naming `test`) when the test
    /// does not run as root.
    pub fn start_helper(&self, test: &str) -> Option<HelperProcess> {
        if !nix::unistd::geteuid().is_root() {
            banger_shared::skip::report(test, "the root helper needs the test to run as root");
            return None;
        }
        let socket = self.dir().join("helper.sock");
        let log = self.dir().join("helper.log");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("banger-helper"));
                c
            }
            None => Command::new(bin("banger-helper")),
        };
        let child = command
            .args(["--foreground", "--owner", &self.owner().uid.to_string()])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(self.home())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let helper = HelperProcess { child, socket, log };
        poll(Duration::from_secs(20), "the helper's socket", || {
            UnixStream::connect(&helper.socket).ok()
        });
        Some(helper)
    }

    /// Path of binary `name` as the owner runs it.
    fn owner_bin(&self, name: &str) -> PathBuf {
        match &self.owner_bins {
            Some(dir) => dir.join(name),
            None => bin(name),
        }
    }

    /// Runs every later command inside network namespace `name` (`ip netns exec`): the
    /// daemon they start, and its VMs, live there.
    pub fn set_netns(&mut self, name: &str) {
        self.netns = Some(name.to_owned());
    }

    /// The instance's scratch directory (beside `home`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds an environment variable to every command of this instance.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.extra_env.push((key.into(), value.into()));
        self
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The root file system of image `name` in this instance's store.
    pub fn image_rootfs(&self, name: &str) -> PathBuf {
        let image = self.banger(&["image", "show", name, "--json"]).ok().json();
        self.home()
            .join("images")
            .join(image["digest"].as_str().unwrap())
            .join("rootfs.ext4")
    }

    /// `md5sum f* | sort -k2` of files `f0`..`f{count-1}` holding `content(i)`, computed on the
    /// host: what the same command prints in a guest that wrote them.
    pub fn md5_lines(&self, count: usize, content: impl Fn(usize) -> String) -> String {
        let dir = tempfile::tempdir_in(self.home()).unwrap();
        for i in 0..count {
            std::fs::write(dir.path().join(format!("f{i}")), content(i)).unwrap();
        }
        let out = Command::new("sh")
            .arg("-c")
            .arg("md5sum f* | sort -k2")
            .current_dir(dir.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn socket(&self) -> PathBuf {
        self.home().join("run/bangerd.sock")
    }

    pub fn log_file(&self) -> PathBuf {
        self.home().join("logs/bangerd.log")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// A `banger` command with this instance's environment, run as its owner.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self.owner_command(self.owner_bin("banger"));
        command
            .args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("BANGER_RUNTIME_DIR")
            .env_remove("BANGER_NO_AUTOSTART")
            .env_remove("BANGER_OP_ID")
            .env("BANGER_HOME", self.home())
            .env("BANGER_CONFIG", self.config_file())
            .env("BANGER_DAEMON_BIN", self.owner_bin("bangerd"))
            .stdin(Stdio::null());
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
        command
    }

    /// Runs `banger ARGS` to completion.
    pub fn banger(&self, args: &[&str]) -> Run {
        Run::from_output(self.command(args).output().unwrap())
    }

    /// Imports a stand-in image named `default` (a small ext4 file and a file with an ELF
    /// header as kernel): enough for record-level tests, which never boot it.
    pub fn import_stub_image(&self) {
        let args = self.stub_image_import();
        self.banger(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .ok();
    }

    /// The arguments of the `banger image import` of [`Self::import_stub_image`], with its
    /// files made (in `stub/` of the instance's directory).
    pub fn stub_image_import(&self) -> Vec<String> {
        let (rootfs, kernel) = stub_image_files(&self.dir.path().join("stub"));
        let path = |p: PathBuf| p.display().to_string();
        ["image", "import", "default", "--rootfs"]
            .map(String::from)
            .into_iter()
            .chain([path(rootfs), "--kernel".into(), path(kernel)])
            .collect()
    }

    /// Builds (or takes from the shared cache) the real default image: Debian with systemd and
    /// sshd, and banger's microVM kernel (Debian's cloud kernel is stored too, as `debian`).
    /// The cache (`BANGER_CACHE_DIR`, default /var/tmp/banger-test-cache) is keyed by the
    /// recipe digests, so only the first test of a run (or of a recipe change) pays for the
    /// bootstrap and the kernel compile; the others wait for it on a lock.
    /// A [`TestEnv::nonroot`] owner other than the test's user builds as itself into its own
    /// cache, `owner-NAME/` inside that one, seeded with the shared cache's microVM kernels
    /// (compiled there first, as root, when missing): the kernel is compiled once per recipe.
    pub fn build_default_image(&self) {
        let mut cache = PathBuf::from(
            std::env::var("BANGER_CACHE_DIR")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "/var/tmp/banger-test-cache".into()),
        );
        if let Some(owner) = &self.owner {
            let shared = cache.clone();
            let root = TestEnv::new();
            Run::from_output(
                root.command(&["kernel", "build"])
                    .env("BANGER_CACHE_DIR", &shared)
                    .output()
                    .unwrap(),
            )
            .ok();
            drop(root);
            cache = cache.join(format!("owner-{}", owner.name));
            std::fs::create_dir_all(&cache).unwrap();
            for entry in std::fs::read_dir(&shared).unwrap().flatten() {
                let name = entry.file_name();
                let built = entry.path().join("vmlinux").is_file();
                if name.to_string_lossy().starts_with("microvm-kernel-")
                    && built
                    && !cache.join(&name).exists()
                {
                    let status = Command::new("cp")
                        .arg("-a")
                        .arg(entry.path())
                        .arg(cache.join(&name))
                        .status()
                        .unwrap();
                    assert!(status.success(), "cp {}", entry.path().display());
                }
            }
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", owner.uid, owner.gid))
                .arg(&cache)
                .status()
                .unwrap();
            assert!(status.success(), "chown {}", cache.display());
        }
        let run = Run::from_output(
            self.command(&["image", "build"])
                .env("BANGER_CACHE_DIR", cache)
                .output()
                .unwrap(),
        );
        run.ok();
    }

    /// Pids of live QEMU processes of this instance (their arguments name its directories).
    pub fn qemu_pids(&self) -> Vec<u32> {
        processes_with_cmdline("qemu-system-x86", &self.home().display().to_string())
    }

    /// Runs `banger ARGS`, failing the test (and killing the command) if it has not finished
    /// within `limit`: for calls that must not hang.
    #[track_caller]
    pub fn banger_within(&self, limit: Duration, args: &[&str]) -> Run {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let finished = poll_or_none(limit, || child.try_wait().unwrap());
        if finished.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`banger {}` did not finish within {limit:?}",
                args.join(" ")
            );
        }
        Run::from_output(child.wait_with_output().unwrap())
    }

    /// Runs `banger ARGS`, which must succeed; on failure the daemon's log and the VMs'
    /// consoles are printed first (for a `vm run`/`vm start` that did not boot).
    #[track_caller]
    pub fn banger_or_dump(&self, args: &[&str]) -> Run {
        let run = self.banger(args);
        if run.code != 0 {
            self.dump_diagnostics();
        }
        run.ok()
    }

    /// VM `vm`'s named snapshots as `vm snapshot ls --json` lists them.
    #[track_caller]
    pub fn vm_snapshots(&self, vm: &str) -> Vec<serde_json::Value> {
        match self
            .banger(&["vm", "snapshot", "ls", vm, "--json"])
            .ok()
            .json()
            .get_mut("snapshots")
            .map(serde_json::Value::take)
        {
            Some(serde_json::Value::Array(list)) => list,
            other => panic!("no snapshot list: {other:?}"),
        }
    }

    /// `sh -c SCRIPT` in VM `vm` (`vm exec`), which must succeed; its output, trimmed.
    #[track_caller]
    pub fn guest_sh(&self, vm: &str, script: &str) -> String {
        self.banger(&["vm", "exec", vm, "--", "sh", "-c", script])
            .ok()
            .stdout
            .trim()
            .to_owned()
    }

    /// `vm show VM --json`.
    #[track_caller]
    pub fn vm_show(&self, vm: &str) -> serde_json::Value {
        self.banger(&["vm", "show", vm, "--json"]).ok().json()
    }

    /// VM `vm`'s directory under this instance's home.
    #[track_caller]
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        let id = self.vm_show(vm)["id"]
            .as_str()
            .unwrap_or_else(|| panic!("VM {vm} has no id"))
            .to_owned();
        self.home().join("vms").join(id)
    }

    /// `banger ARGS` with fault `fault` set (`banger_core::fault`): a daemon it starts
    /// carries it.
    pub fn with_fault(&self, fault: &str, args: &[&str]) -> Run {
        Run::from_output(
            self.command(args)
                .env(banger_core::fault::ENV, fault)
                .output()
                .unwrap(),
        )
    }

    /// Sends one raw HTTP/1.1 request on the socket; returns (status, body).
    pub fn raw_request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut stream = UnixStream::connect(self.socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bangerd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Pids of live `bangerd` processes serving this instance.
    pub fn daemon_pids(&self) -> Vec<u32> {
        let home = format!("BANGER_HOME={}", self.home().display());
        processes_with_env("bangerd", &home)
    }

    /// Waits until exactly one daemon of this instance runs and answers.
    pub fn wait_for_daemon(&self) -> u32 {
        poll(Duration::from_secs(20), "one daemon answering", || {
            let pids = self.daemon_pids();
            (pids.len() == 1 && UnixStream::connect(self.socket()).is_ok()).then(|| pids[0])
        })
    }

    /// Waits (up to 10 s) until this instance's daemon is gone: no process, and its socket
    /// refuses connections (a dying process's environment reads empty before its files are
    /// closed). False when it is still there.
    pub fn daemon_gone(&self) -> bool {
        poll_or_none(Duration::from_secs(10), || {
            (self.daemon_pids().is_empty() && UnixStream::connect(self.socket()).is_err())
                .then_some(())
        })
        .is_some()
    }

    /// SIGKILLs every daemon of this instance and waits until they are gone.
    pub fn kill_daemon(&self) {
        let pids = self.daemon_pids();
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Gone, not only dying: a dying process's environment reads empty before its files
        // (the daemon's socket) are closed, and a command started then would connect to it.
        poll(Duration::from_secs(10), "daemon gone", || {
            pids.iter().all(|pid| exited(*pid)).then_some(())
        });
    }
}

impl TestEnv {
    /// Runs `script` (sh) in `dir` as the instance's owner; panics unless it succeeds.
    pub fn owner_sh(&self, dir: &Path, script: &str) -> String {
        let out = self
            .owner_command("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The workspace round trip of VM `vm` for the instance's owner: a repository the owner
    /// made (`a.txt` committed) is prepared into the guest, where git works on it (no
    /// "dubious ownership": every file is the guest root's); the guest changes `a.txt` and
    /// adds `b.txt`; `export --patch` applies to the owner's repository and `export --to`
    /// writes files the owner owns. Leaves `b.txt` in the guest's /root/repo.
    pub fn workspace_round_trip(&self, vm: &str) {
        let exec = |script: &str| self.banger(&["vm", "exec", vm, "--", "sh", "-c", script]);
        let repo = self.dir().join("repo");
        std::fs::create_dir(&repo).unwrap();
        self.chown_to_owner(&repo);
        self.owner_sh(
            &repo,
            "git init -q . && git config user.email t@example.com && git config user.name T \
             && echo hello > a.txt && git add a.txt && git commit -qm init",
        );
        self.banger(&["vm", "workspace", "prepare", vm, repo.to_str().unwrap()])
            .ok();
        let status =
            exec("cd /root/repo && git status --porcelain && stat -c '%u:%g' . a.txt .git").ok();
        assert!(!status.stderr.contains("dubious"), "{}", status.stderr);
        assert_eq!(status.stdout.trim(), "0:0\n0:0\n0:0", "{}", status.stdout);
        exec("cd /root/repo && echo changed > a.txt && echo new > b.txt").ok();
        let patch = self.dir().join("out.patch");
        self.banger(&[
            "vm",
            "workspace",
            "export",
            vm,
            "--patch",
            patch.to_str().unwrap(),
        ])
        .ok();
        self.owner_sh(&repo, &format!("git apply {}", patch.display()));
        assert_eq!(
            std::fs::read_to_string(repo.join("a.txt")).unwrap(),
            "changed\n"
        );
        assert_eq!(
            std::fs::read_to_string(repo.join("b.txt")).unwrap(),
            "new\n"
        );
        let out = self.dir().join("exported");
        self.banger(&[
            "vm",
            "workspace",
            "export",
            vm,
            "--to",
            out.to_str().unwrap(),
        ])
        .ok();
        let exported = out.join("b.txt");
        assert_eq!(std::fs::read_to_string(&exported).unwrap(), "new\n");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&exported).unwrap()),
            self.owner().uid
        );
    }

    /// Starts servers in the guest of VM `vm` (perl from perl-base, as transient systemd
    /// units so they outlive the exec): on TCP `port` one that greets every client with
    /// `hello-from-guest PORT`, and with `udp` a UDP echo on `port` that answers `echo:DATA`.
    pub fn guest_servers(&self, vm: &str, port: u16, udp: bool) {
        let tcp = "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalPort => $ARGV[0], \
                   Listen => 5, ReuseAddr => 1) or die $!; \
                   while (my $c = $s->accept) { print $c \"hello-from-guest $ARGV[0]\\n\"; close $c }";
        let echo = "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalPort => $ARGV[0], \
                    Proto => 'udp') or die $!; \
                    while (1) { my $peer = $s->recv(my $d, 1500); $s->send(\"echo:$d\", 0, $peer) }";
        let mut servers = vec![("hello", tcp)];
        if udp {
            servers.push(("echo", echo));
        }
        for (unit, script) in servers {
            self.banger(&[
                "vm",
                "exec",
                vm,
                "--",
                "systemd-run",
                &format!("--unit={unit}{port}"),
                "perl",
                "-e",
                script,
                &port.to_string(),
            ])
            .ok();
        }
    }

    /// Prints the end of every VM console and of the daemon log: what a failed test needs.
    pub fn dump_diagnostics(&self) {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.home().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|vm| {
                ["console.log.prev", "console.log"]
                    .into_iter()
                    .map(move |f| vm.path().join(f))
            })
            .filter(|p| p.is_file())
            .collect();
        logs.push(self.log_file());
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "===== {} (last {} lines)\n{}",
                log.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_diagnostics();
        }
        let _ = self.command(&["daemon", "stop"]).output();
        self.kill_daemon();
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Makes a stand-in image's files in `dir`: `rootfs.ext4` (a small ext4) and `vmlinux` (an
/// ELF header naming the command-line virtio-mmio parameter: a kernel Firecracker can boot).
/// Returns their paths.
pub fn stub_image_files(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let rootfs = dir.join("rootfs.ext4");
    let status = Command::new(system_tool("mkfs.ext4"))
        .args(["-q", "-F"])
        .arg(&rootfs)
        .arg("4M")
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.ext4 failed");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00stub virtio_mmio.device").unwrap();
    (rootfs, kernel)
}

/// The guest-visible content of the disk file `top` (its whole chain; `format` is `qcow2` or
/// `raw`) as a raw file in `into`, for host tools that read only raw images.
pub fn disk_as_raw(top: &Path, format: &str, into: &Path) -> PathBuf {
    let raw = into.join(format!(
        "{}.raw",
        top.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&raw);
    let status = Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(top)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert {}", top.display());
    raw
}

/// `e2fsck -fn` of the ext4 image `image` finds nothing to fix (`what` names it on failure).
#[track_caller]
pub fn assert_fsck_clean(image: &Path, what: &str) {
    let out = Command::new(system_tool("e2fsck"))
        .args(["-fn"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: e2fsck -fn {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Path of system tool `name`: found on PATH, else in /usr/sbin or /sbin, which an ordinary
/// user's PATH lacks (mkfs.ext4, debugfs).
pub fn system_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// Whether the test runs as root; when not, prints `SKIP: <test>: needs root (<why>)` so the
/// caller can return: for tests of root-only machinery (network namespaces, the root helper,
/// loop mounts) in a suite an ordinary user runs too.
pub fn root_or_skip(test: &str, why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        banger_shared::skip::report(test, &format!("needs root ({why})"));
    }
    root
}

/// Whether process `pid` has exited: gone, or a zombie (its files closed).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Calls `probe` until it returns `Some`, or returns `None` after `limit`.
pub fn poll_or_none<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls `probe` until it returns `Some`, failing the test after `limit`.
#[track_caller]
pub fn poll<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A live (non-zombie) process as /proc shows it.
#[derive(Debug)]
struct ProcInfo {
    pid: u32,
    /// The kernel's process name (at most 15 bytes).
    name: String,
    /// NUL-separated arguments.
    cmdline: Vec<u8>,
    dir: PathBuf,
}

/// Every live, non-zombie process.
fn live_processes() -> Vec<ProcInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            if rest.trim_start().starts_with('Z') {
                return None;
            }
            let name = head
                .split_once('(')
                .map(|(_, n)| n)
                .unwrap_or("")
                .to_owned();
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            Some(ProcInfo {
                pid,
                name,
                cmdline,
                dir: entry.path(),
            })
        })
        .collect()
}

/// Live processes whose name or executable starts with `comm` and whose arguments contain
/// `needle` (QEMU renames its process after the VM, so the executable is checked too).
pub fn processes_with_cmdline(comm: &str, needle: &str) -> Vec<u32> {
    live_processes()
        .into_iter()
        .filter(|p| {
            let arg0 = p.cmdline.split(|b| *b == 0).next().unwrap_or_default();
            (p.name.starts_with(comm) || String::from_utf8_lossy(arg0).contains(comm))
                && String::from_utf8_lossy(&p.cmdline).contains(needle)
        })
        .map(|p| p.pid)
        .collect()
}

/// Live processes named `comm` whose environment contains `needle` exactly.
pub fn processes_with_env(comm: &str, needle: &str) -> Vec<u32> {
    live_processes()
        .into_iter()
        .filter(|p| p.name == comm)
        .filter(|p| {
            std::fs::read(p.dir.join("environ"))
                .is_ok_and(|environ| environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .map(|p| p.pid)
        .collect()
}

/// A network namespace, deleted on drop even when the test fails.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// A new namespace named `PREFIX-<test pid>` (an old one of that name is deleted first),
    /// its loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
    /// The stdout of `ARGS` run inside the namespace; fails the test unless it succeeds.
    pub fn output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Runs `f` on a thread that entered this namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
    /// The names of the namespace's network interfaces.
    pub fn links(&self) -> Vec<String> {
        let value: serde_json::Value =
            serde_json::from_str(&self.output(&["ip", "-j", "link"])).unwrap();
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }
    /// The names of the namespace's nftables tables.
    pub fn nft_tables(&self) -> Vec<String> {
        let value: serde_json::Value =
            serde_json::from_str(&self.output(&["nft", "-j", "list", "tables"])).unwrap();
        value["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("table"))
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

/// Runs `ip ARGS`, failing the test unless it succeeds.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

/// The real uid a process runs as (`Uid:` in /proc/PID/status).
pub fn process_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A TCP server in `ns` on `addr` that accepts for ever, sending each peer its address.
pub fn tcp_server(ns: &Netns, addr: &str) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let listener = ns
        .run(move || std::net::TcpListener::bind(addr).unwrap())
        .join()
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let peer = stream.peer_addr().map(|p| p.ip().to_string());
            let _ = (&stream).write_all(format!("{}\n", peer.unwrap_or_default()).as_bytes());
        }
    });
}

/// The greeting of a server from [`TestEnv::guest_servers`] read from 127.0.0.1:`port` (in
/// the calling thread's network namespace), or None when nothing answers with one.
pub fn guest_greeting(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(3),
    )
    .ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.starts_with("hello-from-guest")
        .then(|| text.trim().to_owned())
}

/// Loop devices whose backing file's path contains `needle`.
pub fn loops_backed_by(needle: &str) -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let backing = std::fs::read_to_string(entry.path().join("loop/backing_file")).ok()?;
            backing
                .contains(needle)
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
        .collect()
}
