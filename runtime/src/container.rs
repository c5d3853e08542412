//! Container lifecycle: create, run (foreground or detached), stop, kill, start,
//! remove, list, inspect, logs, exec.

use std::io::{BufRead, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_cache::{ContainerRecord, LeaseKind, Store, format_rfc3339};

use crate::network;
use kiln_executor::{
    ExecSpec, ExitStatus, Io, Mount, MountKind, Network, ProcessSpec, ResolvedUser, RootfsSpec,
    Running, Sandbox, SandboxSpec, Stdio, User,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::config::{ContainerConfig, MountSource, RunOptions};
use crate::error::{Error, Result};
use crate::tty::{Proxy, own_winsize};
use crate::volume;

/// `$KILN_ROOT/containers/<id>`: `upper/`, `work/`, the log and markers.
pub fn container_dir(store: &Store, id: &str) -> PathBuf {
    store.root().join("containers").join(id)
}

fn log_path(store: &Store, id: &str) -> PathBuf {
    container_dir(store, id).join(format!("{id}-json.log"))
}

/// Written by `stop` so a restart policy does not bring the container back.
pub(crate) fn stop_marker(store: &Store, id: &str) -> PathBuf {
    container_dir(store, id).join("stopped-by-user")
}

fn write_stop_marker(store: &Store, id: &str) -> Result<()> {
    let marker = stop_marker(store, id);
    if let Some(dir) = marker.parent() {
        fs_err::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    }
    fs_err::write(&marker, "").map_err(|e| Error::io("writing", &marker, e))
}

pub(crate) fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn new_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    fs_err::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading", "/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

const ADJECTIVES: &[&str] = &[
    "amber", "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid",
    "merry", "nimble", "proud", "quiet", "rapid", "sharp", "tender", "vivid", "witty", "zealous",
];
const NOUNS: &[&str] = &[
    "archimedes",
    "babbage",
    "curie",
    "dijkstra",
    "euler",
    "fermat",
    "gauss",
    "hopper",
    "hypatia",
    "kepler",
    "lovelace",
    "mirzakhani",
    "noether",
    "pascal",
    "ritchie",
    "shannon",
    "thompson",
    "turing",
    "wozniak",
    "yonath",
];

fn random_name(id: &str) -> String {
    let n = usize::from_str_radix(id.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    let a = ADJECTIVES
        .get(n % ADJECTIVES.len())
        .copied()
        .unwrap_or("kiln");
    let b = NOUNS
        .get(n / ADJECTIVES.len() % NOUNS.len())
        .copied()
        .unwrap_or("box");
    format!("{a}_{b}_{}", id.get(..4).unwrap_or(id))
}

fn validate_container_name(name: &str) -> Result<()> {
    let name = name.strip_prefix('/').unwrap_or(name);
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("container name `{name}`"),
            "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed",
        ))
    }
}

/// Parses `SIGTERM`, `TERM`, `term` or `15`.
pub(crate) fn parse_signal(s: &str) -> Result<Signal> {
    let bad = || Error::invalid(format!("signal `{s}`"), "not a known signal name or number");
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>().map_err(|_| bad())
}

/// Checks the network mode: `none` and `host` are built in; `bridge` (made
/// on first use) and networks made with `kiln network create` are bridges.
/// `-p` values are checked here too, before anything is created.
fn check_network(store_root: &Path, network: &str, publish: &[String]) -> Result<()> {
    let net_err = |reason: String| Error::Network {
        network: network.to_owned(),
        reason,
    };
    match network {
        "none" | "host" => {
            if publish.is_empty() {
                Ok(())
            } else {
                Err(net_err(format!(
                    "ports cannot be published on the `{network}` network"
                )))
            }
        }
        other => {
            for p in publish {
                p.parse::<network::PortSpec>()
                    .map_err(|e| net_err(format!("-p {p}: {e}")))?;
            }
            if other == network::DEFAULT_NETWORK {
                return Ok(());
            }
            network::inspect(store_root, other)
                .map(|_| ())
                .map_err(|e| net_err(e.to_string()))
        }
    }
}

fn sandbox_network(cfg: &ContainerConfig) -> Result<Network> {
    match cfg.network.as_str() {
        "none" => Ok(Network::None),
        "host" => Ok(Network::Host),
        // A bridge: a fresh network namespace, joined to the bridge by
        // [`attach_network`] before the payload runs.
        _ => Ok(Network::None),
    }
}

/// A container's record with its decoded configuration.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    /// The store's record.
    pub record: ContainerRecord,
    /// The configuration.
    pub config: ContainerConfig,
}

impl ContainerInfo {
    fn load(store: &Store, name_or_id: &str) -> Result<Self> {
        let record = refresh(store, store.container(name_or_id)?)?;
        Self::from_record(record)
    }

    fn from_record(record: ContainerRecord) -> Result<Self> {
        let config = serde_json::from_str(&record.config).map_err(|e| {
            Error::invalid(
                format!("stored configuration of container {}", record.name),
                e.to_string(),
            )
        })?;
        Ok(Self { record, config })
    }

    /// Whether it is running.
    pub fn running(&self) -> bool {
        self.record.state == "running"
    }

    /// Whether it is running or waiting to be restarted by its restart policy.
    pub fn active(&self) -> bool {
        is_active(&self.record.state)
    }
}

fn is_active(state: &str) -> bool {
    state == "running" || state == "restarting"
}

fn alive(pid: Option<u32>) -> bool {
    pid.and_then(|p| i32::try_from(p).ok())
        .is_some_and(|p| nix::sys::signal::kill(Pid::from_raw(p), None).is_ok())
}

/// A record that says `running` while its supervisor is gone (killed, machine
/// restarted) is marked exited.
fn refresh(store: &Store, mut rec: ContainerRecord) -> Result<ContainerRecord> {
    if is_active(&rec.state) && !alive(rec.supervisor) {
        rec.state = "exited".to_owned();
        rec.pid = None;
        rec.supervisor = None;
        rec.exit_code = Some(rec.exit_code.unwrap_or(137));
        rec.finished = Some(now_nanos());
        rec.error = Some("the process supervising the container died".to_owned());
        store.update_container(&rec)?;
    }
    Ok(rec)
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Detached: the container's id.
    Detached(String),
    /// Foreground: the container's exit code.
    Exited(i32),
}

/// `kiln run`: creates the container and starts it, detached (`-d`, returning its
/// id) or in the foreground (returning its exit code). With `--rm` nothing of it is
/// left afterwards.
pub fn run(store: &Store, opts: &RunOptions) -> Result<RunOutcome> {
    let info = create(store, opts)?;
    if opts.detach {
        let id = info.record.id.clone();
        if let Err(e) = start_detached(store, &info) {
            if info.config.auto_remove {
                let _cleanup = remove_files(store, &info, true);
            }
            return Err(e);
        }
        return Ok(RunOutcome::Detached(id));
    }
    run_foreground(store, info).map(RunOutcome::Exited)
}

fn create(store: &Store, opts: &RunOptions) -> Result<ContainerInfo> {
    check_network(store.root(), &opts.network, &opts.publish)?;
    if let Some(n) = &opts.name {
        validate_container_name(n)?;
    }
    let image = store.resolve(&opts.image)?;
    let mut lowers = Vec::with_capacity(image.layers.len());
    for l in image.layers.iter().rev() {
        lowers.push(store.snapshot_for(&l.diff_id)?);
    }
    let id = new_id()?;
    let mut config = ContainerConfig::new(&image, lowers, opts, &id)?;
    if opts.auto_remove {
        // A `--rm` container's writable layer is thrown away: keep it on tmpfs
        // (/dev/shm), as the sandbox keeps its own state. On a busy disk every
        // mkdir/rmdir of upper/work and of the mount-point stubs waits for the
        // journal (3-4 ms each), several times the whole start-up otherwise.
        config.scratch = Some(kiln_executor::state_root().join(format!("kiln-ctr-{id}")));
    }
    for m in &mut config.mounts {
        if let MountSource::Volume { name, anonymous } = &mut m.source
            && *anonymous
            && name.is_empty()
        {
            *name = new_id()?;
        }
    }
    let name = opts
        .name
        .clone()
        .map(|n| n.trim_start_matches('/').to_owned())
        .unwrap_or_else(|| random_name(&id));
    let mut leases = vec![(LeaseKind::Image, image.id.to_string())];
    leases.extend(config.layers.iter().map(|l| (LeaseKind::Layer, l.clone())));
    for m in &config.mounts {
        if let MountSource::Volume { name, .. } = &m.source {
            leases.push((LeaseKind::Volume, name.clone()));
        }
    }
    let json = serde_json::to_string(&config)
        .map_err(|e| Error::invalid("container configuration", e.to_string()))?;
    let record = ContainerRecord::created(
        id.clone(),
        name,
        image.id.to_string(),
        opts.image.clone(),
        json,
        now_nanos(),
    );
    let dir = config.layer_dir(&container_dir(store, &id));
    for sub in ["upper", "work"] {
        let p = dir.join(sub);
        fs_err::create_dir_all(&p).map_err(|e| Error::io("creating", &p, e))?;
    }
    if let Err(e) = store.create_container(&record, &leases) {
        let _cleanup = fs_err::remove_dir_all(&dir);
        return Err(e.into());
    }
    let info = ContainerInfo { record, config };
    let prepared = (|| -> Result<()> {
        for m in &info.config.mounts {
            match &m.source {
                MountSource::Volume { name, anonymous } => {
                    volume::create(store, name, *anonymous)?;
                    volume::fill_from_image(
                        &volume::data_dir(store, name),
                        &info.config.lowers,
                        &m.target,
                    )?;
                }
                MountSource::Bind(path) => {
                    if !path.exists() {
                        fs_err::create_dir_all(path)
                            .map_err(|e| Error::io("creating bind source", path, e))?;
                    }
                }
                MountSource::Tmpfs { .. } => {}
            }
        }
        Ok(())
    })();
    if let Err(e) = prepared {
        let _cleanup = remove_files(store, &info, true);
        return Err(e);
    }
    Ok(info)
}

/// The sandbox spec for one start of the container.
fn sandbox_spec(store: &Store, info: &ContainerInfo) -> Result<SandboxSpec> {
    let cfg = &info.config;
    let dir = cfg.layer_dir(&container_dir(store, &info.record.id));
    let work = dir.join("work");
    // A restarted container reuses its upper: overlayfs refuses a volatile upper
    // that was used before until this marker is gone (see SandboxSpec::volatile_upper).
    let marker = work.join("work/incompat/volatile");
    if marker.exists() {
        let _removed = fs_err::remove_dir_all(work.join("work/incompat"));
    }
    let mut lowers = cfg.lowers.clone();
    if lowers.iter().any(|l| !l.is_dir()) {
        lowers.clear();
        for l in cfg.layers.iter().rev() {
            lowers.push(store.snapshot_for(&l.parse()?)?);
        }
    }
    let mut process = ProcessSpec::new(cfg.args.clone());
    process.env = cfg.env.clone();
    process.cwd = cfg.cwd.clone();
    process.user = if cfg.user.is_empty() {
        User::Resolved(ResolvedUser::root())
    } else {
        User::Spec(cfg.user.clone())
    };
    let mut spec = SandboxSpec::new(
        RootfsSpec::Overlay {
            lowers,
            upper: dir.join("upper"),
            work,
        },
        process,
    );
    spec.hostname = cfg.hostname.clone();
    spec.network = sandbox_network(cfg)?;
    let hosts = if needs_gate(cfg) {
        // The network's hosts file, shared by its containers and rewritten
        // in place: a bind mount shows names that join later.
        Some(
            network::prepare(store.root(), &cfg.network).map_err(|e| Error::Network {
                network: cfg.network.clone(),
                reason: e.to_string(),
            })?,
        )
    } else {
        None
    };
    spec.limits = cfg.limits.clone();
    spec.readonly_rootfs = cfg.read_only;
    spec.tty = cfg.tty;
    spec.gated = needs_gate(cfg);
    spec.mounts = cfg
        .mounts
        .iter()
        .map(|m| Mount {
            target: m.target.clone(),
            kind: match &m.source {
                MountSource::Volume { name, .. } => MountKind::Bind {
                    source: volume::data_dir(store, name),
                    readonly: m.readonly,
                },
                MountSource::Bind(p) => MountKind::Bind {
                    source: p.clone(),
                    readonly: m.readonly,
                },
                MountSource::Tmpfs { size } => MountKind::Tmpfs { size: *size },
            },
        })
        .collect();
    if let Some(hosts) = hosts {
        spec.mounts.push(Mount {
            target: "/etc/hosts".to_owned(),
            kind: MountKind::Bind {
                source: hosts,
                readonly: true,
            },
        });
    }
    Ok(spec)
}

fn dup(fd: impl AsFd) -> Result<OwnedFd> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating a descriptor for", "stdio", e))
}

/// Records the start of a run.
pub(crate) fn mark_running(store: &Store, rec: &mut ContainerRecord, pid: u32) -> Result<()> {
    rec.state = "running".to_owned();
    rec.pid = Some(pid);
    rec.supervisor = Some(std::process::id());
    rec.started = Some(now_nanos());
    rec.exit_code = None;
    rec.oom_killed = false;
    rec.error = None;
    Ok(store.update_container(rec)?)
}

/// Records the end of a run: `status`, or the error that kept it from starting.
pub(crate) fn mark_exited(
    store: &Store,
    rec: &mut ContainerRecord,
    status: std::result::Result<ExitStatus, &Error>,
) -> Result<i32> {
    let code = match status {
        Ok(s) => s.shell_code(),
        Err(e) => e.exit_code(),
    };
    rec.state = "exited".to_owned();
    rec.pid = None;
    rec.supervisor = None;
    rec.exit_code = Some(code);
    rec.oom_killed = matches!(status, Ok(ExitStatus::OomKilled));
    rec.error = status.err().map(|e| format!("{e:#}"));
    rec.finished = Some(now_nanos());
    store.update_container(rec)?;
    Ok(code)
}

fn run_foreground(store: &Store, mut info: ContainerInfo) -> Result<i32> {
    let result = run_attached(store, &mut info);
    if info.config.auto_remove {
        remove_files(store, &info, true)?;
    }
    result
}

fn run_attached(store: &Store, info: &mut ContainerInfo) -> Result<i32> {
    let mut spec = sandbox_spec(store, info)?;
    // Output goes straight to kiln's stdout/stderr, and, for a container that is
    // kept, to its log as well (as docker's attached run); a `--rm` container's
    // log would go with it, so it is not written.
    let logged = !info.config.auto_remove && !info.config.tty;
    spec.stdio = if logged { Stdio::Piped } else { Stdio::Inherit };
    let (io, master) = stdio_for(&info.config)?;
    let started = Sandbox::new().spawn_with_io(&spec, io);
    let mut running = match started {
        Ok(r) => r,
        Err(e) => {
            let e = Error::from(e);
            mark_exited(store, &mut info.record, Err(&e))?;
            return Err(e);
        }
    };
    let proxy = match master {
        Some(m) => Some(
            Proxy::attach(m, info.config.interactive)
                .map_err(|e| Error::io("attaching to the terminal", "/dev/tty", e))?,
        ),
        None => None,
    };
    let mut copiers = Vec::new();
    if logged {
        let log = crate::supervisor::LogFile::open(&log_path(store, &info.record.id))?;
        if let Some(out) = running.take_stdout() {
            copiers.push(
                log.clone()
                    .tee(out, "stdout", Some(Box::new(std::io::stdout()))),
            );
        }
        if let Some(err) = running.take_stderr() {
            copiers.push(log.tee(err, "stderr", Some(Box::new(std::io::stderr()))));
        }
    }
    let finished = wait_running(store, info, &mut running);
    for c in copiers {
        let _copied = c.join();
    }
    if let Some(p) = proxy {
        p.finish();
    }
    finished
}

/// Waits for the payload to start (recording it running), then for its end
/// (recording it exited). Returns the exit code.
fn wait_running(store: &Store, info: &mut ContainerInfo, running: &mut Running) -> Result<i32> {
    start_payload(store, info, running)?;
    finish_payload(store, info, running)
}

/// Waits until the sandbox is set up, joins the container's network while the
/// payload is held (the sandbox is gated for a bridge network), lets the payload
/// run and records the container running.
pub(crate) fn start_payload(
    store: &Store,
    info: &mut ContainerInfo,
    running: &mut Running,
) -> Result<()> {
    let started = running
        .wait_ready()
        .map_err(Error::from)
        .and_then(|pid| attach_network(store, info, pid).map(|()| pid));
    match started {
        Ok(pid) => {
            running.release();
            mark_running(store, &mut info.record, pid)
        }
        Err(e) => {
            // Unreleased, the payload never runs: end the sandbox.
            running.kill();
            let _ended = running.wait();
            detach_network(store, info);
            mark_exited(store, &mut info.record, Err(&e))?;
            Err(e)
        }
    }
}

/// Waits for the payload's end, leaves the network, records the exit.
pub(crate) fn finish_payload(
    store: &Store,
    info: &mut ContainerInfo,
    running: &mut Running,
) -> Result<i32> {
    let status = running.wait();
    detach_network(store, info);
    match status {
        Ok(status) => mark_exited(store, &mut info.record, Ok(status)),
        Err(e) => {
            let e = Error::from(e);
            mark_exited(store, &mut info.record, Err(&e))?;
            Err(e)
        }
    }
}

/// Whether the container's sandbox must hold its payload for [`attach_network`].
fn needs_gate(cfg: &ContainerConfig) -> bool {
    !matches!(cfg.network.as_str(), "none" | "host")
}

/// Joins a bridge network: called with the host pid of the container's PID 1
/// after its namespaces and rootfs are complete and before its payload runs
/// (the sandbox is gated). Its name, its `--network-alias`es and its hostname
/// resolve on the network (the shared hosts file is bind-mounted).
fn attach_network(store: &Store, info: &ContainerInfo, pid: u32) -> Result<()> {
    let cfg = &info.config;
    if !needs_gate(cfg) {
        return Ok(());
    }
    let net_err = |reason: String| Error::Network {
        network: cfg.network.clone(),
        reason,
    };
    let publish = cfg
        .publish
        .iter()
        .map(|p| {
            p.parse::<network::PortSpec>()
                .map_err(|e| net_err(format!("-p {p}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut aliases = cfg.aliases.clone();
    if !cfg.hostname.is_empty()
        && cfg.hostname != info.record.name
        && !aliases.contains(&cfg.hostname)
        && !info.record.id.starts_with(&cfg.hostname)
    {
        aliases.push(cfg.hostname.clone());
    }
    let name = info.record.name.trim_start_matches('/');
    network::attach(
        store.root(),
        &cfg.network,
        &info.record.id,
        name,
        &aliases,
        pid,
        &publish,
    )
    .map(|_| ())
    .map_err(|e| net_err(e.to_string()))
}

/// Leaves the bridge network, best effort (idempotent).
fn detach_network(store: &Store, info: &ContainerInfo) {
    if needs_gate(&info.config) {
        let _ = network::detach(store.root(), &info.config.network, &info.record.id);
    }
}

/// The payload's streams for a foreground run: a pty with `-t` (returning its
/// master side), kiln's stdin with `-i`, else kiln's stdout/stderr.
fn stdio_for(cfg: &ContainerConfig) -> Result<(Io, Option<OwnedFd>)> {
    if cfg.tty {
        let pty = kiln_executor::openpty(own_winsize())
            .map_err(|e| Error::io("opening a pty", "/dev/ptmx", e))?;
        let io = Io {
            stdin: Some(dup(&pty.slave)?),
            stdout: Some(dup(&pty.slave)?),
            stderr: Some(pty.slave),
        };
        return Ok((io, Some(pty.master)));
    }
    let mut io = Io::default();
    if cfg.interactive {
        io.stdin = Some(dup(std::io::stdin())?);
    }
    Ok((io, None))
}

/// Starts the container's supervisor (detached from kiln) and waits until it says
/// the payload started, or why it did not.
fn start_detached(store: &Store, info: &ContainerInfo) -> Result<()> {
    let _fresh = fs_err::remove_file(stop_marker(store, &info.record.id));
    let out = std::process::Command::new("/proc/self/exe")
        .arg(crate::supervisor::SUPERVISOR_ARG)
        .arg(store.root())
        .arg(&info.record.id)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            let mut text = String::new();
            if let Some(mut o) = child.stdout.take() {
                o.read_to_string(&mut text)?;
            }
            // The supervisor closes its stdout once the payload runs and goes on;
            // it is reaped by init when kiln exits (it is in its own session).
            Ok(text)
        })
        .map_err(|e| Error::io("starting the container supervisor", "/proc/self/exe", e))?;
    let line = out.trim();
    if line == "ok" {
        return Ok(());
    }
    let (code, message) = line
        .strip_prefix("error ")
        .and_then(|rest| rest.split_once(' '))
        .map(|(c, m)| (c.parse().unwrap_or(125), m.to_owned()))
        .unwrap_or((125, format!("the container supervisor failed: {line:?}")));
    Err(Error::Supervisor { message, code })
}

/// `kiln start`: starts a stopped container, detached.
pub fn start(store: &Store, name_or_id: &str) -> Result<String> {
    let info = ContainerInfo::load(store, name_or_id)?;
    if !info.active() {
        start_detached(store, &info)?;
    }
    Ok(info.record.name)
}

fn signal_container(info: &ContainerInfo, signal: Signal) -> Result<()> {
    let pid = info
        .record
        .pid
        .and_then(|p| i32::try_from(p).ok())
        .filter(|_| info.running())
        .ok_or_else(|| Error::NotRunning {
            name: info.record.name.clone(),
        })?;
    match nix::sys::signal::kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(Error::Signal {
            signal: signal.to_string(),
            name: info.record.name.clone(),
            source,
        }),
    }
}

/// Waits until the container is no longer running (or gone); false on timeout.
fn wait_exit(store: &Store, id: &str, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        match store.container(id) {
            Ok(rec) => {
                if !is_active(&refresh(store, rec)?.state) {
                    return Ok(true);
                }
            }
            Err(kiln_cache::StoreError::NoSuch { .. }) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kiln stop`: the stop signal, then SIGKILL after `timeout` seconds (the
/// container's `--stop-timeout` by default). Its restart policy does not apply.
pub fn stop(store: &Store, name_or_id: &str, timeout: Option<u64>) -> Result<String> {
    let info = ContainerInfo::load(store, name_or_id)?;
    if !info.active() {
        return Ok(info.record.name);
    }
    write_stop_marker(store, &info.record.id)?;
    if !info.running() {
        // Restarting: the supervisor sees the marker and does not restart it.
        wait_exit(store, &info.record.id, Duration::from_secs(30))?;
        return Ok(info.record.name);
    }
    let signal = parse_signal(&info.config.stop_signal)?;
    signal_container(&info, signal)?;
    let timeout = timeout.unwrap_or(info.config.stop_timeout);
    if !wait_exit(store, &info.record.id, Duration::from_secs(timeout))? {
        let _gone = signal_container(&info, Signal::SIGKILL);
        wait_exit(store, &info.record.id, Duration::from_secs(30))?;
    }
    Ok(info.record.name)
}

/// `kiln kill`: sends `signal` (default SIGKILL) to the container's PID 1.
pub fn kill(store: &Store, name_or_id: &str, signal: Option<&str>) -> Result<String> {
    let info = ContainerInfo::load(store, name_or_id)?;
    let signal = parse_signal(signal.unwrap_or("SIGKILL"))?;
    signal_container(&info, signal)?;
    Ok(info.record.name)
}

/// Deletes the container's directory, record and leases (and, with `volumes`,
/// its anonymous volumes).
fn remove_files(store: &Store, info: &ContainerInfo, volumes: bool) -> Result<()> {
    let dirs = [
        Some(container_dir(store, &info.record.id)),
        info.config.scratch.clone(),
    ];
    for dir in dirs.into_iter().flatten() {
        match fs_err::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing container directory", dir, e)),
        }
    }
    store.remove_container(&info.record.id)?;
    if volumes {
        for m in &info.config.mounts {
            if let MountSource::Volume {
                name,
                anonymous: true,
            } = &m.source
            {
                match volume::remove(store, name) {
                    Ok(())
                    | Err(Error::Store(
                        kiln_cache::StoreError::NoSuch { .. }
                        | kiln_cache::StoreError::Conflict { .. },
                    )) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// `kiln rm [-f] [-v]`: removes a stopped container (`force` kills a running one).
pub fn remove(store: &Store, name_or_id: &str, force: bool, volumes: bool) -> Result<String> {
    let info = ContainerInfo::load(store, name_or_id)?;
    if info.active() {
        if !force {
            return Err(Error::Running {
                name: info.record.name,
            });
        }
        let _written = write_stop_marker(store, &info.record.id);
        if info.running() {
            signal_container(&info, Signal::SIGKILL)?;
        }
        wait_exit(store, &info.record.id, Duration::from_secs(30))?;
    }
    // A `--rm` container's supervisor may have removed it meanwhile.
    match store.container(&info.record.id) {
        Ok(_) => remove_files(store, &info, volumes)?,
        Err(kiln_cache::StoreError::NoSuch { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(info.record.name)
}

/// Every container (`all`), or the running ones, newest first.
pub fn list(store: &Store, all: bool) -> Result<Vec<ContainerInfo>> {
    let mut out = Vec::new();
    for rec in store.containers()? {
        let info = ContainerInfo::from_record(refresh(store, rec)?)?;
        if all || info.active() {
            out.push(info);
        }
    }
    Ok(out)
}

fn time(nanos: Option<i64>) -> String {
    match nanos {
        Some(n) => format_rfc3339(n.div_euclid(1_000_000_000)),
        None => "0001-01-01T00:00:00Z".to_owned(),
    }
}

/// `kiln inspect`: docker's inspect document for the container.
pub fn inspect(store: &Store, name_or_id: &str) -> Result<serde_json::Value> {
    let info = ContainerInfo::load(store, name_or_id)?;
    let (r, c) = (&info.record, &info.config);
    let mounts: Vec<serde_json::Value> = c
        .mounts
        .iter()
        .map(|m| {
            let (kind, name, source) = match &m.source {
                MountSource::Volume { name, .. } => (
                    "volume",
                    name.clone(),
                    volume::data_dir(store, name).display().to_string(),
                ),
                MountSource::Bind(p) => ("bind", String::new(), p.display().to_string()),
                MountSource::Tmpfs { .. } => ("tmpfs", String::new(), String::new()),
            };
            serde_json::json!({
                "Type": kind, "Name": name, "Source": source,
                "Destination": m.target, "RW": !m.readonly,
            })
        })
        .collect();
    let dir = c.layer_dir(&container_dir(store, &r.id));
    Ok(serde_json::json!([{
        "Id": r.id,
        "Created": time(Some(r.created)),
        "Path": c.args.first().cloned().unwrap_or_default(),
        "Args": c.args.get(1..).unwrap_or_default(),
        "State": {
            "Status": r.state,
            "Running": info.running(),
            "Paused": false,
            "Restarting": r.state == "restarting",
            "OOMKilled": r.oom_killed,
            "Dead": false,
            "Pid": r.pid.unwrap_or(0),
            "ExitCode": r.exit_code.unwrap_or(0),
            "Error": r.error.clone().unwrap_or_default(),
            "StartedAt": time(r.started),
            "FinishedAt": time(r.finished),
        },
        "Image": r.image,
        "LogPath": log_path(store, &r.id),
        "Name": format!("/{}", r.name),
        "RestartCount": r.restarts,
        "HostConfig": {
            "NetworkMode": c.network,
            "AutoRemove": c.auto_remove,
            "ReadonlyRootfs": c.read_only,
            "Memory": c.limits.memory.unwrap_or(0),
            "NanoCpus": c.limits.millicpus.map_or(0, |m| m * 1_000_000),
            "PidsLimit": c.limits.pids,
            "RestartPolicy": match c.restart {
                crate::RestartPolicy::No => serde_json::json!({"Name": "no", "MaximumRetryCount": 0}),
                crate::RestartPolicy::Always => serde_json::json!({"Name": "always", "MaximumRetryCount": 0}),
                crate::RestartPolicy::OnFailure { max } => serde_json::json!({"Name": "on-failure", "MaximumRetryCount": max}),
            },
            "PortBindings": c.publish,
        },
        "GraphDriver": {
            "Name": "overlay2",
            "Data": {
                "LowerDir": c.lowers.iter().map(|l| l.display().to_string()).collect::<Vec<_>>().join(":"),
                "UpperDir": dir.join("upper"),
                "WorkDir": dir.join("work"),
            },
        },
        "Mounts": mounts,
        "Config": {
            "Hostname": c.hostname,
            "User": c.user,
            "Tty": c.tty,
            "OpenStdin": c.interactive,
            "Env": c.env,
            "Cmd": c.cmd,
            "Entrypoint": c.entrypoint,
            "Image": r.image_name,
            "WorkingDir": c.cwd,
            "StopSignal": c.stop_signal,
            "StopTimeout": c.stop_timeout,
        },
        "NetworkSettings": {
            "Networks": { c.network.clone(): { "Aliases": c.aliases } },
        },
    }]))
}

/// One line of a container's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEntry {
    /// The text, with its newline.
    pub log: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// RFC 3339.
    pub time: String,
}

/// `kiln logs [-f]`: calls `each` for every log line; with `follow`, keeps
/// waiting for more until the container is no longer running.
pub fn logs(
    store: &Store,
    name_or_id: &str,
    follow: bool,
    mut each: impl FnMut(&LogEntry) -> std::io::Result<()>,
) -> Result<()> {
    let info = ContainerInfo::load(store, name_or_id)?;
    let path = log_path(store, &info.record.id);
    let file = match fs_err::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("opening the log", path, e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    loop {
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io("reading the log", &path, e))?;
        if n > 0 && line.ends_with('\n') {
            if let Ok(entry) = serde_json::from_str::<LogEntry>(&line) {
                each(&entry).map_err(|e| Error::io("writing the log to", "stdout", e))?;
            }
            line.clear();
            continue;
        }
        if !follow {
            return Ok(());
        }
        // At the end: stop once the container is no longer running and the rest
        // was read.
        let still = match store.container(&info.record.id) {
            Ok(rec) => is_active(&refresh(store, rec)?.state),
            Err(_) => false,
        };
        if !still {
            let before = line.len();
            let more = reader
                .read_line(&mut line)
                .map_err(|e| Error::io("reading the log", &path, e))?;
            if more == 0 && line.len() == before {
                return Ok(());
            }
            continue;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kiln exec` options.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// The command.
    pub cmd: Vec<String>,
    /// Extra `-e`.
    pub env: Vec<String>,
    /// `-u` (default: the container's user).
    pub user: Option<String>,
    /// `-w` (default: the container's working directory).
    pub workdir: Option<String>,
    /// `-i`.
    pub interactive: bool,
    /// `-t`.
    pub tty: bool,
}

/// `kiln exec`: runs a command in the running container; returns its exit code.
pub fn exec(store: &Store, name_or_id: &str, opts: &ExecOptions) -> Result<i32> {
    let info = ContainerInfo::load(store, name_or_id)?;
    let pid = info
        .record
        .pid
        .filter(|_| info.running())
        .ok_or_else(|| Error::NotRunning {
            name: info.record.name.clone(),
        })?;
    let mut process = ProcessSpec::new(opts.cmd.clone());
    process.env = info.config.env.clone();
    for e in &opts.env {
        let key = e.split('=').next().unwrap_or("");
        process.env.retain(|x| x.split('=').next() != Some(key));
        process.env.push(e.clone());
    }
    process.cwd = opts
        .workdir
        .clone()
        .unwrap_or_else(|| info.config.cwd.clone());
    let user = opts
        .user
        .clone()
        .unwrap_or_else(|| info.config.user.clone());
    process.user = if user.is_empty() {
        User::Resolved(ResolvedUser::root())
    } else {
        User::Spec(user)
    };
    let cfg = ContainerConfig {
        tty: opts.tty,
        interactive: opts.interactive,
        ..info.config.clone()
    };
    let (io, master) = stdio_for(&cfg)?;
    let mut running = Sandbox::new().exec(
        &ExecSpec {
            pid,
            process,
            tty: opts.tty,
        },
        io,
    )?;
    let proxy = match master {
        Some(m) => Some(
            Proxy::attach(m, opts.interactive)
                .map_err(|e| Error::io("attaching to the terminal", "/dev/tty", e))?,
        ),
        None => None,
    };
    let status = running.wait();
    if let Some(p) = proxy {
        p.finish();
    }
    Ok(status?.shell_code())
}

/// Used by the supervisor: everything it needs from this module.
pub(crate) struct Detached<'a> {
    pub(crate) store: &'a Store,
    pub(crate) info: ContainerInfo,
}

impl Detached<'_> {
    pub(crate) fn load<'a>(store: &'a Store, id: &str) -> Result<Detached<'a>> {
        let info = ContainerInfo::from_record(store.container(id)?)?;
        Ok(Detached { store, info })
    }

    pub(crate) fn spec(&self) -> Result<SandboxSpec> {
        sandbox_spec(self.store, &self.info)
    }

    pub(crate) fn log_path(&self) -> PathBuf {
        log_path(self.store, &self.info.record.id)
    }

    pub(crate) fn stopped_by_user(&self) -> bool {
        stop_marker(self.store, &self.info.record.id).exists()
    }

    pub(crate) fn remove(&self) -> Result<()> {
        remove_files(self.store, &self.info, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_short_name_or_number_and_names_are_checked() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("usr1").unwrap(), Signal::SIGUSR1);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("999").is_err());
        assert!(validate_container_name("web-1.a_b").is_ok());
        assert!(validate_container_name("/web").is_ok());
        assert!(validate_container_name("-web").is_err());
        assert!(validate_container_name("a b").is_err());
        let id = "0123456789abcdef".repeat(4);
        assert!(random_name(&id).ends_with("_0123"));
        let root = Path::new("/nonexistent-kiln-root");
        assert!(check_network(root, "none", &[]).is_ok());
        assert!(check_network(root, "host", &[]).is_ok());
        assert!(check_network(root, "bridge", &["8080".to_owned()]).is_ok());
        assert!(check_network(root, "none", &["8080".to_owned()]).is_err());
        assert!(check_network(root, "bridge", &["notaport".to_owned()]).is_err());
        assert!(check_network(root, "no-such-net", &[]).is_err());
    }
}
