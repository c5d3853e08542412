//! kiln-runtime: run images as containers, with no daemon.
//!
//! A container is a record in the store's database (see
//! [`kiln_cache::ContainerRecord`]) plus a directory `$KILN_ROOT/containers/<id>/`
//! holding its writable `upper/` and `work/` over the image's shared, read-only
//! layer snapshots, and its log `<id>-json.log`. [`run`] creates and starts one:
//! in the foreground the calling kiln process waits for it; detached (`-d`) a small
//! supervisor process (the kiln binary re-executed with [`SUPERVISOR_ARG`], in its
//! own session) keeps its logs, records its exit and applies its restart policy.
//! Every start goes through [`kiln_executor::Sandbox`].
//!
//! Volumes live in `$KILN_ROOT/volumes/<name>/_data`; see [`volume`].
#![deny(missing_docs)]

mod config;
mod container;
mod error;
pub mod network;
mod supervisor;
mod tty;
pub mod volume;

pub use config::{
    ContainerConfig, MountConfig, MountSource, RestartPolicy, RunOptions, parse_bytes, parse_cpus,
    parse_memory,
};
pub use container::{
    ContainerInfo, ExecOptions, LogEntry, RunOutcome, container_dir, exec, inspect, kill, list,
    logs, remove, run, start, stop,
};
pub use error::{Error, Result};
pub use supervisor::{SUPERVISOR_ARG, supervisor_main_if_requested};
