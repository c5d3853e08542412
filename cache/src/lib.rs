//! kiln-cache: the content-addressed store on disk.
//!
//! Blobs named by sha256, layers (tar diff create/apply, whiteouts,
//! compression), snapshots, image refs and OCI layout / docker-archive
//! import and export. Metadata lives in SQLite.
#![deny(missing_docs)]

pub use oci_spec;
