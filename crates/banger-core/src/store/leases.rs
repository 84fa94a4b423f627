//! IP leases for bridge networking: one row per VM with its address and its tap name, written
//! in the same transaction as the VM, so twenty parallel creates get twenty distinct leases
//! (the UNIQUE constraints hold it even if the allocation logic were wrong). The tap name
//! (`bg<uid>t<N>`, the helper's owner's) is durable so teardown works without any in-memory
//! state.

use std::net::Ipv4Addr;

use banger_proto::helper::{MAX_TAP_INDEX, parse_tap_name, tap_name};
use ipnet::Ipv4Net;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::model::VmRecord;

/// A VM's address and tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub vm_id: String,
    pub vm_name: String,
    pub ip: Ipv4Addr,
    pub tap: String,
}

/// The subnet leases come from, and whose taps they name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The helper's owner (the daemon's uid).
    pub owner: u32,
}

impl Store {
    /// Inserts `vm` and, when `pool` is given, a lease for it: the lowest free address of the
    /// subnet (not the gateway) and the lowest free tap index. One transaction.
    pub fn insert_vm_with_lease(
        &mut self,
        vm: &VmRecord,
        pool: Option<LeasePool>,
    ) -> Result<Option<Lease>, StoreError> {
        let tx = self.conn.transaction()?;
        super::insert_vm_on(&tx, vm)?;
        let lease = match pool {
            None => None,
            Some(pool) => {
                let (ips, taps) = {
                    let mut stmt = tx.prepare("SELECT ip, tap FROM leases")?;
                    let rows = stmt
                        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                    let mut ips = std::collections::HashSet::new();
                    let mut taps = std::collections::HashSet::new();
                    for row in rows {
                        let (ip, tap) = row?;
                        ips.insert(ip);
                        taps.insert(tap);
                    }
                    (ips, taps)
                };
                let ip = pool
                    .subnet
                    .hosts()
                    .filter(|a| *a != pool.gateway)
                    .find(|a| !ips.contains(&a.to_string()))
                    .ok_or(StoreError::PoolExhausted(pool.subnet.to_string()))?;
                let tap = (0..=MAX_TAP_INDEX)
                    .map_while(|index| tap_name(pool.owner, index))
                    .find(|t| !taps.contains(t))
                    .ok_or(StoreError::PoolExhausted("tap names".into()))?;
                tx.execute(
                    "INSERT INTO leases (vm_id, ip, tap, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![vm.id, ip.to_string(), tap, crate::now_rfc3339()],
                )?;
                Some(Lease {
                    vm_id: vm.id.clone(),
                    vm_name: vm.name.to_string(),
                    ip,
                    tap,
                })
            }
        };
        tx.commit()?;
        Ok(lease)
    }

    /// The lease of the VM with `vm_id`, if it has one (bridge mode).
    pub fn lease_of(&self, vm_id: &str) -> Result<Option<Lease>, StoreError> {
        self.conn
            .query_row(
                "SELECT l.vm_id, v.name, l.ip, l.tap FROM leases l JOIN vms v ON v.id = l.vm_id WHERE l.vm_id = ?1",
                [vm_id],
                raw_lease,
            )
            .optional()?
            .map(RawLease::into_lease)
            .transpose()
    }

    /// The lease of the VM called `name` (DNS).
    pub fn lease_by_name(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        self.conn
            .query_row(
                "SELECT l.vm_id, v.name, l.ip, l.tap FROM leases l JOIN vms v ON v.id = l.vm_id WHERE v.name = ?1",
                [name],
                raw_lease,
            )
            .optional()?
            .map(RawLease::into_lease)
            .transpose()
    }

    /// Every lease, by VM name.
    pub fn list_leases(&self) -> Result<Vec<Lease>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT l.vm_id, v.name, l.ip, l.tap FROM leases l JOIN vms v ON v.id = l.vm_id ORDER BY v.name",
        )?;
        let rows = stmt.query_map([], raw_lease)?;
        rows.map(|r| r.map_err(StoreError::from).and_then(RawLease::into_lease))
            .collect()
    }
}

/// Leases written before taps carried their owner (`bg-tap-N`) get `owner`'s name for the
/// same index (`bg<owner>t<N>`): the daemon's uid is its helper's owner.
pub(super) fn rename_legacy_taps(
    conn: &rusqlite::Connection,
    owner: u32,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE leases SET tap = 'bg' || ?1 || 't' || substr(tap, 8) WHERE tap GLOB 'bg-tap-[0-9]*'",
        [owner],
    )?;
    Ok(())
}

struct RawLease {
    vm_id: String,
    name: String,
    ip: String,
    tap: String,
}

fn raw_lease(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawLease> {
    Ok(RawLease {
        vm_id: row.get(0)?,
        name: row.get(1)?,
        ip: row.get(2)?,
        tap: row.get(3)?,
    })
}

impl RawLease {
    fn into_lease(self) -> Result<Lease, StoreError> {
        let ip = self
            .ip
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("lease address {:?}", self.ip)))?;
        if parse_tap_name(&self.tap).is_none() {
            return Err(StoreError::Corrupt(format!("lease tap {:?}", self.tap)));
        }
        Ok(Lease {
            vm_id: self.vm_id,
            vm_name: self.name,
            ip,
            tap: self.tap,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::domain::{SystemDiskStrategy, VmmKind};
    use crate::model::VmSpec;
    use banger_proto::VmName;

    fn pool() -> LeasePool {
        LeasePool {
            subnet: "172.30.0.0/29".parse().unwrap(),
            gateway: "172.30.0.1".parse().unwrap(),
            owner: 1000,
        }
    }

    fn vm(name: &str) -> VmRecord {
        VmRecord::new(
            VmName::parse(name).unwrap(),
            VmSpec {
                cpus: 1,
                memory_mib: 256,
                disk_size_bytes: 1 << 30,
                image: "default".into(),
                vmm: VmmKind::Qemu,
                vmm_reason: "test".into(),
                system_disk: SystemDiskStrategy::Qcow2,
            },
        )
    }

    #[test]
    fn leases_are_distinct_reused_after_delete_and_exhaust_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        let mut seen = Vec::new();
        for i in 0..5 {
            let lease = store
                .insert_vm_with_lease(&vm(&format!("v{i}")), Some(pool()))
                .unwrap()
                .unwrap();
            seen.push((lease.ip, lease.tap));
        }
        assert_eq!(seen[0], ("172.30.0.2".parse().unwrap(), "bg1000t0".into()));
        assert_eq!(seen[4], ("172.30.0.6".parse().unwrap(), "bg1000t4".into()));
        // /29 has 6 hosts, one is the gateway: the sixth VM gets no address, and no record.
        let err = store.insert_vm_with_lease(&vm("v5"), Some(pool()));
        assert!(matches!(err, Err(StoreError::PoolExhausted(_))));
        assert!(store.find_vm("v5").unwrap().is_none());
        // Deleting a VM releases its lease; the next one reuses it.
        store.delete_vm("v1").unwrap();
        assert_eq!(store.list_leases().unwrap().len(), 4);
        let lease = store
            .insert_vm_with_lease(&vm("v6"), Some(pool()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (lease.ip, lease.tap.as_str()),
            ("172.30.0.3".parse().unwrap(), "bg1000t1")
        );
        assert_eq!(store.lease_by_name("v6").unwrap().unwrap(), lease);
        // A user-mode VM has none.
        assert!(
            store
                .insert_vm_with_lease(&vm("u"), None)
                .unwrap()
                .is_none()
        );
        assert!(store.lease_by_name("u").unwrap().is_none());
    }

    #[test]
    fn legacy_tap_names_get_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = Store::open(&path).unwrap();
        store
            .insert_vm_with_lease(&vm("old"), Some(pool()))
            .unwrap();
        store
            .conn
            .execute("UPDATE leases SET tap = 'bg-tap-12'", [])
            .unwrap();
        rename_legacy_taps(&store.conn, 1000).unwrap();
        assert_eq!(
            store.lease_by_name("old").unwrap().unwrap().tap,
            "bg1000t12"
        );
    }
}
