//! Snapshots a later build may take over.
//!
//! A COPY run again in an edit loop writes a new layer that differs from its
//! last result in a few files. Its upper starts as that result: either a
//! clone of the last snapshot (a hard link per file, made beside the build),
//! or, for a small layer, the last snapshot directory itself, taken over
//! ([`Store::take_snapshot`]). That is only done when nothing can miss the
//! directory:
//!
//! - the layer has its tar stored: as a blob, or packed (zstd-compressed,
//!   as a commit with [`crate::WriteOptions::keep_blob_below`] keeps it,
//!   see [`Store::has_layer_tar`]); whoever needs the snapshot again
//!   unpacks it from there ([`Store::snapshot_for`]);
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

use crate::blob::BlobWriter;
use crate::containers::LeaseKind;
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::store::{MEDIA_LAYER_ZSTD, SNAPSHOT_PREFIX, Store};

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
    /// module docs): the layer's tar is stored, no container leases it, no
    /// [`SnapshotUse`] is held. The layer is then tar-only until it is
    /// unpacked again. False, with nothing changed, otherwise.
    pub fn take_snapshot(&self, diff_id: &Digest, dest: &Path) -> Result<bool> {
        let _store = self.lock_shared()?;
        if !self.has_layer_tar(diff_id)?
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

/// The tar of a layer on its way to the hasher, also packed (zstd, level 1)
/// into a blob while it stays below a limit (see
/// [`crate::WriteOptions::keep_blob_below`]). Packed, a layer of many small
/// files takes a hundredth of its size (s3's 5,000 files: 5.2 MB of tar,
/// 48 KB packed): fewer bytes to write and sync, and a store that grows by
/// that much per edit-loop build. The copy is a convenience: a failure to
/// write it only drops it.
pub(crate) struct BlobTee<'a, W> {
    inner: &'a mut W,
    copy: Option<zstd::stream::write::Encoder<'static, BlobWriter>>,
    written: u64,
    limit: u64,
}

impl<'a, W: Write> BlobTee<'a, W> {
    /// Packs into a new blob of `store` when `limit` is given.
    pub(crate) fn new(inner: &'a mut W, store: &Store, limit: Option<u64>) -> Self {
        let copy = limit
            .and_then(|_| store.blob_writer_sized(64 << 10).ok())
            .and_then(|w| zstd::stream::write::Encoder::new(w, 1).ok());
        Self {
            inner,
            copy,
            written: 0,
            limit: limit.unwrap_or(0),
        }
    }

    /// The packed copy, if the whole tar went into it: finished, not yet
    /// committed.
    pub(crate) fn into_copy(mut self) -> Option<BlobWriter> {
        self.copy.take()?.finish().ok()
    }
}

impl<W: Write> Write for BlobTee<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some(enc) = &mut self.copy {
            let fits = self.written + (n as u64) < self.limit;
            if fits && enc.write_all(&data[..n]).is_ok() {
                self.written += n as u64;
            } else {
                // (Dropped, the blob writer removes its temp file.)
                self.copy = None;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Store {
    /// Stores the packed copy a [`BlobTee`] made of the layer `diff_id`
    /// (synced), recorded as its zstd variant. Best effort: on failure the
    /// layer just has no stored tar.
    pub(crate) fn keep_layer_blob(&self, copy: BlobWriter, diff_id: &Digest) {
        if let Ok((digest, size)) = copy.commit(None, "packed layer") {
            let _ = self.record_compressed_layer(diff_id, &digest, MEDIA_LAYER_ZSTD, size);
        }
    }
}
