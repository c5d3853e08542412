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
    /// (it was pruned).
    RecordMissing,
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
            MissCause::RecordMissing => write!(f, "no cached result (pruned)"),
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
                (sum.file_digests(), Some(sum.digest))
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

/// The stored form of `inputs`: per-file digests shortened, JSON, zstd.
/// A COPY of thousands of files is recorded on every build that changes
/// one, so this keeps the row small.
fn history_row(inputs: &KeyInputs) -> Result<Vec<u8>, serde_json::Error> {
    let mut slim = inputs.clone();
    for d in slim.files.values_mut() {
        d.truncate(HISTORY_DIGEST_LEN);
    }
    let json = serde_json::to_vec(&slim)?;
    Ok(zstd::encode_all(json.as_slice(), 3).unwrap_or(json))
}

/// Reads a stored row: zstd-compressed JSON, or plain JSON (older rows).
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

/// The inputs of the last build of each step, in `statcache.db` under the
/// store root, so the next build can explain its misses. Scoped by the
/// Dockerfile and context paths; a step is found by stage and instruction
/// index, or else by its Dockerfile line.
#[derive(Debug)]
pub struct KeyHistory {
    conn: rusqlite::Connection,
    path: PathBuf,
    scope: String,
}

impl KeyHistory {
    /// Open the history for builds of `scope` (e.g. the Dockerfile's and
    /// the context's absolute paths joined).
    pub fn open(store_root: &Path, scope: &str) -> Result<Self, KeyError> {
        let path = store_root.join("statcache.db");
        let e = |source| KeyError::History {
            path: path.clone(),
            source,
        };
        let conn = crate::context::open_cache_db(&path).map_err(e)?;
        // `key_history2` holds compressed rows ([`history_row`]); the older
        // `key_history` (plain JSON) is left to older kiln versions, which
        // would fail on a compressed row.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS key_history2 (
                scope TEXT NOT NULL,
                stage TEXT NOT NULL,
                idx INTEGER NOT NULL,
                line INTEGER NOT NULL,
                inputs BLOB NOT NULL,
                PRIMARY KEY (scope, stage, idx)
            );",
        )
        .map_err(e)?;
        Ok(Self {
            conn,
            path,
            scope: scope.to_owned(),
        })
    }

    /// The previous inputs of the step at `loc`.
    pub fn previous(&self, loc: &StepLocator) -> Result<Option<KeyInputs>, KeyError> {
        let e = |source| KeyError::History {
            path: self.path.clone(),
            source,
        };
        let idx = loc.index.map_or(-1, |i| i as i64);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT inputs FROM key_history2 WHERE scope = ?1 AND
                 ((stage = ?2 AND idx = ?3) OR line = ?4)
                 ORDER BY (stage = ?2 AND idx = ?3) DESC LIMIT 1",
            )
            .map_err(e)?;
        let mut rows = stmt
            .query(rusqlite::params![
                self.scope,
                loc.stage,
                idx,
                loc.line as i64
            ])
            .map_err(e)?;
        match rows.next().map_err(e)? {
            // An unreadable record (older format) is as good as none.
            Some(row) => Ok(parse_history_row(row.get_ref(0).map_err(e)?)),
            None => Ok(None),
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
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    // Unchanged rows are not rewritten: a no-op rebuild
                    // writes nothing (a COPY's row lists all its files).
                    "INSERT INTO key_history2 (scope, stage, idx, line, inputs)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (scope, stage, idx) DO UPDATE
                     SET line = excluded.line, inputs = excluded.inputs
                     WHERE line != excluded.line OR inputs != excluded.inputs",
                )
                .map_err(e)?;
            for i in inputs {
                let Some(loc) = &i.locator else { continue };
                let json = history_row(i).map_err(|source| KeyError::Serialize {
                    step: loc.stage.clone(),
                    source,
                })?;
                stmt.execute(rusqlite::params![
                    self.scope,
                    loc.stage,
                    loc.index.map_or(-1, |i| i as i64),
                    loc.line as i64,
                    json
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// The causes of a miss of the step with `current` inputs.
    pub fn explain(&self, current: &KeyInputs) -> Result<Vec<MissCause>, KeyError> {
        let Some(loc) = &current.locator else {
            return Ok(vec![MissCause::FirstBuild]);
        };
        Ok(match self.previous(loc)? {
            Some(prev) => {
                let c = explain_miss(&prev, current);
                if c.is_empty() {
                    vec![MissCause::RecordMissing]
                } else {
                    c
                }
            }
            None => vec![MissCause::FirstBuild],
        })
    }
}

impl Drop for KeyHistory {
    fn drop(&mut self) {
        kiln_cache::fold_wal(&self.conn, &self.path);
    }
}

/// Remembered content digests (see `runner::content`): an id naming a
/// filesystem and a selection of files in it -> the selection's digest.
/// In `statcache.db` under the store root, next to the key history.
#[derive(Debug)]
pub struct ContentMemo {
    conn: rusqlite::Connection,
    path: PathBuf,
}

impl ContentMemo {
    /// Open (creating) the memo of the store at `store_root`.
    pub fn open(store_root: &Path) -> Result<Self, KeyError> {
        let path = store_root.join("statcache.db");
        let e = |source| KeyError::History {
            path: path.clone(),
            source,
        };
        let conn = crate::context::open_cache_db(&path).map_err(e)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS content_digest (
                id TEXT PRIMARY KEY NOT NULL,
                digest TEXT NOT NULL
            );",
        )
        .map_err(e)?;
        Ok(Self { conn, path })
    }

    /// The digest remembered for `id`.
    pub fn get(&self, id: &str) -> Result<Option<String>, KeyError> {
        let e = |source| KeyError::History {
            path: self.path.clone(),
            source,
        };
        let mut stmt = self
            .conn
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
        self.conn
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
