//! The one-line cause of a failed outside command (cp, mkfs.ext4, qemu-img, ssh and the
//! guest's tar, debugfs, git, ssh-keygen, a build script, a VMM): the last thing it said on
//! stderr, so "No space left on device" reaches the user's error instead of "exit status: 1".
//! Every such summary in banger-core goes through here.

use std::process::ExitStatus;

/// Longest cause kept, in characters: a guest's or a tool's line can be anything.
pub const MAX_CHARS: usize = 300;

/// The last non-empty line of `output` without a leading "`program`: " (as cp, mkfs and ssh
/// prefix their messages), control characters shown escaped (`\x1b`, never sent to a
/// terminal), at most [`MAX_CHARS`]; `None` when
/// every line is blank.
pub fn last_line(output: &str, program: &str) -> Option<String> {
    let line = output.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    let prefix = format!("{program}: ");
    let line = match line.strip_prefix(&prefix) {
        Some(rest) if !program.is_empty() && !rest.trim().is_empty() => rest,
        _ => line,
    };
    Some(
        line.chars()
            .flat_map(|c| {
                let shown = if c.is_control() {
                    format!("\\x{:02x}", u32::from(c))
                } else {
                    c.to_string()
                };
                shown.chars().collect::<Vec<_>>()
            })
            .take(MAX_CHARS)
            .collect(),
    )
}

/// Why `program` failed with `status`: [`last_line`] of its `stderr`, else the status.
pub fn of_failure(program: &str, status: &ExitStatus, stderr: &[u8]) -> String {
    last_line(&String::from_utf8_lossy(stderr), program).unwrap_or_else(|| status.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn the_cause_is_the_last_line_without_the_program_name() {
        let stderr = b"cp: error writing '/d/rootfs.partial': No space left on device\n\n";
        assert_eq!(
            of_failure("cp", &ExitStatus::from_raw(1 << 8), stderr),
            "error writing '/d/rootfs.partial': No space left on device"
        );
        assert_eq!(
            last_line(
                "warning: x\nmkfs.ext4: Could not allocate block\n",
                "mkfs.ext4"
            )
            .as_deref(),
            Some("Could not allocate block")
        );
        // Another program's prefix stays; so does a bare "NAME: ".
        assert_eq!(
            last_line("tar: short read", "ssh").as_deref(),
            Some("tar: short read")
        );
        assert_eq!(last_line("cp: ", "cp").as_deref(), Some("cp:"));
    }

    #[test]
    fn silence_gives_the_status_and_noise_is_bounded() {
        assert_eq!(
            of_failure("qemu-img", &ExitStatus::from_raw(1 << 8), b" \n"),
            "exit status: 1"
        );
        let long = format!("{}\x1b[31m", "x".repeat(1000));
        let line = last_line(&long, "").unwrap();
        assert_eq!(line.chars().count(), MAX_CHARS);
        assert!(!line.contains('\x1b'));
        assert_eq!(
            last_line("boom \x1b]0;pwned\x07", "").as_deref(),
            Some("boom \\x1b]0;pwned\\x07")
        );
    }
}
