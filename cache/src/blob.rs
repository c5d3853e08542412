//! Blob files: written to a temp file, fsynced, renamed; verified when read.

use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::{Digest, Hasher, HashingWriter};
use crate::error::{Result, StoreError};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique name for a temp file or directory, across processes and threads.
pub(crate) fn unique_name(prefix: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{n}-{nanos:08x}", std::process::id())
}

/// Writes one blob: bytes go to a temp file in `tmp/` while being hashed;
/// [`BlobWriter::commit`] fsyncs it and renames it to its digest's name.
/// Dropped without commit, the temp file is removed.
#[derive(Debug)]
pub struct BlobWriter {
    inner: Option<HashingWriter<BufWriter<fs_err::File>>>,
    temp: PathBuf,
    blobs_dir: PathBuf,
    syncer: Option<Syncer>,
    unsynced: u64,
}

/// Bytes written between two background `fdatasync`s.
const SYNC_EVERY: u64 = 32 << 20;

/// A thread that `fdatasync`s the temp file while it is still being
/// written. A big blob then reaches the disk while the producer (a layer
/// writer, a compressor) keeps working, and the final fsync in
/// [`BlobWriter::commit`] only waits for the last stretch instead of the
/// whole file.
#[derive(Debug)]
struct Syncer {
    requests: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Syncer {
    fn start(file: &fs_err::File) -> Option<Syncer> {
        let clone = file.file().try_clone().ok()?;
        let (requests, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("kiln-blob-sync".to_owned())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Errors show up again in the final fsync, which reports them.
                    let _ = clone.sync_data();
                }
            })
            .ok()?;
        Some(Syncer { requests, thread })
    }

    fn finish(self) {
        drop(self.requests);
        let _ = self.thread.join();
    }
}

impl BlobWriter {
    /// A writer into a new temp file in `tmp_dir`, through a buffer of
    /// `capacity` bytes.
    pub(crate) fn create(tmp_dir: &Path, blobs_dir: &Path, capacity: usize) -> Result<BlobWriter> {
        let temp = tmp_dir.join(unique_name("blob"));
        let file = fs_err::File::create(&temp)
            .map_err(|e| StoreError::io("creating temp file", &temp, e))?;
        Ok(BlobWriter {
            inner: Some(HashingWriter::new(BufWriter::with_capacity(capacity, file))),
            temp,
            blobs_dir: blobs_dir.to_owned(),
            syncer: None,
            unsynced: 0,
        })
    }

    /// Makes the blob durable and visible under its digest. When
    /// `expected` is given and the content differs, nothing is stored and
    /// the error names both digests.
    pub fn commit(self, expected: Option<&Digest>, context: &str) -> Result<(Digest, u64)> {
        let blobs_dir = self.blobs_dir.clone();
        let placed = self.place(expected, context)?;
        sync_dir(&blobs_dir)?;
        Ok(placed)
    }

    /// [`BlobWriter::commit`] but for the blob directory's sync, which the
    /// caller does once after placing several blobs.
    pub(crate) fn place(
        mut self,
        expected: Option<&Digest>,
        context: &str,
    ) -> Result<(Digest, u64)> {
        let Some(inner) = self.inner.take() else {
            return Err(StoreError::io(
                "committing blob",
                &self.temp,
                io::Error::other("already committed"),
            ));
        };
        let (buf, digest, len) = inner.finish();
        if let Some(syncer) = self.syncer.take() {
            syncer.finish();
        }
        let file = buf
            .into_inner()
            .map_err(|e| StoreError::io("writing blob", &self.temp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| StoreError::io("syncing blob", &self.temp, e))?;
        drop(file);
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StoreError::DigestMismatch {
                expected: expected.to_string(),
                actual: digest.to_string(),
                context: context.to_owned(),
            });
        }
        let dest = self.blobs_dir.join(digest.hex());
        // Renaming over an existing blob is fine: same name, same bytes
        // (and it heals a blob that was found corrupt and moved aside).
        fs_err::rename(&self.temp, &dest).map_err(|e| StoreError::io("storing blob", &dest, e))?;
        Ok((digest, len))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(w) = &mut self.inner else {
            return Err(io::Error::other("blob already committed"));
        };
        let n = w.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.unsynced = 0;
            if self.syncer.is_none() {
                self.syncer = Syncer::start(w.get_ref().get_ref());
            }
            if let Some(s) = &self.syncer {
                // Full: a sync is already pending, which covers these bytes too.
                let _ = s.requests.try_send(());
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(syncer) = self.syncer.take() {
            syncer.finish();
        }
        if self.inner.is_some() || self.temp.exists() {
            // Best effort: a leftover temp file is harmless and GC removes it.
            let _ = fs_err::remove_file(&self.temp);
        }
    }
}

/// fsyncs a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = fs_err::File::open(dir).map_err(|e| StoreError::io("opening directory", dir, e))?;
    d.sync_all()
        .map_err(|e| StoreError::io("syncing directory", dir, e))
}

/// Reads a blob and checks, at the end of the stream, that it hashes to its
/// name. A mismatch is an error (`InvalidData`) naming the digest, returned
/// instead of the final `Ok(0)`, so a consumer that reads to the end never
/// takes corrupt content as good.
#[derive(Debug)]
pub struct BlobReader {
    file: io::BufReader<fs_err::File>,
    hasher: Option<Hasher>,
    digest: Digest,
    path: PathBuf,
    quarantine: PathBuf,
}

impl BlobReader {
    pub(crate) fn open(path: PathBuf, digest: Digest, quarantine: PathBuf) -> Result<BlobReader> {
        let file = match fs_err::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::BlobMissing {
                    digest: digest.to_string(),
                });
            }
            Err(e) => return Err(StoreError::io("opening blob", &path, e)),
        };
        // The buffer is zeroed before its first use (`fs_err::File` reads
        // into initialised memory): small blobs (configs, manifests) get a
        // small one.
        let size = file.metadata().map_or(0, |m| m.len());
        let capacity = usize::try_from(size.clamp(8 << 10, 1 << 20)).unwrap_or(1 << 20);
        Ok(BlobReader {
            file: io::BufReader::with_capacity(capacity, file),
            hasher: Some(Hasher::new()),
            digest,
            path,
            quarantine,
        })
    }

    /// The blob's size on disk.
    pub fn len(&self) -> Result<u64> {
        self.file
            .get_ref()
            .metadata()
            .map(|m| m.len())
            .map_err(|e| StoreError::io("reading blob metadata", &self.path, e))
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads what is left and verifies the digest.
    pub fn finish(mut self) -> Result<()> {
        match io::copy(&mut self, &mut io::sink()) {
            Ok(_) => Ok(()),
            Err(e) => Err(into_store_error(e, &self.path)),
        }
    }

    fn check(&mut self) -> io::Result<()> {
        if let Some(h) = self.hasher.take() {
            let actual = h.finish();
            if actual != self.digest {
                // Move it aside so it is treated as absent from now on (a
                // later load writes a good copy; GC deletes the bad one).
                let _ = fs_err::rename(&self.path, &self.quarantine);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    StoreError::Corrupt {
                        digest: self.digest.to_string(),
                        actual: actual.to_string(),
                    },
                ));
            }
        }
        Ok(())
    }
}

/// Unwraps a [`StoreError::Corrupt`] carried inside an `io::Error`.
pub(crate) fn into_store_error(e: io::Error, path: &Path) -> StoreError {
    if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        match e.into_inner().map(|b| b.downcast::<StoreError>()) {
            Some(Ok(se)) => *se,
            Some(Err(other)) => StoreError::io("reading blob", path, io::Error::other(other)),
            None => StoreError::io("reading blob", path, io::Error::other("unknown")),
        }
    } else {
        StoreError::io("reading blob", path, e)
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.check()?;
            return Ok(0);
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}
