//! How a test of any banger crate says it could not run: [`report`] prints a `SKIP:` line
//! (and [`announce_real`] a `REAL:` line for a test that ran against a real component)
//! that the test harness does not capture, and records it in the file `BANGER_SKIP_LOG`
//! names (scripts/test sets it, lists every skip at the end, and in CI fails on a skip
//! whose reason is not one this kind of machine cannot help; see scripts/allowed-skips).

use std::io::Write;

/// The environment variable naming the file skips are appended to.
pub const SKIP_LOG_ENV: &str = "BANGER_SKIP_LOG";

/// Reports that `test` did not run (or ran only in part) because of `reason`.
///
/// The line goes straight to the process's standard error, past libtest's output capture,
/// so it shows in a passing run.
pub fn report(test: &str, reason: &str) {
    let line = skip_line(test, reason);
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
        append(std::path::Path::new(&log), &line);
    }
}

fn skip_line(test: &str, reason: &str) -> String {
    format!("SKIP: {test}: {}\n", reason.replace('\n', " "))
}

/// Says that `test` ran against something real that may be absent elsewhere (the real
/// Firecracker, a registry): a `REAL:` line, uncaptured like [`report`]'s.
pub fn announce_real(test: &str, what: &str) {
    let line = format!("REAL: {test}: {}\n", what.replace('\n', " "));
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// One short write with O_APPEND: lines of concurrent tests do not interleave.
fn append(log: &std::path::Path, line: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn a_skip_is_appended_to_the_log() {
        let dir = std::env::temp_dir().join(format!("banger-skip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        super::append(&log, &super::skip_line("one", "two\nthree"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.ends_with("SKIP: one: two three\n"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
