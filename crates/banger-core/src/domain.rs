//! banger's domain values as enums: which VMM runs a VM, how its system disk is made, how it
//! is networked, how it is accelerated, and the configuration choices that lead to them. Each
//! has one wire spelling (the proto strings, the config file, the state database); parsing
//! one is an error naming the value and the accepted spellings, never a silent default.

use std::fmt;
use std::str::FromStr;

/// A spelling that names no value of a domain enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not one of {expected}")]
pub struct ParseError {
    /// What was being parsed (`vmm`, `system disk strategy`, …).
    pub what: &'static str,
    pub value: String,
    /// The accepted spellings, comma-separated.
    pub expected: &'static str,
}

/// Defines a closed enum with one wire spelling per variant: `as_str`, `ALL`, `Display`,
/// `FromStr` (a [`ParseError`] naming the accepted spellings) and serde as that spelling.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in the order the spellings are listed in errors.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $wire ),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseError;

            fn from_str(text: &str) -> Result<Self, ParseError> {
                match text {
                    $( $wire => Ok(Self::$variant), )+
                    _ => Err(ParseError {
                        what: $what,
                        value: text.to_owned(),
                        expected: concat!($($wire, ", "),+).trim_end_matches(", "),
                    }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

wire_enum! {
    /// The VMM a VM runs on, chosen at create and stored with it.
    VmmKind ("vmm") {
        Qemu = "qemu",
        Firecracker = "firecracker",
    }
}

wire_enum! {
    /// Which VMM a new VM should get (`--vmm`, `defaults.vmm`).
    VmmChoice ("vmm") {
        /// Firecracker when it can work here, else QEMU (see [`crate::vmm::select`]).
        Auto = "auto",
        Firecracker = "firecracker",
        Qemu = "qemu",
    }
}

wire_enum! {
    /// How a VM's system disk is made from the image's raw root filesystem.
    SystemDiskStrategy ("system disk strategy") {
        /// qcow2 overlay backed by the image (QEMU only).
        Qcow2 = "qcow2",
        /// Reflink clone (FICLONE; xfs, btrfs): instant, shares blocks until written.
        Reflink = "reflink",
        /// device-mapper snapshot over a read-only loop device of the image (via
        /// banger-helper).
        DmSnapshot = "dm",
        /// Full sparse copy: the last resort, time and space grow with the image.
        Copy = "copy",
    }
}

wire_enum! {
    /// The format of a disk file as its VMM opens it.
    DiskFormat ("disk format") {
        /// The bytes the guest sees, as they are (a sparse file).
        Raw = "raw",
        /// A qcow2 image, usually an overlay over a backing file.
        Qcow2 = "qcow2",
    }
}

impl SystemDiskStrategy {
    /// The format the VMM opens the disk with.
    pub fn format(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Reflink | Self::DmSnapshot | Self::Copy => "raw",
        }
    }
}

wire_enum! {
    /// How new VMs' system disks are made (`defaults.system_disk`).
    SystemDiskChoice ("system disk strategy") {
        /// qcow2 for QEMU; reflink, dm or copy for Firecracker, whichever works here.
        Auto = "auto",
        Qcow2 = "qcow2",
        Reflink = "reflink",
        DmSnapshot = "dm",
        Copy = "copy",
    }
}

impl SystemDiskChoice {
    /// The strategy asked for, `None` for `auto`.
    pub fn fixed(self) -> Option<SystemDiskStrategy> {
        match self {
            Self::Auto => None,
            Self::Qcow2 => Some(SystemDiskStrategy::Qcow2),
            Self::Reflink => Some(SystemDiskStrategy::Reflink),
            Self::DmSnapshot => Some(SystemDiskStrategy::DmSnapshot),
            Self::Copy => Some(SystemDiskStrategy::Copy),
        }
    }
}

wire_enum! {
    /// How VMs reach the network (`network.mode`, `--network`).
    NetMode ("network") {
        /// Bridge when the root helper answers, else user-mode.
        Auto = "auto",
        /// banger's bridge: a tap and a leased address per VM (needs the root helper).
        Bridge = "bridge",
        /// QEMU user-mode networking: SSH through a forwarded port on 127.0.0.1.
        User = "user",
    }
}

wire_enum! {
    /// The hardware acceleration a VM runs with.
    Accel ("acceleration") {
        Kvm = "kvm",
        Tcg = "tcg",
    }
}

wire_enum! {
    /// Which acceleration to use (`qemu.accel`).
    AccelMode ("acceleration") {
        /// KVM when a probe boot shows it works, else TCG.
        Auto = "auto",
        Kvm = "kvm",
        Tcg = "tcg",
    }
}

wire_enum! {
    /// Whether Firecracker may count on KVM (`firecracker.kvm`): Firecracker has no emulation,
    /// so without KVM it is never picked (`auto`) and refused when asked for.
    FirecrackerKvm ("Firecracker KVM setting") {
        /// The evidence check of `qemu.accel = "auto"` (fast checks, then a probe boot).
        Auto = "auto",
        /// KVM taken as working, unchecked (Firecracker's own error shows if it is not).
        Yes = "yes",
        /// Never: `vmm = auto` picks QEMU, `--vmm firecracker` is refused.
        No = "no",
    }
}

wire_enum! {
    /// How TCG maps vCPUs to host threads (`qemu.tcg_threads`).
    TcgThreads ("tcg threads") {
        /// A thread per vCPU where the QEMU version is known to be safe (8.1 and later), else
        /// one.
        Auto = "auto",
        /// All vCPUs of a VM on one host thread.
        Single = "single",
        /// A host thread per vCPU: faster, but QEMU before 8.1 can hang a guest that patches
        /// its own code (docs/ARCHITECTURE.md, "TCG and guest code patching").
        Multi = "multi",
    }
}

wire_enum! {
    /// How QEMU declares a VM's virtio-mmio devices to its kernel (`qemu.devices`).
    QemuDevices ("device discovery") {
        /// Through ACPI where the kernel reads it (Debian's cloud kernel, banger's microVM
        /// kernel), else on the kernel command line.
        Auto = "auto",
        /// On the kernel command line with ACPI off, as Firecracker does, for every kernel
        /// that takes them there (banger's microVM kernel); a guest stops by rebooting.
        Cmdline = "cmdline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for kind in VmmKind::ALL {
            assert_eq!(kind.as_str().parse::<VmmKind>(), Ok(*kind));
        }
        for strategy in SystemDiskStrategy::ALL {
            assert_eq!(
                strategy.as_str().parse::<SystemDiskStrategy>(),
                Ok(*strategy)
            );
            let choice: SystemDiskChoice = strategy.as_str().parse().unwrap();
            assert_eq!(choice.fixed(), Some(*strategy));
        }
        assert_eq!(SystemDiskChoice::Auto.fixed(), None);
        assert_eq!(
            serde_json::to_string(&VmmKind::Firecracker).unwrap(),
            "\"firecracker\""
        );
    }

    #[test]
    fn unknown_spellings_are_errors_naming_the_choices() {
        let e = "xen".parse::<VmmKind>().unwrap_err();
        assert_eq!(e.to_string(), "vmm \"xen\" is not one of qemu, firecracker");
        let e = "zfs".parse::<SystemDiskStrategy>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "system disk strategy \"zfs\" is not one of qcow2, reflink, dm, copy"
        );
        let e = serde_json::from_str::<Accel>("\"hvf\"").unwrap_err();
        assert!(e.to_string().contains("kvm, tcg"), "{e}");
    }
}
