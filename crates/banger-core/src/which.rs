//! Finding executables: the crate's one PATH lookup.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Whether `path` is a regular file someone may execute.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first executable `name` in the directories of `path_var` (a PATH value).
pub fn in_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// `name` as a command would run it: itself when it has a `/`, else the first executable of
/// that name on this process's PATH.
pub fn which(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return is_executable(name).then(|| name.to_path_buf());
    }
    in_path(name.to_str()?, std::env::var_os("PATH").as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables_only() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let path_var = std::env::join_paths([dir.path()]).unwrap();
        assert_eq!(in_path("tool", Some(&path_var)), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(in_path("tool", Some(&path_var)), Some(tool.clone()));
        assert_eq!(which(&tool), Some(tool));
        assert_eq!(which(Path::new("/nonexistent/tool")), None);
    }
}
