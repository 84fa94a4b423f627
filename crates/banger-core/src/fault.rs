//! Fault points: named steps of the daemon's operations where a test can make the daemon die
//! (SIGKILL to itself) or the step fail as if an outside call had failed. Each step is one
//! line, `crate::fault::point("start.after_launch")?;`, and the fault tests
//! (crates/banger-e2e/tests/faults.rs) find every name by searching the source for that call,
//! so a new step without a test fails them.
//!
//! Only in builds with debug assertions (the test builds), and only when the daemon's
//! environment has `BANGER_FAULT=<step>` (die there) or `BANGER_FAULT=<step>=fail` (fail
//! there). A release build compiles every point to nothing and never reads the variable.

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
}

/// Parses a `BANGER_FAULT` value into the step and the mode.
pub fn parse(value: &str) -> (&str, Mode) {
    match value.strip_suffix("=fail") {
        Some(step) => (step, Mode::Fail),
        None => (value.strip_suffix("=kill").unwrap_or(value), Mode::Kill),
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
    }

    #[test]
    fn no_variable_no_fault() {
        // The test runner's environment has no BANGER_FAULT.
        assert!(std::env::var_os(ENV).is_none());
        assert!(point("any.step").is_ok());
    }
}
