//! The report channel from the helper and the sandbox's init back to the caller,
//! and the error value every setup step returns.

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::{Deserialize, Serialize};

use crate::user::UserError;

/// One message on the report pipe: a single JSON line, written with one `write`
/// (shorter than `PIPE_BUF`, so concurrent writers never interleave).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum Report {
    /// A setup step failed.
    SetupFailed { step: String, errno: i32 },
    /// `USER` did not resolve.
    UserFailed(UserFailure),
    /// `execve` of the payload failed.
    ExecFailed { program: String, errno: i32 },
    /// The payload exited.
    Exited { code: i32 },
    /// The payload was killed by a signal.
    Signaled { signal: i32 },
    /// The memory cgroup killed a process of the sandbox.
    OomKilled,
    /// The helper killed the sandbox because the caller cancelled it.
    Cancelled,
    /// Mount-point stubs created in the rootfs (see `crate::stubs`).
    Stubs(Vec<String>),
    /// The helper forked the sandbox's PID 1 (or the exec'd process): its pid in
    /// the helper's pid namespace.
    Started { pid: i32 },
    /// The sandbox's rootfs is set up; the payload is about to be executed.
    Ready,
    /// The helper's last report: the payload's status (or why it has none) is
    /// above. The helper still releases the sandbox's mount namespace (tearing
    /// down its overlay) and removes its cgroup after this; see
    /// [`crate::Running::wait_detached`].
    Done,
}

/// [`UserError`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum UserFailure {
    UnknownUser(String),
    UnknownGroup(String),
    OutOfRange(String, String),
}

impl From<&UserError> for UserFailure {
    fn from(err: &UserError) -> Self {
        match err {
            UserError::UnknownUser { name } => Self::UnknownUser(name.clone()),
            UserError::UnknownGroup { name } => Self::UnknownGroup(name.clone()),
            UserError::OutOfRange { what, value } => {
                Self::OutOfRange((*what).to_owned(), value.clone())
            }
        }
    }
}

impl From<UserFailure> for UserError {
    fn from(f: UserFailure) -> Self {
        match f {
            UserFailure::UnknownUser(name) => Self::UnknownUser { name },
            UserFailure::UnknownGroup(name) => Self::UnknownGroup { name },
            UserFailure::OutOfRange(what, value) => Self::OutOfRange {
                what: if what == "gid" { "gid" } else { "uid" },
                value,
            },
        }
    }
}

/// Writes one report; errors are ignored on purpose: a caller that went away
/// (EPIPE) has nobody left to tell.
pub(crate) fn send(fd: BorrowedFd<'_>, report: &Report) {
    let mut line = match serde_json::to_vec(report) {
        Ok(line) => line,
        Err(_) => return,
    };
    if line.len() > 4000 {
        // Keep every message under PIPE_BUF; only a step text can be that long.
        let short = match report {
            Report::SetupFailed { step, errno } => Report::SetupFailed {
                step: step.chars().take(1000).collect(),
                errno: *errno,
            },
            other => other.clone(),
        };
        line = serde_json::to_vec(&short).unwrap_or_default();
    }
    line.push(b'\n');
    let mut file = std::mem::ManuallyDrop::new(fd_file(fd.as_raw_fd()));
    let _ignored = file.write_all(&line);
}

fn fd_file(fd: i32) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: wrapped in ManuallyDrop by the only caller, so the descriptor is borrowed,
    // never closed here.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// A failed setup step: what was done (with paths) and the errno.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) report: Report,
}

impl Fail {
    pub(crate) fn step(step: impl Into<String>, errno: i32) -> Self {
        Self {
            report: Report::SetupFailed {
                step: step.into(),
                errno,
            },
        }
    }
}

/// Attaches a step description to an OS error.
pub(crate) trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, Fail>;
}

impl<T> Step<T> for nix::Result<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, Fail> {
        self.map_err(|errno| Fail::step(what(), errno as i32))
    }
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, Fail> {
        self.map_err(|err| {
            // fs_err wraps the OS error to add the path; the step text names the path
            // already, so keep only the errno when there is one.
            let inner = err
                .get_ref()
                .and_then(|e| e.source())
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error);
            match err.raw_os_error().or(inner) {
                Some(errno) => Fail::step(what(), errno),
                None => Fail::step(format!("{}: {err}", what()), libc::EIO),
            }
        })
    }
}
