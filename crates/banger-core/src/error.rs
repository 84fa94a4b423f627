//! The error of a [`crate::service::Manager`] operation, and its mapping onto the API's
//! error codes and hints.

use banger_proto::{ApiError, ErrorCode, NameError, VmState};

use crate::config::ConfigError;
use crate::layout::LayoutError;
use crate::model::TransitionError;
use crate::store::StoreError;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM name that is not a DNS label.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A request value out of range.
    #[error("{0}")]
    InvalidRequest(String),
    /// The VM is in a state that does not allow the operation.
    #[error("VM {name:?} is {state}")]
    InvalidState {
        name: String,
        state: VmState,
        hint: &'static str,
    },
    /// A lifecycle transition the model refuses.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A file-system operation on banger's own files failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// The API error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidName(_) => ErrorCode::InvalidName,
            Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::InvalidState { .. } | Self::Transition(_) => ErrorCode::InvalidState,
            Self::Store(StoreError::VmExists(_)) => ErrorCode::AlreadyExists,
            Self::Store(StoreError::VmNotFound(_)) => ErrorCode::NotFound,
            Self::Config(_) => ErrorCode::InvalidRequest,
            Self::Store(_) | Self::Layout(_) | Self::Io { .. } => ErrorCode::Internal,
        }
    }

    /// What the user can do next, when there is something useful to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::InvalidName(_) => {
                Some("names are DNS labels: 1-63 of a-z, 0-9 and '-', e.g. dev-1".into())
            }
            Self::InvalidState { hint, .. } => Some((*hint).into()),
            Self::Store(StoreError::VmExists(_)) => {
                Some("pick another name, or remove the old VM with `banger vm rm NAME`".into())
            }
            Self::Store(StoreError::VmNotFound(_)) => Some("`banger vm ls` lists VMs".into()),
            Self::Config(_) => Some("fix the config file (docs/config.md lists every key)".into()),
            _ => None,
        }
    }

    /// The API form: the message carries the whole source chain on one line.
    pub fn to_api(&self) -> ApiError {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        // `transparent` variants already printed their source's message.
        if matches!(
            self,
            Self::InvalidName(_)
                | Self::Transition(_)
                | Self::Store(_)
                | Self::Config(_)
                | Self::Layout(_)
        ) {
            source = source.and_then(std::error::Error::source);
        }
        while let Some(err) = source {
            message.push_str(": ");
            message.push_str(&err.to_string());
            source = err.source();
        }
        ApiError {
            code: self.code(),
            message,
            hint: self.hint(),
        }
    }
}
