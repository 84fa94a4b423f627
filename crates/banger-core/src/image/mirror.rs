//! Finds the Debian mirror the host's own apt uses, so no mirror host name is ever written into
//! banger. Reads deb822 `.sources` files and one-line `sources.list` entries.

use std::path::Path;

/// The first plain Debian archive URI (not a security or updates suite) in the host's apt
/// configuration under `apt_dir` (normally `/etc/apt`).
pub fn host_debian_mirror(apt_dir: &Path) -> Option<String> {
    let mut files = Vec::new();
    let list = apt_dir.join("sources.list");
    if list.is_file() {
        files.push(list);
    }
    if let Ok(entries) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut more: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files.iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        if file.extension().is_some_and(|e| e == "sources") {
            from_deb822(&text)
        } else {
            from_one_line(&text)
        }
    })
}

fn is_archive(uri: &str, suite: &str) -> bool {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        && !suite.contains("security")
        && !suite.contains("updates")
        && !suite.contains("backports")
        && !uri.contains("security")
}

/// deb822 stanzas: `Types: deb`, `URIs: …`, `Suites: …`.
fn from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_owned())
            })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if field("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"))
            || !types.split_whitespace().any(|t| t == "deb")
        {
            continue;
        }
        let suite = suites.split_whitespace().next().unwrap_or("");
        if let Some(uri) = uris.split_whitespace().find(|u| is_archive(u, suite)) {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

/// `deb [options] URI suite components…`
fn from_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']')?.1.trim_start(),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        let suite = words.next()?;
        is_archive(uri, suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_deb822_and_skips_security() {
        let text = "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n\
                    Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            from_deb822(text).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn reads_one_line_entries_with_options() {
        let text = "# comment\ndeb-src http://x.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://x.example/debian bookworm main\n";
        assert_eq!(
            from_one_line(text).as_deref(),
            Some("http://x.example/debian")
        );
    }

    #[test]
    fn finds_nothing_in_an_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(host_debian_mirror(dir.path()), None);
    }
}
