//! The store's error type.

use std::io;
use std::path::PathBuf;

/// Everything the store, the image model and import/export can fail with.
///
/// Each variant names what it was working on (a path, a digest, a
/// reference) and keeps the cause as its `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{what} `{}`", path.display())]
    Io {
        /// What kiln was doing, e.g. "creating directory".
        what: &'static str,
        /// The path it was working on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The disk (or the store's file system) is full.
    #[error(
        "no space left while {what} `{}`\n\nhint: free some space (`kiln prune`) or use a larger `--root`",
        path.display()
    )]
    NoSpace {
        /// What kiln was doing.
        what: &'static str,
        /// The path it was writing.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("store database `{}`: {what}", path.display())]
    Db {
        /// What kiln was doing.
        what: &'static str,
        /// The database path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer kiln.
    #[error(
        "store database `{}` has schema version {found}, this kiln knows up to {known}\n\nhint: use a newer kiln or another `--root`",
        path.display()
    )]
    SchemaTooNew {
        /// The database path.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build understands.
        known: i64,
    },
    /// A blob's content does not hash to its name.
    #[error(
        "blob `{digest}` is corrupt: its content hashes to `{actual}`; it was not used\n\nhint: `kiln prune` removes it; load or pull the image again"
    )]
    Corrupt {
        /// The digest the blob is named by.
        digest: String,
        /// What it actually hashes to.
        actual: String,
    },
    /// Content did not match the digest it was announced with.
    #[error("content announced as `{expected}` hashes to `{actual}` ({context})")]
    DigestMismatch {
        /// The digest that was announced.
        expected: String,
        /// What the content hashes to.
        actual: String,
        /// Where the content came from.
        context: String,
    },
    /// A blob that should be in the store is not.
    #[error("blob `{digest}` is not in the store")]
    BlobMissing {
        /// The digest.
        digest: String,
    },
    /// A digest string is malformed.
    #[error("invalid digest `{digest}`: {reason}")]
    InvalidDigest {
        /// The text.
        digest: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An image reference is malformed.
    #[error("invalid reference `{reference}`: {reason}")]
    InvalidReference {
        /// The text.
        reference: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// No image has this name or id.
    #[error("no such image: `{reference}`")]
    NoSuchImage {
        /// The name or id asked for.
        reference: String,
    },
    /// A short id matches several images.
    #[error("image id prefix `{prefix}` is ambiguous: it matches {count} images")]
    AmbiguousId {
        /// The prefix given.
        prefix: String,
        /// How many images it matches.
        count: usize,
    },
    /// Removing an image by id that still has several names.
    #[error(
        "image `{id}` is referenced by several names ({names})\n\nhint: remove them one by one or use `-f`"
    )]
    ImageInUse {
        /// The image id.
        id: String,
        /// Its names.
        names: String,
    },
    /// No container or volume has this name or id.
    #[error("no such {kind}: {name}")]
    NoSuch {
        /// `container` or `volume`.
        kind: &'static str,
        /// The name or id asked for.
        name: String,
    },
    /// A container or volume name is taken, or a volume is in use.
    #[error("conflict: {message}")]
    Conflict {
        /// What conflicts with what.
        message: String,
    },
    /// A JSON document (manifest, config, index, archive manifest) is invalid.
    #[error("invalid {kind} `{what}`: {reason}")]
    InvalidDocument {
        /// "manifest", "config", "index", ...
        kind: &'static str,
        /// Where it came from (a digest or a file name).
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// An archive or layout is not in a format kiln reads.
    #[error("`{}` is not an image archive kiln reads: {reason}", path.display())]
    UnknownFormat {
        /// The archive.
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// A file an archive's manifest names is not in the archive.
    #[error("`{}` has no entry `{entry}`", archive.display())]
    ArchiveEntryMissing {
        /// The archive.
        archive: PathBuf,
        /// The entry named by the manifest.
        entry: String,
    },
    /// Writing or reading a layer failed.
    #[error("layer `{what}`")]
    Layer {
        /// The layer (a path or digest).
        what: String,
        /// The cause.
        #[source]
        source: crate::layer::LayerError,
    },
    /// Compressing or decompressing failed.
    #[error("compression of `{what}`")]
    Compress {
        /// The blob or file.
        what: String,
        /// The cause.
        #[source]
        source: crate::compress::CompressError,
    },
    /// An image has no layers diffIDs consistent with its config.
    #[error(
        "image `{image}`: layer {index} has diffID `{actual}` but its config says `{expected}`"
    )]
    DiffIdMismatch {
        /// The image (name or config digest).
        image: String,
        /// Layer position.
        index: usize,
        /// From the config.
        expected: String,
        /// Computed.
        actual: String,
    },
}

impl StoreError {
    /// An I/O error; `ENOSPC`/`EDQUOT` become [`StoreError::NoSpace`].
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_no_space(&source) {
            StoreError::NoSpace { what, path, source }
        } else {
            StoreError::Io { what, path, source }
        }
    }
}

/// Whether an I/O error means the disk is full (somewhere in its chain).
pub(crate) fn is_no_space(err: &io::Error) -> bool {
    if matches!(err.raw_os_error(), Some(28 | 122)) || err.kind() == io::ErrorKind::StorageFull {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = err.get_ref().map(|e| e as _);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(28 | 122))
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Shorthand.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
