//! Which backend a new VM gets, and why. `auto` picks Firecracker when its binary is present
//! and recent enough, tap networking is available and KVM really works; QEMU otherwise. An
//! explicit `firecracker` that cannot work is an error naming the missing piece (nothing is
//! created). Pure: the caller gathers the facts ([`Facts`]), so the decision is unit-tested.

pub use crate::domain::{VmmChoice, VmmKind};

/// The host facts the decision needs; each `Err` says why that piece is missing.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The firecracker binary answered `--version` with a supported version.
    pub firecracker: Result<String, String>,
    /// The image's kernel can boot under Firecracker (its devices on the command line).
    pub kernel: Result<(), String>,
    /// A tap device can be had for the VM (bridge networking).
    pub tap: Result<(), String>,
    /// KVM really runs guests (checked last: it may need a probe boot).
    pub kvm: Result<(), String>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kind: VmmKind,
    pub reason: String,
}

/// Why an explicit request cannot be met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SelectError {
    pub message: String,
    pub hint: String,
}

/// Decides for `requested`.
pub fn select(requested: VmmChoice, facts: &Facts) -> Result<Selection, SelectError> {
    let firecracker_blocker = || -> Option<(String, String)> {
        if let Err(why) = &facts.firecracker {
            return Some((
                why.clone(),
                "install Firecracker (a `firecracker` binary on PATH, or set firecracker.binary in the config file), or use --vmm qemu".into(),
            ));
        }
        if let Err(why) = &facts.kernel {
            return Some((
                format!("Firecracker cannot boot {why}"),
                "use --vmm qemu, or an image whose kernel comes from `banger kernel build`".into(),
            ));
        }
        if let Err(why) = &facts.tap {
            return Some((
                format!("Firecracker needs bridge networking (a tap device per VM) and {why}"),
                "set up banger's bridge networking (banger-helper), or use --vmm qemu (user-mode networking)".into(),
            ));
        }
        if let Err(why) = &facts.kvm {
            return Some((
                format!("Firecracker needs KVM and {why}"),
                "use --vmm qemu (it falls back to TCG)".into(),
            ));
        }
        None
    };
    match requested {
        VmmChoice::Qemu => Ok(Selection {
            kind: VmmKind::Qemu,
            reason: "qemu requested".into(),
        }),
        VmmChoice::Firecracker => match firecracker_blocker() {
            Some((message, hint)) => Err(SelectError { message, hint }),
            None => Ok(Selection {
                kind: VmmKind::Firecracker,
                reason: format!(
                    "firecracker requested ({})",
                    facts.firecracker.as_deref().unwrap_or("?")
                ),
            }),
        },
        VmmChoice::Auto => Ok(match firecracker_blocker() {
            Some((why, _)) => Selection {
                kind: VmmKind::Qemu,
                reason: format!("auto: qemu, because {why}"),
            },
            None => Selection {
                kind: VmmKind::Firecracker,
                reason: format!(
                    "auto: {} with KVM and tap networking",
                    facts.firecracker.as_deref().unwrap_or("firecracker")
                ),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fc: bool, tap: bool, kvm: bool) -> Facts {
        Facts {
            kernel: Ok(()),
            firecracker: if fc {
                Ok("firecracker 1.7.0".into())
            } else {
                Err("firecracker is not installed".into())
            },
            tap: if tap {
                Ok(())
            } else {
                Err("the networking helper is not set up".into())
            },
            kvm: if kvm {
                Ok(())
            } else {
                Err("/dev/kvm is not usable".into())
            },
        }
    }

    #[test]
    fn auto_prefers_firecracker_only_when_everything_is_there() {
        let s = select(VmmChoice::Auto, &facts(true, true, true)).unwrap();
        assert_eq!(s.kind, VmmKind::Firecracker);
        for (fc, tap, kvm, word) in [
            (false, true, true, "not installed"),
            (true, false, true, "bridge networking"),
            (true, true, false, "KVM"),
        ] {
            let s = select(VmmChoice::Auto, &facts(fc, tap, kvm)).unwrap();
            assert_eq!(s.kind, VmmKind::Qemu);
            assert!(s.reason.contains(word), "{}", s.reason);
        }
    }

    #[test]
    fn explicit_firecracker_names_the_missing_piece() {
        let e = select(VmmChoice::Firecracker, &facts(false, false, false)).unwrap_err();
        assert!(e.message.contains("not installed"), "{e:?}");
        assert!(e.hint.contains("firecracker.binary"), "{e:?}");
        let e = select(VmmChoice::Firecracker, &facts(true, false, true)).unwrap_err();
        assert!(e.message.contains("bridge networking"), "{e:?}");
        assert_eq!(
            select(VmmChoice::Qemu, &facts(true, true, true))
                .unwrap()
                .kind,
            VmmKind::Qemu
        );
    }

    #[test]
    fn a_kernel_firecracker_cannot_boot_is_never_picked() {
        let mut f = facts(true, true, true);
        f.kernel =
            Err("kernel default, which cannot find virtio-mmio devices on its command line".into());
        let s = select(VmmChoice::Auto, &f).unwrap();
        assert_eq!(s.kind, VmmKind::Qemu);
        assert!(s.reason.contains("kernel"), "{}", s.reason);
        let e = select(VmmChoice::Firecracker, &f).unwrap_err();
        assert!(e.message.contains("Firecracker cannot boot"), "{e:?}");
        assert!(e.hint.contains("--vmm qemu"), "{e:?}");
    }
}
