//! e2fsprogs on a stopped VM's ext4 disk images, on the host: `e2fsck -p` after an unclean
//! stop (`-f` too before a resize), `resize2fs` to grow a filesystem into its grown file.
//! The images hold what the guest wrote, and the guest is not trusted: the tools run as the
//! daemon's user (never root), only on the VM's own files, and what they print is kept short
//! (the last [`OUTPUT_TAIL`] bytes of each stream) for logs and error messages.

use std::path::Path;
use std::process::Stdio;

use banger_proto::FsckResult;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::disk::{DiskError, system_tool};

/// How much of each output stream is kept (its end, where e2fsck says what it could not do).
pub const OUTPUT_TAIL: usize = 16 << 10;

/// One run of an e2fsprogs tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolRun {
    /// The exit status (`-1` when it ended by a signal).
    pub exit_code: i32,
    /// The end of stdout, then the end of stderr (lossy UTF-8).
    pub output: String,
}

impl ToolRun {
    /// What `e2fsck`'s exit status means (a bit mask: 1 errors corrected, 2 reboot asked,
    /// 4 errors left, 8 operational error, 16 usage, 32 cancelled, 128 library error).
    pub fn fsck_result(&self) -> FsckResult {
        match self.exit_code {
            0 => FsckResult::Clean,
            1..=3 => FsckResult::Repaired,
            _ => FsckResult::Failed,
        }
    }

    /// The last non-empty line of the output.
    pub fn last_line(&self) -> String {
        self.output
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("no output")
            .to_owned()
    }

    /// The last `n` non-empty lines, joined with ` | ` (one line for an error message).
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self
            .output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

/// `e2fsck -p` (preen: repairs what is safe without a human, refuses the rest) on `image`;
/// with `force`, also `-f`: a full check of a filesystem marked clean (what resize2fs asks
/// for first).
pub async fn fsck(image: &Path, force: bool) -> Result<ToolRun, DiskError> {
    let mut command = Command::new(system_tool("e2fsck"));
    command.arg("-p");
    if force {
        command.arg("-f");
    }
    run("e2fsck", command.arg(image)).await
}

/// `resize2fs IMAGE`: grows the filesystem to fill its file (e2fsck -f must have passed).
pub async fn grow(image: &Path) -> Result<(), DiskError> {
    let done = run(
        "resize2fs",
        Command::new(system_tool("resize2fs")).arg(image),
    )
    .await?;
    if done.exit_code == 0 {
        Ok(())
    } else {
        Err(DiskError::Tool {
            tool: "resize2fs",
            message: done.tail(2),
        })
    }
}

/// `e2fsck -f -p` then `resize2fs` on `image`: its filesystem grown to its file's size.
pub async fn check_and_grow(image: &Path) -> Result<(), DiskError> {
    let check = fsck(image, true).await?;
    if check.fsck_result() == FsckResult::Failed {
        return Err(DiskError::Tool {
            tool: "e2fsck",
            message: format!(
                "exit {}, cannot repair {} by itself: {}",
                check.exit_code,
                image.display(),
                check.tail(3)
            ),
        });
    }
    grow(image).await
}

async fn run(tool: &'static str, command: &mut Command) -> Result<ToolRun, DiskError> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(DiskError::spawn(tool))?;
    let (stdout, stderr) = tokio::join!(
        read_tail(child.stdout.take()),
        read_tail(child.stderr.take())
    );
    let status = child.wait().await.map_err(|e| DiskError::Tool {
        tool,
        message: e.to_string(),
    })?;
    let mut output = stdout;
    output.push_str(&stderr);
    Ok(ToolRun {
        exit_code: status.code().unwrap_or(-1),
        output,
    })
}

/// Reads `pipe` to its end, keeping its last [`OUTPUT_TAIL`] bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > 2 * OUTPUT_TAIL {
            kept.drain(..kept.len() - OUTPUT_TAIL);
        }
    }
    if kept.len() > OUTPUT_TAIL {
        kept.drain(..kept.len() - OUTPUT_TAIL);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(exit_code: i32, output: &str) -> ToolRun {
        ToolRun {
            exit_code,
            output: output.into(),
        }
    }

    #[test]
    fn exit_codes_map_to_results() {
        assert_eq!(run(0, "").fsck_result(), FsckResult::Clean);
        assert_eq!(run(1, "").fsck_result(), FsckResult::Repaired);
        assert_eq!(run(2, "").fsck_result(), FsckResult::Repaired);
        for failed in [4, 8, 12, 16, 32, 128, -1] {
            assert_eq!(
                run(failed, "").fsck_result(),
                FsckResult::Failed,
                "{failed}"
            );
        }
    }

    #[test]
    fn output_is_summed_up_on_one_line() {
        let r = run(
            4,
            "work.ext4: recovering journal\n\nwork.ext4: Inode 12 has bad blocks.\n\nwork.ext4: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.\n",
        );
        assert_eq!(
            r.last_line(),
            "work.ext4: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY."
        );
        assert_eq!(
            r.tail(2),
            "work.ext4: Inode 12 has bad blocks. | work.ext4: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY."
        );
        assert_eq!(run(0, "").last_line(), "no output");
    }

    /// On a real ext4 image: a clean check, a forced one, and a grow into a longer file.
    #[tokio::test]
    async fn a_filesystem_is_checked_and_grown_into_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("work.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let made = std::process::Command::new(system_tool("mkfs.ext4"))
            .args(["-q", "-F", "-b", "4096"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(made.success());
        let clean = fsck(&image, false).await.unwrap();
        assert_eq!(clean.fsck_result(), FsckResult::Clean, "{clean:?}");
        std::fs::File::options()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        check_and_grow(&image).await.unwrap();
        let blocks = std::process::Command::new(system_tool("dumpe2fs"))
            .arg("-h")
            .arg(&image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&blocks.stdout);
        assert!(
            text.lines()
                .any(|l| l.starts_with("Block count:") && l.ends_with(" 16384")),
            "{text}"
        );
        // A file that is no filesystem: e2fsck cannot repair it.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0xa5u8; 1 << 20]).unwrap();
        let bad = fsck(&junk, false).await.unwrap();
        assert_eq!(bad.fsck_result(), FsckResult::Failed, "{bad:?}");
    }
}
