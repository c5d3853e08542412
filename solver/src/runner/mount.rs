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
    pub fn unmount(mut self) -> Result<PathBuf, MountError> {
        umount2(&self.merged, MntFlags::empty()).map_err(|source| MountError::Unmount {
            path: self.merged.clone(),
            source,
        })?;
        self.mounted = false;
        Ok(self.upper.clone())
    }
}

impl Drop for MergedMount {
    fn drop(&mut self) {
        if self.mounted {
            // Best effort; MNT_DETACH succeeds even while a file is open.
            let _ = umount2(&self.merged, MntFlags::MNT_DETACH);
        }
    }
}
