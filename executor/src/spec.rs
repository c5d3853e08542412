//! What to run: the sandbox specification handed from the caller to the helper.
//!
//! The whole spec is serialized as JSON and written to the helper over a pipe, so
//! every type here is plain data (paths, strings, numbers).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the sandbox needs to run one process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The root file system.
    pub rootfs: RootfsSpec,
    /// The process to run inside.
    pub process: ProcessSpec,
    /// The hostname inside the UTS namespace.
    pub hostname: String,
    /// Extra mounts, made after `/proc`, `/dev`, `/sys` and `/etc/*`, in order.
    pub mounts: Vec<Mount>,
    /// The network mode.
    pub network: Network,
    /// Resource limits (cgroups); all `None` means no cgroup is made.
    pub limits: Limits,
    /// Where the payload's stdout/stderr go.
    pub stdio: Stdio,
    /// Mount the root file system read-only.
    pub readonly_rootfs: bool,
    /// Lines of `/etc/hosts` beyond the standard localhost entries (`IP NAME...`).
    pub extra_hosts: Vec<String>,
    /// Mount the overlay with `volatile` (default `true`): unmounting then skips the
    /// `syncfs` of the upper directory's whole file system, which costs 10-100 ms per
    /// run. The price: after a machine crash the upper may be incomplete, and
    /// overlayfs leaves `<work>/work/incompat/volatile` behind, refusing to mount
    /// that upper/work pair again until the marker is removed. Fresh uppers (every
    /// RUN step) never see it; a caller reusing an upper across runs (a restarted
    /// container) must remove the marker, or set this to `false` and pay the sync.
    pub volatile_upper: bool,
    /// Nameservers for `/etc/resolv.conf`; empty means copy the host's file
    /// (minus loopback nameservers, which cannot work in a new netns).
    pub dns: Vec<String>,
    /// Run a tiny init (`kiln-init`) as PID 1, like `docker run --init`: it reaps
    /// orphaned zombies and forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and
    /// SIGUSR2 to the payload, which is PID 2. `false` (the default, as in a
    /// Docker/BuildKit `RUN` step) execs the payload directly as PID 1 of its pid
    /// namespace: `echo $$` prints `1`, orphans are not reaped, and the kernel
    /// drops signals PID 1 has no handler for (cancellation always uses SIGKILL
    /// from outside the namespace, which PID 1 cannot ignore).
    #[serde(default)]
    pub init: bool,
    /// The payload's stdin is a terminal (`docker run -t`): after `setsid` it makes
    /// fd 0 its controlling terminal. The caller passes the pty's slave side as
    /// stdin/stdout/stderr with [`crate::Sandbox::spawn_with_io`].
    #[serde(default)]
    pub tty: bool,
    /// Hold the payload after the sandbox is set up until the caller calls
    /// [`crate::Running::release`]: between [`crate::Running::wait_ready`] and the
    /// release the caller can configure the sandbox's network namespace (the pid
    /// returned) or its `/etc/hosts` (`/proc/<pid>/root/etc/hosts`) before the
    /// payload runs. Dropping the `Running` unreleased cancels the start.
    #[serde(default)]
    pub gated: bool,
}

impl SandboxSpec {
    /// A spec with defaults: hostname `kiln`, no mounts, network `none`, no limits,
    /// piped stdout/stderr, the payload as PID 1 (no init).
    pub fn new(rootfs: RootfsSpec, process: ProcessSpec) -> Self {
        Self {
            rootfs,
            process,
            hostname: "kiln".to_owned(),
            mounts: Vec::new(),
            network: Network::None,
            limits: Limits::default(),
            stdio: Stdio::Piped,
            readonly_rootfs: false,
            volatile_upper: true,
            extra_hosts: Vec::new(),
            dns: Vec::new(),
            init: false,
            tty: false,
            gated: false,
        }
    }
}

impl SandboxSpec {
    /// Checks what the helper would otherwise only find out halfway through setup.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let invalid = |reason: String| Err(crate::Error::InvalidSpec { reason });
        if self.process.args.is_empty() {
            return invalid("the process has no arguments".to_owned());
        }
        if !self.process.cwd.starts_with('/') {
            return invalid(format!(
                "the working directory `{}` is not absolute",
                self.process.cwd
            ));
        }
        if self.hostname.is_empty()
            || self.hostname.len() > 64
            || self.hostname.contains(['/', '\0', ' ', '\n'])
        {
            return invalid(format!(
                "the hostname `{}` is not valid",
                self.hostname.escape_debug()
            ));
        }
        for m in &self.mounts {
            if !m.target.starts_with('/') {
                return invalid(format!("the mount target `{}` is not absolute", m.target));
            }
        }
        if let RootfsSpec::Overlay { lowers, .. } = &self.rootfs
            && lowers.is_empty()
        {
            return invalid("the overlay has no lower directory".to_owned());
        }
        let strings = self
            .process
            .args
            .iter()
            .chain(&self.process.env)
            .chain([&self.process.cwd]);
        if let Some(bad) = strings.into_iter().find(|s| s.contains('\0')) {
            return invalid(format!("`{}` contains a NUL byte", bad.escape_debug()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> SandboxSpec {
        SandboxSpec::new(RootfsSpec::Dir("/r".into()), ProcessSpec::new(["true"]))
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(ok().validate().is_ok());
        type Breaker = Box<dyn Fn(&mut SandboxSpec)>;
        let cases: Vec<(Breaker, &str)> = vec![
            (Box::new(|s| s.process.args.clear()), "no arguments"),
            (
                Box::new(|s| s.process.cwd = "work".into()),
                "`work` is not absolute",
            ),
            (Box::new(|s| s.hostname = "a/b".into()), "hostname `a/b`"),
            (Box::new(|s| s.hostname = "x".repeat(65)), "hostname"),
            (
                Box::new(|s| {
                    s.mounts.push(Mount {
                        target: "rel".into(),
                        kind: MountKind::Tmpfs { size: None },
                    })
                }),
                "mount target `rel`",
            ),
            (
                Box::new(|s| {
                    s.rootfs = RootfsSpec::Overlay {
                        lowers: vec![],
                        upper: "/u".into(),
                        work: "/w".into(),
                    }
                }),
                "no lower",
            ),
            (Box::new(|s| s.process.env.push("A=\0".into())), "NUL"),
        ];
        for (break_it, needle) in cases {
            let mut spec = ok();
            break_it(&mut spec);
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}

/// The root file system of the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum RootfsSpec {
    /// An overlay: `lowers` (top-most first, as overlayfs orders them), a writable
    /// `upper` and its `work` directory (same file system as `upper`).
    Overlay {
        /// Read-only layers, top-most first.
        lowers: Vec<PathBuf>,
        /// Receives every write; deletes become whiteouts here.
        upper: PathBuf,
        /// overlayfs's scratch directory.
        work: PathBuf,
    },
    /// A plain directory, bind-mounted as the root.
    Dir(PathBuf),
}

/// The process to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in the `PATH` of `env` when it has no `/`.
    pub args: Vec<String>,
    /// The environment, `KEY=value`.
    pub env: Vec<String>,
    /// The working directory inside the rootfs; created when missing, as Docker does.
    pub cwd: String,
    /// Who the process runs as.
    pub user: User,
    /// The umask, e.g. `0o022`.
    pub umask: u32,
    /// Resource limits set with `setrlimit` before exec.
    pub rlimits: Vec<Rlimit>,
}

impl ProcessSpec {
    /// Runs `args` as root in `/` with Docker's default `PATH`.
    pub fn new<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Self {
        Self {
            args: args.into_iter().map(Into::into).collect(),
            env: vec![DEFAULT_PATH_ENV.to_owned()],
            cwd: "/".to_owned(),
            user: User::Resolved(ResolvedUser::root()),
            umask: 0o022,
            rlimits: Vec::new(),
        }
    }
}

/// Docker's default `PATH`.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who the payload runs as.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum User {
    /// Already resolved ids.
    Resolved(ResolvedUser),
    /// A Dockerfile `USER` / `docker run -u` value (`uid`, `uid:gid`, `name`,
    /// `name:group`, ...), resolved inside the sandbox after `pivot_root` against
    /// the rootfs's own `/etc/passwd` and `/etc/group` (see [`crate::resolve_user`]),
    /// so that symlinks in the rootfs cannot point the lookup at host files.
    Spec(String),
}

/// A user after resolution against the rootfs's `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResolvedUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// The home directory (for `HOME`), `/` when unknown.
    pub home: String,
}

impl ResolvedUser {
    /// uid 0, gid 0, home `/root`.
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/root".to_owned(),
        }
    }
}

/// One `setrlimit` call.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: RlimitResource,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// The resources `docker run --ulimit` accepts that matter in builds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum RlimitResource {
    Nofile,
    Nproc,
    Core,
    Stack,
    Memlock,
    Cpu,
    Fsize,
    As,
}

/// An extra mount inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path inside the rootfs.
    pub target: String,
    /// What to mount there.
    pub kind: MountKind,
}

/// What a [`Mount`] mounts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum MountKind {
    /// A bind mount of a host file or directory (recursive).
    Bind {
        /// The host path.
        source: PathBuf,
        /// Mount it read-only.
        readonly: bool,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// Size limit in bytes, `None` for the kernel default.
        size: Option<u64>,
    },
    /// A persistent cache directory (`RUN --mount=type=cache`): a read-write bind.
    Cache {
        /// The host directory that keeps the cache.
        source: PathBuf,
    },
    /// A secret file (`RUN --mount=type=secret`): a read-only bind of one file.
    Secret {
        /// The host file holding the secret.
        source: PathBuf,
    },
}

/// The network mode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Network {
    /// A fresh network namespace with only `lo`, up.
    None,
    /// The host's network namespace.
    Host,
    /// Join an existing network namespace (e.g. a bridge network made by the runtime).
    Netns(PathBuf),
}

/// cgroup limits; `None` means unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes (swap included when the kernel allows).
    pub memory: Option<u64>,
    /// CPU quota in thousandths of a CPU (`--cpus 1.5` is `1500`).
    pub millicpus: Option<u64>,
    /// Maximum number of processes.
    pub pids: Option<u64>,
}

impl Limits {
    /// True when no limit is set (no cgroup is made then).
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.millicpus.is_none() && self.pids.is_none()
    }
}

/// Where the payload's standard streams go. Stdin is always `/dev/null` for now.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Stdio {
    /// Pipes the caller reads through [`crate::Running::take_stdout`] / `take_stderr`.
    Piped,
    /// The caller's own stdout/stderr.
    Inherit,
    /// Discard.
    Null,
}

/// A process to start inside a running sandbox (`docker exec`): it joins the
/// namespaces and cgroups of the sandbox's PID 1 `pid`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecSpec {
    /// The host pid of the sandbox's PID 1 (see [`crate::Running::wait_ready`]).
    pub pid: u32,
    /// What to run; `User::Spec` is resolved against the sandbox's `/etc/passwd`.
    pub process: ProcessSpec,
    /// fd 0 is a terminal to make the controlling one (`docker exec -t`).
    pub tty: bool,
}
