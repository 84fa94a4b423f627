//! A VM's user-mode network settings: whether it is isolated (no outbound network) and its
//! published ports. Written with the VM (or by `vm port add|rm`), read at every start.

use banger_proto::{PortMapping, PortProto};
use rusqlite::params;

use super::{Store, StoreError};

impl Store {
    /// Marks the VM isolated (or not).
    pub fn set_isolated(&self, vm_id: &str, isolated: bool) -> Result<(), StoreError> {
        if isolated {
            self.conn.execute(
                "INSERT OR IGNORE INTO vm_isolated (vm_id) VALUES (?1)",
                [vm_id],
            )?;
        } else {
            self.conn
                .execute("DELETE FROM vm_isolated WHERE vm_id = ?1", [vm_id])?;
        }
        Ok(())
    }

    /// Whether the VM has no outbound network.
    pub fn is_isolated(&self, vm_id: &str) -> Result<bool, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM vm_isolated WHERE vm_id = ?1",
            [vm_id],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// The VM's published ports, in a stable order.
    pub fn ports_of(&self, vm_id: &str) -> Result<Vec<PortMapping>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT proto, host_ip, host_port, guest_port FROM vm_ports WHERE vm_id = ?1
             ORDER BY host_port, proto, host_ip",
        )?;
        let rows = stmt.query_map([vm_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u16>(2)?,
                r.get::<_, u16>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (proto, ip, host_port, guest_port) = row?;
            Ok(PortMapping {
                proto: PortProto::parse(&proto)
                    .ok_or_else(|| StoreError::Corrupt(format!("port protocol {proto:?}")))?,
                host_ip: ip
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("port address {ip:?}")))?,
                host_port,
                guest_port,
            })
        })
        .collect()
    }

    /// Every VM's published ports with the VM's name, for conflict checks.
    pub fn all_ports(&self) -> Result<Vec<(String, PortMapping)>, StoreError> {
        let ids: Vec<(String, String)> = {
            let mut stmt = self.conn.prepare(
                "SELECT DISTINCT v.id, v.name FROM vm_ports p JOIN vms v ON v.id = p.vm_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut all = Vec::new();
        for (id, name) in ids {
            all.extend(self.ports_of(&id)?.into_iter().map(|p| (name.clone(), p)));
        }
        Ok(all)
    }

    /// Adds and removes published ports of one VM in one transaction.
    pub fn change_ports(
        &mut self,
        vm_id: &str,
        add: &[PortMapping],
        remove: &[PortMapping],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for p in remove {
            tx.execute(
                "DELETE FROM vm_ports WHERE vm_id = ?1 AND proto = ?2 AND host_ip = ?3 AND host_port = ?4",
                params![vm_id, p.proto.as_str(), p.host_ip.to_string(), p.host_port],
            )?;
        }
        for p in add {
            tx.execute(
                "INSERT OR REPLACE INTO vm_ports (vm_id, proto, host_ip, host_port, guest_port)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    vm_id,
                    p.proto.as_str(),
                    p.host_ip.to_string(),
                    p.host_port,
                    p.guest_port
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::domain::{SystemDiskStrategy, VmmKind};
    use crate::model::{VmRecord, VmSpec};
    use banger_proto::VmName;

    #[test]
    fn ports_and_isolation_are_kept_and_go_with_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        let vm = VmRecord::new(
            VmName::parse("p").unwrap(),
            VmSpec {
                cpus: 1,
                memory_mib: 256,
                disk_size_bytes: 1 << 30,
                image: "default".into(),
                vmm: VmmKind::Qemu,
                vmm_reason: "test".into(),
                system_disk: SystemDiskStrategy::Qcow2,
            },
        );
        store.insert_vm(&vm).unwrap();
        assert!(!store.is_isolated(&vm.id).unwrap());
        store.set_isolated(&vm.id, true).unwrap();
        assert!(store.is_isolated(&vm.id).unwrap());
        let a = PortMapping::parse("8080:80").unwrap();
        let b = PortMapping::parse("0.0.0.0:53:53/udp").unwrap();
        store.change_ports(&vm.id, &[a, b], &[]).unwrap();
        assert_eq!(store.ports_of(&vm.id).unwrap(), [b, a]);
        store.change_ports(&vm.id, &[], &[b]).unwrap();
        assert_eq!(store.all_ports().unwrap(), [("p".to_owned(), a)]);
        // Reopened: still there.
        drop(store);
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(store.ports_of(&vm.id).unwrap(), [a]);
        store.delete_vm("p").unwrap();
        assert!(store.ports_of(&vm.id).unwrap().is_empty());
        assert!(!store.is_isolated(&vm.id).unwrap());
    }
}
