//! The caller's side: start the helper, hand it the spec, read its reports.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::error::{Error, Result};
use crate::fail::Report;
use crate::helper::{EXEC_ARG, GATE_FD_ENV, HELPER_ARG, STDIN_FD_ENV};
use crate::spec::{ExecSpec, RootfsSpec, SandboxSpec, Stdio};

/// Descriptors for the payload's standard streams, overriding [`SandboxSpec::stdio`]
/// (and `/dev/null` on stdin) for those given: a pty's slave side for `-t`, the
/// caller's stdin for `-i`, a log pipe.
///
/// The stdin descriptor reaches the helper as an inheritable duplicate for the
/// moment of the spawn: another thread of the caller spawning a process at that
/// very moment would inherit it too.
#[derive(Debug, Default)]
pub struct Io {
    /// The payload's stdin.
    pub stdin: Option<OwnedFd>,
    /// The payload's stdout.
    pub stdout: Option<OwnedFd>,
    /// The payload's stderr.
    pub stderr: Option<OwnedFd>,
}

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
        self.spawn_with_io(spec, Io::default())
    }

    /// [`Sandbox::spawn`] with the payload's streams given as descriptors.
    pub fn spawn_with_io(&self, spec: &SandboxSpec, io: Io) -> Result<Running> {
        let (json, overlay) = handover(spec)?;
        self.start(HELPER_ARG, Some(&json), spec.stdio, io, overlay, spec.gated)
    }

    /// Starts a sandbox helper that waits for its spec, with the payload's
    /// streams as `stdio` says (no stdin, no gate): [`Sandbox::spawn_prepared`]
    /// hands it one. Exec'ing the helper and its start-up (milliseconds for a
    /// big binary such as kiln) then happen before the sandbox is wanted.
    /// Dropped unused, the helper reads the end of its socket and exits.
    pub fn prepare(&self, stdio: Stdio) -> Result<Prepared> {
        let running = self.start(HELPER_ARG, None, stdio, Io::default(), None, false)?;
        Ok(Prepared {
            running: Some(running),
            stdio,
        })
    }

    /// [`Sandbox::spawn`] by `prepared`. A spec it was not prepared for
    /// (other streams, a gate) is spawned anew (`prepared` exits).
    pub fn spawn_prepared(&self, mut prepared: Prepared, spec: &SandboxSpec) -> Result<Running> {
        let fits = spec.stdio == prepared.stdio && !spec.gated;
        let Some(running) = prepared.running.take().filter(|_| fits) else {
            return self.spawn(spec);
        };
        let (json, overlay) = handover(spec)?;
        Ok(running.hand(&json, overlay))
    }

    /// Starts `spec.process` inside the running sandbox whose PID 1 is `spec.pid`
    /// (`docker exec`). [`Running::wait`] returns its status.
    pub fn exec(&self, spec: &ExecSpec, io: Io) -> Result<Running> {
        if spec.process.args.is_empty() {
            return Err(Error::InvalidSpec {
                reason: "the process has no arguments".to_owned(),
            });
        }
        let json = serde_json::to_vec(spec).map_err(Error::EncodeSpec)?;
        self.start(EXEC_ARG, Some(&json), Stdio::Inherit, io, None, false)
    }

    /// Starts the helper (`arg` says which) and, with `json`, hands it the
    /// spec.
    fn start(
        &self,
        arg: &str,
        json: Option<&[u8]>,
        stdio: Stdio,
        io: Io,
        overlay: Option<OverlayDirs>,
        gated: bool,
    ) -> Result<Running> {
        // One socket carries the spec, the reports and the lifeline (see
        // `crate::helper`). Passing it as stdin (no `pre_exec` hook) lets std use
        // posix_spawn, which stays cheap from a large multi-threaded caller.
        let (ours, theirs) = UnixStream::pair().map_err(|source| Error::Pipe {
            what: "create",
            source,
        })?;

        let mut cmd = Command::new(&self.helper);
        cmd.arg(arg)
            .stdin(std::process::Stdio::from(OwnedFd::from(theirs)));
        match stdio {
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
        let piped = matches!(stdio, Stdio::Piped);
        if let Some(out) = io.stdout {
            cmd.stdout(std::process::Stdio::from(out));
        }
        if let Some(err) = io.stderr {
            cmd.stderr(std::process::Stdio::from(err));
        }
        // An inheritable duplicate (F_DUPFD leaves close-on-exec clear), closed
        // again once the helper has it.
        let inheritable = match &io.stdin {
            Some(fd) => {
                let raw =
                    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD(10)).map_err(|e| {
                        Error::Pipe {
                            what: "pass stdin through",
                            source: e.into(),
                        }
                    })?;
                cmd.env(STDIN_FD_ENV, raw.to_string());
                // SAFETY: F_DUPFD just returned this descriptor, owned by nobody else.
                Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
            }
            None => {
                cmd.env_remove(STDIN_FD_ENV);
                None
            }
        };
        let pipe_err = |e: nix::Error| Error::Pipe {
            what: "create the gate",
            source: e.into(),
        };
        let (gate_r, gate_w) = if gated {
            // The read end inheritable (pipe without O_CLOEXEC), the write end ours.
            let (r, w) = nix::unistd::pipe().map_err(pipe_err)?;
            nix::fcntl::fcntl(
                &w,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(pipe_err)?;
            cmd.env(GATE_FD_ENV, std::os::fd::AsRawFd::as_raw_fd(&r).to_string());
            (Some(r), Some(w))
        } else {
            cmd.env_remove(GATE_FD_ENV);
            (None, None)
        };
        let spawned = cmd.spawn();
        drop(inheritable);
        drop(gate_r);
        drop(io.stdin);
        let mut child = spawned.map_err(|source| Error::SpawnHelper {
            helper: self.helper.clone(),
            source,
        })?;
        drop(cmd);
        let stdout = child
            .stdout
            .take()
            .filter(|_| piped)
            .map(|s| std::fs::File::from(OwnedFd::from(s)));
        let stderr = child
            .stderr
            .take()
            .filter(|_| piped)
            .map(|s| std::fs::File::from(OwnedFd::from(s)));
        let reader = ours.try_clone().ok().map(BufReader::new);
        let running = Running {
            overlay: None,
            pid: child.id(),
            child: Some(child),
            sock: Some(ours),
            reader,
            reports: Vec::new(),
            exec: arg == EXEC_ARG,
            gate: gate_w,
            stdout,
            stderr,
            status: None,
        };
        Ok(match json {
            Some(json) => running.hand(json, overlay),
            None => running,
        })
    }

    /// Runs `spec` to completion, collecting stdout and stderr.
    pub fn output(&self, spec: &SandboxSpec) -> Result<Output> {
        self.spawn(spec)?.wait_with_output()
    }
}

/// An overlay rootfs's lowers and upper.
type OverlayDirs = (Vec<PathBuf>, PathBuf);

/// What the helper of `spec` is handed (its JSON), and the rootfs's
/// (lowers, upper) if it is an overlay: once `spec` is checked, and no lower
/// is the upper of an overlay still being torn down.
fn handover(spec: &SandboxSpec) -> Result<(Vec<u8>, Option<OverlayDirs>)> {
    spec.validate()?;
    if let RootfsSpec::Overlay { lowers, .. } = &spec.rootfs {
        crate::detached::wait_detached_using(lowers);
    }
    let json = serde_json::to_vec(spec).map_err(Error::EncodeSpec)?;
    let overlay = match &spec.rootfs {
        RootfsSpec::Overlay { lowers, upper, .. } => Some((lowers.clone(), upper.clone())),
        RootfsSpec::Dir(_) => None,
    };
    Ok((json, overlay))
}

/// A sandbox helper waiting for its spec (see [`Sandbox::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    /// Dropped without a spec, the helper exits (it reads the end of its
    /// socket) and is reaped.
    running: Option<Running>,
    stdio: Stdio,
}

impl Prepared {
    /// The helper's pid (in the caller's pid namespace).
    pub fn helper_pid(&self) -> Option<u32> {
        self.running.as_ref().map(Running::helper_pid)
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
    overlay: Option<OverlayDirs>,
    /// The helper; `None` once handed to [`crate::detached`].
    child: Option<Child>,
    /// The socket to the helper: reports in; shut down for writing to cancel.
    sock: Option<UnixStream>,
    /// Reads the reports (a clone of `sock`); `None` once at EOF.
    reader: Option<BufReader<UnixStream>>,
    /// Reports read so far.
    reports: Vec<Report>,
    /// A [`Sandbox::exec`] (no `Ready` report comes).
    exec: bool,
    /// The write end of a gated sandbox's gate (see [`SandboxSpec::gated`]).
    gate: Option<OwnedFd>,
    stdout: Option<std::fs::File>,
    stderr: Option<std::fs::File>,
    status: Option<ExitStatus>,
    /// The helper's pid.
    pid: u32,
}

impl Running {
    /// Hands the helper its spec (`json`); `overlay`: the rootfs's (lowers,
    /// upper), if it is an overlay.
    fn hand(mut self, json: &[u8], overlay: Option<OverlayDirs>) -> Running {
        self.overlay = overlay;
        // A helper that died at once closes the socket: its report or exit
        // says why.
        if let Some(sock) = &self.sock {
            let len = u64::try_from(json.len()).unwrap_or(u64::MAX).to_le_bytes();
            let _written = (&*sock)
                .write_all(&len)
                .and_then(|()| (&*sock).write_all(json));
        }
        self
    }

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
        self.pid
    }

    /// Reads one report; `None` at EOF.
    fn next_report(&mut self) -> Result<Option<Report>> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(None);
        };
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).map_err(|source| Error::Pipe {
                what: "read",
                source,
            })?;
            if n == 0 {
                self.reader = None;
                return Ok(None);
            }
            if let Ok(r) = serde_json::from_str::<Report>(&line) {
                return Ok(Some(r));
            }
        }
    }

    /// Waits until the payload is about to be executed (its rootfs and namespaces
    /// are complete, so [`Sandbox::exec`] can join them) and returns the host pid of
    /// the sandbox's PID 1 (the payload itself without [`SandboxSpec::init`]): the
    /// process to signal for `docker stop`/`kill`. For a [`Sandbox::exec`] it returns
    /// the exec'd process's pid once forked. A sandbox that ends before that returns
    /// its setup error, or [`Error::NotStarted`].
    pub fn wait_ready(&mut self) -> Result<u32> {
        let mut pid = None;
        let mut ready = false;
        loop {
            for r in &self.reports {
                match r {
                    Report::Started { pid: p } => pid = u32::try_from(*p).ok(),
                    Report::Ready => ready = true,
                    _ => {}
                }
            }
            if let Some(p) = pid
                && (ready || self.is_exec())
            {
                return Ok(p);
            }
            match self.next_report()? {
                Some(r) => self.reports.push(r),
                None => {
                    let status = self.wait()?;
                    return Err(Error::NotStarted {
                        status: format!("{status:?}"),
                    });
                }
            }
        }
    }

    /// Lets the payload of a [`SandboxSpec::gated`] sandbox run (a no-op otherwise).
    pub fn release(&mut self) {
        if let Some(gate) = self.gate.take() {
            let _sent = nix::unistd::write(&gate, b"g");
        }
    }

    fn is_exec(&self) -> bool {
        self.exec
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
        let drains = self.drain_untaken();
        let result = self.wait_inner();
        for d in drains {
            let _drained = d.join();
        }
        result
    }

    /// Threads that read the streams not taken to the end (so a chatty payload
    /// does not block on a full pipe), discarding what they read.
    fn drain_untaken(&mut self) -> Vec<std::thread::JoinHandle<std::io::Result<u64>>> {
        [self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
            .map(|mut f| std::thread::spawn(move || std::io::copy(&mut f, &mut std::io::sink())))
            .collect()
    }

    /// [`Running::wait`], except that it returns as soon as the helper has sent
    /// its last report, before the sandbox's mount namespace is released and its
    /// cgroup removed. Releasing the namespace unmounts the rootfs, which for an
    /// overlay of many files takes milliseconds; the helper does it on its own
    /// and is reaped later (see [`crate::wait_detached_using`] and
    /// [`crate::wait_detached`]). The upper directory may still be that
    /// overlay's upper meanwhile, but no process is left to use it.
    pub fn wait_detached(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let drains = self.drain_untaken();
        let read = self.read_reports(true);
        for d in drains {
            let _drained = d.join();
        }
        if !read? {
            // A helper that ended without `Done` (it died): wait as usual.
            return self.wait_inner();
        }
        self.sock = None;
        self.reader = None;
        let reports = std::mem::take(&mut self.reports);
        self.remove_stubs(&reports);
        if let Some(child) = self.child.take() {
            crate::detached::hand_over(child, self.overlay.as_ref().map(|(_, u)| u.as_path()));
        }
        let status = interpret(reports, "running")?;
        self.status = Some(status);
        Ok(status)
    }

    /// Reads the reports up to EOF (or up to [`Report::Done`] with
    /// `until_done`); true if `Done` stopped it.
    fn read_reports(&mut self, until_done: bool) -> Result<bool> {
        while let Some(r) = self.next_report()? {
            if until_done && r == Report::Done {
                return Ok(true);
            }
            self.reports.push(r);
        }
        Ok(false)
    }

    fn wait_inner(&mut self) -> Result<ExitStatus> {
        self.read_reports(false)?;
        self.sock = None;
        let reports = std::mem::take(&mut self.reports);
        let helper_status = match self.child.take() {
            Some(mut child) => child.wait().map_err(Error::Wait)?.to_string(),
            None => "reaped".to_owned(),
        };
        // The helper has exited, so init and its mount namespace are gone: the upper
        // is no longer mounted and the stubs can go.
        self.remove_stubs(&reports);
        let status = interpret(reports, &helper_status)?;
        self.status = Some(status);
        Ok(status)
    }

    /// Removes the mount-point stubs the sandbox created in the upper.
    fn remove_stubs(&self, reports: &[Report]) {
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
            Report::Stubs(_) | Report::Started { .. } | Report::Ready | Report::Done => {}
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
