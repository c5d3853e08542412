//! Snapshots a later build may take over.
//!
//! A COPY run again in an edit loop writes a new layer that differs from its
//! last result in a few files. Its upper starts as that result: either a
//! clone of the last snapshot (a hard link per file, made beside the build),
//! or, for a small layer, the last snapshot directory itself, taken over
//! ([`Store::take_snapshot`]). That is only done when nothing can miss the
//! directory:
//!
//! - the layer has a blob (its tar, kept at commit with
//!   [`crate::WriteOptions::keep_blob_below`]): whoever needs the snapshot
//!   again unpacks it from there ([`Store::snapshot_for`]);
//! - no container holds a lease on the layer;
//! - no build mounts or reads it: users hold a shared lock on it
//!   ([`Store::use_snapshot`]) and the taker needs the exclusive one.
//!
//! The use lock is an open-file-description lock on byte 0 of the
//! snapshot's `.lock` file, independent of the `flock` that serializes
//! unpacking and committing the snapshot.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rusqlite::params;

use crate::blob::{sync_dir, unique_name};
use crate::containers::LeaseKind;
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::store::{SNAPSHOT_PREFIX, Store};

/// A build's use of a snapshot (see [`Store::use_snapshot`]): while it is
/// held, no other build takes the directory over.
#[derive(Debug)]
pub struct SnapshotUse {
    _file: fs_err::File,
}

/// Takes (`exclusive`: the write lock) or waits for (`wait`) the use lock
/// of an open `.lock` file. False when `wait` is off and it is held.
fn use_lock(file: &fs_err::File, exclusive: bool, wait: bool) -> io::Result<bool> {
    use nix::fcntl::{FcntlArg, fcntl};
    let kind = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    let fl = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    loop {
        let arg = if wait {
            FcntlArg::F_OFD_SETLKW(&fl)
        } else {
            FcntlArg::F_OFD_SETLK(&fl)
        };
        match fcntl(file.file(), arg) {
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) if !wait => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Store {
    /// The `.lock` file of `diff_id`'s snapshot, open for reading and
    /// writing (the use lock needs both).
    fn snapshot_lock_file(&self, diff_id: &Digest) -> Result<fs_err::File> {
        let path = self
            .root()
            .join("snapshots")
            .join(format!("{SNAPSHOT_PREFIX}{}.lock", diff_id.hex()));
        fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("opening snapshot lock", &path, e))
    }

    /// [`Store::snapshot_for`], holding the snapshot's use lock (shared)
    /// first: while the returned guard lives, no build takes the directory
    /// over ([`Store::take_snapshot`]).
    pub fn use_snapshot(&self, diff_id: &Digest) -> Result<(PathBuf, SnapshotUse)> {
        let file = self.snapshot_lock_file(diff_id)?;
        use_lock(&file, false, true)
            .map_err(|e| StoreError::io("locking snapshot", file.path(), e))?;
        let dir = self.snapshot_for(diff_id)?;
        Ok((dir, SnapshotUse { _file: file }))
    }

    /// Moves the snapshot directory of `diff_id` to `dest` (which must not
    /// exist, on the store's filesystem), if nothing can miss it (see the
    /// module docs): the layer has a blob, no container leases it, no
    /// [`SnapshotUse`] is held. The layer is then blob-only until it is
    /// unpacked again. False, with nothing changed, otherwise.
    pub fn take_snapshot(&self, diff_id: &Digest, dest: &Path) -> Result<bool> {
        let _store = self.lock_shared()?;
        if !self.has_blob(diff_id)
            || !self
                .lease_holders(LeaseKind::Layer, &diff_id.to_string())?
                .is_empty()
        {
            return Ok(false);
        }
        let file = self.snapshot_lock_file(diff_id)?;
        if !use_lock(&file, true, false)
            .map_err(|e| StoreError::io("locking snapshot", file.path(), e))?
        {
            return Ok(false);
        }
        // (And no unpack or commit of the same layer meanwhile.)
        let (id, dir, _unpacking) = self.lock_snapshot(diff_id)?;
        if !dir.is_dir() {
            return Ok(false);
        }
        fs_err::rename(&dir, dest).map_err(|e| StoreError::io("taking snapshot", &dir, e))?;
        self.db()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])
            .map_err(self.db_err("forgetting snapshot"))?;
        Ok(true)
    }
}

/// The tar of a layer on its way to the hasher, copied to a temp file while
/// it stays below a limit (see [`crate::WriteOptions::keep_blob_below`]).
/// The copy is a convenience: a failure to write it only drops it.
pub(crate) struct BlobTee<'a, W> {
    inner: &'a mut W,
    copy: Option<(io::BufWriter<fs_err::File>, PathBuf)>,
    written: u64,
    limit: u64,
}

impl<'a, W: Write> BlobTee<'a, W> {
    /// Copies to a new file in `tmp_dir` when `limit` is given.
    pub(crate) fn new(inner: &'a mut W, tmp_dir: &Path, limit: Option<u64>) -> Self {
        let copy = limit.and_then(|_| {
            let path = tmp_dir.join(unique_name("layer-blob"));
            fs_err::File::create(&path)
                .ok()
                .map(|f| (io::BufWriter::with_capacity(1 << 20, f), path))
        });
        Self {
            inner,
            copy,
            written: 0,
            limit: limit.unwrap_or(0),
        }
    }

    /// The copy, if it was kept whole: flushed, not yet synced.
    pub(crate) fn into_copy(mut self) -> Option<(fs_err::File, PathBuf)> {
        let (f, path) = self.copy.take()?;
        match f.into_inner() {
            Ok(f) => Some((f, path)),
            Err(_) => {
                let _ = fs_err::remove_file(path);
                None
            }
        }
    }
}

impl<W> Drop for BlobTee<'_, W> {
    fn drop(&mut self) {
        drop_copy(&mut self.copy);
    }
}

/// Drops a [`BlobTee`]'s copy, removing its file.
fn drop_copy(copy: &mut Option<(io::BufWriter<fs_err::File>, PathBuf)>) {
    if let Some((f, path)) = copy.take() {
        drop(f);
        let _ = fs_err::remove_file(path);
    }
}

impl<W: Write> Write for BlobTee<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some((f, _)) = &mut self.copy {
            let fits = self.written + (n as u64) < self.limit;
            if fits && f.write_all(&data[..n]).is_ok() {
                self.written += n as u64;
            } else {
                drop_copy(&mut self.copy);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Store {
    /// Stores the copy a [`BlobTee`] made of the layer `diff_id` as its
    /// blob (synced). Best effort: on failure the layer just has no blob.
    /// (Not a [`crate::BlobWriter`]: that one hashes what it is given, and
    /// the layer's digest is known already.)
    pub(crate) fn keep_layer_blob(&self, copy: (fs_err::File, PathBuf), diff_id: &Digest) {
        let (file, temp) = copy;
        let dest = self.blob_path(diff_id);
        if file.sync_all().is_ok()
            && (dest.is_file() || fs_err::rename(&temp, &dest).is_ok())
            && let Some(d) = dest.parent()
        {
            let _ = sync_dir(d);
        }
        let _ = fs_err::remove_file(&temp);
    }
}
