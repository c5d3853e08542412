//! Layers whose only copy is their snapshot directory.
//!
//! On the build path a step's overlay upperdir *becomes* the snapshot of its
//! layer ([`Store::commit_snapshot_from_dir`]): it is hashed as the layer tar
//! it stands for (the diffID) without writing that tar, then renamed into
//! `snapshots/`. The tar is made only when something needs the bytes (`save`,
//! `--output`, push), by [`Store::open_layer`], which streams it from the
//! directory and checks that it still hashes to the diffID. Such a layer
//! has no blob until then; [`Store::has_layer`] counts either form. (A
//! small layer's tar is also kept packed at commit, when asked: see
//! [`crate::WriteOptions::keep_blob_below`] and [`Store::packed_layer`].)
//!
//! The writer is deterministic, so the same directory always gives the same
//! bytes. `SOURCE_DATE_EPOCH` clamping is applied to the directory itself
//! before hashing, so the directory alone determines its tar.
//!
//! Snapshot directories are not fsynced (as containerd's overlay
//! snapshotter does not): a crash of the kiln process loses nothing, a
//! power loss may leave a recorded snapshot incomplete; `kiln system fsck
//! --verify` regenerates every blob-less layer and reports a mismatch.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use rusqlite::{OptionalExtension, params};

use crate::blob::{BlobReader, into_store_error};
use crate::digest::{Digest, Hasher};
use crate::error::{Result, StoreError};
use crate::image::LayerInfo;
use crate::layer::{self, ContentDigests, KnownFiles, LayerError, LayerStats, WriteOptions};
use crate::store::{MEDIA_LAYER_ZSTD, SNAPSHOT_PREFIX, Store, now};

impl Store {
    /// Commits `upper` (an overlay upperdir or a plain tree, inside the
    /// store's `tmp/`) as a layer without writing its tar: hashes the tar
    /// it stands for, then moves the directory to `snapshots/` as the
    /// layer's snapshot. If the layer exists already, `upper` is removed.
    pub fn commit_snapshot_from_dir(&self, upper: &Path, opts: &WriteOptions) -> Result<LayerInfo> {
        self.commit_snapshot_reusing(upper, opts, None)
            .map(|(info, _, _)| info)
    }

    /// [`Store::commit_snapshot_from_dir`]; with `known`, hashing the layer
    /// with the contents it has for files linked from another snapshot,
    /// and giving back the new layer's small files' contents for the next
    /// time (see [`KnownFiles`]); with [`WriteOptions::content_digests`],
    /// also its regular files' content digests (see [`ContentDigests`]).
    pub fn commit_snapshot_reusing(
        &self,
        upper: &Path,
        opts: &WriteOptions,
        known: Option<KnownFiles>,
    ) -> Result<(LayerInfo, Option<KnownFiles>, Option<ContentDigests>)> {
        self.commit_snapshot_gated(upper, opts, known, |_, _| {}, || ())
    }

    /// [`Store::commit_snapshot_reusing`], calling `hashed` with the layer
    /// and the recorded contents (which it may take) once the layer is
    /// hashed, then `gate`, holding what it returns while `upper` is moved
    /// (or removed) and recorded: for an upper that other mounts may be
    /// reading from by its path until then.
    pub fn commit_snapshot_gated<G>(
        &self,
        upper: &Path,
        opts: &WriteOptions,
        known: Option<KnownFiles>,
        hashed: impl FnOnce(&LayerInfo, &mut Option<KnownFiles>),
        gate: impl FnOnce() -> G,
    ) -> Result<(LayerInfo, Option<KnownFiles>, Option<ContentDigests>)> {
        let _lock = self.lock_shared()?;
        if let Some(epoch) = opts.source_date_epoch {
            clamp_mtimes(upper, epoch)?;
        }
        // Hashed on another thread while the tree is walked and read; a
        // small layer's tar kept too when asked.
        let mut hw = crate::digest::PipeHasher::new();
        // Big files go to the hasher as mappings, unless the tar is kept
        // (then the copy needs the bytes).
        let tap = hw.tap().filter(|_| opts.keep_blob_below.is_none());
        let mut tee = crate::snapshot_take::BlobTee::new(&mut hw, self, opts.keep_blob_below);
        let layer_err = |source| StoreError::Layer {
            what: upper.display().to_string(),
            source,
        };
        let (_, mut recorded, digests) =
            layer::write_layer_with(upper, &mut tee, opts, known, tap).map_err(layer_err)?;
        let copy = tee.into_copy();
        let (diff_id, size) = hw
            .finish()
            .map_err(|e| layer_err(LayerError::WriteTar(e)))?;
        crate::timing::mark("layer hashed");
        if let Some(copy) = copy {
            self.keep_layer_blob(copy, &diff_id);
        }
        hashed(
            &LayerInfo {
                diff_id: diff_id.clone(),
                size,
            },
            &mut recorded,
        );
        let _gate = gate();
        let (id, dir, _snapshot_lock) = self.lock_snapshot(&diff_id)?;
        if dir.is_dir() {
            let _ = fs_err::remove_dir_all(upper);
        } else {
            // The root of a snapshot is the root of the overlays it takes
            // part in: it must not keep a scratch directory's mode.
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(upper, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| StoreError::io("setting snapshot mode", upper, e))?;
            fs_err::rename(upper, &dir)
                .map_err(|e| StoreError::io("committing snapshot", &dir, e))?;
        }
        let t = now();
        {
            let conn = self.db();
            conn.execute(
                "INSERT OR IGNORE INTO layers (diff_id, size, created) VALUES (?1, ?2, ?3)",
                params![diff_id.to_string(), size as i64, t],
            )
            .map_err(self.db_err("recording layer"))?;
            conn.execute(
                "INSERT INTO snapshots (id, diff_id, created, last_used) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(id) DO UPDATE SET last_used = ?3",
                params![id, diff_id.to_string(), t],
            )
            .map_err(self.db_err("recording snapshot"))?;
        }
        Ok((LayerInfo { diff_id, size }, recorded, digests))
    }

    /// The uncompressed size recorded for layer `diff_id`, if it is recorded.
    pub(crate) fn recorded_layer_size(&self, diff_id: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> = self
            .db()
            .query_row(
                "SELECT size FROM layers WHERE diff_id = ?1",
                [diff_id.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db_err("reading layer"))?;
        Ok(size.map(|s| u64::try_from(s).unwrap_or(0)))
    }

    /// The directory of `diff_id`'s snapshot, if it is unpacked.
    pub fn snapshot_dir(&self, diff_id: &Digest) -> Option<PathBuf> {
        let dir = self
            .root()
            .join("snapshots")
            .join(format!("{SNAPSHOT_PREFIX}{}", diff_id.hex()));
        dir.is_dir().then_some(dir)
    }

    /// Whether the layer `diff_id` is here: as a blob, packed (see
    /// [`Store::packed_layer`]) or as a snapshot.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.has_blob(diff_id)
            || self.snapshot_dir(diff_id).is_some()
            || self.packed_layer(diff_id).ok().flatten().is_some()
    }

    /// Whether the tar of layer `diff_id` is stored, as a blob or packed:
    /// its snapshot is then not its only copy (see [`Store::take_snapshot`]).
    pub fn has_layer_tar(&self, diff_id: &Digest) -> Result<bool> {
        Ok(self.has_blob(diff_id) || self.packed_layer(diff_id)?.is_some())
    }

    /// The blob holding layer `diff_id` zstd-compressed, if there is one:
    /// the form a small layer's tar is kept in at commit (see
    /// [`crate::WriteOptions::keep_blob_below`]), or a variant an export
    /// made. The layer can be read back from it ([`Store::open_layer`]).
    pub fn packed_layer(&self, diff_id: &Digest) -> Result<Option<Digest>> {
        Ok(self
            .compressed_layer(diff_id, MEDIA_LAYER_ZSTD)?
            .map(|(blob, _)| blob))
    }

    /// The uncompressed size of layer `diff_id`: its blob's length, or the
    /// size recorded for it (a packed or snapshot layer). Reads no layer
    /// content.
    pub fn layer_size(&self, diff_id: &Digest) -> Result<Option<u64>> {
        if let Some(n) = self.blob_len(diff_id) {
            return Ok(Some(n));
        }
        if !self.has_layer(diff_id) {
            return Ok(None);
        }
        self.recorded_layer_size(diff_id)
    }

    /// Opens the uncompressed tar of layer `diff_id`: its blob, or else its
    /// packed blob decompressed, or else a stream made from its snapshot.
    /// Either way the reader fails at its end if the bytes do not hash to
    /// `diff_id`.
    pub fn open_layer(&self, diff_id: &Digest) -> Result<LayerReader> {
        if self.has_blob(diff_id) {
            return self.open_blob(diff_id).map(LayerReader::Blob);
        }
        let missing = || StoreError::BlobMissing {
            digest: diff_id.to_string(),
        };
        let size = || self.recorded_layer_size(diff_id)?.ok_or_else(missing);
        if let Some(blob) = self.packed_layer(diff_id)? {
            let reader = self.open_blob(&blob)?;
            return PackedTar::new(reader, self.blob_path(&blob), diff_id.clone(), size()?)
                .map(|p| LayerReader::Packed(Box::new(p)));
        }
        let dir = self.snapshot_dir(diff_id).ok_or_else(missing)?;
        SnapshotTar::spawn(dir, diff_id.clone(), size()?).map(LayerReader::Snapshot)
    }

    /// Makes sure layer `diff_id` has a blob (writing its tar from the
    /// snapshot if it has none), verified against the diffID.
    pub fn ensure_layer_blob(&self, diff_id: &Digest) -> Result<()> {
        if self.has_blob(diff_id) {
            return Ok(());
        }
        let _lock = self.lock_shared()?;
        let mut r = self.open_layer(diff_id)?;
        let mut w = self.blob_writer()?;
        io::copy(&mut r, &mut w).map_err(|e| r.error(e))?;
        w.commit(Some(diff_id), "layer")?;
        Ok(())
    }

    /// Reads layer `diff_id` through and checks that it hashes to its name.
    pub fn verify_layer(&self, diff_id: &Digest) -> Result<()> {
        let mut r = self.open_layer(diff_id)?;
        io::copy(&mut r, &mut io::sink())
            .map(|_| ())
            .map_err(|e| r.error(e))
    }
}

/// The uncompressed tar of a layer: its blob, its packed blob decompressed,
/// or a stream from its snapshot.
#[derive(Debug)]
pub enum LayerReader {
    /// A stored blob.
    Blob(BlobReader),
    /// A packed (zstd) blob, decompressed while it is read.
    Packed(Box<PackedTar>),
    /// Made from the snapshot directory while it is read.
    Snapshot(SnapshotTar),
}

impl LayerReader {
    /// The tar's size in bytes.
    pub fn len(&self) -> Result<u64> {
        match self {
            LayerReader::Blob(b) => b.len(),
            LayerReader::Packed(p) => Ok(p.size),
            LayerReader::Snapshot(s) => Ok(s.size),
        }
    }

    /// Whether the tar is empty (never, for a real layer).
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Turns an I/O error of this reader into the store error it carries
    /// (a corrupt layer) or one naming the layer.
    pub fn error(&self, e: io::Error) -> StoreError {
        let path = match self {
            LayerReader::Blob(_) => PathBuf::from("<blob>"),
            LayerReader::Packed(p) => p.path.clone(),
            LayerReader::Snapshot(s) => s.dir.clone(),
        };
        into_store_error(e, &path)
    }
}

impl Read for LayerReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LayerReader::Blob(b) => b.read(buf),
            LayerReader::Packed(p) => p.read(buf),
            LayerReader::Snapshot(s) => s.read(buf),
        }
    }
}

/// Checks what `hasher` took in (once: it is taken) against `digest`; a
/// mismatch is an `InvalidData` error carrying [`StoreError::Corrupt`].
fn check_hashed(hasher: &mut Option<Hasher>, digest: &Digest) -> io::Result<()> {
    if let Some(h) = hasher.take() {
        let actual = h.finish();
        if actual != *digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                StoreError::Corrupt {
                    digest: digest.to_string(),
                    actual: actual.to_string(),
                },
            ));
        }
    }
    Ok(())
}

/// A layer tar decompressed from its packed blob. The blob reader checks
/// the blob against its own name, this one the tar against the diffID.
pub struct PackedTar {
    decoder: zstd::stream::read::Decoder<'static, io::BufReader<BlobReader>>,
    hasher: Option<Hasher>,
    digest: Digest,
    size: u64,
    path: PathBuf,
}

impl std::fmt::Debug for PackedTar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedTar")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PackedTar {
    fn new(blob: BlobReader, path: PathBuf, digest: Digest, size: u64) -> Result<PackedTar> {
        let decoder = zstd::stream::read::Decoder::new(blob)
            .map_err(|e| StoreError::io("decompressing layer", &path, e))?;
        Ok(PackedTar {
            decoder,
            hasher: Some(Hasher::new()),
            digest,
            size,
            path,
        })
    }
}

impl Read for PackedTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.decoder.read(buf)?;
        if n == 0 && !buf.is_empty() {
            check_hashed(&mut self.hasher, &self.digest)?;
            return Ok(0);
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// A layer tar written from a snapshot directory by a thread into a pipe.
#[derive(Debug)]
pub struct SnapshotTar {
    pipe: Option<io::PipeReader>,
    writer: Option<JoinHandle<std::result::Result<LayerStats, LayerError>>>,
    hasher: Option<Hasher>,
    digest: Digest,
    size: u64,
    dir: PathBuf,
}

impl SnapshotTar {
    fn spawn(dir: PathBuf, digest: Digest, size: u64) -> Result<SnapshotTar> {
        let (reader, writer) = io::pipe().map_err(|e| StoreError::io("making a pipe", &dir, e))?;
        // A 1 MiB pipe: the default 64 KiB makes writer and reader take
        // turns every 64 KiB. (A kernel refusing the size keeps the default.)
        let _ = nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        let src = dir.clone();
        let handle = std::thread::Builder::new()
            .name("layer-tar".to_owned())
            .spawn(move || {
                // A snapshot is never written in place: its files can be mapped.
                layer::write_layer(&src, writer, &WriteOptions::default().with_mapped_files())
            })
            .map_err(|e| StoreError::io("starting the layer writer", &dir, e))?;
        Ok(SnapshotTar {
            pipe: Some(reader),
            writer: Some(handle),
            hasher: Some(Hasher::new()),
            digest,
            size,
            dir,
        })
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe = None;
        if let Some(h) = self.writer.take() {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(source)) => {
                    return Err(io::Error::other(StoreError::Layer {
                        what: self.dir.display().to_string(),
                        source,
                    }));
                }
                Err(_) => {
                    return Err(io::Error::other(format!(
                        "the layer writer for `{}` panicked",
                        self.dir.display()
                    )));
                }
            }
        }
        check_hashed(&mut self.hasher, &self.digest)
    }
}

impl Read for SnapshotTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(pipe) = self.pipe.as_mut() else {
            return Ok(0);
        };
        let n = pipe.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.finish()?;
            return Ok(0);
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

impl Drop for SnapshotTar {
    fn drop(&mut self) {
        // Closing the read end makes the writer fail with EPIPE and stop.
        self.pipe = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Clamps every mtime under `dir` (not `dir` itself) to at most `epoch`,
/// as the layer writer does with `SOURCE_DATE_EPOCH`, so the directory
/// alone determines its tar.
fn clamp_mtimes(dir: &Path, epoch: i64) -> Result<()> {
    let entries = fs_err::read_dir(dir).map_err(|e| StoreError::io("reading directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("reading directory", dir, e))?;
        let path = entry.path();
        let md = fs_err::symlink_metadata(&path)
            .map_err(|e| StoreError::io("reading metadata", &path, e))?;
        if md.is_dir() {
            clamp_mtimes(&path, epoch)?;
        }
        if std::os::unix::fs::MetadataExt::mtime(&md) > epoch {
            utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &TimeSpec::UTIME_OMIT,
                &TimeSpec::new(epoch, 0),
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| StoreError::io("clamping mtime", &path, io::Error::from(e)))?;
        }
    }
    Ok(())
}
