//! The workspace: a host directory (normally a git repo's top level) copied into the guest's
//! /root/repo. `fileset` decides what belongs to it and what changed since the last prepare
//! (the manifest); `transfer` streams that as a tar over SSH and deletes in the guest what the
//! host deleted; the guest scripts for the prepared-state tree, guest-side status and
//! copy-back live here too.

pub mod extract;
pub mod fileset;
pub mod patch;
pub mod tar_guard;
pub mod transfer;

pub use fileset::{Entry, Kind, Manifest, Plan, Scan};

/// Where the workspace lives in the guest (on the work disk, mounted at /root).
pub use banger_shared::GUEST_WORKSPACE_DIR as GUEST_DIR;

/// Why a workspace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The host path is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// The host path is not in a git repository.
    #[error("{0} is not a git repository")]
    NotGit(String),
    /// The host path is inside a repository but not its top level.
    #[error("{path} is not the top level of its git repository ({top})")]
    NotTopLevel { path: String, top: String },
    /// `.git` is a file (a linked worktree or a submodule), whose objects live elsewhere.
    #[error("{0}/.git is a file (a linked worktree or submodule), not a repository directory")]
    GitFile(String),
    /// A path from the file set that would leave the directory.
    #[error("refusing unsafe path {0:?} (absolute, `..`, or below a symlink)")]
    UnsafePath(String),
    /// A file name that is not UTF-8.
    #[error("file name {0:?} is not UTF-8")]
    NotUtf8(String),
    /// A git command failed.
    #[error("git {args} failed: {stderr}")]
    Git { args: String, stderr: String },
    /// A file changed size while it was being sent.
    #[error("{0} changed while it was being sent")]
    Changed(String),
    /// The guest side of a transfer failed.
    #[error("the guest side failed (exit {code:?}): {stderr}")]
    Remote { code: Option<i32>, stderr: String },
    /// Export needs a git workspace prepared before.
    #[error("VM {0:?} has no prepared git workspace")]
    NotPrepared(String),
    /// A guest tar entry that the host does not write (see [`extract`]).
    #[error("refusing {path:?} from the guest: {why}")]
    UnsafeEntry { path: String, why: String },
    /// A guest patch line that could write outside the tree or under `.git` (see [`patch`]).
    #[error("refusing the guest's patch: line {line}: {why}")]
    UnsafePatch { line: usize, why: String },
    /// Guest output over a limit.
    #[error("refusing the guest's output: {0}")]
    Refused(String),
    /// A destination name that the extracted tree cannot take without following a symlink
    /// or replacing a different kind of file.
    #[error("{path} {why}")]
    Conflict { path: String, why: String },
    /// A host file-system operation failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl WorkspaceError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Name of the virtio-serial port of the workspace channel; udev links it as
/// `/dev/virtio-ports/<name>` in the guest.
pub const CHANNEL_PORT_NAME: &str = "org.banger.workspace";

/// The guest's first stdout line when it reads the tar from the workspace channel.
pub const CHANNEL_READY: &str = "banger-channel";
/// The guest's first stdout line when it has no channel port and reads the tar from stdin.
pub const CHANNEL_ABSENT: &str = "banger-ssh";

/// What the guest side of a transfer reads from stdin before the tar, in this order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receive {
    /// Bytes of NUL-separated paths to delete first.
    pub delete_len: usize,
    /// Bytes of NUL-separated worktree paths sent or deleted (git, not for a fresh prepare):
    /// only these change in the prepared-state tree (see [`receive_script`]).
    pub changed_len: usize,
    /// Bytes of the exclude file for untracked paths (git), see [`fileset::exclude_patterns`].
    pub exclude_len: usize,
    pub git: bool,
    /// No earlier prepare: the tree index is rebuilt from the repo's own index.
    pub fresh: bool,
    /// Read the tar from the workspace channel, which starts with this token (hex), when the
    /// guest has the port; the guest says which it reads with a first stdout line,
    /// [`CHANNEL_READY`] or [`CHANNEL_ABSENT`].
    pub channel_token: Option<String>,
}

/// Guest file listing the worktree paths the last prepare sent or deleted (see
/// [`Receive::changed_len`]).
const CHANGED_LIST: &str = "/root/.banger/workspace-changed";
/// Guest exclude file of the untracked paths, named by `core.excludesFile` in
/// /root/.banger/gitconfig (see [`GUEST_GIT_SETTINGS`]).
pub const UNTRACKED_EXCLUDES: &str = "/root/.banger/workspace-untracked";

/// Git settings for the guest's repo and no other: stat checks that hold for files extracted
/// from a tar (whole-second mtimes, new inodes and ctimes), so `git status` does not re-read
/// every file after a prepare, and the exclude file of untracked paths. They live in
/// /root/.banger/gitconfig (rewritten by each prepare), which /etc/gitconfig includes for
/// repositories under /root/repo only (`includeIf "gitdir:/root/repo/"`, appended once). The
/// unconditional block an older banger appended ("v1") is removed.
const GUEST_GIT_SETTINGS: &str = "{ printf '%s\\n' '[core]' '\tcheckStat = minimal' \
    '\ttrustCtime = false' '\texcludesFile = /root/.banger/workspace-untracked' \
    > /root/.banger/gitconfig; \
    if grep -qsx '# banger workspace settings v1' /etc/gitconfig; then \
    sed -i '/^# banger workspace settings v1$/,+4d' /etc/gitconfig; fi; \
    grep -qsx '# banger workspace settings v2' /etc/gitconfig \
    || printf '%s\\n' '' '# banger workspace settings v2' \
    '[includeIf \"gitdir:/root/repo/\"]' '\tpath = /root/.banger/gitconfig' \
    >> /etc/gitconfig; } 2>/dev/null || :; ";

/// git options for the stat checks of the tree indexes: the minimal ones (size,
/// whole-second mtime, mode), as the tar sets whole-second mtimes and new inodes.
macro_rules! stat_checks {
    () => {
        "-c core.checkStat=minimal -c core.trustCtime=false"
    };
}

/// The guest-only tree index of the prepared state (see [`receive_script`]), kept from one
/// prepare to the next.
macro_rules! prepared_index {
    () => {
        ".git/banger-index"
    };
}

/// The guest script of a transfer: it deletes, stores the lists, extracts the tar into
/// [`GUEST_DIR`], and for a git repo prints the tree id of the prepared state (worktree as
/// sent, through a guest-only index), the base of `export`.
pub fn receive_script(receive: &Receive) -> String {
    let mut script = format!("set -e; mkdir -p {GUEST_DIR} /root/.banger; cd {GUEST_DIR}; ");
    // GNU head -c reads exactly that many bytes from a pipe; the next part follows.
    if receive.delete_len > 0 {
        script.push_str(&format!(
            "head -c {} | xargs -0 -r rm -rf --; ",
            receive.delete_len
        ));
    }
    if receive.git {
        if receive.changed_len > 0 {
            script.push_str(&format!(
                "head -c {} > {CHANGED_LIST}; ",
                receive.changed_len
            ));
        }
        script.push_str(&format!(
            "head -c {} > {UNTRACKED_EXCLUDES}; ",
            receive.exclude_len
        ));
    }
    script.push_str(&read_tar(
        receive.channel_token.as_deref(),
        "tar -x --no-same-owner -f -",
    ));
    if receive.git {
        script.push_str(GUEST_GIT_SETTINGS);
        // The prepared-state tree is the previous one with the changed paths updated, so
        // it does not take in edits made in the guest since (they stay visible to export),
        // and only the changed paths are looked at. Their entries are dropped first, so a
        // file rewritten with the same size and whole-second mtime is hashed again. A fresh
        // prepare, or a guest without the index, builds it from the whole worktree.
        let tree = if receive.fresh {
            format!("rm -f \"$i\"; {ADD_WORKTREE}")
        } else {
            let update = if receive.changed_len > 0 {
                format!(
                    "GIT_INDEX_FILE=\"$i\" git update-index -z --force-remove --stdin \
                     < {CHANGED_LIST} && GIT_INDEX_FILE=\"$i\" git {} \
                     update-index -z --add --remove --stdin < {CHANGED_LIST} && ",
                    stat_checks!()
                )
            } else {
                String::new()
            };
            format!(
                "if [ -f \"$i\" ]; then {update}GIT_INDEX_FILE=\"$i\" git write-tree; \
                 else {ADD_WORKTREE} fi"
            )
        };
        // The files are in place even if this fails; export then says there is no base, and
        // the next prepare builds the index again.
        script.push_str(&format!(
            "( i={PREPARED_INDEX}; {tree} ) || {{ rm -f {PREPARED_INDEX}; \
             echo 'banger: cannot record the prepared tree' >&2; }}"
        ));
    }
    script
}

/// The guest script fragment that runs `extract` (a `tar -x` reading stdin) on the tar of a
/// transfer: from the workspace channel when `channel_token` is set and the guest has the
/// port, else from stdin. The guest says which with a first stdout line, [`CHANNEL_READY`]
/// or [`CHANNEL_ABSENT`].
pub fn read_tar(channel_token: Option<&str>, extract: &str) -> String {
    match channel_token {
        // One open for the whole transfer: closing a port discards what it holds. The host
        // connected before this runs; until the guest has seen that, a read ends at once
        // with nothing, so the token is waited for (10 s). The token tells this transfer's
        // bytes from anything else.
        Some(token) => format!(
            "p=/dev/virtio-ports/{CHANNEL_PORT_NAME}; if [ -c \"$p\" ]; then {{ \
             echo {CHANNEL_READY}; n=0; \
             until t=$(head -c {len} <&3) && [ -n \"$t\" ]; do n=$((n+1)); \
             if [ $n -ge 200 ]; then echo 'banger: nothing came on the workspace channel' >&2; \
             exit 1; fi; sleep 0.05; done; \
             if [ \"$t\" != {token} ]; then \
             echo 'banger: unexpected data on the workspace channel' >&2; exit 1; fi; \
             {extract} <&3; }} 3<\"$p\"; \
             else echo {CHANNEL_ABSENT}; {extract}; fi; ",
            len = token.len()
        ),
        None => format!("{extract}; "),
    }
}

/// Adds the whole worktree in the current directory (tracked + untracked, not ignored,
/// including what the untracked exclude file hides) to the guest-only index `$i` and prints
/// its tree id; the repo's own index is not touched. A missing `$i` is seeded from the repo's
/// index with its mtime (so git's racy-entry check stays sound): with valid stat data only
/// files that differ are hashed.
const ADD_WORKTREE: &str = concat!(
    "[ -f \"$i\" ] || cp -p .git/index \"$i\" 2>/dev/null || :; ",
    "GIT_INDEX_FILE=\"$i\" git ",
    stat_checks!(),
    " -c core.excludesFile=/dev/null add -A . >/dev/null && GIT_INDEX_FILE=\"$i\" git write-tree;"
);

const PREPARED_INDEX: &str = prepared_index!();

/// Points `$i` at a scratch copy of the prepared-state index, for [`ADD_WORKTREE`] to give
/// the tree of the worktree now (the copy's stat data spare most hashing) while the
/// prepared-state index stays as prepared.
const SCRATCH_INDEX: &str = concat!(
    "i=.git/banger-index-now; rm -f \"$i\"; ",
    "cp -p ",
    prepared_index!(),
    " \"$i\" 2>/dev/null || :; "
);

/// The guest script printing the guest's changes since `base` (a tree id) as a binary git
/// patch that applies to the prepared state.
pub fn export_patch_script(base: &str) -> String {
    format!(
        "set -e; cd {GUEST_DIR}; new=$({{ {SCRATCH_INDEX}{ADD_WORKTREE} }}); \
         git -c core.quotepath=off diff --binary --no-renames --no-color {base} \"$new\""
    )
}

/// The guest script streaming, as a tar, the files added or modified since `base`, and
/// printing the deleted paths NUL-separated on stderr after a marker line.
pub fn export_files_script(base: &str) -> String {
    format!(
        "set -e; cd {GUEST_DIR}; new=$({{ {SCRATCH_INDEX}{ADD_WORKTREE} }}); \
         git diff -z --name-only --no-renames --diff-filter=d {base} \"$new\" \
         | tar -c --null --no-recursion -T - -f -; \
         printf '%s\\n' '{DELETED_MARKER}' >&2; \
         git diff -z --name-only --no-renames --diff-filter=D {base} \"$new\" >&2"
    )
}

/// Separates diagnostics from the deleted-path list on the export script's stderr.
pub const DELETED_MARKER: &str = "banger-deleted:";

/// The guest script listing what is under [`GUEST_DIR`] (outside `.git`) as NUL-separated
/// records `path, type, size, mtime seconds`.
pub const GUEST_LIST_SCRIPT: &str =
    "cd /root/repo && find . -path ./.git -prune -o ! -path . -printf '%P\\0%y\\0%s\\0%T@\\0'";
