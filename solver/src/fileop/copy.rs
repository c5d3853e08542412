//! The copy engine: fsutil's `copy.Copy` with BuildKit's options for
//! Dockerfile COPY/ADD (`FollowSymlinks`, `CopyDirContentsOnly`,
//! `AllowWildcard`, `AllowEmptyWildcard`, `CreateDestPath`).

use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use filetime::FileTime;
use kiln_parser::PatternMatcher;

use super::chmod::ModeChange;
use super::chown::{Owner, resolve_owner};
use super::pattern::{ResolveOptions, resolve_sources};
use super::reuse::{Check, DirFds, Expected, FileIdentity, Reuse};
use super::root::{clean_abs, is_absent, resolve};
use super::{CopyOp, EntryKind, FileOpError, InRoot, Report, Source, SourceKind, archive, http};

/// Run one COPY or ADD from `src_root` into `dest_root`.
///
/// Everything that can fail before writing (patterns, sources, `--chown`
/// names, downloads and their checksums) is checked first, so those errors
/// leave the destination untouched.
pub fn copy(src_root: &Path, dest_root: &Path, op: &CopyOp) -> Result<Report, FileOpError> {
    let cmd = if op.is_add { "ADD" } else { "COPY" };
    let urls: Vec<&str> = op
        .sources
        .iter()
        .filter_map(|s| match s {
            Source::Url(u) => Some(u.as_str()),
            _ => None,
        })
        .collect();
    for s in &op.sources {
        match s {
            Source::Url(u) | Source::Git(u) if !op.is_add => {
                return Err(FileOpError::UrlInCopy {
                    source_word: u.clone(),
                });
            }
            Source::Git(u) => return Err(FileOpError::GitUnsupported { url: u.clone() }),
            _ => {}
        }
    }
    if op.checksum.is_some() && !(op.is_add && op.sources.len() == 1 && urls.len() == 1) {
        return Err(FileOpError::ChecksumNotAllowed);
    }
    let chmod = op.chmod.as_deref().map(ModeChange::parse).transpose()?;
    let exclude = if op.exclude.is_empty() {
        None
    } else {
        Some(PatternMatcher::new(&op.exclude).map_err(FileOpError::Exclude)?)
    };
    let owner = op
        .chown
        .as_deref()
        .map(|spec| resolve_owner(dest_root, spec))
        .transpose()?;

    // Sources in the source root.
    let patterns: Vec<String> = op
        .sources
        .iter()
        .filter_map(|s| match s {
            Source::Path(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let entries = resolve_sources(
        src_root,
        &patterns,
        &ResolveOptions {
            parents: op.parents,
            ignore: op.ignore.as_ref(),
            exclude: exclude.as_ref(),
        },
    )?;

    // The destination, BuildKit's `pathRelativeToWorkingDir` + `cleanPath`.
    let (dest_abs, dest_is_dir) = dest_path(&op.workdir, &op.dest);
    let heredocs = op
        .sources
        .iter()
        .filter(|s| matches!(s, Source::Heredoc { .. }))
        .count();
    let total = entries.len() + urls.len() + heredocs;
    // A prepared upper is only for one source: with more, a path could be
    // written twice, and what the upper held there is no longer the
    // previous result's.
    if total != 1 && op.reuse.as_deref().is_some_and(|r| r.prepared) {
        return Err(FileOpError::PreparedConflict {
            path: op.dest.clone(),
        });
    }
    if total > 1 && !dest_is_dir && !op.parents {
        let existing = resolve(dest_root, &dest_abs, true)?;
        if !fs_err::metadata(&existing.host).is_ok_and(|m| m.is_dir()) {
            return Err(FileOpError::MultipleSourcesNeedDir {
                cmd,
                dest: op.dest.clone(),
            });
        }
    }

    // Downloads and heredocs are staged in a private directory first.
    // (Made only when there is something to stage.)
    let staging = if urls.is_empty() && heredocs == 0 {
        None
    } else {
        Some(tempfile::Builder::new().prefix("kiln-fileop-").tempdir()?)
    };
    let staging_dir = staging
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_default();
    let mut staged: Vec<(PathBuf, String, bool)> = Vec::new();
    for s in &op.sources {
        match s {
            Source::Url(url) => {
                let (path, name) =
                    http::download(url, &staging_dir, op.checksum.as_deref(), op.created_time)?;
                staged.push((path, name, op.unpack == Some(true)));
            }
            Source::Heredoc { name, content } => {
                let file_name = name.rsplit('/').next().unwrap_or(name).to_owned();
                let file_name = if file_name.is_empty() || file_name == "." || file_name == ".." {
                    "__heredoc__".to_owned()
                } else {
                    file_name
                };
                let path = staging_dir.join(&file_name);
                fs_err::write(&path, content)?;
                fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
                let t = FileTime::from_system_time(op.created_time.unwrap_or_else(SystemTime::now));
                filetime::set_file_times(&path, t, t)?;
                staged.push((path, file_name, false));
            }
            _ => {}
        }
    }

    let settings = Arc::new(FileSettings {
        kind: op.source_kind,
        owner,
        chmod,
        time: op.created_time,
        apply_ownership: op.apply_ownership,
        record_under: op.record_contents.then(|| dest_root.to_path_buf()),
    });
    let state = Arc::new(PoolState {
        budget: AtomicU64::new(kiln_cache::layer::known::MAX_TOTAL as u64),
        ..PoolState::default()
    });
    // Archives are extracted without the copier: ADD never links.
    let reuse = op.reuse.as_deref().filter(|_| !op.is_add);
    std::thread::scope(|scope| {
        let mut jobs = Vec::new();
        for _ in 0..copy_workers() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Job>>(8);
            let (state, settings) = (Arc::clone(&state), Arc::clone(&settings));
            scope.spawn(move || worker(&rx, &state, &settings, reuse));
            jobs.push(tx);
        }
        let mut c = Copier {
            dest_root,
            exclude,
            ignore: op.ignore.as_ref(),
            links: HashMap::new(),
            stamped: Vec::new(),
            report: Report {
                identities: Vec::with_capacity(
                    reuse
                        .filter(|r| r.remember && !r.prepared)
                        .map_or(0, |r| r.prev.len()),
                ),
                ..Report::default()
            },
            batches: Vec::new(),
            last_slot: None,
            jobs,
            state: Arc::clone(&state),
            settings: Arc::clone(&settings),
            deferred: Vec::new(),
            reuse,
            // (Keyed by the path's bytes: hashing a `Path` walks its
            // components.)
            linked: kiln_cache::FileSet::default(),
            src_root,
            reconciled: Vec::new(),
            merged_dirs: 0,
        };
        let res = copy_all(
            &mut c,
            op,
            src_root,
            dest_root,
            &entries,
            &staged,
            &dest_abs,
            dest_is_dir,
        );
        // Stop the workers (also on error), then report the first failure.
        c.flush();
        c.jobs.clear();
        let settled = c.settle();
        let res = res
            .and(settled)
            .and_then(|()| match reuse.filter(|r| r.prepared) {
                Some(r) => remove_unvisited(&r.upper, &c.report, &c.reconciled),
                None => Ok(()),
            });
        res.map(|()| {
            c.report.bytes += state.bytes.load(Ordering::Relaxed);
            c.report.linked = c
                .linked
                .iter()
                .filter_map(|t| c.rel_of(Path::new(t)).map(str::to_owned))
                .collect();
            let contents = std::mem::take(
                &mut *state
                    .contents
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            c.report.contents = written_once(contents, &c.report.written);
            std::mem::take(&mut c.report)
        })
    })
}

/// With a prepared upper: removes from `upper` what the copy neither
/// wrote, kept nor went through (what the sources no longer have), behind
/// the overlay's back as a fresh upper would never have had it (removing
/// through the overlay would leave whiteouts over the parent's files).
/// The directories `reconciled` (paths below the destination root) were
/// brought in line as the copy went through them (see
/// [`Copier::reconcile`]): they are kept and not read again.
fn remove_unvisited(
    upper: &Path,
    report: &super::Report,
    reconciled: &[String],
) -> Result<(), FileOpError> {
    let done: kiln_cache::FileSet<&str> = reconciled.iter().map(String::as_str).collect();
    if done.contains("") {
        return Ok(());
    }
    // What else to keep, made when an entry outside those directories is
    // found (a destination's parents made by an earlier run, a single
    // file's source).
    let keep_set = || {
        let mut keep: kiln_cache::FileSet<&str> = kiln_cache::FileSet::with_capacity_and_hasher(
            2 * (report.written.len() + report.kept.len()),
            Default::default(),
        );
        let paths = report
            .written
            .iter()
            .map(|w| w.path.trim_start_matches('/'))
            .chain(report.kept.iter().map(|(p, _)| p.as_str()))
            .chain(done.iter().copied());
        for p in paths {
            // A path and its directories (already there: so are they).
            let mut q = p;
            while !q.is_empty() && keep.insert(q) {
                q = q.rfind('/').map_or("", |i| &q[..i]);
            }
        }
        keep
    };
    let mut keep = None;
    let mut stack = vec![(upper.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs_err::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                return Err(FileOpError::PreparedConflict {
                    path: format!("/{rel}/{}", name.to_string_lossy()),
                });
            };
            let r = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            let is_dir = e.file_type()?.is_dir();
            if is_dir && done.contains(r.as_str()) {
                continue;
            }
            if keep.get_or_insert_with(keep_set).contains(r.as_str()) {
                if is_dir {
                    stack.push((e.path(), r));
                }
            } else {
                remove_entry(&e, is_dir)?;
            }
        }
    }
    Ok(())
}

/// Removes the entry `e` (a directory with all below it).
fn remove_entry(e: &fs_err::DirEntry, is_dir: bool) -> Result<(), FileOpError> {
    if is_dir {
        fs_err::remove_dir_all(e.path())?;
    } else {
        fs_err::remove_file(e.path())?;
    }
    Ok(())
}

/// `buf` = `dir/name` (`name` when `dir` is empty).
fn join_into(buf: &mut String, dir: &str, name: &str) {
    buf.clear();
    if !dir.is_empty() {
        buf.push_str(dir);
        buf.push('/');
    }
    buf.push_str(name);
}

/// The copied `contents` of the paths written once by the copy: a path
/// written again (a later source over an earlier one) may hold something
/// else now, so its content is not vouched for.
fn written_once(
    contents: Vec<(Vec<u8>, Vec<u8>)>,
    written: &[super::Written],
) -> kiln_cache::KnownFiles {
    let mut known = kiln_cache::KnownFiles::default();
    if contents.is_empty() {
        return known;
    }
    let mut times: kiln_cache::FileMap<&[u8], u32> =
        kiln_cache::FileMap::with_capacity_and_hasher(written.len(), Default::default());
    for w in written {
        let rel = w.path.strip_prefix('/').unwrap_or(&w.path);
        *times.entry(rel.as_bytes()).or_default() += 1;
    }
    for (path, content) in contents {
        if times.get(path.as_slice()) == Some(&1) {
            known.record(&path, &content);
        }
    }
    known
}

/// Everything [`copy`] does once its sources are resolved.
#[allow(clippy::too_many_arguments)]
fn copy_all(
    c: &mut Copier<'_>,
    op: &CopyOp,
    src_root: &Path,
    dest_root: &Path,
    entries: &[super::SourceEntry],
    staged: &[(PathBuf, String, bool)],
    dest_abs: &str,
    dest_is_dir: bool,
) -> Result<(), FileOpError> {
    c.report.sources_read = entries.iter().map(|e| e.resolved_path.clone()).collect();

    // fsutil's `Copy`: make the destination's directory (or itself, with a
    // trailing slash), then resolve it fully inside the root.
    let ensure = if dest_is_dir {
        dest_abs.to_owned()
    } else {
        parent_of(dest_abs)
    };
    let ensure = resolve(dest_root, &ensure, true)?;
    c.mkdir_all(&ensure)?;
    let dst = resolve(dest_root, dest_abs, true)?;

    let unpack_local = op.is_add && op.unpack != Some(false);
    for e in entries {
        c.settle()?;
        if op.parents {
            c.copy_with_parents(src_root, e, &dst)?;
            continue;
        }
        if unpack_local && !e.is_dir && archive::is_archive(&e.host)? {
            c.mkdir_all(&dst)?;
            archive::extract(
                &e.host,
                &e.pattern,
                dest_root,
                &dst,
                &mut c.report,
                c.settings.apply_ownership,
            )?;
            continue;
        }
        let rel = e.resolved_path.clone();
        c.copy_top(&e.host, &rel, &e.name, e.is_dir, &dst, SourceKindFor::Op)?;
    }
    for (path, name, unpack) in staged {
        c.settle()?;
        if *unpack && archive::is_archive(path)? {
            c.mkdir_all(&dst)?;
            archive::extract(
                path,
                name,
                dest_root,
                &dst,
                &mut c.report,
                c.settings.apply_ownership,
            )?;
            continue;
        }
        c.copy_top(path, "", name, false, &dst, SourceKindFor::Generated)?;
    }
    c.settle()?;
    if let Some(t) = c.settings.time {
        let t = FileTime::from_system_time(t);
        for dir in c.stamped.iter().rev() {
            filetime::set_symlink_file_times(dir, t, t).map_err(|e| with_path(e, dir))?;
        }
    }
    Ok(())
}

/// BuildKit's destination: relative to WORKDIR, cleaned, and whether it
/// names a directory (trailing `/`, `/.`, or `.`/empty).
fn dest_path(workdir: &str, dest: &str) -> (String, bool) {
    let is_dir = dest.is_empty() || dest == "." || dest.ends_with('/') || dest.ends_with("/.");
    let joined = if dest.starts_with('/') {
        dest.to_owned()
    } else {
        let wd = if workdir.is_empty() { "/" } else { workdir };
        format!("{wd}/{dest}")
    };
    (clean_abs(&joined), is_dir)
}

fn parent_of(abs: &str) -> String {
    match abs.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => abs[..i].to_owned(),
    }
}

/// Whose ownership rules apply to an entry.
/// Where an entry is copied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// A source itself: an existing destination keeps its metadata.
    Top,
    /// Inside a directory that existed: the target may exist.
    InExistingDir,
    /// Inside a directory this copy made: the target does not exist.
    InCreatedDir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKindFor {
    /// The op's source root (context: 0:0, stage: kept).
    Op,
    /// A download or heredoc: 0:0 like BuildKit's generated files.
    Generated,
}

struct Copier<'a> {
    dest_root: &'a Path,
    exclude: Option<PatternMatcher>,
    ignore: Option<&'a PatternMatcher>,
    /// (dev, ino) of a source file with several links → where it was written.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories made by `mkdir_all` under a fixed time: their times are
    /// set again at the end, since writing into them changed them.
    stamped: Vec<PathBuf>,
    report: Report,
    /// Regular files go to the workers (none: copy them here), all files
    /// of one directory to the same one: creating entries in a directory
    /// takes its lock, and two threads filling one directory mostly wait.
    jobs: Vec<SyncSender<Vec<Job>>>,
    /// Jobs gathered for each worker, handed over in batches (one lock
    /// and one wake-up per batch instead of per file).
    batches: Vec<(Vec<Job>, u64)>,
    /// The worker of the last file's directory.
    last_slot: Option<(Vec<u8>, usize)>,
    state: Arc<PoolState>,
    settings: Arc<FileSettings>,
    /// Directories whose metadata is applied once every file in them is
    /// written (a file created later would change the mtime).
    deferred: Vec<(PathBuf, PathBuf, Metadata, SourceKindFor)>,
    /// Linking files from snapshots instead of copying them.
    reuse: Option<&'a Reuse>,
    /// Targets linked behind the overlay's back (see [`Copier::unlink_linked`]).
    linked: kiln_cache::FileSet<std::ffi::OsString>,
    /// The source root (source paths below it are looked up in the source
    /// stage's layers).
    src_root: &'a Path,
    /// With a prepared upper: the existing directories the copy went
    /// through and brought in line (paths below the destination root,
    /// `""` for the root; see [`Copier::reconcile`]).
    reconciled: Vec<String>,
    /// How many existing directories the copy went through.
    merged_dirs: usize,
}

/// What a regular file's copy needs besides its paths.
#[derive(Debug)]
struct FileSettings {
    kind: SourceKind,
    owner: Option<Owner>,
    chmod: Option<ModeChange>,
    time: Option<SystemTime>,
    apply_ownership: bool,
    /// Where the destination root is, when the contents of small copied
    /// files are kept for the layer writer (see [`Report::contents`]).
    record_under: Option<PathBuf>,
}

impl FileSettings {
    /// The owner a copied entry gets (`None`: ownership is not applied):
    /// `--chown`, else a stage's own ids, else root.
    fn owner_of(&self, meta: &Metadata, whose: SourceKindFor) -> Option<(u32, u32)> {
        if !self.apply_ownership {
            return None;
        }
        Some(match (self.owner, whose, self.kind) {
            (Some(o), _, _) => (o.uid, o.gid),
            (None, SourceKindFor::Op, SourceKind::Stage) => (meta.uid(), meta.gid()),
            _ => (0, 0),
        })
    }

    /// The source's permission bits, after `--chmod`.
    fn mode_of(&self, meta: &Metadata, is_dir: bool) -> u32 {
        let bits = meta.mode() & 0o7777;
        match &self.chmod {
            Some(c) => c.apply(bits, is_dir),
            None => bits,
        }
    }

    /// (atime, mtime): the fixed build time, else the source's.
    fn times_of(&self, meta: &Metadata) -> (FileTime, FileTime) {
        match self.time {
            Some(t) => (FileTime::from_system_time(t), FileTime::from_system_time(t)),
            None => (
                FileTime::from_last_access_time(meta),
                FileTime::from_last_modification_time(meta),
            ),
        }
    }
}

/// One regular file to copy.
struct Job {
    src: PathBuf,
    target: PathBuf,
    meta: Metadata,
    whose: SourceKindFor,
    /// Try linking it from a snapshot first.
    link: Option<LinkPlan>,
}

/// Where a file may be linked from instead of copied (see [`Reuse`]).
struct LinkPlan {
    /// The previous run's file, when the source is unchanged.
    previous: Option<PathBuf>,
    /// The path below the source root, to find in the source stage's layers.
    src_rel: Option<String>,
    /// The path below the destination root.
    rel: String,
    /// What a copy would look like.
    expect: Expected,
}

impl LinkPlan {
    /// Links the file as planned; true when it did.
    fn run(&self, reuse: &Reuse, meta: &Metadata, dirs: &mut DirFds) -> bool {
        match &self.previous {
            // A file an earlier copy made: no overlayfs xattrs on it.
            Some(prev) => reuse.link(prev, &self.rel, &self.expect, Check::Nothing, None, dirs),
            None => self
                .src_rel
                .as_deref()
                .and_then(|r| reuse.in_source_layers(r, meta, dirs))
                .is_some_and(|(from, check, stat)| {
                    reuse.link(&from, &self.rel, &self.expect, check, Some(stat), dirs)
                }),
        }
    }
}

/// The workers' shared state: files in flight, the first failure, bytes.
#[derive(Debug, Default)]
struct PoolState {
    pending: Mutex<usize>,
    idle: Condvar,
    error: Mutex<Option<FileOpError>>,
    bytes: AtomicU64,
    /// Targets the workers linked instead of copying.
    linked: Mutex<Vec<PathBuf>>,
    /// Contents of small files copied (path below the destination root,
    /// bytes), while [`PoolState::budget`] lasts.
    contents: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Bytes of content that may still be kept.
    budget: AtomicU64,
}

impl PoolState {
    /// `n` files are done, `bytes` written, `error` the first failure.
    fn done_many(&self, n: usize, bytes: u64, error: Option<FileOpError>) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(e) = error {
            let mut first = self
                .error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            first.get_or_insert(e);
        }
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *pending = pending.saturating_sub(n);
        if *pending == 0 {
            self.idle.notify_all();
        }
    }

    /// Keeps the `content` copied to `target` in `into`, if contents are
    /// kept and the budget allows.
    fn keep(
        &self,
        settings: &FileSettings,
        target: &Path,
        content: Option<Vec<u8>>,
        into: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) {
        let (Some(content), Some(root)) = (content, settings.record_under.as_deref()) else {
            return;
        };
        let Some(rel) = below(target, root).filter(|r| !r.is_empty()) else {
            return;
        };
        let n = content.len() as u64;
        if self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_ok()
        {
            into.push((rel.as_encoded_bytes().to_vec(), content));
        }
    }

    fn take_error(&self) -> Option<FileOpError> {
        self.error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Files handed to a worker at once, at most (fewer when their bytes reach
/// [`BATCH_BYTES`]).
const BATCH_FILES: usize = 64;
/// Bytes of files to copy handed to a worker at once.
const BATCH_BYTES: u64 = 8 << 20;

/// File copies run on this many threads (the walk itself stays on one):
/// small files are bound by system calls, big ones by the disk, and a
/// second core overlaps both.
fn copy_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

fn worker(
    rx: &Receiver<Vec<Job>>,
    state: &PoolState,
    settings: &FileSettings,
    reuse: Option<&Reuse>,
) {
    let mut dirs = DirFds::default();
    let mut linked = Vec::new();
    let mut contents = Vec::new();
    while let Ok(batch) = rx.recv() {
        let n = batch.len();
        let mut bytes = 0;
        let mut error = None;
        for job in batch {
            if let (Some(plan), Some(reuse)) = (&job.link, reuse)
                && plan.run(reuse, &job.meta, &mut dirs)
            {
                linked.push(job.target);
                continue;
            }
            match copy_regular(settings, &job.src, &job.target, &job.meta, job.whose) {
                Ok((b, content)) => {
                    bytes += b;
                    state.keep(settings, &job.target, content, &mut contents);
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        append_locked(&state.linked, &mut linked);
        append_locked(&state.contents, &mut contents);
        state.done_many(n, bytes, error);
    }
}

/// Moves `items` (if any) to the end of the shared list.
fn append_locked<T>(list: &Mutex<Vec<T>>, items: &mut Vec<T>) {
    if !items.is_empty() {
        list.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .append(items);
    }
}

/// `path` below `base`, by bytes: the copier's paths are `base` joined
/// with names, so no component parsing is needed. `Some("")` for `base`
/// itself.
fn below<'p>(path: &'p Path, base: &Path) -> Option<&'p std::ffi::OsStr> {
    use std::os::unix::ffi::OsStrExt as _;
    let (p, b) = (path.as_os_str().as_bytes(), base.as_os_str().as_bytes());
    // `/` -> ``, `/a/` -> `/a`: then what follows must start with a slash.
    let b = b.strip_suffix(b"/").unwrap_or(b);
    let rest = p.strip_prefix(b)?;
    if rest.is_empty() {
        return Some(std::ffi::OsStr::new(""));
    }
    if rest[0] != b'/' {
        // `/ab` is not below `/a`.
        return None;
    }
    let start = rest.iter().position(|&c| c != b'/').unwrap_or(rest.len());
    Some(std::ffi::OsStr::from_bytes(&rest[start..]))
}

impl Copier<'_> {
    fn inner_of(&self, host: &Path) -> String {
        match below(host, self.dest_root) {
            Some(rel) if rel.is_empty() => "/".to_owned(),
            Some(rel) => {
                let rel = rel.to_string_lossy();
                let mut s = String::with_capacity(rel.len() + 1);
                s.push('/');
                s.push_str(&rel);
                s
            }
            None => host.to_string_lossy().into_owned(),
        }
    }

    /// fsutil's `MkdirAll`: create the missing directories of `p` (0755,
    /// the `--chown` owner, the fixed time), reporting each.
    fn mkdir_all(&mut self, p: &InRoot) -> Result<(), FileOpError> {
        let mut missing = Vec::new();
        let mut cur = p.host.clone();
        loop {
            match fs_err::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => {
                    return Err(self.prepared_conflict(&cur).unwrap_or_else(|| {
                        FileOpError::NotADirectory {
                            path: self.inner_of(&cur),
                        }
                    }));
                }
                Err(e) if is_absent(&e) => missing.push(cur.clone()),
                Err(e) => return Err(e.into()),
            }
            if cur == self.dest_root || !cur.pop() || !cur.starts_with(self.dest_root) {
                break;
            }
        }
        for dir in missing.into_iter().rev() {
            fs_err::create_dir(&dir)?;
            fs_err::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            if let Some(o) = self
                .settings
                .owner
                .filter(|_| self.settings.apply_ownership)
            {
                std::os::unix::fs::lchown(&dir, Some(o.uid), Some(o.gid))
                    .map_err(|e| with_path(e, &dir))?;
            }
            if self.settings.time.is_some() {
                self.stamped.push(dir.clone());
            }
            let inner = self.inner_of(&dir);
            self.report.push(inner, EntryKind::Dir);
        }
        Ok(())
    }

    /// fsutil's `prepareTargetDir` + `copy` for one top-level source.
    fn copy_top(
        &mut self,
        src: &Path,
        src_rel: &str,
        name: &str,
        is_dir: bool,
        dst: &InRoot,
        whose: SourceKindFor,
    ) -> Result<(), FileOpError> {
        let dest_meta = match fs_err::metadata(&dst.host) {
            Ok(m) => Some(m),
            Err(e) if is_absent(&e) => None,
            Err(e) => return Err(e.into()),
        };
        let mut target = dst.host.clone();
        if !is_dir && dest_meta.as_ref().is_some_and(Metadata::is_dir) && name != "/" {
            target.push(name);
        }
        let parent_dir = if is_dir && dest_meta.is_none() {
            target.clone()
        } else {
            target
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| target.clone())
        };
        let parent_inner = self.inner_of(&parent_dir);
        self.mkdir_all(&InRoot {
            host: parent_dir,
            inner: parent_inner,
        })?;
        self.copy_entry(src, src_rel, "", &target, Placement::Top, whose, None)
    }

    /// `--parents`: the entry lands at `dst/<keep_path>`, its parent
    /// directories copied from the source's (mode, owner, times).
    fn copy_with_parents(
        &mut self,
        src_root: &Path,
        e: &super::SourceEntry,
        dst: &InRoot,
    ) -> Result<(), FileOpError> {
        self.mkdir_all(dst)?;
        let keep = e.keep_path.clone().unwrap_or_default();
        let parts: Vec<&str> = keep.split('/').filter(|p| !p.is_empty()).collect();
        let mut target = dst.host.clone();
        let pivot_depth = e.rel_path.split('/').count().saturating_sub(parts.len());
        let rel_parts: Vec<&str> = e.rel_path.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                break;
            }
            target.push(part);
            let upto = (pivot_depth + i + 1).min(rel_parts.len());
            let src_parent_rel = rel_parts[..upto].join("/");
            let src_parent = resolve(src_root, &src_parent_rel, true)?.host;
            let meta = fs_err::metadata(&src_parent)?;
            let (t, created) = self.dir_only(&target)?;
            if created {
                self.apply_info(&src_parent, &t, &meta, false, SourceKindFor::Op)?;
                let inner = self.inner_of(&t);
                self.report.push(inner, EntryKind::Dir);
            }
            target = t;
        }
        if let Some(last) = parts.last() {
            target.push(last);
        }
        let rel = e.resolved_path.clone();
        self.copy_entry(
            &e.host,
            &rel,
            "",
            &target,
            Placement::Top,
            SourceKindFor::Op,
            None,
        )
    }

    /// Copy `src` to `target` (whose parent exists inside the root).
    /// `comps` is the path below the top-level source, for `--exclude`;
    /// `src_rel` the path below the source root, for `.dockerignore`;
    /// `meta` the source's `lstat` when the caller has it.
    #[allow(clippy::too_many_arguments)]
    fn copy_entry(
        &mut self,
        src: &Path,
        src_rel: &str,
        comps: &str,
        target: &Path,
        placement: Placement,
        whose: SourceKindFor,
        meta: Option<Metadata>,
    ) -> Result<(), FileOpError> {
        let overwrite_meta = placement != Placement::Top;
        let fresh_parent = placement == Placement::InCreatedDir;
        let meta = match meta {
            Some(m) => m,
            None => fs_err::symlink_metadata(src)?,
        };
        let is_dir = meta.is_dir();
        if !comps.is_empty()
            && let Some(m) = &self.exclude
            && m.matches(comps)
            && (!is_dir || m.can_skip_dir(comps))
        {
            return Ok(());
        }
        if whose == SourceKindFor::Op
            && !comps.is_empty()
            && let Some(m) = self.ignore
            && m.matches(src_rel)
            && (!is_dir || m.can_skip_dir(src_rel))
        {
            return Ok(());
        }
        let ft = meta.file_type();
        if !self.linked.is_empty() {
            self.unlink_linked(target)?;
        }
        if is_dir {
            let (dir, created) = if fresh_parent {
                fs_err::create_dir(target)?;
                (target.to_path_buf(), true)
            } else {
                self.dir_only(target)?
            };
            // Children are stat'ed relative to the open directory (no path
            // walk from the root for each).
            let mut children: Vec<_> = fs_err::read_dir(src)?
                .map(|e| e.map(|e| (e.file_name(), e)))
                .collect::<Result<_, _>>()?;
            children.sort_by(|a, b| a.0.cmp(&b.0));
            // With a prepared upper, an existing directory is brought in
            // line with the source as the copy goes through it.
            let dir_rel = if created {
                None
            } else {
                self.merged_dirs += 1;
                self.reuse
                    .filter(|r| r.prepared)
                    .and_then(|_| below(&dir, self.dest_root))
                    .and_then(std::ffi::OsStr::to_str)
                    .map(str::to_owned)
            };
            if created {
                let inner = self.inner_of(&dir);
                self.report.push(inner, EntryKind::Dir);
            } else if let Some(rel) = &dir_rel {
                self.reconciled.push(rel.clone());
            }
            // Whether the previous result has this directory as its source
            // is now (see `Copier::remember_dir`).
            let unchanged = self.remember_dir(&dir, &meta, whose) && dir_rel.is_some();
            let written_before = self.report.written.len();
            // The keys' `lstat`s of the context's files, when this copy may
            // keep what the previous result has.
            let seen = self
                .reuse
                .filter(|r| r.prepared && r.remember && whose == SourceKindFor::Op)
                .and_then(|r| r.seen.clone());
            let src_prefix = if src_rel == "." { "" } else { src_rel };
            let (mut src_buf, mut dest_buf) = (String::new(), String::new());
            let mut visited = Vec::with_capacity(dir_rel.as_ref().map_or(0, |_| children.len()));
            for (name, entry) in &children {
                let before = self.visits();
                // An unchanged file the previous result has is kept without
                // an `lstat` or a path made for it; one the patterns leave
                // out is skipped as the full path would skip it. (A changed
                // file takes the full path.)
                let done = match (&seen, &dir_rel, name.to_str()) {
                    (Some(seen), Some(dir_rel), Some(n))
                        if entry.file_type().is_ok_and(|t| t.is_file()) =>
                    {
                        join_into(&mut src_buf, src_prefix, n);
                        match seen.get(src_buf.as_str()).filter(|f| f.nlink == 1) {
                            Some(f) => {
                                let id = f.id;
                                let skipped = (self.exclude.is_some() || self.ignore.is_some())
                                    && self.excluded(
                                        &super::pattern::join_rel(comps, n),
                                        &src_buf,
                                        whose,
                                    );
                                skipped || {
                                    join_into(&mut dest_buf, dir_rel, n);
                                    self.keep_prepared_at(&dest_buf, id)
                                }
                            }
                            None => false,
                        }
                    }
                    _ => false,
                };
                if !done {
                    let n = name.to_string_lossy();
                    let child_comps = super::pattern::join_rel(comps, &n);
                    let child_rel = super::pattern::join_rel(src_prefix, &n);
                    let child_meta = entry.metadata()?;
                    self.copy_entry(
                        &src.join(name),
                        &child_rel,
                        &child_comps,
                        &dir.join(name),
                        if created {
                            Placement::InCreatedDir
                        } else {
                            Placement::InExistingDir
                        },
                        whose,
                        Some(child_meta),
                    )?;
                }
                if dir_rel.is_some() {
                    visited.push(self.visits() != before);
                }
            }
            // A directory whose source has the entries it had last time
            // (its identity is unchanged), every one of them gone through
            // again, has nothing to remove; and nothing written in it, the
            // previous result's owner, mode, xattrs and times still stand.
            let in_line = unchanged && visited.iter().all(|v| *v);
            if let Some(rel) = &dir_rel
                && !in_line
            {
                self.reconcile(rel, &children, &visited)?;
            }
            let as_before = in_line
                && self.report.written.len() == written_before
                && self.settings.time.is_none();
            // An existing top-level destination keeps its metadata; created
            // or nested directories take the source's (after the children,
            // so the mtime sticks).
            if (created || overwrite_meta) && dir == target && !as_before {
                self.deferred
                    .push((src.to_path_buf(), dir.clone(), meta.clone(), whose));
            }
            return Ok(());
        }
        if ft.is_file() && meta.nlink() == 1 && self.keep_prepared(target, &meta) {
            return Ok(());
        }
        if !fresh_parent {
            self.clear_file_target(target)?;
        }
        let kind = if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() == 1 || !self.links.contains_key(&key) {
                self.report.file_bytes += meta.size();
            }
            if meta.nlink() == 1 {
                // The common case, on a worker, on file descriptors only.
                let inner = self.inner_of(target);
                self.report.push(inner, EntryKind::File);
                let link = self.plan_link(src, target, &meta, whose);
                return self.submit(Job {
                    src: src.to_path_buf(),
                    target: target.to_path_buf(),
                    meta,
                    whose,
                    link,
                });
            }
            match self.links.get(&key).filter(|_| meta.nlink() > 1) {
                Some(first) => {
                    match (self.linked.contains(first.as_os_str()), self.reuse) {
                        // The first name was linked into the upper behind
                        // the overlay's back: so is this one.
                        (true, Some(reuse)) => {
                            let (Some(a), Some(b)) = (self.rel_of(first), self.rel_of(target))
                            else {
                                return Err(FileOpError::Io(io::Error::other(
                                    "a linked path outside the destination root",
                                )));
                            };
                            fs_err::hard_link(reuse.upper.join(a), reuse.upper.join(b))?;
                            self.linked.insert(target.as_os_str().to_owned());
                        }
                        _ => fs_err::hard_link(first, target)?,
                    }
                    self.forget(target);
                    let inner = self.inner_of(target);
                    self.report.push(inner, EntryKind::Hardlink);
                    return Ok(());
                }
                None => {
                    if self.link_now(src, target, &meta, whose) {
                        self.links.insert(key, target.to_path_buf());
                        let inner = self.inner_of(target);
                        self.report.push(inner, EntryKind::File);
                        return Ok(());
                    }
                    self.report.bytes += fs_err::copy(src, target)?;
                    if meta.nlink() > 1 {
                        self.links.insert(key, target.to_path_buf());
                    }
                    EntryKind::File
                }
            }
        } else if ft.is_symlink() {
            let link = fs_err::read_link(src)?;
            fs_err::os::unix::fs::symlink(&link, target)?;
            EntryKind::Symlink
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_socket() {
                // Docker's archiver skips sockets as well.
                return Ok(());
            }
            make_special(target, &meta, ft.is_fifo(), ft.is_block_device())?;
            EntryKind::Special
        };
        self.apply_info(src, target, &meta, ft.is_symlink(), whose)?;
        self.forget(target);
        let inner = self.inner_of(target);
        self.report.push(inner, kind);
        Ok(())
    }

    /// With a prepared upper: whether `target` is the previous result's
    /// file for an unchanged source (then it is left as it is, and counts
    /// as linked).
    fn keep_prepared(&mut self, target: &Path, meta: &Metadata) -> bool {
        self.keep_prepared_as(target, FileIdentity::of(meta))
    }

    /// [`Copier::keep_prepared`] for a source in the state `id`.
    fn keep_prepared_as(&mut self, target: &Path, id: FileIdentity) -> bool {
        match self.rel_of(target) {
            Some(rel) => self.keep_prepared_at(rel, id),
            None => false,
        }
    }

    /// [`Copier::keep_prepared_as`] for the path `rel` below the
    /// destination root. A kept file is only recorded in
    /// [`Report::kept`](super::Report::kept): a copy into a prepared upper
    /// has one source, so nothing writes that path again.
    fn keep_prepared_at(&mut self, rel: &str, id: FileIdentity) -> bool {
        let Some(reuse) = self.reuse.filter(|r| r.prepared && r.remember) else {
            return false;
        };
        if !reuse.rememberable(&id) {
            return false;
        }
        let Some(i) = reuse.previous_index(rel, &id) else {
            return false;
        };
        if !self.report.kept.push(reuse, i) {
            return false;
        }
        self.report.file_bytes += id.size();
        true
    }

    /// Remembers the source identity of the context directory copied to
    /// `dir` for the next run, as files' are (see [`Reuse::prev`]); true
    /// when the previous run remembered the same one: no entry was added,
    /// removed or renamed in it since, nor its metadata changed (each moves
    /// its ctime).
    fn remember_dir(&mut self, dir: &Path, meta: &Metadata, whose: SourceKindFor) -> bool {
        let Some(reuse) = self
            .reuse
            .filter(|r| r.remember && whose == SourceKindFor::Op)
        else {
            return false;
        };
        let Some(rel) = self.rel_of(dir) else {
            return false;
        };
        let id = FileIdentity::of(meta);
        if !reuse.rememberable(&id) {
            return false;
        }
        self.report.identities.push((rel.to_owned(), Some(id)));
        reuse.previous_index(rel, &id).is_some()
    }

    /// How many entries the copy has put in place, kept or gone through
    /// so far: a child of a directory counts as visited when this grows.
    fn visits(&self) -> usize {
        self.report.written.len() + self.report.kept.len() + self.merged_dirs
    }

    /// With a prepared upper: removes from the upper's directory `rel`
    /// (below the destination root) what the copy just went through in it
    /// without visiting (`children` of the source, sorted by name, and
    /// whether each was `visited`): what the source no longer has, or the
    /// patterns now leave out. Behind the overlay's back, as
    /// [`remove_unvisited`] does.
    fn reconcile(
        &self,
        rel: &str,
        children: &[(std::ffi::OsString, fs_err::DirEntry)],
        visited: &[bool],
    ) -> Result<(), FileOpError> {
        let Some(reuse) = self.reuse else {
            return Ok(());
        };
        let entries = match fs_err::read_dir(reuse.upper.join(rel)) {
            Ok(d) => d,
            // Only in the parent layers: nothing of the previous result.
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut names = entries
            .map(|e| e.map(|e| (e.file_name(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept = children
            .iter()
            .zip(visited)
            .filter(|(_, v)| **v)
            .map(|(c, _)| c.0.as_os_str())
            .peekable();
        for (name, e) in names {
            while kept.next_if(|k| *k < name.as_os_str()).is_some() {}
            if kept.next_if(|k| *k == name.as_os_str()).is_some() {
                continue;
            }
            remove_entry(&e, e.file_type()?.is_dir())?;
        }
        Ok(())
    }

    /// Whether a non-directory at `comps` (below the top-level source) /
    /// `src_rel` (below the source root) is left out by `--exclude` or
    /// the `.dockerignore`, as [`Copier::copy_entry`] decides.
    fn excluded(&self, comps: &str, src_rel: &str, whose: SourceKindFor) -> bool {
        !comps.is_empty()
            && (self.exclude.as_ref().is_some_and(|m| m.matches(comps))
                || (whose == SourceKindFor::Op && self.ignore.is_some_and(|m| m.matches(src_rel))))
    }

    /// With a prepared upper: the error for an existing `host` of the
    /// wrong type when the previous result put it there (a fresh upper
    /// would not have it); `None` when it comes from the parent layers.
    fn prepared_conflict(&self, host: &Path) -> Option<FileOpError> {
        let prepared = self
            .reuse
            .filter(|r| r.prepared)
            .zip(self.rel_of(host))
            .is_some_and(|(r, rel)| fs_err::symlink_metadata(r.upper.join(rel)).is_ok());
        prepared.then(|| FileOpError::PreparedConflict {
            path: self.inner_of(host),
        })
    }

    /// Path of `target` below the destination root, as the memo keys it.
    fn rel_of<'p>(&self, target: &'p Path) -> Option<&'p str> {
        below(target, self.dest_root)
            .and_then(std::ffi::OsStr::to_str)
            .filter(|r| !r.is_empty())
    }

    /// With linking on: remembers the source of the regular file copied to
    /// `target` (context copies), and plans linking it instead of copying
    /// when an identical snapshot file may exist.
    fn plan_link(
        &mut self,
        src: &Path,
        target: &Path,
        meta: &Metadata,
        whose: SourceKindFor,
    ) -> Option<LinkPlan> {
        let reuse = self.reuse?;
        let rel = self.rel_of(target)?;
        let id = FileIdentity::of(meta);
        let previous = if reuse.remember {
            if !reuse.rememberable(&id) {
                self.report.identities.push((rel.to_owned(), None));
                return None;
            }
            self.report.identities.push((rel.to_owned(), Some(id)));
            reuse.previous(rel, &id)
        } else {
            None
        };
        let (_, mtime) = self.settings.times_of(meta);
        let expect = Expected {
            size: meta.size(),
            mode: self.settings.mode_of(meta, false),
            owner: self.settings.owner_of(meta, whose),
            mtime: (mtime.unix_seconds(), i64::from(mtime.nanoseconds())),
        };
        // A stage's file, when the copy would keep all its metadata.
        let keeps = expect.mode == meta.mode() & 0o7777
            && expect.owner.is_none_or(|o| o == (meta.uid(), meta.gid()))
            && expect.mtime == (meta.mtime(), meta.mtime_nsec());
        let src_rel = (previous.is_none()
            && keeps
            && whose == SourceKindFor::Op
            && !reuse.source_layers.is_empty())
        .then(|| below(src, self.src_root).and_then(std::ffi::OsStr::to_str))
        .flatten()
        .filter(|r| !r.is_empty())
        .map(str::to_owned);
        (previous.is_some() || src_rel.is_some()).then(|| LinkPlan {
            previous,
            src_rel,
            rel: rel.to_owned(),
            expect,
        })
    }

    /// [`Copier::plan_link`] and the link, here (true: linked).
    fn link_now(
        &mut self,
        src: &Path,
        target: &Path,
        meta: &Metadata,
        whose: SourceKindFor,
    ) -> bool {
        let Some(plan) = self.plan_link(src, target, meta, whose) else {
            return false;
        };
        let linked = self
            .reuse
            .is_some_and(|r| plan.run(r, meta, &mut DirFds::default()));
        if linked {
            self.linked.insert(target.as_os_str().to_owned());
        }
        linked
    }

    /// Before writing `target` again: a file linked there behind the
    /// overlay's back is removed from the upper first, so the overlay (which
    /// may remember the path as absent) and its upper agree.
    fn unlink_linked(&mut self, target: &Path) -> Result<(), FileOpError> {
        if self.linked.remove(target.as_os_str())
            && let (Some(reuse), Some(rel)) = (self.reuse, self.rel_of(target))
        {
            fs_err::remove_file(reuse.upper.join(rel))?;
        }
        Ok(())
    }

    /// Something other than a copied regular file now sits at `target`.
    fn forget(&mut self, target: &Path) {
        if self.reuse.is_some()
            && let Some(rel) = self.rel_of(target)
        {
            self.report.identities.push((rel.to_owned(), None));
        }
    }

    /// fsutil's `copyDirectoryOnly`: make `target` a directory. An existing
    /// directory is merged into; an existing symlink to a directory (inside
    /// the root) is followed, as BuildKit does since moby/moby#47367; any
    /// other existing entry is an error. Returns the directory to fill and
    /// whether it was created.
    fn dir_only(&mut self, target: &Path) -> Result<(PathBuf, bool), FileOpError> {
        match fs_err::symlink_metadata(target) {
            Err(e) if is_absent(&e) => {
                fs_err::create_dir(target)?;
                Ok((target.to_path_buf(), true))
            }
            Err(e) => Err(e.into()),
            Ok(m) if m.is_dir() => Ok((target.to_path_buf(), false)),
            Ok(m) if m.file_type().is_symlink() => {
                // A link the previous result made is not followed: a fresh
                // upper would not have it.
                if let Some(e) = self.prepared_conflict(target) {
                    return Err(e);
                }
                let inner = self.inner_of(target);
                let followed = resolve(self.dest_root, &inner, true)?;
                if fs_err::metadata(&followed.host).is_ok_and(|m| m.is_dir()) {
                    Ok((followed.host, false))
                } else {
                    Err(FileOpError::NotADirectory { path: inner })
                }
            }
            Ok(_) => {
                Err(self
                    .prepared_conflict(target)
                    .unwrap_or_else(|| FileOpError::NotADirectory {
                        path: self.inner_of(target),
                    }))
            }
        }
    }

    /// fsutil's `ensureEmptyFileTarget`: a file replaces any existing
    /// non-directory (a symlink itself, never what it points to).
    fn clear_file_target(&self, target: &Path) -> Result<(), FileOpError> {
        match fs_err::symlink_metadata(target) {
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(m) if m.is_dir() => Err(self.prepared_conflict(target).unwrap_or_else(|| {
                FileOpError::ReplaceDirWithFile {
                    path: self.inner_of(target),
                }
            })),
            Ok(_) => Ok(fs_err::remove_file(target)?),
        }
    }

    /// Hands a regular file to the workers (or copies it here).
    fn submit(&mut self, job: Job) -> Result<(), FileOpError> {
        if let Some(e) = self.state.take_error() {
            return Err(e);
        }
        if !self.jobs.is_empty() {
            // A directory's files go to one worker (which keeps the
            // directory open).
            let parent = job
                .target
                .parent()
                .map_or(&[][..], |p| p.as_os_str().as_encoded_bytes());
            let slot = match &self.last_slot {
                Some((dir, slot)) if dir.as_slice() == parent => *slot,
                _ => {
                    use std::hash::{Hash as _, Hasher as _};
                    let mut h = std::hash::DefaultHasher::new();
                    parent.hash(&mut h);
                    let slot = usize::try_from(h.finish() % self.jobs.len() as u64).unwrap_or(0);
                    self.last_slot = Some((parent.to_vec(), slot));
                    slot
                }
            };
            if self.batches.len() != self.jobs.len() {
                self.batches.resize_with(self.jobs.len(), Default::default);
            }
            let size = if job.link.is_some() {
                0
            } else {
                job.meta.len()
            };
            let (batch, bytes) = &mut self.batches[slot];
            batch.push(job);
            *bytes += size;
            if batch.len() >= BATCH_FILES || *bytes >= BATCH_BYTES {
                self.send(slot);
            }
            return Ok(());
        }
        self.run_here(job)
    }

    /// Copies (or links) a file on this thread.
    fn run_here(&mut self, job: Job) -> Result<(), FileOpError> {
        if let (Some(plan), Some(reuse)) = (&job.link, self.reuse)
            && plan.run(reuse, &job.meta, &mut DirFds::default())
        {
            self.linked.insert(job.target.into_os_string());
            return Ok(());
        }
        let (bytes, content) =
            copy_regular(&self.settings, &job.src, &job.target, &job.meta, job.whose)?;
        self.report.bytes += bytes;
        let mut kept = Vec::new();
        self.state
            .keep(&self.settings, &job.target, content, &mut kept);
        append_locked(&self.state.contents, &mut kept);
        Ok(())
    }

    /// Hands worker `slot` its gathered jobs. If the workers are gone, the
    /// jobs are done here (the first failure is kept for `settle`).
    fn send(&mut self, slot: usize) {
        let Some((batch, bytes)) = self.batches.get_mut(slot) else {
            return;
        };
        let batch = std::mem::replace(batch, Vec::with_capacity(BATCH_FILES));
        *bytes = 0;
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        *self
            .state
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += n;
        if let Err(std::sync::mpsc::SendError(batch)) = self.jobs[slot].send(batch) {
            self.state.done_many(n, 0, None);
            self.jobs.clear();
            for job in batch {
                if let Err(e) = self.run_here(job) {
                    self.state.done_many(0, 0, Some(e));
                }
            }
        }
    }

    /// Hands every gathered job to the workers.
    fn flush(&mut self) {
        for slot in 0..self.batches.len() {
            self.send(slot);
        }
    }

    /// Waits until every file handed out is written, then applies the
    /// deferred directory metadata. Returns the first failure.
    fn settle(&mut self) -> Result<(), FileOpError> {
        self.flush();
        {
            let mut pending = self
                .state
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while *pending > 0 {
                pending = self
                    .state
                    .idle
                    .wait(pending)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        if let Some(e) = self.state.take_error() {
            return Err(e);
        }
        let linked = std::mem::take(
            &mut *self
                .state
                .linked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.linked
            .extend(linked.into_iter().map(PathBuf::into_os_string));
        for (src, dir, meta, whose) in std::mem::take(&mut self.deferred) {
            self.apply_info(&src, &dir, &meta, false, whose)?;
        }
        Ok(())
    }

    /// fsutil's `copyFileInfo` + `copyXAttrs`: owner, mode (`--chmod`),
    /// xattrs, then times.
    fn apply_info(
        &self,
        src: &Path,
        target: &Path,
        meta: &Metadata,
        is_symlink: bool,
        whose: SourceKindFor,
    ) -> Result<(), FileOpError> {
        if let Some((uid, gid)) = self.settings.owner_of(meta, whose) {
            std::os::unix::fs::lchown(target, Some(uid), Some(gid))
                .map_err(|e| with_path(e, target))?;
        }
        if !is_symlink {
            let mode = self.settings.mode_of(meta, meta.is_dir());
            fs_err::set_permissions(target, std::fs::Permissions::from_mode(mode))?;
        }
        copy_xattrs(src, target)?;
        let (atime, mtime) = self.settings.times_of(meta);
        filetime::set_symlink_file_times(target, atime, mtime).map_err(|e| with_path(e, target))?;
        Ok(())
    }
}

/// A regular file with its data, owner, mode, xattrs and times, as
/// [`Self::apply_info`] gives them, through two file descriptors
/// (`target` must not exist). Returns the bytes copied.
fn copy_regular(
    settings: &FileSettings,
    src: &Path,
    target: &Path,
    meta: &Metadata,
    whose: SourceKindFor,
) -> Result<(u64, Option<Vec<u8>>), FileOpError> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    use xattr::FileExt as _;
    let mode = settings.mode_of(meta, false);
    // Created with its mode when the umask leaves it whole and no chown
    // follows that would clear set-id bits: no `fchmod` then.
    let mode_at_create = mode & 0o7000 == 0 && mode & process_umask() == 0;
    let mut from = fs_err::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(src)?;
    let mut to = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if mode_at_create { mode } else { 0o600 })
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(target)?;
    let mut small = None;
    let bytes = if meta.len() <= SMALL_FILE {
        // One read and one write: `io::copy` would stat both files to
        // pick a kernel copy, and read again to see the end.
        use std::io::{Read as _, Write as _};
        let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        (&mut from).take(SMALL_FILE).read_to_end(&mut buf)?;
        to.write_all(&buf)?;
        let n = buf.len() as u64;
        small = Some(buf);
        n
    } else {
        // On the std files: `io::copy` then copies in the kernel
        // (`copy_file_range`); through fs-err's wrappers it would read and
        // write 8 KiB at a time.
        io::copy(&mut from.file(), &mut to.file()).map_err(|e| with_path(e, src))?
    };
    let (fd_from, fd_to) = (from.file(), to.file());
    if let Some((uid, gid)) = settings.owner_of(meta, whose) {
        let created = fd_to.metadata().map_err(|e| with_path(e, target))?;
        if (created.uid(), created.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(fd_to, Some(uid), Some(gid))
                .map_err(|e| with_path(e, target))?;
        }
    }
    if !mode_at_create {
        fd_to
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| with_path(e, target))?;
    }
    copy_xattr_list(
        src,
        target,
        fd_from.list_xattr(),
        |name| fd_from.get_xattr(name),
        |name, value| fd_to.set_xattr(name, value),
    )?;
    let (atime, mtime) = settings.times_of(meta);
    filetime::set_file_handle_times(fd_to, Some(atime), Some(mtime))
        .map_err(|e| with_path(e, target))?;
    // The content is vouched for when the file has no xattrs at all (the
    // layer writer takes known contents for xattr-free files only; a
    // security module may label new files).
    let content = small.filter(|b| {
        settings.record_under.is_some()
            && b.len() as u64 <= kiln_cache::layer::known::MAX_FILE
            && b.len() as u64 == meta.len()
            && fd_to.list_xattr().is_ok_and(|mut x| x.next().is_none())
    });
    Ok((bytes, content))
}

/// The process's umask, read once (`/proc/self/status`; `umask(2)` cannot
/// read it without setting it, and other threads create files). When it
/// cannot be read: all bits, so that modes are always set afterwards.
fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        fs_err::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o7777)
    })
}

/// Files up to this size are copied through one buffer.
const SMALL_FILE: u64 = 256 * 1024;

/// Extended attributes of the source onto the target, as far as the file
/// system allows: names it does not support, and `security.`/`trusted.`
/// ones an unprivileged process may not set, are left out (BuildKit's
/// xattr error handler does the same for unsupported ones).
pub(super) fn copy_xattrs(src: &Path, target: &Path) -> Result<(), FileOpError> {
    copy_xattr_list(
        src,
        target,
        xattr::list(src),
        |name| xattr::get(src, name),
        |name, value| xattr::set(target, name, value),
    )
}

/// [`copy_xattrs`] over any way of listing, reading and writing them (paths
/// or open files).
fn copy_xattr_list(
    src: &Path,
    target: &Path,
    names: io::Result<xattr::XAttrs>,
    get: impl Fn(&std::ffi::OsStr) -> io::Result<Option<Vec<u8>>>,
    set: impl Fn(&std::ffi::OsStr, &[u8]) -> io::Result<()>,
) -> Result<(), FileOpError> {
    let names = match names {
        Ok(n) => n,
        Err(e) if xattr_skippable(&e) => return Ok(()),
        Err(e) => return Err(with_path(e, src).into()),
    };
    for name in names {
        let lossy = name.to_string_lossy();
        // overlayfs' own: they would make a snapshot say what overlayfs
        // reads as its own (an overlay never shows them anyway).
        if crate::context::is_overlay_private(&lossy) {
            continue;
        }
        let Some(value) = get(&name).map_err(|e| with_path(e, src))? else {
            continue;
        };
        match set(&name, &value) {
            Ok(()) => {}
            Err(e)
                if xattr_skippable(&e)
                    || (e.kind() == io::ErrorKind::PermissionDenied
                        && (lossy.starts_with("security.") || lossy.starts_with("trusted."))) => {}
            Err(e) => return Err(with_path(e, target).into()),
        }
    }
    Ok(())
}

fn xattr_skippable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || e.raw_os_error() == Some(nix::errno::Errno::EOPNOTSUPP as i32)
}

fn make_special(
    target: &Path,
    meta: &Metadata,
    fifo: bool,
    block: bool,
) -> Result<(), FileOpError> {
    use nix::sys::stat::{Mode, SFlag, mknod};
    let perm = Mode::from_bits_truncate(meta.mode() & 0o7777);
    let kind = if fifo {
        SFlag::S_IFIFO
    } else if block {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFCHR
    };
    mknod(target, kind, perm, meta.rdev()).map_err(|e| with_path(io::Error::from(e), target).into())
}

/// An io error that names `path` (for calls fs-err does not wrap).
pub(super) fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{e} at `{}`", path.display()))
}

#[cfg(test)]
mod below_tests {
    use super::below;
    use std::path::Path;

    #[test]
    fn below_strips_by_bytes_as_strip_prefix_does() {
        let cases = [
            ("/a/b/c", "/a", Some("b/c")),
            ("/a/b/c", "/a/", Some("b/c")),
            ("/a", "/a", Some("")),
            ("/ab/c", "/a", None),
            ("/x/c", "/a", None),
            ("/a/b", "/", Some("a/b")),
            ("/", "/", Some("")),
            ("/a//b", "/a", Some("b")),
        ];
        for (path, base, want) in cases {
            let got = below(Path::new(path), Path::new(base)).map(|o| o.to_str().unwrap_or("?"));
            assert_eq!(got, want, "{path} below {base}");
            let std = Path::new(path)
                .strip_prefix(base)
                .ok()
                .map(|p| p.to_str().unwrap_or("?"));
            assert_eq!(got, std, "{path} below {base}, as Path::strip_prefix");
        }
    }
}
