//! qcow2 backing chains for named snapshots (`qemu-img`): a new empty overlay over a frozen
//! file, what a file is backed by, and a safe rebase (the file's guest-visible content stays
//! the same while the data only its old backing held is copied into it). Every chain names
//! its backing files by absolute path, so a file that becomes a snapshot member is moved once
//! (from the VM's top into the snapshot's directory) and never again.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::disk::DiskError;
use crate::domain::DiskFormat;

/// A file's backing file and its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub format: DiskFormat,
}

async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, DiskError> {
    let output = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(DiskError::spawn("qemu-img"))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(DiskError::Tool {
        tool: "qemu-img",
        message: crate::cause::of_failure("qemu-img", &output.status, &output.stderr),
    })
}

/// Creates `overlay` (replacing nothing: it is written at `partial` first, then renamed) as an
/// empty qcow2 file over `backing`, of the backing's virtual size.
pub async fn create_overlay(
    backing: &Backing,
    partial: &Path,
    overlay: &Path,
) -> Result<(), DiskError> {
    create_overlay_sized(backing, None, partial, overlay).await
}

/// Creates `overlay` like [`create_overlay`], of `size_bytes`, without opening the backing
/// (`-u`): for a backing a running VMM holds open, whose write lock a plain create would
/// wait for in vain.
pub async fn create_overlay_unopened(
    backing: &Backing,
    size_bytes: u64,
    partial: &Path,
    overlay: &Path,
) -> Result<(), DiskError> {
    create_overlay_sized(backing, Some(size_bytes), partial, overlay).await
}

/// [`create_overlay`] (`unopened_size` `None`) or [`create_overlay_unopened`].
async fn create_overlay_sized(
    backing: &Backing,
    unopened_size: Option<u64>,
    partial: &Path,
    overlay: &Path,
) -> Result<(), DiskError> {
    let _ = std::fs::remove_file(partial);
    let size = unopened_size.map(|bytes| bytes.to_string());
    let mut args: Vec<&std::ffi::OsStr> = vec!["create".as_ref(), "-q".as_ref()];
    if size.is_some() {
        args.push("-u".as_ref());
    }
    args.extend([
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        backing.format.as_str().as_ref(),
        "-b".as_ref(),
        backing.path.as_os_str(),
        partial.as_os_str(),
    ]);
    if let Some(size) = &size {
        args.push(size.as_ref());
    }
    qemu_img(&args).await?;
    std::fs::rename(partial, overlay).map_err(|source| DiskError::Io {
        context: format!(
            "cannot rename {} to {}",
            partial.display(),
            overlay.display()
        ),
        source,
    })
}

/// What `qemu-img info --output=json` says a file is backed by (`-U`: also while a VMM has
/// it open).
pub async fn backing_of(path: &Path) -> Result<Option<Backing>, DiskError> {
    let out = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        path.as_os_str(),
    ])
    .await?;
    parse_backing(&out).map_err(|message| DiskError::Tool {
        tool: "qemu-img",
        message: format!("info of {}: {message}", path.display()),
    })
}

/// The backing named in `qemu-img info --output=json` output (`full-backing-filename`, an
/// absolute path, and `backing-filename-format`).
pub fn parse_backing(json: &[u8]) -> Result<Option<Backing>, String> {
    let info: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let Some(path) = info
        .get("full-backing-filename")
        .or_else(|| info.get("backing-filename"))
        .and_then(|v| v.as_str())
    else {
        return Ok(None);
    };
    let format = match info.get("backing-filename-format").and_then(|v| v.as_str()) {
        Some(text) => text
            .parse()
            .map_err(|e: crate::domain::ParseError| e.to_string())?,
        None => return Err(format!("backing file {path} has no recorded format")),
    };
    Ok(Some(Backing {
        path: path.into(),
        format,
    }))
}

/// Rebases the qcow2 `file` onto `backing` (`None`: no backing), keeping what the guest sees:
/// data its old backing held and the new one does not is copied into it first, and the header
/// changes last, so an interrupted rebase leaves the file as it was to the guest and can run
/// again.
pub async fn rebase(file: &Path, backing: Option<&Backing>) -> Result<(), DiskError> {
    let mut args: Vec<std::ffi::OsString> =
        vec!["rebase".into(), "-q".into(), "-f".into(), "qcow2".into()];
    match backing {
        Some(b) => {
            args.extend(["-F".into(), b.format.as_str().into(), "-b".into()]);
            args.push(b.path.clone().into_os_string());
        }
        None => args.extend(["-b".into(), "".into()]),
    }
    args.push(file.as_os_str().to_owned());
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    qemu_img(&args).await.map(drop)
}

/// The files of a chain from `top` down to its base (top first), following backing files.
pub async fn chain(top: &Path) -> Result<Vec<PathBuf>, DiskError> {
    let mut files = vec![top.to_path_buf()];
    let mut at = top.to_path_buf();
    // A chain longer than this is a loop or not banger's.
    for _ in 0..4096 {
        match backing_of(&at).await? {
            Some(b) => {
                files.push(b.path.clone());
                at = b.path;
            }
            None => return Ok(files),
        }
    }
    Err(DiskError::Tool {
        tool: "qemu-img",
        message: format!("the backing chain of {} does not end", top.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_names_the_backing_and_its_format() {
        let json = br#"{"virtual-size": 1048576, "filename": "/v/work.qcow2", "format": "qcow2",
            "backing-filename": "/v/snapshots/1/work.ext4",
            "full-backing-filename": "/v/snapshots/1/work.ext4",
            "backing-filename-format": "raw"}"#;
        assert_eq!(
            parse_backing(json).unwrap(),
            Some(Backing {
                path: "/v/snapshots/1/work.ext4".into(),
                format: DiskFormat::Raw
            })
        );
        let plain = br#"{"virtual-size": 1048576, "filename": "/v/work.ext4", "format": "raw"}"#;
        assert_eq!(parse_backing(plain).unwrap(), None);
        let unknown = br#"{"full-backing-filename": "/b", "backing-filename-format": "vmdk"}"#;
        assert!(parse_backing(unknown).is_err());
        let no_format = br#"{"full-backing-filename": "/b"}"#;
        assert!(parse_backing(no_format).is_err());
    }

    fn have_qemu_img(test: &str) -> bool {
        let found = std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            banger_shared::skip::report(test, "qemu-img is not installed");
        }
        found
    }

    fn read_at(path: &Path, format: &str, offset: u64, len: usize) -> Vec<u8> {
        // What the guest would see: the whole disk converted to raw.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-f", format, "-O", "raw"])
            .arg(path)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let offset = offset as usize;
        std::fs::read(out).unwrap()[offset..offset + len].to_vec()
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        let status = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {} {offset} {}", data[0], data.len()))
            .arg(path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// base (raw) ← s1 ← top: a rebase of top onto base keeps what top shows, a rebase onto
    /// nothing too, and the chain follows every step.
    #[tokio::test]
    async fn overlays_chain_and_rebase_keeps_content() {
        if !have_qemu_img("overlays_chain_and_rebase_keeps_content") {
            return;
        }
        if std::process::Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_err()
        {
            banger_shared::skip::report(
                "overlays_chain_and_rebase_keeps_content",
                "qemu-io is not installed",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("work.ext4");
        std::fs::write(&base, vec![0xaa; 1 << 20]).unwrap();
        let s1 = dir.path().join("s1.qcow2");
        let top = dir.path().join("top.qcow2");
        let raw = Backing {
            path: base.clone(),
            format: DiskFormat::Raw,
        };
        create_overlay(&raw, &dir.path().join("s1.partial"), &s1)
            .await
            .unwrap();
        write_at(&s1, 4096, &[0xbb; 4096]);
        let q1 = Backing {
            path: s1.clone(),
            format: DiskFormat::Qcow2,
        };
        create_overlay(&q1, &dir.path().join("top.partial"), &top)
            .await
            .unwrap();
        assert!(!dir.path().join("top.partial").exists());
        assert_eq!(backing_of(&top).await.unwrap(), Some(q1));
        assert_eq!(
            chain(&top).await.unwrap(),
            vec![top.clone(), s1.clone(), base.clone()]
        );
        assert_eq!(read_at(&top, "qcow2", 4096, 4), vec![0xbb; 4]);
        // Dropping s1 from the chain: its data moves into top.
        rebase(&top, Some(&raw)).await.unwrap();
        assert_eq!(backing_of(&top).await.unwrap(), Some(raw));
        assert_eq!(read_at(&top, "qcow2", 4096, 4), vec![0xbb; 4]);
        assert_eq!(read_at(&top, "qcow2", 0, 4), vec![0xaa; 4]);
        // And the base too: top stands alone with the same content.
        rebase(&top, None).await.unwrap();
        assert_eq!(backing_of(&top).await.unwrap(), None);
        assert_eq!(read_at(&top, "qcow2", 0, 4), vec![0xaa; 4]);
        assert_eq!(read_at(&top, "qcow2", 4096, 4), vec![0xbb; 4]);
    }
}
