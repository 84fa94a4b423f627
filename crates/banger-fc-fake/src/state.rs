//! Firecracker's microVM state machine as the API sees it: pre-boot-only resources refused
//! after `InstanceStart` (or a snapshot load), post-boot-only operations refused before,
//! `InstanceStart` once and only with a kernel, `/snapshot/load` only on a fresh process,
//! `/snapshot/create` only while paused, the logger and metrics configured once, files that
//! Firecracker opens (kernel, initrd, drives, log and metrics paths) checked to exist.
//! Under the (fake) jailer every path in a request is resolved inside the jail's root, as
//! a chrooted Firecracker would: a host path sent to a jailed Firecracker is not found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// Magic first line of the fake's snapshot files.
const SNAPSHOT_MAGIC: &str = "banger-fc-fake snapshot v1";

/// What the guest does on Ctrl-Alt-Del (a real guest needs i8042 + atkbd to notice it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlAltDel {
    /// The guest reboots; with `reboot=k` Firecracker exits.
    Exit,
    /// The guest ignores it (no i8042 driver): only a kill ends the process.
    Ignore,
}

/// What the server should do after answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// The process exits (guest reset with `reboot=k`).
    Exit,
}

/// A reply: status and optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub after: After,
}

impl Reply {
    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            after: After::Nothing,
        }
    }
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
            after: After::Nothing,
        }
    }
}

/// Firecracker's "bad request" with its `fault_message`.
pub fn fault(message: impl Into<String>) -> Reply {
    Reply {
        status: 400,
        body: Some(json!({ "fault_message": message.into() })),
        after: After::Nothing,
    }
}

const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const PCI_DISABLED: &str = "PCI is not enabled";
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

/// The microVM.
#[derive(Debug)]
pub struct Machine {
    id: String,
    version: String,
    ctrl_alt_del: CtrlAltDel,
    started: bool,
    paused: bool,
    /// Anything but the logger and metrics was configured (snapshot load is then refused).
    configured: bool,
    logger: Option<Value>,
    metrics: Option<Value>,
    machine_config: Value,
    boot_source: Option<Value>,
    drives: BTreeMap<String, Value>,
    interfaces: BTreeMap<String, Value>,
    others: BTreeMap<String, Value>,
    /// The jail's root when run by the jailer (`--chroot`).
    root: Option<PathBuf>,
}

impl Machine {
    pub fn new(
        id: String,
        version: String,
        ctrl_alt_del: CtrlAltDel,
        root: Option<PathBuf>,
    ) -> Self {
        Self {
            root,
            id,
            version,
            ctrl_alt_del,
            started: false,
            paused: false,
            configured: false,
            logger: None,
            metrics: None,
            machine_config: json!({ "vcpu_count": 1, "mem_size_mib": 128, "smt": false }),
            boot_source: None,
            drives: BTreeMap::new(),
            interfaces: BTreeMap::new(),
            others: BTreeMap::new(),
        }
    }

    fn state_name(&self) -> &'static str {
        match (self.started, self.paused) {
            (false, _) => "Not started",
            (true, false) => "Running",
            (true, true) => "Paused",
        }
    }

    fn pre_boot(&mut self) -> Result<(), Reply> {
        if self.started {
            return Err(fault(AFTER_START));
        }
        self.configured = true;
        Ok(())
    }

    fn post_boot(&self) -> Result<(), Reply> {
        if self.started {
            Ok(())
        } else {
            Err(fault(BEFORE_START))
        }
    }

    /// Applies a validated request (`op` is the spec's operationId).
    pub fn apply(&mut self, op: &str, params: &[(String, String)], body: Value) -> Reply {
        match self.apply_inner(op, params, body) {
            Ok(reply) | Err(reply) => reply,
        }
    }

    fn apply_inner(
        &mut self,
        op: &str,
        params: &[(String, String)],
        body: Value,
    ) -> Result<Reply, Reply> {
        // The id in the path must be the id in the body (drive_id, iface_id, id).
        for (name, value) in params {
            if let Some(in_body) = body.get(name).and_then(Value::as_str)
                && in_body != value
            {
                return Err(fault(
                    "The id from the path does not match the id from the body!",
                ));
            }
        }
        let str_field = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
        match op {
            "describeInstance" => Ok(Reply::ok(json!({
                "app_name": "Firecracker",
                "id": self.id,
                "state": self.state_name(),
                "vmm_version": self.version,
            }))),
            "getFirecrackerVersion" => {
                Ok(Reply::ok(json!({ "firecracker_version": self.version })))
            }
            "getMachineConfiguration" => Ok(Reply::ok(self.machine_config.clone())),
            "getExportVmConfig" => Ok(Reply::ok(json!({
                "boot-source": self.boot_source,
                "machine-config": self.machine_config,
                "drives": self.drives.values().collect::<Vec<_>>(),
                "network-interfaces": self.interfaces.values().collect::<Vec<_>>(),
            }))),
            "putLogger" => {
                if self.started {
                    return Err(fault(AFTER_START));
                }
                // A second logger configuration replaces the first (204), as in Firecracker.
                if let Some(path) = str_field("log_path") {
                    self.must_exist(&path, "log_path")?;
                }
                self.logger = Some(body);
                Ok(Reply::no_content())
            }
            "putMetrics" => {
                if self.started {
                    return Err(fault(AFTER_START));
                }
                if self.metrics.is_some() {
                    return Err(fault("Reinitialization of metrics not allowed."));
                }
                self.must_exist(
                    &str_field("metrics_path").unwrap_or_default(),
                    "metrics_path",
                )?;
                self.metrics = Some(body);
                Ok(Reply::no_content())
            }
            "putMachineConfiguration" | "patchMachineConfiguration" => {
                self.pre_boot()?;
                let mut config = if op == "putMachineConfiguration" {
                    json!({ "smt": false })
                } else {
                    self.machine_config.clone()
                };
                if let (Some(target), Some(fields)) = (config.as_object_mut(), body.as_object()) {
                    for (k, v) in fields {
                        target.insert(k.clone(), v.clone());
                    }
                }
                let vcpus = config["vcpu_count"].as_u64().unwrap_or(0);
                if config["smt"] == true && vcpus > 1 && vcpus % 2 == 1 {
                    return Err(fault(
                        "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
                    ));
                }
                if config["mem_size_mib"].as_u64().unwrap_or(0) == 0 {
                    return Err(fault("The memory size (MiB) is invalid."));
                }
                self.machine_config = config;
                Ok(Reply::no_content())
            }
            "putGuestBootSource" => {
                self.pre_boot()?;
                self.boot_source = Some(body);
                Ok(Reply::no_content())
            }
            "putGuestDriveByID" => {
                // Hot-plugging a drive or NIC needs PCI, which banger's VMs do not enable.
                if self.started {
                    return Err(fault(PCI_DISABLED));
                }
                self.pre_boot()?;
                let id = str_field("drive_id").unwrap_or_default();
                match (str_field("path_on_host"), str_field("socket")) {
                    (Some(path), None) => self.must_exist(&path, "path_on_host")?,
                    (None, Some(_)) => {}
                    _ => {
                        return Err(fault(
                            "Unable to create the block device: exactly one of path_on_host and socket is needed",
                        ));
                    }
                }
                if body["is_root_device"] == true
                    && self
                        .drives
                        .iter()
                        .any(|(other, d)| *other != id && d["is_root_device"] == true)
                {
                    return Err(fault("A root block device already exists!"));
                }
                self.drives.insert(id, body);
                Ok(Reply::no_content())
            }
            "putGuestNetworkInterfaceByID" => {
                if self.started {
                    return Err(fault(PCI_DISABLED));
                }
                self.pre_boot()?;
                let tap = str_field("host_dev_name").unwrap_or_default();
                if tap.is_empty() || tap.len() > 15 || tap.contains('/') {
                    return Err(fault(format!(
                        "Could not create the network device: invalid tap name {tap:?}"
                    )));
                }
                if let Some(mac) = str_field("guest_mac")
                    && !valid_mac(&mac)
                {
                    return Err(fault(format!("Invalid MAC address: {mac}")));
                }
                let id = str_field("iface_id").unwrap_or_default();
                self.interfaces.insert(id, body);
                Ok(Reply::no_content())
            }
            "putGuestVsock"
            | "putEntropyDevice"
            | "putCpuConfiguration"
            | "putGuestPmemByID"
            | "putBalloon"
            | "putMmdsConfig"
            | "putSerialDevice"
            | "putMemoryHotplug" => {
                if let Some(path) = str_field("serial_out_path") {
                    let parent = self.host(&path).parent().map(Path::to_path_buf);
                    if !parent.is_some_and(|p| p.is_dir()) {
                        return Err(fault(format!(
                            "Cannot open serial_out_path {path}: No such file or directory (os error 2)"
                        )));
                    }
                }
                self.pre_boot()?;
                self.others.insert(op.to_owned(), body);
                Ok(Reply::no_content())
            }
            "putMmds" | "patchMmds" | "getMmds" => Ok(Reply::ok(json!({}))),
            "patchGuestDriveByID" => {
                self.post_boot()?;
                let id = str_field("drive_id").unwrap_or_default();
                if !self.drives.contains_key(&id) {
                    return Err(fault(format!(
                        "Unable to patch the block device: drive {id} not found"
                    )));
                }
                if let Some(path) = str_field("path_on_host") {
                    self.must_exist(&path, "path_on_host")?;
                }
                Ok(Reply::no_content())
            }
            "patchGuestNetworkInterfaceByID" => {
                self.post_boot()?;
                let id = str_field("iface_id").unwrap_or_default();
                if !self.interfaces.contains_key(&id) {
                    return Err(fault(format!(
                        "Unable to update the net device: {id} not found"
                    )));
                }
                Ok(Reply::no_content())
            }
            "patchGuestPmemByID"
            | "patchBalloon"
            | "patchBalloonStatsInterval"
            | "patchMemoryHotplug"
            | "startBalloonHinting"
            | "stopBalloonHinting" => {
                self.post_boot()?;
                Ok(Reply::no_content())
            }
            "describeBalloonConfig"
            | "describeBalloonStats"
            | "describeBalloonHinting"
            | "getMemoryHotplug" => Err(fault("The requested device is not configured.")),
            "createSyncAction" => self.action(&str_field("action_type").unwrap_or_default()),
            "patchVm" => {
                self.post_boot()?;
                self.paused = str_field("state").as_deref() == Some("Paused");
                Ok(Reply::no_content())
            }
            "createSnapshot" => {
                self.post_boot()?;
                if !self.paused {
                    return Err(fault(
                        "Cannot create a snapshot: the microVM must be paused.",
                    ));
                }
                let snapshot = str_field("snapshot_path").unwrap_or_default();
                let memory = str_field("mem_file_path").unwrap_or_default();
                let state = json!({
                    "machine-config": self.machine_config,
                    "boot-source": self.boot_source,
                    "drives": self.drives,
                    "network-interfaces": self.interfaces,
                });
                let write = |path: &str, content: String| {
                    std::fs::write(self.host(path), content)
                        .map_err(|e| fault(format!("Cannot create snapshot file {path}: {e}")))
                };
                write(&snapshot, format!("{SNAPSHOT_MAGIC}\n{state}\n"))?;
                let mib = self.machine_config["mem_size_mib"].as_u64().unwrap_or(0);
                write(&memory, format!("guest memory of {mib} MiB\n"))?;
                Ok(Reply::no_content())
            }
            "loadSnapshot" => {
                if self.started || self.configured {
                    return Err(fault(
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    ));
                }
                let has_file = body.get("mem_file_path").is_some();
                let has_backend = body.get("mem_backend").is_some();
                if has_file == has_backend {
                    return Err(fault(
                        "Exactly one of mem_file_path and mem_backend must be present.",
                    ));
                }
                let snapshot = str_field("snapshot_path").unwrap_or_default();
                let text = std::fs::read_to_string(self.host(&snapshot))
                    .map_err(|e| fault(format!("Cannot open snapshot file {snapshot}: {e}")))?;
                let Some(state) = text
                    .strip_prefix(SNAPSHOT_MAGIC)
                    .and_then(|rest| serde_json::from_str::<Value>(rest.trim()).ok())
                else {
                    return Err(fault(format!("{snapshot} is not a snapshot file")));
                };
                let memory = body
                    .pointer("/mem_backend/backend_path")
                    .or_else(|| body.get("mem_file_path"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if body
                    .pointer("/mem_backend/backend_type")
                    .and_then(Value::as_str)
                    != Some("Uffd")
                {
                    self.must_exist(memory, "mem_backend.backend_path")?;
                }
                self.machine_config = state["machine-config"].clone();
                self.boot_source = Some(state["boot-source"].clone());
                for (key, target) in [
                    ("drives", &mut self.drives),
                    ("network-interfaces", &mut self.interfaces),
                ] {
                    if let Some(map) = state[key].as_object() {
                        target.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                self.started = true;
                self.paused = body["resume_vm"] != true;
                Ok(Reply::no_content())
            }
            other => Err(fault(format!("The fake does not implement {other}."))),
        }
    }

    fn action(&mut self, action: &str) -> Result<Reply, Reply> {
        match action {
            "InstanceStart" => {
                if self.started {
                    return Err(fault(AFTER_START));
                }
                let boot = self
                    .boot_source
                    .as_ref()
                    .ok_or_else(|| fault("Cannot start microvm without kernel configuration."))?;
                let kernel = boot["kernel_image_path"].as_str().unwrap_or_default();
                std::fs::File::open(self.host(kernel))
                    .map_err(|e| fault(format!("Cannot open kernel image: {e}")))?;
                if let Some(initrd) = boot["initrd_path"].as_str() {
                    std::fs::File::open(self.host(initrd))
                        .map_err(|e| fault(format!("Cannot open initrd file: {e}")))?;
                }
                self.started = true;
                self.paused = false;
                println!("fake-firecracker: InstanceStart (no guest runs in the fake)");
                Ok(Reply::no_content())
            }
            "SendCtrlAltDel" => {
                self.post_boot()?;
                let mut reply = Reply::no_content();
                if self.ctrl_alt_del == CtrlAltDel::Exit && !self.paused {
                    reply.after = After::Exit;
                }
                Ok(reply)
            }
            "FlushMetrics" => {
                self.post_boot()?;
                if self.metrics.is_none() {
                    return Err(fault("Metrics system not initialized."));
                }
                Ok(Reply::no_content())
            }
            other => Err(fault(format!("unknown action {other}"))),
        }
    }
}

impl Machine {
    /// Where `path` from a request is on the host: itself, or inside the jail's root.
    pub fn host(&self, path: &str) -> PathBuf {
        host_path(self.root.as_deref(), path)
    }

    fn must_exist(&self, path: &str, what: &str) -> Result<(), Reply> {
        if self.host(path).exists() {
            Ok(())
        } else {
            Err(fault(format!(
                "Cannot open {what} {path}: No such file or directory (os error 2)"
            )))
        }
    }
}

/// `path` as a process chrooted to `root` sees it (relative paths from the jail's `/`).
pub fn host_path(root: Option<&Path>, path: &str) -> PathBuf {
    match root {
        None => PathBuf::from(path),
        Some(root) => root.join(path.trim_start_matches('/')),
    }
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}
