//! Text rendering for humans: aligned tables and key/value blocks. `--json` bypasses this.

use banger_proto::{ByteSize, Vm};

/// Renders rows under a header with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
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

/// Aligned `key: value` lines.
pub fn pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n", k = format!("{k}:"), width = width + 1))
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
}
