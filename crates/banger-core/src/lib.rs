//! banger's logic, free of CLI parsing and listening sockets: the VM model and its legal
//! transitions, every on-disk path, the SQLite state store, configuration, and the
//! [`service::Manager`] whose methods are the daemon's operations.

pub mod cause;
pub mod config;
pub mod disk;
pub mod disk_view;
pub mod doctor;
pub mod domain;
pub mod durable;
pub mod e2fs;
pub mod error;
pub mod fault;
pub mod guest;
pub mod host;
pub mod image;
pub mod model;
pub mod net;
pub mod qcow2;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod usage;
pub mod vmm;
pub mod which;
pub mod workspace;

pub use banger_shared::layout;
pub use error::Error;

/// banger's version, as reported by the daemon and the CLI.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Now as an RFC 3339 UTC timestamp with seconds precision.
pub fn now_rfc3339() -> String {
    format_rfc3339(std::time::SystemTime::now())
}

/// `time` as an RFC 3339 UTC timestamp with seconds precision.
pub fn format_rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}
