//! Bridge networking in the [`Manager`]: choosing a VM's network mode, bringing the network up
//! through the helper (bridge, taps, nftables, the DNS socket), `network status|down`, and
//! keeping the generated ssh config current.

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_proto::helper::{HelperInfo, HelperOp};
use banger_proto::{LeaseInfo, NetworkStatus, SshConfigResult, VmState};
use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::domain::NetMode;
use crate::host::{HostError, HostOps};
use crate::net::{self, dns, sshconfig};
use crate::store::LeasePool;

/// The network a VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Bridge,
    User,
}

impl Manager {
    /// Runs one network operation of the helper on a blocking thread, with the current
    /// op_id; refused when bridge networking is off.
    pub(super) async fn net_op<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn HostOps, &str) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, Error> {
        let Some(host) = self.network_helper().cloned() else {
            return Err(Error::HostSetup {
                message: "bridge networking is off (network.mode = \"user\")".into(),
                hint: "set network.mode to \"auto\" or \"bridge\" in the config file".into(),
            });
        };
        let op_id = net::current_op_id();
        tokio::task::spawn_blocking(move || op(host.as_ref(), &op_id))
            .await
            .map_err(|e| Error::Failed(format!("helper call panicked: {e}")))?
            .map_err(Error::Host)
    }

    /// Runs one network operation whose reply carries nothing but success.
    pub(super) async fn host_run(&self, op: HelperOp) -> Result<(), Error> {
        self.net_op(move |host, op_id| host.run(op_id, op)).await
    }

    /// The helper's settings, asking it when not known yet.
    pub(super) async fn helper_info(&self) -> Result<HelperInfo, Error> {
        if let Some(info) = self
            .net_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(info);
        }
        let info = self.net_op(|host, op_id| host.hello(op_id)).await?;
        *self.net_info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.clone());
        Ok(info)
    }

    /// The lease pool for a new VM, from the requested or configured mode: `None` for user mode.
    pub(super) async fn choose_network(
        &self,
        requested: Option<&str>,
    ) -> Result<Option<LeasePool>, Error> {
        let mode = match requested {
            Some(text) => text
                .parse::<NetMode>()
                .map_err(|e| Error::InvalidRequest(e.to_string()))?,
            None => self.config.network.mode,
        };
        let want = match mode {
            NetMode::User => return Ok(None),
            NetMode::Bridge => Mode::Bridge,
            NetMode::Auto if self.network_helper().is_none() => return Ok(None),
            NetMode::Auto => Mode::User,
        };
        let info = match self.helper_info().await {
            Ok(info) => info,
            Err(e) if want == Mode::User => {
                tracing::debug!("root helper not available, using user networking: {e}");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        Ok(Some(pool_of(&info)?))
    }

    /// Bridge, taps, nftables and the DNS server: idempotent, serialised.
    pub(super) async fn ensure_network(&self) -> Result<HelperInfo, Error> {
        let _guard = self.net_lock.lock().await;
        let info = self.helper_info().await?;
        self.host_run(HelperOp::NetworkUp {
            pool_size: self.config.network.pool_size,
        })
        .await?;
        let running = self
            .dns_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished());
        if !running {
            let fd = self.net_op(|host, op_id| host.bind_dns(op_id)).await?;
            let std_socket = std::net::UdpSocket::from(fd);
            std_socket
                .set_nonblocking(true)
                .map_err(Error::io("cannot use the DNS socket"))?;
            let address = std_socket
                .local_addr()
                .map_err(Error::io("cannot use the DNS socket"))?;
            let socket = tokio::net::UdpSocket::from_std(std_socket)
                .map_err(Error::io("cannot use the DNS socket"))?;
            // The serve loop asks on a blocking thread (see `dns::serve`).
            let db = self.db.clone();
            let lookup: dns::Lookup = Arc::new(move |name: &str| {
                db.blocking(|s| s.lease_by_name(name))
                    .ok()
                    .flatten()
                    .map(|l| l.ip)
            });
            let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            let upstreams = dns::upstreams(&resolv, info.gateway);
            let clients = pool_of(&info)?.subnet;
            info!(%address, upstreams = ?upstreams, %clients, "DNS server for NAME.vm listening");
            let task = tokio::spawn(dns::serve(socket, lookup, upstreams, clients));
            *self.dns_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
            *self.dns_addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(address.to_string());
            match self.net_op(|host, op_id| host.route_dns(op_id)).await {
                Ok(true) => info!("systemd-resolved routes ~vm to the bridge"),
                Ok(false) => info!("no systemd-resolved here: .vm names resolve from VMs only"),
                Err(e) => warn!("cannot route ~vm through systemd-resolved: {e}"),
            }
        }
        Ok(info)
    }

    /// At daemon start: bring the network (and DNS) up when VMs use it or the mode asks for
    /// it. Failures are logged: user-mode VMs work without it.
    pub async fn start_network(&self) {
        if self.network_helper().is_none() {
            return;
        }
        let has_leases = self
            .db
            .run(|s| s.list_leases())
            .await
            .is_ok_and(|l| !l.is_empty());
        if !has_leases
            && self.config.network.mode != NetMode::Bridge
            && self.helper_info().await.is_err()
        {
            return;
        }
        if let Err(e) = self.ensure_network().await {
            warn!("bridge network not available: {}", e.to_api().message);
        }
    }

    /// `banger network status`.
    pub async fn network_status(&self) -> Result<NetworkStatus, Error> {
        let leases = self
            .db
            .run(|s| s.list_leases())
            .await?
            .into_iter()
            .map(|l| LeaseInfo {
                vm: l.vm_name,
                ip: l.ip.to_string(),
                tap: l.tap,
            })
            .collect();
        let mut status = NetworkStatus {
            mode: self.config.network.mode.as_str().into(),
            helper_socket: self.helper_socket.display().to_string(),
            helper: false,
            helper_error: None,
            subnet: None,
            gateway: None,
            bridge: None,
            table: None,
            bridge_up: false,
            nft_table: false,
            taps: Vec::new(),
            dns: self
                .dns_task
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|t| !t.is_finished())
                .and_then(|_| {
                    self.dns_addr
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                }),
            leases,
        };
        match self.net_op(|host, op_id| host.network_status(op_id)).await {
            Ok(state) => {
                status.helper = true;
                status.bridge_up = state.bridge_up;
                status.nft_table = state.nft_table;
                status.taps = state.taps;
                if let Ok(info) = self.helper_info().await {
                    status.subnet = Some(info.subnet);
                    status.gateway = Some(info.gateway.to_string());
                    status.table = Some(banger_proto::helper::nft_table(info.owner));
                    status.bridge = Some(info.bridge);
                }
            }
            Err(e) => status.helper_error = Some(e.to_api().message),
        }
        Ok(status)
    }

    /// `banger network down`: the owner's taps, bridge, nftables table and DNS server.
    /// Refused while a bridge VM runs.
    pub async fn network_down(&self) -> Result<NetworkStatus, Error> {
        let _guard = self.net_lock.lock().await;
        let (leases, vms) = self
            .db
            .run(|s| Ok::<_, crate::store::StoreError>((s.list_leases()?, s.list_vms()?)))
            .await?;
        let running: Vec<String> = {
            let leased: std::collections::HashSet<String> =
                leases.into_iter().map(|l| l.vm_id).collect();
            vms.into_iter()
                .filter(|v| leased.contains(&v.id))
                .filter(|v| {
                    !matches!(
                        v.state,
                        VmState::Created | VmState::Stopped | VmState::Suspended | VmState::Error
                    )
                })
                .map(|v| v.name.to_string())
                .collect()
        };
        if !running.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "bridge VMs are running: {}; stop them first",
                running.join(", ")
            )));
        }
        if let Some(task) = self
            .dns_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        *self.dns_addr.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.host_run(HelperOp::NetworkDown).await?;
        info!("bridge network removed");
        drop(_guard);
        self.network_status().await
    }

    /// Rewrites the generated ssh config; with `install`, adds the Include line too.
    pub async fn ssh_config(&self, install: bool) -> Result<SshConfigResult, Error> {
        let path = self.layout.ssh_config_file(&self.config.ssh.config_file);
        let hosts = self.write_ssh_config(&path).await?;
        let mut result = SshConfigResult {
            path: path.display().to_string(),
            hosts,
            user_config: None,
            include_added: false,
        };
        if install {
            let user = self.layout.ssh_user_config(&self.config.ssh.user_config);
            result.include_added = sshconfig::install_include(&user, &path)
                .map_err(Error::io(format!("cannot update {}", user.display())))?;
            result.user_config = Some(user.display().to_string());
        }
        Ok(result)
    }

    /// Keeps the generated ssh config current once the user has generated it.
    pub(super) async fn refresh_ssh_config(&self) {
        let path = self.layout.ssh_config_file(&self.config.ssh.config_file);
        if !path.exists() {
            return;
        }
        if let Err(e) = self.write_ssh_config(&path).await {
            warn!("cannot refresh {}: {}", path.display(), e.to_api().message);
        }
    }

    async fn write_ssh_config(&self, path: &std::path::Path) -> Result<Vec<String>, Error> {
        let (vms, leases) = self
            .db
            .run(|s| Ok::<_, crate::store::StoreError>((s.list_vms()?, s.list_leases()?)))
            .await?;
        let entries: Vec<sshconfig::HostEntry> = vms
            .iter()
            .filter_map(|vm| {
                let (host, port) = match leases.iter().find(|l| l.vm_id == vm.id) {
                    Some(lease) => (lease.ip.to_string(), 22),
                    None => {
                        let port = vm.runtime.as_ref().map(|r| r.ssh_port).filter(|p| *p > 0)?;
                        ("127.0.0.1".to_owned(), port)
                    }
                };
                Some(sshconfig::HostEntry {
                    name: vm.name.to_string(),
                    host,
                    port,
                    identity: self.layout.client_key(),
                    known_hosts: self.layout.vm_known_hosts(&vm.id),
                })
            })
            .collect();
        let control = self.layout.ssh_control_dir();
        std::fs::create_dir_all(&control)
            .map_err(Error::io(format!("cannot create {}", control.display())))?;
        super::set_mode(&control, 0o700)?;
        sshconfig::write(path, &sshconfig::render(&entries, &control))
            .map_err(Error::io(format!("cannot write {}", path.display())))?;
        Ok(entries.iter().map(|e| format!("{}.vm", e.name)).collect())
    }
}

/// The lease pool the helper's settings describe.
fn pool_of(info: &HelperInfo) -> Result<LeasePool, Error> {
    let subnet: Ipv4Net = info.subnet.parse().map_err(|_| {
        Error::Host(HostError::Protocol {
            op: "hello",
            message: format!("subnet {:?} is not valid", info.subnet),
        })
    })?;
    Ok(LeasePool {
        subnet,
        gateway: info.gateway,
        owner: info.owner,
    })
}

/// The guest's kernel command-line network settings for a lease.
pub(super) fn cmdline_for(ip: Ipv4Addr, info: &HelperInfo) -> String {
    format!(
        "banger.ip={ip}/{} banger.gw={gw} banger.dns={gw}",
        info.prefix_len,
        gw = info.gateway
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;
    use crate::host::RecordingHost;
    use crate::layout::Layout;

    #[tokio::test]
    async fn the_network_comes_up_through_the_helper_once_per_dns_server() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(
            dir.path().join("data"),
            dir.path().join("run"),
            dir.path().join("config.toml"),
        );
        let host = Arc::new(RecordingHost::new());
        let manager =
            Manager::with_host(layout, Config::default(), host.clone(), "/x".into()).unwrap();
        let info = manager.ensure_network().await.unwrap();
        assert_eq!(info.gateway, Ipv4Addr::new(172, 30, 0, 1));
        manager.ensure_network().await.unwrap();
        assert_eq!(
            host.calls(),
            [
                HelperOp::Hello,
                HelperOp::NetworkUp { pool_size: 4 },
                HelperOp::BindDns,
                HelperOp::RouteDns,
                HelperOp::NetworkUp { pool_size: 4 },
            ]
        );
        let pool = manager.choose_network(None).await.unwrap().unwrap();
        assert_eq!(pool.subnet.to_string(), "172.30.0.0/24");
        assert!(
            manager
                .choose_network(Some("user"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(manager.choose_network(Some("nat")).await.is_err());
        let status = manager.network_down().await.unwrap();
        assert!(status.dns.is_none());
        assert!(host.calls().contains(&HelperOp::NetworkDown));
    }

    #[tokio::test]
    async fn user_mode_never_calls_a_helper() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(
            dir.path().join("data"),
            dir.path().join("run"),
            dir.path().join("config.toml"),
        );
        let mut config = Config::default();
        config.network.mode = NetMode::User;
        let host = Arc::new(RecordingHost::new());
        let manager =
            Manager::with_host(layout, config.clone(), host.clone(), "/x".into()).unwrap();
        assert!(manager.choose_network(None).await.unwrap().is_none());
        assert!(manager.choose_network(Some("bridge")).await.is_err());
        manager.start_network().await;
        assert!(manager.network_status().await.is_ok());
        assert_eq!(host.calls(), [], "a network operation reached the helper");
    }
}
