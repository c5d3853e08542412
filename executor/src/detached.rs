//! Helpers still finishing a sandbox after [`crate::Running::wait_detached`]
//! returned: releasing the sandbox's mount namespace (unmounting its overlay)
//! and removing its cgroup.
//!
//! Until its helper exits, the sandbox's overlay may still be mounted, in a
//! namespace no process is in. Mounting another overlay on a directory that is
//! still an overlay's upper makes the kernel warn (and refuse, with the
//! `index` feature on), so [`crate::Sandbox::spawn`] and the solver's own
//! mounts first wait for the helpers whose upper is one of their lowers
//! ([`wait_detached_using`]). A process that started sandboxes waits for the
//! rest before it exits ([`wait_detached`]), so none outlives it; or, to
//! exit sooner, leaves them to finish on their own ([`release_detached`]),
//! after recording each (its pid, start time and upper) in a directory of
//! the machine's tmpfs, where [`wait_detached_using`] in any later process
//! finds those whose upper it is about to mount and waits for them.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard};

/// A helper handed over, and the identity (device, inode) of its upper.
#[derive(Debug)]
struct Detached {
    child: Child,
    upper: Option<(u64, u64)>,
}

static DETACHED: Mutex<Vec<Detached>> = Mutex::new(Vec::new());

fn list() -> MutexGuard<'static, Vec<Detached>> {
    // The list stays consistent if a holder panicked (pushes and removals).
    DETACHED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The identity of a directory, following symlinks (and surviving renames).
fn identity(path: &Path) -> Option<(u64, u64)> {
    fs_err::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Keeps `child` until it exits; `upper` is its sandbox's upper directory.
pub(crate) fn hand_over(child: Child, upper: Option<&Path>) {
    let upper = upper.and_then(identity);
    let mut list = list();
    // Reap those done already, so a long build keeps no zombies.
    list.retain_mut(|d| matches!(d.child.try_wait(), Ok(None)));
    list.push(Detached { child, upper });
}

/// Waits for the helpers whose sandbox's upper directory is one of `dirs`
/// (by identity: the directory may have been renamed since, into the layer
/// store, say): this process's, and those other processes released
/// ([`release_detached`]). Returns at once when no helper is detached and
/// none is recorded.
pub fn wait_detached_using(dirs: &[PathBuf]) {
    let records = record_dir(false).and_then(|d| recorded(&d).ok().filter(|r| !r.is_empty()));
    if records.is_none() && list().is_empty() {
        return;
    }
    let ids: Vec<(u64, u64)> = dirs.iter().filter_map(|d| identity(d)).collect();
    // (Not under the list's lock: these are other processes' helpers.)
    if let Some(records) = records {
        wait_recorded(records, &ids);
    }
    let mut waiting = {
        let mut list = list();
        let (hit, rest): (Vec<_>, Vec<_>) = list
            .drain(..)
            .partition(|d| d.upper.is_some_and(|u| ids.contains(&u)));
        *list = rest;
        hit
    };
    for d in &mut waiting {
        let _status = d.child.wait();
    }
}

/// For a process about to exit: leaves the helpers still unmounting to
/// finish on their own (whoever inherits them reaps them), each recorded
/// for [`wait_detached_using`] in other processes. A helper that cannot be
/// recorded is waited for, as [`wait_detached`] does.
pub fn release_detached() {
    let all = std::mem::take(&mut *list());
    let dir = record_dir(true);
    for mut d in all {
        if !matches!(d.child.try_wait(), Ok(None)) {
            continue;
        }
        let pid = d.child.id();
        let recorded = match (&dir, d.upper, proc_start(pid)) {
            (Some(dir), Some(upper), Some((start, false))) => {
                write_record(dir, pid, start, upper).is_ok()
            }
            _ => false,
        };
        if !recorded {
            let _status = d.child.wait();
        }
        // (Dropping a `Child` neither kills nor waits for it.)
    }
}

/// The directory of released helpers' records: `kiln-teardown-<euid>` in
/// [`crate::state_root`] (a tmpfs: records do not outlive a reboot, nor do
/// the pids they name), made when missing if `create` (a reader has
/// nothing to read then); `None` if it is missing or not this user's.
fn record_dir(create: bool) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let euid = nix::unistd::geteuid().as_raw();
    let dir = crate::state_root().join(format!("kiln-teardown-{euid}"));
    let m = match fs_err::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(_) if create => {
            let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
            fs_err::symlink_metadata(&dir).ok()?
        }
        Err(_) => return None,
    };
    (m.is_dir() && m.uid() == euid).then_some(dir)
}

/// A released helper: its pid, its start time (clock ticks after boot, as
/// in `/proc/<pid>/stat`: a pid used again has another), its upper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    pid: u32,
    start: u64,
    upper: (u64, u64),
}

/// Records a released helper (a file named by its pid, written whole by a
/// rename).
fn write_record(dir: &Path, pid: u32, start: u64, upper: (u64, u64)) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{pid}.tmp"));
    fs_err::write(&tmp, format!("{start} {} {}\n", upper.0, upper.1))?;
    fs_err::rename(&tmp, dir.join(pid.to_string()))
}

/// The records in `dir` (unreadable or malformed ones are skipped, and
/// removed).
fn recorded(dir: &Path) -> std::io::Result<Vec<(PathBuf, Record)>> {
    let mut out = Vec::new();
    for e in fs_err::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let path = e.path();
        let parsed = fs_err::read_to_string(&path).ok().and_then(|t| {
            let mut it = t.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(start)), Some(Ok(dev)), Some(Ok(ino))) => Some(Record {
                    pid,
                    start,
                    upper: (dev, ino),
                }),
                _ => None,
            }
        });
        match parsed {
            Some(r) => out.push((path, r)),
            None => {
                let _ = fs_err::remove_file(&path);
            }
        }
    }
    Ok(out)
}

/// Waits for the recorded helpers whose upper is one of `ids`; removes the
/// records of helpers that are gone.
fn wait_recorded(records: Vec<(PathBuf, Record)>, ids: &[(u64, u64)]) {
    for (path, r) in records {
        if ids.contains(&r.upper) {
            wait_gone(r.pid, r.start);
        } else if is_running(r.pid, r.start) {
            continue;
        }
        let _ = fs_err::remove_file(&path);
    }
}

/// The start time of process `pid` and whether it has exited (a zombie,
/// or dead): `None` if there is no such process.
fn proc_start(pid: u32) -> Option<(u64, bool)> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: the comm may hold anything, so fields
    // are counted after its last `)`; the start time is field 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, matches!(state, "Z" | "X")))
}

/// Whether the helper `pid` started at `start` is still running (its
/// exit comes after its mount namespace is released).
fn is_running(pid: u32, start: u64) -> bool {
    proc_start(pid) == Some((start, false))
}

/// Waits (at most a minute) until the helper `pid` started at `start` is
/// no longer running: on a pidfd when the kernel has them, else polling.
fn wait_gone(pid: u32, start: u64) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // SAFETY: pidfd_open takes a pid and flags and returns a new file
    // descriptor, owned here, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let pidfd = (fd >= 0).then(|| {
        // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    });
    // (Checked after the pidfd is open: it then names that process, even
    // if the pid is used again.)
    while is_running(pid, start) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match &pidfd {
            Some(fd) => {
                use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
                use std::os::fd::AsFd as _;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let _ = poll(&mut fds, PollTimeout::from(ms));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
}

/// Waits for every detached helper: call before the process exits.
pub fn wait_detached() {
    let mut all = std::mem::take(&mut *list());
    for d in &mut all {
        let _status = d.child.wait();
    }
}

/// How many detached helpers have not been reaped yet (for tests).
pub fn detached_count() -> usize {
    list().len()
}
