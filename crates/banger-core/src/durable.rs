//! Small files replaced whole and durably: the new content is written beside the file (its
//! `.partial` name from the layout), flushed, renamed over it, and the directory flushed, so
//! a crash leaves the old file or the new one, never a torn one.

use std::io::Write;
use std::path::Path;

use crate::layout::Layout;

/// Replaces `path` with `bytes` (see the module doc). Blocking: fsyncs.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = Layout::vm_overlay_partial(path);
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_file_is_replaced_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, "old\n").unwrap();
        super::replace(&path, b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("known_hosts")]);
    }
}
