//! Fault points: named steps of the daemon's operations where a test can make the daemon die
//! (SIGKILL to itself), the step fail as if an outside call had failed, or the VMMs crash
//! while the daemon runs on. Each step is one line, `crate::fault::point("start.after_launch")?;`,
//! and the fault tests (crates/banger-e2e/tests/faults.rs) find every name by searching the
//! source for that call, so a new step without a test fails them.
//!
//! Only in builds with debug assertions (the test builds), and only when the daemon's
//! environment has `BANGER_FAULT=<step>` (die there), `BANGER_FAULT=<step>=fail` (fail
//! there) or `BANGER_FAULT=<step>=kill-vmm` (SIGKILL the VMM processes of the daemon's VMs
//! there, the first time the step is reached, wait until they are gone, and go on as if they
//! had crashed). The VMMs are those the daemon launched or took control of since it started
//! ([`vmm_running`]). A release build compiles every point to nothing and never reads the
//! variable.

/// The environment variable naming the step to fault, and how.
pub const ENV: &str = "BANGER_FAULT";

/// The error of a step made to fail.
#[derive(Debug, Clone, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct Injected(pub &'static str);

/// What to do at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SIGKILL the process: a daemon crash.
    Kill,
    /// Return [`Injected`]: the step's outside call failed.
    Fail,
    /// SIGKILL the VMMs (once) and go on: the VMM crashed at this step, the daemon did not.
    KillVmm,
}

/// Parses a `BANGER_FAULT` value into the step and the mode.
pub fn parse(value: &str) -> (&str, Mode) {
    if let Some(step) = value.strip_suffix("=fail") {
        (step, Mode::Fail)
    } else if let Some(step) = value.strip_suffix("=kill-vmm") {
        (step, Mode::KillVmm)
    } else {
        (value.strip_suffix("=kill").unwrap_or(value), Mode::Kill)
    }
}

/// How long a `kill-vmm` fault waits for the killed VMMs to be gone.
#[cfg(debug_assertions)]
const VMM_GONE: std::time::Duration = std::time::Duration::from_secs(10);

/// The VMM processes of this daemon's VMs, VM id → pid (the latest one given per VM): what a
/// `kill-vmm` fault kills.
#[cfg(debug_assertions)]
static VMMS: std::sync::Mutex<std::collections::BTreeMap<String, u32>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Notes that `pid` is VM `vm_id`'s VMM (its launch, restore, or the daemon taking control of
/// it), for a `kill-vmm` fault.
#[cfg(debug_assertions)]
pub fn vmm_running(vm_id: &str, pid: u32) {
    if let Ok(mut vmms) = VMMS.lock() {
        vmms.insert(vm_id.to_owned(), pid);
    }
}

/// Notes the VMM of a VM (a release build: nothing).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn vmm_running(_vm_id: &str, _pid: u32) {}

/// SIGKILLs every live process of `vmms` (VM id, pid: a pid counts only while its command
/// line names the VM id) and polls until all are gone (a zombie is gone) or `limit` passes;
/// returns whether they are gone.
#[cfg(debug_assertions)]
fn kill_vmms(vmms: &[(String, u32)], limit: std::time::Duration) -> bool {
    use crate::vmm::process::is_alive;
    for (id, pid) in vmms {
        if is_alive(*pid, id)
            && let Ok(raw) = i32::try_from(*pid)
        {
            tracing::warn!(vm = %id, pid, "fault point: killing the VMM");
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), nix::sys::signal::SIGKILL);
        }
    }
    let deadline = std::time::Instant::now() + limit;
    loop {
        if vmms.iter().all(|(id, pid)| !is_alive(*pid, id)) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        // Test builds only, and a SIGKILLed process is gone within milliseconds: a short
        // blocking wait here keeps `point` a plain function call.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Step `step` of an operation: dies or fails there when `BANGER_FAULT` says so.
#[cfg(debug_assertions)]
pub fn point(step: &'static str) -> Result<(), Injected> {
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()));
    let Some(chosen) = chosen else {
        return Ok(());
    };
    match parse(chosen) {
        (name, Mode::Kill) if name == step => {
            tracing::warn!(step, "fault point: the daemon kills itself");
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGKILL);
            // SIGKILL to oneself is delivered before kill(2) returns; this is never reached.
            std::process::abort()
        }
        (name, Mode::Fail) if name == step => {
            tracing::warn!(step, "fault point: the step fails");
            Err(Injected(step))
        }
        (name, Mode::KillVmm) if name == step => {
            // Once: a crash happens at one moment, and later operations (the start that
            // boots the VM again) pass the same steps.
            static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let vmms: Vec<(String, u32)> = VMMS
                    .lock()
                    .map(|v| v.iter().map(|(id, pid)| (id.clone(), *pid)).collect())
                    .unwrap_or_default();
                tracing::warn!(step, count = vmms.len(), "fault point: the VMMs are killed");
                if !kill_vmms(&vmms, VMM_GONE) {
                    tracing::warn!(step, "fault point: a killed VMM is still there");
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Step `step` of an operation (a release build: nothing).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_step: &'static str) -> Result<(), Injected> {
    Ok(())
}

impl From<Injected> for crate::Error {
    fn from(e: Injected) -> Self {
        crate::Error::Failed(e.to_string())
    }
}

impl From<Injected> for crate::image::ImageError {
    fn from(e: Injected) -> Self {
        crate::image::ImageError::Io {
            context: e.to_string(),
            source: std::io::Error::other("injected"),
        }
    }
}

impl From<Injected> for crate::disk::DiskError {
    fn from(e: Injected) -> Self {
        crate::disk::DiskError::Tool {
            tool: "fault point",
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_a_step_and_a_mode() {
        assert_eq!(
            parse("start.after_launch"),
            ("start.after_launch", Mode::Kill)
        );
        assert_eq!(
            parse("start.after_launch=kill"),
            ("start.after_launch", Mode::Kill)
        );
        assert_eq!(
            parse("rm.after_record=fail"),
            ("rm.after_record", Mode::Fail)
        );
        assert_eq!(
            parse("suspend.after_snapshot=kill-vmm"),
            ("suspend.after_snapshot", Mode::KillVmm)
        );
        assert_eq!(
            parse("snapshot.live.after_freeze=kill-vmm"),
            ("snapshot.live.after_freeze", Mode::KillVmm)
        );
        // Only a whole suffix is a mode.
        assert_eq!(parse("a.b=kill-vm"), ("a.b=kill-vm", Mode::Kill));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[allow(clippy::unwrap_used)]
    fn killed_vmms_are_gone_zombies_included() {
        let marker = format!("fault-test-{}", std::process::id());
        // A child of this test: once killed it stays a zombie until reaped, and counts as gone.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 60; :", &marker])
            .spawn()
            .unwrap();
        let pid = child.id();
        // A child shows its parent's command line until its exec: poll with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !crate::vmm::process::is_alive(pid, &marker) {
            assert!(std::time::Instant::now() < deadline, "the child never ran");
            std::thread::yield_now();
        }
        // Another VM's pid that names a different id is not touched.
        let vmms = vec![(marker.clone(), pid), ("other-vm".to_owned(), pid)];
        assert!(kill_vmms(&vmms, std::time::Duration::from_secs(10)));
        assert!(!crate::vmm::process::is_alive(pid, &marker));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(9));
        // Nothing alive: nothing to do.
        assert!(kill_vmms(&vmms, std::time::Duration::ZERO));
    }

    #[test]
    fn no_variable_no_fault() {
        // The test runner's environment has no BANGER_FAULT.
        assert!(std::env::var_os(ENV).is_none());
        assert!(point("any.step").is_ok());
    }
}
