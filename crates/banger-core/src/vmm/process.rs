//! Liveness and termination of VMM processes by pid. The daemon is not their parent (they are
//! daemonized so they outlive it), so liveness is read from /proc, and a pid counts as ours
//! only while its command line names the VM id (pids are reused).

use std::time::{Duration, Instant};

/// Whether `pid` is a live, non-zombie process whose command line contains `marker`.
pub fn is_alive(pid: u32, marker: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let running = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
    if !running {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
        .unwrap_or(false)
}

/// Pids of live processes other than this one whose command line contains `marker`.
fn live_pids_with(marker: &str) -> impl Iterator<Item = u32> + '_ {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(move |pid| *pid != std::process::id() && is_alive(*pid, marker))
}

/// Live processes whose command line contains `marker` (a VM id): finds a VMM whose pid was
/// never recorded, e.g. when the daemon died while QEMU was daemonizing.
pub fn find_by_marker(marker: &str) -> Vec<u32> {
    live_pids_with(marker).collect()
}

/// Live processes whose command line has `flag` followed by the argument `value` (e.g.
/// Firecracker's `--id <vm id>`), so a path merely containing the value does not match.
pub fn find_by_flag(flag: &str, value: &str) -> Vec<u32> {
    live_pids_with(value)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.windows(2)
                    .any(|w| w[0] == flag.as_bytes() && w[1] == value.as_bytes())
            })
        })
        .collect()
}

/// Polls until the process is gone or `limit` passes; returns whether it is gone.
pub async fn wait_gone(pid: u32, marker: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !is_alive(pid, marker) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs the process if it is still ours, then waits for it to disappear.
pub async fn kill(pid: u32, marker: &str) -> bool {
    if is_alive(pid, marker)
        && let Ok(raw) = i32::try_from(pid)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_gone(pid, marker, Duration::from_secs(10)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_flag_matches_only_as_its_own_argument() {
        let value = format!("{:032x}", std::process::id() as u128 * 7919);
        let spawn = |args: &[&str]| {
            std::process::Command::new("sh")
                .args(["-c", "sleep 30"])
                .args(args)
                .spawn()
                .unwrap()
        };
        let mut flagged = spawn(&["--id", &value]);
        let mut in_path = spawn(&[&format!("/run/vms/{value}/ssh-control")]);
        // A child shows its parent's command line until its exec: poll with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = find_by_flag("--id", &value);
        while found != vec![flagged.id()] && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            found = find_by_flag("--id", &value);
        }
        assert_eq!(found, vec![flagged.id()]);
        for child in [&mut flagged, &mut in_path] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}
