//! The per-container supervisor of a detached container: the kiln binary
//! re-executed as `kiln __kiln-supervise ROOT ID`, in its own session so that it
//! outlives the kiln that started it. It starts the sandbox, writes the payload's
//! output to `<id>-json.log` (one JSON object per line, as docker's json-file
//! driver), records the exit status, applies the restart policy and, with `--rm`,
//! removes the container at the end. It tells the starting kiln on its stdout
//! (`ok`, or `error CODE MESSAGE`) whether the payload started, then lets go of it.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_cache::{Store, format_rfc3339};
use kiln_executor::{Io, Sandbox, Stdio};

use crate::container::{Detached, LogEntry, finish_payload, mark_exited, start_payload};
use crate::error::{Error, Result};

/// argv\[1\] that turns the kiln binary into a container supervisor.
pub const SUPERVISOR_ARG: &str = "__kiln-supervise";

/// Call first thing in `main` (after the sandbox helper's hook): when argv\[1\] is
/// [`SUPERVISOR_ARG`] this runs the supervisor and exits.
pub fn supervisor_main_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(SUPERVISOR_ARG)) {
        return;
    }
    let (Some(root), Some(id)) = (args.next(), args.next()) else {
        std::process::exit(2);
    };
    std::process::exit(supervise(Path::new(&root), &id.to_string_lossy()));
}

/// The one message to the starting kiln; afterwards stdout is `/dev/null`.
fn tell_parent(told: &mut bool, line: &str) {
    if *told {
        return;
    }
    *told = true;
    let mut out = std::io::stdout();
    let _sent = out
        .write_all(format!("{}\n", line.replace('\n', " ")).as_bytes())
        .and_then(|()| out.flush());
    if let Ok(null) = fs_err::OpenOptions::new().write(true).open("/dev/null") {
        let _replaced = nix::unistd::dup2_stdout(null.file());
    }
}

fn supervise(root: &Path, id: &str) -> i32 {
    // Leave kiln's session and process group: Ctrl-C or a closed terminal must not
    // reach the container.
    let _session = nix::unistd::setsid();
    let mut told = false;
    let store = match Store::open(root) {
        Ok(s) => s,
        Err(e) => {
            tell_parent(&mut told, &format!("error 125 {e:#}"));
            return 1;
        }
    };
    let mut d = match Detached::load(&store, id) {
        Ok(d) => d,
        Err(e) => {
            tell_parent(&mut told, &format!("error 125 {e:#}"));
            return 1;
        }
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let code = match run_once(&mut d, &mut told) {
            Ok(code) => code,
            Err(e) => {
                tell_parent(&mut told, &format!("error {} {e:#}", e.exit_code()));
                break;
            }
        };
        match store.container(id) {
            Ok(rec) => d.info.record = rec,
            Err(_) => return 0,
        }
        let policy = d.info.config.restart;
        if d.stopped_by_user() || !policy.restarts_after(code, d.info.record.restarts) {
            break;
        }
        d.info.record.restarts += 1;
        d.info.record.state = "restarting".to_owned();
        d.info.record.supervisor = Some(std::process::id());
        if store.update_container(&d.info.record).is_err() {
            break;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(10));
        if d.stopped_by_user() {
            d.info.record.state = "exited".to_owned();
            d.info.record.supervisor = None;
            let _recorded = store.update_container(&d.info.record);
            break;
        }
    }
    if d.info.config.auto_remove {
        let _removed = d.remove();
    }
    0
}

/// Appends docker json-file lines; shared by the stdout and stderr copiers.
#[derive(Clone)]
pub(crate) struct LogFile(Arc<Mutex<fs_err::File>>);

impl LogFile {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        }
        let f = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("opening the log", path, e))?;
        Ok(Self(Arc::new(Mutex::new(f))))
    }

    /// Copies `from` line by line into the log as `stream` until EOF (or EIO).
    fn copy(
        self,
        from: impl Read + Send + 'static,
        stream: &'static str,
    ) -> std::thread::JoinHandle<()> {
        self.tee(from, stream, None)
    }

    fn append(&self, stream: &str, text: &[u8]) {
        let secs = crate::container::now_nanos().div_euclid(1_000_000_000);
        let entry = LogEntry {
            log: String::from_utf8_lossy(text).into_owned(),
            stream: stream.to_owned(),
            time: format_rfc3339(secs),
        };
        if let Ok(mut line) = serde_json::to_vec(&entry) {
            line.push(b'\n');
            let mut f = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _written = f.write_all(&line);
        }
    }

    /// Copies `from` into the log as `stream` (whole lines; the rest at EOF), and,
    /// with `echo`, each chunk at once to `echo` too (an attached `kiln run`).
    pub(crate) fn tee(
        self,
        mut from: impl Read + Send + 'static,
        stream: &'static str,
        mut echo: Option<Box<dyn Write + Send>>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let n = match from.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let data = chunk.get(..n).unwrap_or_default();
                if let Some(out) = echo.as_mut()
                    && out.write_all(data).and_then(|()| out.flush()).is_err()
                {
                    echo = None;
                }
                pending.extend_from_slice(data);
                while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    self.append(stream, &line);
                }
            }
            if !pending.is_empty() {
                self.append(stream, &pending);
            }
        })
    }
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone()
        .map_err(|e| Error::io("duplicating a descriptor for", "the container's stdio", e))
}

/// One start of the container, to its end; returns the exit code.
fn run_once(d: &mut Detached<'_>, told: &mut bool) -> Result<i32> {
    let mut spec = d.spec()?;
    let log = LogFile::open(&d.log_path())?;
    let mut io = Io::default();
    let mut master = None;
    // With -i (and no -t) stdin is a pipe nobody writes to but that stays open, so
    // a shell waits instead of reading EOF (`kiln run -di busybox sh`).
    let mut _stdin_writer = None;
    if d.info.config.tty {
        let pty =
            kiln_executor::openpty(None).map_err(|e| Error::io("opening a pty", "/dev/ptmx", e))?;
        io.stdin = Some(dup(&pty.slave)?);
        io.stdout = Some(dup(&pty.slave)?);
        io.stderr = Some(pty.slave);
        spec.stdio = Stdio::Null;
        master = Some(pty.master);
    } else {
        spec.stdio = Stdio::Piped;
        if d.info.config.interactive {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::io("creating a pipe for", "stdin", e.into()))?;
            io.stdin = Some(r);
            _stdin_writer = Some(w);
        }
    }
    let mut running = match Sandbox::new().spawn_with_io(&spec, io) {
        Ok(r) => r,
        Err(e) => {
            let e = Error::from(e);
            mark_exited(d.store, &mut d.info.record, Err(&e))?;
            return Err(e);
        }
    };
    let mut copiers = Vec::new();
    if let Some(m) = master {
        copiers.push(log.clone().copy(std::fs::File::from(m), "stdout"));
    }
    if let Some(out) = running.take_stdout() {
        copiers.push(log.clone().copy(out, "stdout"));
    }
    if let Some(err) = running.take_stderr() {
        copiers.push(log.copy(err, "stderr"));
    }
    let finish = |copiers: Vec<std::thread::JoinHandle<()>>| {
        for c in copiers {
            let _copied = c.join();
        }
    };
    if let Err(e) = start_payload(d.store, &mut d.info, &mut running) {
        finish(copiers);
        return Err(e);
    }
    tell_parent(told, "ok");
    let code = finish_payload(d.store, &mut d.info, &mut running);
    finish(copiers);
    code
}
