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
