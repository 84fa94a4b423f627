//! Bridge networking on the daemon side: the op_id carried to the helper, the `NAME.vm` DNS
//! server ([`dns`]), published ports relayed by the daemon ([`forward`]) and the generated
//! OpenSSH configuration ([`sshconfig`]). Leases live in
//! the store (`store::leases`); privileged work goes through [`crate::host::HostOps`].

pub mod dns;
pub mod forward;
pub mod sshconfig;

tokio::task_local! {
    /// The op_id of the request being served (set by the daemon's HTTP middleware).
    pub static OP_ID: String;
}

/// The current request's op_id, or `daemon` outside a request.
pub fn current_op_id() -> String {
    OP_ID
        .try_with(|id| id.clone())
        .unwrap_or_else(|_| "daemon".into())
}
