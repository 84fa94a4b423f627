//! Text rendering for humans: aligned tables and key/value blocks, and the escaping of
//! daemon- and guest-controlled text (console, guest paths, guest stderr in errors and
//! warnings, a VM's last error) so that it reaches the terminal shown, never as control
//! sequences. The generic printers ([`table`], [`pairs`], [`warning`]) escape every value
//! they print, so no call site has to; [`json`] escapes what JSON leaves raw (DEL, C1).

use std::borrow::Cow;

use banger_proto::{ByteSize, Vm};

/// `text` with every control character (C0 except newline and tab, DEL, C1) shown as an
/// escape (`\x1b`, `\u{9b}`) instead of sent; `\r\n` becomes `\n`. For multi-line guest
/// text such as the serial console.
pub fn escape_text(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// Like [`escape_text`] for one line: newlines and tabs are shown too.
pub fn escape_line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

fn escape(text: &str, multiline: bool) -> Cow<'_, str> {
    let keep = |c: char| multiline && (c == '\n' || c == '\t');
    if !text.chars().any(|c| c.is_control() && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if multiline && c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        if !c.is_control() || keep(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// `banger: warning: TEXT` with TEXT escaped (one line).
pub fn warning(text: &str) -> String {
    format!("banger: warning: {}", escape_line(text))
}

/// JSON text with DEL and the C1 controls (U+007F-U+009F) written as `\u` escapes too:
/// serde_json leaves them raw, and a terminal acts on C1 (U+009B is CSI). They can only
/// occur inside JSON strings, so the result is the same JSON.
pub fn json(text: String) -> String {
    if !text.chars().any(|c| ('\u{7f}'..='\u{9f}').contains(&c)) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Renders rows under a header with columns padded to their widest cell; every cell is
/// escaped ([`escape_line`]).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| escape_line(c).into_owned()).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `vm ls` as a table.
pub fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                vm.state.to_string(),
                vm.spec.cpus.to_string(),
                ByteSize(vm.spec.memory_mib << 20).to_string(),
                ByteSize(vm.spec.disk_size_bytes).to_string(),
                vm.spec.image.clone(),
                vm.created_at.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "STATE", "CPUS", "MEMORY", "DISK", "IMAGE", "CREATED",
        ],
        &rows,
    )
}

/// `vm show` as aligned `key: value` lines.
pub fn vm_details(vm: &Vm) -> String {
    let mut pairs = vec![
        ("name", vm.name.clone()),
        ("id", vm.id.clone()),
        ("state", vm.state.to_string()),
        ("cpus", vm.spec.cpus.to_string()),
        ("memory", ByteSize(vm.spec.memory_mib << 20).to_string()),
        ("disk", ByteSize(vm.spec.disk_size_bytes).to_string()),
        ("image", vm.spec.image.clone()),
        (
            "backend",
            format!("{}: {}", vm.spec.vmm, vm.spec.vmm_reason),
        ),
        ("system disk", vm.spec.system_disk.clone()),
        ("created", vm.created_at.clone()),
        ("updated", vm.updated_at.clone()),
    ];
    if let Some(network) = &vm.network {
        let text = match (&network.ip, &network.tap) {
            (Some(ip), Some(tap)) => format!("{} {ip} ({tap}), {}.vm", network.mode, vm.name),
            _ => network.mode.clone(),
        };
        pairs.push(("network", text));
    }
    if let Some(runtime) = &vm.runtime {
        pairs.push((
            "vmm",
            format!("{} ({}): {}", runtime.vmm, runtime.accel, runtime.reason),
        ));
        if let Some(pid) = runtime.pid {
            pairs.push(("pid", pid.to_string()));
        }
        if runtime.vmm == "firecracker" {
            let jail = match &runtime.jail {
                Some(root) => format!("jailer, chroot {root}"),
                None => "none (cgroup leaf only; set firecracker.jailer to use the jailer)".into(),
            };
            pairs.push(("jail", jail));
        }
        pairs.push(("ssh", format!("{}:{}", runtime.ssh_host, runtime.ssh_port)));
    }
    if let Some(error) = &vm.last_error {
        pairs.push(("last error", error.clone()));
    }
    self::pairs(&pairs)
}

/// Aligned `key: value` lines; every value is escaped ([`escape_line`]).
pub fn pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k:<width$}  {v}\n",
                k = format!("{k}:"),
                v = escape_line(v),
                width = width + 1
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let out = super::table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(out, "A    BB\nxxx  y\nz    w\n");
    }

    #[test]
    fn vm_show_says_whether_firecracker_runs_jailed() {
        let vm = |jail: serde_json::Value| -> banger_proto::Vm {
            serde_json::from_value(serde_json::json!({
                "id": "0123456789abcdef0123456789abcdef", "name": "a", "state": "running",
                "spec": { "cpus": 1, "memory_mib": 512, "disk_size_bytes": 1, "image": "d",
                          "vmm": "firecracker" },
                "created_at": "t", "updated_at": "t",
                "runtime": { "vmm": "firecracker", "accel": "kvm", "reason": "r", "pid": 7,
                             "ssh_host": "h", "ssh_port": 22, "jail": jail },
            }))
            .unwrap()
        };
        let shown = super::vm_details(&vm(serde_json::json!("/srv/banger-jail/1000/x/root")));
        assert!(
            shown.contains("jail:")
                && shown.contains("jailer, chroot /srv/banger-jail/1000/x/root"),
            "{shown}"
        );
        let shown = super::vm_details(&vm(serde_json::Value::Null));
        assert!(shown.contains("none (cgroup leaf only"), "{shown}");
    }

    #[test]
    fn generic_printers_escape_every_value() {
        let hostile = "sync: \x1b]0;pwned\x07\r\n\x7f\u{9b}31m";
        let shown = super::pairs(&[("last error", hostile.into())]);
        assert_eq!(
            shown,
            "last error:  sync: \\x1b]0;pwned\\x07\\x0d\\x0a\\x7f\\u{9b}31m\n"
        );
        let shown = super::table(&["A"], &[vec![hostile.into()]]);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        let shown = super::warning(hostile);
        assert!(shown.starts_with("banger: warning: sync: \\x1b"));
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        // JSON: serde_json escapes C0 but not DEL or C1; the printer does.
        let text = serde_json::to_string(&serde_json::json!({ "e": hostile })).unwrap();
        assert!(text.contains('\u{9b}'));
        let shown = super::json(text);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        let back: serde_json::Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(back["e"], hostile);
    }

    #[test]
    fn guest_text_reaches_the_terminal_escaped() {
        let title = "before\x1b]0;pwned\x07after\r\nnext\tcol\u{9b}31m";
        assert_eq!(
            super::escape_text(title),
            "before\\x1b]0;pwned\\x07after\nnext\tcol\\u{9b}31m"
        );
        assert_eq!(super::escape_line("a\nb\tc"), "a\\x0ab\\x09c");
        assert!(matches!(
            super::escape_line("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
