//! kiln-cache: the content-addressed store on disk.
//!
//! Blobs named by sha256, layers (tar diff create/apply, whiteouts,
//! compression), snapshots, image refs and OCI layout / docker-archive
//! import and export. Metadata lives in SQLite.
//!
//! # The store
//!
//! [`Store`] is the entry point (the on-disk layout is documented on the
//! `store` module): blobs are written with [`Store::put_blob_from_reader`] and
//! read, verified, with [`Store::open_blob`]; a directory diff becomes a
//! layer with [`Store::commit_layer_from_dir`] and an unpacked snapshot with
//! [`Store::snapshot_for`]; images are stored, named and found with
//! [`Store::put_image`], [`Store::tag`], [`Store::resolve`] and
//! [`Store::remove`]; [`Store::gc`] and [`Store::fsck`] keep it tidy and
//! checked. [`archive`] moves images in and out (docker-archive, OCI);
//! [`registry`] pulls and pushes them (OCI distribution spec).
//!
//! ```
//! use kiln_cache::{Reference, Store, WriteOptions};
//!
//! let tmp = tempfile::tempdir()?;
//! let rootfs = tmp.path().join("rootfs");
//! fs_err::create_dir_all(rootfs.join("etc"))?;
//! fs_err::write(rootfs.join("etc/motd"), "hello\n")?;
//!
//! let store = Store::open(tmp.path().join("store"))?;
//! let layer = store.commit_layer_from_dir(&rootfs, &WriteOptions::default())?;
//! let config = serde_json::to_vec(&serde_json::json!({
//!     "architecture": "amd64", "os": "linux",
//!     "rootfs": {"type": "layers", "diff_ids": [layer.diff_id.to_string()]},
//! }))?;
//! let image = store.put_image(&[Reference::parse("motd")?], &config, &[layer])?;
//! assert_eq!(store.resolve("motd:latest")?.id, image.id);
//! let snapshot = store.snapshot_for(&image.layers[0].diff_id)?;
//! assert_eq!(fs_err::read_to_string(snapshot.join("etc/motd"))?, "hello\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub use oci_spec;

pub mod compress;
pub mod layer;
#[doc(hidden)]
pub mod timing;

pub use compress::{CompressError, Compression, compress, decompress};
pub use layer::{
    ApplyOptions, ContentDigests, KnownFiles, LayerError, LayerStats, WriteOptions, apply_layer,
    write_layer,
};

mod blob;
mod containers;
mod content_hash;
mod digest;
mod error;
mod image;
mod layer_source;
mod reference;
mod seal;
mod snapshot_take;
mod spread;
mod store;
mod store_gc;
mod validate;

pub mod archive;
pub mod registry;

pub use blob::{BlobReader, BlobWriter};
pub use containers::{ContainerRecord, LeaseKind, VolumeRecord};
pub use content_hash::{CONTENT_ALGORITHM, ContentHasher, content_digest};
pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::{Result, StoreError};
pub use image::{Image, ImageSummary, LayerInfo, format_rfc3339, parse_config, parse_rfc3339};
pub use layer_source::{LayerReader, PackedTar, SnapshotTar};
pub use reference::{Reference, short_name};
pub use seal::{DbSeal, now_ns};
pub use snapshot_take::SnapshotUse;
pub use spread::is_lane;
pub use store::{
    CacheResult, Db, DiskUsage, FsckProblem, GcOptions, GcReport, MEDIA_CONFIG, MEDIA_LAYER_GZIP,
    MEDIA_LAYER_TAR, MEDIA_LAYER_ZSTD, MEDIA_MANIFEST, RemoveReport, SCHEMA_VERSION, Store,
    StoreLock, default_root, digest_name,
};
pub use validate::{
    DocumentKind, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
    digest_ok, media_type_ok, validate_document,
};

/// A hash map for the per-file tables of a build (thousands of paths,
/// filled and read once each): foldhash instead of SipHash, which took a
/// tenth of a context copy's time. Its seed is random per process, as
/// SipHash's is; the contents come from the user's own context.
pub type FileMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set kind of [`FileMap`].
pub type FileSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
