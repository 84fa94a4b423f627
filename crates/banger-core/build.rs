//! Embeds the guest recipe (everything under the repository's `guest/` directory) into the
//! library, so `banger image build` works from an installed binary and the recipe's digest
//! keys build caches.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf, u32)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{e}"));
        if meta.is_dir() {
            collect(&path, root, out);
        } else if meta.is_file() {
            let relative = path
                .strip_prefix(root)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_string_lossy()
                .into_owned();
            out.push((relative, path.clone(), meta.permissions().mode() & 0o777));
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let guest = manifest.join("../../guest");
    println!("cargo:rerun-if-changed={}", guest.display());
    let mut files = Vec::new();
    collect(&guest, &guest, &mut files);
    let mut code =
        String::from("/// Files of the guest recipe: (path under guest/, content, mode).\n");
    code.push_str("pub const GUEST_FILES: &[(&str, &[u8], u32)] = &[\n");
    for (relative, path, mode) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let _ = writeln!(
            code,
            "    ({relative:?}, include_bytes!({:?}), 0o{mode:o}),",
            path.canonicalize().unwrap_or_else(|e| panic!("{e}"))
        );
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("guest_files.rs");
    std::fs::write(out, code).unwrap_or_else(|e| panic!("cannot write guest_files.rs: {e}"));
}
