//! Text rendering for humans: aligned tables and key/value blocks, and the escaping of
//! daemon- and guest-controlled text (console, guest paths, guest stderr in errors and
//! warnings, a VM's last error) so that it reaches the terminal shown, never as control
//! sequences. The generic printers ([`table`], [`pairs`], [`warning`]) escape every value
//! they print, so no call site has to; [`json`] escapes what JSON leaves raw (DEL, C1).

use std::borrow::Cow;

use banger_proto::{ByteSize, FsckBy, FsckResult, SetVmResult, Vm};

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
                match &vm.snapshots {
                    Some(s) if s.count > 0 => format!("{} ({})", s.count, ByteSize(s.bytes)),
                    _ => "-".into(),
                },
                vm.spec.image.clone(),
                vm.created_at.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "CPUS",
            "MEMORY",
            "DISK",
            "SNAPSHOTS",
            "IMAGE",
            "CREATED",
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
        (
            "system disk",
            match vm.spec.system_disk_size_bytes {
                Some(bytes) => format!("{}, {}", vm.spec.system_disk, ByteSize(bytes)),
                None => vm.spec.system_disk.clone(),
            },
        ),
        ("created", vm.created_at.clone()),
        ("updated", vm.updated_at.clone()),
    ];
    if let Some(network) = &vm.network {
        let text = match (&network.ip, &network.tap) {
            (Some(ip), Some(tap)) => format!("{} {ip} ({tap}), {}.vm", network.mode, vm.name),
            _ => match network.mode.as_str() {
                "user" => "user (outbound network; the host's loopback is 10.0.2.2)".into(),
                "isolated" => "isolated (no outbound network)".into(),
                other => other.to_owned(),
            },
        };
        pairs.push(("network", text));
        if !network.ports.is_empty() {
            let ports: Vec<String> = network
                .ports
                .iter()
                .map(|p| {
                    format!(
                        "{}:{}->{}/{}",
                        p.host_ip,
                        p.host_port,
                        p.guest_port,
                        p.proto.as_str()
                    )
                })
                .collect();
            pairs.push(("ports", ports.join(", ")));
        }
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
            let jail = match (&runtime.jail, runtime.pid.is_some(), runtime.jailer) {
                (Some(root), _, _) => format!("jailer, chroot {root}"),
                (None, false, true) => {
                    "none while stopped; the jailer runs it at its next start (firecracker.jailer is set)".into()
                }
                (None, false, false) => {
                    "none while stopped; it starts unjailed (set firecracker.jailer to use the jailer)".into()
                }
                (None, true, true) => {
                    "none (started before firecracker.jailer was set; stop and start it to jail it)".into()
                }
                (None, true, false) => {
                    "none (cgroup leaf only; set firecracker.jailer to use the jailer)".into()
                }
            };
            pairs.push(("jail", jail));
        }
        pairs.push(("ssh", format!("{}:{}", runtime.ssh_host, runtime.ssh_port)));
        if let Some(why) = &runtime.io_error {
            pairs.push((
                "paused by QEMU",
                format!("{why}; free space, then `banger vm resume {}`", vm.name),
            ));
        }
    }
    if let Some(stop) = &vm.last_stop {
        pairs.push((
            "last stop",
            format!("{} ({}), {}", stop.kind.as_str(), stop.how, stop.at),
        ));
    }
    if let Some(check) = &vm.start_fsck {
        let text = if check.ran {
            let disks: Vec<String> = check
                .disks
                .iter()
                .map(|d| match (d.checked_by, d.result, d.exit_code) {
                    (FsckBy::Guest, FsckResult::Skipped, _) => {
                        format!("{} disk: not checked ({})", d.disk, d.detail)
                    }
                    (FsckBy::Guest, result, _) => format!(
                        "{} disk: checked by the guest at boot: {}",
                        d.disk,
                        result.as_str()
                    ),
                    (FsckBy::Host, _, Some(code)) => {
                        format!("{} {} (exit {code})", d.disk, d.result.as_str())
                    }
                    (FsckBy::Host, _, None) => {
                        format!("{} {} ({})", d.disk, d.result.as_str(), d.detail)
                    }
                })
                .collect();
            format!("ran: {}; {}", check.why, disks.join(", "))
        } else {
            format!("not run: {}", check.why)
        };
        pairs.push(("start fsck", text));
    }
    if let Some(s) = &vm.snapshots {
        pairs.push((
            "snapshots",
            format!(
                "{}, {} (`banger vm snapshot ls {}`)",
                s.count,
                ByteSize(s.bytes),
                vm.name
            ),
        ));
    }
    if let Some(source) = &vm.cloned_from {
        pairs.push(("cloned from", source.clone()));
    }
    if let Some(error) = &vm.last_error {
        pairs.push(("last error", error.clone()));
    }
    self::pairs(&pairs)
}

/// `vm snapshot ls` as a table.
pub fn snapshot_table(list: &banger_proto::SnapshotList) -> String {
    let rows: Vec<Vec<String>> = list
        .snapshots
        .iter()
        .map(|s| {
            vec![
                if s.current {
                    format!("{} *", s.name)
                } else {
                    s.name.clone()
                },
                ByteSize(s.bytes).to_string(),
                if s.memory { "yes" } else { "-" }.into(),
                s.parent.clone().unwrap_or_else(|| "-".into()),
                if s.clones.is_empty() {
                    "-".into()
                } else {
                    s.clones.join(",")
                },
                s.created_at.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "MEMORY", "PARENT", "CLONES", "CREATED"],
        &rows,
    )
}

/// What `vm set` changed, in one line.
pub fn set_summary(result: &SetVmResult) -> String {
    let spec = &result.vm.spec;
    let name = &result.vm.name;
    let values: Vec<String> = result
        .changed
        .iter()
        .map(|what| match what.as_str() {
            "cpus" => format!("{} vCPUs", spec.cpus),
            "memory" => format!("{} memory", ByteSize(spec.memory_mib << 20)),
            "disk" => format!("{} work disk", ByteSize(spec.disk_size_bytes)),
            "system_disk" => format!(
                "{} system disk",
                spec.system_disk_size_bytes
                    .map_or_else(|| "?".to_owned(), |b| ByteSize(b).to_string())
            ),
            other => other.to_owned(),
        })
        .collect();
    if values.is_empty() {
        return format!(
            "VM {name} already has that: nothing changed ({} vCPUs, {} memory, {} work disk)\n",
            spec.cpus,
            ByteSize(spec.memory_mib << 20),
            ByteSize(spec.disk_size_bytes)
        );
    }
    let mut notes = Vec::new();
    if result.online {
        notes.push("/root has the room now");
    }
    if result.changed.iter().any(|c| c == "cpus" || c == "memory") {
        notes.push("its next start uses the new CPUs and memory");
    }
    if result.changed.iter().any(|c| c == "system_disk") {
        notes.push("the guest grows / into the system disk at its next boot");
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join("; "))
    };
    escape_line(&format!("VM {name} now has {}{notes}", values.join(", "))).into_owned() + "\n"
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
    fn vm_ls_shows_each_vms_snapshots_count_and_size() {
        let vm = |name: &str, snapshots: serde_json::Value| -> banger_proto::Vm {
            serde_json::from_value(serde_json::json!({
                "id": "0123456789abcdef0123456789abcdef", "name": name, "state": "stopped",
                "spec": { "cpus": 1, "memory_mib": 512, "disk_size_bytes": 1, "image": "d",
                          "vmm": "qemu" },
                "created_at": "t", "updated_at": "t", "snapshots": snapshots,
            }))
            .unwrap()
        };
        let out = super::vm_table(&[
            vm("a", serde_json::json!({ "count": 2, "bytes": 3 << 20 })),
            vm("b", serde_json::Value::Null),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("SNAPSHOTS"), "{out}");
        let cell = |line: &str| {
            line.split("  ")
                .filter(|c| !c.is_empty())
                .nth(5)
                .map(str::trim)
                .map(str::to_owned)
        };
        assert_eq!(cell(lines[1]).as_deref(), Some("2 (3M)"), "{out}");
        assert_eq!(cell(lines[2]).as_deref(), Some("-"), "{out}");
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
        // Stopped (no pid): what its next start does, by whether the jailer is set.
        let stopped = |jailer: bool| {
            let mut vm = vm(serde_json::Value::Null);
            let runtime = vm.runtime.as_mut().unwrap();
            runtime.pid = None;
            runtime.jailer = jailer;
            super::vm_details(&vm)
        };
        let shown = stopped(true);
        assert!(
            shown.contains("none while stopped; the jailer runs it at its next start"),
            "{shown}"
        );
        let shown = stopped(false);
        assert!(
            shown.contains("none while stopped; it starts unjailed"),
            "{shown}"
        );
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

/// Bytes as a short human size (base 1024): `512B`, `1.5K`, `20M`, `3.1G`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// The `vm stats` table: figures that are absent print as `-`.
pub fn stats_table(stats: &[banger_proto::VmStats]) -> String {
    let dash = || "-".to_owned();
    let disk = |vm: &banger_proto::VmStats, which: &str| {
        vm.disks
            .iter()
            .find(|d| d.disk == which)
            .map(|d| {
                format!(
                    "{}/{}",
                    human_bytes(d.allocated_bytes),
                    human_bytes(d.virtual_bytes)
                )
            })
            .unwrap_or_else(dash)
    };
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                format!("{:?}", vm.state).to_lowercase(),
                vm.cpu_percent
                    .map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(dash),
                vm.rss_bytes.map(human_bytes).unwrap_or_else(dash),
                disk(vm, "system"),
                disk(vm, "work"),
                vm.network
                    .as_ref()
                    .map(|n| format!("{} / {}", human_bytes(n.rx_bytes), human_bytes(n.tx_bytes)))
                    .unwrap_or_else(dash),
                vm.guest
                    .as_ref()
                    .map(|g| {
                        format!(
                            "{}/{}",
                            human_bytes(
                                g.mem_total_bytes - g.mem_available_bytes.min(g.mem_total_bytes)
                            ),
                            human_bytes(g.mem_total_bytes)
                        )
                    })
                    .unwrap_or_else(dash),
                vm.uptime_secs
                    .map(|s| humantime_short(s as u64))
                    .unwrap_or_else(dash),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "CPU",
            "VMM MEM",
            "SYSTEM DISK",
            "WORK DISK",
            "NET RX / TX",
            "GUEST MEM",
            "UPTIME",
        ],
        &rows,
    )
}

/// Seconds as `45s`, `12m`, `3h4m`, `2d5h`.
fn humantime_short(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod stats_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_and_durations_are_short() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(100 << 20), "100M");
        assert_eq!(humantime_short(45), "45s");
        assert_eq!(humantime_short(3 * 3600 + 240), "3h4m");
    }

    #[test]
    fn absent_figures_print_as_dashes() {
        let vm = banger_proto::VmStats {
            name: "dev".into(),
            state: banger_proto::VmState::Stopped,
            uptime_secs: None,
            cpu_secs: None,
            cpu_percent: None,
            rss_bytes: None,
            disks: vec![banger_proto::DiskUsage {
                disk: "work".into(),
                virtual_bytes: 8 << 30,
                allocated_bytes: 30 << 20,
            }],
            network: None,
            guest: None,
        };
        let out = stats_table(&[vm]);
        let row = out.lines().nth(1).unwrap();
        assert!(row.contains("stopped") && row.contains("30M/8.0G"), "{row}");
        assert!(row.contains(" - "), "{row}");
    }
}
