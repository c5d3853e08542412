//! The helper side: parent → **helper** → **init** → payload.
//!
//! The caller (possibly a multi-threaded tokio process) never forks by itself: it
//! starts the helper with `std::process::Command` (which uses `posix_spawn`, a
//! vfork-style clone, since no `pre_exec` hook is set: cheap even from a large
//! multi-threaded parent), passing `__kiln-sandbox` as argv\[1\] and one end of a
//! Unix socket pair as the helper's stdin. The socket carries:
//!
//! - the spec, caller → helper: an 8-byte little-endian length, then JSON
//!   (sent at once, or later to a helper started ahead: `Sandbox::prepare`);
//! - reports, helper/init/payload → caller: JSON lines ([`Report`]), one `write`
//!   each (short, so lines from different processes never interleave);
//! - the lifeline: the caller never writes after the spec. When it cancels
//!   (`shutdown(Write)`), drops its `Running` or dies (even by SIGKILL), the helper
//!   reads EOF and kills the sandbox. This is per process, unlike
//!   `PR_SET_PDEATHSIG`, which fires when the *thread* that spawned the helper exits
//!   (tokio's blocking pool retires threads).
//!
//! The helper moves the socket to a close-on-exec descriptor and gives fd 0
//! `/dev/null`, so the payload never holds it.
//!
//! The helper is single-threaded, so it may fork. It makes the cgroup, unshares
//! the user (rootless), uts, ipc, pid and net namespaces and forks **init**, which
//! is PID 1 of the new pid namespace. Init unshares the mount namespace (so the
//! helper keeps the host's view to clean up) and builds the rootfs (see
//! [`crate::rootfs`]). Then:
//!
//! - with [`SandboxSpec::init`] (`docker run --init`), init forks the payload
//!   (PID 2), forwards signals to it and reaps every zombie; when the payload exits
//!   init reports its status and exits;
//! - without it (the default, as runc runs a RUN step), init execs the payload
//!   itself, which is then PID 1. The helper reports the status it gets from
//!   `waitpid`, after learning from a close-on-exec pipe whether `execve` happened
//!   (else the child has already reported its setup or exec error).
//!
//! Either way, when PID 1 exits the kernel kills whatever else is left in the pid
//! namespace, and cancellation is a SIGKILL from the helper, outside the
//! namespace, which PID 1 cannot ignore. The helper then reads the OOM counter,
//! removes the cgroup and its temp directory, and exits.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

use crate::cgroup::Cgroup;
use crate::fail::{Fail, Report, Step, send};
use crate::rootfs::{self, Kind};
use crate::spec::{Network, ProcessSpec, RlimitResource, RootfsSpec, SandboxSpec, User};

/// argv\[1\] that turns a binary into the sandbox helper.
pub const HELPER_ARG: &str = "__kiln-sandbox";
/// argv\[1\] that turns a binary into the exec helper (`docker exec`): it joins a
/// running sandbox's namespaces and runs one process there.
pub const EXEC_ARG: &str = "__kiln-nsexec";
/// The environment variable naming the (inheritable) descriptor the helper puts on
/// the payload's stdin; unset means `/dev/null`.
pub(crate) const STDIN_FD_ENV: &str = "KILN_SANDBOX_STDIN_FD";
/// The environment variable naming the (inheritable) read end of the gate pipe of
/// a [`SandboxSpec::gated`] sandbox.
pub(crate) const GATE_FD_ENV: &str = "KILN_SANDBOX_GATE_FD";

/// The gate's read end in the helper (and, inherited, in init).
static GATE: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Takes the inheritable descriptor named by `var`, making it close-on-exec.
fn inherited_fd(var: &str) -> Option<std::io::Result<OwnedFd>> {
    let fd = std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|fd| *fd > 2)?;
    // SAFETY: the caller passed this descriptor to us (not close-on-exec) for
    // exactly this purpose; nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Some(
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map(|_| owned)
        .map_err(std::io::Error::from),
    )
}
/// Call this first thing in `main` of any binary used as the sandbox helper (the
/// `kiln` binary, test binaries). When argv\[1\] is the helper marker, it runs the
/// helper and exits; otherwise it returns at once.
pub fn helper_main_if_requested() {
    let arg = std::env::args_os().nth(1);
    if arg.as_deref() == Some(OsStr::new(HELPER_ARG)) {
        std::process::exit(helper_main(false));
    }
    if arg.as_deref() == Some(OsStr::new(EXEC_ARG)) {
        std::process::exit(helper_main(true));
    }
}

/// The descriptor to put on fd 0: the caller's inherited one, or `/dev/null`.
fn stdin_source() -> std::io::Result<OwnedFd> {
    if let Some(fd) = inherited_fd(STDIN_FD_ENV) {
        return fd;
    }
    fs_err::File::open("/dev/null").map(|f| OwnedFd::from(f.into_file()))
}

fn helper_main(exec: bool) -> i32 {
    // Move the socket off fd 0 (close-on-exec) and give fd 0 /dev/null.
    let sock = match nix::fcntl::fcntl(std::io::stdin(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)) {
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor, owned by nobody else.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(_) => return 2,
    };
    let null = stdin_source().map(|f| nix::unistd::dup2_stdin(&f));
    if !matches!(null, Ok(Ok(()))) {
        send(
            sock.as_fd(),
            &Fail::step("put the payload's stdin on the helper's fd 0", libc::EIO).report,
        );
        return 1;
    }
    let lifeline = match sock.try_clone() {
        Ok(l) => l,
        Err(e) => {
            send(
                sock.as_fd(),
                &Fail::step("dup the helper's socket", e.raw_os_error().unwrap_or(0)).report,
            );
            return 1;
        }
    };
    if let Some(Ok(gate)) = inherited_fd(GATE_FD_ENV) {
        let _set = GATE.set(gate);
    }
    let result = if exec {
        run_exec(&sock, lifeline).map(|()| 0)
    } else {
        run_helper(&sock, lifeline)
    };
    match result {
        Ok(code) => code,
        Err(fail) => {
            send(sock.as_fd(), &fail.report);
            1
        }
    }
}

fn read_spec<T: serde::de::DeserializeOwned>(sock: &OwnedFd) -> Result<T, Fail> {
    let mut file = std::mem::ManuallyDrop::new(
        // SAFETY: wrapped in ManuallyDrop: borrows the socket, never closes it.
        unsafe { std::fs::File::from_raw_fd(sock.as_raw_fd()) },
    );
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .step(|| "read the spec's length from the caller".to_owned())?;
    let len = usize::try_from(u64::from_le_bytes(len)).unwrap_or(usize::MAX);
    if len > 64 << 20 {
        return Err(Fail::step(
            format!("read a spec of {len} bytes"),
            libc::E2BIG,
        ));
    }
    let mut text = vec![0u8; len];
    file.read_exact(&mut text)
        .step(|| "read the spec from the caller".to_owned())?;
    serde_json::from_slice(&text)
        .map_err(|e| Fail::step(format!("decode the spec: {e}"), libc::EINVAL))
}

/// Where helpers make their per-sandbox directories (`kiln-sandbox.XXXXXX`): a
/// tmpfs (`/dev/shm`) when there is one, else the temp dir. The directory is
/// created and removed on every run's critical path, and on a busy disk file
/// system each `rmdir` waits for the journal (3-4 ms measured here).
pub fn state_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if nix::unistd::access(
        shm,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .is_ok()
    {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The helper's temp directory: generated `/etc` files and the rootfs mount point.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        // Only files and an empty mount point (mounts live in init's namespace).
        let _best_effort = fs_err::remove_dir_all(&self.0);
    }
}

fn make_state(spec: &SandboxSpec) -> Result<StateDir, Fail> {
    let template = state_root().join("kiln-sandbox.XXXXXX");
    let dir = nix::unistd::mkdtemp(&template)
        .step(|| format!("create a temp directory `{}`", template.display()))?;
    let state = StateDir(dir);
    let dir = &state.0;
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\t{}\n",
        spec.hostname
    );
    for line in &spec.extra_hosts {
        hosts.push_str(line);
        hosts.push('\n');
    }
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        fs_err::write(&path, text).step(|| format!("write `{}`", path.display()))
    };
    write("hosts", &hosts)?;
    write("resolv.conf", &resolv_conf(spec))?;
    write("hostname", &format!("{}\n", spec.hostname))?;
    let rootfs = dir.join("rootfs");
    fs_err::create_dir(&rootfs).step(|| format!("create `{}`", rootfs.display()))?;
    Ok(state)
}

/// `/etc/resolv.conf` for the sandbox: the spec's servers, or the host's file minus
/// loopback servers (unreachable from a new netns), or Google's as Docker falls back.
fn resolv_conf(spec: &SandboxSpec) -> String {
    if !spec.dns.is_empty() {
        return spec
            .dns
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
    }
    let host = fs_err::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if spec.network == Network::Host {
        return host;
    }
    let mut servers = 0;
    let mut out = String::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let addr = words.next().unwrap_or("");
            if addr.starts_with("127.") || addr == "::1" {
                continue;
            }
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if servers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

fn write_id_maps(uid: Uid, gid: Gid) -> Result<(), Fail> {
    // A single-id map needs no helper binary: the process may map its own ids once
    // setgroups is denied.
    let w = |file: &str, text: String| {
        fs_err::write(file, &text).step(|| format!("write `{}` to `{file}`", text.trim()))
    };
    w("/proc/self/setgroups", "deny".to_owned())?;
    w("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    w("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

/// The first `/etc/subuid`-style range (`name_or_id:start:count`) for the user.
pub(crate) fn subordinate_range(text: &str, name: Option<&str>, id: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
        let mine = Some(owner) == name || owner.parse::<u32>().ok() == Some(id);
        let (start, count) = (start.trim().parse().ok()?, count.trim().parse().ok()?);
        (mine && count > 0).then_some((start, count))
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Ranges and tools for a full rootless id map, when the user has subordinate ids
/// and `newuidmap`/`newgidmap` (package `uidmap`) are installed.
struct SubIds {
    uid_range: (u32, u32),
    gid_range: (u32, u32),
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

fn sub_ids(uid: Uid, gid: Gid) -> Option<SubIds> {
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    let read = |f: &str| fs_err::read_to_string(f).unwrap_or_default();
    Some(SubIds {
        uid_range: subordinate_range(&read("/etc/subuid"), name.as_deref(), uid.as_raw())?,
        gid_range: subordinate_range(&read("/etc/subgid"), name.as_deref(), gid.as_raw())?,
        newuidmap: find_tool("newuidmap")?,
        newgidmap: find_tool("newgidmap")?,
    })
}

/// Unshares the user namespace and maps 0 to the caller plus 1..=count to its
/// subordinate range, through the setuid `newuidmap`/`newgidmap`. They must write
/// the maps from outside the new namespace, so a child forked *before* the unshare
/// waits on a pipe and runs them once the helper has unshared.
fn unshare_user_with_subids(
    uid: Uid,
    gid: Gid,
    ids: &SubIds,
    report: BorrowedFd<'_>,
) -> Result<(), Fail> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "create a pipe".to_owned())?;
    let helper_pid = nix::unistd::getpid().to_string();
    // SAFETY: the helper is single-threaded.
    match unsafe { fork() }.step(|| "fork the id mapper".to_owned())? {
        ForkResult::Child => {
            drop(w);
            let mut byte = [0u8; 1];
            let _go = nix::unistd::read(&r, &mut byte);
            let jobs = [
                (&ids.newuidmap, uid.as_raw(), ids.uid_range),
                (&ids.newgidmap, gid.as_raw(), ids.gid_range),
            ];
            for (tool, own, (start, count)) in jobs {
                let args: Vec<String> = [
                    helper_pid.clone(),
                    "0".into(),
                    own.to_string(),
                    "1".into(),
                    "1".into(),
                ]
                .into_iter()
                .chain([start.to_string(), count.to_string()])
                .collect();
                let step = format!("map ids with `{} {}`", tool.display(), args.join(" "));
                let failure = match std::process::Command::new(tool).args(&args).output() {
                    Ok(out) if out.status.success() => continue,
                    Ok(out) => Fail::step(
                        format!("{step}: {}", String::from_utf8_lossy(&out.stderr).trim()),
                        libc::EPERM,
                    ),
                    Err(e) => Fail::step(step, e.raw_os_error().unwrap_or(libc::EIO)),
                };
                send(report, &failure.report);
                // SAFETY: leave without running the helper's destructors.
                unsafe { libc::_exit(1) }
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(r);
            let unshared =
                unshare(CloneFlags::CLONE_NEWUSER).step(|| "unshare the user namespace".to_owned());
            // Writing (or closing, on failure) releases the mapper.
            let _go = nix::unistd::write(&w, b"x");
            drop(w);
            let status = waitpid(child, None).step(|| "wait for newuidmap/newgidmap".to_owned())?;
            unshared?;
            if status != WaitStatus::Exited(child, 0) {
                return Err(Fail::step("map ids with newuidmap/newgidmap", libc::EPERM));
            }
            Ok(())
        }
    }
}

fn helper_signals() -> Result<SignalFd, Fail> {
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        signals.add(s);
    }
    signals
        .thread_block()
        .step(|| "block signals in the helper".to_owned())?;
    SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).step(|| "create a signalfd".to_owned())
}

/// The cgroup directories (of any hierarchy) kiln made for the sandbox whose
/// `/proc/<pid>/cgroup` is `text`: `<mount>/<path>/cgroup.procs` files to join.
fn sandbox_cgroup_procs(text: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            if !path.contains("/kiln/sandbox-") {
                return None;
            }
            let rel = path.trim_start_matches('/');
            let dir = if ctrls.is_empty() {
                if root.join("cgroup.controllers").exists() {
                    root.join(rel)
                } else {
                    root.join("unified").join(rel)
                }
            } else {
                root.join(ctrls.trim_start_matches("name=")).join(rel)
            };
            Some(dir.join("cgroup.procs"))
        })
        .collect()
}

/// The exec helper: join the namespaces and cgroups of a running sandbox's PID 1,
/// fork the process there and supervise it like a payload without init.
fn run_exec(sock: &OwnedFd, lifeline: OwnedFd) -> Result<(), Fail> {
    let report = sock.as_fd();
    let spec: crate::spec::ExecSpec = read_spec(sock)?;
    if spec.process.args.is_empty() {
        return Err(Fail::step(
            "exec a process with an empty argv",
            libc::EINVAL,
        ));
    }
    let sigfd = helper_signals()?;
    let pid = spec.pid;
    let cgroups = fs_err::read_to_string(format!("/proc/{pid}/cgroup"))
        .step(|| format!("read the cgroups of the container process {pid}"))?;
    for procs in sandbox_cgroup_procs(&cgroups) {
        fs_err::write(&procs, "0").step(|| format!("join the cgroup `{}`", procs.display()))?;
    }
    let mut namespaces = Vec::new();
    for (name, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let path = format!("/proc/{pid}/ns/{name}");
        let file = fs_err::File::open(&path).step(|| format!("open `{path}`"))?;
        namespaces.push((path, file, flag));
    }
    for (path, file, flag) in &namespaces {
        nix::sched::setns(file.file().as_fd(), *flag).step(|| format!("join `{path}`"))?;
    }
    drop(namespaces);
    let direct = DirectPipes::new()?;
    // SAFETY: the helper is single-threaded (a fresh exec), so the child may run any code.
    let child = match unsafe { fork() }.step(|| "fork the exec'd process".to_owned())? {
        ForkResult::Child => {
            drop(lifeline);
            let result = (|| -> Result<std::convert::Infallible, Fail> {
                crate::sys::prctl(libc::PR_SET_PDEATHSIG, Signal::SIGKILL as libc::c_ulong)
                    .step(|| "set the parent-death signal".to_owned())?;
                let user = match &spec.process.user {
                    User::Resolved(u) => u.clone(),
                    User::Spec(text) => {
                        let read = |p: &str| fs_err::read_to_string(p).unwrap_or_default();
                        crate::user::resolve_user(text, &read("/etc/passwd"), &read("/etc/group"))
                            .map_err(|e| Fail {
                            report: Report::UserFailed((&e).into()),
                        })?
                    }
                };
                let exec = ExecPlan::new(&spec.process, &user.home)?;
                let cwd = PathBuf::from(&spec.process.cwd);
                payload_main(
                    &spec.process,
                    &user,
                    &cwd,
                    true,
                    &exec,
                    Some(&direct.alive_r),
                    spec.tty,
                )
            })();
            let Err(fail) = result;
            send(report, &fail.report);
            let _told = nix::unistd::write(&direct.failed_w, b"f");
            // SAFETY: skip the helper's atexit handlers and stdio flushing.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => child,
    };
    send(
        report,
        &Report::Started {
            pid: child.as_raw(),
        },
    );
    let DirectPipes {
        failed_r,
        failed_w,
        alive_r,
        alive_w,
    } = direct;
    drop((failed_w, alive_r));
    supervise(child, report, &sigfd, lifeline, Some((failed_r, alive_w)))
}

/// Runs a sandbox; returns the helper's exit code once the sandbox is gone. An
/// `Err` is a failure before the sandbox started (no [`Report::Done`] follows it).
fn run_helper(sock: &OwnedFd, lifeline: OwnedFd) -> Result<i32, Fail> {
    let report = sock.as_fd();
    let spec: SandboxSpec = read_spec(sock)?;
    if spec.process.args.is_empty() {
        return Err(Fail::step(
            "start a process with an empty argv",
            libc::EINVAL,
        ));
    }
    let sigfd = helper_signals()?;

    let state = make_state(&spec)?;
    let rootless = !Uid::effective().is_root();
    let cgroup = if spec.limits.is_empty() {
        None
    } else {
        Some(Cgroup::create(
            &format!("sandbox-{}", std::process::id()),
            &spec.limits,
        )?)
    };
    let result = run_namespaces(
        &spec,
        &state.0,
        rootless,
        cgroup.as_ref(),
        report,
        &sigfd,
        lifeline,
    );
    if let Some(cg) = &cgroup
        && cg.oom_killed()
    {
        send(report, &Report::OomKilled);
    }
    let (keep, failed) = match result {
        Ok(keep) => (keep, false),
        Err(fail) => {
            send(report, &fail.report);
            (None, true)
        }
    };
    // Everything the caller waits for is said. Releasing the namespace unmounts
    // the rootfs, which for an overlay of many files takes milliseconds (the
    // kernel drops every cached dentry and inode of it); a caller that only
    // needs the status has it already (`Running::wait_detached`).
    send(report, &Report::Done);
    drop(keep);
    if let Some(cg) = &cgroup {
        cg.remove()?;
    }
    drop(state);
    Ok(i32::from(failed))
}

/// A close-on-exec datagram socket pair: the helper's end and init's.
fn keep_pair() -> Option<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .ok()
}

/// Sends init's mount namespace (a descriptor of it) into the helper's socket.
/// A descriptor in flight holds what it refers to, so the namespace, with the
/// rootfs mounted in it, outlives init until the helper closes its end of the
/// socket: init's exit then skips the unmount, and the helper's `waitpid`
/// returns as soon as the payload is gone. Best effort: without it the
/// namespace goes with init, as before.
fn lend_namespace(keep: &OwnedFd) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let Ok(ns) = fs_err::File::open("/proc/self/ns/mnt") else {
        return;
    };
    let fds = [ns.file().as_raw_fd()];
    let _lent = sendmsg::<()>(
        keep.as_raw_fd(),
        &[std::io::IoSlice::new(b"n")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
}

fn run_namespaces(
    spec: &SandboxSpec,
    state: &Path,
    rootless: bool,
    cgroup: Option<&Cgroup>,
    report: BorrowedFd<'_>,
    sigfd: &SignalFd,
    lifeline: OwnedFd,
) -> Result<Option<OwnedFd>, Fail> {
    let netns = match &spec.network {
        Network::Netns(path) => {
            Some(fs_err::File::open(path).step(|| "open the network namespace".to_owned())?)
        }
        _ => None,
    };
    let mut procs: Vec<fs_err::File> = cgroup
        .map(|cg| {
            cg.procs_files()
                .into_iter()
                .map(|p| {
                    fs_err::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .step(|| "open a cgroup".to_owned())
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    // Supplementary groups can be set only with a full map (a single-id map needs
    // setgroups denied).
    let mut groups_allowed = !rootless;
    if rootless {
        let (uid, gid) = (Uid::effective(), Gid::effective());
        match sub_ids(uid, gid) {
            Some(ids) => {
                unshare_user_with_subids(uid, gid, &ids, report)?;
                groups_allowed = true;
            }
            None => {
                unshare(CloneFlags::CLONE_NEWUSER)
                    .step(|| "unshare the user namespace".to_owned())?;
                write_id_maps(uid, gid)?;
            }
        }
    }
    let mut flags = CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWPID;
    if spec.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).step(|| format!("unshare namespaces ({flags:?})"))?;
    if let Some(ns) = &netns {
        nix::sched::setns(ns.file().as_fd(), CloneFlags::CLONE_NEWNET)
            .step(|| format!("join the network namespace `{}`", ns.path().display()))?;
    }
    drop(netns);

    // Without an init, the namespace's first process execs the payload itself, so
    // nobody inside is left to report its status: the helper does, from `waitpid`.
    // Two close-on-exec pipes tell it what happened (see `DirectPipes`).
    let direct = if spec.init {
        None
    } else {
        Some(DirectPipes::new()?)
    };

    // Init lends its mount namespace to the helper through this socket (see
    // `lend_namespace`); the helper's end is returned, to be closed once the
    // status is reported. Without a socket the namespace goes when init does.
    let (keep, keep_init) = match keep_pair() {
        Some((ours, theirs)) => (Some(ours), Some(theirs)),
        None => (None, None),
    };

    // SAFETY: the helper is single-threaded (it is a fresh exec of a binary whose
    // main calls `helper_main_if_requested` first), so the child may run any code.
    let init = match unsafe { fork() }.step(|| "fork the sandbox init".to_owned())? {
        ForkResult::Child => {
            drop(lifeline);
            drop(keep);
            let (failed, alive) = match direct {
                Some(d) => (Some(d.failed_w), Some(d.alive_r)),
                None => (None, None),
            };
            let code = match init_main(
                spec,
                state,
                rootless,
                groups_allowed,
                std::mem::take(&mut procs),
                report,
                InitEnds {
                    alive: alive.as_ref(),
                    keep: keep_init.as_ref(),
                },
            ) {
                Ok(never) => match never {},
                Err(fail) => {
                    send(report, &fail.report);
                    if let Some(w) = &failed {
                        let _told = nix::unistd::write(w, b"f");
                    }
                    1
                }
            };
            // SAFETY: `_exit` skips atexit handlers and buffered-stdio flushing that
            // belong to the helper.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(procs);
    drop(keep_init);
    // The payload's piped stdout and stderr end when the payload (and init) are
    // gone, not when the helper is: it gives them up.
    if let Ok(null) = fs_err::OpenOptions::new().write(true).open("/dev/null") {
        let _out = nix::unistd::dup2_stdout(null.file());
        let _err = nix::unistd::dup2_stderr(null.file());
    }
    send(report, &Report::Started { pid: init.as_raw() });
    let direct = direct.map(|d| (d.failed_r, d.alive_w));
    supervise(init, report, sigfd, lifeline, direct)?;
    Ok(keep)
}

/// Init's ends of the helper's pipes.
struct InitEnds<'a> {
    /// Without an init: the read end of [`DirectPipes`]'s `alive` pipe.
    alive: Option<&'a OwnedFd>,
    /// Where init lends its mount namespace (see `lend_namespace`).
    keep: Option<&'a OwnedFd>,
}

/// The pipes between the helper and a payload that is PID 1 itself (no init).
///
/// - `failed`: the child writes one byte before it exits on a setup or exec
///   failure (whose report it has sent); a successful `execve` closes the
///   close-on-exec write end unwritten. After reaping the child, the helper reads
///   EOF only when the exit status is the payload's.
/// - `alive`: only the helper holds the write end, so the child sees a hang-up on
///   the read end once the helper is gone. Changing credentials clears the
///   parent-death signal; the child sets it again and then checks this pipe, which
///   closes the window where a SIGKILLed helper would leave the payload running.
struct DirectPipes {
    failed_r: OwnedFd,
    failed_w: OwnedFd,
    alive_r: OwnedFd,
    alive_w: OwnedFd,
}

impl DirectPipes {
    fn new() -> Result<Self, Fail> {
        use nix::fcntl::OFlag;
        let pipe = |flags: OFlag| nix::unistd::pipe2(flags).step(|| "create a pipe".to_owned());
        // Non-blocking, so that the helper's read after reaping can never hang.
        let (failed_r, failed_w) = pipe(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let (alive_r, alive_w) = pipe(OFlag::O_CLOEXEC)?;
        Ok(Self {
            failed_r,
            failed_w,
            alive_r,
            alive_w,
        })
    }
}

/// Waits for init (or the payload itself, without init), killing it when the
/// caller goes away or signals the helper. Without init (`direct` holds the
/// helper's ends of [`DirectPipes`]) it reports the payload's status.
fn supervise(
    init: Pid,
    report: BorrowedFd<'_>,
    sigfd: &SignalFd,
    lifeline: OwnedFd,
    direct: Option<(OwnedFd, OwnedFd)>,
) -> Result<(), Fail> {
    let mut cancelled = false;
    let mut lifeline = Some(lifeline);
    let status = loop {
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        if let Some(l) = &lifeline {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Fail::step("poll in the helper", e as i32)),
        }
        let lifeline_gone = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty());
        let signalled = fds
            .first()
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty());
        if lifeline_gone {
            // The caller writes nothing after the spec: readable means EOF (cancel,
            // drop or death); stray bytes are read and ignored.
            let mut byte = [0u8; 1];
            let eof = lifeline
                .as_ref()
                .is_none_or(|l| !matches!(nix::unistd::read(l, &mut byte), Ok(1)));
            if eof {
                lifeline = None;
                cancelled = true;
                let _dead = kill(init, Signal::SIGKILL);
            }
        }
        if signalled
            && let Ok(Some(info)) = sigfd.read_signal()
            && i32::try_from(info.ssi_signo).unwrap_or(0) != Signal::SIGCHLD as i32
        {
            cancelled = true;
            let _dead = kill(init, Signal::SIGKILL);
        }
        match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => break Some(status),
            Err(nix::errno::Errno::ECHILD) => break None,
            Err(e) => return Err(Fail::step("wait for the sandbox init", e as i32)),
        }
    };
    if let Some((failed, alive)) = direct {
        drop(alive);
        // The child is reaped and held the only other write end: EOF means execve
        // closed it unwritten, a byte means the child reported a failure.
        let mut byte = [0u8; 1];
        let execed = matches!(nix::unistd::read(&failed, &mut byte), Ok(0));
        match status {
            Some(WaitStatus::Exited(_, code)) if execed => send(report, &Report::Exited { code }),
            // Our own SIGKILL after a cancel is reported as `Cancelled` alone, as
            // with an init.
            Some(WaitStatus::Signaled(_, sig, _))
                if execed && !(cancelled && sig == Signal::SIGKILL) =>
            {
                send(report, &Report::Signaled { signal: sig as i32 });
            }
            _ => {}
        }
    }
    if cancelled {
        send(report, &Report::Cancelled);
    }
    Ok(())
}

/// PID 1 of the sandbox: sets up the rootfs, then either forks the payload and
/// reaps (`spec.init`) or execs the payload itself (`alive` is then the read end
/// of [`DirectPipes`]'s `alive` pipe). Never returns on success.
fn init_main(
    spec: &SandboxSpec,
    state: &Path,
    rootless: bool,
    groups_allowed: bool,
    procs: Vec<fs_err::File>,
    report: BorrowedFd<'_>,
    ends: InitEnds<'_>,
) -> Result<std::convert::Infallible, Fail> {
    let InitEnds { alive, keep } = ends;
    if spec.init {
        // A recognisable name in `ps` (comm is otherwise the helper binary's name).
        let _named = crate::sys::prctl(libc::PR_SET_NAME, c"kiln-init".as_ptr() as libc::c_ulong);
    }
    // If the helper dies (SIGKILL), take the whole pid namespace down with it.
    crate::sys::prctl(libc::PR_SET_PDEATHSIG, Signal::SIGKILL as libc::c_ulong)
        .step(|| "set the parent-death signal".to_owned())?;
    for file in &procs {
        use std::io::Write;
        let mut f = file.file();
        f.write_all(b"0")
            .step(|| format!("join the cgroup `{}`", file.path().display()))?;
    }
    drop(procs);
    unshare(CloneFlags::CLONE_NEWNS).step(|| "unshare the mount namespace".to_owned())?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(|| "make `/` private".to_owned())?;
    if let Some(keep) = keep {
        lend_namespace(keep);
    }
    nix::unistd::sethostname(&spec.hostname)
        .step(|| format!("set the hostname `{}`", spec.hostname))?;
    if spec.network == Network::None {
        loopback_up()?;
    }

    let sources = rootfs::clone_sources(spec, state, spec.network == Network::Host)?;
    let target = state.join("rootfs");
    match &spec.rootfs {
        RootfsSpec::Overlay {
            lowers,
            upper,
            work,
        } => {
            rootfs::mount_overlay(lowers, upper, work, &target, rootless, spec.volatile_upper)?;
        }
        RootfsSpec::Dir(dir) => {
            nix::mount::mount(
                Some(dir.as_path()),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                None::<&str>,
            )
            .step(|| format!("bind mount the rootfs `{}`", dir.display()))?;
        }
    }
    rootfs::pivot_into(&target)?;
    let stubs = rootfs::populate(spec, &sources, &mut rootfs::Kernel, rootless)?;
    // Close every host source before anything reads or creates paths in the rootfs
    // with /proc mounted (USER lookup, the working directory).
    drop(sources);
    if matches!(spec.rootfs, RootfsSpec::Overlay { .. }) {
        // Batched: one write (and one wake-up of the caller) for the usual handful.
        let mut batch = Vec::new();
        let mut size = 0;
        for stub in stubs {
            let stub = stub.to_string_lossy().into_owned();
            if size + stub.len() > 3000 && !batch.is_empty() {
                send(report, &Report::Stubs(std::mem::take(&mut batch)));
                size = 0;
            }
            size += stub.len() + 3;
            batch.push(stub);
        }
        if !batch.is_empty() {
            send(report, &Report::Stubs(batch));
        }
    }

    let user = match &spec.process.user {
        User::Resolved(u) => u.clone(),
        User::Spec(text) => {
            let read = |p: &str| fs_err::read_to_string(p).unwrap_or_default();
            crate::user::resolve_user(text, &read("/etc/passwd"), &read("/etc/group")).map_err(
                |e| Fail {
                    report: Report::UserFailed((&e).into()),
                },
            )?
        }
    };
    // Like Docker, a missing working directory is created, and kept (not a stub).
    let cwd = rootfs::ensure_target(Path::new(&spec.process.cwd), Kind::Dir, &mut Vec::new())?;
    let exec = ExecPlan::new(&spec.process, &user.home)?;
    send(report, &Report::Ready);
    if spec.gated {
        // The caller finishes its part (a network, say) and writes one byte; EOF
        // means it gave up or died.
        let mut byte = [0u8; 1];
        let go = GATE
            .get()
            .is_some_and(|g| matches!(nix::unistd::read(g, &mut byte), Ok(1)));
        if !go {
            return Err(Fail::step(
                "wait for the caller's go-ahead (Running::release)",
                libc::ECANCELED,
            ));
        }
    }
    if let Some(alive) = alive {
        // No init: this process, PID 1 of the namespace, becomes the payload.
        return payload_main(
            &spec.process,
            &user,
            &cwd,
            groups_allowed,
            &exec,
            Some(alive),
            spec.tty,
        );
    }

    // SAFETY: init is single-threaded (forked from the single-threaded helper).
    let payload = match unsafe { fork() }.step(|| "fork the payload".to_owned())? {
        ForkResult::Child => {
            let fail = match payload_main(
                &spec.process,
                &user,
                &cwd,
                groups_allowed,
                &exec,
                None,
                spec.tty,
            ) {
                Ok(never) => match never {},
                Err(fail) => fail,
            };
            send(report, &fail.report);
            // SAFETY: see the init's `_exit` above.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    let code = reap(payload, report)?;
    // SAFETY: exiting PID 1 makes the kernel kill everything else in the namespace.
    unsafe { libc::_exit(code) }
}

/// Init's loop: forward signals to the payload, reap every child, report the
/// payload's status when it exits.
fn reap(payload: Pid, report: BorrowedFd<'_>) -> Result<i32, Fail> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set.thread_block()
        .step(|| "block signals in init".to_owned())?;
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == payload => {
                    send(report, &Report::Exited { code });
                    return Ok(0);
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == payload => {
                    send(report, &Report::Signaled { signal: sig as i32 });
                    return Ok(0);
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(other) => {
                let _gone = kill(payload, other);
            }
        }
    }
}

/// Brings `lo` up in the new network namespace (SIOCSIFFLAGS with IFF_UP).
fn loopback_up() -> Result<(), Fail> {
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Fail::step(
            "open a socket to bring `lo` up",
            nix::errno::Errno::last() as i32,
        ));
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the `ifreq` we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if ret < 0 {
        return Err(Fail::step(
            "read the flags of `lo`",
            nix::errno::Errno::last() as i32,
        ));
    }
    // SAFETY: the union member `ifru_flags` is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if ret < 0 {
        return Err(Fail::step(
            "bring `lo` up",
            nix::errno::Errno::last() as i32,
        ));
    }
    Ok(())
}

/// argv, env and the executable candidates, built before the payload's fork.
struct ExecPlan {
    argv: Vec<CString>,
    env: Vec<CString>,
    candidates: Vec<CString>,
}

impl ExecPlan {
    fn new(process: &ProcessSpec, home: &str) -> Result<Self, Fail> {
        let c = |s: &str| {
            CString::new(s)
                .map_err(|_| Fail::step(format!("`{s}` contains a NUL byte"), libc::EINVAL))
        };
        let argv = process
            .args
            .iter()
            .map(|a| c(a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = process
            .env
            .iter()
            .map(|e| c(e))
            .collect::<Result<Vec<_>, _>>()?;
        if !process.env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(c(&format!("HOME={home}"))?);
        }
        let program = process.args.first().map(String::as_str).unwrap_or("");
        let candidates = if program.contains('/') {
            vec![c(program)?]
        } else {
            let path = process
                .env
                .iter()
                .rev()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
            path.split(':')
                .map(|dir| if dir.is_empty() { "." } else { dir })
                .map(|dir| c(&format!("{dir}/{program}")))
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Self {
            argv,
            env,
            candidates,
        })
    }
}

fn set_rlimit(resource: RlimitResource, soft: u64, hard: u64) -> nix::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    let r = match resource {
        RlimitResource::Nofile => Resource::RLIMIT_NOFILE,
        RlimitResource::Nproc => Resource::RLIMIT_NPROC,
        RlimitResource::Core => Resource::RLIMIT_CORE,
        RlimitResource::Stack => Resource::RLIMIT_STACK,
        RlimitResource::Memlock => Resource::RLIMIT_MEMLOCK,
        RlimitResource::Cpu => Resource::RLIMIT_CPU,
        RlimitResource::Fsize => Resource::RLIMIT_FSIZE,
        RlimitResource::As => Resource::RLIMIT_AS,
    };
    setrlimit(r, soft, hard)
}

/// The payload, after init's fork (or PID 1 itself without init, with `alive`
/// from [`DirectPipes`]): limits, credentials, capabilities, exec.
fn payload_main(
    process: &ProcessSpec,
    user: &crate::spec::ResolvedUser,
    cwd: &Path,
    groups_allowed: bool,
    exec: &ExecPlan,
    alive: Option<&OwnedFd>,
    tty: bool,
) -> Result<std::convert::Infallible, Fail> {
    SigSet::all()
        .thread_unblock()
        .step(|| "unblock signals".to_owned())?;
    // Rust's runtime ignores SIGPIPE in the helper, and an ignored disposition
    // survives exec: give the payload the default back, as a shell would expect.
    // SAFETY: SIG_DFL installs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
        .step(|| "reset SIGPIPE".to_owned())?;
    nix::unistd::setsid().step(|| "start a session".to_owned())?;
    if tty {
        // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal).
        let ret = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if ret < 0 {
            return Err(Fail::step(
                "make stdin the controlling terminal",
                nix::errno::Errno::last() as i32,
            ));
        }
    }
    for r in &process.rlimits {
        set_rlimit(r.resource, r.soft, r.hard)
            .step(|| format!("set the rlimit {:?}", r.resource))?;
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(process.umask));
    nix::unistd::chdir(cwd).step(|| format!("chdir into `{}`", cwd.display()))?;

    crate::caps::drop_bounding()?;
    crate::sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).step(|| "set no_new_privs".to_owned())?;
    if groups_allowed {
        let groups: Vec<Gid> = user
            .additional_gids
            .iter()
            .map(|&g| Gid::from_raw(g))
            .collect();
        nix::unistd::setgroups(&groups)
            .step(|| format!("set the groups {:?}", user.additional_gids))?;
    }
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    nix::unistd::setresgid(gid, gid, gid).step(|| format!("set the gid {}", user.gid))?;
    nix::unistd::setresuid(uid, uid, uid).step(|| format!("set the uid {}", user.uid))?;
    if user.uid == 0 {
        crate::caps::set_root_caps()?;
    }
    if let Some(alive) = alive {
        // A change of uid or gid cleared the parent-death signal: set it again, then
        // make sure the helper did not die in between (hang-up on `alive`).
        crate::sys::prctl(libc::PR_SET_PDEATHSIG, Signal::SIGKILL as libc::c_ulong)
            .step(|| "set the parent-death signal again".to_owned())?;
        let mut fds = [PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
        let gone = poll(&mut fds, PollTimeout::ZERO)
            .map(|n| n > 0)
            .unwrap_or(true);
        if gone {
            return Err(Fail::step("check that the helper is alive", libc::ESRCH));
        }
    }

    let mut errno = nix::errno::Errno::ENOENT;
    for candidate in &exec.candidates {
        match nix::unistd::execve(candidate, &exec.argv, &exec.env) {
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {}
            Err(e) => errno = e,
            Ok(never) => match never {},
        }
    }
    let program = exec
        .argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(Fail {
        report: Report::ExecFailed {
            program,
            errno: errno as i32,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::subordinate_range;

    #[test]
    fn subordinate_ranges_by_name_or_uid_first_wins() {
        let text = "other:1:5\nme:100000:65536\nme:200000:10\n1001:300000:7\nzero:5:0\n";
        assert_eq!(
            subordinate_range(text, Some("me"), 1000),
            Some((100000, 65536))
        );
        assert_eq!(subordinate_range(text, None, 1001), Some((300000, 7)));
        assert_eq!(subordinate_range(text, Some("zero"), 5), None);
        assert_eq!(subordinate_range(text, Some("nobody"), 9), None);
        assert_eq!(
            subordinate_range("garbage\n::\nme:x:y", Some("me"), 0),
            None
        );
    }
}
