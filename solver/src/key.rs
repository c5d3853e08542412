//! Cache keys and the explanation of misses.
//!
//! A key is sha256 over the op's kind, its canonical definition (the
//! serialized, fully expanded [`Op`]; fields that must not count, such as
//! proxy variables, are skipped by its `Serialize`, and secret values and
//! cache-mount contents are never in an op), its parents' keys in order,
//! and the content digest of exactly the context files it reads. Same key,
//! same result: identical ops (same key) run once.
//!
//! Next to the key, [`KeyInputs`] keeps what went into it in a form that
//! can be compared: the instruction text, the ARG/ENV values the op used,
//! per-file digests, the base image digest. [`explain_miss`] compares the
//! inputs of the previous build of the same step with the current ones and
//! names the causes; [`KeyHistory`] remembers the previous inputs of each
//! step in `statcache.db`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::context::{BuildContext, ContextError, hex};
use crate::graph::{BuildGraph, CopySource, FileOp, InputRef, Op, SourceOp, VertexId};

/// Bumped whenever the key derivation changes, so old records never match.
const KEY_VERSION: &str = "kiln-cache-key-v1";

/// A cache key: `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CacheKey(pub String);

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a step is in the Dockerfile: how the previous build of the "same"
/// step is found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLocator {
    /// The stage's name (or `stage-N`).
    pub stage: String,
    /// The instruction index in the stage (`None` for the FROM/source).
    pub index: Option<usize>,
    /// The Dockerfile line.
    pub line: usize,
}

/// One parent of an op, for explanations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentInput {
    /// Its key.
    pub key: CacheKey,
    /// Its display name (`[build 2/4] RUN make`).
    pub name: String,
}

/// Everything a key was computed from, comparable across builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    /// `exec`, `file`, ...
    pub kind: String,
    /// The canonical JSON of the op.
    pub definition: String,
    /// The instruction as written (first line), if the op has one.
    pub instruction: Option<String>,
    /// Where the step is.
    pub locator: Option<StepLocator>,
    /// The parents, in order.
    pub parents: Vec<ParentInput>,
    /// ARG/ENV values the op used (already part of `definition`).
    pub vars: BTreeMap<String, String>,
    /// The base image, for image sources: reference and digest.
    pub image: Option<(String, Option<String>)>,
    /// Context files read: path -> entry digest.
    pub files: BTreeMap<String, String>,
    /// The combined digest of `files`.
    pub files_digest: Option<String>,
    /// How the contents of `files` were hashed
    /// ([`kiln_cache::CONTENT_ALGORITHM`]); empty in the history that kilns
    /// from before BLAKE3 content digests wrote (theirs were sha256), whose
    /// file digests cannot be compared with today's.
    #[serde(default)]
    pub content_hash: String,
}

impl KeyInputs {
    /// The cache key.
    pub fn key(&self) -> CacheKey {
        let mut h = Sha256::new();
        for part in [KEY_VERSION, &self.kind, &self.definition] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update((self.parents.len() as u64).to_le_bytes());
        for p in &self.parents {
            h.update((p.key.0.len() as u64).to_le_bytes());
            h.update(p.key.0.as_bytes());
        }
        let files = self.files_digest.as_deref().unwrap_or("");
        h.update((files.len() as u64).to_le_bytes());
        h.update(files.as_bytes());
        CacheKey(format!("sha256:{}", hex(&h.finalize())))
    }
}

/// Why a step was not found in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum MissCause {
    /// No earlier build of this step is known.
    FirstBuild,
    /// `--no-cache`.
    NoCache,
    /// The instruction's text changed.
    InstructionChanged {
        /// Before.
        before: String,
        /// Now.
        after: String,
    },
    /// A build arg or env value it uses changed.
    ArgChanged {
        /// The variable.
        name: String,
        /// Before (`None`: unset).
        before: Option<String>,
        /// Now.
        after: Option<String>,
    },
    /// An environment variable a RUN sees changed (an ENV, or the base
    /// image's environment).
    EnvChanged {
        /// The variable.
        name: String,
        /// Before (`None`: unset).
        before: Option<String>,
        /// Now.
        after: Option<String>,
    },
    /// A context file it reads changed.
    FileChanged {
        /// Context-relative path.
        path: String,
    },
    /// A file it reads appeared.
    FileAdded {
        /// Context-relative path.
        path: String,
    },
    /// A file it read is gone.
    FileRemoved {
        /// Context-relative path.
        path: String,
    },
    /// The base image has a new digest.
    BaseImageChanged {
        /// The reference.
        reference: String,
        /// The old digest.
        before: Option<String>,
        /// The new digest.
        after: Option<String>,
    },
    /// An input step changed (its own miss names why).
    ParentChanged {
        /// The input step's name.
        name: String,
    },
    /// The files a step reads from another stage (`COPY --from`, a bind
    /// mount `from=`) changed: such steps are keyed by those files.
    StageFilesChanged {
        /// The stage's last step.
        name: String,
    },
    /// The definition changed in a way none of the above covers (for
    /// example an ENV or WORKDIR earlier in the stage).
    SettingsChanged,
    /// The inputs are the same as last time but the cache has no result
    /// (it was pruned, or a layer it needs left the store).
    RecordMissing,
    /// The step reads files and its last build was by a kiln that hashed
    /// file contents another way: its keys and file digests differ from
    /// today's whatever the files are.
    ContentHashChanged,
}

impl std::fmt::Display for MissCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "unset".to_owned());
        match self {
            MissCause::FirstBuild => write!(f, "not built before"),
            MissCause::NoCache => write!(f, "--no-cache"),
            MissCause::InstructionChanged { before, after } => {
                write!(f, "instruction changed (`{before}` -> `{after}`)")
            }
            MissCause::ArgChanged {
                name,
                before,
                after,
            } => write!(
                f,
                "ARG `{name}` changed (`{}` -> `{}`)",
                opt(before),
                opt(after)
            ),
            MissCause::EnvChanged {
                name,
                before,
                after,
            } => write!(
                f,
                "ENV `{name}` changed (`{}` -> `{}`)",
                opt(before),
                opt(after)
            ),
            MissCause::FileChanged { path } => write!(f, "file `{path}` changed"),
            MissCause::FileAdded { path } => write!(f, "file `{path}` added"),
            MissCause::FileRemoved { path } => write!(f, "file `{path}` removed"),
            MissCause::BaseImageChanged {
                reference,
                before,
                after,
            } => write!(
                f,
                "base image `{reference}` changed (`{}` -> `{}`)",
                opt(before),
                opt(after)
            ),
            MissCause::ParentChanged { name } => write!(f, "previous step changed: {name}"),
            MissCause::StageFilesChanged { name } => {
                write!(f, "the files it reads from {name} changed")
            }
            MissCause::SettingsChanged => write!(f, "build settings changed"),
            MissCause::RecordMissing => {
                write!(f, "no cached result (pruned, or its layers are gone)")
            }
            MissCause::ContentHashChanged => write!(
                f,
                "built before by an older kiln, which hashed file contents another way"
            ),
        }
    }
}

/// Compare the inputs of the previous build of a step with the current
/// ones: the causes of the miss, most direct first. Empty when the inputs
/// are the same (then the miss is not explained by the inputs: the cache
/// record was removed).
pub fn explain_miss(previous: &KeyInputs, current: &KeyInputs) -> Vec<MissCause> {
    let mut causes = Vec::new();
    if previous.instruction != current.instruction || previous.kind != current.kind {
        causes.push(MissCause::InstructionChanged {
            before: previous.instruction.clone().unwrap_or_default(),
            after: current.instruction.clone().unwrap_or_default(),
        });
    }
    let names: std::collections::BTreeSet<&String> =
        previous.vars.keys().chain(current.vars.keys()).collect();
    for name in names {
        let (b, a) = (previous.vars.get(name), current.vars.get(name));
        if b != a {
            causes.push(MissCause::ArgChanged {
                name: name.clone(),
                before: b.cloned(),
                after: a.cloned(),
            });
        }
    }
    // A RUN's environment: name the variables that changed and are not
    // ARGs (those were named above).
    let (eb, ea) = (run_env(&previous.definition), run_env(&current.definition));
    let env_names: std::collections::BTreeSet<&String> = eb.keys().chain(ea.keys()).collect();
    for name in env_names {
        let (b, a) = (eb.get(name), ea.get(name));
        if b != a && !previous.vars.contains_key(name) && !current.vars.contains_key(name) {
            causes.push(MissCause::EnvChanged {
                name: name.clone(),
                before: b.cloned(),
                after: a.cloned(),
            });
        }
    }
    if let (Some((rb, db)), Some((ra, da))) = (&previous.image, &current.image)
        && rb == ra
        && db != da
    {
        causes.push(MissCause::BaseImageChanged {
            reference: ra.clone(),
            before: db.clone(),
            after: da.clone(),
        });
    }
    for (path, d) in &current.files {
        match previous.files.get(path) {
            None => causes.push(MissCause::FileAdded { path: path.clone() }),
            Some(p) if !same_digest(p, d) => {
                causes.push(MissCause::FileChanged { path: path.clone() });
            }
            Some(_) => {}
        }
    }
    for path in previous.files.keys() {
        if !current.files.contains_key(path) {
            causes.push(MissCause::FileRemoved { path: path.clone() });
        }
    }
    let direct = !causes.is_empty();
    let image_changed = causes
        .iter()
        .any(|c| matches!(c, MissCause::BaseImageChanged { .. }));
    for (i, p) in current.parents.iter().enumerate() {
        // A FROM's only parent is its image: named above.
        if image_changed && current.kind == "stage" {
            break;
        }
        if previous.parents.get(i).map(|q| &q.key) != Some(&p.key) {
            causes.push(MissCause::ParentChanged {
                name: p.name.clone(),
            });
        }
    }
    if !direct && causes.is_empty() && previous.definition != current.definition {
        causes.push(MissCause::SettingsChanged);
    }
    causes
}

/// The `env` of an exec op's canonical definition, by name.
fn run_env(definition: &str) -> BTreeMap<String, String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(definition) else {
        return BTreeMap::new();
    };
    let Some(env) = v.get("env").and_then(|e| e.as_array()) else {
        return BTreeMap::new();
    };
    env.iter()
        .filter_map(|kv| {
            let kv = kv.as_array()?;
            Some((
                kv.first()?.as_str()?.to_owned(),
                kv.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Errors computing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Checksumming the context failed for a step.
    #[error("{step}: cannot checksum its context files")]
    Context {
        /// The step's display name.
        step: String,
        /// Why.
        #[source]
        source: ContextError,
    },
    /// The op could not be serialized (never expected).
    #[error("{step}: cannot serialize the op")]
    Serialize {
        /// The step's display name.
        step: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Compressing a key history row failed (never expected).
    #[error("{step}: cannot compress the key history row")]
    Compress {
        /// The step's stage.
        step: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key history database failed.
    #[error("key history `{}` failed", path.display())]
    History {
        /// The database.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
}

/// A computed key with its inputs.
#[derive(Debug, Clone)]
pub struct VertexKey {
    /// The vertex.
    pub vertex: VertexId,
    /// The key: [`KeyInputs::key`], except for config-only ops, which
    /// have their parent's key (they change no file).
    pub key: CacheKey,
    /// What it came from.
    pub inputs: KeyInputs,
}

/// Compute the keys of every vertex, inputs before consumers. `context`
/// is checksummed for the ops that read it (`None`: the context is not
/// available, e.g. `kiln graph`; those ops are keyed without file digests).
pub fn compute_keys(
    graph: &BuildGraph,
    mut context: Option<&mut BuildContext>,
) -> Result<Vec<VertexKey>, KeyError> {
    let mut keys: BTreeMap<VertexId, CacheKey> = BTreeMap::new();
    let mut out = Vec::with_capacity(graph.graph.node_count());
    for v in graph.topo_order() {
        let vert = &graph.graph[v];
        let definition = serde_json::to_string(&vert.op).map_err(|source| KeyError::Serialize {
            step: vert.name.clone(),
            source,
        })?;
        let parents = graph
            .inputs(v)
            .into_iter()
            .filter(|(p, _)| !matches!(graph.graph[*p].op, Op::Source(SourceOp::Context)))
            .filter_map(|(p, _)| {
                keys.get(&p).map(|k| ParentInput {
                    key: k.clone(),
                    name: graph.graph[p].name.clone(),
                })
            })
            .collect();
        let reads = context_reads(&vert.op);
        let (files, files_digest) = match (&reads, context.as_deref_mut()) {
            (Some((patterns, exclude, parents)), Some(ctx)) => {
                let sum = ctx
                    .checksum(patterns, exclude, *parents)
                    .map_err(|source| KeyError::Context {
                        step: vert.name.clone(),
                        source,
                    })?;
                // (Moved, not copied: thousands of paths.)
                let files = sum.files.into_iter().map(|f| (f.path, f.digest)).collect();
                (files, Some(sum.digest))
            }
            _ => (BTreeMap::new(), None),
        };
        // The base image: of an image source, and of the FROM built on it
        // (the step whose miss the user sees).
        let image_of = |op: &Op| match op {
            Op::Source(SourceOp::Image {
                reference, digest, ..
            }) => Some((reference.clone(), digest.clone())),
            _ => None,
        };
        let image = match &vert.op {
            Op::StageRef { .. } => graph
                .inputs(v)
                .first()
                .and_then(|(p, _)| image_of(&graph.graph[*p].op)),
            op => image_of(op),
        };
        let inputs = KeyInputs {
            kind: vert.op.kind().to_owned(),
            definition,
            instruction: vert.span.is_some().then(|| {
                vert.name
                    .split_once("] ")
                    .map_or(vert.name.clone(), |(_, i)| i.to_owned())
            }),
            locator: vert.stage.map(|s| StepLocator {
                stage: graph
                    .stage(s)
                    .map_or_else(|| format!("stage-{s}"), |p| p.display_name()),
                index: vert.instruction,
                line: vert.span.map_or(0, |sp| sp.start.line),
            }),
            parents,
            vars: vert.used_vars.clone(),
            image,
            files,
            files_digest,
            content_hash: kiln_cache::CONTENT_ALGORITHM.to_owned(),
        };
        // A config change does not touch the filesystem: it has its
        // parent's key, so an ARG/ENV/LABEL change misses only the steps
        // that use the value (as in BuildKit, where they are no LLB op).
        let key = match (&vert.op, inputs.parents.first()) {
            (Op::Config(_), Some(p)) => p.key.clone(),
            _ => inputs.key(),
        };
        keys.insert(v, key.clone());
        out.push(VertexKey {
            vertex: v,
            key,
            inputs,
        });
    }
    if let Some(ctx) = context {
        ctx.flush().map_err(|source| KeyError::Context {
            step: "[internal] stat cache".to_owned(),
            source,
        })?;
    }
    Ok(out)
}

/// The context paths an op reads: `(patterns, excludes, parents)`.
fn context_reads(op: &Op) -> Option<(Vec<String>, Vec<String>, bool)> {
    match op {
        Op::File(FileOp::Copy(c)) if c.from == InputRef::Context => {
            let paths: Vec<String> = c
                .sources
                .iter()
                .filter_map(|s| match s {
                    CopySource::Path { path } => Some(path.clone()),
                    _ => None,
                })
                .collect();
            (!paths.is_empty()).then(|| (paths, c.exclude.clone(), c.parents))
        }
        Op::Exec(r) => {
            let paths: Vec<String> = r
                .mounts
                .iter()
                .filter(|m| m.from == Some(InputRef::Context))
                .map(|m| m.source.clone().unwrap_or_else(|| ".".to_owned()))
                .collect();
            (!paths.is_empty()).then_some((paths, Vec::new(), false))
        }
        _ => None,
    }
}

/// Digests as the key history keeps them: `sha256:` and 16 hex digits
/// (enough to tell a changed file; the key itself uses full digests).
const HISTORY_DIGEST_LEN: usize = "sha256:".len() + 16;

/// Whether two file digests are the same, either one possibly shortened by
/// the key history.
fn same_digest(a: &str, b: &str) -> bool {
    let n = a.len().min(b.len());
    a == b || (n >= HISTORY_DIGEST_LEN && a.get(..n) == b.get(..n))
}

/// The stored form of `inputs` in the table of kiln versions before
/// [`FileBuckets`]: per-file digests shortened, JSON, zstd.
#[cfg(test)]
fn history_row(inputs: &KeyInputs) -> Result<Vec<u8>, serde_json::Error> {
    let mut slim = inputs.clone();
    for d in slim.files.values_mut() {
        d.truncate(HISTORY_DIGEST_LEN);
    }
    let json = serde_json::to_vec(&slim)?;
    Ok(zstd::encode_all(json.as_slice(), 3).unwrap_or(json))
}

/// Reads a stored row: plain JSON (text), or zstd-compressed JSON (a blob).
fn parse_history_row(value: rusqlite::types::ValueRef<'_>) -> Option<KeyInputs> {
    match value {
        rusqlite::types::ValueRef::Text(t) => serde_json::from_slice(t).ok(),
        rusqlite::types::ValueRef::Blob(b) => {
            let json = zstd::decode_all(b).ok()?;
            serde_json::from_slice(&json).ok()
        }
        _ => None,
    }
}

/// A step's file list split into buckets by a hash of the path (about 128
/// files each, a power of two of them), so that a build which changed one
/// file rewrites one small bucket, and explaining its miss reads only the
/// buckets that differ. A bucket is, per file in path order, the path's
/// length (`u32` LE), the path, the shortened digest's length (`u8`) and
/// the digest; it is known by the first 8 bytes of its sha256.
struct FileBuckets {
    /// The encoded buckets.
    raw: Vec<Vec<u8>>,
    /// Their hashes, 8 bytes each, in bucket order.
    hashes: Vec<u8>,
}

impl FileBuckets {
    fn count_for(files: usize) -> usize {
        if files == 0 {
            0
        } else {
            files.div_ceil(128).next_power_of_two().min(4096)
        }
    }

    fn bucket_of(path: &str, n: usize) -> usize {
        // FNV-1a: stable across versions and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in path.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % n as u64) as usize
    }

    fn of(files: &BTreeMap<String, String>) -> Self {
        let n = Self::count_for(files.len());
        let mut raw = vec![Vec::new(); n];
        for (p, d) in files {
            let d = d.get(..HISTORY_DIGEST_LEN).unwrap_or(d);
            let (Ok(pl), Ok(dl)) = (u32::try_from(p.len()), u8::try_from(d.len())) else {
                continue;
            };
            let b = &mut raw[Self::bucket_of(p, n)];
            b.extend_from_slice(&pl.to_le_bytes());
            b.extend_from_slice(p.as_bytes());
            b.push(dl);
            b.extend_from_slice(d.as_bytes());
        }
        let mut hashes = Vec::with_capacity(n * 8);
        for b in &raw {
            hashes.extend_from_slice(&Sha256::digest(b)[..8]);
        }
        Self { raw, hashes }
    }

    /// The files of an encoded bucket (`None`: damaged).
    fn decode(mut b: &[u8], into: &mut BTreeMap<String, String>) -> Option<()> {
        while !b.is_empty() {
            let pl = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
            let p = std::str::from_utf8(b.get(4..4 + pl)?).ok()?;
            let dl = usize::from(*b.get(4 + pl)?);
            let d = std::str::from_utf8(b.get(5 + pl..5 + pl + dl)?).ok()?;
            into.insert(p.to_owned(), d.to_owned());
            b = &b[5 + pl + dl..];
        }
        Some(())
    }
}

/// The last build's row of a step.
enum PreviousRow {
    /// From `key_history3`: the inputs without their files, where the
    /// row is, and the hashes of its file buckets.
    Split {
        inputs: KeyInputs,
        stage: String,
        idx: i64,
        hashes: Vec<u8>,
    },
    /// From the table of older kiln versions (files included).
    Whole(KeyInputs),
}

/// The inputs of the last build of each step, in `statcache.db` under the
/// store root, so the next build can explain its misses. Scoped by the
/// Dockerfile and context paths; a step is found by stage and instruction
/// index, or else by its Dockerfile line. A step's inputs without their
/// files are one row of `key_history3` (JSON text); the files are rows of
/// `key_history3_files`, one per [`FileBuckets`] bucket, rewritten only
/// when they change.
#[derive(Debug)]
pub struct KeyHistory {
    db: crate::context::CacheDb,
    path: PathBuf,
    scope: String,
}

impl KeyHistory {
    /// Open the history for builds of `scope` (e.g. the Dockerfile's and
    /// the context's absolute paths joined).
    pub fn open(store_root: &Path, scope: &str) -> Result<Self, KeyError> {
        let db = crate::context::CacheDb::open(store_root)
            .map_err(|(path, source)| KeyError::History { path, source })?;
        KeyHistory::with_db(db, scope)
    }

    /// The history for builds of `scope` in `db` (shared with the build's
    /// other users).
    pub fn with_db(db: crate::context::CacheDb, scope: &str) -> Result<Self, KeyError> {
        // (The tables are made when `db` is opened.)
        let path = db.path().to_owned();
        Ok(Self {
            db,
            path,
            scope: scope.to_owned(),
        })
    }

    fn db_err(&self) -> impl Fn(rusqlite::Error) -> KeyError + '_ {
        |source| KeyError::History {
            path: self.path.clone(),
            source,
        }
    }

    /// The row of the previous build of the step at `loc`.
    fn previous_row(&self, loc: &StepLocator) -> Result<Option<PreviousRow>, KeyError> {
        let e = self.db_err();
        let idx = loc.index.map_or(-1, |i| i as i64);
        let params = rusqlite::params![self.scope, loc.stage, idx, loc.line as i64];
        let conn = self.db.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT stage, idx, inputs, buckets FROM key_history3 WHERE scope = ?1 AND
                 ((stage = ?2 AND idx = ?3) OR line = ?4)
                 ORDER BY (stage = ?2 AND idx = ?3) DESC LIMIT 1",
            )
            .map_err(&e)?;
        let mut rows = stmt.query(params).map_err(&e)?;
        if let Some(row) = rows.next().map_err(&e)? {
            // An unreadable record is as good as none.
            let Some(inputs) = parse_history_row(row.get_ref(2).map_err(&e)?) else {
                return Ok(None);
            };
            return Ok(Some(PreviousRow::Split {
                inputs,
                stage: row.get(0).map_err(&e)?,
                idx: row.get(1).map_err(&e)?,
                hashes: row.get(3).map_err(&e)?,
            }));
        }
        drop(rows);
        let has_old = conn
            .prepare_cached(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'key_history2'",
            )
            .and_then(|mut st| st.exists([]))
            .map_err(&e)?;
        if !has_old {
            return Ok(None);
        }
        let mut stmt = conn
            .prepare_cached(
                "SELECT inputs FROM key_history2 WHERE scope = ?1 AND
                 ((stage = ?2 AND idx = ?3) OR line = ?4)
                 ORDER BY (stage = ?2 AND idx = ?3) DESC LIMIT 1",
            )
            .map_err(&e)?;
        let mut rows = stmt.query(params).map_err(&e)?;
        match rows.next().map_err(&e)? {
            Some(row) => Ok(parse_history_row(row.get_ref(0).map_err(&e)?).map(PreviousRow::Whole)),
            None => Ok(None),
        }
    }

    /// Adds the files of the stored buckets `which` of the step at
    /// `(stage, idx)` to `into` (`None`: a bucket is missing or damaged).
    fn read_buckets(
        &self,
        stage: &str,
        idx: i64,
        which: &[usize],
        into: &mut BTreeMap<String, String>,
    ) -> Result<Option<()>, KeyError> {
        let e = self.db_err();
        let conn = self.db.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT files FROM key_history3_files
                 WHERE scope = ?1 AND stage = ?2 AND idx = ?3 AND bucket = ?4",
            )
            .map_err(&e)?;
        for &b in which {
            let mut rows = stmt
                .query(rusqlite::params![self.scope, stage, idx, b as i64])
                .map_err(&e)?;
            let Some(row) = rows.next().map_err(&e)? else {
                return Ok(None);
            };
            let rusqlite::types::ValueRef::Blob(z) = row.get_ref(0).map_err(&e)? else {
                return Ok(None);
            };
            let Ok(raw) = zstd::decode_all(z) else {
                return Ok(None);
            };
            if FileBuckets::decode(&raw, into).is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    /// The previous inputs of the step at `loc`.
    pub fn previous(&self, loc: &StepLocator) -> Result<Option<KeyInputs>, KeyError> {
        match self.previous_row(loc)? {
            None => Ok(None),
            Some(PreviousRow::Whole(i)) => Ok(Some(i)),
            Some(PreviousRow::Split {
                mut inputs,
                stage,
                idx,
                hashes,
            }) => {
                let all: Vec<usize> = (0..hashes.len() / 8).collect();
                Ok(self
                    .read_buckets(&stage, idx, &all, &mut inputs.files)?
                    .map(|()| inputs))
            }
        }
    }

    /// Remember the inputs of steps just built (or found in the cache).
    pub fn record<'a>(
        &mut self,
        inputs: impl IntoIterator<Item = &'a KeyInputs>,
    ) -> Result<(), KeyError> {
        let path = self.path.clone();
        let e = |source| KeyError::History {
            path: path.clone(),
            source,
        };
        let mut conn = self.db.conn();
        let tx = crate::context::begin_write(&mut conn).map_err(e)?;
        {
            let mut old_hashes = tx
                .prepare_cached(
                    "SELECT buckets FROM key_history3 WHERE scope = ?1 AND stage = ?2 AND idx = ?3",
                )
                .map_err(e)?;
            let mut put_row = tx
                .prepare_cached(
                    // Unchanged rows are not rewritten: a no-op rebuild
                    // writes nothing.
                    "INSERT INTO key_history3 (scope, stage, idx, line, inputs, buckets)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (scope, stage, idx) DO UPDATE
                     SET line = excluded.line, inputs = excluded.inputs, buckets = excluded.buckets
                     WHERE line != excluded.line OR inputs != excluded.inputs
                        OR buckets != excluded.buckets",
                )
                .map_err(e)?;
            let mut drop_buckets = tx
                .prepare_cached(
                    "DELETE FROM key_history3_files WHERE scope = ?1 AND stage = ?2 AND idx = ?3",
                )
                .map_err(e)?;
            let mut put_bucket = tx
                .prepare_cached(
                    "INSERT INTO key_history3_files (scope, stage, idx, bucket, files)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (scope, stage, idx, bucket) DO UPDATE SET files = excluded.files",
                )
                .map_err(e)?;
            for i in inputs {
                let Some(loc) = &i.locator else { continue };
                let idx = loc.index.map_or(-1, |i| i as i64);
                let slim = KeyInputs {
                    files: BTreeMap::new(),
                    kind: i.kind.clone(),
                    definition: i.definition.clone(),
                    instruction: i.instruction.clone(),
                    locator: i.locator.clone(),
                    parents: i.parents.clone(),
                    vars: i.vars.clone(),
                    image: i.image.clone(),
                    files_digest: i.files_digest.clone(),
                    content_hash: i.content_hash.clone(),
                };
                let json = serde_json::to_vec(&slim).map_err(|source| KeyError::Serialize {
                    step: loc.stage.clone(),
                    source,
                })?;
                // Plain JSON text: a few hundred bytes, and compressing it
                // on every build (a no-op one too, to compare) cost a zstd
                // context each; older rows (zstd blobs) are still read.
                let row = String::from_utf8_lossy(&json).into_owned();
                let buckets = FileBuckets::of(&i.files);
                let old: Option<Vec<u8>> = {
                    let mut rows = old_hashes
                        .query(rusqlite::params![self.scope, loc.stage, idx])
                        .map_err(e)?;
                    match rows.next().map_err(e)? {
                        Some(r) => Some(r.get(0).map_err(e)?),
                        None => None,
                    }
                };
                put_row
                    .execute(rusqlite::params![
                        self.scope,
                        loc.stage,
                        idx,
                        loc.line as i64,
                        row,
                        buckets.hashes
                    ])
                    .map_err(e)?;
                let old = match old {
                    Some(h) if h.len() == buckets.hashes.len() => h,
                    _ => {
                        // Another bucket count: all rewritten.
                        drop_buckets
                            .execute(rusqlite::params![self.scope, loc.stage, idx])
                            .map_err(e)?;
                        Vec::new()
                    }
                };
                for (b, raw) in buckets.raw.iter().enumerate() {
                    let h = &buckets.hashes[b * 8..b * 8 + 8];
                    if old.get(b * 8..b * 8 + 8) == Some(h) {
                        continue;
                    }
                    let z = zstd::bulk::compress(raw, 3).map_err(|source| KeyError::Compress {
                        step: loc.stage.clone(),
                        source,
                    })?;
                    put_bucket
                        .execute(rusqlite::params![self.scope, loc.stage, idx, b as i64, z])
                        .map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)
    }

    /// The causes of a miss of the step with `current` inputs.
    pub fn explain(&self, current: &KeyInputs) -> Result<Vec<MissCause>, KeyError> {
        let Some(loc) = &current.locator else {
            return Ok(vec![MissCause::FirstBuild]);
        };
        let previous = self.previous_row(loc)?;
        // File digests of another content hash differ whatever the files.
        let other_hash = |prev: &KeyInputs| {
            prev.content_hash != current.content_hash
                && (prev.files_digest.is_some() || current.files_digest.is_some())
        };
        if let Some(PreviousRow::Whole(prev) | PreviousRow::Split { inputs: prev, .. }) = &previous
            && other_hash(prev)
        {
            return Ok(vec![MissCause::ContentHashChanged]);
        }
        let causes = match previous {
            None => return Ok(vec![MissCause::FirstBuild]),
            Some(PreviousRow::Whole(prev)) => explain_miss(&prev, current),
            Some(PreviousRow::Split {
                mut inputs,
                stage,
                idx,
                hashes,
            }) => {
                let cur = FileBuckets::of(&current.files);
                if cur.hashes.len() == hashes.len() {
                    // Only the files of buckets that differ are compared
                    // (the same files in the same order as comparing all).
                    let n = hashes.len() / 8;
                    let differ: Vec<usize> = (0..n)
                        .filter(|b| hashes[b * 8..b * 8 + 8] != cur.hashes[b * 8..b * 8 + 8])
                        .collect();
                    let mut differs = vec![false; n];
                    for &b in &differ {
                        differs[b] = true;
                    }
                    if self
                        .read_buckets(&stage, idx, &differ, &mut inputs.files)?
                        .is_none()
                    {
                        return Ok(vec![MissCause::FirstBuild]);
                    }
                    let subset = KeyInputs {
                        files: current
                            .files
                            .iter()
                            .filter(|(p, _)| differs[FileBuckets::bucket_of(p, n)])
                            .map(|(p, d)| (p.clone(), d.clone()))
                            .collect(),
                        kind: current.kind.clone(),
                        definition: current.definition.clone(),
                        instruction: current.instruction.clone(),
                        locator: current.locator.clone(),
                        parents: current.parents.clone(),
                        vars: current.vars.clone(),
                        image: current.image.clone(),
                        files_digest: current.files_digest.clone(),
                        content_hash: current.content_hash.clone(),
                    };
                    explain_miss(&inputs, &subset)
                } else {
                    let all: Vec<usize> = (0..hashes.len() / 8).collect();
                    if self
                        .read_buckets(&stage, idx, &all, &mut inputs.files)?
                        .is_none()
                    {
                        return Ok(vec![MissCause::FirstBuild]);
                    }
                    explain_miss(&inputs, current)
                }
            }
        };
        Ok(if causes.is_empty() {
            vec![MissCause::RecordMissing]
        } else {
            causes
        })
    }
}

/// Remembered content digests (see `runner::content`): an id naming a
/// filesystem and a selection of files in it -> the selection's digest.
/// In `statcache.db` under the store root, next to the key history.
#[derive(Debug)]
pub struct ContentMemo {
    db: crate::context::CacheDb,
    path: PathBuf,
}

impl ContentMemo {
    /// Open (creating) the memo of the store at `store_root`.
    pub fn open(store_root: &Path) -> Result<Self, KeyError> {
        let db = crate::context::CacheDb::open(store_root)
            .map_err(|(path, source)| KeyError::History { path, source })?;
        ContentMemo::with_db(db)
    }

    /// The memo in `db` (shared with the build's other users; its table
    /// is made when `db` is opened).
    pub fn with_db(db: crate::context::CacheDb) -> Result<Self, KeyError> {
        let path = db.path().to_owned();
        Ok(Self { db, path })
    }

    /// The digest remembered for `id`.
    pub fn get(&self, id: &str) -> Result<Option<String>, KeyError> {
        let e = |source| KeyError::History {
            path: self.path.clone(),
            source,
        };
        let conn = self.db.conn();
        let mut stmt = conn
            .prepare_cached("SELECT digest FROM content_digest WHERE id = ?1")
            .map_err(e)?;
        let mut rows = stmt.query([id]).map_err(e)?;
        match rows.next().map_err(e)? {
            Some(row) => Ok(Some(row.get(0).map_err(e)?)),
            None => Ok(None),
        }
    }

    /// Remember `digest` for `id`.
    pub fn put(&self, id: &str, digest: &str) -> Result<(), KeyError> {
        self.db
            .conn()
            .execute(
                "INSERT OR REPLACE INTO content_digest (id, digest) VALUES (?1, ?2)",
                [id, digest],
            )
            .map(|_| ())
            .map_err(|source| KeyError::History {
                path: self.path.clone(),
                source,
            })
    }
}

/// The key of `inputs` with its parents' keys replaced by `parents`
/// (same order as [`KeyInputs::parents`]), for keys that depend on what
/// the inputs produced (a `COPY --from` keyed by content, and everything
/// after it).
pub fn key_with_parents(inputs: &KeyInputs, parents: &[CacheKey]) -> CacheKey {
    let mut i = inputs.clone();
    for (p, k) in i.parents.iter_mut().zip(parents) {
        p.key = k.clone();
    }
    i.key()
}

#[cfg(test)]
#[path = "key_tests.rs"]
mod tests;
