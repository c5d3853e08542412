//! An overlay the runner mounts itself (file ops, `COPY --from` sources):
//! lowers are snapshot directories, the upper and work directories live in
//! a scratch directory of the store. The guard unmounts on drop.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Why an overlay could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Creating a directory failed.
    #[error("creating `{}`", path.display())]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The option string is longer than the kernel takes.
    #[error("{count} layers are too many to mount at once (options of {len} bytes)")]
    TooManyLayers {
        /// Layers.
        count: usize,
        /// Option length.
        len: usize,
    },
    /// A path cannot be put in overlay options.
    #[error("path `{}` has a `:` or `,`, which overlay options cannot hold", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
    },
    /// mount(2) failed.
    #[error("mounting overlay on `{}`", path.display())]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// umount(2) failed.
    #[error("unmounting `{}`", path.display())]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// A mounted overlay; unmounted (lazily, if busy) on drop.
#[derive(Debug)]
pub struct MergedMount {
    merged: PathBuf,
    upper: PathBuf,
    mounted: bool,
}

fn mkdir(path: &Path) -> Result<(), MountError> {
    fs_err::create_dir_all(path).map_err(|source| MountError::Mkdir {
        path: path.to_owned(),
        source,
    })
}

impl MergedMount {
    /// Mount `lowers` (lowest first) under `dir/merged`, with `dir/upper`
    /// receiving writes.
    pub fn mount(lowers: &[PathBuf], dir: &Path) -> Result<Self, MountError> {
        // A lower still the upper of a RUN's overlay being unmounted.
        kiln_executor::wait_detached_using(lowers);
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            mkdir(d)?;
        }
        // Lowers are named through short links (`dir/l/0`, ...) so that
        // many layers fit in the one page of mount options.
        let links = dir.join("l");
        mkdir(&links)?;
        let mut lower_list: Vec<PathBuf> = Vec::with_capacity(lowers.len());
        for (i, l) in lowers.iter().rev().enumerate() {
            let link = links.join(i.to_string());
            std::os::unix::fs::symlink(l, &link).map_err(|source| MountError::Mkdir {
                path: link.clone(),
                source,
            })?;
            lower_list.push(link);
        }
        if lower_list.is_empty() {
            let empty = dir.join("empty");
            mkdir(&empty)?;
            lower_list.push(empty);
        }
        for p in lower_list.iter().chain([&upper, &work]) {
            let s = p.to_string_lossy();
            if s.contains(':') || s.contains(',') {
                return Err(MountError::BadPath { path: p.clone() });
            }
        }
        let lowerdir = lower_list
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let data = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        if data.len() >= 3990 {
            return Err(MountError::TooManyLayers {
                count: lowers.len(),
                len: data.len(),
            });
        }
        // `volatile`: unmounting skips the sync of the whole upper file
        // system (hundreds of ms while other writers are busy). The upper
        // becomes a snapshot, which is not synced either (a crash is caught
        // by `fsck --verify`); the work dir, which the flag marks as
        // unusable for another mount, is thrown away with the scratch dir.
        // Kernels before 5.10 do not know the option.
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let volatile = format!("{data},volatile");
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            flags,
            Some(volatile.as_str()),
        )
        .or_else(|e| match e {
            nix::errno::Errno::EINVAL => mount(
                Some("overlay"),
                &merged,
                Some("overlay"),
                flags,
                Some(data.as_str()),
            ),
            e => Err(e),
        })
        .map_err(|source| MountError::Mount {
            path: merged.clone(),
            source,
        })?;
        Ok(Self {
            merged,
            upper,
            mounted: true,
        })
    }

    /// The upper directory (where writes land).
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The merged view.
    pub fn path(&self) -> &Path {
        &self.merged
    }

    /// Unmount and return the upper directory (the changes).
    ///
    /// A mount another thread's `posix_spawn` child briefly holds (it has a
    /// copy of every descriptor, close-on-exec or not, until its `execve`
    /// is done: 1-2 ms for the kiln binary as a sandbox helper, more on a
    /// loaded machine) is busy meanwhile: `EBUSY` is tried again, for up to
    /// about two seconds.
    pub fn unmount(mut self) -> Result<PathBuf, MountError> {
        let mut wait = std::time::Duration::from_millis(1);
        loop {
            match umount2(&self.merged, MntFlags::empty()) {
                Ok(()) => break,
                Err(nix::errno::Errno::EBUSY) if wait <= UNMOUNT_PATIENCE => {
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(source) => {
                    return Err(MountError::Unmount {
                        path: self.merged.clone(),
                        source,
                    });
                }
            }
        }
        self.mounted = false;
        Ok(self.upper.clone())
    }
}

/// The longest wait between two tries of a busy unmount (the waits double
/// from 1 ms up to it: about 2 s in all).
const UNMOUNT_PATIENCE: std::time::Duration = std::time::Duration::from_millis(1024);

impl Drop for MergedMount {
    fn drop(&mut self) {
        if self.mounted {
            // Best effort; MNT_DETACH succeeds even while a file is open.
            let _ = umount2(&self.merged, MntFlags::MNT_DETACH);
        }
    }
}

/// For tests that mount overlays: whether this process may (root); under
/// `CI=true` it must, and the test fails instead of being skipped.
#[cfg(test)]
pub(crate) fn can_mount_in_tests() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        root || !in_ci,
        "this test mounts an overlay: it needs root in CI"
    );
    root
}

#[cfg(test)]
mod tests {
    use super::{MergedMount, can_mount_in_tests};

    /// A mount a descriptor still holds for a moment (as a `posix_spawn`
    /// child does until its `execve`) is unmounted once it is let go; one
    /// held for good is an error after the waits, not a hang.
    #[test]
    fn a_briefly_busy_mount_is_unmounted_once_free() {
        if !can_mount_in_tests() {
            return;
        }
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let lower = root.path().join("lower");
        fs_err::create_dir_all(lower.join("d")).unwrap_or_else(|e| panic!("{e}"));
        fs_err::write(lower.join("d/f"), "f").unwrap_or_else(|e| panic!("{e}"));
        for (name, hold) in [
            ("brief", std::time::Duration::from_millis(30)),
            ("held", std::time::Duration::ZERO),
        ] {
            let dir = root.path().join(name);
            fs_err::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
            let m = MergedMount::mount(std::slice::from_ref(&lower), &dir)
                .unwrap_or_else(|e| panic!("{e}"));
            let file = fs_err::File::open(m.path().join("d/f")).unwrap_or_else(|e| panic!("{e}"));
            if hold.is_zero() {
                let started = std::time::Instant::now();
                let r = m.unmount();
                assert!(r.is_err(), "a mount with an open file was unmounted");
                assert!(started.elapsed() < std::time::Duration::from_secs(10));
                drop(file);
                continue;
            }
            let letting_go = std::thread::spawn(move || {
                std::thread::sleep(hold);
                drop(file);
            });
            let upper = m.unmount().unwrap_or_else(|e| panic!("{e}"));
            assert!(upper.is_dir());
            letting_go.join().unwrap_or_else(|_| panic!("thread"));
        }
    }
}
