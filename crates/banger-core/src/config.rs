//! The user's configuration file (TOML). Every key has a documented default (docs/config.md);
//! unknown keys are refused, naming the key, so a typo never passes silently.

use std::path::Path;

use banger_proto::{ByteSize, SizeError};
use serde::Deserialize;

use crate::domain::{
    AccelMode, FirecrackerKvm, NetMode, QemuDevices, SystemDiskChoice, TcgThreads, VmmChoice,
};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a wrong type.
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A size value that does not parse.
    #[error("config file {path}: {key}: {source}")]
    Size {
        path: String,
        key: &'static str,
        #[source]
        source: SizeError,
    },
    /// A value out of range.
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// Defaults for `vm create`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmDefaults {
    /// vCPUs (default 2).
    pub cpus: u32,
    /// Guest memory (default "1024M"; a bare number is MiB).
    pub memory: String,
    /// Work disk size (default "8G").
    pub disk: String,
    /// Virtual size of the system disk (default "8G"; never less than the image): the guest's
    /// root filesystem grows into it at boot, and the host stores only what the guest writes.
    pub system_disk_size: String,
    /// Image name (default "default").
    pub image: String,
    /// VMM backend: "auto" (Firecracker when usable, else QEMU), "firecracker" or "qemu".
    pub vmm: VmmChoice,
    /// System disk strategy: "auto" (qcow2 for QEMU; reflink, dm or copy for Firecracker),
    /// "qcow2", "reflink", "dm" or "copy".
    pub system_disk: SystemDiskChoice,
}

impl Default for VmDefaults {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory: "1024M".into(),
            disk: "8G".into(),
            system_disk_size: "8G".into(),
            image: "default".into(),
            vmm: VmmChoice::Auto,
            system_disk: SystemDiskChoice::Auto,
        }
    }
}

/// Firecracker backend settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirecrackerConfig {
    /// The firecracker binary (default "firecracker", looked up on PATH).
    pub binary: String,
    /// Firecracker's jailer (a path, or a name looked up on PATH): when set, Firecracker VMs
    /// start through it, run by the root helper. Default "" (no jailer; a cgroup leaf only).
    pub jailer: String,
    /// Whether KVM works for Firecracker: "auto" (checked by evidence, as `qemu.accel =
    /// "auto"`, whatever `qemu.accel` says), "yes" (assumed, unchecked) or "no".
    pub kvm: FirecrackerKvm,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            binary: "firecracker".into(),
            jailer: String::new(),
            kvm: FirecrackerKvm::Auto,
        }
    }
}

/// Daemon settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// `tracing` filter for the daemon's logs (default "info"); `RUST_LOG` overrides it.
    pub log_level: String,
    /// How long `vm start` waits for the guest's SSH server (default 300 s; TCG is slow).
    pub start_timeout_secs: u64,
    /// How long `vm stop` waits for the guest to power off before forcing (default 30 s).
    pub stop_timeout_secs: u64,
    /// Size at which a VM's serial console log is cut back (default 8 MiB); see
    /// `service::console_cap`.
    pub console_log_max_bytes: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            start_timeout_secs: 300,
            stop_timeout_secs: 30,
            console_log_max_bytes: crate::service::console_cap::CONSOLE_LOG_CAP,
        }
    }
}

/// QEMU backend settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The QEMU binary (default "qemu-system-x86_64", looked up on PATH).
    pub binary: String,
    /// "auto" (KVM when a probe shows it works, else TCG), "kvm" or "tcg" (default "auto").
    pub accel: AccelMode,
    /// TCG only: "auto" (the default: a thread per vCPU on QEMU 8.1 and later, else one),
    /// "single" (all vCPUs of a VM on one host thread) or "multi" (a thread per vCPU: faster,
    /// but QEMU before 8.1 can hang a guest that patches its own code; see
    /// docs/ARCHITECTURE.md, "TCG and guest code patching").
    pub tcg_threads: TcgThreads,
    /// After an unclean stop, check qcow2 disks with the host's e2fsck through a raw view
    /// (`qemu-storage-daemon`'s FUSE export) before the start (default true). Off, or where
    /// FUSE cannot be had, the guest checks its qcow2 `/` at boot instead.
    pub check_qcow2_on_host: bool,
    /// "auto" (ACPI where the kernel reads it, else the command line) or "cmdline" (devices
    /// on the kernel command line with ACPI off, Firecracker's boot path).
    pub devices: QemuDevices,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            accel: AccelMode::Auto,
            tcg_threads: TcgThreads::Auto,
            check_qcow2_on_host: true,
            devices: QemuDevices::Auto,
        }
    }
}

/// Image building.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Debian mirror URL for `image build` (default: the host's apt configuration).
    pub mirror: String,
}

/// VM networking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// "auto" (bridge when the root helper answers, else user), "bridge" or "user".
    pub mode: NetMode,
    /// The root helper's socket (default `/run/banger-helper/<uid>.sock`).
    pub helper_socket: String,
    /// Taps made ahead of time when the network comes up (default 4).
    pub pool_size: u32,
    /// Whether a user-mode VM created without `--net` gets outbound network (default true;
    /// false: such VMs are `isolated`).
    pub egress: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            mode: NetMode::Auto,
            helper_socket: String::new(),
            pool_size: 4,
            egress: true,
        }
    }
}

/// The generated OpenSSH configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfigConfig {
    /// The generated file (default `~/.ssh/config.d/banger`).
    pub config_file: String,
    /// The user's ssh config that `banger ssh-config --install` adds the Include to
    /// (default `~/.ssh/config`).
    pub user_config: String,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub defaults: VmDefaults,
    pub daemon: DaemonConfig,
    pub qemu: QemuConfig,
    pub firecracker: FirecrackerConfig,
    pub images: ImagesConfig,
    pub network: NetworkConfig,
    pub ssh: SshConfigConfig,
}

/// [`VmDefaults`] with sizes parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedDefaults {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_size_bytes: u64,
    pub system_disk_bytes: u64,
}

impl Config {
    /// Loads `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: shown,
                    source,
                });
            }
        };
        // The key's path goes with the message: an enum's error names only the value.
        let config: Self =
            serde_path_to_error::deserialize(toml::Deserializer::parse(&text).map_err(|e| {
                ConfigError::Parse {
                    path: shown.clone(),
                    message: e.message().to_owned(),
                }
            })?)
            .map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().to_owned();
                ConfigError::Parse {
                    path: shown.clone(),
                    message: if key == "." {
                        message
                    } else {
                        format!("{key}: {message}")
                    },
                }
            })?;
        config.resolved_defaults(&shown)?;
        Ok(config)
    }

    /// The defaults with their sizes parsed and ranges checked.
    pub fn resolved_defaults(&self, path: &str) -> Result<ResolvedDefaults, ConfigError> {
        let memory =
            ByteSize::parse_mib(&self.defaults.memory).map_err(|source| ConfigError::Size {
                path: path.into(),
                key: "defaults.memory",
                source,
            })?;
        let disk = ByteSize::parse(&self.defaults.disk).map_err(|source| ConfigError::Size {
            path: path.into(),
            key: "defaults.disk",
            source,
        })?;
        let system_disk = ByteSize::parse(&self.defaults.system_disk_size).map_err(|source| {
            ConfigError::Size {
                path: path.into(),
                key: "defaults.system_disk_size",
                source,
            }
        })?;
        if self.network.pool_size > 256 {
            return Err(ConfigError::Invalid {
                path: path.into(),
                key: "network.pool_size",
                message: "must be at most 256".into(),
            });
        }
        if self.defaults.cpus == 0 {
            return Err(ConfigError::Invalid {
                path: path.into(),
                key: "defaults.cpus",
                message: "must be at least 1".into(),
            });
        }
        Ok(ResolvedDefaults {
            cpus: self.defaults.cpus,
            memory_mib: memory.mib(),
            disk_size_bytes: disk.0,
            system_disk_bytes: system_disk.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn missing_file_means_defaults() {
        let c = Config::load(Path::new("/nonexistent/banger.toml")).unwrap();
        let d = c.resolved_defaults("x").unwrap();
        assert_eq!(
            (d.cpus, d.memory_mib, d.disk_size_bytes, d.system_disk_bytes),
            (2, 1024, 8 << 30, 8 << 30)
        );
    }

    #[test]
    fn values_override_defaults() {
        let c =
            load("[defaults]\ncpus = 4\nmemory = \"2G\"\nsystem_disk_size = \"20G\"\n").unwrap();
        let d = c.resolved_defaults("x").unwrap();
        assert_eq!(
            (d.cpus, d.memory_mib, d.system_disk_bytes),
            (4, 2048, 20 << 30)
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load("[defaults]\ncpu = 4\n").unwrap_err().to_string();
        assert!(err.contains("cpu"), "{err}");
        let err = load("[nosuch]\n").unwrap_err().to_string();
        assert!(err.contains("nosuch"), "{err}");
    }

    #[test]
    fn bad_sizes_name_the_key() {
        let err = load("[defaults]\ndisk = \"8\"\n").unwrap_err().to_string();
        assert!(err.contains("defaults.disk"), "{err}");
    }

    #[test]
    fn enum_values_are_parsed_naming_the_key_and_the_choices() {
        let c =
            load("[network]\nmode = \"user\"\n[defaults]\nsystem_disk = \"dm\"\nvmm = \"qemu\"\n")
                .unwrap();
        assert_eq!(c.network.mode, NetMode::User);
        assert_eq!(c.defaults.system_disk, SystemDiskChoice::DmSnapshot);
        assert_eq!(c.defaults.vmm, VmmChoice::Qemu);
        for (text, key, choices) in [
            (
                "[network]\nmode = \"nat\"\n",
                "network.mode",
                "auto, bridge, user",
            ),
            (
                "[defaults]\nsystem_disk = \"zfs\"\n",
                "defaults.system_disk",
                "auto, qcow2, reflink, dm, copy",
            ),
            (
                "[defaults]\nvmm = \"xen\"\n",
                "defaults.vmm",
                "auto, firecracker, qemu",
            ),
            ("[qemu]\naccel = \"hvf\"\n", "qemu.accel", "auto, kvm, tcg"),
            (
                "[firecracker]\nkvm = \"maybe\"\n",
                "firecracker.kvm",
                "auto, yes, no",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(choices), "{err}");
        }
    }

    #[test]
    fn tcg_threads_is_auto_unless_asked_for() {
        assert_eq!(Config::default().qemu.tcg_threads, TcgThreads::Auto);
        assert_eq!(
            load("[qemu]\ntcg_threads = \"multi\"\n")
                .unwrap()
                .qemu
                .tcg_threads,
            TcgThreads::Multi
        );
        let err = load("[qemu]\ntcg_threads = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("qemu.tcg_threads") && err.contains("auto, single, multi"),
            "{err}"
        );
    }
}
