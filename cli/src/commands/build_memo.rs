//! The build memo: a rebuild with the same inputs as a previous build in
//! which every step was a cache hit is answered from that build, without
//! planning, keying or solving again.
//!
//! A fully cached build's result depends only on what it read: the
//! Dockerfile, the options, the environment values it took, the base
//! images' ids, the context files its steps read, and the cache records it
//! hit (which `prune` may have removed since). So such a build leaves, in
//! the store's cache index under a fingerprint of the first four, the
//! image it made, the progress events it showed, the ids of its base
//! images, its steps' keys, and the `lstat` identity (device, inode, size,
//! mtime, ctime, mode) of every context path it read and of their
//! directories (a directory's times change when an entry is added,
//! removed or renamed).
//!
//! The next build with the same fingerprint checks all of it: each base
//! reference resolves to the same id, each step's record is still there,
//! the image is, and each context path `lstat`s the same. Only then is the
//! image tagged and the recorded progress shown again; anything else falls
//! through to the full build, which rewrites or drops the memo. A build that
//! ran a step drops it (so an edit-and-rebuild loop does not check a stale
//! memo each time).
//!
//! A memo hit also leaves a *quick memo* in `memo/` beside the database:
//! the hit, its evidence and the database's seal (see [`DbSeal`]). While
//! the seal holds (no transaction since), the next build with the same
//! fingerprint answers from it without opening the database: it checks
//! only the context paths.
//!
//! Not memoized: `--no-cache`, `--pull=always`, `--cache-from`/`--cache-to`,
//! outputs (`-o`, `--iidfile`, `--metadata-file`), `--push`, a context or
//! Dockerfile on stdin, an `ADD <url>` without `--checksum` (keyed by what
//! the server sends now), and a build with a context path changed within
//! the last two seconds (a later change in the same clock tick could keep
//! its times: "racy" as in git).

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use kiln_cache::{CacheResult, DbSeal, Digest, Reference, Store};
use kiln_solver::event::Event;
use kiln_solver::graph::{BuildGraph, CopySource, FileOp, Op, SourceOp, VertexId};
use kiln_solver::key::{CacheKey, VertexKey};
use serde::{Deserialize, Serialize};

/// The memo's version: part of the record key.
const VERSION: &str = "kiln-build-memo-1";

/// Context paths changed this recently (ns) make no memo.
const RACY_NS: i128 = 2_000_000_000;

/// At most this many context paths are checked (a bigger context is keyed
/// in full: checking would cost as much).
const MAX_EVIDENCE: usize = 10_000;

/// What a memo holds besides the image id.
#[derive(Debug, Serialize, Deserialize)]
struct Memo {
    /// Base references and the image ids they resolved to.
    bases: Vec<(String, String)>,
    /// Cache records the build hit.
    steps: Vec<String>,
    /// Context paths (relative, `.` for the root) and their `lstat` identity.
    evidence: Vec<(String, [i128; 6])>,
    /// The progress events the build showed.
    events: Vec<Event>,
    /// Steps found in the cache, and left out.
    cached: usize,
    skipped: usize,
    /// The warning about unused build args, if there was one.
    warning: Option<String>,
}

/// A memo that still holds.
#[derive(Debug)]
pub(crate) struct Hit {
    pub(crate) image: Digest,
    pub(crate) events: Vec<Event>,
    pub(crate) cached: usize,
    pub(crate) skipped: usize,
    pub(crate) warning: Option<String>,
    /// The memo's context evidence (kept for the quick memo).
    evidence: Vec<(String, [i128; 6])>,
}

/// A memo hit written down with the database's seal (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
struct Quick {
    seal: DbSeal,
    image: String,
    evidence: Vec<(String, [i128; 6])>,
    events: Vec<Event>,
    cached: usize,
    skipped: usize,
    warning: Option<String>,
}

fn quick_path(root: &Path, key: &str) -> std::path::PathBuf {
    let name = key.strip_prefix("build-memo:").unwrap_or(key);
    root.join("memo").join(name)
}

/// After a memo hit has tagged its image: leaves the quick memo, when the
/// database's seal is settled (a transaction a moment ago, the tagging's
/// say, leaves it to the next hit). Best effort.
pub(crate) fn record_quick(store: &Store, key: &str, hit: &Hit) {
    let Some(seal) = DbSeal::of(store.root()) else {
        return;
    };
    if !seal.settled(kiln_cache::now_ns()) {
        return;
    }
    let quick = Quick {
        seal,
        image: hit.image.to_string(),
        evidence: hit.evidence.clone(),
        events: hit.events.clone(),
        cached: hit.cached,
        skipped: hit.skipped,
        warning: hit.warning.clone(),
    };
    let Ok(bytes) = serde_json::to_vec(&quick) else {
        return;
    };
    let path = quick_path(store.root(), key);
    let Some(dir) = path.parent() else {
        return;
    };
    // Written whole, then renamed: a reader sees the old file or the new.
    let _ = fs_err::create_dir_all(dir).and_then(|()| {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut tmp, &bytes)?;
        tmp.persist(&path).map(drop).map_err(|e| e.error)
    });
}

/// Removes every quick memo of `store`.
pub(crate) fn clear_quick(store: &Store) -> std::io::Result<()> {
    match fs_err::remove_dir_all(store.root().join("memo")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The quick memo under `key`, when the database is as its seal says and
/// the context paths are as they were; `None` sends the build down its
/// usual path. Reads no database: holds the store lock shared while it
/// checks (GC takes it exclusively), and gives up if GC has it.
pub(crate) fn lookup_quick(root: &Path, key: &str, context: &Path) -> Option<Hit> {
    let lock = fs_err::OpenOptions::new()
        .write(true)
        .open(root.join("lock"))
        .ok()?;
    lock.file().try_lock_shared().ok()?;
    let bytes = fs_err::read(quick_path(root, key)).ok()?;
    let quick: Quick = serde_json::from_slice(&bytes).ok()?;
    if DbSeal::of(root)? != quick.seal {
        return None;
    }
    if !evidence_holds(context, &quick.evidence) {
        return None;
    }
    Some(Hit {
        image: quick.image.parse().ok()?,
        events: quick.events,
        cached: quick.cached,
        skipped: quick.skipped,
        warning: quick.warning,
        evidence: quick.evidence,
    })
}

/// What a build has in hand when it looks for a memo.
pub(crate) struct Inputs<'a> {
    /// The build's flags (their debug form is part of the fingerprint).
    pub(crate) args: &'a dyn std::fmt::Debug,
    /// The plan options (build args with values taken from the environment).
    pub(crate) options: &'a dyn std::fmt::Debug,
    /// `SOURCE_DATE_EPOCH`.
    pub(crate) epoch: Option<i64>,
    /// The Dockerfile and its text.
    pub(crate) dockerfile: &'a Path,
    pub(crate) text: &'a str,
    /// The context directory (canonical).
    pub(crate) context: &'a Path,
}

/// The record key of the memo of a build with `inputs`; `None` when a part
/// of it cannot be read (no memo then).
pub(crate) fn fingerprint(inputs: &Inputs<'_>) -> Option<String> {
    let mut h = kiln_cache::Hasher::new();
    let mut part = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(VERSION.as_bytes());
    // This kiln binary: another build of kiln may make other images.
    let exe = fs_err::metadata("/proc/self/exe").ok()?;
    part(&identity(&exe).map(|n| n.to_le_bytes()).concat());
    let cwd = std::env::current_dir().ok()?;
    part(cwd.as_os_str().as_encoded_bytes());
    part(format!("{:?}", inputs.args).as_bytes());
    part(format!("{:?}", inputs.options).as_bytes());
    part(format!("{:?}", inputs.epoch).as_bytes());
    let df = fs_err::canonicalize(inputs.dockerfile).ok()?;
    part(df.as_os_str().as_encoded_bytes());
    part(inputs.text.as_bytes());
    part(inputs.context.as_os_str().as_encoded_bytes());
    // Both places an ignore file may be, named as `read_dockerignore` names
    // them (beside the Dockerfile's path as given, a link or not).
    let mut specific = inputs.dockerfile.file_name()?.to_os_string();
    specific.push(".dockerignore");
    for ignore in [
        inputs.dockerfile.with_file_name(specific),
        inputs.context.join(".dockerignore"),
    ] {
        match fs_err::read(&ignore) {
            Ok(b) => {
                part(b"present");
                part(&b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => part(b"absent"),
            Err(_) => return None,
        }
    }
    Some(format!("build-memo:{}", h.finish()))
}

/// The memo under `key`, if everything it rests on still holds.
pub(crate) fn lookup(store: &Store, key: &str, context: &Path) -> Option<Hit> {
    // (Read only: checking takes no write lock.)
    let rec = store.peek_cache_record(key).ok()??;
    let image = rec.config?;
    let memo: Memo = serde_json::from_value(rec.extra).ok()?;
    for (reference, id) in &memo.bases {
        if store.image_id(reference).ok()?.to_string() != *id {
            return None;
        }
    }
    for step in &memo.steps {
        store.peek_cache_record(step).ok()??;
    }
    if store.image_id(&image.to_string()).ok()? != image {
        return None;
    }
    if !evidence_holds(context, &memo.evidence) {
        return None;
    }
    Some(Hit {
        image,
        events: memo.events,
        cached: memo.cached,
        skipped: memo.skipped,
        warning: memo.warning,
        evidence: memo.evidence,
    })
}

/// What a finished build that hit the cache for every step leaves.
pub(crate) struct Done<'a> {
    pub(crate) graph: &'a BuildGraph,
    pub(crate) keys: &'a [VertexKey],
    /// The effective key of each vertex (see `Solved::keys`).
    pub(crate) effective: &'a HashMap<VertexId, CacheKey>,
    pub(crate) image: &'a Digest,
    pub(crate) events: Vec<Event>,
    pub(crate) cached: usize,
    pub(crate) skipped: usize,
    pub(crate) warning: Option<String>,
}

/// Leaves the memo of a build in which every step was a cache hit (best
/// effort: a memo that cannot be written costs the next build its full
/// path).
pub(crate) fn record(store: &Store, key: &str, context: &Path, done: Done<'_>) {
    // An `ADD <url>` without `--checksum` is keyed by what the server sends
    // at each build: only a full build asks it.
    let fetches = done.graph.graph.node_weights().any(|v| {
        matches!(&v.op, Op::File(FileOp::Copy(c))
            if c.checksum.is_none()
                && c.sources.iter().any(|s| matches!(s, CopySource::Url { .. })))
    });
    let evidence = if fetches {
        None
    } else {
        evidence(context, done.keys)
    };
    let Some(evidence) = evidence else {
        forget(store, key);
        return;
    };
    let mut bases = Vec::new();
    let mut steps = Vec::new();
    for v in done.graph.graph.node_indices() {
        match &done.graph.graph[v].op {
            Op::Source(SourceOp::Image {
                reference,
                digest: Some(id),
                ..
            }) => bases.push((reference.clone(), id.clone())),
            Op::Exec(_) | Op::File(_) | Op::StageRef { .. } => {
                if let Some(k) = done.effective.get(&v) {
                    steps.push(k.0.clone());
                }
            }
            Op::Source(_) | Op::Config(_) => {}
        }
    }
    let memo = Memo {
        bases,
        steps,
        evidence,
        events: done.events,
        cached: done.cached,
        skipped: done.skipped,
        warning: done.warning,
    };
    let Ok(extra) = serde_json::to_value(&memo) else {
        return;
    };
    let result = CacheResult {
        diff_ids: Vec::new(),
        config: Some(done.image.clone()),
        extra,
    };
    // (Unchanged: the record is rewritten with the same bytes, which the
    // store's upsert does cheaply.)
    let _ = store.put_cache_record(key, &result);
}

/// Drops the memo under `key` (a build with these inputs ran a step).
pub(crate) fn forget(store: &Store, key: &str) {
    let _ = store.delete_cache_record(key);
}

/// The `lstat` identity of every context path the build's steps read, of
/// their directories and of the context root; `None` when one is too
/// recent to trust, cannot be read, or there are too many.
fn evidence(context: &Path, keys: &[VertexKey]) -> Option<Vec<(String, [i128; 6])>> {
    let mut paths: BTreeSet<&str> = BTreeSet::new();
    paths.insert(".");
    for k in keys {
        for p in k.inputs.files.keys() {
            let mut p = p.as_str();
            paths.insert(p);
            while let Some((dir, _)) = p.rsplit_once('/') {
                paths.insert(dir);
                p = dir;
            }
        }
    }
    if paths.len() > MAX_EVIDENCE {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let now = i128::try_from(now).ok()?;
    let mut out = Vec::with_capacity(paths.len());
    for rel in paths {
        let m = fs_err::symlink_metadata(context.join(rel)).ok()?;
        let id = identity(&m);
        if now - id[3].max(id[4]) < RACY_NS {
            return None;
        }
        out.push((rel.to_owned(), id));
    }
    Some(out)
}

/// Whether every context path of `evidence` `lstat`s as recorded.
fn evidence_holds(context: &Path, evidence: &[(String, [i128; 6])]) -> bool {
    evidence.iter().all(|(rel, want)| {
        fs_err::symlink_metadata(context.join(rel)).is_ok_and(|m| identity(&m) == *want)
    })
}

/// Device, inode, size, mtime (ns), ctime (ns), mode.
fn identity(m: &std::fs::Metadata) -> [i128; 6] {
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    [
        i128::from(m.dev()),
        i128::from(m.ino()),
        i128::from(m.len()),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec()),
        i128::from(m.mode()),
    ]
}

/// Tags `image` with each of `tags` that does not name it yet.
pub(crate) fn tag(store: &Store, image: &Digest, tags: &[String]) -> anyhow::Result<()> {
    for t in tags {
        let r = Reference::parse(t).map_err(|e| anyhow::anyhow!("invalid tag `{t}`: {e}"))?;
        if store.image_id(&r.to_string()).ok().as_ref() == Some(image) {
            continue;
        }
        store.tag(&image.to_string(), &r)?;
    }
    Ok(())
}
