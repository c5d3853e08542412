//! RUN: the command in the executor's sandbox over an overlay of the parent
//! chain, output streamed as log events, the upper committed as a layer.

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_executor::{Mount, MountKind, Network, ProcessSpec, RootfsSpec, SandboxSpec, User};
use kiln_parser::MountType;
use sha2::Digest as _;

use super::{Chain, DefaultNetwork, MergedMount, RunnerError, SecretSource, StoreRunner};
use crate::event::{LogStream, Progress};
use crate::graph::{InputRef, RunOp};
use crate::solve::Step;

/// Lines of output kept for a failure message.
const TAIL_LINES: usize = 10;

/// A RUN whose command failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "line {line}: `{command}` did not complete successfully: exit code {code}{}",
    tail_text(tail)
)]
pub struct RunFailure {
    /// The Dockerfile line.
    pub line: usize,
    /// The command as written in the history.
    pub command: String,
    /// The exit code (128 + signal when killed).
    pub code: i32,
    /// The last lines of output.
    pub tail: Vec<String>,
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    let mut s = String::from("\noutput (last lines):");
    for l in tail {
        s.push_str("\n  ");
        s.push_str(l);
    }
    s
}

/// Kills a running sandbox when the step's future is dropped (Ctrl-C).
#[derive(Debug, Clone, Default)]
pub(super) struct CancelHandle {
    cancelled: Arc<AtomicBool>,
}

/// Held by the async side; dropping it before [`CancelGuard::disarm`]
/// cancels the step.
#[derive(Debug)]
pub(super) struct CancelGuard {
    handle: CancelHandle,
    armed: bool,
}

impl CancelHandle {
    pub(super) fn guard(&self) -> CancelGuard {
        CancelGuard {
            handle: self.clone(),
            armed: true,
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

impl CancelGuard {
    pub(super) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            // The blocking side polls this and kills its sandbox through
            // the executor (which then cleans up after itself).
            self.handle.cancelled.store(true, Ordering::SeqCst);
        }
    }
}

/// The argv of a RUN, with heredocs handled as BuildKit does: a lone
/// heredoc that starts with `#!` is written to a file and run; otherwise
/// the bodies are appended to the shell command so the shell reads them.
fn run_argv(
    r: &RunOp,
    scratch: &std::path::Path,
) -> Result<(Vec<String>, Vec<Mount>), RunnerError> {
    let mut args = r.args.clone();
    let mut mounts = Vec::new();
    if r.heredocs.is_empty() || !r.shell_form {
        return Ok((args, mounts));
    }
    let cmd = args.last().cloned().unwrap_or_default();
    if let [h] = r.heredocs.as_slice() {
        let content = h.chomped_content();
        let bare = cmd.trim().trim_start_matches("<<").trim_start_matches('-');
        let bare = bare.trim_matches(|c| c == '"' || c == '\'');
        if content.starts_with("#!") && bare == h.name {
            let file = scratch.join("heredoc");
            fs_err::write(&file, content.as_bytes()).map_err(|source| RunnerError::Scratch {
                path: file.clone(),
                source,
            })?;
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| RunnerError::Scratch {
                    path: file.clone(),
                    source,
                },
            )?;
            let target = format!("/dev/pipes/{}", h.name);
            mounts.push(Mount {
                target: target.clone(),
                kind: MountKind::Bind {
                    source: file,
                    readonly: true,
                },
            });
            return Ok((vec![target], mounts));
        }
        if bare == h.name {
            // `RUN <<EOF` alone: the body is the script.
            if let Some(last) = args.last_mut() {
                *last = content;
            }
            return Ok((args, mounts));
        }
    }
    let mut full = cmd;
    for h in &r.heredocs {
        full.push('\n');
        full.push_str(&h.content);
        if !h.content.ends_with('\n') && !h.content.is_empty() {
            full.push('\n');
        }
        full.push_str(&h.name);
    }
    if let Some(last) = args.last_mut() {
        *last = full;
    }
    Ok((args, mounts))
}

impl StoreRunner {
    pub(super) fn run_exec(
        &self,
        step: &Step,
        r: &RunOp,
        inputs: &[Chain],
        progress: &Progress,
        cancel: &CancelHandle,
    ) -> Result<Chain, RunnerError> {
        kiln_cache::timing::mark("run: start");
        let line = self.line_of(step.id);
        let name = step.vertex.name.clone();
        let parent = self.parent_chain(step, inputs);
        // The parent's top layer may still be being committed: then its
        // upper is mounted, and the gate held until the command is done.
        let super::pending::Lowers { dirs: lowers, gate } = parent.lowers(|c| self.snapshots(c))?;
        let dir = self.scratch("run-")?;
        let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
        for d in [&upper, &work] {
            fs_err::create_dir(d).map_err(|source| RunnerError::Scratch {
                path: d.clone(),
                source,
            })?;
        }
        let (args, mut mounts) = run_argv(r, dir.path())?;
        let mut env: Vec<String> = r
            .env
            .iter()
            .chain(&r.proxy_env)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !r.env.iter().any(|(k, _)| k == "PATH") {
            env.push(kiln_executor::DEFAULT_PATH_ENV.to_owned());
        }
        // Stage binds stay mounted until the command is done.
        let mut held: Vec<MergedMount> = Vec::new();
        let mut secret_files: Vec<tempfile::NamedTempFile> = Vec::new();
        let mut cache_locks: Vec<fs_err::File> = Vec::new();
        let mut agents: Vec<super::ssh::AgentRelay> = Vec::new();
        let mut ssh_mounts = 0;
        for (i, m) in r.mounts.iter().enumerate() {
            match m.kind {
                MountType::Cache => {
                    let id = m.id.clone().unwrap_or_else(|| m.target.clone());
                    let base = self
                        .store
                        .root()
                        .join("cache-mounts")
                        .join(hex(&sha2::Sha256::digest(id.as_bytes())));
                    let waiting = || {
                        progress.send(crate::event::Event::Log {
                            id: step.id.index(),
                            stream: LogStream::Stderr,
                            line: format!(
                                "waiting for cache mount `{id}` (sharing=locked), in use by another step"
                            ),
                        });
                    };
                    let (source, lock) = cache_dir(&base, m, cancel, &waiting)?;
                    if cancel.is_cancelled() {
                        return Err(RunnerError::Cancelled { step: name });
                    }
                    cache_locks.extend(lock);
                    mounts.push(Mount {
                        target: m.target.clone(),
                        kind: MountKind::Cache { source },
                    });
                }
                MountType::Tmpfs => mounts.push(Mount {
                    target: m.target.clone(),
                    kind: MountKind::Tmpfs {
                        size: m.size.as_deref().and_then(|s| s.parse().ok()),
                    },
                }),
                MountType::Secret => {
                    let id = m.id.clone().unwrap_or_else(|| {
                        m.target.rsplit('/').next().unwrap_or_default().to_owned()
                    });
                    let Some(src) = self.opts.secrets.get(&id) else {
                        if m.required == Some(true) {
                            return Err(RunnerError::SecretMissing { id, line });
                        }
                        continue;
                    };
                    let source = match src {
                        SecretSource::File(p) => p.clone(),
                        SecretSource::Env(var) => {
                            let value = std::env::var_os(var).unwrap_or_default();
                            let mut f = tempfile::Builder::new()
                                .prefix("secret-")
                                .tempfile_in(dir.path())
                                .map_err(|source| RunnerError::SecretRead {
                                    id: id.clone(),
                                    source,
                                })?;
                            use std::io::Write as _;
                            use std::os::unix::ffi::OsStrExt as _;
                            f.write_all(value.as_bytes()).map_err(|source| {
                                RunnerError::SecretRead {
                                    id: id.clone(),
                                    source,
                                }
                            })?;
                            let p = f.path().to_owned();
                            secret_files.push(f);
                            p
                        }
                    };
                    if m.env.is_some() && m.target.is_empty() {
                        // `env=` secrets as variables: read the value now.
                        let value = fs_err::read_to_string(&source).map_err(|source| {
                            RunnerError::SecretRead {
                                id: id.clone(),
                                source,
                            }
                        })?;
                        if let Some(var) = &m.env {
                            env.push(format!("{var}={}", value.trim_end_matches('\n')));
                        }
                        continue;
                    }
                    let target = if m.target.is_empty() {
                        format!("/run/secrets/{id}")
                    } else {
                        m.target.clone()
                    };
                    mounts.push(Mount {
                        target,
                        kind: MountKind::Secret { source },
                    });
                }
                MountType::Bind => {
                    let sub = m.source.clone().unwrap_or_else(|| "/".to_owned());
                    let root = match &m.from {
                        None | Some(InputRef::Context) => self.opts.context.clone(),
                        Some(other) => {
                            let chain = self.input_chain(step, inputs, other)?;
                            let lowers = self.snapshots(&chain)?;
                            let mdir = dir.path().join(format!("bind-{i}"));
                            let mm = MergedMount::mount(&lowers, &mdir).map_err(|source| {
                                RunnerError::Mount {
                                    step: name.clone(),
                                    source,
                                }
                            })?;
                            let p = mm.path().to_owned();
                            held.push(mm);
                            p
                        }
                    };
                    let mut source =
                        crate::fileop::resolve_in_root(&root, &sub, true).map_err(|source| {
                            RunnerError::FileOp {
                                line: format!("line {line}"),
                                step: name.clone(),
                                source,
                            }
                        })?;
                    // `rw`: writes are allowed and thrown away. A stage's
                    // merged view already writes to a scratch upper; the
                    // context gets an overlay (a directory) or a copy (a
                    // file) in the step's scratch directory. A context
                    // directory is shown without its ignored entries.
                    let writable = m.readonly == Some(false);
                    let from_context = m.from.as_ref().is_none_or(|f| *f == InputRef::Context);
                    let mut view: Option<Vec<PathBuf>> = None;
                    if from_context && source.is_dir() {
                        if let Some(ignore) = &self.opts.ignore {
                            let rel = source
                                .strip_prefix(&root)
                                .map(|r| r.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            let rel = if rel.is_empty() { ".".to_owned() } else { rel };
                            let layer = dir.path().join(format!("bind-hide-{i}"));
                            if super::hide::whiteout_layer(&source, &rel, ignore, &layer)? > 0 {
                                view = Some(vec![source.clone(), layer]);
                            }
                        }
                        if view.is_none() && writable {
                            view = Some(vec![source.clone()]);
                        }
                    }
                    if let Some(lowers) = view {
                        let wdir = dir.path().join(format!("bind-rw-{i}"));
                        let mm = MergedMount::mount(&lowers, &wdir).map_err(|source| {
                            RunnerError::Mount {
                                step: name.clone(),
                                source,
                            }
                        })?;
                        source = mm.path().to_owned();
                        held.push(mm);
                    } else if writable && from_context {
                        let wdir = dir.path().join(format!("bind-rw-{i}"));
                        source = {
                            let scratch_err =
                                |path: PathBuf| move |source| RunnerError::Scratch { path, source };
                            fs_err::create_dir(&wdir).map_err(scratch_err(wdir.clone()))?;
                            let copy = wdir.join("file");
                            fs_err::copy(&source, &copy).map_err(scratch_err(copy.clone()))?;
                            copy
                        };
                    }
                    mounts.push(Mount {
                        target: m.target.clone(),
                        kind: MountKind::Bind {
                            source,
                            readonly: !writable,
                        },
                    });
                }
                MountType::Ssh => {
                    // As BuildKit: `default` unless named; the n-th ssh mount
                    // of the RUN at `/run/buildkit/ssh_agent.<n>` unless
                    // placed; SSH_AUTH_SOCK names the first, unless set.
                    let id = m.id.clone().unwrap_or_else(|| "default".to_owned());
                    let target = if m.target.is_empty() {
                        format!("/run/buildkit/ssh_agent.{ssh_mounts}")
                    } else {
                        m.target.clone()
                    };
                    ssh_mounts += 1;
                    if !env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
                        env.push(format!("SSH_AUTH_SOCK={target}"));
                    }
                    let Some(agent) = self.opts.ssh.get(&id) else {
                        if m.required == Some(true) {
                            return Err(RunnerError::SshMissing { id, line });
                        }
                        continue;
                    };
                    let path = dir.path().join(format!("ssh-{i}.sock"));
                    let relay = super::ssh::AgentRelay::start(
                        &path,
                        agent,
                        m.uid().unwrap_or(0),
                        m.gid().unwrap_or(0),
                        m.mode().unwrap_or(0o600),
                    )
                    .map_err(|source| RunnerError::SshRelay {
                        id: id.clone(),
                        path: path.clone(),
                        source,
                    })?;
                    mounts.push(Mount {
                        target,
                        kind: MountKind::Bind {
                            source: relay.path().to_owned(),
                            readonly: false,
                        },
                    });
                    agents.push(relay);
                }
            }
        }
        let mut process = ProcessSpec::new(args);
        process.env = env;
        process.cwd = if r.workdir.is_empty() {
            "/".to_owned()
        } else {
            r.workdir.clone()
        };
        if !r.user.is_empty() {
            process.user = User::Spec(r.user.clone());
        }
        let mut spec = SandboxSpec::new(
            RootfsSpec::Overlay {
                lowers: lowers.iter().rev().cloned().collect(),
                upper: upper.clone(),
                work,
            },
            process,
        );
        spec.mounts = mounts;
        spec.extra_hosts.clone_from(&r.extra_hosts);
        spec.network = match r.network {
            Some(kiln_parser::Network::Host) => Network::Host,
            Some(kiln_parser::Network::None) => Network::None,
            Some(kiln_parser::Network::Default) | None => match self.opts.network {
                DefaultNetwork::Host => Network::Host,
                DefaultNetwork::None => Network::None,
            },
        };
        if cancel.is_cancelled() {
            return Err(RunnerError::Cancelled { step: name });
        }
        kiln_cache::timing::mark("run: prepared");
        let spawned = match self.take_helper() {
            Some(helper) => self.sandbox.spawn_prepared(helper, &spec),
            None => self.sandbox.spawn(&spec),
        };
        if self.feeds_a_run(step) {
            self.prepare_helper();
        }
        let mut running = spawned.map_err(|source| RunnerError::Sandbox {
            step: name.clone(),
            source,
        })?;
        kiln_cache::timing::mark("run: spawned");
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let readers: Vec<_> = [
            (running.take_stdout(), LogStream::Stdout),
            (running.take_stderr(), LogStream::Stderr),
        ]
        .into_iter()
        .filter_map(|(f, s)| f.map(|f| (f, s)))
        .map(|(mut f, stream)| {
            let progress = progress.clone();
            let tail = Arc::clone(&tail);
            let id = step.id.index();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let _done = ReaderDone(done);
                let mut splitter = crate::event::LineSplitter::default();
                let mut buf = vec![0u8; 32 * 1024];
                let emit = |lines: Vec<String>| {
                    for l in lines {
                        if let Ok(mut t) = tail.lock() {
                            if t.len() == TAIL_LINES {
                                t.pop_front();
                            }
                            t.push_back(l.clone());
                        }
                        progress.send(crate::event::Event::Log {
                            id,
                            stream,
                            line: l,
                        });
                    }
                };
                loop {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => emit(splitter.push(&buf[..n])),
                    }
                }
                emit(splitter.finish().into_iter().collect());
            })
        })
        .collect();
        // Wait for the output to end, killing the sandbox when the build
        // is cancelled (Ctrl-C drops the step's future).
        drop(done_tx);
        let mut killed = false;
        loop {
            match done_rx.recv_timeout(std::time::Duration::from_millis(20)) {
                // A reader ended; the channel disconnects when all have.
                Ok(()) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if !killed && cancel.is_cancelled() {
                running.kill();
                killed = true;
            }
        }
        for r in readers {
            let _ = r.join();
        }
        // The status comes before the sandbox's overlay is unmounted: its helper
        // does that meanwhile, and whatever mounts this upper next waits for it.
        let status = running
            .wait_detached()
            .map_err(|source| RunnerError::Sandbox {
                step: name.clone(),
                source,
            })?;
        kiln_cache::timing::mark("run: exited");
        drop(gate);
        drop(held);
        drop(secret_files);
        drop(cache_locks);
        drop(agents);
        if cancel.is_cancelled() || status == kiln_executor::ExitStatus::Cancelled {
            return Err(RunnerError::Cancelled { step: name });
        }
        if !status.success() {
            let tail = tail
                .lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            return Err(Box::new(RunFailure {
                line,
                command: step
                    .vertex
                    .name
                    .split_once("] ")
                    .map_or_else(|| r.args.join(" "), |(_, i)| i.to_owned()),
                code: status.shell_code(),
                tail,
            })
            .into());
        }
        // (Secret and cache mount targets may leave empty stubs: the
        // executor removed those from the upper.)
        // (At most one layer of a chain is pending: the parent's is waited
        // for here, usually done while the command ran.)
        let parent = parent.settled()?;
        if self.commit_beside(step) {
            // The RUNs after this one start on its upper while its layer
            // is hashed.
            let pending = super::pending::Pending::new(step.vertex.name.clone(), upper.clone());
            let commit = move |this: &StoreRunner,
                               step: &Step,
                               parent: &Chain,
                               p: Option<&super::pending::Pending>| {
                this.commit_gated(step, parent, &upper, None, p, None, None)
            };
            let chain = self.commit_later(step, &parent, pending, commit, move || drop(dir));
            kiln_cache::timing::mark("run: layer committed beside");
            return Ok(chain);
        }
        let chain = self.commit(step, &parent, &upper);
        // The scratch directory (the overlay's work directory, an empty
        // upper) goes off the critical path: removing each directory
        // waits for its blocks' discard, on a file system mounted with
        // `discard`.
        self.later(move || drop(dir));
        chain
    }
}

/// The directory a cache mount uses, and the lock held while the RUN
/// runs. `base` is the directory of the cache id; `uid=`, `gid=` and
/// `mode=` apply when a directory is created. `sharing=`:
/// * `shared` (the default): `base`, no lock;
/// * `locked`: `base`, waiting for other users (builds too) to finish;
/// * `private`: `base` if no one else uses it, else the first unused of
///   `base-1`, `base-2`, ... (created when all are in use).
fn cache_dir(
    base: &std::path::Path,
    m: &crate::graph::MountSpec,
    cancel: &CancelHandle,
    waiting: &dyn Fn(),
) -> Result<(PathBuf, Option<fs_err::File>), RunnerError> {
    use kiln_parser::Sharing;
    let scratch_err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |e| RunnerError::Scratch { path, source: e }
    };
    let ensure = |dir: &std::path::Path| -> Result<(), RunnerError> {
        let parent = dir.parent().unwrap_or(dir);
        fs_err::create_dir_all(parent).map_err(scratch_err(parent))?;
        // mkdir is atomic: whoever makes it sets owner and mode; the
        // others use it as it is (never replaced under a running step).
        match fs_err::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => {
                return Err(RunnerError::Scratch {
                    path: dir.to_owned(),
                    source: e,
                });
            }
        }
        let (uid, gid) = (m.uid(), m.gid());
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(dir, uid, gid).map_err(scratch_err(dir))?;
        }
        let mode = m.mode().unwrap_or(0o755);
        use std::os::unix::fs::PermissionsExt as _;
        fs_err::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(scratch_err(dir))
    };
    let open_lock = |dir: &std::path::Path| -> Result<fs_err::File, RunnerError> {
        let lock_path = dir.with_extension("lock");
        fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(scratch_err(&lock_path))
    };
    match m.sharing {
        None | Some(Sharing::Shared) => {
            ensure(base)?;
            Ok((base.to_owned(), None))
        }
        Some(Sharing::Locked) => {
            ensure(base)?;
            let lock = open_lock(base)?;
            // Poll, so that a cancelled build does not wait for the lock.
            let mut said = false;
            loop {
                match lock.file().try_lock() {
                    Ok(()) => break,
                    Err(std::fs::TryLockError::WouldBlock) => {
                        if cancel.is_cancelled() {
                            return Ok((base.to_owned(), None));
                        }
                        if !said {
                            waiting();
                            said = true;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(RunnerError::Scratch {
                            path: base.with_extension("lock"),
                            source: e,
                        });
                    }
                }
            }
            Ok((base.to_owned(), Some(lock)))
        }
        Some(Sharing::Private) => {
            let mut n = 0usize;
            loop {
                let dir = if n == 0 {
                    base.to_owned()
                } else {
                    let mut s = base.as_os_str().to_owned();
                    s.push(format!("-{n}"));
                    PathBuf::from(s)
                };
                let lock = open_lock(&dir)?;
                match lock.file().try_lock() {
                    Ok(()) => {
                        ensure(&dir)?;
                        return Ok((dir, Some(lock)));
                    }
                    Err(std::fs::TryLockError::WouldBlock) => n += 1,
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(RunnerError::Scratch {
                            path: dir.with_extension("lock"),
                            source: e,
                        });
                    }
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Held by an output reader thread: its drop (when the thread ends, however
/// it ends) tells the waiting step.
struct ReaderDone(std::sync::mpsc::Sender<()>);

impl Drop for ReaderDone {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_op(cmd: &str, heredocs: Vec<kiln_parser::Heredoc>) -> RunOp {
        RunOp {
            args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            shell_form: true,
            heredocs,
            env: Vec::new(),
            proxy_env: Vec::new(),
            workdir: "/".into(),
            user: String::new(),
            network: None,
            security: None,
            mounts: Vec::new(),
            extra_hosts: Vec::new(),
        }
    }

    fn heredoc(name: &str, content: &str) -> kiln_parser::Heredoc {
        kiln_parser::Heredoc {
            name: name.into(),
            file_descriptor: 0,
            expand: true,
            chomp: false,
            content: content.into(),
        }
    }

    #[test]
    fn lone_heredoc_is_the_script() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = run_op("<<EOF", vec![heredoc("EOF", "echo hi\n")]);
        let (args, mounts) = run_argv(&r, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args, ["/bin/sh", "-c", "echo hi\n"]);
        assert!(mounts.is_empty());
    }

    #[test]
    fn shebang_heredoc_runs_as_a_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = run_op(
            "<<EOF",
            vec![heredoc("EOF", "#!/usr/bin/env python3\nprint(1)\n")],
        );
        let (args, mounts) = run_argv(&r, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args, ["/dev/pipes/EOF"]);
        assert_eq!(mounts.len(), 1);
        let written = fs_err::read_to_string(dir.path().join("heredoc")).unwrap_or_default();
        assert!(written.starts_with("#!/usr/bin/env python3"));
    }

    #[test]
    fn heredoc_as_input_is_appended_for_the_shell() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = run_op("cat <<EOF > /x", vec![heredoc("EOF", "a\nb\n")]);
        let (args, _) = run_argv(&r, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args[2], "cat <<EOF > /x\na\nb\nEOF");
    }

    #[test]
    fn failure_message_has_code_line_and_tail() {
        let f = RunFailure {
            line: 4,
            command: "RUN make".into(),
            code: 2,
            tail: vec!["make: *** [all] Error 2".into()],
        };
        let s = f.to_string();
        assert!(s.contains("line 4"), "{s}");
        assert!(s.contains("exit code 2"), "{s}");
        assert!(s.contains("Error 2"), "{s}");
    }
}
