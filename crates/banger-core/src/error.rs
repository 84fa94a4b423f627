//! The error of a [`crate::service::Manager`] operation, and its mapping onto the API's
//! error codes and hints.

use banger_proto::{ApiError, ErrorCode, NameError, VmState};

use crate::config::ConfigError;
use crate::disk::DiskError;
use crate::guest::ssh::SshError;
use crate::host::HostError;
use crate::image::ImageError;
use crate::layout::LayoutError;
use crate::model::TransitionError;
use crate::store::StoreError;
use crate::vmm::VmmError;
use crate::workspace::WorkspaceError;

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
    /// No image or kernel of that name.
    #[error("{kind} {name:?} not found")]
    AssetNotFound { kind: &'static str, name: String },
    /// The object is used by others.
    #[error("{kind} {name:?} is used by {users}")]
    InUse {
        kind: &'static str,
        name: String,
        users: String,
    },
    /// The host lacks something.
    #[error("{message}")]
    HostSetup { message: String, hint: String },
    /// The VM's backend cannot do this (e.g. `vm suspend` on QEMU).
    #[error("{message}")]
    Unsupported { message: String, hint: String },
    /// A request value the VM or the host cannot take (e.g. shrinking a disk, more vCPUs
    /// than the host has); nothing was changed.
    #[error("{message}")]
    Refused { message: String, hint: String },
    /// The operation needs the VM in another state (e.g. stopped), said in its own words.
    #[error("{message}")]
    NotNow { message: String, hint: String },
    /// A disk check before a start found what `e2fsck -p` cannot repair; the VM stays down.
    #[error("{message}")]
    DiskCheck { message: String, hint: String },
    /// A lifecycle step failed; the VM was put back as it was.
    #[error("{step}")]
    StepFailed {
        step: String,
        #[source]
        source: Box<Error>,
    },
    /// A lifecycle step failed with a plain message (e.g. the guest never answered).
    #[error("{0}")]
    Failed(String),
    /// A push or pull to a registry failed (unreachable, refused, corrupt data).
    #[error("{0}")]
    Transfer(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    /// A privileged action through the root helper failed.
    #[error(transparent)]
    Host(#[from] HostError),
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
            Self::InvalidRequest(_) | Self::Unsupported { .. } | Self::Refused { .. } => {
                ErrorCode::InvalidRequest
            }
            Self::InvalidState { .. } | Self::Transition(_) | Self::NotNow { .. } => {
                ErrorCode::InvalidState
            }
            Self::DiskCheck { .. } => ErrorCode::OperationFailed,
            Self::Store(StoreError::VmExists(_)) => ErrorCode::AlreadyExists,
            Self::Store(StoreError::VmNotFound(_)) => ErrorCode::NotFound,
            Self::Config(_) => ErrorCode::InvalidRequest,
            Self::AssetNotFound { .. } => ErrorCode::NotFound,
            Self::InUse { .. } => ErrorCode::InUse,
            Self::HostSetup { .. }
            | Self::Image(ImageError::MissingTool(_) | ImageError::NoMirror)
            | Self::Vmm(
                VmmError::MissingBinary(_)
                | VmmError::MissingJailer(_)
                | VmmError::TooOld { .. }
                | VmmError::NeedsTap,
            )
            | Self::Disk(DiskError::MissingTool(_))
            | Self::Ssh(SshError::MissingSsh)
            | Self::Host(HostError::Unreachable { .. })
            | Self::Disk(DiskError::Host(HostError::Unreachable { .. })) => ErrorCode::HostSetup,
            Self::Image(
                ImageError::MissingFile { .. }
                | ImageError::NotAKernel(_)
                | ImageError::RelativePath(_),
            ) => ErrorCode::InvalidRequest,
            Self::StepFailed { source, .. } => match source.code() {
                ErrorCode::Internal => ErrorCode::OperationFailed,
                other => other,
            },
            Self::Workspace(
                WorkspaceError::NotADirectory(_)
                | WorkspaceError::NotGit(_)
                | WorkspaceError::NotTopLevel { .. }
                | WorkspaceError::GitFile(_)
                | WorkspaceError::UnsafePath(_)
                | WorkspaceError::NotUtf8(_)
                | WorkspaceError::NotPrepared(_)
                | WorkspaceError::Conflict { .. },
            ) => ErrorCode::InvalidRequest,
            Self::Workspace(_) => ErrorCode::OperationFailed,
            Self::Failed(_)
            | Self::Transfer(_)
            | Self::Image(_)
            | Self::Vmm(_)
            | Self::Disk(_)
            | Self::Ssh(_)
            | Self::Host(_) => ErrorCode::OperationFailed,
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
            Self::AssetNotFound { kind: "image", .. } => Some(
                "build the default image with `banger image build`, or `banger image import`"
                    .into(),
            ),
            Self::AssetNotFound {
                kind: "snapshot",
                name,
            } => Some(format!(
                "`banger vm snapshot ls {}` lists its snapshots",
                name.split('/').next().unwrap_or_default()
            )),
            Self::AssetNotFound { .. } => Some("`banger kernel ls` lists kernels".into()),
            Self::InUse { .. } => Some("remove those first".into()),
            Self::HostSetup { hint, .. }
            | Self::Unsupported { hint, .. }
            | Self::Refused { hint, .. }
            | Self::NotNow { hint, .. }
            | Self::DiskCheck { hint, .. } => Some(hint.clone()),
            Self::Image(ImageError::MissingTool(_))
            | Self::Vmm(VmmError::MissingBinary(_))
            | Self::Disk(DiskError::MissingTool(_))
            | Self::Ssh(SshError::MissingSsh) => {
                Some("run scripts/install-deps (or `banger doctor` to see what is missing)".into())
            }
            Self::Vmm(VmmError::MissingJailer(_)) => Some(
                "install Firecracker's `jailer` there, or remove firecracker.jailer from the config file"
                    .into(),
            ),
            Self::Vmm(VmmError::TooOld { .. }) => {
                Some("install a newer Firecracker, or create the VM with --vmm qemu".into())
            }
            Self::Vmm(VmmError::NeedsTap) => Some(
                "Firecracker VMs need banger's bridge networking; use --vmm qemu meanwhile".into(),
            ),
            Self::Image(ImageError::NoMirror) => {
                Some("pass --mirror URL or set images.mirror in the config file".into())
            }
            Self::Workspace(WorkspaceError::NotGit(_)) => Some(
                "prepare from a git repository, or pass --no-git to copy a plain directory".into(),
            ),
            Self::Workspace(WorkspaceError::NotTopLevel { .. }) => {
                Some("pass the repository's top level (the default when PATH is omitted)".into())
            }
            Self::Workspace(WorkspaceError::GitFile(_)) => {
                Some("prepare from the main worktree, or pass --no-git".into())
            }
            Self::Workspace(WorkspaceError::UnsafePath(_)) => Some(
                "banger never follows symlinks out of the workspace; fix or remove that path"
                    .into(),
            ),
            Self::Workspace(WorkspaceError::NotUtf8(_)) => {
                Some("rename the file; workspace paths must be UTF-8".into())
            }
            Self::Workspace(WorkspaceError::NotPrepared(_)) => {
                Some("run `banger vm workspace prepare NAME` in a git repository first".into())
            }
            Self::Workspace(WorkspaceError::Changed(_)) => Some("run the prepare again".into()),
            Self::Workspace(
                WorkspaceError::UnsafeEntry { .. }
                | WorkspaceError::UnsafePatch { .. }
                | WorkspaceError::Refused(_),
            ) => Some(
                "nothing was written; the guest may be compromised: inspect it with `banger vm ssh`"
                    .into(),
            ),
            Self::Workspace(WorkspaceError::Conflict { .. }) => {
                Some("nothing was written; move that path aside or pick another destination".into())
            }
            Self::Host(HostError::Unreachable { .. }) => Some(
                "install and start the root helper (`banger helper install`), or use `--network user`"
                    .into(),
            ),
            Self::Disk(DiskError::Host(HostError::Unreachable { .. })) => Some(
                "dm system disks need the root helper: `banger helper install`, or set defaults.system_disk = \"auto\""
                    .into(),
            ),
            Self::StepFailed { source, .. } => source
                .hint()
                .or_else(|| Some("see `banger vm logs NAME` and the daemon log".into())),
            _ => None,
        }
    }

    /// The API form: the message carries the whole source chain on one line.
    pub fn to_api(&self) -> ApiError {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        // `transparent` variants forward `source()` to their inner error's source, so the
        // chain never repeats a message.
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
