//! The runtime's error type and its mapping onto docker's exit codes.

use std::path::PathBuf;

/// Everything creating, starting or managing a container can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed (or has no such image, container or volume).
    #[error(transparent)]
    Store(#[from] kiln_cache::StoreError),
    /// The sandbox failed to start or run.
    #[error(transparent)]
    Sandbox(#[from] kiln_executor::Error),
    /// A file system operation failed.
    #[error("{what} `{}`", path.display())]
    Io {
        /// What kiln was doing.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A flag or an image setting is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The flag or setting, e.g. "--memory `12q`".
        what: String,
        /// Why.
        reason: String,
    },
    /// The image and the command line give no command to run.
    #[error("no command specified: the image has no Entrypoint or Cmd and none was given")]
    NoCommand,
    /// The operation needs a running container.
    #[error("container {name} is not running")]
    NotRunning {
        /// The container.
        name: String,
    },
    /// The operation needs a stopped container.
    #[error(
        "cannot remove container \"/{name}\": container is running: stop the container before removing or force remove"
    )]
    Running {
        /// The container.
        name: String,
    },
    /// The network mode is not available (yet).
    #[error("network `{network}`: {reason}")]
    Network {
        /// The network asked for.
        network: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The detached container's supervisor failed to start it.
    #[error("{message}")]
    Supervisor {
        /// What the supervisor reported.
        message: String,
        /// The exit code it asked for.
        code: i32,
    },
    /// Signalling a process failed.
    #[error("cannot send {signal} to container {name}")]
    Signal {
        /// The signal.
        signal: String,
        /// The container.
        name: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// The exit code `docker run` uses for this failure: 127 when the command was
    /// not found, 126 when it could not be invoked, 125 for the runtime's own errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Sandbox(kiln_executor::Error::Exec { source, .. }) => {
                match source.raw_os_error() {
                    Some(nix::libc::ENOENT) => 127,
                    _ => 126,
                }
            }
            Self::Supervisor { code, .. } => *code,
            _ => 125,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
