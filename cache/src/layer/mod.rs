//! OCI layer tars: write one from a directory diff, apply one onto a snapshot.
//!
//! # API (what the store and the builder call)
//!
//! ```text
//! pub struct WriteOptions { pub source_date_epoch: Option<i64>, pub map_big_files: bool,
//!                           pub content_digests: bool } // Default, with_*
//! pub struct LayerStats   { pub entries: u64, pub bytes: u64 }
//! pub fn write_layer<W: Write>(diff_dir: &Path, out: W, opts: &WriteOptions) -> Result<LayerStats, LayerError>;
//!
//! pub struct ApplyOptions { pub preserve_ownership: bool, pub create_devices: bool,
//!                           pub opaque_xattr: OpaqueXattr, pub whiteouts: WhiteoutMode,
//!                           pub limits: Limits }     // Default: by euid; with_whiteouts, with_limits
//! pub fn apply_layer<R: Read>(tar: R, dest: &Path, opts: &ApplyOptions) -> Result<LayerStats, LayerError>;
//! ```
//!
//! Both take and give the *uncompressed* tar; compression lives in [`mod@crate::compress`].
//! `LayerStats::bytes` of `write_layer` is the size of the tar written (hash the same stream
//! for the diffID); of `apply_layer` it is the tar bytes read, including what follows the
//! end-of-archive blocks (the whole input is consumed, so a digesting reader sees it all).
//! Neither function is async; call them from `spawn_blocking` in async code.
//!
//! # Writing
//!
//! `diff_dir` is an overlayfs upperdir (or any plain directory, which then is a full layer).
//! The tar is deterministic: the same tree gives the same bytes, on any run.
//!
//! - Entries come from a depth-first walk whose children are sorted by name bytes, so a
//!   directory always precedes its contents. Names are relative, without `./`; directories end
//!   in `/`.
//! - ustar headers with numeric uid/gid only (no uname/gname), mode = permission bits, mtime in
//!   whole seconds, clamped to `source_date_epoch` when set (as BuildKit does with
//!   `SOURCE_DATE_EPOCH`). A pax extended header (`x`) is written only when a value does not fit
//!   ustar: a name or link target over 100 bytes, ids over 2097151, size over 8 GiB, a negative
//!   or huge mtime, or xattrs (`SCHILY.xattr.NAME`).
//! - Overlay whiteouts become OCI whiteouts: a 0/0 character device `NAME` becomes an empty
//!   regular file `.wh.NAME`; a directory whose `trusted.overlay.opaque` or
//!   `user.overlay.opaque` xattr is `y` is written, followed by its `.wh..wh..opq` marker.
//!   Overlay-private xattrs (`trusted.overlay.*`, `user.overlay.*`) and host labels
//!   (`security.selinux`) are never recorded. Whiteout devices may be hardlinks of one inode
//!   (overlayfs shares a whiteout inode); each is still its own `.wh.` entry.
//! - Hardlinks: the first path of an inode (in walk order) is written as a file, later paths as
//!   `1` (link) entries naming the first.
//! - Regular files are streamed (`io::copy`), so a sparse file costs no memory; it is written as
//!   plain data, never as a GNU sparse entry.
//! - Sockets are skipped (docker skips them too).
//!
//! # Applying
//!
//! Entries are created under `dest` without ever following a symlink: each parent component is
//! opened with `openat(O_NOFOLLOW | O_DIRECTORY)` from the one before, starting at `dest`.
//! Containment rules; every refusal is a [`LayerError`] that names the entry:
//!
//! - an absolute name (`/etc/passwd`) is **refused**, and so is any `..` component. BuildKit and
//!   containerd instead resolve such names inside the root; kiln refuses them because no tool
//!   that writes layers produces them and a refusal is easier to reason about. A leading `./`
//!   is accepted and stripped; `.` components are dropped.
//! - a parent component that is a symlink (or not a directory) is refused.
//! - a hardlink's target must be a name that obeys the same rules, already exist, and not be a
//!   directory; the link is made with `linkat` without following, so a hardlink to a symlink
//!   copies the symlink and never reaches what it points to.
//! - a whiteout of `.`, `..` or of the root is refused.
//! - overlayfs' own xattrs (`trusted.overlay.*`, `user.overlay.*`) in a tar are dropped, so a
//!   layer cannot forge redirects or opaque directories except through `.wh..wh..opq`.
//! - limits ([`Limits`]): header data (pax, GNU long names), path length, entry count and total
//!   file bytes; each excess is refused with the limit in the message (tar bombs).
//!
//! Whiteouts go back to overlay form: `.wh.NAME` removes `NAME` and makes a 0/0 character
//! device there; `.wh..wh..opq` sets the opaque xattr on its directory
//! ([`OpaqueXattr`]: `trusted.overlay.opaque=y` when root, `user.overlay.opaque=y` rootless).
//! With [`WhiteoutMode::Remove`] instead, `.wh.NAME` only removes `NAME` (for unpacking onto a
//! flat rootfs, as `umoci unpack` does).
//!
//! Ownership is set with `lchown` (when `preserve_ownership`), then modes (so set-id bits
//! survive), then xattrs (so `security.capability` survives the chown), then times. Directory
//! modes and times are applied after all entries, deepest first, so that adding children
//! does not change them. A directory replaces a non-directory and the other way round.

mod apply;
mod digests;
pub mod known;
mod mapped;
mod tar_format;
mod write;

use std::path::PathBuf;

pub use apply::apply_layer;
pub use digests::ContentDigests;
pub use known::KnownFiles;
pub use mapped::{Mapped, for_each_window};
pub(crate) use write::write_layer_with;
pub use write::{write_layer, write_layer_digesting, write_layer_reusing};

/// Prefix of an OCI whiteout entry's base name.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Base name of the OCI opaque-directory marker.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// Options for [`write_layer`].
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Clamp every mtime to at most this many seconds since the epoch (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: Option<i64>,
    /// Read files of 1 MiB and more through a mapping (no copy out of the page cache). Only
    /// for trees nothing writes any more (snapshots, the upper of a finished step): a file
    /// truncated while mapped raises SIGBUS.
    pub map_big_files: bool,
    /// Also take the content digest (see [`crate::content_digest`]) of each regular file (see
    /// [`write_layer_digesting`]).
    pub content_digests: bool,
    /// When a layer is committed as a snapshot (`Store::commit_snapshot_*`):
    /// also keep its tar as a blob if it is smaller than this many bytes.
    /// A later build may then take the snapshot directory over
    /// (`Store::take_snapshot`); the layer stays readable from the blob.
    pub keep_blob_below: Option<u64>,
}

impl WriteOptions {
    /// Keep the tar as a blob below `limit` bytes (see
    /// [`WriteOptions::keep_blob_below`]).
    #[must_use]
    pub fn with_blob_below(mut self, limit: Option<u64>) -> Self {
        self.keep_blob_below = limit;
        self
    }

    /// Read big files through a mapping (see [`WriteOptions::map_big_files`]).
    #[must_use]
    pub fn with_mapped_files(mut self) -> Self {
        self.map_big_files = true;
        self
    }

    /// Take content digests too (see [`WriteOptions::content_digests`]).
    #[must_use]
    pub fn with_content_digests(mut self, on: bool) -> Self {
        self.content_digests = on;
        self
    }

    /// Clamp mtimes to `epoch` (the value of `SOURCE_DATE_EPOCH`).
    #[must_use]
    pub fn with_source_date_epoch(mut self, epoch: Option<i64>) -> Self {
        self.source_date_epoch = epoch;
        self
    }
}

/// What [`write_layer`] wrote or [`apply_layer`] read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Tar entries (pax and GNU long-name headers not counted).
    pub entries: u64,
    /// Size of the uncompressed tar stream in bytes.
    pub bytes: u64,
}

/// Which xattr marks an opaque directory in the overlay form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpaqueXattr {
    /// `trusted.overlay.opaque` (needs CAP_SYS_ADMIN; what overlayfs reads by default).
    Trusted,
    /// `user.overlay.opaque` (overlayfs mounted with `userxattr`, rootless).
    User,
}

impl OpaqueXattr {
    /// The xattr name.
    pub fn name(self) -> &'static str {
        match self {
            OpaqueXattr::Trusted => "trusted.overlay.opaque",
            OpaqueXattr::User => "user.overlay.opaque",
        }
    }
}

/// What [`apply_layer`] does with OCI whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Turn them into overlayfs whiteouts (0/0 char devices, opaque xattrs): the snapshot is
    /// one layer, used as an overlay lowerdir.
    Overlay,
    /// Remove what they name and create nothing: the layer is applied onto the union of the
    /// layers below it (a flat rootfs). An opaque marker empties the directory of everything
    /// not created by this layer.
    Remove,
}

/// Limits that make a hostile tar fail early with a clear error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest pax extended header or GNU long name/link payload, in bytes.
    pub max_header_bytes: u64,
    /// Longest entry name or link target, in bytes.
    pub max_path_bytes: usize,
    /// Most entries in one tar.
    pub max_entries: u64,
    /// Most bytes of file content in one tar (sum of entry sizes).
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 1 << 20,
            max_path_bytes: 4096,
            max_entries: 10_000_000,
            max_total_bytes: 1 << 40,
        }
    }
}

/// Options for [`apply_layer`].
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// `lchown` entries to the tar's uid/gid (default: true when running as root).
    pub preserve_ownership: bool,
    /// Create block/char devices and fifos from the tar (default: true when root); when false
    /// they are skipped. Whiteout devices are always made in [`WhiteoutMode::Overlay`].
    pub create_devices: bool,
    /// Xattr used for opaque directories (default: `Trusted` when root, else `User`).
    pub opaque_xattr: OpaqueXattr,
    /// Overlay form or removal (default: `Overlay`).
    pub whiteouts: WhiteoutMode,
    /// Limits against tar bombs.
    pub limits: Limits,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        let root = nix::unistd::geteuid().is_root();
        ApplyOptions {
            preserve_ownership: root,
            create_devices: root,
            opaque_xattr: if root {
                OpaqueXattr::Trusted
            } else {
                OpaqueXattr::User
            },
            whiteouts: WhiteoutMode::Overlay,
            limits: Limits::default(),
        }
    }
}

impl ApplyOptions {
    /// Set the whiteout handling.
    #[must_use]
    pub fn with_whiteouts(mut self, mode: WhiteoutMode) -> Self {
        self.whiteouts = mode;
        self
    }

    /// Set the limits.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// Why a layer could not be written or applied. Every refusal names the tar entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// A file of the diff directory could not be read.
    #[error("cannot read `{}`", path.display())]
    ReadDiff {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A name in the diff directory is not valid in a tar.
    #[error("cannot put `{}` in a layer: {reason}", path.display())]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// Writing the tar stream failed.
    #[error("cannot write the layer tar")]
    WriteTar(#[source] std::io::Error),
    /// Reading the tar stream failed (I/O error or early end).
    #[error("cannot read the layer tar at byte {offset}")]
    ReadTar {
        /// Offset in the tar stream.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tar header is malformed.
    #[error("malformed tar header at byte {offset}: {problem}")]
    BadHeader {
        /// Offset of the header block.
        offset: u64,
        /// What is wrong (a fixed description).
        problem: &'static str,
    },
    /// An entry type kiln does not unpack (GNU sparse, multi-volume, ...).
    #[error("tar entry `{entry}` has unsupported type `{kind}`")]
    UnsupportedEntry {
        /// Entry name.
        entry: String,
        /// Type flag, as a character.
        kind: char,
    },
    /// Absolute entry name.
    #[error(
        "tar entry `{entry}` has an absolute name\n\nhint: layer entries must be relative to the root"
    )]
    AbsolutePath {
        /// Entry name.
        entry: String,
    },
    /// A `..` component.
    #[error("tar entry `{entry}` contains a `..` component, which could escape the root")]
    ParentComponent {
        /// Entry name.
        entry: String,
    },
    /// An empty or otherwise unusable name (NUL byte, empty).
    #[error("tar entry `{entry}` has an invalid name")]
    InvalidName {
        /// Entry name.
        entry: String,
    },
    /// A parent component of the entry is a symlink.
    #[error(
        "tar entry `{entry}` goes through the symlink `{component}`, which could escape the root"
    )]
    ThroughSymlink {
        /// Entry name.
        entry: String,
        /// The symlink's path inside the root.
        component: String,
    },
    /// A parent component of the entry exists and is not a directory.
    #[error("tar entry `{entry}` needs `{component}` to be a directory, but it is not")]
    ParentNotDirectory {
        /// Entry name.
        entry: String,
        /// The component's path inside the root.
        component: String,
    },
    /// A hardlink whose target is absolute, has `..`, or is missing.
    #[error("tar entry `{entry}` is a hardlink to `{target}`, which is {problem}")]
    BadHardlink {
        /// Entry name.
        entry: String,
        /// Link target as written in the tar.
        target: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A whiteout of `.`, `..`, or the root.
    #[error("tar entry `{entry}` is a whiteout of `{target}`, which is not allowed")]
    BadWhiteout {
        /// Entry name.
        entry: String,
        /// What it would remove.
        target: String,
    },
    /// A header (pax or GNU long name) bigger than the limit.
    #[error("tar entry `{entry}` has a {size}-byte extended header; the limit is {limit}")]
    HeaderTooLarge {
        /// Entry name (or the header block's name).
        entry: String,
        /// Declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A name or link target longer than the limit.
    #[error("tar entry `{entry}…` has a {len}-byte name or link; the limit is {limit}")]
    PathTooLong {
        /// The first bytes of the name.
        entry: String,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// More entries than the limit.
    #[error("layer tar has more than {limit} entries (at `{entry}`)")]
    TooManyEntries {
        /// The entry over the limit.
        entry: String,
        /// The limit.
        limit: u64,
    },
    /// More content bytes than the limit.
    #[error("layer tar holds more than {limit} bytes of content (at `{entry}`, {size} bytes)")]
    TooLarge {
        /// The entry over the limit.
        entry: String,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A file-system operation failed while applying.
    #[error("cannot {op} `{entry}` under `{}`", dest.display())]
    Apply {
        /// Entry name.
        entry: String,
        /// Snapshot directory.
        dest: PathBuf,
        /// The operation (`create`, `chown`, `set xattr on`, ...).
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
