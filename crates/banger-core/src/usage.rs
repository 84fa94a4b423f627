//! Host-side resource figures, read without entering a guest: a process's CPU time, resident
//! memory and age from /proc, the bytes a disk file really occupies (blocks, not length), the
//! virtual size of a qcow2 image from its header, and an interface's counters from sysfs.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// CPU time, memory and age of one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Seconds since the process started.
    pub uptime_secs: f64,
}

/// Clock ticks per second of /proc's time fields.
fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100.0, |t| t as f64)
}

/// Parses /proc/PID/stat: (utime + stime ticks, starttime ticks). The command name, in
/// parentheses, may hold spaces and parentheses itself: fields are counted after the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the full line, so index i here is field i + 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some((utime + stime, start))
}

/// `VmRSS:  123 kB` from /proc/PID/status, in bytes.
fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The figures of process `pid`, or `None` when it is gone.
pub fn process(pid: u32) -> Option<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let (cpu_ticks, start_ticks) = parse_stat(&stat)?;
    let ticks = clock_ticks();
    Some(ProcessUsage {
        cpu_secs: cpu_ticks as f64 / ticks,
        rss_bytes: parse_rss(&status)?,
        uptime_secs: (uptime - start_ticks as f64 / ticks).max(0.0),
    })
}

/// Resident memory of this process, bytes.
pub fn own_rss() -> Option<u64> {
    parse_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Bytes a file occupies on its filesystem (allocated blocks: holes and shared reflink
/// extents of a sparse file are not counted twice by the file's length).
pub fn allocated_bytes(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// The size a guest sees of disk file `path`: the qcow2 header's size field for a qcow2
/// image, the file's length for a raw one.
pub fn virtual_bytes(path: &Path) -> Option<u64> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut header = [0u8; 32];
    let len = file.metadata().ok()?.len();
    if file.read_exact(&mut header).is_ok() && header[..4] == *b"QFI\xfb" {
        // QCowHeader: magic, version, backing_file_offset (8), backing_file_size (4),
        // cluster_bits (4), then size (8, big-endian) at offset 24.
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        return Some(u64::from_be_bytes(size));
    }
    Some(len)
}

/// Counters of host interface `name` (`/sys/class/net/NAME/statistics`): (rx_bytes,
/// tx_bytes, rx_packets, tx_packets) as the host sees them.
pub fn interface_counters(name: &str) -> Option<[u64; 4]> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let dir = Path::new("/sys/class/net").join(name).join("statistics");
    let read = |file: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some([
        read("rx_bytes")?,
        read("tx_bytes")?,
        read("rx_packets")?,
        read("tx_packets")?,
    ])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        // A name with spaces and parentheses, as QEMU's renamed threads can have.
        let line = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 12345 1000 200 18446744073709551615";
        assert_eq!(parse_stat(line), Some((300, 12345)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_cpu_time_memory_and_an_age() {
        let me = process(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0);
        assert!(me.uptime_secs >= 0.0);
        assert!(me.cpu_secs >= 0.0);
        assert_eq!(process(u32::MAX), None);
    }

    #[test]
    fn sparse_files_count_blocks_not_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        assert_eq!(virtual_bytes(&path), Some(64 << 20));
        assert!(allocated_bytes(&path).unwrap() < 1 << 20);
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        assert!(allocated_bytes(&path).unwrap() >= 1 << 20);
    }

    #[test]
    fn qcow2_virtual_size_comes_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("3G")
            .status();
        let Ok(status) = status else {
            banger_shared::skip::report(
                "qcow2_virtual_size_comes_from_the_header",
                "qemu-img is not installed",
            );
            return;
        };
        assert!(status.success());
        assert_eq!(virtual_bytes(&path), Some(3 << 30));
        assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
    }

    #[test]
    fn interface_names_cannot_leave_sysfs() {
        assert_eq!(interface_counters("../../etc"), None);
        assert_eq!(interface_counters(""), None);
        assert!(interface_counters("lo").is_some());
    }
}
