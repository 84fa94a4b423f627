//! `vm stats`: what each VM costs, read on the host without entering the guest (the VMM's CPU
//! time and resident memory from /proc, the disks' allocated bytes, a bridge VM's tap
//! counters, uptime) and, with `guest`, from inside it in one SSH round trip (load, memory,
//! filesystem use, the guest's interface counters).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use banger_proto::{DiskUsage, FsUsage, GuestStats, NetCounters, VmName, VmState, VmStats};

use super::Manager;
use crate::Error;
use crate::domain::SystemDiskStrategy;
use crate::model::{VmRecord, has_process};
use crate::usage;

/// How long the guest query may take (dial included) before its figures are left out.
const GUEST_LIMIT: Duration = Duration::from_secs(10);
/// A CPU sample younger than this is too short to divide by; the average since start is given.
const MIN_SAMPLE: Duration = Duration::from_millis(100);

/// Prints, one per line: loadavg; MemTotal/MemAvailable (kB); `df -B1` of / and /root; the
/// guest's eth0 counters (rx_bytes tx_bytes rx_packets tx_packets).
const GUEST_SCRIPT: &str = "cat /proc/loadavg; \
    awk '/^MemTotal:|^MemAvailable:/ {print $2}' /proc/meminfo | tr '\\n' ' '; echo; \
    df -P -B1 / /root | awk 'NR>1 {print $2, $3, $4}'; \
    d=/sys/class/net/eth0/statistics; \
    [ -d $d ] && echo $(cat $d/rx_bytes $d/tx_bytes $d/rx_packets $d/tx_packets) || echo";

/// The daemon's previous CPU reading of each VMM process, so that a `--watch` refresh shows
/// the use since the last one (like `docker stats`).
#[derive(Debug, Default)]
pub(super) struct CpuSamples(std::sync::Mutex<HashMap<u32, (Instant, f64)>>);

impl CpuSamples {
    /// CPU percent of one core for `pid` now at `cpu_secs` used, and records this reading.
    fn percent(&self, pid: u32, cpu_secs: f64, uptime_secs: f64) -> f64 {
        let now = Instant::now();
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let percent = match samples.get(&pid) {
            Some((at, before)) if now.duration_since(*at) >= MIN_SAMPLE => {
                (cpu_secs - before).max(0.0) / now.duration_since(*at).as_secs_f64() * 100.0
            }
            _ if uptime_secs > 0.0 => cpu_secs / uptime_secs * 100.0,
            _ => 0.0,
        };
        if samples
            .get(&pid)
            .is_none_or(|(at, _)| now.duration_since(*at) >= MIN_SAMPLE)
        {
            samples.insert(pid, (now, cpu_secs));
        }
        percent
    }

    /// Forgets processes that are no longer VMMs of listed VMs.
    fn retain(&self, live: &[u32]) {
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        samples.retain(|pid, _| live.contains(pid));
    }
}

impl Manager {
    /// How many VMs have a VMM process now (running or paused), as recorded.
    pub async fn running_vm_count(&self) -> Result<u32, Error> {
        let records = self.db.list_vms().await?;
        Ok(records.iter().filter(|r| has_process(r.state)).count() as u32)
    }

    /// Figures for the VMs named (all when `names` is empty), in name order.
    pub async fn vm_stats(&self, names: &[String], guest: bool) -> Result<Vec<VmStats>, Error> {
        let records: Vec<VmRecord> = if names.is_empty() {
            self.db.list_vms().await?
        } else {
            let mut records = Vec::with_capacity(names.len());
            for name in names {
                let name = VmName::parse(name)?;
                records.push(self.db.get_vm(name.as_str()).await?);
            }
            records
        };
        let mut observed = Vec::with_capacity(records.len());
        let mut stats = Vec::with_capacity(records.len());
        for record in records {
            let record = self.observe(record).await;
            stats.push(self.host_stats(&record).await);
            observed.push(record);
        }
        let records = observed;
        let live: Vec<u32> = records
            .iter()
            .filter_map(|r| r.runtime.as_ref().and_then(|rt| rt.pid))
            .collect();
        self.cpu_samples.retain(&live);
        if guest {
            let mut queries = tokio::task::JoinSet::new();
            for (index, record) in records.iter().enumerate() {
                if record.state != VmState::Running {
                    continue;
                }
                let Ok(target) = self.ssh_target(record) else {
                    continue;
                };
                queries.spawn(async move {
                    let answer = crate::guest::ssh::run(
                        &target,
                        GUEST_SCRIPT,
                        Duration::from_secs(5),
                        GUEST_LIMIT,
                    )
                    .await;
                    (index, answer)
                });
            }
            while let Some(done) = queries.join_next().await {
                let Ok((index, Ok((Some(0), out, _)))) = done else {
                    continue;
                };
                let (figures, counters) = parse_guest(&out);
                stats[index].guest = figures;
                if stats[index].network.is_none() {
                    stats[index].network = counters;
                }
            }
        }
        Ok(stats)
    }

    /// What the host knows of `record` without asking the guest.
    async fn host_stats(&self, record: &VmRecord) -> VmStats {
        let (image, id) = (record.spec.image.clone(), record.id.clone());
        let (image, lease) = self
            .db
            .run(move |s| {
                let image = s.find_image(&image).ok().flatten();
                let lease = s.lease_of(&id).ok().flatten();
                Ok::<_, Error>((image, lease))
            })
            .await
            .unwrap_or_default();
        let process = has_process(record.state)
            .then(|| record.runtime.as_ref().and_then(|r| r.pid))
            .flatten()
            .and_then(|pid| usage::process(pid).map(|u| (pid, u)));
        let (system, format_file) = match record.spec.system_disk {
            // The dm disk's own writes live in its copy-on-write store; the guest sees the
            // image's size.
            SystemDiskStrategy::DmSnapshot => (
                self.layout.vm_system_cow(&record.id),
                image.map(|image| self.layout.image_rootfs(&image.digest)),
            ),
            _ => {
                let disk = self
                    .system_disk_file(record)
                    .unwrap_or_else(|| self.layout.vm_system_disk(&record.id));
                (disk.clone(), Some(disk))
            }
        };
        let (work, _) = self.work_disk(&record.id);
        let mut disks = Vec::new();
        if let (Some(allocated), Some(virtual_bytes)) = (
            usage::allocated_bytes(&system),
            format_file.as_deref().and_then(usage::virtual_bytes),
        ) {
            disks.push(DiskUsage {
                disk: "system".into(),
                virtual_bytes,
                allocated_bytes: allocated,
            });
        }
        if let (Some(allocated), Some(virtual_bytes)) =
            (usage::allocated_bytes(&work), usage::virtual_bytes(&work))
        {
            disks.push(DiskUsage {
                disk: "work".into(),
                virtual_bytes,
                allocated_bytes: allocated,
            });
        }
        // A bridge VM's tap: what the host receives on it the guest sent (tx for the guest).
        let network = if process.is_some() {
            lease
                .and_then(|lease| usage::interface_counters(&lease.tap))
                .map(|[rx, tx, rx_packets, tx_packets]| NetCounters {
                    source: "tap".into(),
                    rx_bytes: tx,
                    tx_bytes: rx,
                    rx_packets: tx_packets,
                    tx_packets: rx_packets,
                })
        } else {
            None
        };
        VmStats {
            name: record.name.to_string(),
            state: record.state,
            uptime_secs: process.map(|(_, u)| u.uptime_secs),
            cpu_secs: process.map(|(_, u)| u.cpu_secs),
            cpu_percent: process
                .map(|(pid, u)| self.cpu_samples.percent(pid, u.cpu_secs, u.uptime_secs)),
            rss_bytes: process.map(|(_, u)| u.rss_bytes),
            disks,
            network,
            guest: None,
        }
    }
}

/// Parses [`GUEST_SCRIPT`]'s output; a guest that printed something else gives `None`.
fn parse_guest(out: &str) -> (Option<GuestStats>, Option<NetCounters>) {
    let mut lines = out.lines();
    let figures = (|| {
        let load: Vec<f64> = lines
            .next()?
            .split_whitespace()
            .take(3)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let memory: Vec<u64> = lines
            .next()?
            .split_whitespace()
            .map(|v| v.parse::<u64>().ok().map(|kib| kib * 1024))
            .collect::<Option<_>>()?;
        let mut fs = || -> Option<FsUsage> {
            let values: Vec<u64> = lines
                .next()?
                .split_whitespace()
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?;
            Some(FsUsage {
                size_bytes: *values.first()?,
                used_bytes: *values.get(1)?,
                available_bytes: *values.get(2)?,
            })
        };
        let root_fs = fs()?;
        let work_fs = fs()?;
        Some(GuestStats {
            load: [*load.first()?, *load.get(1)?, *load.get(2)?],
            mem_total_bytes: *memory.first()?,
            mem_available_bytes: *memory.get(1)?,
            root_fs,
            work_fs,
        })
    })();
    let counters = lines.next().and_then(|line| {
        let values: Vec<u64> = line
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(NetCounters {
            source: "guest".into(),
            rx_bytes: *values.first()?,
            tx_bytes: *values.get(1)?,
            rx_packets: *values.get(2)?,
            tx_packets: *values.get(3)?,
        })
    });
    (figures, counters)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_guest_answer_is_parsed_whole_or_not_at_all() {
        let out = "0.25 0.10 0.05 1/80 321\n\
                   1000 600 \n\
                   8000 3000 5000\n\
                   2000 100 1900\n\
                   111 222 3 4\n";
        let (figures, counters) = parse_guest(out);
        let figures = figures.unwrap();
        assert_eq!(figures.load, [0.25, 0.10, 0.05]);
        assert_eq!(figures.mem_total_bytes, 1000 * 1024);
        assert_eq!(figures.mem_available_bytes, 600 * 1024);
        assert_eq!(figures.root_fs.size_bytes, 8000);
        assert_eq!(figures.work_fs.available_bytes, 1900);
        let counters = counters.unwrap();
        assert_eq!(
            (
                counters.rx_bytes,
                counters.tx_packets,
                counters.source.as_str()
            ),
            (111, 4, "guest")
        );
        // A guest answering with something else gives nothing rather than wrong figures.
        assert_eq!(parse_guest("\u{1b}]0;pwned\u{7}\n"), (None, None));
    }

    #[test]
    fn cpu_percent_is_the_use_since_the_previous_sample() {
        let samples = CpuSamples::default();
        // First reading: the average since start (2 s of CPU in 10 s).
        assert!((samples.percent(7, 2.0, 10.0) - 20.0).abs() < 1e-9);
        // Pretend the previous reading was 1 s ago at 1.5 s used.
        samples
            .0
            .lock()
            .unwrap()
            .insert(7, (Instant::now() - Duration::from_secs(1), 1.5));
        let p = samples.percent(7, 2.0, 11.0);
        assert!((40.0..=50.0).contains(&p), "{p}");
        samples.retain(&[]);
        assert!(samples.0.lock().unwrap().is_empty());
    }
}
