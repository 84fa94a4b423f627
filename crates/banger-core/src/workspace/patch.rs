//! Checks a git patch from the guest (`vm workspace export --patch`) before it is written:
//! `git apply` must not be able to write under `.git` (any case) or outside the tree. Every
//! line outside a hunk must be a git diff header that the guest's `git diff --binary
//! --no-renames` writes (rename and copy headers are refused); every path it names
//! (`diff --git`, `---`/`+++`) must be relative, without `..`, empty components or `.git`;
//! modes (also the one on an `index` line) must be a plain file (0644/0755), a symlink or a
//! gitlink, and a file with hunks must state one (without, `git apply` keeps what the host
//! path is, maybe a symlink); when any mode of a file is a symlink, its new target (its
//! hunk's `+` line) must stay inside the tree.
//! A directory whose names in the patch put `HEAD` (any case) beside `objects`, `refs` or
//! `commondir` is refused: with what the host tree already holds it could become a bare
//! repository, whose config git obeys. One line holds at most [`MAX_LINE`] bytes.
//! Hunks are skipped by their line counts, binary hunks up to their blank line, exactly as
//! `git apply` reads them, so hunk content is never mistaken for a header (or a header for
//! content).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, Read};
use std::iter::Peekable;

use super::WorkspaceError;
use super::extract::{GitDirNames, link_stays_inside};

/// Bytes of one patch line at most (a whole patch may hold [`super`]'s cap, one line not).
pub const MAX_LINE: u64 = 16 << 20;

/// The lines of a patch without their `\n`, each read with at most [`MAX_LINE`] bytes held.
struct CappedLines<R> {
    reader: R,
}

impl<R: BufRead> Iterator for CappedLines<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = Vec::new();
        match (&mut self.reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => None,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                } else if line.len() as u64 > MAX_LINE {
                    return Some(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("a line longer than {MAX_LINE} bytes"),
                    )));
                }
                Some(Ok(line))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

type Lines<R> = Peekable<std::iter::Enumerate<CappedLines<R>>>;

/// The next line and its index, or `None` at the end.
fn next_line<R: BufRead>(lines: &mut Lines<R>) -> Result<Option<(usize, Vec<u8>)>, WorkspaceError> {
    match lines.next() {
        None => Ok(None),
        Some((n, Ok(line))) => Ok(Some((n, line))),
        Some((n, Err(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(WorkspaceError::UnsafePatch {
                line: n + 1,
                why: e.to_string(),
            })
        }
        Some((_, Err(e))) => Err(WorkspaceError::Io {
            context: "cannot read the guest's patch".into(),
            source: e,
        }),
    }
}

/// Whether the next line starts with `prefix`.
fn next_starts_with<R: BufRead>(lines: &mut Lines<R>, prefix: &[u8]) -> bool {
    lines
        .peek()
        .is_some_and(|(_, l)| l.as_ref().is_ok_and(|l| l.starts_with(prefix)))
}

/// Modes a patch may give a path.
const MODES: [&str; 4] = ["100644", "100755", "120000", "160000"];

/// Refuses `patch` unless every path and mode in it is safe to apply (see the module doc).
pub fn check(patch: impl BufRead) -> Result<(), WorkspaceError> {
    let mut lines = CappedLines { reader: patch }.enumerate().peekable();
    // The current file: whether any of its mode lines says symlink (git takes the `index`
    // line's mode, or a lone old mode, as the new mode too: any 120000 counts); whether it
    // has a mode at all (without one, git apply keeps what the host path is, maybe a
    // symlink, so its hunks are refused); the least depth of its names.
    let mut symlink = false;
    let mut mode_known = false;
    let mut target_depth = usize::MAX;
    let depth_of = |p: &str| p.split('/').count().saturating_sub(1);
    // Whether the current file may still give its `---`/`+++` names.
    let mut names_open = false;
    // The git-dir names (HEAD, objects, refs, commondir) the patch puts in each directory,
    // keyed by a hash of the directory's path: memory grows only with those names, and a
    // collision can only refuse more. At most MAX_GIT_NAME_DIRS directories are tracked.
    let mut dirs: HashMap<u64, GitDirNames> = HashMap::new();
    let mut note = |path: &str| -> Result<(), String> {
        let mut prefix = std::hash::DefaultHasher::new();
        for part in path.split('/') {
            if GitDirNames::is_git_name(part.as_bytes()) {
                if dirs.len() >= MAX_GIT_NAME_DIRS {
                    return Err(
                        "too many directories holding HEAD, objects, refs or commondir".into(),
                    );
                }
                let names = dirs.entry(prefix.finish()).or_default();
                names.add(part.as_bytes());
                if names.may_be_git_dir() {
                    return Err(format!(
                        "{path:?} puts HEAD beside objects, refs or commondir: the directory \
                         could become a git repository whose config git obeys"
                    ));
                }
            }
            part.hash(&mut prefix);
        }
        Ok(())
    };
    while let Some((n, line)) = next_line(&mut lines)? {
        let bad = |why: &str| WorkspaceError::UnsafePatch {
            line: n + 1,
            why: why.to_owned(),
        };
        let text = std::str::from_utf8(&line).map_err(|_| bad("a header that is not UTF-8"))?;
        if text.is_empty() {
            continue;
        }
        if let Some(rest) = text.strip_prefix("diff --git ") {
            symlink = false;
            mode_known = false;
            names_open = true;
            let path = check_diff_line(rest).map_err(|why| bad(&why))?;
            target_depth = depth_of(&path);
            note(&path).map_err(|why| bad(&why))?;
        } else if let Some(rest) = text.strip_prefix("--- ") {
            // A second `---` in one file would start a file patch without a git header
            // (and without a mode: git apply keeps the host path's type).
            if !std::mem::replace(&mut names_open, false) {
                return Err(bad("a file patch without its own diff --git header"));
            }
            if let Some(path) = check_side(rest, "a/").map_err(|why| bad(&why))? {
                target_depth = target_depth.min(depth_of(&path));
                note(&path).map_err(|why| bad(&why))?;
            }
        } else if let Some(rest) = text.strip_prefix("+++ ") {
            if let Some(path) = check_side(rest, "b/").map_err(|why| bad(&why))? {
                target_depth = target_depth.min(depth_of(&path));
                note(&path).map_err(|why| bad(&why))?;
            }
        } else if ["rename from ", "rename to ", "copy from ", "copy to "]
            .iter()
            .any(|p| text.starts_with(p))
        {
            // The guest's diff runs with --no-renames; a copy could carry a symlink whose
            // target is checked nowhere to a shallower place.
            return Err(bad("a rename or copy (banger's diff writes none)"));
        } else if let Some(rest) = text.strip_prefix("index ") {
            // `index OLD..NEW [MODE]`: the mode, when there, is the file's mode.
            if let Some((_, mode)) = rest.split_once(' ') {
                if !MODES.contains(&mode) {
                    return Err(bad("a mode other than 100644, 100755, 120000 or 160000"));
                }
                mode_known = true;
                symlink |= mode == "120000";
            }
        } else if let Some(mode) = [
            "old mode ",
            "new mode ",
            "new file mode ",
            "deleted file mode ",
        ]
        .iter()
        .find_map(|p| text.strip_prefix(p))
        {
            if !MODES.contains(&mode) {
                return Err(bad("a mode other than 100644, 100755, 120000 or 160000"));
            }
            mode_known = true;
            symlink |= mode == "120000";
        } else if text.starts_with("similarity index ")
            || text.starts_with("dissimilarity index ")
            || text.starts_with("Binary files ")
        {
        } else if text.starts_with("@@ ") {
            if !mode_known {
                return Err(bad("a hunk for a file whose mode the patch does not give"));
            }
            let target_depth = if target_depth == usize::MAX {
                0
            } else {
                target_depth
            };
            let (mut old, mut new) = hunk_counts(text).ok_or_else(|| bad("a bad hunk header"))?;
            while old > 0 || new > 0 {
                let Some((n, line)) = next_line(&mut lines)? else {
                    return Err(bad("a hunk cut short"));
                };
                match line.first() {
                    Some(b' ') => {
                        old = old.saturating_sub(1);
                        new = new.saturating_sub(1);
                    }
                    Some(b'-') => old = old.saturating_sub(1),
                    Some(b'+') => {
                        new = new.saturating_sub(1);
                        if symlink {
                            link_stays_inside(target_depth, &line[1..])
                                .map_err(|why| WorkspaceError::UnsafePatch { line: n + 1, why })?;
                        }
                    }
                    Some(b'\\') => {}
                    // git apply takes an empty line as an empty context line.
                    None => {
                        old = old.saturating_sub(1);
                        new = new.saturating_sub(1);
                    }
                    Some(_) => {
                        return Err(WorkspaceError::UnsafePatch {
                            line: n + 1,
                            why: "a hunk line without a prefix".into(),
                        });
                    }
                }
                // "\ No newline at end of file" may follow the last line.
                if old == 0 && new == 0 && next_starts_with(&mut lines, b"\\") {
                    lines.next();
                }
            }
        } else if text == "GIT binary patch" {
            if !mode_known {
                return Err(bad(
                    "a binary patch for a file whose mode the patch does not give",
                ));
            }
            if symlink {
                return Err(bad("a binary symlink"));
            }
            // Forward and (optional) reverse hunk: `literal|delta N`, data lines, blank line.
            for _ in 0..2 {
                if !next_starts_with(&mut lines, b"literal ")
                    && !next_starts_with(&mut lines, b"delta ")
                {
                    break;
                }
                lines.next();
                while let Some((_, l)) = next_line(&mut lines)? {
                    if l.is_empty() {
                        break;
                    }
                }
            }
        } else {
            return Err(bad("a line git diff does not write outside a hunk"));
        }
    }
    Ok(())
}

/// Directories with a git-dir name (HEAD, objects, refs, commondir) one patch may touch.
const MAX_GIT_NAME_DIRS: usize = 100_000;

/// `-a,b +c,d` of a hunk header: the old and new line counts (1 when omitted).
fn hunk_counts(text: &str) -> Option<(u64, u64)> {
    let mut words = text.split(' ');
    words.next();
    let count = |w: &str, sign: char| -> Option<u64> {
        let w = w.strip_prefix(sign)?;
        match w.split_once(',') {
            Some((_, n)) => n.parse().ok(),
            None => {
                w.parse::<u64>().ok()?;
                Some(1)
            }
        }
    };
    Some((count(words.next()?, '-')?, count(words.next()?, '+')?))
}

/// `---`/`+++` names: `/dev/null` or `PREFIX` + a safe path (quoted or not, maybe followed
/// by a tab and a timestamp). Returns the path.
fn check_side(rest: &str, prefix: &str) -> Result<Option<String>, String> {
    let rest = rest.split('\t').next().unwrap_or(rest);
    if rest == "/dev/null" {
        return Ok(None);
    }
    let name = unquote(rest)?;
    let path = name
        .strip_prefix(prefix)
        .ok_or_else(|| format!("a name without the {prefix} prefix"))?;
    check_path(path)?;
    Ok(Some(path.to_owned()))
}

/// The one path of a `diff --git` line: both names must be the same (the guest's diff
/// writes no renames or copies), which also makes an unquoted line with spaces unambiguous
/// (`a/X b/X`, split in the middle, as git apply does).
fn check_diff_line(rest: &str) -> Result<String, String> {
    const DIFFERENT: &str = "a diff line whose two names differ (a rename or copy)";
    if rest.starts_with('"') || rest.ends_with('"') {
        let (first, second) = split_quoted(rest)?;
        let old = first
            .strip_prefix("a/")
            .ok_or("a name without the a/ prefix")?;
        let new = second
            .strip_prefix("b/")
            .ok_or("a name without the b/ prefix")?;
        if old != new {
            return Err(DIFFERENT.into());
        }
        check_path(new)?;
        return Ok(new.to_owned());
    }
    let body = rest
        .strip_prefix("a/")
        .ok_or("a name without the a/ prefix")?;
    let half = body.len().saturating_sub(3) / 2;
    let (old, new) = match (body.get(..half), body.get(half..)) {
        (Some(old), Some(rest)) if body.len() == 2 * half + 3 => {
            (old, rest.strip_prefix(" b/").ok_or(DIFFERENT)?)
        }
        _ => return Err(DIFFERENT.into()),
    };
    if old != new {
        return Err(DIFFERENT.into());
    }
    check_path(new)?;
    Ok(new.to_owned())
}

/// Splits `"a/x" "b/y"` (either side may be unquoted) into the two unquoted names.
fn split_quoted(rest: &str) -> Result<(String, String), String> {
    let end_of_first = if rest.starts_with('"') {
        quoted_len(rest)?
    } else {
        rest.find(" \"").ok_or("a bad diff line")?
    };
    let (first, second) = rest.split_at(end_of_first);
    let second = second.strip_prefix(' ').ok_or("a bad diff line")?;
    Ok((unquote(first)?, unquote(second)?))
}

/// Bytes of the C-quoted string at the start of `s`, quotes included.
fn quoted_len(s: &str) -> Result<usize, String> {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("an unterminated quoted name".into())
}

/// A git name, C-unquoted when it is quoted.
fn unquote(name: &str) -> Result<String, String> {
    let Some(inner) = name.strip_prefix('"') else {
        return Ok(name.to_owned());
    };
    if quoted_len(name)? != name.len() {
        return Err("text after a quoted name".into());
    }
    let inner = &inner[..inner.len() - 1];
    let mut out = Vec::new();
    let mut bytes = inner.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let c = bytes.next().ok_or("a bad escape")?;
        out.push(match c {
            b'a' => 7,
            b'b' => 8,
            b't' => b'\t',
            b'n' => b'\n',
            b'v' => 11,
            b'f' => 12,
            b'r' => b'\r',
            b'"' | b'\\' => c,
            b'0'..=b'3' => {
                let d2 = bytes.next().ok_or("a bad escape")?;
                let d3 = bytes.next().ok_or("a bad escape")?;
                if !(b'0'..=b'7').contains(&d2) || !(b'0'..=b'7').contains(&d3) {
                    return Err("a bad escape".into());
                }
                (c - b'0') * 64 + (d2 - b'0') * 8 + (d3 - b'0')
            }
            _ => return Err("a bad escape".into()),
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A path `git apply` writes: relative, no empty, `.` or `..` component, nothing named `.git`.
fn check_path(path: &str) -> Result<(), String> {
    if path.len() > super::extract::PATH_MAX {
        return Err("a path longer than 4096 bytes".into());
    }
    if path.is_empty() || path.starts_with('/') {
        return Err(format!("unsafe path {path:?}"));
    }
    for part in path.split('/') {
        // A name with spaces is split too: an unquoted `diff --git` line cannot tell.
        for word in std::iter::once(part).chain(part.split(' ')) {
            if word.eq_ignore_ascii_case(".git") {
                return Err(format!("a path under .git ({path:?})"));
            }
        }
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!("unsafe path {path:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn refused(patch: &str) -> bool {
        matches!(
            check(patch.as_bytes()),
            Err(WorkspaceError::UnsafePatch { .. })
        )
    }

    const GOOD: &str = "diff --git a/src/main.rs b/src/main.rs
index 1111111..2222222 100644
--- a/src/main.rs
+++ b/src/main.rs
@@ -1,2 +1,3 @@
 fn main() {
+--- a/.git/config
 }
diff --git a/run.sh b/run.sh
old mode 100644
new mode 100755
diff --git a/new file.txt b/new file.txt
new file mode 100644
index 0000000..3333333
--- /dev/null
+++ b/new file.txt
@@ -0,0 +1 @@
+hello
\\ No newline at end of file
diff --git a/link b/link
new file mode 120000
index 0000000..4444444
--- /dev/null
+++ b/link
@@ -0,0 +1 @@
+src/main.rs
\\ No newline at end of file
diff --git a/img.bin b/img.bin
new file mode 100644
index 0000000..5555555
GIT binary patch
literal 3
Kcmb=e#Q*>S2mk>9

literal 0
HcmV?d00001

diff --git a/gone b/gone
deleted file mode 100644
index 6666666..0000000
--- a/gone
+++ /dev/null
@@ -1 +0,0 @@
-bye
";

    #[test]
    fn a_git_diff_is_accepted_and_hunk_content_is_not_a_header() {
        check(GOOD.as_bytes()).expect("accepted");
    }

    #[test]
    fn a_planted_bare_repository_is_refused() {
        let file = |path: &str| {
            format!(
                "diff --git a/{path} b/{path}\nnew file mode 100644\nindex 0000000..1111111\n\
                 --- /dev/null\n+++ b/{path}\n@@ -0,0 +1 @@\n+x\n"
            )
        };
        for paths in [
            &[
                "docs/HEAD",
                "docs/config",
                "docs/objects/info/x",
                "docs/refs/heads/main",
            ][..],
            &["Head", "OBJECTS/x"],
            &["a/b/HEAD", "a/b/commondir"],
            &["d/HEAD", "d/refs/x"],
        ] {
            let patch: String = paths.iter().map(|p| file(p)).collect();
            assert!(refused(&patch), "{paths:?} was accepted");
        }
        // A binary file (no ---/+++ lines) counts too.
        let patch = file("d/HEAD")
            + "diff --git a/d/objects/x b/d/objects/x\nnew file mode 100644\n\
               index 0000000..5555555\nGIT binary patch\nliteral 3\nKcmb=e#Q*>S2mk>9\n\n";
        assert!(refused(&patch));
        // HEAD alone, or objects and refs without HEAD, are plain files.
        let patch: String = ["HEAD", "src/objects/a", "src/refs/b"]
            .iter()
            .map(|p| file(p))
            .collect();
        check(patch.as_bytes()).expect("accepted");
    }

    /// What the guest's `git diff --binary --no-renames` writes for edits, a mode change, a
    /// symlink retargeted inside the tree, a new symlink, a binary file and a deletion.
    #[test]
    fn a_real_git_diff_is_accepted() {
        use crate::workspace::fileset::git;
        let repo = tempfile::tempdir().expect("tempdir");
        let root = repo.path();
        let write = |p: &str, body: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, body).expect("write");
        };
        if git(root, &["init", "-q"]).is_err() {
            banger_shared::skip::report(
                "patch checker against git apply",
                "git is not usable here",
            );
            return;
        }
        write("src/main.rs", "fn main() {}\n");
        write("run.sh", "echo\n");
        write("gone", "bye\n");
        std::os::unix::fs::symlink("../src/main.rs", root.join("src/../link")).expect("ln");
        std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
        std::os::unix::fs::symlink("../../run.sh", root.join("d/e/deep")).expect("ln");
        let id = ["-c", "user.name=t", "-c", "user.email=t@t"];
        git(root, &["add", "-A"]).expect("add");
        git(root, &[&id[..], &["commit", "-qm", "base"]].concat()).expect("commit");
        write("src/main.rs", "fn main() {\n    println!();\n}\n");
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::remove_file(root.join("gone")).expect("rm");
        std::fs::remove_file(root.join("d/e/deep")).expect("rm");
        std::os::unix::fs::symlink("../../src/main.rs", root.join("d/e/deep")).expect("ln");
        std::os::unix::fs::symlink("e/deep", root.join("d/new")).expect("ln");
        std::fs::write(root.join("img.bin"), [0u8, 1, 2, 255]).expect("write");
        git(root, &["add", "-A"]).expect("add");
        let patch = git(
            root,
            &["diff", "--binary", "--no-renames", "--no-color", "--cached"],
        )
        .expect("diff");
        let text = String::from_utf8_lossy(&patch);
        assert!(text.contains(" 120000\n"), "{text}");
        check(patch.as_slice()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    #[test]
    fn hostile_headers_cost_linear_time_and_bounded_memory() {
        // A diff line that splits into a/X b/Y a million ways, and one deep path of git-dir
        // names: refused (or accepted) at once, not after quadratic work.
        let started = std::time::Instant::now();
        let line = format!("diff --git a/{}\n", " b/x".repeat(1 << 20));
        assert!(refused(&line));
        let deep = "HEAD/".repeat(800) + "f";
        let patch = format!("diff --git a/{deep} b/{deep}\nindex 1..2 100644\n");
        check(patch.as_bytes()).expect("one HEAD per directory is fine");
        let many: String = (0..20_000)
            .map(|i| format!("diff --git a/d{i}/HEAD b/d{i}/HEAD\nindex 1..2 100644\n"))
            .collect();
        check(many.as_bytes()).expect("accepted");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn a_line_over_the_cap_is_refused() {
        // A newline-free hunk line: refused once the cap is reached, not held whole.
        let mut patch =
            b"diff --git a/f b/f\nindex 1..2 100644\n--- a/f\n+++ b/f\n@@ -0,0 +1 @@\n+".to_vec();
        patch.resize(patch.len() + MAX_LINE as usize + 10, b'a');
        let result = check(patch.as_slice());
        assert!(
            matches!(result, Err(WorkspaceError::UnsafePatch { line: 6, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn git_dirs_escapes_and_modes_are_refused() {
        for bad in [
            "diff --git a/.git/config b/.git/config\n",
            "diff --git a/x/.GIT/hooks/pre-commit b/x/.GIT/hooks/pre-commit\n",
            "diff --git a/x b/x\n--- a/x\n+++ b/.git/config\n@@ -0,0 +1 @@\n+x\n",
            "diff --git a/x b/x\n--- a/../../etc/passwd\n",
            "+++ b//etc/passwd\n",
            "+++ b/a/./b\n",
            "rename from x\nrename to .git/hooks/post-checkout\n",
            "copy to ../outside\n",
            "rename to \".git/config\"\n",
            "rename to \"\\056git/config\"\n",
            // Retargeting an existing symlink: the mode is only on the index line.
            "diff --git a/l b/l\nindex 42061c0..ae47761 120000\n--- a/l\n+++ b/l\n\
             @@ -1 +1 @@\n-README.md\n+../../../home/u/.ssh/authorized_keys\n",
            // ... or given nowhere (git apply would keep the host path a symlink).
            "diff --git a/l b/l\n--- a/l\n+++ b/l\n@@ -1 +1 @@\n-README.md\n+../../x\n",
            // A lone old mode is the new mode too; a later index mode does not undo it.
            "diff --git a/l b/l\nold mode 120000\n--- a/l\n+++ b/l\n@@ -1 +1 @@\n-a\n+/etc\n",
            "diff --git a/l b/l\nnew mode 120000\nindex 1..2 100644\n--- a/l\n+++ b/l\n\
             @@ -1 +1 @@\n-a\n+/etc\n",
            // A copy of a deep symlink to the top (its target would point out).
            "diff --git a/d1/d2/link b/top\nsimilarity index 100%\ncopy from d1/d2/link\n\
             copy to top\n",
            "diff --git a/x b/y\nrename from x\nrename to y\n",
            "diff --git a/x b/x\nindex 1..2 100777\n",
            "diff --git a/x b/y\n",
            // A traditional (headerless) file patch after a git one inherits nothing.
            "diff --git a/f b/f\nindex 1..2 100644\n--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n+b\n\
             --- a/l\n+++ b/l\n@@ -1 +1 @@\n-x\n+../../etc\n",
            "diff --git \"a/x\" \"b/y\"\n",
            "new file mode 104755\n",
            "new mode 100777\n",
            "diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+../../etc\n",
            "diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+/etc/passwd\n",
            "diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+.git/hooks\n",
            "something unexpected\n",
            "@@ -1,2 +1,2 @@\n x\n",
            "diff --git a/x b/.git/config\n",
            "diff --git a/x y b/.git b/x y b/.git\n",
        ] {
            assert!(refused(bad), "{bad:?} was accepted");
        }
    }
}
