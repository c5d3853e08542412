//! Incremental COPY: a regular file that has not changed since the previous
//! run of the same COPY (same instruction, same parent layers, same fixed
//! time) is hard-linked from that run's snapshot instead of copied again.
//!
//! Creating thousands of new inodes is most of a small-file COPY's cost; a
//! link shares the inode the previous run wrote. That is sound because:
//! - a file is linked only when its source is the same inode with the same
//!   size, mtime and ctime as when the previous run copied it (any write,
//!   chmod, chown or xattr change moves ctime), and only sources whose ctime
//!   was safely older than that run's start were remembered (a change in the
//!   same clock tick as the stat could not be seen);
//! - the linked file must still look exactly like a fresh copy (type, size,
//!   mode, owner, mtime), and snapshots are never written in place: a later
//!   step's overlay copies a file up before changing it;
//! - only files whose parent directory this copy created are linked: the
//!   link is made in the overlay's upper directory, below a directory the
//!   overlay has not looked up entries in.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// What identifies a source file's state: if all of it is unchanged, so are
/// its content and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity(u64, u64, u64, i64, i64, i64, i64, u32, u32, u32);

impl FileIdentity {
    /// The identity of a file from its `lstat`.
    pub fn of(meta: &Metadata) -> FileIdentity {
        FileIdentity(
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.mode(),
            meta.uid(),
            meta.gid(),
        )
    }

    /// ctime in nanoseconds since the epoch.
    fn ctime_ns(&self) -> i128 {
        i128::from(self.5) * 1_000_000_000 + i128::from(self.6)
    }
}

/// How a COPY may reuse its previous result, and what it records for the
/// next one.
#[derive(Debug, Default)]
pub struct Reuse {
    /// The previous result's snapshot; `None`: nothing to link from (the
    /// copy still records identities for next time).
    pub prev_root: Option<PathBuf>,
    /// Source identities of the regular files in `prev_root`, by path below
    /// the destination root.
    pub prev: HashMap<String, FileIdentity>,
    /// Where new entries really land: the overlay's upper directory (or the
    /// destination root itself when nothing is mounted).
    pub upper: PathBuf,
    /// Sources changed after this time are not remembered (see the module
    /// documentation).
    pub racy_after_ns: i128,
}

/// Changes within this long before a copy starts may share a clock tick
/// with the copy's `lstat`.
const RACY_WINDOW: Duration = Duration::from_millis(50);

impl Reuse {
    /// A reuse of `prev_root` (with its identities) writing into `upper`.
    pub fn new(
        prev_root: Option<PathBuf>,
        prev: HashMap<String, FileIdentity>,
        upper: PathBuf,
    ) -> Reuse {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(RACY_WINDOW);
        Reuse {
            prev_root,
            prev,
            upper,
            racy_after_ns: i128::try_from(now.as_nanos()).unwrap_or(i128::MAX),
        }
    }

    /// Whether a source in this state may be remembered.
    pub(super) fn rememberable(&self, id: &FileIdentity) -> bool {
        id.ctime_ns() < self.racy_after_ns
    }

    /// Links `rel` from the previous result when its source is unchanged and
    /// the previous file looks as `expect` says; false when it did not.
    pub(super) fn try_link(&self, rel: &str, id: &FileIdentity, expect: &Expected) -> bool {
        let Some(prev_root) = &self.prev_root else {
            return false;
        };
        if self.prev.get(rel) != Some(id) {
            return false;
        }
        let prev = prev_root.join(rel);
        let Ok(pm) = fs_err::symlink_metadata(&prev) else {
            return false;
        };
        let same = pm.file_type().is_file()
            && pm.size() == expect.size
            && pm.mode() & 0o7777 == expect.mode
            && expect.owner.is_none_or(|o| (pm.uid(), pm.gid()) == o)
            && (pm.mtime(), pm.mtime_nsec()) == expect.mtime;
        same && fs_err::hard_link(&prev, self.upper.join(rel)).is_ok()
    }
}

/// What a fresh copy of a file would look like.
#[derive(Debug)]
pub(super) struct Expected {
    pub size: u64,
    pub mode: u32,
    pub owner: Option<(u32, u32)>,
    pub mtime: (i64, i64),
}

/// The identities a COPY remembers, with the layer they went into, saved
/// under the store for the next run of the same COPY.
#[derive(Debug, Serialize, Deserialize)]
pub struct CopyMemo {
    /// The result layer's diffID.
    pub diff_id: String,
    /// Path below the destination root -> source identity.
    pub files: Vec<(String, FileIdentity)>,
}

impl CopyMemo {
    /// The memo at `path`, if there is a readable one.
    pub fn load(path: &Path) -> Option<CopyMemo> {
        let bytes = fs_err::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the memo to `path` (temp file + rename: a reader sees the old
    /// memo or the new one).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs_err::create_dir_all(dir)?;
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        fs_err::write(tmp.path(), bytes)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}
