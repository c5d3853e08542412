//! The store on disk and its metadata database.
//!
//! ```text
//! $KILN_ROOT/
//!   lock                     flock: shared for normal operations, exclusive for GC
//!   meta.db (+ -wal, -shm)   SQLite, WAL mode; schema version in `PRAGMA user_version`
//!   blobs/sha256/<hex>       immutable content named by its sha256 (temp + fsync + rename)
//!   snapshots/v1-<hex>/      a layer (named by its diffID) unpacked once, for overlay lowerdirs
//!   snapshots/v1-<hex>.lock  flock held while that snapshot is being unpacked
//!   tmp/                     temp files; GC removes what is left there
//! ```
//!
//! The `v1-` prefix of snapshot directories is the on-disk format version
//! of a snapshot; a change in how layers are unpacked bumps it, and GC
//! removes directories of other versions. `meta.db` carries its own
//! version (`SCHEMA_VERSION`) and is migrated forward on open.
//!
//! Layers are stored **uncompressed** on the build path: a layer blob's
//! digest is its diffID. Compressed variants made for `save` or push are
//! stored as further blobs, and `layer_blobs` remembers diffID ↔ blob
//! digest so a second export does not compress again.
//!
//! An image's id is its config digest, as in docker. Its manifest (an OCI
//! manifest over the uncompressed layers) is stored as a blob too.
//!
//! Several kiln processes may use one store at once: ref changes are SQLite
//! transactions (`BEGIN IMMEDIATE`, busy timeout), blob writes are
//! idempotent renames, snapshot unpacking is serialized per snapshot by a
//! lock file, and GC takes the store lock exclusively, so it never runs
//! while another process is between writing a blob and referencing it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::blob::{BlobReader, BlobWriter, into_store_error, unique_name};
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::image::{Image, ImageSummary, LayerInfo, parse_config};
use crate::layer;
use crate::reference::Reference;

/// The newest metadata schema this build knows.
pub const SCHEMA_VERSION: i64 = 3;

/// Media type of an uncompressed OCI layer.
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip OCI layer.
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd OCI layer.
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of an OCI manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

pub(crate) const SNAPSHOT_PREFIX: &str = "v1-";

const MIGRATIONS: &[&str] = &[
    // version 1
    r"
    CREATE TABLE images (
        id TEXT PRIMARY KEY,            -- config digest
        manifest TEXT NOT NULL,         -- manifest blob digest
        config_created TEXT,            -- the config's `created`, for listings
        size INTEGER NOT NULL,          -- sum of uncompressed layer sizes
        created INTEGER NOT NULL,       -- unix time it entered the store
        last_used INTEGER NOT NULL
    );
    CREATE TABLE image_layers (
        image TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        diff_id TEXT NOT NULL,
        PRIMARY KEY (image, position)
    );
    CREATE TABLE names (
        name TEXT PRIMARY KEY,          -- normalized `domain/path:tag`
        image TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        created INTEGER NOT NULL
    );
    CREATE INDEX names_image ON names(image);
    CREATE TABLE layers (
        diff_id TEXT PRIMARY KEY,       -- also the uncompressed blob's digest
        size INTEGER NOT NULL,
        created INTEGER NOT NULL
    );
    CREATE TABLE layer_blobs (
        blob TEXT PRIMARY KEY,          -- compressed blob digest
        diff_id TEXT NOT NULL,
        media_type TEXT NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE INDEX layer_blobs_diff ON layer_blobs(diff_id, media_type);
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        diff_id TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    );
    CREATE TABLE cache_records (
        key TEXT PRIMARY KEY,
        result TEXT NOT NULL,           -- JSON CacheResult
        created INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    );
    ",
    // version 2: containers, volumes, leases (see `crate::containers`)
    crate::containers::MIGRATION_2,
    // version 3: the registry digests images were pulled by (docker's
    // RepoDigests): `FROM name@sha256:...` and `rmi name@sha256:...` find
    // them, and an image with one is not dangling.
    r"
    CREATE TABLE repo_digests (
        name TEXT PRIMARY KEY,          -- normalized `domain/path@sha256:hex`
        image TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        created INTEGER NOT NULL
    );
    CREATE INDEX repo_digests_image ON repo_digests(image);
    ",
];

/// Where the store lives when `--root` and `KILN_ROOT` are not given:
/// `/var/lib/kiln` for root, `$XDG_DATA_HOME/kiln` (or
/// `~/.local/share/kiln`) otherwise.
pub fn default_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("kiln");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/kiln")
}

/// A held store lock (shared or exclusive); released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: fs_err::File,
}

/// What a build step produced, stored under its cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CacheResult {
    /// Layers (diffIDs) the result needs; GC keeps them.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
    /// A config blob the result needs, if any.
    #[serde(default)]
    pub config: Option<Digest>,
    /// Anything else the builder wants to remember.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// What [`Store::remove`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RemoveReport {
    /// Names removed.
    pub untagged: Vec<Reference>,
    /// Registry digests removed (`domain/path@sha256:..`): the one asked
    /// for, or all of a deleted image's.
    pub untagged_digests: Vec<String>,
    /// Images removed (no name left).
    pub deleted: Vec<Digest>,
}

/// Options for [`Store::gc`].
#[derive(Debug, Default, Clone, Copy)]
pub struct GcOptions {
    /// Also remove every build cache record (`prune --all`); named images
    /// are always kept.
    pub all: bool,
    /// Only report; change nothing.
    pub dry_run: bool,
    /// Build cache to keep, in bytes (`prune --keep-storage`): the least
    /// recently used cache records go until the layers that only cache
    /// records need (their uncompressed sizes) fit. Ignored with `all`.
    pub keep_bytes: Option<u64>,
    /// When another holder has the store lock (a build, a load), return
    /// at once (see [`GcReport::busy`]) instead of waiting for it.
    pub skip_if_busy: bool,
}

/// What [`Store::gc`] removed (or would remove).
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    /// Images removed.
    pub images: Vec<Digest>,
    /// Cache records removed.
    pub cache_records: u64,
    /// Blobs removed.
    pub blobs: u64,
    /// Snapshots removed.
    pub snapshots: u64,
    /// Temp files and directories removed.
    pub temp_files: u64,
    /// Bytes of blobs and temp files freed (snapshots not counted).
    pub bytes: u64,
    /// What the snapshots removed held: their layers' uncompressed sizes
    /// (as recorded; a snapshot of an unrecorded layer counts nothing).
    pub snapshot_bytes: u64,
    /// Nothing was done: the store was in use ([`GcOptions::skip_if_busy`]).
    pub busy: bool,
}

/// Space used, for `kiln system df`.
#[derive(Debug, Default, Clone)]
pub struct DiskUsage {
    /// Number of images.
    pub images: u64,
    /// Images with at least one name.
    pub images_named: u64,
    /// Bytes of the layers images use (each layer once).
    pub images_bytes: u64,
    /// Number of cache records.
    pub cache_records: u64,
    /// Number of blob files.
    pub blobs: u64,
    /// Bytes of all blob files.
    pub blobs_bytes: u64,
    /// Bytes `kiln prune` would free now.
    pub reclaimable_bytes: u64,
    /// Number of unpacked snapshots.
    pub snapshots: u64,
}

/// One inconsistency found by [`Store::fsck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsckProblem {
    /// What is wrong, e.g. "image `sha256:...`: layer blob `sha256:...` missing".
    pub message: String,
}

/// The store. Cheap to open; safe to share between threads; several
/// processes may open the same root at once.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: Db,
    /// Where this process makes its scratch trees (see
    /// [`Store::scratch_parent`]), taken at the first ask.
    lane: std::sync::OnceLock<PathBuf>,
}

/// A SQLite connection shared by the threads of a process, with its
/// database's path. When it is dropped, a WAL past 1 MiB is checkpointed
/// into the database and truncated (if no other process is in the way). The store's `meta.db` is one; the solver's `statcache.db`
/// another.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Db {
    /// The connection `conn` to the database at `path`.
    pub fn new(conn: Connection, path: PathBuf) -> Db {
        Db {
            conn: Mutex::new(conn),
            path,
        }
    }

    /// The connection, for one use (do not hold it across another's).
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is usable.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fold_wal(conn, &self.path);
    }
}

/// When a connection closes: a WAL past 1 MiB is checkpointed into the
/// database and truncated, if that can be done without waiting for other
/// processes. The next process that opens the database alone reads the
/// whole WAL to rebuild its index, so the WAL is kept small; but a
/// checkpoint costs two fsyncs and a truncate (2-3 ms at the end of each
/// build here, which writes 80-100 KiB to each WAL), while reading 0.5 MiB
/// of WAL at the next open did not show in `kiln images` (6.5 ms either
/// way). So it is folded every dozen builds or so, not after each.
fn fold_wal(conn: &Connection, db_path: &Path) {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    if fs_err::metadata(Path::new(&wal)).is_ok_and(|m| m.len() > 1 << 20) {
        let _ = conn.busy_timeout(Duration::ZERO);
        let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    }
}

/// The store's key for a digest reference: `busybox@sha256:..` →
/// `docker.io/library/busybox@sha256:..` (a tag beside the digest is
/// ignored, as docker's lookups do).
pub fn digest_name(reference: &str) -> Result<String> {
    let bad = |reason| StoreError::InvalidReference {
        reference: reference.to_owned(),
        reason,
    };
    let (_, digest) = reference
        .split_once('@')
        .ok_or_else(|| bad("it names no digest"))?;
    if digest.parse::<Digest>().is_err() {
        return Err(bad("a digest is `sha256:` and 64 lowercase hex digits"));
    }
    crate::registry::ImageRef::parse(reference)
        .ok()
        .and_then(|r| r.digest_name())
        .ok_or_else(|| bad("the name before `@` is not a valid image name"))
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn mkdir(path: &Path) -> Result<()> {
    fs_err::create_dir_all(path).map_err(|e| StoreError::io("creating directory", path, e))
}

impl Store {
    /// Opens (creating if needed) the store at `root` and migrates its
    /// database to [`SCHEMA_VERSION`].
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        // Absolute: store paths end up in overlay options and in links
        // that are resolved from other directories.
        let root = std::path::absolute(root.as_ref())
            .map_err(|e| StoreError::io("resolving the store path", root.as_ref(), e))?;
        for dir in ["blobs/sha256", "snapshots", "tmp"] {
            mkdir(&root.join(dir))?;
        }
        // Each build's scratch trees start in block groups of their own
        // (see `spread`).
        crate::spread::spread_subdirectories(&root.join("tmp"));
        let db_path = root.join("meta.db");
        let db = |what, source| StoreError::Db {
            what,
            path: db_path.clone(),
            source,
        };
        let mut conn = Connection::open(&db_path).map_err(|e| db("opening", e))?;
        conn.busy_timeout(Duration::from_secs(60))
            .map_err(|e| db("setting busy timeout", e))?;
        // Switching to WAL needs a moment of exclusive access; the busy
        // handler covers the usual case, a few retries the rest.
        let mut tries = 0;
        loop {
            match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
                Ok(_) => break,
                Err(e) if tries < 50 && is_busy(&e) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(db("enabling WAL", e)),
            }
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .map_err(|e| db("setting pragmas", e))?;
        // Keep the WAL across processes: checkpointing (and deleting) it when the
        // last connection closes costs three fsyncs, ~15-40 ms on a busy disk, on
        // every short kiln command (`kiln run` mostly). SQLite still checkpoints when
        // the WAL passes 1000 pages, and a migration checkpoints (see `migrate`).
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(|e| db("setting pragmas", e))?;
        // A process that opens the database alone reads the whole WAL to
        // rebuild its index: keep it small (checkpoint every 128 pages,
        // truncate it to 1 MiB after).
        conn.execute_batch("PRAGMA wal_autocheckpoint=128; PRAGMA journal_size_limit=1048576;")
            .map_err(|e| db("setting pragmas", e))?;
        let wal = root.join("meta.db-wal");
        if fs_err::metadata(&wal).is_ok_and(|m| m.len() > 2 << 20) {
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(|e| db("checkpointing", e))?;
        }
        migrate(&mut conn, &db_path)?;
        Ok(Store {
            root,
            db: Db::new(conn, db_path),
            lane: std::sync::OnceLock::new(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory under `tmp/` in which this process makes the scratch
    /// trees its steps write (a RUN's upper, a COPY's): one of the lanes
    /// that successive processes take in turn, so that a build does not
    /// write its files where the last one's, just pruned, were (see
    /// `spread`). Scratch trees there are swept and collected as those
    /// directly in `tmp/` are.
    pub fn scratch_parent(&self) -> &Path {
        self.lane
            .get_or_init(|| crate::spread::take_lane(&self.root.join("tmp")))
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock()
    }

    pub(crate) fn db_err(&self, what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Db {
            what,
            path: self.db.path().to_owned(),
            source,
        }
    }

    pub(crate) fn lock(&self, exclusive: bool) -> Result<StoreLock> {
        let (file, path) = self.lock_file()?;
        let r = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        r.map_err(|e| StoreError::io("locking store", &path, e))?;
        Ok(StoreLock { _file: file })
    }

    /// The store's lock file, opened (made if missing), and its path.
    fn lock_file(&self) -> Result<(fs_err::File, PathBuf)> {
        let path = self.root.join("lock");
        let file = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("opening store lock", &path, e))?;
        Ok((file, path))
    }

    /// Takes the store lock shared: GC waits until it is dropped. Hold it
    /// across "write blobs, then reference them" sequences.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock(false)
    }

    /// Whether another holder (a build, a load, a pull) has the store lock
    /// now, so that GC would wait for it.
    pub fn in_use(&self) -> Result<bool> {
        Ok(self.try_lock_exclusive()?.is_none())
    }

    /// The store lock, exclusive, if nobody else holds it now.
    pub(crate) fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        let (file, path) = self.lock_file()?;
        match file.file().try_lock() {
            Ok(()) => Ok(Some(StoreLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(StoreError::io("locking the store", &path, e))
            }
        }
    }

    /// The uncompressed size of every layer the store records (images' and
    /// build cache's alike): one cheap query, for deciding whether a GC
    /// may be due.
    pub fn layers_size(&self) -> Result<u64> {
        let n: i64 = self
            .db()
            .query_row("SELECT coalesce(sum(size), 0) FROM layers", [], |r| {
                r.get(0)
            })
            .map_err(self.db_err("summing layer sizes"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    // ---------------------------------------------------------------- blobs

    /// Where the blob named `digest` lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether a blob file exists (its content is not checked).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The length of a blob file, if it exists (its content is not checked).
    pub(crate) fn blob_len(&self, digest: &Digest) -> Option<u64> {
        fs_err::metadata(self.blob_path(digest))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Starts writing a blob; call [`BlobWriter::commit`] to store it.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        self.blob_writer_sized(1 << 20)
    }

    /// [`Store::blob_writer`] with a write buffer of `capacity` bytes (for
    /// a blob known to be small).
    pub(crate) fn blob_writer_sized(&self, capacity: usize) -> Result<BlobWriter> {
        BlobWriter::create(
            &self.root.join("tmp"),
            &self.root.join("blobs/sha256"),
            capacity,
        )
    }

    /// Stores everything `reader` yields as a blob, hashing while streaming.
    /// With `expected`, content that hashes otherwise is refused.
    pub fn put_blob_from_reader(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        let mut w = self.blob_writer()?;
        io::copy(&mut reader, &mut w)
            .map_err(|e| StoreError::io("writing blob", self.root.join("tmp"), e))?;
        w.commit(expected, "stored blob")
    }

    /// Stores `data` as a blob (see [`Store::put_small_blobs`]).
    pub fn put_blob_bytes(&self, data: &[u8]) -> Result<Digest> {
        self.put_small_blobs(&[data])?;
        Ok(Digest::of_bytes(data))
    }

    /// Stores small blobs (an image's config and manifest) together: each
    /// missing one is written, fsynced and renamed into place, then the
    /// blob directory is synced once (one directory sync instead of one per
    /// blob). Gives their digests, in order.
    pub fn put_small_blobs(&self, blobs: &[&[u8]]) -> Result<Vec<Digest>> {
        use std::io::Write as _;
        let mut digests: Vec<Digest> = Vec::with_capacity(blobs.len());
        let mut placed = false;
        for data in blobs {
            let digest = Digest::of_bytes(data);
            // Blobs are immutable: one already here with the same size is
            // this content (reads verify it), so a no-op rebuild writes
            // nothing.
            if !fs_err::metadata(self.blob_path(&digest))
                .is_ok_and(|m| m.len() == data.len() as u64)
            {
                let mut w = self.blob_writer_sized(data.len().max(1))?;
                w.write_all(data)
                    .map_err(|e| StoreError::io("writing blob", self.root.join("tmp"), e))?;
                w.place(Some(&digest), "stored blob")?;
                placed = true;
            }
            digests.push(digest);
        }
        if placed {
            crate::blob::sync_dir(&self.root.join("blobs/sha256"))?;
        }
        Ok(digests)
    }

    /// Opens a blob for streaming; the reader fails at its end if the
    /// content does not hash to `digest` (and moves the file aside).
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader> {
        let quarantine = self
            .root
            .join("tmp")
            .join(unique_name(&format!("corrupt-{}", digest.short())));
        BlobReader::open(self.blob_path(digest), digest.clone(), quarantine)
    }

    /// Reads a whole (small) blob, verified.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut r = self.open_blob(digest)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| into_store_error(e, &self.blob_path(digest)))?;
        Ok(out)
    }

    /// Reads a blob through and checks its digest.
    pub fn verify_blob(&self, digest: &Digest) -> Result<()> {
        self.open_blob(digest)?.finish()
    }

    // --------------------------------------------------------------- layers

    /// Writes a layer tar from `diff_dir` (an overlay upperdir or a plain
    /// tree) straight into the store, uncompressed, and records it.
    pub fn commit_layer_from_dir(
        &self,
        diff_dir: &Path,
        opts: &layer::WriteOptions,
    ) -> Result<LayerInfo> {
        let _lock = self.lock_shared()?;
        let mut w = self.blob_writer()?;
        layer::write_layer(diff_dir, &mut w, opts).map_err(|source| StoreError::Layer {
            what: diff_dir.display().to_string(),
            source,
        })?;
        let (diff_id, size) = w.commit(None, "layer")?;
        self.record_layer(&diff_id, size)?;
        Ok(LayerInfo { diff_id, size })
    }

    /// Stores a layer tar (compressed or not; the format is sniffed),
    /// uncompressed, and records it. `compressed_digest`, when given, is
    /// checked against the raw stream (e.g. a manifest descriptor's digest);
    /// `diff_id`, when given, against the uncompressed one.
    pub fn commit_layer_from_tar(
        &self,
        reader: impl Read + 'static,
        compressed_digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        what: &str,
    ) -> Result<LayerInfo> {
        let _lock = self.lock_shared()?;
        let raw = crate::digest::HashingReader::new(reader);
        let shared = std::rc::Rc::new(std::cell::RefCell::new(Some(raw)));
        let mut decoded =
            crate::compress::decompress(SharedReader(shared.clone())).map_err(|source| {
                StoreError::Compress {
                    what: what.to_owned(),
                    source,
                }
            })?;
        let mut w = self.blob_writer()?;
        io::copy(&mut decoded, &mut w)
            .map_err(|e| StoreError::io("reading layer", PathBuf::from(what), e))?;
        drop(decoded);
        if let Some(expected) = compressed_digest {
            let raw = shared.borrow_mut().take();
            if let Some(raw) = raw {
                let (actual, _) = raw
                    .drain_and_finish()
                    .map_err(|e| StoreError::io("reading layer", PathBuf::from(what), e))?;
                if actual != *expected {
                    return Err(StoreError::DigestMismatch {
                        expected: expected.to_string(),
                        actual: actual.to_string(),
                        context: what.to_owned(),
                    });
                }
            }
        }
        let (digest, size) = w.commit(diff_id, what)?;
        self.record_layer(&digest, size)?;
        Ok(LayerInfo {
            diff_id: digest,
            size,
        })
    }

    fn record_layer(&self, diff_id: &Digest, size: u64) -> Result<()> {
        let conn = self.db();
        conn.prepare_cached(
            "INSERT OR IGNORE INTO layers (diff_id, size, created) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut st| st.execute(params![diff_id.to_string(), size as i64, now()]))
        .map_err(self.db_err("recording layer"))?;
        Ok(())
    }

    /// A compressed variant of a layer recorded earlier, if its blob is
    /// still present: `(blob digest, size)`.
    pub fn compressed_layer(
        &self,
        diff_id: &Digest,
        media_type: &str,
    ) -> Result<Option<(Digest, u64)>> {
        let rows: Vec<(String, i64)> = {
            let conn = self.db();
            let mut st = conn
                .prepare(
                    "SELECT blob, size FROM layer_blobs WHERE diff_id = ?1 AND media_type = ?2",
                )
                .map_err(self.db_err("reading layer blobs"))?;
            st.query_map(params![diff_id.to_string(), media_type], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .and_then(Iterator::collect)
            .map_err(self.db_err("reading layer blobs"))?
        };
        for (blob, size) in rows {
            let Ok(d) = blob.parse::<Digest>() else {
                continue;
            };
            if self.has_blob(&d) {
                return Ok(Some((d, size as u64)));
            }
        }
        Ok(None)
    }

    /// Records that `blob` is `diff_id` compressed as `media_type`.
    pub fn record_compressed_layer(
        &self,
        diff_id: &Digest,
        blob: &Digest,
        media_type: &str,
        size: u64,
    ) -> Result<()> {
        self.db()
            .prepare_cached("INSERT OR REPLACE INTO layer_blobs (blob, diff_id, media_type, size) VALUES (?1, ?2, ?3, ?4)")
                .and_then(|mut st| st.execute(params![blob.to_string(), diff_id.to_string(), media_type, size as i64]))
            .map_err(self.db_err("recording compressed layer"))?;
        Ok(())
    }

    // ------------------------------------------------------------ snapshots

    /// Takes the lock of `diff_id`'s snapshot (held while the returned file
    /// is open): its id, its directory, the lock.
    pub(crate) fn lock_snapshot(
        &self,
        diff_id: &Digest,
    ) -> Result<(String, PathBuf, fs_err::File)> {
        let id = format!("{SNAPSHOT_PREFIX}{}", diff_id.hex());
        let snapshots = self.root.join("snapshots");
        let dir = snapshots.join(&id);
        let lock_path = snapshots.join(format!("{id}.lock"));
        let lock = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("opening snapshot lock", &lock_path, e))?;
        lock.lock()
            .map_err(|e| StoreError::io("locking snapshot", &lock_path, e))?;
        Ok((id, dir, lock))
    }

    /// The directory holding the layer `diff_id` unpacked (overlay form:
    /// whiteouts as 0/0 devices), unpacking it on first use. Concurrent
    /// callers, in this or other processes, unpack it once.
    pub fn snapshot_for(&self, diff_id: &Digest) -> Result<PathBuf> {
        let _lock = self.lock_shared()?;
        let (id, dir, _snapshot_lock) = self.lock_snapshot(diff_id)?;
        let snapshots = self.root.join("snapshots");
        if !dir.is_dir() {
            let temp = snapshots.join(unique_name(&format!(".tmp-{id}")));
            mkdir(&temp)?;
            let result = (|| {
                // (Its blob or packed blob: there is no snapshot to stream.)
                let mut tar = self.open_layer(diff_id)?;
                layer::apply_layer(&mut tar, &temp, &layer::ApplyOptions::default()).map_err(
                    |source| StoreError::Layer {
                        what: diff_id.to_string(),
                        source,
                    },
                )?;
                // The tar may end before the stream does; the digest covers all.
                io::copy(&mut tar, &mut io::sink())
                    .map(|_| ())
                    .map_err(|e| tar.error(e))
            })();
            if let Err(e) = result {
                let _ = fs_err::remove_dir_all(&temp);
                return Err(e);
            }
            fs_err::rename(&temp, &dir)
                .map_err(|e| StoreError::io("committing snapshot", &dir, e))?;
            crate::blob::sync_dir(&snapshots)?;
        }
        let t = now();
        self.db()
            .prepare_cached(
                "INSERT INTO snapshots (id, diff_id, created, last_used) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(id) DO UPDATE SET last_used = ?3 WHERE last_used < ?3 - 60",
            )
            .and_then(|mut st| st.execute(params![id, diff_id.to_string(), t]))
            .map_err(self.db_err("recording snapshot"))?;
        Ok(dir)
    }

    // --------------------------------------------------------------- images

    /// Stores an image: its config (verbatim bytes; its digest is the image
    /// id), an OCI manifest over the given (already stored, uncompressed)
    /// layers, and its names, all in one transaction.
    pub fn put_image(
        &self,
        names: &[Reference],
        config_json: &[u8],
        layers: &[LayerInfo],
    ) -> Result<Image> {
        let _lock = self.lock_shared()?;
        let config_digest = Digest::of_bytes(config_json);
        let config = parse_config(config_json, &config_digest.to_string())?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != layers.len() {
            return Err(StoreError::InvalidDocument {
                kind: "config",
                what: config_digest.to_string(),
                reason: format!(
                    "it lists {} layers (rootfs.diff_ids) but the image has {}",
                    diff_ids.len(),
                    layers.len()
                ),
            });
        }
        for (i, (want, l)) in diff_ids.iter().zip(layers).enumerate() {
            if *want != l.diff_id.to_string() {
                return Err(StoreError::DiffIdMismatch {
                    image: config_digest.to_string(),
                    index: i,
                    expected: want.clone(),
                    actual: l.diff_id.to_string(),
                });
            }
            if !self.has_layer(&l.diff_id) {
                return Err(StoreError::BlobMissing {
                    digest: l.diff_id.to_string(),
                });
            }
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": MEDIA_CONFIG,
                "digest": config_digest.to_string(),
                "size": config_json.len(),
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": MEDIA_LAYER_TAR,
                "digest": l.diff_id.to_string(),
                "size": l.size,
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| StoreError::InvalidDocument {
                kind: "manifest",
                what: config_digest.to_string(),
                reason: e.to_string(),
            })?;
        self.put_small_blobs(&[config_json, &manifest_bytes])?;
        let manifest_digest = Digest::of_bytes(&manifest_bytes);
        let size: u64 = layers.iter().map(|l| l.size).sum();
        let t = now();
        {
            let mut conn = self.db();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.db_err("starting transaction"))?;
            let e = self.db_err("storing image");
            tx.prepare_cached(
                "INSERT INTO images (id, manifest, config_created, size, created, last_used)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT(id) DO UPDATE SET manifest = ?2, last_used = ?5
                 WHERE manifest != ?2 OR last_used < ?5 - 60",
            )
            .and_then(|mut st| {
                st.execute(params![
                    config_digest.to_string(),
                    manifest_digest.to_string(),
                    config.created().clone(),
                    size as i64,
                    t
                ])
            })
            .map_err(&e)?;
            for (i, l) in layers.iter().enumerate() {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO layers (diff_id, size, created) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut st| st.execute(params![l.diff_id.to_string(), l.size as i64, t]))
                .map_err(&e)?;
                tx.prepare_cached(
                    "INSERT INTO image_layers (image, position, diff_id) VALUES (?1, ?2, ?3)
                     ON CONFLICT(image, position) DO UPDATE SET diff_id = ?3 WHERE diff_id != ?3",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        config_digest.to_string(),
                        i as i64,
                        l.diff_id.to_string()
                    ])
                })
                .map_err(&e)?;
            }
            for n in names {
                // An unchanged name is not rewritten: a no-op rebuild
                // writes nothing.
                tx.prepare_cached(
                    "INSERT INTO names (name, image, created) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET image = ?2, created = ?3 WHERE image != ?2",
                )
                .and_then(|mut st| st.execute(params![n.to_string(), config_digest.to_string(), t]))
                .map_err(&e)?;
            }
            tx.commit().map_err(self.db_err("committing image"))?;
        }
        self.load_image(&config_digest)
    }

    /// Finds an image by name (`busybox`, `me/app:1`), full id
    /// (`sha256:...`) or unique id prefix.
    pub fn resolve(&self, name_or_id: &str) -> Result<Image> {
        let id = self.resolve_id(name_or_id)?;
        self.load_image(&id)
    }

    /// The id of the image `name_or_id` names (as [`Store::resolve`], without
    /// loading the image).
    pub fn image_id(&self, name_or_id: &str) -> Result<Digest> {
        self.resolve_id(name_or_id)
    }

    fn resolve_id(&self, name_or_id: &str) -> Result<Digest> {
        let conn = self.db();
        if name_or_id.contains('@') {
            let found = self.image_of_digest(&conn, &digest_name(name_or_id)?)?;
            return match found {
                Some(id) => id.parse(),
                None => Err(StoreError::NoSuchImage {
                    reference: name_or_id.to_owned(),
                }),
            };
        }
        if let Ok(r) = Reference::parse(name_or_id) {
            let found: Option<String> = conn
                .prepare_cached("SELECT image FROM names WHERE name = ?1")
                .and_then(|mut st| st.query_row([r.to_string()], |r| r.get(0)))
                .optional()
                .map_err(self.db_err("looking up name"))?;
            if let Some(id) = found {
                return id.parse();
            }
        }
        let hex = name_or_id.strip_prefix("sha256:").unwrap_or(name_or_id);
        if !hex.is_empty()
            && hex.len() <= 64
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            let mut st = conn
                .prepare("SELECT id FROM images WHERE id >= ?1 AND id < ?2 LIMIT 2")
                .map_err(self.db_err("looking up id"))?;
            let lo = format!("sha256:{hex}");
            let hi = format!("sha256:{hex}\u{7f}");
            let ids: Vec<String> = st
                .query_map([lo, hi], |r| r.get(0))
                .and_then(Iterator::collect)
                .map_err(self.db_err("looking up id"))?;
            match ids.as_slice() {
                [one] => return one.parse(),
                [] => {}
                _ => {
                    let count: i64 = conn
                        .prepare_cached("SELECT count(*) FROM images WHERE id >= ?1 AND id < ?2")
                        .and_then(|mut st| {
                            st.query_row(
                                [format!("sha256:{hex}"), format!("sha256:{hex}\u{7f}")],
                                |r| r.get(0),
                            )
                        })
                        .map_err(self.db_err("looking up id"))?;
                    return Err(StoreError::AmbiguousId {
                        prefix: name_or_id.to_owned(),
                        count: count as usize,
                    });
                }
            }
        }
        Err(StoreError::NoSuchImage {
            reference: name_or_id.to_owned(),
        })
    }

    fn names_of(&self, conn: &Connection, id: &Digest) -> Result<Vec<Reference>> {
        let mut st = conn
            .prepare("SELECT name FROM names WHERE image = ?1 ORDER BY name")
            .map_err(self.db_err("reading names"))?;
        let names: Vec<String> = st
            .query_map([id.to_string()], |r| r.get(0))
            .and_then(Iterator::collect)
            .map_err(self.db_err("reading names"))?;
        names.iter().map(|n| Reference::parse(n)).collect()
    }

    /// The image the digest reference `name` (as [`digest_name`] makes it)
    /// names, if any.
    fn image_of_digest(&self, conn: &Connection, name: &str) -> Result<Option<String>> {
        conn.prepare_cached("SELECT image FROM repo_digests WHERE name = ?1")
            .and_then(|mut st| st.query_row([name], |r| r.get(0)))
            .optional()
            .map_err(self.db_err("looking up digest"))
    }

    fn repo_digests_of(&self, conn: &Connection, id: &Digest) -> Result<Vec<String>> {
        conn.prepare_cached("SELECT name FROM repo_digests WHERE image = ?1 ORDER BY name")
            .and_then(|mut st| {
                st.query_map([id.to_string()], |r| r.get(0))
                    .and_then(Iterator::collect)
            })
            .map_err(self.db_err("reading digests"))
    }

    /// Records that the registry knows image `id` as `name` (a
    /// `domain/path@sha256:hex` as [`digest_name`] makes it).
    pub fn add_repo_digest(&self, name: &str, id: &Digest) -> Result<()> {
        let n = self
            .db()
            .prepare_cached(
                "INSERT OR REPLACE INTO repo_digests (name, image, created)
                 SELECT ?1, id, ?3 FROM images WHERE id = ?2",
            )
            .and_then(|mut st| st.execute(params![name, id.to_string(), now()]))
            .map_err(self.db_err("recording digest"))?;
        if n == 0 {
            return Err(StoreError::NoSuchImage {
                reference: id.to_string(),
            });
        }
        Ok(())
    }

    fn load_image(&self, id: &Digest) -> Result<Image> {
        let (manifest, created, size, names, repo_digests, layers) = {
            let conn = self.db();
            let row: Option<(String, i64, i64)> = conn
                .prepare_cached("SELECT manifest, created, size FROM images WHERE id = ?1")
                .and_then(|mut st| {
                    st.query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                })
                .optional()
                .map_err(self.db_err("reading image"))?;
            let Some((manifest, created, size)) = row else {
                return Err(StoreError::NoSuchImage {
                    reference: id.to_string(),
                });
            };
            conn.prepare_cached(
                "UPDATE images SET last_used = ?1 WHERE id = ?2 AND last_used < ?1 - 60",
            )
            .and_then(|mut st| st.execute(params![now(), id.to_string()]))
            .map_err(self.db_err("touching image"))?;
            let names = self.names_of(&conn, id)?;
            let repo_digests = self.repo_digests_of(&conn, id)?;
            let mut st = conn
                .prepare(
                    "SELECT il.diff_id, COALESCE(l.size, 0) FROM image_layers il
                     LEFT JOIN layers l ON l.diff_id = il.diff_id
                     WHERE il.image = ?1 ORDER BY il.position",
                )
                .map_err(self.db_err("reading layers"))?;
            let layers: Vec<(String, i64)> = st
                .query_map([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(Iterator::collect)
                .map_err(self.db_err("reading layers"))?;
            (manifest, created, size, names, repo_digests, layers)
        };
        let config_bytes = self.read_blob(id)?;
        let config = parse_config(&config_bytes, &id.to_string())?;
        let layers = layers
            .into_iter()
            .map(|(d, s)| {
                Ok(LayerInfo {
                    diff_id: d.parse()?,
                    size: s as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Image {
            id: id.clone(),
            manifest: manifest.parse()?,
            names,
            repo_digests,
            config,
            config_bytes,
            layers,
            created,
            size: size as u64,
        })
    }

    /// Every image, newest first, without reading blobs.
    pub fn list_images(&self) -> Result<Vec<ImageSummary>> {
        let conn = self.db();
        let mut st = conn
            .prepare(
                "SELECT id, config_created, size, created FROM images ORDER BY created DESC, id",
            )
            .map_err(self.db_err("listing images"))?;
        let rows: Vec<(String, Option<String>, i64, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .and_then(Iterator::collect)
            .map_err(self.db_err("listing images"))?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, config_created, size, created) in rows {
            let id: Digest = id.parse()?;
            let names = self.names_of(&conn, &id)?;
            out.push(ImageSummary {
                id,
                names,
                config_created,
                size: size as u64,
                created,
            });
        }
        Ok(out)
    }

    /// Gives the image `source` (name or id) the name `target`.
    pub fn tag(&self, source: &str, target: &Reference) -> Result<Digest> {
        let id = self.resolve_id(source)?;
        let n = self
            .db()
            .prepare_cached(
                "INSERT OR REPLACE INTO names (name, image, created)
                 SELECT ?1, id, ?3 FROM images WHERE id = ?2",
            )
            .and_then(|mut st| st.execute(params![target.to_string(), id.to_string(), now()]))
            .map_err(self.db_err("tagging"))?;
        if n == 0 {
            // Removed between the lookup and the insert.
            return Err(StoreError::NoSuchImage {
                reference: source.to_owned(),
            });
        }
        Ok(id)
    }

    /// Removes a name, or an image by id. An image whose last name goes is
    /// deleted (its blobs stay until GC). Removing by id an image that has
    /// several names needs `force`.
    pub fn remove(&self, name_or_id: &str, force: bool) -> Result<RemoveReport> {
        let mut conn = self.db();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db_err("starting transaction"))?;
        let e = self.db_err("removing image");
        let mut report = RemoveReport::default();
        if name_or_id.contains('@') {
            // A digest reference: drop it; the image goes with its last
            // name or digest.
            let name = digest_name(name_or_id)?;
            let Some(id) = self.image_of_digest(&tx, &name)? else {
                return Err(StoreError::NoSuchImage {
                    reference: name_or_id.to_owned(),
                });
            };
            tx.prepare_cached("DELETE FROM repo_digests WHERE name = ?1")
                .and_then(|mut st| st.execute([&name]))
                .map_err(&e)?;
            report.untagged_digests.push(name);
            let left: i64 = tx
                .prepare_cached(
                    "SELECT (SELECT count(*) FROM names WHERE image = ?1)
                          + (SELECT count(*) FROM repo_digests WHERE image = ?1)",
                )
                .and_then(|mut st| st.query_row([&id], |r| r.get(0)))
                .map_err(&e)?;
            if left == 0 {
                tx.prepare_cached("DELETE FROM images WHERE id = ?1")
                    .and_then(|mut st| st.execute([&id]))
                    .map_err(&e)?;
                report.deleted.push(id.parse()?);
            }
            tx.commit().map_err(self.db_err("committing removal"))?;
            return Ok(report);
        }
        let by_name = Reference::parse(name_or_id).ok().and_then(|r| {
            tx.prepare_cached("SELECT image FROM names WHERE name = ?1")
                .and_then(|mut st| st.query_row([r.to_string()], |row| row.get::<_, String>(0)))
                .optional()
                .ok()
                .flatten()
                .map(|id| (r, id))
        });
        let id = if let Some((r, id)) = by_name {
            tx.prepare_cached("DELETE FROM names WHERE name = ?1")
                .and_then(|mut st| st.execute([r.to_string()]))
                .map_err(&e)?;
            report.untagged.push(r);
            id
        } else {
            drop(tx);
            drop(conn);
            let id = self.resolve_id(name_or_id)?;
            conn = self.db();
            let tx2 = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.db_err("starting transaction"))?;
            let names = self.names_of(&tx2, &id)?;
            if names.len() > 1 && !force {
                return Err(StoreError::ImageInUse {
                    id: id.to_string(),
                    names: names
                        .iter()
                        .map(Reference::short)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            tx2.prepare_cached("DELETE FROM names WHERE image = ?1")
                .and_then(|mut st| st.execute([id.to_string()]))
                .map_err(&e)?;
            report.untagged = names;
            report.untagged_digests = self.repo_digests_of(&tx2, &id)?;
            tx2.prepare_cached("DELETE FROM images WHERE id = ?1")
                .and_then(|mut st| st.execute([id.to_string()]))
                .map_err(&e)?;
            tx2.commit().map_err(self.db_err("committing removal"))?;
            report.deleted.push(id);
            return Ok(report);
        };
        let left: i64 = tx
            .prepare_cached("SELECT count(*) FROM names WHERE image = ?1")
            .and_then(|mut st| st.query_row([&id], |r| r.get(0)))
            .map_err(&e)?;
        if left == 0 {
            // As docker: the last tag takes the image, digests and all.
            let id: Digest = id.parse()?;
            report.untagged_digests = self.repo_digests_of(&tx, &id)?;
            tx.prepare_cached("DELETE FROM images WHERE id = ?1")
                .and_then(|mut st| st.execute([id.to_string()]))
                .map_err(&e)?;
            report.deleted.push(id);
        }
        tx.commit().map_err(self.db_err("committing removal"))?;
        Ok(report)
    }

    // -------------------------------------------------------- cache records

    /// Stores (or replaces) a cache record.
    pub fn put_cache_record(&self, key: &str, result: &CacheResult) -> Result<()> {
        let json = serde_json::to_string(result).map_err(|e| StoreError::InvalidDocument {
            kind: "cache record",
            what: key.to_owned(),
            reason: e.to_string(),
        })?;
        // Under the store lock: GC never runs between the check that the
        // blobs exist (the caller's) and this record keeping them alive.
        let _lock = self.lock_shared()?;
        let t = now();
        self.db()
            .prepare_cached("INSERT INTO cache_records (key, result, created, last_used) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(key) DO UPDATE SET result = ?2, last_used = ?3")
                .and_then(|mut st| st.execute(params![key, json, t]))
            .map_err(self.db_err("storing cache record"))?;
        Ok(())
    }

    /// Removes a cache record (none there is no error).
    pub fn delete_cache_record(&self, key: &str) -> Result<()> {
        self.db()
            .prepare_cached("DELETE FROM cache_records WHERE key = ?1")
            .and_then(|mut st| st.execute([key]))
            .map_err(self.db_err("removing cache record"))?;
        Ok(())
    }

    /// Looks a cache record up (and marks it used). A record whose blobs
    /// are gone is treated as absent.
    pub fn get_cache_record(&self, key: &str) -> Result<Option<CacheResult>> {
        self.cache_record(key, true)
    }

    /// [`Store::get_cache_record`] without marking the record used: no
    /// write transaction (for checks that only read).
    pub fn peek_cache_record(&self, key: &str) -> Result<Option<CacheResult>> {
        self.cache_record(key, false)
    }

    fn cache_record(&self, key: &str, touch: bool) -> Result<Option<CacheResult>> {
        let json: Option<String> = {
            let conn = self.db();
            let json = conn
                .prepare_cached("SELECT result FROM cache_records WHERE key = ?1")
                .and_then(|mut st| st.query_row([key], |r| r.get(0)))
                .optional()
                .map_err(self.db_err("reading cache record"))?;
            if touch && json.is_some() {
                // Touched at most once a minute (as images and snapshots):
                // a repeated no-op build writes nothing.
                conn.prepare_cached("UPDATE cache_records SET last_used = ?1 WHERE key = ?2 AND last_used < ?1 - 60")
                .and_then(|mut st| st.execute(params![now(), key]))
                .map_err(self.db_err("touching cache record"))?;
            }
            json
        };
        let Some(json) = json else { return Ok(None) };
        let result: CacheResult =
            serde_json::from_str(&json).map_err(|e| StoreError::InvalidDocument {
                kind: "cache record",
                what: key.to_owned(),
                reason: e.to_string(),
            })?;
        if result.diff_ids.iter().any(|d| !self.has_layer(d))
            || result.config.iter().any(|d| !self.has_blob(d))
        {
            return Ok(None);
        }
        Ok(Some(result))
    }
}

struct SharedReader<R>(std::rc::Rc<std::cell::RefCell<Option<R>>>);

impl<R: Read> Read for SharedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.borrow_mut().as_mut() {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn migrate(conn: &mut Connection, db_path: &Path) -> Result<()> {
    let db = |what, source| StoreError::Db {
        what,
        path: db_path.to_owned(),
        source,
    };
    let known = MIGRATIONS.len() as i64;
    // The usual case, read without taking the write lock: up to date.
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| db("reading schema version", e))?;
    if current == known {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db("starting migration", e))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| db("reading schema version", e))?;
    if version > known {
        return Err(StoreError::SchemaTooNew {
            path: db_path.to_owned(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)
            .map_err(|e| db("migrating schema", e))?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(|e| db("setting schema version", e))?;
    }
    tx.commit().map_err(|e| db("committing migration", e))?;
    if version < known {
        // A migrated schema goes to the main file at once (the WAL is kept on close).
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .map_err(|e| db("checkpointing the migration", e))?;
    }
    Ok(())
}

pub(crate) fn read_dir(dir: &Path) -> Result<Vec<fs_err::DirEntry>> {
    fs_err::read_dir(dir)
        .and_then(Iterator::collect)
        .map_err(|e| StoreError::io("listing directory", dir, e))
}

pub(crate) fn remove_path(path: &Path) -> Result<()> {
    let r = match fs_err::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs_err::remove_dir_all(path),
        Ok(_) => fs_err::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| StoreError::io("removing", path, e))
}
