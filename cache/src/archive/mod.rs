//! Moving images in and out of the store: `docker-archive` tars, OCI
//! archives and OCI layout directories (`load`/`save`), and rootfs
//! imports (`import`).
//!
//! Reading: a tar is indexed once (entry name → offset) and entries are
//! then read in place, so an archive of any size is streamed, never
//! unpacked to a temp directory. Every layer is decompressed (the format
//! is sniffed), hashed and stored uncompressed; its diffID must match the
//! config and, for OCI, the raw stream must match its descriptor.
//!
//! Writing: the archive tar is streamed straight to its destination.
//! Compressed layers are made once, kept as blobs and remembered
//! (diffID ↔ blob digest), so a second save does not compress again.

mod import;
mod load;
pub(crate) mod save;
mod source;

pub use import::{ImportOptions, import_rootfs};
pub use load::{LoadedImage, load};
pub use save::{ArchiveFormat, SaveItem, SaveOptions, compressed_layer_blob, save};

/// Name annotation docker and containerd write into `index.json`.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI ref name annotation.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
