//! The one error body every failed daemon request returns, and its closed set of codes.
//!
//! The code decides both the HTTP status and the CLI's exit code, so the three never disagree.

use serde::{Deserialize, Serialize};

/// Machine-readable error codes. Stable: scripts may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A VM name that is not a DNS label.
    InvalidName,
    /// A request whose values are out of range or inconsistent.
    InvalidRequest,
    /// A body that is not JSON, has unknown fields or wrong types.
    InvalidJson,
    /// The named VM, image or kernel does not exist.
    NotFound,
    /// A VM, image or kernel of that name exists already.
    AlreadyExists,
    /// The VM is not in a state that allows the operation (e.g. exec on a stopped VM).
    InvalidState,
    /// The object is used by another (e.g. an image a VM runs on).
    InUse,
    /// The host lacks something the operation needs (a binary, a permission, KVM...).
    HostSetup,
    /// The operation was tried and failed (e.g. the VMM did not start).
    OperationFailed,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
}

impl ErrorCode {
    /// The HTTP status the daemon answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidName | Self::InvalidRequest | Self::InvalidJson => 400,
            Self::NotFound => 404,
            Self::AlreadyExists | Self::InvalidState | Self::InUse => 409,
            Self::HostSetup | Self::OperationFailed => 422,
            Self::Internal => 500,
        }
    }

    /// The CLI's exit code for this error (see docs/cli.md).
    pub fn exit_code(self) -> i32 {
        match self {
            Self::NotFound => 2,
            Self::InvalidState => 4,
            _ => 1,
        }
    }
}

/// The error object inside [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    pub code: ErrorCode,
    /// One line saying what went wrong.
    pub message: String,
    /// What to do next, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Body of every non-2xx response: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ApiError,
}

impl ApiError {
    /// An error without a hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}
