//! COPY, ADD and WORKDIR as file operations with BuildKit's semantics.
//!
//! Every function here is synchronous and works on two directories: a
//! *source root* (the build context, or another stage's rootfs for
//! `--from`) and a *destination root* (the merged overlay view of the stage
//! being built; the solver mounts it). Nothing is ever written outside the
//! destination root: every destination path, and every symlink met on the
//! way, is resolved as if the root were `/` (continuity's `fs.RootPath`,
//! which BuildKit uses), so `/app -> /opt/app` leads to `<root>/opt/app` and
//! `../../..` stops at the root.
//!
//! The rules follow BuildKit's dockerfile frontend (`dispatchCopy`), its
//! file backend (`docopy`) and fsutil's `copy` package:
//!
//! - a source is cleaned against `/` first, so `../x` is `x` inside the
//!   source root; symlinks in a source path are followed inside that root;
//! - wildcards (Go's `filepath.Match`, one path segment each) expand to the
//!   matches in lexical order; a wildcard that matches nothing copies
//!   nothing (BuildKit's `AllowEmptyWildcard`), a plain path that does not
//!   exist is an error naming it;
//! - a directory source copies its *contents*; a file goes *inside* the
//!   destination when that ends in `/` or is an existing directory;
//! - several sources need a directory destination (ending in `/`, or
//!   existing as a directory);
//! - modes, symlinks (as symlinks), hard links within one copy, mtimes and
//!   xattrs are preserved; uid/gid become 0:0 for context sources and are
//!   kept for stage sources unless `--chown` is given;
//! - an existing symlink to a directory in the destination tree is followed
//!   (inside the root) when a directory is copied onto it (moby/moby#47367);
//!   a file copied onto any existing non-directory replaces it.
//!
//! [`resolve_sources`] is the one place that expands source patterns; the
//! cache-key code calls it too, so a key covers exactly the files an op reads.

mod archive;
mod chmod;
mod chown;
mod copy;
mod error;
mod from_plan;
mod http;
mod pattern;
mod reuse;
mod root;
mod workdir;

use std::path::PathBuf;
use std::time::SystemTime;

pub use chmod::ModeChange;
pub use copy::copy;
pub use error::FileOpError;
pub use pattern::{ResolveOptions, SourceEntry, files_read, go_match, resolve_sources};
pub use reuse::{CopyMemo, FileIdentity, MemoContents, Reuse};
pub use root::resolve_in_root;
pub use workdir::mkdir_workdir;

/// Where the files of a COPY/ADD come from: this decides ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceKind {
    /// The build context: every copied entry is owned by 0:0 (BuildKit
    /// resets uid/gid when it receives the context).
    #[default]
    Context,
    /// Another stage's or an image's rootfs (`--from`): uid/gid are kept.
    Stage,
}

/// One source of a COPY/ADD, already expanded (ARG/ENV) by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A path or wildcard pattern inside the source root.
    Path(String),
    /// An `http://` or `https://` URL (ADD only).
    Url(String),
    /// A git source (`git@…`, `….git`, `git://…`): not supported yet.
    Git(String),
    /// A heredoc (`COPY <<EOF /dest`): a file named `name` holding `content`.
    Heredoc {
        /// The heredoc's name, used as the file name.
        name: String,
        /// The body, already chomped and expanded as the Dockerfile says.
        content: Vec<u8>,
    },
}

impl Source {
    /// Classify one source word of COPY/ADD as BuildKit does: `http(s)://`
    /// is a URL unless it names a git repository, `git@`/`git://` and
    /// `….git` URLs are git, anything else is a path.
    pub fn classify(word: &str) -> Source {
        let lower = word.to_ascii_lowercase();
        let is_git = lower.starts_with("git://")
            || lower.starts_with("git@")
            || lower.starts_with("ssh://")
            || ((lower.starts_with("http://") || lower.starts_with("https://"))
                && (lower
                    .split(['#', '?'])
                    .next()
                    .is_some_and(|u| u.ends_with(".git"))));
        if is_git {
            Source::Git(word.to_owned())
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            Source::Url(word.to_owned())
        } else {
            Source::Path(word.to_owned())
        }
    }
}

/// One COPY or ADD, as the solver hands it over.
#[derive(Debug, Clone, Default)]
pub struct CopyOp {
    /// ADD (true) or COPY (false).
    pub is_add: bool,
    /// The sources, in Dockerfile order.
    pub sources: Vec<Source>,
    /// The destination as written (after expansion), relative to `workdir`
    /// unless absolute; a trailing `/` makes it a directory.
    pub dest: String,
    /// The stage's WORKDIR (absolute; empty means `/`).
    pub workdir: String,
    /// Context or stage source.
    pub source_kind: SourceKind,
    /// `--chown=user[:group]`, names looked up in the destination root.
    pub chown: Option<String>,
    /// `--chmod`, octal (`0755`) or symbolic (`u+x,g-w`).
    pub chmod: Option<String>,
    /// `--parents`: keep each source's path (from the root or a `/./` pivot).
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// ADD `--unpack`: `None` is the default (local archives are extracted,
    /// URLs are not).
    pub unpack: Option<bool>,
    /// ADD `--checksum=sha256:…` of a URL source.
    pub checksum: Option<String>,
    /// ADD `--keep-git-dir` (git sources are not supported yet).
    pub keep_git_dir: bool,
    /// A fixed time for every written entry (`SOURCE_DATE_EPOCH`); `None`
    /// keeps source mtimes.
    pub created_time: Option<SystemTime>,
    /// Whether to set owners at all. True in a real build (kiln runs as root
    /// or as root of a user namespace); tests that run unprivileged turn it
    /// off, since only root can hand files to another uid.
    pub apply_ownership: bool,
    /// The context's `.dockerignore` patterns: ignored paths of the source
    /// root are treated as absent. `None` for stage sources.
    pub ignore: Option<kiln_parser::PatternMatcher>,
    /// Link files unchanged since the previous run of this COPY from its
    /// result (see [`Reuse`]); `None` copies everything.
    pub reuse: Option<std::sync::Arc<Reuse>>,
    /// Keep the contents of the small files copied (see
    /// [`Report::contents`]).
    pub record_contents: bool,
}

impl CopyOp {
    /// A COPY of `sources` to `dest` with defaults (context source, owners
    /// applied, workdir `/`).
    pub fn new<I, S>(sources: I, dest: &str) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        CopyOp {
            sources: sources
                .into_iter()
                .map(|s| Source::classify(s.as_ref()))
                .collect(),
            dest: dest.to_owned(),
            workdir: "/".to_owned(),
            apply_ownership: true,
            ..CopyOp::default()
        }
    }
}

/// What kind of entry was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (content copied).
    File,
    /// A directory (created, or merged into).
    Dir,
    /// A symbolic link.
    Symlink,
    /// A hard link to a file written earlier in the same op.
    Hardlink,
    /// A device node or fifo.
    Special,
}

/// One entry written into the destination root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The path inside the destination root, absolute (`/app/main.rs`).
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
}

/// What an op did, for logging and for the cache-key code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Every entry written, in the order written (not the files [`kept`]).
    ///
    /// [`kept`]: Report::kept
    pub written: Vec<Written>,
    /// Source paths read, relative to the source root (`/`-separated, no
    /// leading `/`; `.` is the root itself), after wildcard expansion.
    pub sources_read: Vec<String>,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Bytes of the regular files the copy put in place, written, linked
    /// or kept from a previous result alike (one count per hard-linked
    /// file): about the size of the layer's tar, before it is made.
    pub file_bytes: u64,
    /// With reuse on: the source identity of each regular file and context
    /// directory copied, by path below the destination root, as a log: a
    /// later entry for a path replaces an earlier one, `None` forgets it
    /// (see [`Report::remembered`]).
    pub identities: Vec<(String, Option<FileIdentity>)>,
    /// With reuse on: the regular files hard-linked from a snapshot instead
    /// of copied, by path below the destination root (in no order).
    pub linked: Vec<String>,
    /// With [`CopyOp::record_contents`]: the contents of small xattr-free
    /// regular files the copy wrote (and did not write over), by path below
    /// the destination root, for the layer writer (which then need not
    /// read them back).
    pub contents: kiln_cache::KnownFiles,
    /// With a prepared upper: the files left there as the previous result
    /// has them (their sources unchanged). They are in no other list.
    pub kept: Kept,
}

/// The files a copy into a prepared upper left as they were: entries of the
/// previous result's identities ([`Reuse::prev`]), by index (no path is
/// copied for them on the copy's way).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Kept {
    prev: std::sync::Arc<[(String, FileIdentity)]>,
    indices: Vec<u32>,
}

impl Kept {
    /// How many files were kept.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether no file was kept.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The kept files: path below the destination root, source identity.
    pub fn iter(&self) -> impl Iterator<Item = &(String, FileIdentity)> + '_ {
        self.indices
            .iter()
            .filter_map(|&i| self.prev.get(i as usize))
    }

    /// Records `prev[i]` (of `reuse`'s previous identities) as kept; false
    /// when it cannot be (an index past `u32`: the file is copied instead).
    pub(crate) fn push(&mut self, reuse: &Reuse, i: usize) -> bool {
        let Ok(i) = u32::try_from(i) else {
            return false;
        };
        if self.indices.is_empty() {
            self.prev = std::sync::Arc::clone(&reuse.prev);
        }
        self.indices.push(i);
        true
    }
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kept({} files)", self.indices.len())
    }
}

impl Report {
    fn push(&mut self, path: String, kind: EntryKind) {
        self.written.push(Written { path, kind });
    }

    /// The identities to remember: the last entry of each path in
    /// [`Report::identities`] that is not a `None`, and the files
    /// [`Report::kept`], sorted by path.
    pub fn remembered(self) -> Vec<(String, FileIdentity)> {
        let mut log = self.identities;
        // (A kept file was visited once: it has no entry in the log.)
        log.extend(self.kept.iter().map(|(p, id)| (p.clone(), Some(*id))));
        // Stable: for one path, the later entry stays later.
        log.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, FileIdentity)> = Vec::with_capacity(log.len());
        let mut iter = log.into_iter().peekable();
        while let Some((path, id)) = iter.next() {
            if iter.peek().is_some_and(|(next, _)| *next == path) {
                continue;
            }
            if let Some(id) = id {
                out.push((path, id));
            }
        }
        out
    }
}

/// A resolved path inside the destination root: the host path and the
/// path seen from inside the root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InRoot {
    host: PathBuf,
    inner: String,
}
