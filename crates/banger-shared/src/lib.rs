//! What the CLI (`banger`) and the daemon share besides the wire protocol (banger-proto),
//! without the daemon's logic: every on-disk path of an instance ([`layout`]) and the `ssh`
//! command line to a guest ([`ssh`]), and how a test of any crate reports a skip ([`skip`]). The CLI depends on this crate, not on banger-core.

pub mod layout;
pub mod skip;
pub mod ssh;

/// Where a prepared workspace lives in the guest (and where `vm exec` runs then).
pub const GUEST_WORKSPACE_DIR: &str = "/root/repo";
