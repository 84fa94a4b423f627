//! KVM or TCG, decided by evidence rather than by the existence of /dev/kvm: a nested PVM host
//! (module `kvm_pvm`) exposes /dev/kvm but cannot run ordinary guest kernels. When the fast
//! checks pass, a real probe boot of the guest kernel under KVM settles it.
//!
//! Also the host TSC frequency, which TCG guests need on their command line
//! (`tsc_early_khz`): without it their timer calibration hangs at random.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

pub use crate::domain::Accel;
use crate::domain::AccelMode;

/// The decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Cheap checks that rule KVM out without booting anything; `None` means "probe it".
pub fn kvm_ruled_out(dev_kvm: &Path, sys_module: &Path) -> Option<String> {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open(dev_kvm)
    {
        return Some(format!("{} is not usable: {e}", dev_kvm.display()));
    }
    if sys_module.join("kvm_pvm").exists() {
        return Some(
            "KVM here is nested PVM (kvm_pvm), which cannot run standard guest kernels".into(),
        );
    }
    None
}

/// Boots `kernel` under KVM with no disks: a kernel that runs prints its banner and panics on
/// the missing root (panic=-1 reboots, -no-reboot ends QEMU). KVM is usable when the banner
/// appears; QEMU aborting (MSR or emulation errors) or silence means it is not.
pub async fn probe_kvm(qemu: &Path, kernel: &Path, scratch: &Path) -> Result<(), String> {
    let console = scratch.join("kvm-probe.log");
    let _ = std::fs::remove_file(&console);
    let child = tokio::process::Command::new(qemu)
        .args([
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await;
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    match output {
        Ok(Ok(out)) if log.contains("Linux version") => {
            let _ = out;
            Ok(())
        }
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let first = stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            Err(format!("a probe boot under KVM failed: {first}"))
        }
        Ok(Err(e)) => Err(format!("a probe boot under KVM failed: {e}")),
        Err(_) => Err("a probe boot under KVM printed nothing within 20s".into()),
    }
}

/// Decides the acceleration for `requested` (`qemu.accel`).
pub async fn choose(
    requested: AccelMode,
    qemu: &Path,
    kernel: &Path,
    scratch: &Path,
) -> AccelChoice {
    match requested {
        AccelMode::Tcg => AccelChoice {
            accel: Accel::Tcg,
            reason: "TCG requested in config".into(),
        },
        AccelMode::Kvm => AccelChoice {
            accel: Accel::Kvm,
            reason: "KVM requested in config".into(),
        },
        AccelMode::Auto => {
            let ruled_out = match kvm_ruled_out(Path::new("/dev/kvm"), Path::new("/sys/module")) {
                Some(why) => Some(why),
                None => probe_kvm(qemu, kernel, scratch).await.err(),
            };
            match ruled_out {
                Some(why) => AccelChoice {
                    accel: Accel::Tcg,
                    reason: format!("TCG (software emulation): {why}"),
                },
                None => AccelChoice {
                    accel: Accel::Kvm,
                    reason: "KVM: a probe boot succeeded".into(),
                },
            }
        }
    }
}

/// The host's TSC frequency in kHz, from the first source that knows it: the kernel's own
/// `tsc_freq_khz` (where exported), the "@ N.NNGHz" of the CPU model name (the nominal TSC
/// rate of constant-TSC CPUs), else "cpu MHz" (the TSC rate on VMs with tsc_known_freq).
pub fn host_tsc_khz(cpuinfo: &str, sys_tsc_khz: Option<&str>) -> Option<u64> {
    if let Some(khz) = sys_tsc_khz.and_then(|t| t.trim().parse::<u64>().ok()) {
        return Some(khz);
    }
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    if let Some(model) = field("model name")
        && let Some((_, ghz)) = model.rsplit_once('@')
        && let Some(number) = ghz.trim().strip_suffix("GHz")
        && let Ok(value) = number.trim().parse::<f64>()
    {
        return Some((value * 1_000_000.0).round() as u64);
    }
    field("cpu MHz")
        .and_then(|mhz| mhz.parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0).round() as u64)
        .filter(|khz| *khz > 0)
}

/// The TSC frequency of this machine in kHz, when its TSC is constant and non-stop (otherwise
/// the guest must calibrate by itself and `None` is returned). Measured against the monotonic
/// clock (the median of three 50 ms windows), which is right on bare metal and in VMs alike;
/// the static sources of [`host_tsc_khz`] are the fallback.
pub fn this_host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    if !(has("constant_tsc") && has("nonstop_tsc")) {
        return None;
    }
    if let Some(khz) = measure_tsc_khz() {
        return Some(khz);
    }
    let sys = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz").ok();
    host_tsc_khz(&cpuinfo, sys.as_deref())
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    let mut samples: Vec<u64> = (0..3)
        .filter_map(|_| {
            let start = Instant::now();
            // SAFETY: RDTSC has no preconditions on x86_64; it only reads the counter.
            let t0 = unsafe { core::arch::x86_64::_rdtsc() };
            while start.elapsed() < Duration::from_millis(50) {
                std::hint::spin_loop();
            }
            // SAFETY: as above.
            let t1 = unsafe { core::arch::x86_64::_rdtsc() };
            let nanos = start.elapsed().as_nanos() as u64;
            (nanos > 0 && t1 > t0).then(|| (t1 - t0) * 1_000_000 / nanos)
        })
        .collect();
    samples.sort_unstable();
    samples.get(1).copied()
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_from_model_name_then_cpu_mhz() {
        let with_model =
            "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz\ncpu MHz\t\t: 1200.000\n";
        assert_eq!(host_tsc_khz(with_model, None), Some(2_300_000));
        let plain = "model name\t: Intel(R) Xeon(R) Processor\ncpu MHz\t\t: 2300.000\n";
        assert_eq!(host_tsc_khz(plain, None), Some(2_300_000));
        assert_eq!(host_tsc_khz(plain, Some("2294687\n")), Some(2_294_687));
        assert_eq!(host_tsc_khz("", None), None);
    }

    #[test]
    fn measured_tsc_is_plausible() {
        match super::measure_tsc_khz() {
            Some(khz) => assert!((100_000..10_000_000).contains(&khz), "{khz} kHz"),
            None => banger_shared::skip::report(
                "measured_tsc_is_plausible",
                "this host gives no TSC frequency to measure",
            ),
        }
    }

    #[test]
    fn a_missing_device_rules_kvm_out() {
        let dir = tempfile::tempdir().unwrap();
        let why = kvm_ruled_out(&dir.path().join("kvm"), dir.path()).unwrap();
        assert!(why.contains("not usable"), "{why}");
    }

    #[test]
    fn a_pvm_module_rules_kvm_out() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        let why = kvm_ruled_out(&dev, dir.path()).unwrap();
        assert!(why.contains("PVM"), "{why}");
    }
}
