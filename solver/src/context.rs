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
//! permission bits, uid, gid, link target, xattrs and content digest —
//! never its times — and the op's digest is sha256 over the sorted
//! `(path, entry digest)` list. Symlinks are hashed as links; a source
//! path that is itself a link is followed inside the context only.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
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
    /// `sha256:<hex>` of the content (regular files).
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
        }
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
    /// (default 2 s; tests use 0).
    pub fn with_racy_window(mut self, window: std::time::Duration) -> Self {
        self.racy_window_ns = i64::try_from(window.as_nanos()).unwrap_or(i64::MAX);
        self
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
        let mut files: BTreeMap<String, FileEntry> = BTreeMap::new();
        for src in &sources {
            // A source that is a link: hash the link itself, and what it
            // resolved to inside the context.
            if src.rel_path != src.resolved_path && src.rel_path != "." {
                let link = self.root.join(&src.rel_path);
                let e = self.entry(&src.rel_path, &link)?;
                files.insert(e.path.clone(), e);
            }
            let rel = src.resolved_path.clone();
            let e = self.entry(&rel, &src.host)?;
            let is_dir = e.kind == EntryType::Dir;
            if rel != "." {
                files.insert(rel.clone(), e);
            }
            if is_dir && src.is_dir {
                self.walk(&rel, &src.host, exclude.as_ref(), &mut files)?;
                // An ignored directory with an included child (`!` rule)
                // is still sent, as fsutil sends the parents of what it
                // includes.
                let prefix = if rel == "." {
                    String::new()
                } else {
                    format!("{rel}/")
                };
                let mut missing = Vec::new();
                for path in files.keys().filter(|p| p.starts_with(&prefix)) {
                    let mut p = path.as_str();
                    while let Some((parent, _)) = p.rsplit_once('/') {
                        if parent.len() < prefix.len() || files.contains_key(parent) {
                            break;
                        }
                        missing.push(parent.to_owned());
                        p = parent;
                    }
                }
                for m in missing {
                    let host = self.root.join(&m);
                    let e = self.entry(&m, &host)?;
                    files.insert(m, e);
                }
            }
        }
        let mut h = Sha256::new();
        for (path, e) in &files {
            h.update(path.as_bytes());
            h.update([0]);
            h.update(e.digest.as_bytes());
            h.update([b'\n']);
        }
        Ok(ContextChecksum {
            digest: format!("sha256:{}", hex(&h.finalize())),
            files: files.into_values().collect(),
        })
    }

    /// Walk the directory `dir` (context-relative `rel`), adding its
    /// entries. Ignored entries are skipped, ignored directories pruned
    /// when nothing below them can be re-included.
    fn walk(
        &mut self,
        rel: &str,
        dir: &Path,
        exclude: Option<&PatternMatcher>,
        files: &mut BTreeMap<String, FileEntry>,
    ) -> Result<(), ContextError> {
        // (context-relative dir, host dir, path below the source dir,
        // ignore info of the dir)
        let mut stack: Vec<(String, PathBuf, String, MatchInfo)> = vec![(
            rel.to_owned(),
            dir.to_path_buf(),
            String::new(),
            MatchInfo::default(),
        )];
        while let Some((rel_dir, host_dir, sub_dir, info)) = stack.pop() {
            // Entries keep the directory open: their `lstat` is relative to
            // it (no walk of the whole path for each file).
            let mut entries: Vec<(std::ffi::OsString, fs_err::DirEntry)> =
                fs_err::read_dir(&host_dir)
                    .map_err(io_err(&host_dir))?
                    .map(|e| e.map(|e| (e.file_name(), e)))
                    .collect::<Result<_, _>>()
                    .map_err(io_err(&host_dir))?;
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, dirent) in entries {
                let name_s = name.to_string_lossy().into_owned();
                let rel_path = if rel_dir == "." {
                    name_s.clone()
                } else {
                    format!("{rel_dir}/{name_s}")
                };
                let sub = if sub_dir.is_empty() {
                    name_s.clone()
                } else {
                    format!("{sub_dir}/{name_s}")
                };
                let host = host_dir.join(&name);
                let meta = dirent.metadata().map_err(io_err(&host))?;
                let (ignored, child_info) = match &self.ignore {
                    Some(m) => m.matches_with_parent(&rel_path, &info),
                    None => (false, MatchInfo::default()),
                };
                let excluded = exclude.is_some_and(|m| m.matches(&sub));
                if ignored || excluded {
                    let can_skip = (!ignored
                        || self
                            .ignore
                            .as_ref()
                            .is_none_or(|m| m.can_skip_dir(&rel_path)))
                        && (!excluded || exclude.is_none_or(|m| m.can_skip_dir(&sub)));
                    if meta.is_dir() && !can_skip {
                        stack.push((rel_path, host, sub, child_info));
                    }
                    continue;
                }
                let e = self.entry_with_meta(&rel_path, &host, &meta)?;
                files.insert(rel_path.clone(), e);
                if meta.is_dir() {
                    stack.push((rel_path, host, sub, child_info));
                }
            }
        }
        Ok(())
    }

    fn entry(&mut self, rel: &str, host: &Path) -> Result<FileEntry, ContextError> {
        let meta = fs_err::symlink_metadata(host).map_err(io_err(host))?;
        self.entry_with_meta(rel, host, &meta)
    }

    fn entry_with_meta(
        &mut self,
        rel: &str,
        host: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<FileEntry, ContextError> {
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
            Some(
                fs_err::read_link(host)
                    .map_err(io_err(host))?
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            None
        };
        let (content, xattrs) = if kind == EntryType::File {
            // A file unchanged since it was hashed (ctime included) still
            // has the xattrs it had: none, when the cache says so.
            let cached = self.stat_cache.as_ref().and_then(|c| {
                c.lookup(host, &StatKey::of(meta))
                    .map(|(d, free)| (d.to_owned(), free))
            });
            match cached {
                Some((d, xattr_free)) => {
                    self.stats.cached += 1;
                    let xattrs = if xattr_free {
                        BTreeMap::new()
                    } else {
                        read_xattrs(host)
                    };
                    (Some(d), xattrs)
                }
                None => {
                    let xattrs = read_xattrs(host);
                    (Some(self.hash_file(host, meta, xattrs.is_empty())?), xattrs)
                }
            }
        } else {
            (None, read_xattrs(host))
        };
        let mut h = Sha256::new();
        let header = format!(
            "{rel}\0{kind:?}\0{:o}\0{}\0{}\0{}\0{}\0",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            link_target.as_deref().unwrap_or(""),
            content.as_deref().unwrap_or(""),
        );
        h.update(header.as_bytes());
        if kind == EntryType::Special {
            h.update(format!("{}\0", meta.rdev()).as_bytes());
        }
        for (k, v) in &xattrs {
            h.update(k.as_bytes());
            h.update([b'=']);
            h.update(hex(v).as_bytes());
            h.update([0]);
        }
        Ok(FileEntry {
            path: rel.to_owned(),
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
            digest: format!("sha256:{}", hex(&h.finalize())),
        })
    }

    /// Hashes a file the stat cache did not know, and records it there
    /// (unless it may still be changing).
    fn hash_file(
        &mut self,
        host: &Path,
        meta: &std::fs::Metadata,
        xattr_free: bool,
    ) -> Result<String, ContextError> {
        let stat = StatKey::of(meta);
        let mut f = fs_err::File::open(host).map_err(io_err(host))?;
        let mut h = Sha256::new();
        if self.buf.is_empty() {
            self.buf = vec![0u8; 256 * 1024];
        }
        let mut n_total = 0u64;
        loop {
            let n = f.read(&mut self.buf).map_err(io_err(host))?;
            if n == 0 {
                break;
            }
            n_total += n as u64;
            h.update(&self.buf[..n]);
        }
        let digest = format!("sha256:{}", hex(&h.finalize()));
        self.stats.hashed += 1;
        self.stats.bytes += n_total;
        // A file read while it may still change within the timestamp
        // granularity is not cached ("racy" entries, as git does): its
        // mtime must be older than the read.
        if let Some(c) = &mut self.stat_cache
            && !stat.is_racy(SystemTime::now(), self.racy_window_ns)
            && n_total == meta.len()
        {
            c.record(host, stat, &digest, xattr_free);
        }
        Ok(digest)
    }
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
        if n == "security.selinux" {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(path, &name) {
            out.insert(n, v);
        }
    }
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

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

    /// Changed within `window_ns` of `now`: a later write could keep the
    /// same times, so the digest must not be cached.
    fn is_racy(&self, now: SystemTime, window_ns: i64) -> bool {
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let newest = self.mtime_ns.max(self.ctime_ns);
        now_ns.saturating_sub(newest) < window_ns
    }
}

/// `(path, size, mtime, ctime, inode, dev, mode) -> content digest`,
/// persisted in `statcache.db` under the store root. Entries for a context
/// are loaded into memory once and new ones written in one transaction by
/// [`flush`](Self::flush).
#[derive(Debug)]
pub struct StatCache {
    conn: rusqlite::Connection,
    path: PathBuf,
    entries: HashMap<PathBuf, (StatKey, String, bool)>,
    dirty: Vec<(PathBuf, StatKey, String, bool)>,
}

impl Drop for StatCache {
    fn drop(&mut self) {
        kiln_cache::fold_wal(&self.conn, &self.path);
    }
}

impl StatCache {
    /// Open (or create) `<store_root>/statcache.db`.
    pub fn open(store_root: &Path) -> Result<Self, ContextError> {
        fs_err::create_dir_all(store_root).map_err(io_err(store_root))?;
        let path = store_root.join("statcache.db");
        let e = |source| ContextError::StatCache {
            path: path.clone(),
            source,
        };
        let conn = open_cache_db(&path).map_err(e)?;
        // A WAL left big (by an older kiln) is read whole by every process
        // that opens it alone: fold it into the database once.
        let wal = store_root.join("statcache.db-wal");
        if fs_err::metadata(&wal).is_ok_and(|m| m.len() > 2 << 20) {
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(e)?;
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS stat_cache (
                path TEXT PRIMARY KEY,
                size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL,
                ctime_ns INTEGER NOT NULL,
                ino INTEGER NOT NULL,
                dev INTEGER NOT NULL,
                mode INTEGER NOT NULL,
                digest TEXT NOT NULL,
                xattr_free INTEGER NOT NULL DEFAULT 0
            ) WITHOUT ROWID;",
        )
        .map_err(e)?;
        // Databases from before `xattr_free` (1: the file had no xattrs when
        // hashed; with ctime unchanged it still has none).
        let has_column = conn
            .prepare("SELECT 1 FROM pragma_table_info('stat_cache') WHERE name = 'xattr_free'")
            .and_then(|mut st| st.exists([]))
            .map_err(e)?;
        if !has_column {
            conn.execute_batch(
                "ALTER TABLE stat_cache ADD COLUMN xattr_free INTEGER NOT NULL DEFAULT 0;",
            )
            .map_err(e)?;
        }
        Ok(Self {
            conn,
            path,
            entries: HashMap::new(),
            dirty: Vec::new(),
        })
    }

    /// Load the entries under `dir` (a context root) into memory.
    pub fn load(&mut self, dir: &Path) -> Result<usize, ContextError> {
        let e = |source| ContextError::StatCache {
            path: self.path.clone(),
            source,
        };
        let prefix = format!("{}/", dir.to_string_lossy().trim_end_matches('/'));
        // Every path under `prefix` sorts between `prefix` and `prefix`
        // with its final `/` replaced by `0` (the next byte).
        let upper = format!("{}0", prefix.trim_end_matches('/'));
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, size, mtime_ns, ctime_ns, ino, dev, mode, digest, xattr_free
                 FROM stat_cache WHERE path >= ?1 AND path < ?2",
            )
            .map_err(e)?;
        let rows = stmt
            .query_map([&prefix, &upper], |r| {
                Ok((
                    PathBuf::from(r.get::<_, String>(0)?),
                    StatKey {
                        size: r.get::<_, i64>(1)? as u64,
                        mtime_ns: r.get(2)?,
                        ctime_ns: r.get(3)?,
                        ino: r.get::<_, i64>(4)? as u64,
                        dev: r.get::<_, i64>(5)? as u64,
                        mode: r.get(6)?,
                    },
                    r.get::<_, String>(7)?,
                    r.get::<_, bool>(8)?,
                ))
            })
            .map_err(e)?;
        let mut n = 0;
        for row in rows {
            let (p, k, d, x) = row.map_err(e)?;
            self.entries.insert(p, (k, d, x));
            n += 1;
        }
        Ok(n)
    }

    /// The content digest of an unchanged file, and whether it had no
    /// xattrs.
    fn lookup(&self, path: &Path, stat: &StatKey) -> Option<(&str, bool)> {
        match self.entries.get(path) {
            Some((k, d, x)) if k == stat => Some((d, *x)),
            _ => None,
        }
    }

    fn record(&mut self, path: &Path, stat: StatKey, digest: &str, xattr_free: bool) {
        self.entries
            .insert(path.to_path_buf(), (stat, digest.to_owned(), xattr_free));
        self.dirty
            .push((path.to_path_buf(), stat, digest.to_owned(), xattr_free));
    }

    /// Write new entries.
    pub fn flush(&mut self) -> Result<(), ContextError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let e = |source| ContextError::StatCache {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO stat_cache
                     (path, size, mtime_ns, ctime_ns, ino, dev, mode, digest, xattr_free)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(e)?;
            for (p, k, d, x) in &self.dirty {
                stmt.execute(rusqlite::params![
                    p.to_string_lossy(),
                    k.size as i64,
                    k.mtime_ns,
                    k.ctime_ns,
                    k.ino as i64,
                    k.dev as i64,
                    k.mode,
                    d,
                    x
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        self.dirty.clear();
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
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 128)?;
    conn.pragma_update(None, "journal_size_limit", 1 << 20)?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(conn)
}
