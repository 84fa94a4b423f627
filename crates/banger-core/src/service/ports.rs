//! A VM's network choice (bridge, user or isolated) in the [`Manager`], and its published
//! ports: checked when asked for (a busy or already published host port is refused before
//! anything changes) and kept in the store. User-mode VMs: on QEMU's command line at every
//! start (`hostfwd`), added to or removed from a running VM through QMP
//! (`hostfwd_add`/`hostfwd_remove`) without a restart; QEMU owns the listening sockets, so
//! they outlive a daemon crash like the VM does. Bridge VMs: the daemon listens itself and
//! relays to the VM's lease address ([`crate::net::forward`]), from a start (bound before the
//! VMM launches) or a reattach after a daemon restart until the VM's process ends.

use std::net::Ipv4Addr;

use banger_proto::{PortChangeRequest, PortList, PortMapping, VmName, VmNetwork};
use tracing::{info, warn};

use super::Manager;
use crate::Error;
use crate::model::{VmRecord, has_process};
use crate::net::forward::Bound;
use crate::store::LeasePool;
use crate::vmm::PortForward;

/// How a new VM is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NetChoice {
    /// On the owner's bridge with a lease.
    Bridge(LeasePool),
    /// QEMU user mode; `isolated`: without outbound network.
    User { isolated: bool },
}

impl Manager {
    /// The network of a new VM from the request (`bridge`, `user`, `isolated`) or the config.
    pub(super) async fn choose_net(&self, requested: Option<&str>) -> Result<NetChoice, Error> {
        let default_isolated = !self.config.network.egress;
        match requested {
            Some("isolated") => Ok(NetChoice::User { isolated: true }),
            Some("user") => Ok(NetChoice::User { isolated: false }),
            other => Ok(match self.choose_network(other).await? {
                Some(pool) => NetChoice::Bridge(pool),
                None => NetChoice::User {
                    isolated: default_isolated,
                },
            }),
        }
    }

    /// Refuses `ports` for VM `vm` (`None`: a VM being created) unless each host side is
    /// free: not twice in the list, not published by another VM, and (with `bindable`)
    /// bindable now.
    pub(super) async fn check_ports(
        &self,
        vm: Option<&str>,
        ports: &[PortMapping],
        bindable: bool,
    ) -> Result<(), Error> {
        if ports.is_empty() {
            return Ok(());
        }
        if let Some(p) = ports.iter().find(|p| p.host_port == 0 || p.guest_port == 0) {
            return Err(Error::InvalidRequest(format!(
                "port 0 in {p} is not a port; use 1 to 65535"
            )));
        }
        let published = self.db.run(|s| s.all_ports()).await?;
        for (i, p) in ports.iter().enumerate() {
            if ports[..i].iter().any(|q| overlaps(p, q)) {
                return Err(Error::InvalidRequest(format!(
                    "host port {} is given twice",
                    describe(p)
                )));
            }
            if let Some((owner, _)) = published
                .iter()
                .find(|(name, q)| Some(name.as_str()) != vm && overlaps(p, q))
            {
                return Err(Error::InvalidRequest(format!(
                    "host port {} is already published by VM {owner}; pick another host port",
                    describe(p)
                )));
            }
            if bindable {
                probe(p)?;
            }
        }
        Ok(())
    }

    /// What a start needs of the VM's user-mode network: isolated or not, and its published
    /// ports, each checked free on the host. A bridge VM has neither: see
    /// [`Self::bind_forwards`].
    pub(super) async fn user_net_for_start(
        &self,
        record: &VmRecord,
        bridge: bool,
    ) -> Result<(bool, Vec<PortMapping>), Error> {
        if bridge {
            return Ok((false, Vec::new()));
        }
        let id = record.id.clone();
        let (isolated, ports) = self
            .db
            .run(move |s| {
                Ok::<_, crate::store::StoreError>((s.is_isolated(&id)?, s.ports_of(&id)?))
            })
            .await?;
        for p in &ports {
            probe(p)?;
        }
        Ok((isolated, ports))
    }

    /// The host sockets of a bridge VM's published ports, bound now (before its VMM launches,
    /// so a busy port refuses the start with the port named) and served from
    /// [`Self::open_forwards`] once the VM runs. Empty for a VM without a lease.
    pub(super) async fn bind_forwards(&self, record: &VmRecord) -> Result<Vec<Bound>, Error> {
        let ports = self.leased_ports(record).await?;
        ports.iter().map(bind).collect()
    }

    /// Serves `bound` for the bridge VM `record` (relayed to its lease address).
    pub(super) async fn open_forwards(
        &self,
        record: &VmRecord,
        bound: Vec<Bound>,
    ) -> Result<(), Error> {
        if bound.is_empty() {
            return Ok(());
        }
        let id = record.id.clone();
        let lease = self
            .db
            .run(move |s| s.lease_of(&id))
            .await?
            .ok_or_else(|| {
                Error::Failed(format!(
                    "VM {} has no lease to forward ports to",
                    record.name
                ))
            })?;
        self.forwards
            .open(&record.id, lease.ip, bound)
            .map_err(Error::io("cannot serve a published port"))?;
        info!(vm = %record.name, ports = ?self.forwards.served(&record.id), "published ports forwarded by the daemon");
        Ok(())
    }

    /// After a daemon restart: listens again on a running bridge VM's published ports. A
    /// port that cannot be bound now (taken meanwhile) is logged and left out.
    pub(super) async fn reopen_forwards(&self, record: &VmRecord) {
        let ports = match self.leased_ports(record).await {
            Ok(ports) => ports,
            Err(e) => {
                warn!(vm = %record.name, "cannot read the published ports: {}", e.to_api().message);
                return;
            }
        };
        if ports.is_empty() {
            return;
        }
        let bound: Vec<Bound> = ports
            .iter()
            .filter_map(|p| {
                bind(p)
                    .map_err(|e| warn!(vm = %record.name, "published port not served: {e}"))
                    .ok()
            })
            .collect();
        if let Err(e) = self.open_forwards(record, bound).await {
            warn!(vm = %record.name, "published ports not served: {e}");
        }
    }

    /// The published ports of a VM holding a lease; none without one.
    async fn leased_ports(&self, record: &VmRecord) -> Result<Vec<PortMapping>, Error> {
        let id = record.id.clone();
        self.db
            .run(move |s| {
                if s.lease_of(&id)?.is_none() {
                    return Ok(Vec::new());
                }
                s.ports_of(&id)
            })
            .await
    }

    /// `vm port NAME`.
    pub async fn list_ports(&self, name: &str) -> Result<PortList, Error> {
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name).await?;
        let id = record.id.clone();
        let ports = self.db.run(move |s| s.ports_of(&id)).await?;
        Ok(PortList {
            vm: name.to_string(),
            live: has_process(record.state),
            ports,
        })
    }

    /// `vm port add|rm NAME ...`: checked first (nothing changes on a refusal), applied to the
    /// running VM's QEMU, then recorded. A failure half way takes back what was applied.
    pub async fn change_ports(
        &self,
        name: &str,
        request: PortChangeRequest,
    ) -> Result<PortList, Error> {
        let vm = self.locked(name).await?;
        let name = vm.name.clone();
        let record = self.observed_vm(&name).await?;
        let id = record.id.clone();
        let (current, bridge) = self
            .db
            .run(move |s| {
                Ok::<_, crate::store::StoreError>((s.ports_of(&id)?, s.lease_of(&id)?.is_some()))
            })
            .await?;
        for p in &request.remove {
            if !current.iter().any(|q| same_host_side(p, q)) {
                return Err(Error::InvalidRequest(format!(
                    "VM {name} does not publish host port {}; `banger vm port {name}` lists them",
                    describe(p)
                )));
            }
        }
        let remove: Vec<PortMapping> = current
            .iter()
            .filter(|q| request.remove.iter().any(|p| same_host_side(p, q)))
            .copied()
            .collect();
        // A port replaced in the same request (rm then add) is checked without itself.
        let add: Vec<PortMapping> = request
            .add
            .iter()
            .filter(|p| !current.contains(p) || remove.contains(p))
            .copied()
            .collect();
        for p in &add {
            if let Some(q) = current
                .iter()
                .find(|q| overlaps(p, q) && !remove.contains(q))
            {
                return Err(Error::InvalidRequest(format!(
                    "VM {name} already publishes host port {} (to guest port {}); remove it first",
                    describe(q),
                    q.guest_port
                )));
            }
        }
        let live = has_process(record.state);
        // A running bridge VM's new ports are checked by binding them for real, below.
        self.check_ports(Some(name.as_str()), &add, !(live && bridge))
            .await?;
        if live && bridge {
            self.change_forwards(&record, &add, &remove).await?;
        } else if live {
            self.change_user_forwards(&record, &add, &remove).await?;
        }
        let (id, added, removed) = (record.id.clone(), add.clone(), remove.clone());
        self.db
            .run(move |s| s.change_ports(&id, &added, &removed))
            .await?;
        info!(vm = %name, live, added = ?add, removed = ?remove, "published ports changed");
        self.list_ports(name.as_str()).await
    }

    /// `vm port add|rm` on a running bridge VM: the listeners of `remove` closed first (so a
    /// port replaced in the same request can bind again), then `add` bound; when one cannot
    /// be bound, the removed ones are served again and nothing changes.
    async fn change_forwards(
        &self,
        record: &VmRecord,
        add: &[PortMapping],
        remove: &[PortMapping],
    ) -> Result<(), Error> {
        self.forwards.close(&record.id, remove).await;
        let bound: Result<Vec<Bound>, Error> = add.iter().map(bind).collect();
        match bound {
            Ok(bound) => self.open_forwards(record, bound).await,
            Err(e) => {
                let back: Vec<Bound> = remove.iter().filter_map(|p| bind(p).ok()).collect();
                if let Err(again) = self.open_forwards(record, back).await {
                    warn!(vm = %record.name, "cannot serve the ports again: {again}");
                }
                Err(e)
            }
        }
    }

    /// `vm port add|rm` on a running user-mode VM: the backend's forwards of `remove` dropped,
    /// then `add` made; when one cannot be made, those made are dropped and the removed ones
    /// made again, so nothing changes.
    async fn change_user_forwards(
        &self,
        record: &VmRecord,
        add: &[PortMapping],
        remove: &[PortMapping],
    ) -> Result<(), Error> {
        let backend = self.backend(record);
        if backend.capabilities().needs_tap {
            return Err(Error::Unsupported {
                message: format!(
                    "a {} VM has no user-mode network to publish ports on",
                    record.spec.vmm
                ),
                hint: "reach the VM at NAME.vm:PORT from the host".into(),
            });
        }
        let pid = record.runtime.as_ref().and_then(|r| r.pid).ok_or_else(|| {
            Error::Failed(format!(
                "VM {} runs but has no recorded process",
                record.name
            ))
        })?;
        let (vmm, control) = self.control(record, pid);
        for p in remove {
            vmm.forward_port(&control, p, PortForward::Remove).await?;
        }
        let mut added: Vec<PortMapping> = Vec::new();
        for p in add {
            if let Err(e) = vmm.forward_port(&control, p, PortForward::Add).await {
                for q in &added {
                    let _ = vmm.forward_port(&control, q, PortForward::Remove).await;
                }
                for q in remove {
                    let _ = vmm.forward_port(&control, q, PortForward::Add).await;
                }
                return Err(e.into());
            }
            added.push(*p);
        }
        Ok(())
    }
}

/// A VM's network as the store knows it: its lease (bridge), else user mode or isolated, and
/// its published ports.
pub(super) fn network_in(
    store: &mut crate::store::Store,
    id: &str,
) -> Result<VmNetwork, crate::store::StoreError> {
    let ports = store.ports_of(id)?;
    Ok(match store.lease_of(id)? {
        Some(lease) => VmNetwork {
            mode: "bridge".into(),
            ip: Some(lease.ip.to_string()),
            tap: Some(lease.tap),
            ports,
        },
        None => VmNetwork {
            mode: if store.is_isolated(id)? {
                "isolated"
            } else {
                "user"
            }
            .into(),
            ip: None,
            tap: None,
            ports,
        },
    })
}

fn describe(p: &PortMapping) -> String {
    format!("{}/{}", p.host_side(), p.proto.as_str())
}

fn same_host_side(p: &PortMapping, q: &PortMapping) -> bool {
    p.proto == q.proto && p.host_ip == q.host_ip && p.host_port == q.host_port
}

/// Whether two mappings want the same host socket (0.0.0.0 covers every address).
fn overlaps(p: &PortMapping, q: &PortMapping) -> bool {
    p.proto == q.proto
        && p.host_port == q.host_port
        && (p.host_ip == q.host_ip
            || p.host_ip == Ipv4Addr::UNSPECIFIED
            || q.host_ip == Ipv4Addr::UNSPECIFIED)
}

/// Binds the host side for a moment: a busy port is a clear error before anything changes.
fn probe(p: &PortMapping) -> Result<(), Error> {
    bind(p).map(drop)
}

/// Binds the host side of `p`, with the error a busy (or otherwise unusable) port gets.
fn bind(p: &PortMapping) -> Result<Bound, Error> {
    Bound::bind(p).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "is in use by another program".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                "needs privileges (ports below 1024)".to_owned()
            }
            std::io::ErrorKind::AddrNotAvailable => "is not an address of this host".to_owned(),
            _ => format!("cannot be listened on: {e}"),
        };
        Error::InvalidRequest(format!(
            "host port {} {why}; pick another host port",
            describe(p)
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn overlapping_host_sides() {
        let p = PortMapping::parse("8080:8000").unwrap();
        let any = PortMapping::parse("0.0.0.0:8080:9000").unwrap();
        assert!(overlaps(&p, &any));
        let udp = PortMapping::parse("8080:8000/udp").unwrap();
        assert!(!overlaps(&p, &udp));
    }

    #[test]
    fn a_busy_port_is_refused_by_the_probe() {
        use std::net::TcpListener;
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let p = PortMapping::parse(&format!("{port}:80")).unwrap();
        let err = probe(&p).unwrap_err().to_string();
        assert!(err.contains("is in use"), "{err}");
        drop(held);
        probe(&p).unwrap();
    }

    /// A restarted daemon listens again on a bridge VM's published ports (reconcile's
    /// path), and `vm port add|rm` on it changes the daemon's listeners: bound, refused
    /// when busy (nothing changes), closed.
    #[tokio::test]
    async fn bridge_ports_are_served_again_and_changed_by_the_daemon() {
        use crate::config::Config;
        use crate::domain::{SystemDiskStrategy, VmmKind};
        use crate::host::RecordingHost;
        use crate::layout::Layout;
        use crate::model::VmSpec;
        use std::sync::Arc;

        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        use std::net::TcpListener;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(
            dir.path().join("data"),
            dir.path().join("run"),
            dir.path().join("config.toml"),
        );
        let host = Arc::new(RecordingHost::new());
        let manager = Manager::with_host(layout, Config::default(), host, "/x".into()).unwrap();
        let pool = manager.choose_network(None).await.unwrap().unwrap();
        let record = VmRecord::new(
            VmName::parse("b").unwrap(),
            VmSpec {
                cpus: 1,
                memory_mib: 256,
                disk_size_bytes: 1 << 30,
                image: "default".into(),
                // Any backend: the relay does not depend on it.
                vmm: VmmKind::ALL[0],
                vmm_reason: "test".into(),
                system_disk: SystemDiskStrategy::Qcow2,
            },
        );
        let (p1, p2) = (free(), free());
        let first = PortMapping::parse(&format!("{p1}:80")).unwrap();
        manager
            .db
            .blocking(|store| {
                store.insert_vm_with_lease(&record, Some(pool))?;
                store.change_ports(&record.id, &[first], &[])
            })
            .unwrap();
        manager.reopen_forwards(&record).await;
        assert_eq!(manager.forwards.served(&record.id), [first]);
        assert!(probe(&first).is_err(), "the daemon holds the port");

        // Add one; a busy one is refused and nothing changes; remove one.
        let second = PortMapping::parse(&format!("{p2}:81")).unwrap();
        manager
            .change_forwards(&record, &[second], &[])
            .await
            .unwrap();
        assert_eq!(manager.forwards.served(&record.id).len(), 2);
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy =
            PortMapping::parse(&format!("{}:82", held.local_addr().unwrap().port())).unwrap();
        let err = manager
            .change_forwards(&record, &[busy], &[first])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is in use"), "{err}");
        let mut served = manager.forwards.served(&record.id);
        served.sort();
        let mut expected = vec![first, second];
        expected.sort();
        assert_eq!(served, expected, "the removed port is served again");
        manager
            .change_forwards(&record, &[], &[second])
            .await
            .unwrap();
        assert_eq!(manager.forwards.served(&record.id), [first]);
        manager.forwards.close_vm(&record.id);
        assert!(manager.forwards.served(&record.id).is_empty());
    }
}
