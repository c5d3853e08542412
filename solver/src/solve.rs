//! The scheduler: walk the build graph on tokio, inputs before consumers,
//! at most `jobs` steps at once; a step whose key is in the cache is not
//! run; steps with the same key run once and share the result.
//!
//! What a step does is the [`StepRunner`]'s business (the sandbox for RUN,
//! file ops for COPY, the store for lookups); the scheduler owns ordering,
//! parallelism, deduplication, progress events and miss explanations.
//! Dropping the future returned by [`solve`] aborts the running steps
//! (Ctrl-C), so a runner must clean up in `Drop`.
//!
//! Keys are final only here: a step that reads files from another stage
//! (`COPY --from`, `RUN --mount=type=bind,from=`) or a URL without
//! `--checksum` is keyed by that content ([`StepRunner::content_digest`],
//! computed as a task beside the running steps), and every step after it
//! by the keys its inputs really had ("effective" keys). A config-only
//! step (ENV, LABEL, ...) has its parent's key and is reported CACHED only
//! when its parent was a hit and its instruction is unchanged.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use crate::event::Progress;
use crate::graph::{
    BuildGraph, CopySource, Edge, FileOp, InputRef, Op, SourceOp, Vertex, VertexId,
};
use crate::key::{CacheKey, KeyError, KeyHistory, MissCause, VertexKey, key_with_parents};

/// One step handed to the runner.
#[derive(Debug, Clone)]
pub struct Step {
    /// The vertex id (its index is the event id).
    pub id: VertexId,
    /// The vertex.
    pub vertex: Vertex,
    /// Its key.
    pub key: CacheKey,
}

/// Executes steps and looks up cached results.
pub trait StepRunner: Send + Sync + 'static {
    /// A step's result (a snapshot id, say).
    type Output: Clone + Send + Sync + 'static;
    /// A step's failure.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The cached result for `key`, if any.
    fn lookup(
        &self,
        step: &Step,
    ) -> impl Future<Output = Result<Option<Self::Output>, Self::Error>> + Send;

    /// The digest of the content `step` reads from its non-parent inputs,
    /// when its key should cover that content rather than those inputs'
    /// keys (`COPY --from=<stage>`: exactly the files it copies), or from
    /// the network (`ADD <url>` without `--checksum`); `None`
    /// keeps the key computed from the graph. `inputs` as for
    /// [`StepRunner::run`].
    fn content_digest(
        &self,
        _step: &Step,
        _inputs: &[Self::Output],
    ) -> impl Future<Output = Result<Option<String>, Self::Error>> + Send {
        async { Ok(None) }
    }

    /// Whether [`StepRunner::lookup`] would find `step` (cheaply, fetching
    /// nothing): lets the scheduler leave out stages nothing needs.
    fn would_hit(&self, _step: &Step) -> bool {
        false
    }

    /// A content digest (see [`StepRunner::content_digest`]) known without
    /// the inputs' files, by [`content_lookup_id`] (an imported cache).
    fn known_content(&self, _id: &str) -> Option<String> {
        None
    }

    /// Run `step` on the results of its inputs (in [`BuildGraph::inputs`]
    /// order: parent first) and store the result under its key.
    fn run(
        &self,
        step: Step,
        inputs: Vec<Self::Output>,
        progress: Progress,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;
}

/// Scheduler options.
#[derive(Debug, Clone)]
pub struct SolveOptions {
    /// Steps at once (`--jobs`, default: the number of cores).
    pub jobs: usize,
    /// `--no-cache`: run every step.
    pub no_cache: bool,
}

impl Default for SolveOptions {
    fn default() -> Self {
        Self {
            jobs: std::thread::available_parallelism().map_or(1, usize::from),
            no_cache: false,
        }
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum SolveError<E: std::error::Error + Send + Sync + 'static> {
    /// A step failed.
    #[error("{name} failed")]
    Step {
        /// The step's display name.
        name: String,
        /// The vertex.
        id: VertexId,
        /// Why.
        #[source]
        source: Arc<E>,
    },
    /// Explaining a miss failed (the key history database).
    #[error("cannot read the key history")]
    History(#[source] KeyError),
    /// A step's task panicked or was cancelled.
    #[error("{name} was aborted")]
    Aborted {
        /// The step's display name.
        name: String,
    },
    /// A step expected in the cache, so that the stages only it reads
    /// were left out, was not found there when it was looked up.
    #[error(
        "{name} was expected in the cache (the stages it reads were left out) but is not there any more\nhint: build again"
    )]
    CacheChanged {
        /// The step's display name.
        name: String,
    },
    /// The keys do not match the graph.
    #[error("no key for vertex {id}")]
    MissingKey {
        /// The vertex index.
        id: usize,
    },
}

/// The outcome of a build.
#[derive(Debug)]
pub struct Solved<O> {
    /// Every vertex's result.
    pub outputs: HashMap<VertexId, O>,
    /// Steps that ran (config-only steps never count).
    pub ran: usize,
    /// Steps found in the cache (or sharing a key with one that ran).
    pub cached: usize,
    /// The key each vertex ran (or was found) under: its effective key
    /// (what `--cache-to` exports).
    pub keys: HashMap<VertexId, CacheKey>,
    /// The content digests steps were keyed by, by [`content_lookup_id`].
    pub contents: std::collections::BTreeMap<String, String>,
    /// Vertices left out: in stages the target does not build `FROM`,
    /// needed by nothing but cache hits.
    pub skipped: usize,
}

/// A finished step: its key and result (`Err(None)`: a step whose inputs
/// were left out, expected in the cache, was not found there).
type Done<O, E> = (CacheKey, Result<(O, bool), Option<Arc<E>>>);

/// Build `graph`: every vertex, with at most `opts.jobs` steps at once.
pub async fn solve<R: StepRunner>(
    graph: &BuildGraph,
    keys: &[VertexKey],
    runner: Arc<R>,
    progress: Progress,
    history: Option<&KeyHistory>,
    opts: &SolveOptions,
) -> Result<Solved<R::Output>, SolveError<R::Error>> {
    let jobs = opts.jobs.max(1);
    let key_of: HashMap<VertexId, &VertexKey> = keys.iter().map(|k| (k.vertex, k)).collect();
    let order = graph.topo_order();
    for &v in &order {
        if !key_of.contains_key(&v) {
            return Err(SolveError::MissingKey { id: v.index() });
        }
    }
    let pruned = if opts.no_cache {
        Pruned::default()
    } else {
        prune(graph, &key_of, &*runner, &order)
    };
    let skip = &pruned.skip;
    let mut pending_inputs: HashMap<VertexId, usize> = HashMap::new();
    for &v in &order {
        if skip.contains(&v) {
            continue;
        }
        let n = graph
            .inputs(v)
            .iter()
            .filter(|(p, _)| !skip.contains(p))
            .count();
        pending_inputs.insert(v, n);
    }
    let mut ready: std::collections::VecDeque<VertexId> = order
        .iter()
        .copied()
        .filter(|v| pending_inputs.get(v) == Some(&0))
        .collect();
    let mut outputs: HashMap<VertexId, R::Output> = HashMap::new();
    let mut by_key: HashMap<CacheKey, R::Output> = HashMap::new();
    // Key in flight -> vertices waiting for it (the first one runs it).
    let mut in_flight: HashMap<CacheKey, Vec<(VertexId, Instant)>> = HashMap::new();
    let mut tasks: JoinSet<Done<R::Output, R::Error>> = JoinSet::new();
    let mut task_vertex: HashMap<tokio::task::Id, VertexId> = HashMap::new();
    let (mut ran, mut cached) = (0usize, 0usize);
    // Vertices whose result came from the cache (for config-only steps,
    // which are CACHED only when the step they follow was).
    let mut hit: std::collections::HashSet<VertexId> = std::collections::HashSet::new();
    // The keys steps ran (or were found) under: the computed key, unless
    // an input's content or an input's own effective key changed it.
    let mut effective: HashMap<VertexId, CacheKey> = HashMap::new();
    // Left-out vertices: their consumers are keyed by what they would be.
    for v in skip {
        if let Some(k) = pruned.keys.get(v) {
            effective.insert(*v, k.clone());
        }
    }
    let mut contents: std::collections::BTreeMap<String, String> =
        std::collections::BTreeMap::new();

    // Content digests being computed (they count against `jobs`), and
    // steps whose digest is known, waiting to be started.
    let mut keying: JoinSet<Keyed<R::Error>> = JoinSet::new();
    let mut keyed: std::collections::VecDeque<(VertexId, Instant, CacheKey)> =
        std::collections::VecDeque::new();

    loop {
        // Start what can start.
        loop {
            let (v, t, key) = if let Some(k) = keyed.pop_front() {
                k
            } else if tasks.len() + keying.len() < jobs {
                let Some(v) = ready.pop_front() else { break };
                let vert = &graph.graph[v];
                let t = progress.started(v.index(), &vert.name, vert.span);
                if let Some(d) = pruned.contents.get(&v)
                    && graph.inputs(v).iter().any(|(p, _)| skip.contains(p))
                {
                    // Keyed by a content digest known without the
                    // left-out stage's files.
                    let key = key_for(graph, v, key_of[&v], &effective, Some(d.clone()));
                    contents.insert(
                        content_lookup_id(graph, v, key_of[&v], &effective),
                        d.clone(),
                    );
                    keyed.push_back((v, t, key));
                    continue;
                }
                if needs_content(graph, v) {
                    // Checksumming what a step reads from another stage can
                    // take a while: do it beside the running steps.
                    let inputs: Vec<R::Output> = graph
                        .inputs(v)
                        .iter()
                        .filter_map(|(i, _)| outputs.get(i).cloned())
                        .collect();
                    let step = Step {
                        id: v,
                        vertex: vert.clone(),
                        key: key_of[&v].key.clone(),
                    };
                    let runner = Arc::clone(&runner);
                    keying.spawn(async move {
                        let d = runner.content_digest(&step, &inputs).await;
                        (v, t, d)
                    });
                    continue;
                }
                (v, t, key_for(graph, v, key_of[&v], &effective, None))
            } else {
                break;
            };
            let vk = key_of[&v];
            let vert = &graph.graph[v];
            let inputs: Vec<R::Output> = graph
                .inputs(v)
                .iter()
                .filter_map(|(i, _)| outputs.get(i).cloned())
                .collect();
            effective.insert(v, key.clone());
            if let Some(out) = by_key.get(&key) {
                // A config-only step shares its parent's key and result: it
                // is CACHED when its parent was, else just done.
                let was_hit = match &vert.op {
                    Op::Config(_) => {
                        let parent_hit = graph
                            .inputs(v)
                            .first()
                            .is_some_and(|(p, _)| hit.contains(p));
                        // An edited (or new) config instruction after cached
                        // steps is done, not cached, and says why.
                        match history {
                            Some(h) if parent_hit => {
                                let causes = h.explain(&vk.inputs).map_err(SolveError::History)?;
                                // Unchanged, or never built here (a hit from
                                // an imported cache, another checkout).
                                let same = causes == [MissCause::RecordMissing]
                                    || causes == [MissCause::FirstBuild];
                                if !same {
                                    progress.miss(v.index(), causes);
                                }
                                same
                            }
                            _ => parent_hit,
                        }
                    }
                    _ => true,
                };
                // (A config step that is not cached ran nothing: it is
                // counted neither as run nor as cached.)
                if was_hit {
                    progress.cached(v.index());
                    cached += 1;
                    hit.insert(v);
                }
                progress.finished(v.index(), t);
                outputs.insert(v, out.clone());
                release(graph, v, &mut pending_inputs, &mut ready);
                continue;
            }
            if let Some(waiters) = in_flight.get_mut(&key) {
                waiters.push((v, t));
                continue;
            }
            let causes = if opts.no_cache {
                vec![MissCause::NoCache]
            } else {
                let causes = match history {
                    Some(h) => h.explain(&vk.inputs).map_err(SolveError::History)?,
                    None => vec![MissCause::FirstBuild],
                };
                if key == vk.key {
                    causes
                } else {
                    stage_files_causes(graph, v, causes)
                }
            };
            in_flight.insert(key.clone(), vec![(v, t)]);
            let step = Step {
                id: v,
                vertex: vert.clone(),
                key,
            };
            let runner = Arc::clone(&runner);
            let p = progress.clone();
            let no_cache = opts.no_cache;
            let left_out = graph.inputs(v).iter().any(|(i, _)| skip.contains(i));
            let handle = tasks.spawn(async move {
                let key = step.key.clone();
                if !no_cache {
                    match runner.lookup(&step).await {
                        Ok(Some(out)) => return (key, Ok((out, false))),
                        Ok(None) if left_out => return (key, Err(None)),
                        Ok(None) => {}
                        Err(e) => return (key, Err(Some(Arc::new(e)))),
                    }
                }
                p.miss(step.id.index(), causes);
                kiln_cache::timing::mark("step: looked up, missed");
                let r = runner.run(step, inputs, p).await;
                (key, r.map(|o| (o, true)).map_err(|e| Some(Arc::new(e))))
            });
            task_vertex.insert(handle.id(), v);
        }
        if tasks.is_empty() && keying.is_empty() {
            break;
        }
        let joined = tokio::select! {
            Some(k) = keying.join_next(), if !keying.is_empty() => {
                match k {
                    Ok((v, t, Ok(d))) => {
                        if let Some(d) = &d {
                            contents.insert(
                                content_lookup_id(graph, v, key_of[&v], &effective),
                                d.clone(),
                            );
                        }
                        let key = key_for(graph, v, key_of[&v], &effective, d);
                        keyed.push_back((v, t, key));
                    }
                    Ok((v, _, Err(e))) => {
                        tasks.abort_all();
                        keying.abort_all();
                        let e = Arc::new(e);
                        progress.failed(v.index(), &*e);
                        return Err(SolveError::Step {
                            name: graph.graph[v].name.clone(),
                            id: v,
                            source: e,
                        });
                    }
                    Err(_) => {
                        tasks.abort_all();
                        keying.abort_all();
                        return Err(SolveError::Aborted {
                            name: "a content checksum".to_owned(),
                        });
                    }
                }
                continue;
            }
            Some(j) = tasks.join_next(), if !tasks.is_empty() => j,
        };
        let (key, result) = match joined {
            Ok(d) => d,
            Err(e) => {
                tasks.abort_all();
                keying.abort_all();
                let name = task_vertex
                    .get(&e.id())
                    .map_or_else(String::new, |v| graph.graph[*v].name.clone());
                return Err(SolveError::Aborted { name });
            }
        };
        let waiters = in_flight.remove(&key).unwrap_or_default();
        match result {
            Ok((out, did_run)) => {
                for (i, (v, t)) in waiters.into_iter().enumerate() {
                    if i == 0 && did_run {
                        ran += 1;
                    } else {
                        progress.cached(v.index());
                        cached += 1;
                        hit.insert(v);
                    }
                    progress.finished(v.index(), t);
                    outputs.insert(v, out.clone());
                    release(graph, v, &mut pending_inputs, &mut ready);
                }
                by_key.insert(key, out);
            }
            Err(e) => {
                // Stop everything else: dropping the tasks cancels them.
                tasks.abort_all();
                keying.abort_all();
                let (v, _) = waiters
                    .first()
                    .copied()
                    .unwrap_or((VertexId::new(0), Instant::now()));
                let Some(e) = e else {
                    let err = SolveError::<R::Error>::CacheChanged {
                        name: graph.graph[v].name.clone(),
                    };
                    progress.failed(v.index(), &err);
                    return Err(err);
                };
                progress.failed(v.index(), &*e);
                return Err(SolveError::Step {
                    name: graph.graph[v].name.clone(),
                    id: v,
                    source: e,
                });
            }
        }
    }
    Ok(Solved {
        outputs,
        ran,
        cached,
        keys: effective,
        contents,
        skipped: skip.len(),
    })
}

/// The id under which the content digest of `v` (a step keyed by content,
/// see [`StepRunner::content_digest`]) is remembered across machines: its
/// static key and its inputs' effective keys, which a machine without the
/// inputs' files can compute.
pub fn content_lookup_id(
    graph: &BuildGraph,
    v: VertexId,
    vk: &VertexKey,
    effective: &HashMap<VertexId, CacheKey>,
) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in std::iter::once(vk.key.0.as_str()).chain(
        graph
            .inputs(v)
            .iter()
            .map(|(p, _)| effective.get(p).map_or("", |k| k.0.as_str())),
    ) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    format!("inputs:sha256:{}", crate::context::hex(&h.finalize()))
}

/// What the scheduler leaves out, and the keys it expects.
#[derive(Debug, Default)]
struct Pruned {
    /// Vertices not run: nothing needs them.
    skip: std::collections::HashSet<VertexId>,
    /// Expected effective keys.
    keys: HashMap<VertexId, CacheKey>,
    /// Content digests known without files, by vertex.
    contents: HashMap<VertexId, String>,
}

/// Leaves out the steps of stages that nothing needs: with the keys the
/// steps will have (content digests from [`StepRunner::known_content`]) and
/// the hits [`StepRunner::would_hit`] expects, walks from the target back,
/// stopping at hits; a step of a stage other than the target's (and the
/// stages it is built `FROM`) that is not reached and would miss is not
/// run (BuildKit's lazy solve: a `COPY --from=build` found in the cache
/// does not build `build`).
fn prune<R: StepRunner>(
    graph: &BuildGraph,
    key_of: &HashMap<VertexId, &VertexKey>,
    runner: &R,
    order: &[VertexId],
) -> Pruned {
    let mut out = Pruned::default();
    let Some(target) = graph.target_stage() else {
        return out;
    };
    let mut unknown: std::collections::HashSet<VertexId> = std::collections::HashSet::new();
    let mut hit: std::collections::HashSet<VertexId> = std::collections::HashSet::new();
    for &v in order {
        let vk = key_of[&v];
        let inputs = graph.inputs(v);
        if inputs.iter().any(|(p, _)| unknown.contains(p)) {
            unknown.insert(v);
            continue;
        }
        let content = if needs_content(graph, v) {
            let id = content_lookup_id(graph, v, vk, &out.keys);
            match runner.known_content(&id) {
                Some(d) => {
                    out.contents.insert(v, d.clone());
                    Some(d)
                }
                None => {
                    unknown.insert(v);
                    continue;
                }
            }
        } else {
            None
        };
        let key = key_for(graph, v, vk, &out.keys, content);
        let is_hit = match &graph.graph[v].op {
            Op::Config(_) => inputs.first().is_some_and(|(p, _)| hit.contains(p)),
            _ => runner.would_hit(&Step {
                id: v,
                vertex: graph.graph[v].clone(),
                key: key.clone(),
            }),
        };
        if is_hit {
            hit.insert(v);
        }
        out.keys.insert(v, key);
    }
    if hit.is_empty() {
        return out;
    }
    // The target's stage and the stages it is built FROM are always built.
    let mut kept_stages = std::collections::HashSet::new();
    let mut cur = Some(target.index);
    while let Some(i) = cur {
        if !kept_stages.insert(i) {
            break;
        }
        cur = match graph.stage(i).map(|s| &s.base) {
            Some(crate::graph::StageBase::Stage { index }) => Some(*index),
            _ => None,
        };
    }
    let mut needed: std::collections::HashSet<VertexId> = std::collections::HashSet::new();
    let mut stack: Vec<VertexId> = order
        .iter()
        .copied()
        .filter(|v| {
            graph.graph[*v]
                .stage
                .is_none_or(|s| kept_stages.contains(&s))
        })
        .collect();
    while let Some(v) = stack.pop() {
        if !needed.insert(v) {
            continue;
        }
        let stops = hit.contains(&v) && !matches!(graph.graph[v].op, Op::Config(_));
        if !stops {
            stack.extend(graph.inputs(v).into_iter().map(|(p, _)| p));
        }
    }
    out.skip = order
        .iter()
        .copied()
        .filter(|v| !needed.contains(v) && !hit.contains(v) && out.keys.contains_key(v))
        .collect();
    out
}

/// A content digest being computed: the step, when it started, the digest.
type Keyed<E> = (VertexId, Instant, Result<Option<String>, E>);

/// Whether `v`'s key covers content read outside the graph's keys (see
/// [`StepRunner::content_digest`]): a `COPY --from=<stage>`, a `RUN` with
/// bind mounts of paths in stages, an `ADD` of a URL without `--checksum`.
/// Also with `--no-cache`: its results are recorded under the keys the
/// next build looks up.
fn needs_content(graph: &BuildGraph, v: VertexId) -> bool {
    content_stages(graph, v).is_some()
        || matches!(&graph.graph[v].op, Op::File(FileOp::Copy(c))
            if c.checksum.is_none()
                && c.sources.iter().any(|s| matches!(s, CopySource::Url { .. })))
}

/// The stages (their last vertices) whose files `v` is keyed by instead of
/// their keys: the `--from` of a COPY, the stages of a RUN's bind mounts.
/// A RUN that mounts a whole stage (no `source=`, or `/`) keeps the
/// stages' keys: checksumming a whole filesystem (a toolchain image) on
/// every change would cost more than it saves.
fn content_stages(graph: &BuildGraph, v: VertexId) -> Option<Vec<VertexId>> {
    let last = |from: &InputRef| match from {
        InputRef::Stage { index } => graph.stage(*index).map(|s| s.last),
        _ => None,
    };
    match &graph.graph[v].op {
        Op::File(FileOp::Copy(c)) => last(&c.from).map(|l| vec![l]),
        Op::Exec(r) => {
            let mut out = Vec::new();
            for m in &r.mounts {
                if m.kind != kiln_parser::MountType::Bind {
                    continue;
                }
                let Some(from @ InputRef::Stage { .. }) = &m.from else {
                    continue;
                };
                if !is_sub_path(m.source.as_deref()) {
                    return None;
                }
                out.push(last(from)?);
            }
            (!out.is_empty()).then_some(out)
        }
        _ => None,
    }
}

/// Whether a bind mount's `source=` names less than the whole filesystem.
pub(crate) fn is_sub_path(source: Option<&str>) -> bool {
    source.is_some_and(|s| !s.trim_matches('/').is_empty() && s.trim_matches('/') != ".")
}

/// The key `v` runs under: the key computed from the graph, recomputed
/// with its inputs' effective keys when one differs, and with `content`
/// (the runner's content digest): in place of the stages' keys for a step
/// reading from stages, added for an `ADD` of URLs. A config-only step
/// keeps its parent's (effective) key.
fn key_for(
    graph: &BuildGraph,
    v: VertexId,
    vk: &VertexKey,
    effective: &HashMap<VertexId, CacheKey>,
    content: Option<String>,
) -> CacheKey {
    // The inputs that are in the key, in the order of `vk.inputs.parents`.
    let keyed: Vec<(VertexId, Edge)> = graph
        .inputs(v)
        .into_iter()
        .filter(|(p, _)| !matches!(graph.graph[*p].op, Op::Source(SourceOp::Context)))
        .collect();
    let mut parents: Vec<CacheKey> = keyed
        .iter()
        .zip(&vk.inputs.parents)
        .map(|((p, _), static_parent)| {
            effective
                .get(p)
                .cloned()
                .unwrap_or_else(|| static_parent.key.clone())
        })
        .collect();
    if let Op::Config(_) = graph.graph[v].op {
        return parents.first().cloned().unwrap_or_else(|| vk.key.clone());
    }
    let mut changed = parents
        .iter()
        .zip(&vk.inputs.parents)
        .any(|(k, p)| *k != p.key);
    let mut extra = None;
    if let Some(d) = content {
        if let Some(stages) = content_stages(graph, v) {
            // Only those stages: an image input keeps its key (its
            // digest), the parent and any other input too.
            for ((p, edge), k) in keyed.iter().zip(parents.iter_mut()) {
                if *edge == Edge::Source && stages.contains(p) {
                    *k = CacheKey(format!("content:{d}"));
                }
            }
        } else {
            extra = Some(d);
        }
        changed = true;
    }
    match (changed, extra) {
        (_, Some(d)) => {
            let mut i = vk.inputs.clone();
            i.files_digest = Some(format!(
                "{}+urls:{d}",
                i.files_digest.as_deref().unwrap_or("")
            ));
            key_with_parents(&i, &parents)
        }
        (true, None) => key_with_parents(&vk.inputs, &parents),
        (false, None) => vk.key.clone(),
    }
}

/// For a step keyed by the content it reads from stages: a changed stage
/// is a change of those files (had they been the same, it would have hit).
fn stage_files_causes(graph: &BuildGraph, v: VertexId, causes: Vec<MissCause>) -> Vec<MissCause> {
    let Some(stages) = content_stages(graph, v) else {
        return causes;
    };
    let stages: Vec<String> = stages
        .into_iter()
        .map(|p| graph.graph[p].name.clone())
        .collect();
    causes
        .into_iter()
        .map(|c| match c {
            MissCause::ParentChanged { name } if stages.contains(&name) => {
                MissCause::StageFilesChanged { name }
            }
            c => c,
        })
        .collect()
}

/// `v` is done: its consumers have one input less to wait for.
fn release(
    graph: &BuildGraph,
    v: VertexId,
    pending: &mut HashMap<VertexId, usize>,
    ready: &mut std::collections::VecDeque<VertexId>,
) {
    let mut consumers: Vec<VertexId> = graph
        .graph
        .neighbors_directed(v, petgraph::Direction::Outgoing)
        .collect();
    consumers.sort();
    consumers.dedup();
    for c in consumers {
        if let Some(n) = pending.get_mut(&c) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                ready.push_back(c);
            }
        }
    }
}

#[cfg(test)]
#[path = "solve_tests.rs"]
mod tests;
