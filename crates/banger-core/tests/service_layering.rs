//! The service layer reads as the same steps for every backend: nothing under
//! `src/service/` may name a backend variant or compare backend names. What differs between
//! QEMU and Firecracker belongs to the backend (`vmm::VmBackend`, its `Capabilities`).

use std::path::Path;

/// What would mean "which VMM is this?" in service code.
const FORBIDDEN: &[&str] = &[
    "VmmKind::Qemu",
    "VmmKind::Firecracker",
    "Vmm::Qemu",
    "Vmm::Firecracker",
    "vmm::qemu::",
    "vmm::firecracker::",
    "== \"qemu\"",
    "== \"firecracker\"",
    "self.firecracker",
    "self.qemu",
];

#[test]
fn the_service_never_matches_on_a_backend() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/service");
    let mut found = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests at a file's end build records of either backend; only the code above
        // them is the service.
        for (number, line) in text
            .lines()
            .enumerate()
            .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        {
            let code = line.split("//").next().unwrap_or("");
            for pattern in FORBIDDEN {
                if code.contains(pattern) {
                    found.push(format!(
                        "{}:{}: {pattern}: {}",
                        path.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(files > 5, "no service files found in {}", dir.display());
    assert!(
        found.is_empty(),
        "service code asks which VMM a VM runs on; move the difference into the backend \
         (vmm::VmBackend):\n{}",
        found.join("\n")
    );
}
