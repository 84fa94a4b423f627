//! What the CLI (`banger`) and the daemon share besides the wire protocol (banger-proto),
//! without the daemon's logic: every on-disk path of an instance ([`layout`]) and the `ssh`
//! command line to a guest ([`ssh`]). The CLI depends on this crate, not on banger-core.

pub mod layout;
pub mod ssh;

/// Where a prepared workspace lives in the guest (and where `vm exec` runs then).
pub const GUEST_WORKSPACE_DIR: &str = "/root/repo";
