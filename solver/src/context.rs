//! Build-context checksums: for the sources of one COPY/ADD, the exact list
//! of files it reads and a tarsum-style content digest, with a persistent
//! stat cache so unchanged files are not read again.
//!
//! Source selection is [`crate::fileop::resolve_sources`] (the same code the
//! copy uses, so the key covers exactly what is copied); a directory source
//! is walked with the `.dockerignore` matcher (excluded directories pruned
//! when no `!` exception can re-include something below them) and the
//! op's `--exclude` patterns (relative to the copied directory).
//!
//! Each entry's digest is sha256 over its context-relative path, type,
//! permission bits, uid, gid, link target, xattrs and content digest
//! (BLAKE3, see [`kiln_cache::content_digest`]) — never its times — and
//! the op's digest is sha256 over the sorted `(path, entry digest)` list.
//! Symlinks are hashed as links; a source path that is itself a link is
//! followed inside the context only.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_parser::{MatchInfo, PatternMatcher};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::fileop::{FileOpError, ResolveOptions, resolve_sources};

/// Errors while checksumming context files.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A source pattern did not resolve (missing path, bad pattern).
    #[error("cannot resolve the sources {}", list(patterns))]
    Resolve {
        /// The patterns as written.
        patterns: Vec<String>,
        /// Why.
        #[source]
        source: Box<FileOpError>,
    },
    /// Reading a file or directory failed.
    #[error("cannot read `{}`", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The `.dockerignore` could not be read or has a bad pattern.
    #[error("cannot use the ignore file")]
    Ignore {
        /// The reader's error (names the file and line).
        #[source]
        source: kiln_parser::DockerignoreError,
    },
    /// A bad `--exclude` pattern.
    #[error("invalid --exclude pattern")]
    Exclude {
        /// The matcher's error.
        #[source]
        source: kiln_parser::DockerignoreError,
    },
    /// The stat cache database failed.
    #[error("stat cache `{}` failed", path.display())]
    StatCache {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
}

fn list(p: &[String]) -> String {
    p.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The type of a context entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A FIFO, socket or device.
    Special,
}

/// One file the op reads, with its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the context root, `/`-separated.
    pub path: String,
    /// The type.
    pub kind: EntryType,
    /// Permission and special bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (files).
    pub size: u64,
    /// A symlink's target.
    pub link_target: Option<String>,
    /// `blake3:<hex>` of the content (regular files; see
    /// [`kiln_cache::content_digest`]).
    pub content: Option<String>,
    /// `sha256:<hex>` over all of the above and the xattrs.
    pub digest: String,
}

/// The checksum of one COPY/ADD's context sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextChecksum {
    /// `sha256:<hex>` over the sorted entries.
    pub digest: String,
    /// The entries read, sorted by path.
    pub files: Vec<FileEntry>,
}

impl ContextChecksum {
    /// `path -> entry digest`, for miss explanations.
    pub fn file_digests(&self) -> BTreeMap<String, String> {
        self.files
            .iter()
            .map(|f| (f.path.clone(), f.digest.clone()))
            .collect()
    }
}

/// Counters of one checksum run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashStats {
    /// Regular files whose content was read and hashed.
    pub hashed: u64,
    /// Regular files whose digest came from the stat cache.
    pub cached: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Regular files whose digest came from the top layer's (see
    /// [`BuildContext::with_top_layer_digests`]).
    pub from_layer: u64,
}

/// A build context directory with its ignore rules.
#[derive(Debug)]
pub struct BuildContext {
    root: PathBuf,
    ignore: Option<PatternMatcher>,
    stat_cache: Option<StatCache>,
    stats: HashStats,
    /// Files changed this recently are not put in the stat cache.
    racy_window_ns: i64,
    /// The read buffer, reused for every file.
    buf: Vec<u8>,
    /// Threads walking a directory source (1: the caller's only).
    threads: usize,
    /// Hash big files through a mapping (see [`BuildContext::of_stage`]).
    map_big_files: bool,
    /// Content digests of the files of the top layer of a stage (see
    /// [`BuildContext::with_top_layer_digests`]).
    top_layer: Option<std::sync::Arc<kiln_cache::ContentDigests>>,
    /// The regular files the checksums found, if kept (see
    /// [`BuildContext::with_seen_files`]).
    seen: Option<kiln_cache::FileMap<String, SeenFile>>,
}

/// A regular file of the context as a checksum's `lstat` found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenFile {
    /// Its identity (see [`crate::fileop::FileIdentity`]).
    pub id: crate::fileop::FileIdentity,
    /// Its link count.
    pub nlink: u64,
}

impl BuildContext {
    /// A context at `root`, filtered by `ignore` (the `.dockerignore`).
    pub fn new(root: impl Into<PathBuf>, ignore: Option<PatternMatcher>) -> Self {
        Self {
            root: root.into(),
            ignore,
            stat_cache: None,
            stats: HashStats::default(),
            racy_window_ns: 2_000_000_000,
            buf: Vec::new(),
            threads: default_threads(),
            map_big_files: false,
            top_layer: None,
            seen: None,
        }
    }

    /// The files of a stage mounted at `root` (immutable: nothing writes a
    /// stage's snapshots), whose big files are hashed through a mapping
    /// instead of read into a buffer. Never for a build context: a file
    /// the user truncates while it is mapped would kill kiln (SIGBUS).
    pub fn of_stage(root: impl Into<PathBuf>) -> Self {
        BuildContext {
            map_big_files: true,
            ..BuildContext::new(root, None)
        }
    }

    /// Takes the content of regular files from `digests`, those taken when
    /// the top layer of the stage mounted at the root was written, when the
    /// size is the same. A regular file of the top layer is the one the
    /// mount shows at its path (an upper layer always wins).
    pub fn with_top_layer_digests(
        mut self,
        digests: std::sync::Arc<kiln_cache::ContentDigests>,
    ) -> Self {
        self.top_layer = Some(digests);
        self
    }

    /// The context at `root` with the ignore file BuildKit would use for
    /// `dockerfile`: `<Dockerfile>.dockerignore` next to it, else
    /// `<root>/.dockerignore`, else none.
    pub fn open(root: impl Into<PathBuf>, dockerfile: &Path) -> Result<Self, ContextError> {
        let root = root.into();
        let ignore = kiln_parser::read_dockerignore(&root, dockerfile)
            .map_err(|source| ContextError::Ignore { source })?;
        Ok(Self::new(root, ignore.map(|f| f.matcher)))
    }

    /// Use (and update) a stat cache; its entries for this context are
    /// loaded now.
    pub fn with_stat_cache(mut self, mut cache: StatCache) -> Result<Self, ContextError> {
        cache.load(&self.root)?;
        self.stat_cache = Some(cache);
        Ok(self)
    }

    /// How recently changed a file may be and still be stat-cached
    /// (default 2 s, at most 0.1 s where times have nanoseconds; tests
    /// use 0).
    pub fn with_racy_window(mut self, window: std::time::Duration) -> Self {
        self.racy_window_ns = i64::try_from(window.as_nanos()).unwrap_or(i64::MAX);
        self
    }

    /// How many threads walk a directory source (default: the CPUs, at
    /// most 4; at least 1).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Keep each regular file's identity as the checksums `lstat` it, by
    /// context-relative path (see [`BuildContext::take_seen_files`]): a
    /// COPY from a prepared upper then need not `lstat` it again.
    pub fn with_seen_files(mut self) -> Self {
        self.seen = Some(kiln_cache::FileMap::default());
        self
    }

    /// The files the checksums so far found (empty unless
    /// [`BuildContext::with_seen_files`]).
    pub fn take_seen_files(&mut self) -> kiln_cache::FileMap<String, SeenFile> {
        self.seen.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The context directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Counters since the context was made.
    pub fn stats(&self) -> HashStats {
        self.stats
    }

    /// Write the stat cache's new entries to disk.
    pub fn flush(&mut self) -> Result<(), ContextError> {
        match &mut self.stat_cache {
            Some(c) => c.flush(),
            None => Ok(()),
        }
    }

    /// Checksum what a COPY/ADD with these source `patterns` (as expanded
    /// in the plan), `--exclude` patterns and `--parents` reads.
    pub fn checksum(
        &mut self,
        patterns: &[String],
        exclude: &[String],
        parents: bool,
    ) -> Result<ContextChecksum, ContextError> {
        let exclude = if exclude.is_empty() {
            None
        } else {
            Some(PatternMatcher::new(exclude).map_err(|source| ContextError::Exclude { source })?)
        };
        let opts = ResolveOptions {
            parents,
            ignore: self.ignore.as_ref(),
            exclude: exclude.as_ref(),
        };
        let sources =
            resolve_sources(&self.root, patterns, &opts).map_err(|e| ContextError::Resolve {
                patterns: patterns.to_vec(),
                source: Box::new(e),
            })?;
        let walker = Walker {
            ignore: self.ignore.as_ref(),
            exclude: exclude.as_ref(),
            index: self.stat_cache.as_ref().map(|c| &c.index),
            racy_window_ns: self.racy_window_ns,
            map_big_files: self.map_big_files,
            top_layer: self.top_layer.as_deref(),
            record_seen: self.seen.is_some(),
        };
        let mut st = WorkerState::new(std::mem::take(&mut self.buf));
        let result = walker.sources(&self.root, &sources, self.threads, &mut st);
        self.stats.hashed += st.stats.hashed;
        self.stats.cached += st.stats.cached;
        self.stats.bytes += st.stats.bytes;
        self.stats.from_layer += st.stats.from_layer;
        self.buf = std::mem::take(&mut st.buf);
        if let Some(seen) = &mut self.seen {
            seen.reserve(st.seen.len());
            seen.extend(st.seen.drain(..));
        }
        if let Some(c) = &mut self.stat_cache {
            c.apply(std::mem::take(&mut st.updates));
        }
        let files = result?;
        let mut h = Sha256::new();
        for e in &files {
            h.update(e.path.as_bytes());
            h.update([0]);
            h.update(e.digest.as_bytes());
            h.update([b'\n']);
        }
        Ok(ContextChecksum {
            digest: sha_string(&h.finalize().into()),
            files,
        })
    }
}

/// The CPUs this process may use (at most 4), looked up once.
fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
}

/// A directory still to be read by [`Walker::walk`].
struct DirJob {
    /// Context-relative (`.` for the root).
    rel: String,
    /// On the host.
    host: PathBuf,
    /// Below the source directory (what `--exclude` matches).
    sub: String,
    /// The `.dockerignore` matches of the directory.
    info: MatchInfo,
}

/// What one thread of a checksum produced.
struct WorkerState {
    /// The read buffer.
    buf: Vec<u8>,
    /// An entry's digest input, reused.
    scratch: Vec<u8>,
    /// Entries found.
    out: Vec<FileEntry>,
    /// New stat cache entries, by directory.
    updates: Vec<DirUpdate>,
    /// New stat cache entries of the directory being read.
    pending: Vec<StatRecord>,
    stats: HashStats,
    /// A skipped (ignored or excluded) directory was walked for a `!`
    /// exception: included entries may lack their parents.
    skipped_walked: bool,
    /// Regular files as `lstat` found them (see
    /// [`BuildContext::with_seen_files`]).
    seen: Vec<(String, SeenFile)>,
}

impl WorkerState {
    fn new(buf: Vec<u8>) -> Self {
        Self {
            buf,
            scratch: Vec::new(),
            out: Vec::new(),
            updates: Vec::new(),
            pending: Vec::new(),
            stats: HashStats::default(),
            skipped_walked: false,
            seen: Vec::new(),
        }
    }

    /// Files newly hashed in `dir` (listed whole when `listing` is given)
    /// become a stat cache update.
    fn end_dir(&mut self, dir: &str, listing: Option<Vec<std::ffi::OsString>>) {
        if !self.pending.is_empty() {
            self.updates.push(DirUpdate {
                dir: dir.to_owned(),
                listing,
                records: std::mem::take(&mut self.pending),
            });
        }
    }
}

/// The read-only parts of a checksum, shared by its threads.
struct Walker<'a> {
    ignore: Option<&'a PatternMatcher>,
    exclude: Option<&'a PatternMatcher>,
    index: Option<&'a StatIndex>,
    racy_window_ns: i64,
    map_big_files: bool,
    top_layer: Option<&'a kiln_cache::ContentDigests>,
    record_seen: bool,
}

/// The stat cache's directory key of a context-relative path: its parent
/// (`""` for the root) and its name.
fn split_rel(rel: &str) -> (&str, &str) {
    match rel.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", rel),
    }
}

impl Walker<'_> {
    /// The entries of all `sources`, sorted by path, each path once.
    fn sources(
        &self,
        root: &Path,
        sources: &[crate::fileop::SourceEntry],
        threads: usize,
        st: &mut WorkerState,
    ) -> Result<Vec<FileEntry>, ContextError> {
        let mut files: Vec<FileEntry> = Vec::new();
        for src in sources {
            // A source that is a link: hash the link itself, and what it
            // resolved to inside the context.
            if src.rel_path != src.resolved_path && src.rel_path != "." {
                let link = root.join(&src.rel_path);
                files.push(self.entry_at(st, &src.rel_path, &link)?);
            }
            let rel = src.resolved_path.as_str();
            let e = self.entry_at(st, rel, &src.host)?;
            let is_dir = e.kind == EntryType::Dir;
            if rel != "." {
                files.push(e);
            }
            if is_dir && src.is_dir {
                st.skipped_walked = false;
                let mut walked = self.walk(rel, &src.host, threads, st)?;
                if files.is_empty() {
                    files = walked;
                } else {
                    files.append(&mut walked);
                }
                if st.skipped_walked {
                    // An ignored directory with an included child (`!`
                    // rule) is still sent, as fsutil sends the parents of
                    // what it includes.
                    sort_unique(&mut files);
                    let prefix = if rel == "." {
                        String::new()
                    } else {
                        format!("{rel}/")
                    };
                    let known =
                        |p: &str| files.binary_search_by(|e| e.path.as_str().cmp(p)).is_ok();
                    let mut missing = Vec::new();
                    for e in files.iter().filter(|e| e.path.starts_with(&prefix)) {
                        let mut p = e.path.as_str();
                        while let Some((parent, _)) = p.rsplit_once('/') {
                            if parent.len() < prefix.len() || known(parent) {
                                break;
                            }
                            missing.push(parent.to_owned());
                            p = parent;
                        }
                    }
                    missing.sort_unstable();
                    missing.dedup();
                    for m in missing {
                        let host = root.join(&m);
                        files.push(self.entry_at(st, &m, &host)?);
                    }
                }
            }
        }
        sort_unique(&mut files);
        Ok(files)
    }

    /// The entries below the directory `dir` (context-relative `rel`),
    /// sorted by path, read by `threads` threads. Ignored entries are
    /// skipped, ignored directories pruned when nothing below them can be
    /// re-included.
    fn walk(
        &self,
        rel: &str,
        dir: &Path,
        threads: usize,
        st: &mut WorkerState,
    ) -> Result<Vec<FileEntry>, ContextError> {
        let first = DirJob {
            rel: rel.to_owned(),
            host: dir.to_path_buf(),
            sub: String::new(),
            info: MatchInfo::default(),
        };
        let mut stack = vec![first];
        // More threads once there are two directories to read (none for a
        // directory without subdirectories).
        while stack.len() == 1 && threads > 1 {
            if let Some(job) = stack.pop() {
                self.read_dir(job, st, &mut stack)?;
            }
        }
        let mut out = if stack.len() > 1 && threads > 1 {
            self.walk_parallel(stack, threads, st)?
        } else {
            while let Some(job) = stack.pop() {
                self.read_dir(job, st, &mut stack)?;
            }
            std::mem::take(&mut st.out)
        };
        out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// [`walk`](Self::walk) with `threads` threads taking directories from
    /// a shared queue (the caller is one of them), `first` in it to begin.
    fn walk_parallel(
        &self,
        first: Vec<DirJob>,
        threads: usize,
        st: &mut WorkerState,
    ) -> Result<Vec<FileEntry>, ContextError> {
        struct Queue {
            jobs: Vec<DirJob>,
            /// Directories being read.
            active: usize,
            failed: bool,
        }
        let queue = std::sync::Mutex::new(Queue {
            jobs: first,
            active: 0,
            failed: false,
        });
        let ready = std::sync::Condvar::new();
        let work = |st: &mut WorkerState| -> Result<(), ContextError> {
            let mut found = Vec::new();
            loop {
                let job = {
                    let mut q = queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    loop {
                        if q.failed {
                            return Ok(());
                        }
                        if let Some(j) = q.jobs.pop() {
                            q.active += 1;
                            break j;
                        }
                        if q.active == 0 {
                            ready.notify_all();
                            return Ok(());
                        }
                        q = ready
                            .wait(q)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                };
                let r = self.read_dir(job, st, &mut found);
                let mut q = queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                q.active -= 1;
                q.jobs.append(&mut found);
                if r.is_err() {
                    q.failed = true;
                }
                ready.notify_all();
                drop(q);
                r?;
            }
        };
        let (mine, theirs) = std::thread::scope(|s| {
            // (A thread the system cannot start leaves fewer workers.)
            let helpers: Vec<_> = (1..threads)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .spawn_scoped(s, || {
                            let mut hs = WorkerState::new(Vec::new());
                            let r = work(&mut hs);
                            (r, hs)
                        })
                        .ok()
                })
                .collect();
            let mine = work(st);
            let theirs: Vec<_> = helpers.into_iter().map(|h| h.join()).collect();
            (mine, theirs)
        });
        let mut out = std::mem::take(&mut st.out);
        let mut err = mine.err();
        for t in theirs {
            match t {
                Ok((r, mut hs)) => {
                    if err.is_none() {
                        err = r.err();
                    }
                    out.append(&mut hs.out);
                    st.updates.append(&mut hs.updates);
                    st.stats.hashed += hs.stats.hashed;
                    st.stats.cached += hs.stats.cached;
                    st.stats.bytes += hs.stats.bytes;
                    st.stats.from_layer += hs.stats.from_layer;
                    st.skipped_walked |= hs.skipped_walked;
                    st.seen.append(&mut hs.seen);
                }
                // A panic in a helper is a bug: pass it on.
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Reads one directory: its entries go to `st.out`, its subdirectories
    /// to `found`.
    fn read_dir(
        &self,
        job: DirJob,
        st: &mut WorkerState,
        found: &mut Vec<DirJob>,
    ) -> Result<(), ContextError> {
        let dir_key = if job.rel == "." { "" } else { job.rel.as_str() };
        let cached_dir = self.index.and_then(|i| i.dirs.get(dir_key));
        let mut listing = Vec::new();
        // Entries keep the directory open: their `statx` is relative to it
        // (no walk of the whole path for each file).
        for dirent in fs_err::read_dir(&job.host).map_err(io_err(&job.host))? {
            let dirent = dirent.map_err(io_err(&job.host))?;
            let name = dirent.file_name();
            let name_s = name.to_string_lossy();
            let rel_path = if dir_key.is_empty() {
                name_s.clone().into_owned()
            } else {
                let mut p = String::with_capacity(dir_key.len() + 1 + name_s.len());
                p.push_str(dir_key);
                p.push('/');
                p.push_str(&name_s);
                p
            };
            let sub = match self.exclude {
                Some(_) if job.sub.is_empty() => name_s.clone().into_owned(),
                Some(_) => format!("{}/{name_s}", job.sub),
                None => String::new(),
            };
            let (ignored, child_info) = match self.ignore {
                Some(m) => m.matches_with_parent(&rel_path, &job.info),
                None => (false, MatchInfo::default()),
            };
            let excluded = self.exclude.is_some_and(|m| m.matches(&sub));
            if ignored || excluded {
                let can_skip = (!ignored || self.ignore.is_none_or(|m| m.can_skip_dir(&rel_path)))
                    && (!excluded || self.exclude.is_none_or(|m| m.can_skip_dir(&sub)));
                if !can_skip {
                    let host = job.host.join(&name);
                    let ft = dirent.file_type().map_err(io_err(&host))?;
                    if ft.is_dir() {
                        st.skipped_walked = true;
                        found.push(DirJob {
                            rel: rel_path,
                            host,
                            sub,
                            info: child_info,
                        });
                    }
                }
                continue;
            }
            let meta = dirent.metadata().map_err(|source| ContextError::Io {
                path: job.host.join(&name),
                source,
            })?;
            let cached = cached_dir.and_then(|d| d.get(name.as_bytes()));
            let is_dir = meta.is_dir();
            let e = self.entry_with_meta(st, rel_path, &job.host, &name, &meta, cached)?;
            if is_dir {
                found.push(DirJob {
                    rel: e.path.clone(),
                    host: job.host.join(&name),
                    sub,
                    info: child_info,
                });
            }
            st.out.push(e);
            if self.index.is_some() {
                listing.push(name);
            }
        }
        st.end_dir(dir_key, Some(listing));
        Ok(())
    }

    /// The entry of the context-relative path `rel` at `host`.
    fn entry_at(
        &self,
        st: &mut WorkerState,
        rel: &str,
        host: &Path,
    ) -> Result<FileEntry, ContextError> {
        let meta = fs_err::symlink_metadata(host).map_err(io_err(host))?;
        let (dir_key, _) = split_rel(rel);
        let (Some(dir), Some(name)) = (host.parent(), host.file_name()) else {
            // The context root itself.
            return self.entry_with_meta(
                st,
                rel.to_owned(),
                host,
                std::ffi::OsStr::new(""),
                &meta,
                None,
            );
        };
        let cached = self
            .index
            .and_then(|i| i.dirs.get(dir_key))
            .and_then(|d| d.get(name.as_bytes()));
        let e = self.entry_with_meta(st, rel.to_owned(), dir, name, &meta, cached)?;
        st.end_dir(dir_key, None);
        Ok(e)
    }

    /// The entry `rel` (the file `name` in the host directory `dir`), with
    /// its stat cache entry if there is one.
    fn entry_with_meta(
        &self,
        st: &mut WorkerState,
        rel: String,
        dir: &Path,
        name: &std::ffi::OsStr,
        meta: &std::fs::Metadata,
        cached: Option<CachedStat>,
    ) -> Result<FileEntry, ContextError> {
        let host = || {
            if name.is_empty() {
                dir.to_path_buf()
            } else {
                dir.join(name)
            }
        };
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            EntryType::Symlink
        } else if ft.is_dir() {
            EntryType::Dir
        } else if ft.is_file() {
            EntryType::File
        } else {
            EntryType::Special
        };
        let link_target = if kind == EntryType::Symlink {
            let host = host();
            Some(
                fs_err::read_link(&host)
                    .map_err(io_err(&host))?
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            None
        };
        if kind == EntryType::File && self.record_seen {
            st.seen.push((
                rel.clone(),
                SeenFile {
                    id: crate::fileop::FileIdentity::of(meta),
                    nlink: meta.nlink(),
                },
            ));
        }
        let (content, xattrs) = if kind == EntryType::File {
            let stat = StatKey::of(meta);
            match cached {
                // A file unchanged since it was hashed (ctime included)
                // still has the xattrs it had: none, when the cache says so.
                Some(c) if c.stat == stat => {
                    st.stats.cached += 1;
                    let xattrs = if c.xattr_free {
                        BTreeMap::new()
                    } else {
                        read_xattrs(&host())
                    };
                    (Some(c.digest), xattrs)
                }
                _ => {
                    let host = host();
                    // A stage's file its top layer saw without any xattrs
                    // has none in the stage either (the same file).
                    let top = self
                        .top_layer
                        .and_then(|t| t.entry(rel.as_bytes(), meta.len()));
                    let xattrs = if top.is_some_and(|(_, bare)| bare) {
                        BTreeMap::new()
                    } else {
                        read_xattrs(&host)
                    };
                    let d = match top.map(|(d, _)| d) {
                        Some(d) => {
                            st.stats.from_layer += 1;
                            d
                        }
                        None => self.hash_file(st, &host, name, meta, xattrs.is_empty())?,
                    };
                    (Some(d), xattrs)
                }
            }
        } else {
            (None, read_xattrs(&host()))
        };
        let content = content.map(|d| content_string(&d));
        // sha256 over `rel \0 kind \0 mode(octal) \0 uid \0 gid \0 link \0
        // content \0 [rdev \0] (xattr=hex \0)*`.
        let b = &mut st.scratch;
        b.clear();
        b.extend_from_slice(rel.as_bytes());
        b.push(0);
        b.extend_from_slice(match kind {
            EntryType::File => b"File",
            EntryType::Dir => b"Dir",
            EntryType::Symlink => b"Symlink",
            EntryType::Special => b"Special",
        });
        b.push(0);
        push_num(b, u64::from(meta.mode() & 0o7777), 8);
        b.push(0);
        push_num(b, u64::from(meta.uid()), 10);
        b.push(0);
        push_num(b, u64::from(meta.gid()), 10);
        b.push(0);
        b.extend_from_slice(link_target.as_deref().unwrap_or("").as_bytes());
        b.push(0);
        b.extend_from_slice(content.as_deref().unwrap_or("").as_bytes());
        b.push(0);
        if kind == EntryType::Special {
            push_num(b, meta.rdev(), 10);
            b.push(0);
        }
        for (k, v) in &xattrs {
            b.extend_from_slice(k.as_bytes());
            b.push(b'=');
            b.extend_from_slice(hex(v).as_bytes());
            b.push(0);
        }
        let digest = sha_string(&Sha256::digest(&b[..]).into());
        Ok(FileEntry {
            path: rel,
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: if kind == EntryType::File {
                meta.len()
            } else {
                0
            },
            link_target,
            content,
            digest,
        })
    }

    /// Hashes a file the stat cache did not know, and records it there
    /// (unless it may still be changing).
    fn hash_file(
        &self,
        st: &mut WorkerState,
        host: &Path,
        name: &std::ffi::OsStr,
        meta: &std::fs::Metadata,
        xattr_free: bool,
    ) -> Result<[u8; 32], ContextError> {
        let stat = StatKey::of(meta);
        let mut f = fs_err::File::open(host).map_err(io_err(host))?;
        let mut h = kiln_cache::ContentHasher::new();
        // A stage's big files (which nothing writes any more) are hashed
        // from a mapping: no copy out of the page cache.
        if self.map_big_files
            && meta.len() >= 1 << 20
            && kiln_cache::layer::for_each_window(f.file(), meta.len(), |bytes| {
                bytes.chunks(1 << 20).for_each(|c| h.update(c));
                Ok(())
            })
            .map_err(io_err(host))?
        {
            st.stats.hashed += 1;
            st.stats.bytes += meta.len();
            return Ok(h.finalize());
        }
        if st.buf.is_empty() {
            st.buf = vec![0u8; 256 * 1024];
        }
        let mut n_total = 0u64;
        loop {
            let n = f.read(&mut st.buf).map_err(io_err(host))?;
            if n == 0 {
                break;
            }
            n_total += n as u64;
            h.update(&st.buf[..n]);
        }
        let digest = h.finalize();
        st.stats.hashed += 1;
        st.stats.bytes += n_total;
        // A file read while it may still change within the timestamp
        // granularity is not cached ("racy" entries, as git does): its
        // mtime must be older than the read.
        if self.index.is_some()
            && !name.is_empty()
            && !stat.is_racy(SystemTime::now(), self.racy_window_ns)
            && n_total == meta.len()
        {
            st.pending.push(StatRecord {
                name: name.to_owned(),
                stat,
                digest,
                xattr_free,
            });
        }
        Ok(digest)
    }
}

/// Sorts `files` by path, keeping the last added of equal paths (as a
/// map insert would).
fn sort_unique(files: &mut Vec<FileEntry>) {
    // Stable, and linear on the usual already sorted input.
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|later, earlier| {
        if later.path == earlier.path {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
}

/// Appends `n` in base `radix` (8 or 10).
fn push_num(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    let mut tmp = [0u8; 24];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % radix) as u8;
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// The xattrs of `path` (not following links), sorted; `security.selinux`
/// is left out because it depends on the host's policy, not the content.
fn read_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    // A file system without xattr support has none: not an error.
    let Ok(names) = xattr::list(path) else {
        return out;
    };
    for name in names {
        let n = name.to_string_lossy().into_owned();
        // Host labels, and overlayfs' own (an overlay never shows them; a
        // stage's layer read in its directory may have them).
        if n == "security.selinux" || is_overlay_private(&n) {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(path, &name) {
            out.insert(n, v);
        }
    }
    out
}

/// Whether `name` is one of overlayfs' own xattrs (`trusted.overlay.*`,
/// `user.overlay.*`): never part of a file's content in kiln.
pub(crate) fn is_overlay_private(name: &str) -> bool {
    name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.")
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// `sha256:<hex>`.
fn sha_string(d: &[u8; 32]) -> String {
    labelled("sha256", d)
}

/// A content digest as an entry shows it: `blake3:<hex>` (see
/// [`kiln_cache::content_digest`]).
fn content_string(d: &[u8; 32]) -> String {
    labelled(kiln_cache::CONTENT_ALGORITHM, d)
}

/// `<algorithm>:<hex>`.
fn labelled(algorithm: &str, d: &[u8; 32]) -> String {
    // (Two digests per context file: the hex is made in a byte buffer, not
    // a char at a time.)
    let mut hex = [0u8; 64];
    for (pair, b) in hex.chunks_exact_mut(2).zip(d) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
    let mut s = String::with_capacity(algorithm.len() + 65);
    s.push_str(algorithm);
    s.push(':');
    s.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    s
}

/// The racy window for times kept in nanoseconds (see [`StatKey::is_racy`]):
/// ten times the coarsest kernel clock tick.
const FINE_RACY_NS: i64 = 100_000_000;

/// The stat fields that identify an unchanged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatKey {
    /// Size.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns (catches `touch -m` back-dating).
    pub ctime_ns: i64,
    /// Inode.
    pub ino: u64,
    /// Device.
    pub dev: u64,
    /// `st_mode`.
    pub mode: u32,
}

impl StatKey {
    /// From a file's metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            size: m.len(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
            mode: m.mode(),
        }
    }

    /// Changed so recently before `now` that a later write could keep the
    /// same times, so the digest must not be cached. How recently depends
    /// on the times' granularity: `window_ns` for a file system that keeps
    /// whole seconds (both times without nanoseconds: FAT keeps 2 s), at
    /// most [`FINE_RACY_NS`] for one that keeps nanoseconds (the kernel
    /// stamps them from a clock that advances a tick of at most 10 ms).
    fn is_racy(&self, now: SystemTime, window_ns: i64) -> bool {
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let newest = self.mtime_ns.max(self.ctime_ns);
        let whole_seconds =
            self.mtime_ns % 1_000_000_000 == 0 && self.ctime_ns % 1_000_000_000 == 0;
        let window = if whole_seconds {
            window_ns
        } else {
            window_ns.min(FINE_RACY_NS)
        };
        now_ns.saturating_sub(newest) < window
    }
}

/// A file newly hashed, for the stat cache.
#[derive(Debug, Clone)]
struct StatRecord {
    name: std::ffi::OsString,
    stat: StatKey,
    digest: [u8; 32],
    xattr_free: bool,
}

/// The new stat cache entries of one directory.
#[derive(Debug)]
struct DirUpdate {
    /// Context-relative (`""`: the root).
    dir: String,
    /// Every name in the directory, when it was read whole: entries of
    /// other names (removed files) are dropped.
    listing: Option<Vec<std::ffi::OsString>>,
    records: Vec<StatRecord>,
}

/// A stat cache entry, as looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CachedStat {
    stat: StatKey,
    digest: [u8; 32],
    xattr_free: bool,
}

/// One part of a directory's stat cache entries (see [`DirParts`]): the
/// stored blob, version byte 2, the part's index and the directory's part
/// count (`u32` each), then per entry (sorted by name) `u16` name length,
/// name, size, mtime, ctime, inode, device (8 bytes each), mode (4), flags
/// (1: bit 0 = no xattrs), content digest (32, see
/// [`kiln_cache::content_digest`]), little-endian. (Version 1 held sha256
/// content digests: such parts are not read.)
#[derive(Debug, Default)]
struct DirBlob {
    data: Vec<u8>,
    /// Where each entry's name length starts, in name order.
    offsets: Vec<u32>,
    /// Which part, of how many.
    part: u32,
    parts: u32,
    /// Changed since loaded.
    dirty: bool,
}

const BLOB_VERSION: u8 = 2;
const HEADER_LEN: usize = 1 + 4 + 4;
const FIXED_LEN: usize = 8 * 5 + 4 + 1 + 32;

/// A directory's entries are split in parts of at most about this many, so
/// a file hashed again in a huge directory rewrites one part of it.
const PART_ENTRIES: usize = 4096;

/// The part of the entry `name` among `n`: FNV-1a of the name.
fn part_of(name: &[u8], n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

/// How many parts `count` entries are stored in (a power of two).
fn parts_for(count: usize) -> usize {
    if count <= PART_ENTRIES {
        1
    } else {
        (count / (PART_ENTRIES / 2)).next_power_of_two()
    }
}

impl DirBlob {
    /// Parses a stored blob; a damaged or unknown one is empty (its files
    /// are hashed again).
    fn parse(data: Vec<u8>) -> Self {
        let mut offsets = Vec::new();
        let header = |i: usize| {
            data.get(i..i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let (Some(part), Some(parts)) = (header(1), header(5)) else {
            return Self::default();
        };
        let ok = data.first() == Some(&BLOB_VERSION) && part < parts && {
            let mut at = HEADER_LEN;
            let mut sorted = true;
            let mut good = true;
            while at < data.len() {
                let Some(len) = data.get(at..at + 2) else {
                    good = false;
                    break;
                };
                let n = usize::from(u16::from_le_bytes([len[0], len[1]]));
                let end = at + 2 + n + FIXED_LEN;
                if end > data.len() || u32::try_from(at).is_err() {
                    good = false;
                    break;
                }
                if let Some(&prev) = offsets.last() {
                    sorted &= Self::name_at(&data, prev) < &data[at + 2..at + 2 + n];
                }
                offsets.push(at as u32);
                at = end;
            }
            if good && !sorted {
                offsets.sort_by(|a, b| Self::name_at(&data, *a).cmp(Self::name_at(&data, *b)));
                offsets.dedup_by(|a, b| Self::name_at(&data, *a) == Self::name_at(&data, *b));
            }
            good
        };
        if ok {
            Self {
                data,
                offsets,
                part,
                parts,
                dirty: false,
            }
        } else {
            Self::default()
        }
    }

    fn name_at(data: &[u8], at: u32) -> &[u8] {
        let at = at as usize;
        let n = usize::from(u16::from_le_bytes([data[at], data[at + 1]]));
        &data[at + 2..at + 2 + n]
    }

    fn entry_at(&self, at: u32) -> CachedStat {
        let at = at as usize;
        let n = usize::from(u16::from_le_bytes([self.data[at], self.data[at + 1]]));
        let f = &self.data[at + 2 + n..at + 2 + n + FIXED_LEN];
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&f[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&f[45..77]);
        CachedStat {
            stat: StatKey {
                size: u64_at(0),
                mtime_ns: u64_at(8) as i64,
                ctime_ns: u64_at(16) as i64,
                ino: u64_at(24),
                dev: u64_at(32),
                mode: u32::from_le_bytes([f[40], f[41], f[42], f[43]]),
            },
            digest,
            xattr_free: f[44] & 1 == 1,
        }
    }

    fn get(&self, name: &[u8]) -> Option<CachedStat> {
        let i = self
            .offsets
            .binary_search_by(|&at| Self::name_at(&self.data, at).cmp(name))
            .ok()?;
        Some(self.entry_at(self.offsets[i]))
    }

    fn entries(&self) -> impl Iterator<Item = (&[u8], CachedStat)> + '_ {
        self.offsets
            .iter()
            .map(|&at| (Self::name_at(&self.data, at), self.entry_at(at)))
    }

    /// Part `part` of `parts` holding `entries` (names sorted, at most
    /// `u16::MAX` bytes).
    fn build<'a>(
        entries: impl Iterator<Item = (&'a Vec<u8>, &'a CachedStat)>,
        part: u32,
        parts: u32,
    ) -> Self {
        let mut data = Vec::new();
        data.push(BLOB_VERSION);
        data.extend_from_slice(&part.to_le_bytes());
        data.extend_from_slice(&parts.to_le_bytes());
        let mut offsets = Vec::new();
        for (name, c) in entries {
            let Ok(n) = u16::try_from(name.len()) else {
                continue;
            };
            let Ok(at) = u32::try_from(data.len()) else {
                break;
            };
            offsets.push(at);
            data.extend_from_slice(&n.to_le_bytes());
            data.extend_from_slice(name);
            data.extend_from_slice(&c.stat.size.to_le_bytes());
            data.extend_from_slice(&c.stat.mtime_ns.to_le_bytes());
            data.extend_from_slice(&c.stat.ctime_ns.to_le_bytes());
            data.extend_from_slice(&c.stat.ino.to_le_bytes());
            data.extend_from_slice(&c.stat.dev.to_le_bytes());
            data.extend_from_slice(&c.stat.mode.to_le_bytes());
            data.push(u8::from(c.xattr_free));
            data.extend_from_slice(&c.digest);
        }
        Self {
            data,
            offsets,
            part,
            parts,
            dirty: true,
        }
    }
}

/// One directory's stat cache entries: [`parts_for`] parts, a row each,
/// the entry `name` in part [`part_of`]`(name)`.
#[derive(Debug, Default)]
struct DirParts {
    parts: Vec<DirBlob>,
    /// Stored rows from this part index on are to be deleted.
    stale_from: Option<usize>,
}

impl DirParts {
    fn get(&self, name: &[u8]) -> Option<CachedStat> {
        if self.parts.is_empty() {
            return None;
        }
        self.parts[part_of(name, self.parts.len())].get(name)
    }

    fn len(&self) -> usize {
        self.parts.iter().map(|p| p.offsets.len()).sum()
    }

    /// The loaded rows of a directory; parts that do not make a whole set
    /// (damaged, or from two writers) are dropped with their rows.
    fn from_rows(mut rows: Vec<DirBlob>) -> Self {
        rows.sort_by_key(|b| b.part);
        let n = rows.len();
        let whole = rows
            .iter()
            .enumerate()
            .all(|(i, b)| b.part as usize == i && b.parts as usize == n);
        if whole {
            Self {
                parts: rows,
                stale_from: None,
            }
        } else {
            Self {
                parts: Vec::new(),
                stale_from: Some(0),
            }
        }
    }

    /// All entries in `parts_for` parts, every part to be written.
    fn split(entries: &BTreeMap<Vec<u8>, CachedStat>) -> Vec<DirBlob> {
        let n = parts_for(entries.len());
        (0..n)
            .map(|p| {
                DirBlob::build(
                    entries.iter().filter(|(k, _)| part_of(k, n) == p),
                    p as u32,
                    n as u32,
                )
            })
            .collect()
    }

    /// Adds `records`; entries of parts rewritten whose name is not in
    /// `listing` (when given) are dropped.
    fn update(&mut self, records: Vec<StatRecord>, listing: Option<&[std::ffi::OsString]>) {
        let names: Option<std::collections::HashSet<&[u8]>> =
            listing.map(|l| l.iter().map(|n| n.as_bytes()).collect());
        let n = self.parts.len();
        let mut touched: BTreeMap<usize, BTreeMap<Vec<u8>, CachedStat>> = BTreeMap::new();
        for r in records {
            let p = if n == 0 {
                0
            } else {
                part_of(r.name.as_bytes(), n)
            };
            let part = touched.entry(p).or_insert_with(|| match self.parts.get(p) {
                Some(b) => b.entries().map(|(k, c)| (k.to_vec(), c)).collect(),
                None => BTreeMap::new(),
            });
            part.insert(
                r.name.as_bytes().to_vec(),
                CachedStat {
                    stat: r.stat,
                    digest: r.digest,
                    xattr_free: r.xattr_free,
                },
            );
        }
        for (p, mut entries) in touched {
            if let Some(names) = &names {
                // Files no longer in the directory.
                entries.retain(|k, _| names.contains(k.as_slice()));
            }
            if n == 0 {
                self.parts = Self::split(&entries);
            } else {
                self.parts[p] = DirBlob::build(entries.iter(), p as u32, n as u32);
            }
        }
        // Re-split a directory that grew past its parts (or shrank well
        // below them).
        let n = self.parts.len();
        let want = parts_for(self.len());
        if want > n || want * 4 <= n {
            let all: BTreeMap<Vec<u8>, CachedStat> = self
                .parts
                .iter()
                .flat_map(|b| b.entries().map(|(k, c)| (k.to_vec(), c)))
                .collect();
            self.parts = Self::split(&all);
            if want < n {
                self.stale_from = Some(self.stale_from.map_or(want, |s| s.min(want)));
            }
        }
    }

    fn dirty(&self) -> bool {
        self.stale_from.is_some() || self.parts.iter().any(|p| p.dirty)
    }
}

/// The stat cache entries of one context, by directory.
#[derive(Debug, Default)]
struct StatIndex {
    /// The context root, as stored.
    root: String,
    /// Context-relative directory (`""`: the root) -> its entries.
    dirs: HashMap<String, DirParts>,
}

/// `(path, size, mtime, ctime, inode, dev, mode) -> content digest`,
/// persisted in `statcache.db` under the store root, one row (a blob, see
/// [`DirBlob`]) per context directory (per part of a huge one): loading a
/// context reads a row per directory, and a build that hashed files again
/// rewrites only the rows of their directories, in one transaction, at
/// [`flush`](Self::flush).
#[derive(Debug)]
pub struct StatCache {
    db: CacheDb,
    path: PathBuf,
    index: StatIndex,
}

impl StatCache {
    /// Open (or create) `<store_root>/statcache.db`.
    pub fn open(store_root: &Path) -> Result<Self, ContextError> {
        fs_err::create_dir_all(store_root).map_err(io_err(store_root))?;
        let db = CacheDb::open(store_root)
            .map_err(|(path, source)| ContextError::StatCache { path, source })?;
        StatCache::with_db(db)
    }

    /// The stat cache in `db` (shared with the build's other users; its
    /// tables are made when it is opened).
    pub fn with_db(db: CacheDb) -> Result<Self, ContextError> {
        let path = db.path().to_owned();
        Ok(Self {
            db,
            path,
            index: StatIndex::default(),
        })
    }

    fn db_err(&self) -> impl Fn(rusqlite::Error) -> ContextError + '_ {
        |source| ContextError::StatCache {
            path: self.path.clone(),
            source,
        }
    }

    /// Load the entries under `dir` (a context root) into memory; the
    /// number of files known.
    pub fn load(&mut self, dir: &Path) -> Result<usize, ContextError> {
        let root = dir.to_string_lossy().trim_end_matches('/').to_owned();
        let mut rows_of: HashMap<String, Vec<DirBlob>> = HashMap::new();
        {
            let e = self.db_err();
            let conn = self.db.conn();
            let mut stmt = conn
                .prepare_cached("SELECT dir, entries FROM stat_parts WHERE root = ?1")
                .map_err(&e)?;
            let mut rows = stmt.query([&root]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let d: String = row.get(0).map_err(&e)?;
                let blob = match row.get_ref(1).map_err(&e)? {
                    rusqlite::types::ValueRef::Blob(b) => DirBlob::parse(b.to_vec()),
                    _ => DirBlob::default(),
                };
                rows_of.entry(d).or_default().push(blob);
            }
        }
        // (Older kiln versions' per-file table, `stat_cache`, holds sha256
        // content digests: not read.)
        let dirs: HashMap<String, DirParts> = rows_of
            .into_iter()
            .map(|(d, rows)| (d, DirParts::from_rows(rows)))
            .collect();
        let n = dirs.values().map(DirParts::len).sum();
        self.index = StatIndex { root, dirs };
        Ok(n)
    }

    /// Adds newly hashed files to the loaded entries (visible to lookups
    /// now, written by [`flush`](Self::flush)).
    fn apply(&mut self, updates: Vec<DirUpdate>) {
        for u in updates {
            self.index
                .dirs
                .entry(u.dir)
                .or_default()
                .update(u.records, u.listing.as_deref());
        }
    }

    /// Write the directories with new entries.
    pub fn flush(&mut self) -> Result<(), ContextError> {
        if !self.index.dirs.values().any(DirParts::dirty) {
            return Ok(());
        }
        let path = self.path.clone();
        let e = |source| ContextError::StatCache {
            path: path.clone(),
            source,
        };
        let mut conn = self.db.conn();
        let tx = begin_write(&mut conn).map_err(e)?;
        {
            let mut drop_rows = tx
                .prepare_cached(
                    "DELETE FROM stat_parts WHERE root = ?1 AND dir = ?2 AND part >= ?3",
                )
                .map_err(e)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO stat_parts (root, dir, part, entries) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (root, dir, part) DO UPDATE SET entries = excluded.entries",
                )
                .map_err(e)?;
            for (d, dp) in self.index.dirs.iter().filter(|(_, dp)| dp.dirty()) {
                if let Some(from) = dp.stale_from {
                    drop_rows
                        .execute(rusqlite::params![self.index.root, d, from as i64])
                        .map_err(e)?;
                }
                for b in dp.parts.iter().filter(|b| b.dirty) {
                    put.execute(rusqlite::params![self.index.root, d, b.part, b.data])
                        .map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)?;
        for dp in self.index.dirs.values_mut() {
            dp.stale_from = None;
            for b in &mut dp.parts {
                b.dirty = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "context_tests.rs"]
mod tests;

/// Opens `statcache.db` (stat cache, key history, content memo): WAL so
/// concurrent builds read while one writes, a busy timeout instead of
/// failing when two write at once; a cache, so losing the last writes on
/// power loss only costs re-reads (`synchronous=NORMAL`); no checkpoint
/// when a short-lived process closes it, but a small WAL (checkpointed
/// every 128 pages and truncated to 1 MiB), since every process that opens
/// it alone reads the whole WAL to rebuild its index.
pub(crate) fn open_cache_db(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=128;
         PRAGMA journal_size_limit=1048576;",
    )?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    // The tables are made once (the version says they are there), not
    // with a `CREATE TABLE IF NOT EXISTS` per user per build: every SQL
    // text is parsed anew by each short-lived process.
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < CACHE_SCHEMA {
        conn.execute_batch(CACHE_TABLES)?;
        conn.pragma_update(None, "user_version", CACHE_SCHEMA)?;
    }
    Ok(conn)
}

/// A write transaction on `statcache.db`: `BEGIN IMMEDIATE`, which waits
/// (the busy timeout) for another build's write. A deferred transaction
/// that reads first and then writes fails at once (SQLITE_BUSY, no busy
/// wait) when another build wrote after its read began.
pub(crate) fn begin_write(
    conn: &mut rusqlite::Connection,
) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

/// The version of `statcache.db`'s tables ([`CACHE_TABLES`]).
const CACHE_SCHEMA: i64 = 1;

/// The tables of `statcache.db`: the stat cache (`stat_parts`), the key
/// history (`key_history3`, `key_history3_files`) and the content memo
/// (`content_digest`). Older kiln versions' tables (`stat_cache`,
/// `key_history2`) are still read where they exist.
///
/// The key history's are rowid tables updated in place: a row of about
/// 1 KB stays in its leaf page (a `WITHOUT ROWID` row that size spills to
/// overflow pages), so a one-file rebuild writes a few pages.
const CACHE_TABLES: &str = "
    CREATE TABLE IF NOT EXISTS stat_parts (
        root TEXT NOT NULL,
        dir TEXT NOT NULL,
        part INTEGER NOT NULL,
        entries BLOB NOT NULL,
        PRIMARY KEY (root, dir, part)
    );
    CREATE TABLE IF NOT EXISTS key_history3 (
        scope TEXT NOT NULL,
        stage TEXT NOT NULL,
        idx INTEGER NOT NULL,
        line INTEGER NOT NULL,
        inputs BLOB NOT NULL,
        buckets BLOB NOT NULL,
        PRIMARY KEY (scope, stage, idx)
    );
    CREATE TABLE IF NOT EXISTS key_history3_files (
        scope TEXT NOT NULL,
        stage TEXT NOT NULL,
        idx INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        files BLOB NOT NULL,
        PRIMARY KEY (scope, stage, idx, bucket)
    );
    CREATE TABLE IF NOT EXISTS content_digest (
        id TEXT PRIMARY KEY NOT NULL,
        digest TEXT NOT NULL
    );";

/// One connection to `<store>/statcache.db`, shared by the stat cache, the
/// key history and the content memo of a build: each open connection costs
/// its setup, its own read of the schema and its own page cache (all fresh
/// memory), so a build opens one. Cloning shares it; the WAL is folded
/// (see [`kiln_cache::Db`]) when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct CacheDb {
    inner: std::sync::Arc<kiln_cache::Db>,
}

impl CacheDb {
    /// Opens (creating) `<store_root>/statcache.db`.
    pub fn open(store_root: &Path) -> Result<CacheDb, (PathBuf, rusqlite::Error)> {
        let path = store_root.join("statcache.db");
        if let Err(e) = fs_err::create_dir_all(store_root) {
            return Err((path, rusqlite::Error::ToSqlConversionFailure(Box::new(e))));
        }
        let conn = match open_cache_db(&path) {
            Ok(c) => c,
            Err(e) => return Err((path, e)),
        };
        // A WAL left big (by an older kiln) is read whole by every process
        // that opens it alone: fold it into the database once.
        let wal = store_root.join("statcache.db-wal");
        if fs_err::metadata(&wal).is_ok_and(|m| m.len() > 2 << 20)
            && let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        {
            return Err((path, e));
        }
        Ok(CacheDb {
            inner: std::sync::Arc::new(kiln_cache::Db::new(conn, path)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// The connection, for one use (do not hold it across another's).
    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.inner.lock()
    }
}
