//! Wire types of banger: the daemon's HTTP+JSON API (requests, responses, the error body and
//! its codes) and the value types both sides validate the same way (VM names, sizes).
//!
//! Nothing here does I/O. The CLI, the daemon and the root helper all depend on this
//! crate, so it stays small.

pub mod api;
pub mod error;
pub mod helper;
pub mod name;
pub mod ports;
pub mod size;

pub use api::*;
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use name::{NameError, VmName};
pub use ports::{PortChangeRequest, PortList, PortMapping, PortProto, PortSpecError};
pub use size::{ByteSize, SizeError};

/// Header carrying the operation id that ties one CLI command to every log line it causes.
pub const OP_ID_HEADER: &str = "x-banger-op-id";

/// Version prefix of every daemon route.
pub const API_PREFIX: &str = "/v1";
