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
//! rest before it exits ([`wait_detached`]), so none outlives it.

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
/// store, say). Returns at once when no helper is detached.
pub fn wait_detached_using(dirs: &[PathBuf]) {
    let mut waiting = {
        let mut list = list();
        if list.is_empty() {
            return;
        }
        let ids: Vec<(u64, u64)> = dirs.iter().filter_map(|d| identity(d)).collect();
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
