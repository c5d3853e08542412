//! kiln-cache: the content-addressed store on disk.
//!
//! Blobs named by sha256, layers (tar diff create/apply, whiteouts,
//! compression), snapshots, image refs and OCI layout / docker-archive
//! import and export. Metadata lives in SQLite.
#![deny(missing_docs)]

pub use oci_spec;

pub mod compress;
pub mod layer;

pub use compress::{CompressError, Compression, compress, decompress};
pub use layer::{ApplyOptions, LayerError, LayerStats, WriteOptions, apply_layer, write_layer};

mod blob;
mod digest;
mod error;
mod image;
mod reference;
mod store;
mod store_gc;
mod validate;

pub mod archive;

pub use blob::{BlobReader, BlobWriter};
pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::{Result, StoreError};
pub use image::{Image, ImageSummary, LayerInfo, format_rfc3339, parse_config, parse_rfc3339};
pub use reference::Reference;
pub use store::{
    CacheResult, DiskUsage, FsckProblem, GcOptions, GcReport, MEDIA_CONFIG, MEDIA_LAYER_GZIP,
    MEDIA_LAYER_TAR, MEDIA_LAYER_ZSTD, MEDIA_MANIFEST, RemoveReport, SCHEMA_VERSION, Store,
    StoreLock, default_root,
};
pub use validate::{
    DocumentKind, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
    digest_ok, media_type_ok, validate_document,
};
