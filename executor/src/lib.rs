//! kiln's sandbox: run one process in fresh namespaces over an overlay rootfs.
//!
//! The caller builds a [`SandboxSpec`] (rootfs, process, mounts, network, limits)
//! and starts it with [`Sandbox::spawn`], getting a [`Running`] whose stdout and
//! stderr are plain pipes and whose [`Running::wait`] returns an [`ExitStatus`].
//! Dropping a `Running` kills everything in the sandbox. The API is blocking;
//! async callers use `spawn_blocking` or wrap the pipes.
//!
//! The work happens in a re-executed helper (see [`helper_main_if_requested`]): the
//! caller never forks by itself, so it is safe from a multi-threaded tokio process.
//! The helper makes the namespaces (user when rootless, uts, ipc, pid, net; mount
//! in the sandbox's init), mounts the overlay with the new mount API (no limit on
//! the number of lowers), pivots into it, mounts `/proc`, `/dev`, `/sys` and the
//! generated `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, and runs the
//! payload with Docker's default capability set and `no_new_privs`: as PID 1 of its
//! pid namespace by default (as a Docker/BuildKit `RUN` step), or as PID 2 under a
//! tiny init that reaps zombies and forwards signals with [`SandboxSpec::init`]
//! (`docker run --init`).
//!
//! What a caller can rely on:
//!
//! - setup failures come back as [`Error::Setup`] naming the step and its paths,
//!   exec failures as [`Error::Exec`], an unknown `USER` as [`Error::User`];
//! - [`ExitStatus`] is the payload's code or signal, `OomKilled` when the memory
//!   cgroup killed it, `Cancelled` after [`Running::kill`], a drop or SIGINT/SIGTERM
//!   to the helper;
//! - when `wait` returns, nothing of the sandbox remains: no process, mount, cgroup
//!   or temp directory, and on an overlay the mount-point stubs it had to create
//!   (`/etc/hosts` in an image without one, ...) are gone from the upper again. If
//!   the caller is SIGKILLed, the helper still kills the sandbox and cleans up;
//! - the overlay is mounted `volatile` by default (see
//!   [`SandboxSpec::volatile_upper`]).
//!
//! ```no_run
//! use kiln_executor::{ProcessSpec, RootfsSpec, Sandbox, SandboxSpec};
//! # fn main() -> Result<(), kiln_executor::Error> {
//! let rootfs = RootfsSpec::Overlay {
//!     lowers: vec!["/var/lib/kiln/snapshots/1/fs".into()],
//!     upper: "/tmp/upper".into(),
//!     work: "/tmp/work".into(),
//! };
//! let spec = SandboxSpec::new(rootfs, ProcessSpec::new(["echo", "hello"]));
//! let out = Sandbox::new().output(&spec)?;
//! assert!(out.status.success());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![allow(
    unsafe_code,
    reason = "the executor is the one crate that talks to the kernel directly"
)]

mod alloc;
mod caps;
mod cgroup;
mod detached;
mod error;
mod fail;
mod helper;
mod pty;
mod rootfs;
mod sandbox;
mod spec;
mod stubs;
mod sys;
mod user;

pub use alloc::{idle_priority, tune_allocator};
pub use caps::{DOCKER_DEFAULT_CAPS, docker_default_mask};
pub use detached::{detached_count, release_detached, wait_detached, wait_detached_using};
pub use error::{Error, Result};
pub use helper::{EXEC_ARG, HELPER_ARG, helper_main_if_requested, state_root};
pub use pty::{Pty, WinSize, get_winsize, openpty, set_winsize};
pub use sandbox::{ExitStatus, Io, Output, Prepared, Running, Sandbox};
pub use spec::{
    DEFAULT_PATH_ENV, ExecSpec, Limits, Mount, MountKind, Network, ProcessSpec, ResolvedUser,
    Rlimit, RlimitResource, RootfsSpec, SandboxSpec, Stdio, User,
};
pub use user::{UserError, resolve_user};
