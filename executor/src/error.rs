//! The executor's error type.

use std::path::PathBuf;

/// Everything that can go wrong starting, running or waiting for a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The helper binary could not be started.
    #[error("cannot start the sandbox helper `{helper}`")]
    SpawnHelper {
        /// The helper path.
        helper: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A pipe to the helper could not be made or used.
    #[error("cannot {what} the sandbox helper's pipe")]
    Pipe {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The spec could not be serialized (cannot happen with plain data, kept for honesty).
    #[error("cannot encode the sandbox spec")]
    EncodeSpec(#[source] serde_json::Error),
    /// A step of the sandbox setup failed inside the helper; `step` names it with its
    /// paths, e.g. "mount overlay on `/tmp/kiln-sandbox.x/rootfs`".
    #[error("sandbox setup failed: {step}")]
    Setup {
        /// The step, with its values.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The payload could not be executed (not found, not executable, ...).
    #[error("cannot execute `{program}` in the sandbox")]
    Exec {
        /// argv\[0\].
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `USER` could not be resolved against the rootfs's `/etc/passwd` / `/etc/group`.
    #[error("cannot resolve the sandbox user")]
    User(#[source] crate::user::UserError),
    /// The spec asks for something this sandbox cannot do.
    #[error("invalid sandbox spec: {reason}")]
    InvalidSpec {
        /// Why.
        reason: String,
    },
    /// The helper died without reporting the payload's exit.
    #[error("the sandbox helper exited without a report ({status})")]
    HelperDied {
        /// The helper's own wait status.
        status: String,
    },
    /// The sandbox ended before its payload was started.
    #[error("the sandbox ended before its payload started ({status})")]
    NotStarted {
        /// How it ended.
        status: String,
    },
    /// Waiting for the helper failed.
    #[error("cannot wait for the sandbox helper")]
    Wait(#[source] std::io::Error),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
