//! The caller's side: start the helper, hand it the spec, read its reports.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::error::{Error, Result};
use crate::fail::Report;
use crate::helper::HELPER_ARG;
use crate::spec::{RootfsSpec, SandboxSpec, Stdio};

/// Starts sandboxes. Cheap to build; holds only the helper's path.
#[derive(Debug, Clone)]
pub struct Sandbox {
    helper: PathBuf,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// Uses the running binary (`/proc/self/exe`) as the helper: its `main` must call
    /// [`crate::helper_main_if_requested`] first.
    pub fn new() -> Self {
        Self {
            helper: PathBuf::from("/proc/self/exe"),
        }
    }

    /// Uses another binary as the helper (tests use the crate's `kiln-sandbox-run`).
    pub fn with_helper(mut self, path: impl Into<PathBuf>) -> Self {
        self.helper = path.into();
        self
    }

    /// The helper binary.
    pub fn helper(&self) -> &Path {
        &self.helper
    }

    /// Starts `spec`. Returns as soon as the helper runs; setup errors come back
    /// from [`Running::wait`]. Safe to call from any thread (it only forks to exec).
    pub fn spawn(&self, spec: &SandboxSpec) -> Result<Running> {
        // One socket carries the spec, the reports and the lifeline (see
        // `crate::helper`). Passing it as stdin (no `pre_exec` hook) lets std use
        // posix_spawn, which stays cheap from a large multi-threaded caller.
        spec.validate()?;
        let (ours, theirs) = UnixStream::pair().map_err(|source| Error::Pipe {
            what: "create",
            source,
        })?;
        let json = serde_json::to_vec(spec).map_err(Error::EncodeSpec)?;

        let mut cmd = Command::new(&self.helper);
        cmd.arg(HELPER_ARG)
            .stdin(std::process::Stdio::from(OwnedFd::from(theirs)));
        match spec.stdio {
            Stdio::Piped => {
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
            }
            Stdio::Inherit => {
                cmd.stdout(std::process::Stdio::inherit())
                    .stderr(std::process::Stdio::inherit());
            }
            Stdio::Null => {
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
        }
        let mut child = cmd.spawn().map_err(|source| Error::SpawnHelper {
            helper: self.helper.clone(),
            source,
        })?;
        drop(cmd);
        // A helper that died at once closes the socket: its report or exit says why.
        let len = u64::try_from(json.len()).unwrap_or(u64::MAX).to_le_bytes();
        let _written = (&ours)
            .write_all(&len)
            .and_then(|()| (&ours).write_all(&json));
        let stdout = child
            .stdout
            .take()
            .map(|s| std::fs::File::from(OwnedFd::from(s)));
        let stderr = child
            .stderr
            .take()
            .map(|s| std::fs::File::from(OwnedFd::from(s)));
        let overlay = match &spec.rootfs {
            RootfsSpec::Overlay { lowers, upper, .. } => Some((lowers.clone(), upper.clone())),
            RootfsSpec::Dir(_) => None,
        };
        Ok(Running {
            overlay,
            child,
            sock: Some(ours),
            stdout,
            stderr,
            status: None,
        })
    }

    /// Runs `spec` to completion, collecting stdout and stderr.
    pub fn output(&self, spec: &SandboxSpec) -> Result<Output> {
        self.spawn(spec)?.wait_with_output()
    }
}

/// How the payload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// The memory cgroup's OOM killer killed a process of the sandbox.
    OomKilled,
    /// The caller cancelled it (drop, [`Running::kill`], Ctrl-C).
    Cancelled,
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }

    /// The shell's view: the code, or 128 + the signal (137 for OOM and cancel).
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
            Self::OomKilled | Self::Cancelled => 137,
        }
    }
}

/// A finished sandbox's status and output.
#[derive(Debug, Clone)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

/// A started sandbox. Dropping it kills everything in it and cleans up.
#[derive(Debug)]
pub struct Running {
    /// (lowers, upper) of an overlay rootfs, for removing mount-point stubs.
    overlay: Option<(Vec<PathBuf>, PathBuf)>,
    child: Child,
    /// The socket to the helper: reports in; shut down for writing to cancel.
    sock: Option<UnixStream>,
    stdout: Option<std::fs::File>,
    stderr: Option<std::fs::File>,
    status: Option<ExitStatus>,
}

impl Running {
    /// The read end of the payload's stdout (with [`Stdio::Piped`]), once.
    pub fn take_stdout(&mut self) -> Option<std::fs::File> {
        self.stdout.take()
    }

    /// The read end of the payload's stderr (with [`Stdio::Piped`]), once.
    pub fn take_stderr(&mut self) -> Option<std::fs::File> {
        self.stderr.take()
    }

    /// The helper's pid (in the caller's pid namespace).
    pub fn helper_pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills everything in the sandbox; [`Running::wait`] then returns
    /// [`ExitStatus::Cancelled`] (unless the payload had already exited). The
    /// helper sends SIGKILL to the namespace's PID 1 from outside, which even a
    /// payload that is PID 1 without handlers (no [`SandboxSpec::init`]) cannot
    /// ignore; the kernel then kills the rest of the namespace.
    pub fn kill(&mut self) {
        // EOF on the socket is the cancel signal: the helper kills the sandbox's init
        // (and with it the whole pid namespace) and cleans up. The read side stays
        // open for the remaining reports.
        if let Some(sock) = &self.sock {
            let _done = sock.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Waits for the end. Streams not taken are drained (so a chatty payload does
    /// not block on a full pipe) and discarded.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let drains: Vec<_> = [self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
            .map(|mut f| std::thread::spawn(move || std::io::copy(&mut f, &mut std::io::sink())))
            .collect();
        let result = self.wait_inner();
        for d in drains {
            let _drained = d.join();
        }
        result
    }

    fn wait_inner(&mut self) -> Result<ExitStatus> {
        let mut reports = Vec::new();
        if let Some(sock) = self.sock.take() {
            for line in BufReader::new(sock).lines() {
                let line = line.map_err(|source| Error::Pipe {
                    what: "read",
                    source,
                })?;
                if let Ok(r) = serde_json::from_str::<Report>(&line) {
                    reports.push(r);
                }
            }
        }
        let helper_status = self.child.wait().map_err(Error::Wait)?;
        // The helper has exited, so init and its mount namespace are gone: the upper
        // is no longer mounted and the stubs can go.
        let stubs: Vec<String> = reports
            .iter()
            .filter_map(|r| {
                if let Report::Stubs(s) = r {
                    Some(s.clone())
                } else {
                    None
                }
            })
            .flatten()
            .collect();
        if let Some((lowers, upper)) = &self.overlay
            && !stubs.is_empty()
        {
            crate::stubs::remove_stubs(upper, lowers, &stubs);
        }
        let status = interpret(reports, &format!("{helper_status}"))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Waits, reading stdout and stderr to the end.
    pub fn wait_with_output(mut self) -> Result<Output> {
        let read = |f: Option<std::fs::File>| {
            f.map(|mut f| {
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _read = f.read_to_end(&mut buf);
                    buf
                })
            })
        };
        let (out, err) = (read(self.stdout.take()), read(self.stderr.take()));
        let status = self.wait_inner();
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        let (stdout, stderr) = (join(out), join(err));
        Ok(Output {
            status: status?,
            stdout,
            stderr,
        })
    }
}

fn interpret(reports: Vec<Report>, helper_status: &str) -> Result<ExitStatus> {
    let mut status = None;
    let mut oom = false;
    let mut cancelled = false;
    for r in reports {
        match r {
            Report::SetupFailed { step, errno } => {
                return Err(Error::Setup {
                    step,
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            Report::ExecFailed { program, errno } => {
                return Err(Error::Exec {
                    program,
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            Report::UserFailed(f) => return Err(Error::User(f.into())),
            Report::Exited { code } => status = Some(ExitStatus::Code(code)),
            Report::Signaled { signal } => status = Some(ExitStatus::Signal(signal)),
            Report::OomKilled => oom = true,
            Report::Cancelled => cancelled = true,
            Report::Stubs(_) => {}
        }
    }
    match status {
        Some(ExitStatus::Signal(9)) if oom => Ok(ExitStatus::OomKilled),
        Some(s) => Ok(s),
        None if oom => Ok(ExitStatus::OomKilled),
        None if cancelled => Ok(ExitStatus::Cancelled),
        None => Err(Error::HelperDied {
            status: helper_status.to_owned(),
        }),
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
            let _ended = self.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads_and_errors_suit_anyhow() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Sandbox>();
        send_sync::<Running>();
        send_sync::<Error>();
        send_sync::<SandboxSpec>();
    }

    #[test]
    fn reports_are_interpreted_first_error_wins_oom_beats_sigkill() {
        let exited = Report::Exited { code: 3 };
        assert_eq!(
            interpret(vec![exited.clone()], "").unwrap(),
            ExitStatus::Code(3)
        );
        let killed = Report::Signaled { signal: 9 };
        assert_eq!(
            interpret(vec![killed, Report::OomKilled], "").unwrap(),
            ExitStatus::OomKilled
        );
        assert_eq!(
            interpret(vec![Report::Cancelled], "").unwrap(),
            ExitStatus::Cancelled
        );
        assert_eq!(
            interpret(vec![Report::Signaled { signal: 15 }, Report::Cancelled], "").unwrap(),
            ExitStatus::Signal(15)
        );
        let setup = Report::SetupFailed {
            step: "mount x".into(),
            errno: libc::EPERM,
        };
        let exec = Report::ExecFailed {
            program: "p".into(),
            errno: libc::ENOENT,
        };
        assert!(matches!(
            interpret(vec![setup, exec, exited], ""),
            Err(Error::Setup { .. })
        ));
        assert!(
            matches!(interpret(vec![], "signal: 9"), Err(Error::HelperDied { status }) if status == "signal: 9")
        );
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
        assert_eq!(ExitStatus::OomKilled.shell_code(), 137);
    }
}
