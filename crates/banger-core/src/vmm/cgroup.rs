//! A cgroup v2 leaf per VM, `<root>/banger/<vm id>`, with `cpu.max` (the VM's vCPUs) and
//! `memory.max` (guest memory plus VMM overhead), holding the VMM process. Best effort: used
//! when the unified hierarchy has the cpu and memory controllers and is writable (root, or a
//! delegated subtree); otherwise the reason is returned and the VM runs uncontained. The root
//! is a parameter so the file protocol is tested on a plain directory.

use std::path::{Path, PathBuf};

/// Where the unified hierarchy usually is (pure v2, then hybrid).
pub fn default_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").is_file())
}

/// Memory the VMM itself needs beyond guest RAM (page tables, device buffers, the binary).
const VMM_OVERHEAD_MIB: u64 = 128;
/// cgroup v2 CPU period in µs.
const PERIOD_US: u64 = 100_000;

/// The limits written for a VM.
pub fn limits(cpus: u32, memory_mib: u64) -> (String, String) {
    (
        format!("{} {PERIOD_US}", u64::from(cpus) * PERIOD_US),
        ((memory_mib + VMM_OVERHEAD_MIB) << 20).to_string(),
    )
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Creates the VM's leaf under `root`, sets its limits and moves `pid` into it; returns the
/// leaf. Errors say why containment is not possible here.
pub fn place(
    root: &Path,
    vm_id: &str,
    pid: u32,
    cpus: u32,
    memory_mib: u64,
) -> Result<PathBuf, String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("no cgroup v2 hierarchy at {}: {e}", root.display()))?;
    let available: Vec<&str> = controllers.split_whitespace().collect();
    for needed in ["cpu", "memory"] {
        if !available.contains(&needed) {
            return Err(format!(
                "the cgroup v2 hierarchy at {} has no {needed} controller (cgroup v1 holds it?)",
                root.display()
            ));
        }
    }
    let parent = root.join("banger");
    write(&root.join("cgroup.subtree_control"), "+cpu +memory")?;
    std::fs::create_dir_all(&parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    write(&parent.join("cgroup.subtree_control"), "+cpu +memory")?;
    let leaf = parent.join(vm_id);
    std::fs::create_dir_all(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    let (cpu_max, memory_max) = limits(cpus, memory_mib);
    let placed = write(&leaf.join("cpu.max"), &cpu_max)
        .and_then(|()| write(&leaf.join("memory.max"), &memory_max))
        .and_then(|()| write(&leaf.join("cgroup.procs"), &pid.to_string()));
    if let Err(e) = placed {
        let _ = std::fs::remove_dir(&leaf);
        return Err(e);
    }
    Ok(leaf)
}

/// Removes the VM's leaf once its processes are gone (the kernel refuses while it has any).
pub fn remove(root: &Path, vm_id: &str) {
    let _ = std::fs::remove_dir(root.join("banger").join(vm_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_gets_limits_and_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let leaf = place(root, "abc", 4242, 2, 1024).unwrap();
        assert_eq!(leaf, root.join("banger/abc"));
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory");
        assert_eq!(read("banger/cgroup.subtree_control"), "+cpu +memory");
        assert_eq!(read("banger/abc/cpu.max"), "200000 100000");
        assert_eq!(
            read("banger/abc/memory.max"),
            ((1024u64 + 128) << 20).to_string()
        );
        assert_eq!(read("banger/abc/cgroup.procs"), "4242");
    }

    #[test]
    fn missing_controllers_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "pids\n").unwrap();
        let why = place(dir.path(), "abc", 1, 1, 128).unwrap_err();
        assert!(why.contains("no cpu controller"), "{why}");
        let why = place(&dir.path().join("nowhere"), "abc", 1, 1, 128).unwrap_err();
        assert!(why.contains("no cgroup v2 hierarchy"), "{why}");
    }
}
