//! The concrete [`StepRunner`]: RUN in the executor's sandbox, COPY/ADD/WORKDIR
//! through [`crate::fileop`] on a mounted overlay, config ops as no-ops, and
//! every result a chain of layers in the [`kiln_cache::Store`] with a cache
//! record under the step's key.
//!
//! A step's output is a [`Chain`]: the layers of its filesystem, lowest
//! first. A filesystem is never copied: a step mounts (or has the executor
//! mount) an overlay whose lowers are the chain's snapshot directories and
//! whose upper is a fresh directory under the store's `tmp/`; the upper
//! becomes the step's new layer.
//!
//! Mounts the runner makes itself (for file ops and stage binds) are held
//! by [`MergedMount`] guards that unmount on drop, so a failure or a
//! cancelled build leaves nothing mounted.

mod content;
mod hide;
mod mount;
mod pending;
mod reuse;
mod run;
mod ssh;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kiln_cache::{CacheResult, Digest, KnownFiles, LayerInfo, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::event::Progress;
use crate::fileop::{self, FileOpError};
use crate::graph::{BuildGraph, Edge, FileOp, InputRef, Op, SourceOp, VertexId};
use crate::remote_cache::{ImportedCache, RemoteCacheError};
use crate::solve::{Step, StepRunner};

pub use mount::{MergedMount, MountError};
pub use pending::PendingTop;
pub use reuse::{
    clear_memos as clear_copy_memos, clear_orphaned_prepared as clear_orphaned_copies,
    clear_prepared as clear_prepared_copies, has_prepared as has_prepared_copies,
    prepared_usage as prepared_copies_usage,
};
pub use run::RunFailure;

/// A filesystem: its layers, lowest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// The layers (diffIDs and uncompressed sizes).
    pub layers: Vec<ChainLayer>,
    /// The top layer, while it is being committed (see [`pending`]); its
    /// entry in `layers` is a placeholder until [`Chain::settled`].
    #[serde(skip)]
    pub pending: Option<PendingTop>,
}

/// One layer of a [`Chain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLayer {
    /// The diffID.
    pub diff_id: Digest,
    /// Uncompressed size.
    pub size: u64,
}

impl Chain {
    /// The layers as the store's [`LayerInfo`]s.
    pub fn layer_infos(&self) -> Vec<LayerInfo> {
        self.layers
            .iter()
            .map(|l| LayerInfo {
                diff_id: l.diff_id.clone(),
                size: l.size,
            })
            .collect()
    }

    fn with(&self, layer: LayerInfo) -> Chain {
        let mut c = self.clone();
        c.layers.push(ChainLayer {
            diff_id: layer.diff_id,
            size: layer.size,
        });
        c
    }
}

/// A secret given with `--secret`: where its value is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `src=FILE`.
    File(PathBuf),
    /// `env=VAR`: the value of an environment variable of kiln itself.
    Env(String),
}

/// The network of RUN steps without `--network` (`kiln build --network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultNetwork {
    /// No network (only `lo`).
    #[default]
    None,
    /// The host's network.
    Host,
}

/// What the runner needs besides the graph.
#[derive(Debug, Clone, Default)]
pub struct RunnerOptions {
    /// The build context directory.
    pub context: PathBuf,
    /// The context's `.dockerignore`.
    pub ignore: Option<kiln_parser::PatternMatcher>,
    /// `--secret`s by id.
    pub secrets: BTreeMap<String, SecretSource>,
    /// `--ssh`: the agent sockets by id.
    pub ssh: BTreeMap<String, PathBuf>,
    /// `--network` for RUN.
    pub network: DefaultNetwork,
    /// `SOURCE_DATE_EPOCH`: layer mtimes are clamped to it.
    pub source_date_epoch: Option<i64>,
    /// The context's regular files as the key checksums found them (see
    /// [`crate::context::BuildContext::with_seen_files`]).
    pub context_files: Arc<kiln_cache::FileMap<String, crate::context::SeenFile>>,
}

/// What a commit does with the new layer and its small files' recorded
/// contents once the layer is hashed (see `StoreRunner::commit_gated`).
type OnHashed = Box<dyn FnOnce(&StoreRunner, &LayerInfo, Option<KnownFiles>) + Send>;

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The store failed.
    #[error("store: {what}")]
    Store {
        /// What the runner was doing.
        what: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// A base image is not in the store.
    #[error(
        "image `{reference}` is not in the local store\nhint: `kiln pull` it, or make it with `kiln import` or `kiln load`, then build again (or build with `--pull=missing`)"
    )]
    ImageNotFound {
        /// The reference.
        reference: String,
        /// Why the lookup failed.
        #[source]
        source: Box<StoreError>,
    },
    /// A file op failed.
    #[error("{line}: {step}")]
    FileOp {
        /// `line N`.
        line: String,
        /// The step.
        step: String,
        /// Why.
        #[source]
        source: FileOpError,
    },
    /// Mounting or unmounting an overlay failed.
    #[error("mounting the filesystem of {step}")]
    Mount {
        /// The step.
        step: String,
        /// Why.
        #[source]
        source: MountError,
    },
    /// Making a scratch directory failed.
    #[error("creating a scratch directory under `{}`", path.display())]
    Scratch {
        /// The parent directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sandbox could not run the command.
    #[error("cannot start {step}")]
    Sandbox {
        /// The step.
        step: String,
        /// Why.
        #[source]
        source: kiln_executor::Error,
    },
    /// The command ran and failed.
    #[error(transparent)]
    Run(#[from] Box<RunFailure>),
    /// A `RUN --mount=type=secret` names a secret that was not given.
    #[error(
        "line {line}: secret `{id}` was not given\nhint: pass it with `--secret id={id},src=FILE`"
    )]
    SecretMissing {
        /// The secret id.
        id: String,
        /// The Dockerfile line.
        line: usize,
    },
    /// A `RUN --mount=type=ssh,required=true` whose agent was not given.
    #[error(
        "line {line}: ssh agent `{id}` was not given\nhint: forward it with `--ssh {id}` (the agent at $SSH_AUTH_SOCK) or `--ssh {id}=SOCKET`"
    )]
    SshMissing {
        /// The ssh id.
        id: String,
        /// The Dockerfile line.
        line: usize,
    },
    /// The socket that relays an SSH agent into a RUN could not be made.
    #[error("cannot forward ssh agent `{id}` at `{}`", path.display())]
    SshRelay {
        /// The ssh id.
        id: String,
        /// The relay's socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading a secret failed.
    #[error("cannot read secret `{id}`")]
    SecretRead {
        /// The secret id.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A step has an input the graph does not name.
    #[error("{step}: input for `{what}` is missing from the build graph")]
    MissingInput {
        /// The step.
        step: String,
        /// Which input.
        what: String,
    },
    /// A layer of an imported cache (`--cache-from`) could not be fetched.
    #[error("fetching layer {layer} from the imported cache")]
    CacheImport {
        /// The layer (diffID).
        layer: String,
        /// Why.
        #[source]
        source: Box<RemoteCacheError>,
    },
    /// A blocking task died.
    #[error("{step} was cancelled")]
    Cancelled {
        /// The step.
        step: String,
    },
    /// The layer of a step, committed beside the steps after it, failed.
    #[error("the layer of {step} could not be committed")]
    Committing {
        /// The step whose layer it is.
        step: String,
        /// Why.
        #[source]
        source: Arc<RunnerError>,
    },
}

/// A new scratch directory for this process in the store's `tmp/` (its
/// lane, see `Store::scratch_parent`), named after `prefix`.
fn make_scratch(store: &Store, prefix: &str) -> Result<tempfile::TempDir, RunnerError> {
    let tmp = store.scratch_parent().to_path_buf();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&tmp)
        .map_err(|source| RunnerError::Scratch {
            path: tmp.clone(),
            source,
        })?;
    // Whose it is, for [`sweep_stale`] after a crash.
    let pid_file = dir.path().join(OWNER_FILE);
    fs_err::write(&pid_file, std::process::id().to_string()).map_err(|source| {
        RunnerError::Scratch {
            path: pid_file,
            source,
        }
    })?;
    Ok(dir)
}

/// The first scratch directory of a build, made on a thread of its own
/// while the build plans and takes its keys.
///
/// The store's lanes (see `Store::scratch_parent`) are taken in turn, so
/// a build's lane was last written dozens of builds ago, and its metadata
/// (the lane's directory block, the block group's inode and block bitmaps,
/// its inode table) has often left the cache since: the first `mkdir` in
/// it waited for four reads, 1.5-2.5 ms of bench s3 (edit one file) here.
/// Made ahead, that wait overlaps the key walk, and the later scratch
/// directories in the lane find it all cached.
#[derive(Debug)]
pub struct ScratchAhead(Mutex<Option<std::thread::JoinHandle<Option<tempfile::TempDir>>>>);

impl ScratchAhead {
    /// Starts making it (nothing is made if no thread starts).
    pub fn start(store: Arc<Store>) -> Arc<Self> {
        let made = std::thread::Builder::new()
            .name("scratch-ahead".to_owned())
            .spawn(move || make_scratch(&store, "scratch-").ok());
        Arc::new(Self(Mutex::new(made.ok())))
    }

    /// The directory, once made (the first caller only); `None` if it
    /// could not be made or was taken.
    fn take(&self) -> Option<tempfile::TempDir> {
        let handle = self.0.lock().ok()?.take()?;
        handle.join().ok().flatten()
    }
}

impl Drop for ScratchAhead {
    /// An untaken directory goes (after its thread, so none is left).
    fn drop(&mut self) {
        drop(self.take());
    }
}

fn store_err(what: impl Into<String>) -> impl FnOnce(StoreError) -> RunnerError {
    let what = what.into();
    move |source| RunnerError::Store {
        what,
        source: Box::new(source),
    }
}

/// The runner over a store and the executor.
#[derive(Debug)]
pub struct StoreRunner {
    store: Arc<Store>,
    graph: Arc<BuildGraph>,
    opts: RunnerOptions,
    sandbox: kiln_executor::Sandbox,
    /// The content memo (`statcache.db`), opened once for the build when
    /// first needed; `None` inside when it cannot be opened.
    content_memo: Arc<std::sync::OnceLock<Option<std::sync::Mutex<crate::key::ContentMemo>>>>,
    /// `--cache-from`.
    imported: Option<Arc<ImportedCache>>,
    /// Where to note imported hits (until [`StoreRunner::close_progress`]).
    notes: Arc<Mutex<Option<Progress>>>,
    /// Content digests of stage files this build used (for `--cache-to`).
    used_contents: Arc<Mutex<BTreeMap<String, String>>>,
    /// Hits in the imported cache: key and result.
    imported_hits: Arc<Mutex<Vec<(String, Chain)>>>,
    /// Held while a layer is fetched from the imported cache, so that
    /// steps needing the same layer at once download it once.
    fetching: Arc<Mutex<()>>,
    /// Base images looked up in this build, by what was looked up.
    bases: Arc<Mutex<HashMap<String, Chain>>>,
    /// The build's connection to `statcache.db`, for the content memo.
    cache_db: Option<crate::context::CacheDb>,
    /// Work for later builds done beside this one's steps (copy memos);
    /// [`StoreRunner::finish`] waits for it.
    background: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// Stages that other stages read (`COPY --from`, bind mounts): their
    /// RUN layers are committed with content digests.
    read_stages: Arc<std::collections::HashSet<usize>>,
    /// Content digests of layers committed in this build, by diffID.
    layer_digests: Arc<Mutex<HashMap<String, Arc<kiln_cache::ContentDigests>>>>,
    /// Clones of COPY results being made for the next build; waited for
    /// when the last copy of the runner is dropped (the end of the build),
    /// as is the rest of the background work.
    preparing: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// The snapshots this build mounts or reads, held in use to its end
    /// (no other build takes them over: see `Store::take_snapshot`).
    in_use: Arc<Mutex<HashMap<String, kiln_cache::SnapshotUse>>>,
    /// Stage filesystems a stage digest mounted, kept for the copy that
    /// reads them next (see [`StoreRunner::source_view`]).
    source_views: Arc<Mutex<HashMap<Vec<String>, Arc<SourceView>>>>,
    /// The first scratch directory, made ahead (see [`ScratchAhead`]).
    ahead: Option<Arc<ScratchAhead>>,
    /// A sandbox helper started for the next RUN (see
    /// [`StoreRunner::prepare_helper`]).
    helper_ahead: Arc<Mutex<Option<HelperAhead>>>,
}

/// A sandbox helper being started (see [`StoreRunner::prepare_helper`]).
type HelperAhead = std::thread::JoinHandle<Option<kiln_executor::Prepared>>;

/// A stage's filesystem, mounted for reading: the stage digest of a `COPY
/// --from` and the copy itself walk the same mount, the second time through
/// the dentries the first one made (a fresh overlay costs several times
/// more per lookup).
#[derive(Debug)]
pub(super) struct SourceView {
    // (Unmounted before its scratch directory goes: fields drop in order.)
    mount: MergedMount,
    _dir: tempfile::TempDir,
}

/// Where a step reads a stage's files (see [`StoreRunner::stage_source`]).
pub(super) struct StageSource {
    /// The directory they are read in.
    pub(super) root: PathBuf,
    /// The mount `root` is in, if they are read through one.
    pub(super) view: Option<Arc<SourceView>>,
    /// The stage's snapshot directories, lowest first.
    pub(super) layers: Vec<PathBuf>,
}

impl SourceView {
    /// The merged view.
    pub(super) fn path(&self) -> &Path {
        self.mount.path()
    }
}

impl Drop for StoreRunner {
    fn drop(&mut self) {
        // The copies made for steps share the list: only the last one
        // (the build's runner) waits.
        if Arc::strong_count(&self.preparing) > 1 {
            return;
        }
        self.finish();
        let handles = match self.preparing.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for h in handles {
            let _ = h.join();
        }
    }
}

/// The stages whose files other steps read by content: sources of
/// `COPY --from=<stage>` and of `RUN --mount=type=bind,from=<stage>`.
fn stages_read(graph: &BuildGraph) -> std::collections::HashSet<usize> {
    let mut out = std::collections::HashSet::new();
    for v in graph.graph.node_weights() {
        match &v.op {
            Op::File(FileOp::Copy(c)) => {
                if let InputRef::Stage { index } = c.from {
                    out.insert(index);
                }
            }
            Op::Exec(r) => {
                for m in &r.mounts {
                    if let Some(InputRef::Stage { index }) = m.from {
                        out.insert(index);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

impl StoreRunner {
    /// A runner for `graph`, keeping layers and cache records in `store`.
    pub fn new(store: Arc<Store>, graph: Arc<BuildGraph>, opts: RunnerOptions) -> Self {
        let read_stages = Arc::new(stages_read(&graph));
        Self {
            store,
            graph,
            opts,
            sandbox: kiln_executor::Sandbox::new(),
            content_memo: Arc::default(),
            imported: None,
            notes: Arc::default(),
            used_contents: Arc::default(),
            imported_hits: Arc::default(),
            fetching: Arc::default(),
            bases: Arc::default(),
            cache_db: None,
            background: Arc::default(),
            read_stages,
            layer_digests: Arc::default(),
            preparing: Arc::default(),
            in_use: Arc::default(),
            source_views: Arc::default(),
            ahead: None,
            helper_ahead: Arc::default(),
        }
    }

    /// Take the first scratch directory from `ahead` (see
    /// [`ScratchAhead`]).
    #[must_use]
    pub fn with_scratch_ahead(mut self, ahead: Arc<ScratchAhead>) -> Self {
        self.ahead = Some(ahead);
        self
    }

    /// Keep the content memo in `db` (the build's shared connection).
    #[must_use]
    pub fn with_cache_db(mut self, db: crate::context::CacheDb) -> Self {
        self.cache_db = Some(db);
        self
    }

    /// Use `cache` (`--cache-from`) on local misses; its hits are noted
    /// on `progress` until [`StoreRunner::close_progress`].
    #[must_use]
    pub fn with_imported(mut self, cache: Arc<ImportedCache>, progress: Progress) -> Self {
        self.imported = Some(cache);
        self.notes = Arc::new(Mutex::new(Some(progress)));
        self
    }

    /// Waits for the work done for later builds (copy memos) to end, and
    /// for the RUNs' helpers still unmounting their sandboxes.
    pub fn finish(&self) {
        self.finish_background();
        // (See `Running::wait_detached`.)
        kiln_executor::wait_detached();
    }

    /// [`StoreRunner::finish`] but for the RUNs' helpers: unmounting a
    /// sandbox whose overlay saw many files takes them milliseconds, which
    /// can go on beside the export; the runner's drop waits for them (so
    /// does a later `finish`).
    pub fn finish_background(&self) {
        // The stage filesystems a stage digest mounted that no copy took
        // (its step was cached): no step reads them any more.
        let views = self
            .source_views
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default();
        if !views.is_empty() {
            self.later(move || drop(views));
        }
        // A helper started for a RUN that did not come: it exits once
        // told so (its drop waits for that).
        if let Some(helper) = self.helper_ahead.lock().ok().and_then(|mut h| h.take()) {
            self.later(move || drop(helper.join()));
        }
        // A layer's commit (see `pending`) starts more work for later
        // builds: wait until none is left.
        loop {
            let handles = match self.background.lock() {
                Ok(mut b) => std::mem::take(&mut *b),
                Err(_) => return,
            };
            if handles.is_empty() {
                break;
            }
            for h in handles {
                // (The last copy of a runner can be dropped on one of
                // these threads: it does not wait for itself.)
                if h.thread().id() != std::thread::current().id() {
                    let _ = h.join();
                }
            }
        }
    }

    /// Waits for the layers still being committed in `outputs` (see
    /// [`Chain::settled`]) and puts the committed chains in their place.
    pub fn settle_outputs<K>(&self, outputs: &mut HashMap<K, Chain>) -> Result<(), RunnerError> {
        for chain in outputs.values_mut() {
            if chain.is_pending() {
                *chain = chain.settled()?;
            }
        }
        Ok(())
    }

    /// Runs `f` (a clean-up: an unmount, a scratch directory's removal)
    /// on a thread of its own, off the build's critical path;
    /// [`StoreRunner::finish`] (or dropping the runner) waits for it. If no
    /// thread starts, `f` is dropped here, which does the clean-up.
    fn later(&self, f: impl FnOnce() + Send + 'static) {
        spawn_onto(&self.background, "clean-up", f);
    }

    /// Drops the runner's progress sender (given with
    /// [`StoreRunner::with_imported`]), so that the receiver sees the end
    /// of the build.
    pub fn close_progress(&self) {
        if let Ok(mut p) = self.notes.lock() {
            *p = None;
        }
    }

    /// Makes sure layer `diff_id` is in the store, fetching it from the
    /// imported cache if it is only there.
    pub fn ensure_layer(&self, diff_id: &Digest) -> Result<(), RemoteCacheError> {
        if self.store.has_layer(diff_id) {
            return Ok(());
        }
        let Some(src) = self.imported.as_ref().and_then(|c| c.layer(diff_id)) else {
            return Err(RemoteCacheError::Store {
                what: format!("layer {diff_id}"),
                source: Box::new(StoreError::BlobMissing {
                    digest: diff_id.to_string(),
                }),
            });
        };
        // One fetch at a time; whoever waited finds the layer here.
        let _one = self.fetching.lock();
        if self.store.has_layer(diff_id) {
            return Ok(());
        }
        crate::remote_cache::fetch_layer(&self.store, diff_id, src).map(|_| ())
    }

    /// Where the imported cache has layer `diff_id`, if it does.
    pub fn imported_layer(&self, diff_id: &Digest) -> Option<&crate::remote_cache::LayerSource> {
        self.imported.as_ref().and_then(|c| c.layer(diff_id))
    }

    /// `chain` with every layer in the store (fetched from the imported
    /// cache where needed) and its sizes as the store has them.
    pub fn materialize(&self, chain: &Chain) -> Result<Chain, RemoteCacheError> {
        let mut out = chain.clone();
        for l in &mut out.layers {
            self.ensure_layer(&l.diff_id)?;
            if let Ok(Some(n)) = self.store.layer_size(&l.diff_id) {
                l.size = n;
            }
        }
        Ok(out)
    }

    /// Records, in the store's cache index, the imported hits whose
    /// layers are all here now (fetched for the image or a later step),
    /// so the next build hits them without the imported cache. Returns
    /// how many.
    pub fn keep_imported_hits(&self) -> usize {
        let hits = self
            .imported_hits
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        let mut kept = 0;
        for (key, chain) in hits {
            if chain
                .layers
                .iter()
                .all(|l| self.store.has_layer(&l.diff_id))
            {
                // (All here: this fetches nothing, and sets the sizes.)
                let Ok(chain) = self.materialize(&chain) else {
                    continue;
                };
                let step_key = crate::key::CacheKey(key);
                if self.put_record(&step_key, &chain).is_ok() {
                    kept += 1;
                }
            }
        }
        kept
    }

    /// The content digests of stage files this build used, by memo id.
    pub fn used_contents(&self) -> BTreeMap<String, String> {
        self.used_contents
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Use `helper` as the sandbox helper binary (tests).
    #[must_use]
    pub fn with_sandbox(mut self, sandbox: kiln_executor::Sandbox) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// A copy for a blocking task (shares the store and graph).
    fn light(&self) -> StoreRunner {
        StoreRunner {
            store: Arc::clone(&self.store),
            graph: Arc::clone(&self.graph),
            opts: self.opts.clone(),
            sandbox: self.sandbox.clone(),
            content_memo: Arc::clone(&self.content_memo),
            imported: self.imported.clone(),
            notes: Arc::clone(&self.notes),
            imported_hits: Arc::clone(&self.imported_hits),
            fetching: Arc::clone(&self.fetching),
            used_contents: Arc::clone(&self.used_contents),
            bases: Arc::clone(&self.bases),
            cache_db: self.cache_db.clone(),
            background: Arc::clone(&self.background),
            read_stages: Arc::clone(&self.read_stages),
            layer_digests: Arc::clone(&self.layer_digests),
            preparing: Arc::clone(&self.preparing),
            in_use: Arc::clone(&self.in_use),
            source_views: Arc::clone(&self.source_views),
            ahead: self.ahead.clone(),
            helper_ahead: Arc::clone(&self.helper_ahead),
        }
    }

    /// Runs `f` on the build's content memo (`None`: no memo available; it
    /// is only a speed-up).
    fn with_memo<R>(&self, f: impl FnOnce(&crate::key::ContentMemo) -> R) -> Option<R> {
        let memo = self.content_memo.get_or_init(|| {
            match &self.cache_db {
                Some(db) => crate::key::ContentMemo::with_db(db.clone()),
                None => crate::key::ContentMemo::open(self.store.root()),
            }
            .ok()
            .map(std::sync::Mutex::new)
        });
        let guard = memo.as_ref()?.lock().ok()?;
        Some(f(&guard))
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn line_of(&self, id: VertexId) -> usize {
        self.graph.graph[id].span.map_or(0, |s| s.start.line)
    }

    /// The chain of the input that `from` names, among the step's inputs.
    fn input_chain(
        &self,
        step: &Step,
        inputs: &[Chain],
        from: &InputRef,
    ) -> Result<Chain, RunnerError> {
        let ins = self.graph.inputs(step.id);
        let want: Option<VertexId> = match from {
            InputRef::Stage { index } => self.graph.stage(*index).map(|s| s.last),
            InputRef::Image { reference } => ins.iter().map(|(v, _)| *v).find(|v| {
                matches!(&self.graph.graph[*v].op,
                    Op::Source(SourceOp::Image { reference: r, .. }) if r == reference)
            }),
            InputRef::Context => None,
        };
        want.and_then(|w| ins.iter().position(|(v, _)| *v == w))
            .and_then(|i| inputs.get(i).cloned())
            .ok_or_else(|| RunnerError::MissingInput {
                step: step.vertex.name.clone(),
                what: format!("{from:?}"),
            })
    }

    fn parent_chain(&self, step: &Step, inputs: &[Chain]) -> Chain {
        let ins = self.graph.inputs(step.id);
        match ins.first() {
            Some((_, Edge::Parent)) => inputs.first().cloned().unwrap_or_default(),
            _ => Chain::default(),
        }
    }

    /// The snapshot directories of `chain`, lowest first.
    fn snapshots(&self, chain: &Chain) -> Result<Vec<PathBuf>, RunnerError> {
        if chain.is_pending() {
            return self.snapshots(&chain.settled()?);
        }
        chain
            .layers
            .iter()
            .map(|l| {
                if self.imported.is_some() {
                    self.ensure_layer(&l.diff_id)
                        .map_err(|e| RunnerError::CacheImport {
                            layer: l.diff_id.to_string(),
                            source: Box::new(e),
                        })?;
                }
                self.use_snapshot(&l.diff_id)
                    .map_err(store_err(format!("unpacking layer `{}`", l.diff_id)))
            })
            .collect()
    }

    /// The filesystem `chain` mounted for reading (`step` names the step
    /// asking, for errors). With `keep`, the mount stays for the next step
    /// reading it (a stage digest keeps it for its copy); without, it is
    /// taken out: the caller's to drop once done (the copy).
    pub(super) fn source_view(
        &self,
        step: &str,
        chain: &Chain,
        keep: bool,
    ) -> Result<Arc<SourceView>, RunnerError> {
        let chain = chain.settled()?;
        let key: Vec<String> = chain.layers.iter().map(|l| l.diff_id.to_string()).collect();
        let found = self.source_views.lock().ok().and_then(|mut m| {
            if keep {
                m.get(&key).cloned()
            } else {
                m.remove(&key)
            }
        });
        if let Some(v) = found {
            return Ok(v);
        }
        let lowers = self.snapshots(&chain)?;
        let dir = self.scratch("src-")?;
        let mount =
            MergedMount::mount(&lowers, dir.path()).map_err(|source| RunnerError::Mount {
                step: step.to_owned(),
                source,
            })?;
        let view = Arc::new(SourceView { mount, _dir: dir });
        Ok(match self.source_views.lock() {
            Ok(mut m) if keep => Arc::clone(m.entry(key).or_insert(view)),
            _ => view,
        })
    }

    /// Where to read `patterns` (with `--parents` or not) of the stage
    /// filesystem `chain`: the top layer's directory when only it has them
    /// (see [`content::only_in_top`]), else a mounted view of it (with
    /// `keep`, kept for the next step that reads it: see
    /// [`StoreRunner::source_view`]).
    pub(super) fn stage_source(
        &self,
        step: &str,
        chain: &Chain,
        patterns: &[String],
        parents: bool,
        keep: bool,
    ) -> Result<StageSource, RunnerError> {
        let layers = self.snapshots(chain)?;
        if let Some(top) = layers.last().filter(|_| !parents)
            && content::only_in_top(&layers, patterns)
        {
            kiln_cache::timing::mark("stage files: in the top layer");
            return Ok(StageSource {
                root: top.clone(),
                view: None,
                layers,
            });
        }
        let view = self.source_view(step, chain, keep)?;
        Ok(StageSource {
            root: view.path().to_owned(),
            view: Some(view),
            layers,
        })
    }

    /// The snapshot of `diff_id` (unpacked if need be), held in use until
    /// the build ends.
    fn use_snapshot(&self, diff_id: &Digest) -> kiln_cache::Result<PathBuf> {
        let key = diff_id.to_string();
        let held = self.in_use.lock().is_ok_and(|u| u.contains_key(&key));
        if held && let Some(dir) = self.store.snapshot_dir(diff_id) {
            return Ok(dir);
        }
        let (dir, guard) = self.store.use_snapshot(diff_id)?;
        if let Ok(mut u) = self.in_use.lock() {
            u.entry(key).or_insert(guard);
        }
        Ok(dir)
    }

    /// A scratch directory: the one made ahead (see [`ScratchAhead`]) if
    /// there is one, else a new one named after `prefix`.
    fn scratch(&self, prefix: &str) -> Result<tempfile::TempDir, RunnerError> {
        match self.ahead.as_ref().and_then(|a| a.take()) {
            Some(dir) => Ok(dir),
            None => make_scratch(&self.store, prefix),
        }
    }

    fn created_time(&self) -> Option<SystemTime> {
        self.opts.source_date_epoch.and_then(|e| {
            u64::try_from(e)
                .ok()
                .map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s))
        })
    }

    /// Commit `upper` as a layer on `parent`; an empty upper adds no layer.
    fn commit(&self, step: &Step, parent: &Chain, upper: &Path) -> Result<Chain, RunnerError> {
        self.commit_gated(step, parent, upper, None, None, None, None)
    }

    /// [`StoreRunner::commit`] of an upper that RUNs may be mounting by its
    /// path (see `pending`): moved under its gate. The layer is hashed with
    /// the contents `known` has (see [`kiln_cache::KnownFiles`]);
    /// `on_hashed` gets the new layer and its small files' contents as soon
    /// as it is hashed, before the gate (an empty upper adds no layer, and
    /// `on_hashed` is not called).
    #[allow(clippy::too_many_arguments)]
    fn commit_gated(
        &self,
        step: &Step,
        parent: &Chain,
        upper: &Path,
        known: Option<KnownFiles>,
        pending: Option<&pending::Pending>,
        blob_below: Option<u64>,
        on_hashed: Option<OnHashed>,
    ) -> Result<Chain, RunnerError> {
        let empty = fs_err::read_dir(upper)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        let chain = if empty {
            parent.clone()
        } else {
            // The step is over: nothing writes its upper any more. A RUN
            // of a stage that others read takes its files' digests too (a
            // `COPY --from` key then needs not read them again).
            let digests = matches!(step.vertex.op, Op::Exec(_))
                && step
                    .vertex
                    .stage
                    .is_some_and(|s| self.read_stages.contains(&s));
            let opts = kiln_cache::WriteOptions::default()
                .with_source_date_epoch(self.opts.source_date_epoch)
                .with_mapped_files()
                .with_content_digests(digests)
                .with_blob_below(blob_below);
            let (layer, _, digests) = self
                .store
                .commit_snapshot_gated(
                    upper,
                    &opts,
                    known,
                    |layer, recorded| {
                        if let Some(f) = on_hashed {
                            f(self, layer, recorded.take());
                        }
                    },
                    || pending.map(pending::Pending::close_gate),
                )
                .map_err(store_err(format!(
                    "committing the layer of {}",
                    step.vertex.name
                )))?;
            if let Some(d) = digests
                && let Ok(mut all) = self.layer_digests.lock()
            {
                all.insert(layer.diff_id.to_string(), Arc::new(d));
            }
            parent.with(layer)
        };
        kiln_cache::timing::mark("commit: layer");
        self.record(step, &chain)?;
        kiln_cache::timing::mark("commit: recorded");
        Ok(chain)
    }

    fn record(&self, step: &Step, chain: &Chain) -> Result<(), RunnerError> {
        self.put_record(&step.key, chain)
    }

    fn put_record(&self, key: &crate::key::CacheKey, chain: &Chain) -> Result<(), RunnerError> {
        let result = CacheResult {
            diff_ids: chain.layers.iter().map(|l| l.diff_id.clone()).collect(),
            config: None,
            extra: serde_json::json!({
                "sizes": chain.layers.iter().map(|l| l.size).collect::<Vec<_>>(),
            }),
        };
        self.store
            .put_cache_record(&key.0, &result)
            .map_err(store_err("storing a cache record"))
    }

    fn source(&self, _step: &Step, src: &SourceOp) -> Result<Chain, RunnerError> {
        match src {
            SourceOp::Scratch | SourceOp::Context => Ok(Chain::default()),
            SourceOp::Image {
                reference, digest, ..
            } => {
                // The image the plan found (its config is the stage's), once
                // per build however many stages start from it.
                let id = digest.as_deref().unwrap_or(reference);
                if let Ok(bases) = self.bases.lock()
                    && let Some(chain) = bases.get(id)
                {
                    return Ok(chain.clone());
                }
                let image =
                    self.store
                        .resolve(id)
                        .map_err(|source| RunnerError::ImageNotFound {
                            reference: reference.clone(),
                            source: Box::new(source),
                        })?;
                let chain = Chain {
                    layers: image
                        .layers
                        .into_iter()
                        .map(|l| ChainLayer {
                            diff_id: l.diff_id,
                            size: l.size,
                        })
                        .collect(),
                    pending: None,
                };
                if let Ok(mut bases) = self.bases.lock() {
                    bases.insert(id.to_owned(), chain.clone());
                }
                Ok(chain)
            }
        }
    }

    fn file_op(&self, step: &Step, op: &FileOp, inputs: &[Chain]) -> Result<Chain, RunnerError> {
        let name = step.vertex.name.clone();
        let line = format!("line {}", self.line_of(step.id));
        let fo_err = |source| RunnerError::FileOp {
            line: line.clone(),
            step: name.clone(),
            source,
        };
        let mount_err = |source| RunnerError::Mount {
            step: name.clone(),
            source,
        };
        let parent = self.parent_chain(step, inputs);
        let dir = self.scratch("file-")?;
        kiln_cache::timing::mark("file op: scratch made");
        match op {
            FileOp::Mkdir { path, user } => {
                let lowers = self.snapshots(&parent)?;
                let merged = MergedMount::mount(&lowers, dir.path()).map_err(mount_err)?;
                fileop::mkdir_workdir(
                    merged.path(),
                    path,
                    Some(user.as_str()),
                    self.created_time(),
                    true,
                )
                .map_err(fo_err)?;
                let upper = merged.unmount().map_err(mount_err)?;
                self.commit(step, &parent, &upper)
            }
            FileOp::Copy(c) => {
                let mut fop = fileop::CopyOp::from_plan(c);
                fop.created_time = self.created_time();
                fop.apply_ownership = true;
                // The source: the context, or another stage/image mounted
                // read-only for the copy.
                let mut src_mount = None;
                let mut src_layers = Vec::new();
                let mut src_top = None;
                let src_root: PathBuf = match &c.from {
                    InputRef::Context => {
                        fop.ignore.clone_from(&self.opts.ignore);
                        self.opts.context.clone()
                    }
                    other => {
                        let chain = self.input_chain(step, inputs, other)?;
                        src_top = self.top_layer_digests(&chain);
                        let source = self.stage_source(
                            &step.vertex.name,
                            &chain,
                            &content::path_sources(c),
                            c.parents,
                            false,
                        )?;
                        src_layers = source.layers;
                        src_mount = source.view;
                        source.root
                    }
                };
                // A context COPY links the files unchanged since its last
                // run from that run's result.
                let memo = (c.from == InputRef::Context && !c.add)
                    .then(|| reuse::memo_path(&self.store, c, &parent, self.opts.source_date_epoch))
                    .flatten();
                // A stage's files are linked from its snapshots when the copy
                // keeps their metadata.
                // The scratch of a second try (see below), kept to the commit.
                let mut retry_dir = None;
                let mut loaded = memo.as_deref().map(|m| reuse::load(&self.store, m));
                let prev = loaded.as_ref().and_then(|l| l.prev.clone());
                let had_memo = loaded.as_ref().is_some_and(|l| l.had_memo);
                // The previous result becomes the upper: only changes are
                // written. A small one (with a blob) is taken over whole,
                // when nothing else uses it; else its clone, made for this
                // run by the last one, is taken.
                let prepared = match (&memo, &prev, c.link) {
                    (Some(m), Some((prev, _)), false) => {
                        let upper = dir.path().join("upper");
                        if self.store.take_snapshot(prev, &upper).unwrap_or(false) {
                            if let Some(l) = loaded.as_mut() {
                                l.taken_as(&upper);
                            }
                            kiln_cache::timing::mark("copy: upper taken from the last run");
                            true
                        } else if reuse::claim_prepared(&self.store, m, prev, &upper) {
                            kiln_cache::timing::mark("copy: upper prepared by the last run");
                            true
                        } else {
                            false
                        }
                    }
                    _ => false,
                };
                let prev_size = prev
                    .as_ref()
                    .and_then(|(d, _)| self.store.layer_size(d).ok().flatten());
                let mut known = None;
                let mut linking = |upper: &Path, prepared: Option<_>| match loaded.as_mut() {
                    Some(l) => {
                        known = l.known.take();
                        Some(l.reuse(upper, prepared))
                    }
                    None if !src_layers.is_empty() && !c.add => Some(Arc::new(
                        fileop::Reuse::from_layers(&src_layers, upper.to_owned())
                            .with_source_top(src_top.clone()),
                    )),
                    None => None,
                };
                // Its small files' contents go to the layer writer.
                fop.record_contents = memo.is_some();
                let (upper, mut report) = if c.link {
                    // --link: copy into an empty tree; the result is a layer
                    // independent of the parent.
                    let root = dir.path().join("link");
                    fs_err::create_dir(&root).map_err(|source| RunnerError::Scratch {
                        path: root.clone(),
                        source,
                    })?;
                    fop.reuse = linking(&root, None);
                    let report = fileop::copy(&src_root, &root, &fop).map_err(fo_err)?;
                    (root, report)
                } else {
                    // The keys' `lstat`s of the context spare the copy its own
                    // for the files it keeps.
                    let seen = prepared.then(|| Arc::clone(&self.opts.context_files));
                    let lowers = self.snapshots(&parent)?;
                    let merged = MergedMount::mount(&lowers, dir.path()).map_err(mount_err)?;
                    kiln_cache::timing::mark("copy: mounted");
                    fop.reuse = linking(merged.upper(), seen);
                    kiln_cache::timing::mark("copy: memo loaded");
                    match fileop::copy(&src_root, merged.path(), &fop) {
                        Err(FileOpError::PreparedConflict { .. }) => {
                            // An entry changed type since the last run: the
                            // clone is no start; copy into a fresh upper.
                            drop(merged);
                            kiln_cache::timing::mark("copy: the prepared upper conflicts");
                            let fresh = self.scratch("copy-")?;
                            let mut again = memo.as_deref().map(|m| reuse::load(&self.store, m));
                            let merged =
                                MergedMount::mount(&lowers, fresh.path()).map_err(mount_err)?;
                            fop.reuse = again.as_mut().map(|l| l.reuse(merged.upper(), None));
                            let report =
                                fileop::copy(&src_root, merged.path(), &fop).map_err(fo_err)?;
                            let upper = merged.unmount().map_err(mount_err)?;
                            retry_dir = Some(fresh);
                            (upper, report)
                        }
                        r => {
                            let report = r.map_err(fo_err)?;
                            kiln_cache::timing::mark("copy: copied");
                            let upper = merged.unmount().map_err(mount_err)?;
                            kiln_cache::timing::mark("copy: unmounted");
                            (upper, report)
                        }
                    }
                };
                // A context copy hashes the files it linked or kept with the
                // memo's contents and those it copied with what it wrote, and
                // records them for the next run. (Sorted out with the commit,
                // beside the steps after it when it is.)
                let known = memo.is_some().then_some(known);
                let one_source = !c.link && c.sources.len() == 1;
                // A COPY that ran before is likely to run once more (an
                // edit loop).
                let again = one_source && had_memo;
                // A small result keeps its tar as a blob, so that the next
                // run may take its snapshot over (no clone to make). On a
                // first run (a cold build, which may not run it again) only
                // a smaller one: the tar is made anyway, keeping it costs a
                // write of its size. (Without, the first rebuild after a
                // cold build linked every file from the last result: 42 ms
                // for s3's 5,000 files, against 12-16 ms taken over.)
                let limit = if again {
                    reuse::small_layer()
                } else {
                    reuse::small_layer() / 4
                };
                // (Linked and kept files count: they are in the tar too.)
                let size = report.bytes.max(report.file_bytes);
                let small = one_source && prev_size.unwrap_or(0).max(size) < limit;
                let blob_below = small.then_some(limit);
                if small {
                    kiln_cache::timing::mark("copy: the layer's tar is kept");
                }
                let upper_dir = upper.clone();
                let beside = self.commit_beside(step);
                // Committed beside the RUNs after it, the upper is cloned
                // for the next run now, through a descriptor (it is moved
                // into the store meanwhile), rather than once committed.
                // (Not with SOURCE_DATE_EPOCH, whose commit changes times.)
                let early = match &memo {
                    Some(m)
                        if beside && again && !small && self.opts.source_date_epoch.is_none() =>
                    {
                        reuse::open_dir(None, &upper_dir)
                            .ok()
                            .map(|fd| (m.clone(), fd))
                    }
                    _ => None,
                };
                let prepare_after = again && early.is_none();
                // The source's overlay (which the copy walked), the scratch
                // directory and the copy's lists: tearing them down takes
                // milliseconds, done off the critical path.
                let teardown = move || {
                    drop(retry_dir);
                    drop(src_mount);
                    drop(dir);
                    drop(fop);
                };
                // The memo for the next build, written as soon as the layer
                // is hashed (a RUN committed beside may still be running):
                // only the next build reads it, beside the next steps (see
                // `StoreRunner::finish`). (A commit that then fails leaves
                // a memo of a layer the store lacks, which the next build
                // does not use.)
                let memo_to_save = memo.clone();
                let on_hashed = move |report: fileop::Report| -> Option<OnHashed> {
                    let memo = memo_to_save?;
                    Some(Box::new(
                        move |this: &StoreRunner,
                              layer: &LayerInfo,
                              recorded: Option<KnownFiles>| {
                            let (diff_id, temp_dir) =
                                (layer.diff_id.clone(), this.store.root().join("tmp"));
                            let save = move || {
                                reuse::save(
                                    &memo,
                                    &temp_dir,
                                    &diff_id,
                                    report,
                                    recorded.unwrap_or_default(),
                                );
                            };
                            // (A thread that cannot start loses the memo: the
                            // next build copies everything, as with a memo it
                            // cannot write.)
                            spawn_onto(&this.background, "copy-memo", save);
                            kiln_cache::timing::mark("copy: memo saved");
                        },
                    ) as OnHashed)
                };
                let tail = move |this: &StoreRunner,
                                 step: &Step,
                                 parent: &Chain,
                                 pending: Option<&pending::Pending>|
                      -> Result<Chain, RunnerError> {
                    let known = known.map(|known| {
                        let mut known = known
                            .and_then(fileop::MemoContents::parse)
                            .map(|k| reuse::known_for(k, &report))
                            .unwrap_or_default();
                        known.absorb(std::mem::take(&mut report.contents));
                        known
                    });
                    let on_hashed = on_hashed(report);
                    let chain = this.commit_gated(
                        step, parent, &upper, known, pending, blob_below, on_hashed,
                    )?;
                    // A COPY run again is likely to run once more (an edit
                    // loop): its result is cloned for that run beside the
                    // steps after it (for one source: see `fileop::copy`),
                    // unless that run can take it over (its tar is stored).
                    if let (Some(m), Some(top), true) = (
                        &memo,
                        chain.layers.last(),
                        prepare_after && chain.layers.len() > parent.layers.len(),
                    ) && !(small && this.store.has_layer_tar(&top.diff_id).unwrap_or(false))
                    {
                        this.prepare_next(m, &top.diff_id);
                    }
                    Ok(chain)
                };
                if beside {
                    // Only RUNs build on this result: they start on the
                    // upper while its layer is hashed (see `pending`).
                    let pending = pending::Pending::new(step.vertex.name.clone(), upper_dir);
                    if let Some((m, fd)) = early {
                        self.prepare_early(m, fd, Arc::clone(&pending), parent.layers.len());
                    }
                    let chain = self.commit_later(step, &parent, pending, tail, teardown);
                    kiln_cache::timing::mark("copy: layer committed beside");
                    return Ok(chain);
                }
                let chain = tail(self, step, &parent, None)?;
                self.later(teardown);
                Ok(chain)
            }
        }
    }

    /// Commits `step`'s layer (its upper named by `pending`) with `commit`
    /// on a thread of its own, then runs `teardown` (the scratch directory
    /// goes) once no RUN reads the upper; gives `parent` with the layer
    /// pending on top (see `pending`).
    pub(super) fn commit_later(
        &self,
        step: &Step,
        parent: &Chain,
        pending: Arc<pending::Pending>,
        commit: impl FnOnce(
            &StoreRunner,
            &Step,
            &Chain,
            Option<&pending::Pending>,
        ) -> Result<Chain, RunnerError>
        + Send
        + 'static,
        teardown: impl FnOnce() + Send + 'static,
    ) -> Chain {
        let setter = pending::Setter(Arc::clone(&pending));
        let (this, step2, parent2) = (self.light(), step.clone(), parent.clone());
        let work = move || {
            let r = commit(&this, &step2, &parent2, Some(&setter.0));
            drop(this);
            let p = Arc::clone(&setter.0);
            setter.set(r);
            // A RUN may still read the scratch directory's upper (an
            // empty one stays there).
            let _gate = p.close_gate();
            teardown();
        };
        spawn_with(&self.background, "layer-commit", false, work);
        Chain::with_pending(parent, pending)
    }

    /// The content digests of `chain`'s top layer, if this build committed
    /// it with them.
    pub(super) fn top_layer_digests(
        &self,
        chain: &Chain,
    ) -> Option<Arc<kiln_cache::ContentDigests>> {
        let top = chain.layers.last()?;
        self.layer_digests
            .lock()
            .ok()
            .and_then(|all| all.get(&top.diff_id.to_string()).cloned())
    }

    /// Starts a sandbox helper on a thread of its own for the RUN that will
    /// come after a step, unless one is waiting already: exec'ing the
    /// helper (the kiln binary) and its start-up, 2-3 ms, then overlap the
    /// step (see `kiln_executor::Sandbox::prepare`).
    fn prepare_helper(&self) {
        let Ok(mut slot) = self.helper_ahead.lock() else {
            return;
        };
        if slot.is_some() {
            return;
        }
        let sandbox = self.sandbox.clone();
        *slot = std::thread::Builder::new()
            .name("helper-ahead".to_owned())
            .spawn(move || sandbox.prepare(kiln_executor::Stdio::Piped).ok())
            .ok();
    }

    /// The helper [`StoreRunner::prepare_helper`] started, if any.
    fn take_helper(&self) -> Option<kiln_executor::Prepared> {
        let handle = self.helper_ahead.lock().ok()?.take()?;
        handle.join().ok().flatten()
    }

    /// Whether a RUN builds on a step's result.
    fn feeds_a_run(&self, step: &Step) -> bool {
        use petgraph::visit::EdgeRef as _;
        self.graph
            .graph
            .edges_directed(step.id, petgraph::Direction::Outgoing)
            .any(|e| {
                *e.weight() == Edge::Parent
                    && matches!(self.graph.graph[e.target()].op, Op::Exec(_))
            })
    }

    /// Whether a step's layer is committed beside the steps after it: when
    /// every step that reads its result is a RUN on top of it.
    fn commit_beside(&self, step: &Step) -> bool {
        use petgraph::visit::EdgeRef as _;
        let mut consumers = self
            .graph
            .graph
            .edges_directed(step.id, petgraph::Direction::Outgoing)
            .peekable();
        consumers.peek().is_some()
            && consumers.all(|e| {
                *e.weight() == Edge::Parent
                    && matches!(self.graph.graph[e.target()].op, Op::Exec(_))
            })
    }

    /// Starts cloning the snapshot of `diff_id` for the next run of the
    /// COPY of `memo` (see [`reuse::prepare`]); the runner waits for it
    /// when dropped. Best effort: a clone that fails leaves nothing.
    fn prepare_next(&self, memo: &Path, diff_id: &Digest) {
        let Some(snapshot) = self.store.snapshot_dir(diff_id) else {
            return;
        };
        let Ok(scratch) = self.scratch("prep-") else {
            return;
        };
        let (store, memo, diff_id) = (Arc::clone(&self.store), memo.to_owned(), diff_id.clone());
        let work = move || {
            let _ = reuse::prepare(&store, &memo, &diff_id, &snapshot, scratch.path());
            kiln_cache::timing::mark("copy: next run prepared");
            drop(scratch);
        };
        spawn_onto(&self.preparing, "copy-prepare", work);
    }

    /// [`StoreRunner::prepare_next`] of a COPY whose layer is committed
    /// beside the steps after it: clones its upper (`src`, open) now, and
    /// leaves the clone for the next run once the layer is committed, if
    /// the upper became its snapshot (a layer the store had already
    /// makes the upper go instead: the clone may miss files then).
    fn prepare_early(
        &self,
        memo: PathBuf,
        src: std::os::fd::OwnedFd,
        pending: Arc<pending::Pending>,
        below: usize,
    ) {
        let Ok(scratch) = self.scratch("prep-") else {
            return;
        };
        let store = Arc::clone(&self.store);
        let work = move || {
            use std::os::unix::fs::MetadataExt as _;
            let st = nix::sys::stat::fstat(&src).ok()?;
            let ino = (st.st_dev, st.st_ino);
            if !reuse::clone_for_next(src, scratch.path()).ok()? {
                return None;
            }
            let chain = pending.wait().ok()?;
            let top = chain.layers.get(below)?;
            let snapshot = fs_err::metadata(store.snapshot_dir(&top.diff_id)?).ok()?;
            if (snapshot.dev(), snapshot.ino()) != ino {
                return None;
            }
            let _ = reuse::publish(&store, &memo, &top.diff_id, scratch.path());
            kiln_cache::timing::mark("copy: next run prepared");
            drop(scratch);
            Some(())
        };
        spawn_onto(&self.preparing, "copy-prepare", move || {
            let _ = work();
        });
    }

    fn run_sync(
        &self,
        step: &Step,
        inputs: &[Chain],
        progress: &Progress,
        cancel: &run::CancelHandle,
    ) -> Result<Chain, RunnerError> {
        // Only a RUN starts on a parent whose top layer is still being
        // committed (see `pending`): every other input is waited for.
        let keep_pending = matches!(step.vertex.op, Op::Exec(_))
            && matches!(self.graph.inputs(step.id).first(), Some((_, Edge::Parent)));
        let settled: Vec<Chain> = inputs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 && keep_pending {
                    Ok(c.clone())
                } else {
                    c.settled()
                }
            })
            .collect::<Result<_, _>>()?;
        let inputs = settled.as_slice();
        // The RUN after this step will find its sandbox's helper started
        // (a RUN starts the next one once it has taken its own).
        if !matches!(step.vertex.op, Op::Exec(_)) && self.feeds_a_run(step) {
            self.prepare_helper();
        }
        match &step.vertex.op {
            Op::Source(src) => self.source(step, src),
            Op::StageRef { .. } => {
                let chain = self.parent_chain(step, inputs);
                self.record(step, &chain)?;
                Ok(chain)
            }
            Op::Config(_) => Ok(self.parent_chain(step, inputs)),
            Op::File(f) => self.file_op(step, f, inputs),
            Op::Exec(r) => self.run_exec(step, r, inputs, progress, cancel),
        }
    }
}

impl StepRunner for StoreRunner {
    type Output = Chain;
    type Error = RunnerError;

    async fn lookup(&self, step: &Step) -> Result<Option<Chain>, RunnerError> {
        // Sources are resolved every time (a retagged image is a new base);
        // config ops only pass their parent on (and share its key).
        match &step.vertex.op {
            Op::Source(src) => return self.source(step, src).map(Some),
            Op::Config(_) => return Ok(None),
            Op::Exec(_) | Op::File(_) | Op::StageRef { .. } => {}
        }
        let rec = self
            .store
            .get_cache_record(&step.key.0)
            .map_err(store_err("reading a cache record"))?;
        if rec.is_none()
            && let Some(cache) = &self.imported
            && let Some((layers, from)) = cache.record(&step.key.0)
        {
            if let Ok(p) = self.notes.lock()
                && let Some(p) = p.as_ref()
            {
                p.send(crate::event::Event::Log {
                    id: step.id.index(),
                    stream: crate::event::LogStream::Stderr,
                    line: format!("CACHED: from the imported cache {from}"),
                });
            }
            let chain = Chain {
                layers: layers
                    .iter()
                    .map(|(diff_id, size)| ChainLayer {
                        diff_id: diff_id.clone(),
                        size: *size,
                    })
                    .collect(),
                pending: None,
            };
            if let Ok(mut h) = self.imported_hits.lock() {
                h.push((step.key.0.clone(), chain.clone()));
            }
            return Ok(Some(chain));
        }
        Ok(rec.map(|r| {
            let sizes: Vec<u64> = r
                .extra
                .get("sizes")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_default();
            Chain {
                layers: r
                    .diff_ids
                    .into_iter()
                    .enumerate()
                    .map(|(i, diff_id)| ChainLayer {
                        diff_id,
                        size: sizes.get(i).copied().unwrap_or(0),
                    })
                    .collect(),
                pending: None,
            }
        }))
    }

    fn would_hit(&self, step: &Step) -> bool {
        match &step.vertex.op {
            Op::Source(_) => true,
            Op::Config(_) => false,
            Op::Exec(_) | Op::File(_) | Op::StageRef { .. } => {
                matches!(self.store.get_cache_record(&step.key.0), Ok(Some(_)))
                    || self
                        .imported
                        .as_ref()
                        .is_some_and(|c| c.record(&step.key.0).is_some())
            }
        }
    }

    fn known_content(&self, id: &str) -> Option<String> {
        self.imported
            .as_ref()
            .and_then(|c| c.content(id))
            .map(str::to_owned)
    }

    async fn content_digest(
        &self,
        step: &Step,
        inputs: &[Chain],
    ) -> Result<Option<String>, RunnerError> {
        let this = self.light();
        let (step, inputs) = (step.clone(), inputs.to_vec());
        tokio::task::spawn_blocking(move || {
            let inputs = inputs
                .iter()
                .map(Chain::settled)
                .collect::<Result<Vec<_>, _>>()?;
            this.content_digest_sync(&step, &inputs)
        })
        .await
        .unwrap_or(Ok(None))
    }

    async fn run(
        &self,
        step: Step,
        inputs: Vec<Chain>,
        progress: Progress,
    ) -> Result<Chain, RunnerError> {
        // The runner is shared through an Arc by the scheduler, but the
        // blocking task needs 'static data: rebuild a light runner.
        let this = self.light();
        let name = step.vertex.name.clone();
        let cancel = run::CancelHandle::default();
        let guard = cancel.guard();
        let res =
            tokio::task::spawn_blocking(move || this.run_sync(&step, &inputs, &progress, &cancel))
                .await;
        guard.disarm();
        res.unwrap_or(Err(RunnerError::Cancelled { step: name }))
    }
}

/// Runs `f` on a thread named `name` whose handle goes on `list` (to be
/// joined later). If no thread starts, `f` is dropped unrun.
fn spawn_onto(
    list: &Mutex<Vec<std::thread::JoinHandle<()>>>,
    name: &str,
    f: impl FnOnce() + Send + 'static,
) {
    spawn_with(list, name, true, f);
}

/// [`spawn_onto`]; `idle`: the thread yields to the build's own steps (see
/// `kiln_executor::idle_priority`), as work for later builds does; work a
/// step will wait for keeps its priority.
fn spawn_with(
    list: &Mutex<Vec<std::thread::JoinHandle<()>>>,
    name: &str,
    idle: bool,
    f: impl FnOnce() + Send + 'static,
) {
    let f = move || {
        if idle {
            kiln_executor::idle_priority();
        }
        f();
    };
    if let Ok(handle) = std::thread::Builder::new().name(name.to_owned()).spawn(f)
        && let Ok(mut l) = list.lock()
    {
        l.push(handle);
    }
}

/// The file in a scratch directory that holds its owner's pid.
pub const OWNER_FILE: &str = "owner.pid";

/// Unmount and remove the scratch directories that builds which died
/// without cleaning up (SIGKILL, power loss) left in the store's `tmp/`:
/// those whose owner pid is no longer running. Returns how many went.
/// Best effort: what cannot be removed stays for the next sweep.
pub fn sweep_stale(store: &Store) -> usize {
    let tmp = store.root().join("tmp");
    let Ok(entries) = fs_err::read_dir(&tmp) else {
        return 0;
    };
    // Scratch directories are in `tmp/` and in its lanes (see
    // `Store::scratch_parent`).
    // A lane holds only scratch directories: one with no subdirectory (a
    // link count of exactly 2; btrfs says 1 for any directory) is empty,
    // and is not read. (A build reads them all before it starts.)
    use std::os::unix::fs::MetadataExt as _;
    let mut candidates = Vec::new();
    for e in entries.flatten() {
        if !kiln_cache::is_lane(&e.file_name()) {
            candidates.push(e);
        } else if e.metadata().is_ok_and(|m| m.is_dir() && m.nlink() != 2)
            && let Ok(inner) = fs_err::read_dir(e.path())
        {
            candidates.extend(inner.flatten());
        }
    }
    // The mount table, read once a dead owner's directory is found.
    let mut mount_points: Option<Vec<PathBuf>> = None;
    let mut removed = 0;
    for e in candidates {
        let dir = e.path();
        // A clone being thrown away (`trash-<pid>-<n>`, see
        // `reuse::discard`) by a build that died meanwhile: never mounted.
        if let Some(pid) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("trash-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        {
            if !Path::new("/proc").join(pid.to_string()).exists()
                && fs_err::remove_dir_all(&dir).is_ok()
            {
                removed += 1;
            }
            continue;
        }
        let Ok(pid) = fs_err::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let mount_points = mount_points.get_or_insert_with(|| {
            fs_err::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|p| PathBuf::from(unescape_mountinfo(p)))
                .collect()
        });
        let mut under: Vec<&PathBuf> = mount_points
            .iter()
            .filter(|m| m.starts_with(&dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in under {
            let _ = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH);
        }
        if fs_err::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves base images from the store for the planner.
#[derive(Debug, Clone)]
pub struct StoreResolver {
    store: Arc<Store>,
}

impl StoreResolver {
    /// A resolver over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// What the planner needs of `image`.
    pub fn info(image: &kiln_cache::Image) -> crate::plan::ImageInfo {
        crate::plan::ImageInfo {
            digest: Some(image.id.to_string()),
            config: crate::export::plan_config_json(&image.config_bytes),
        }
    }
}

impl crate::plan::ImageResolver for StoreResolver {
    fn resolve(
        &self,
        reference: &str,
        platform: &crate::graph::Platform,
    ) -> Result<crate::plan::ImageInfo, crate::plan::ResolveError> {
        let image = self.store.resolve(reference)?;
        if let Some(has) = other_platform(&image, platform) {
            return Err(format!(
                "the image in the store is for {has}, not {platform} (pull it for {platform}, \
                 or build for {has})"
            )
            .into());
        }
        Ok(StoreResolver::info(&image))
    }
}

/// The platform `image` is for, when it is not `want`: the OS and the
/// architecture differ, or both name a variant and those differ. (An image
/// whose config names no OS or architecture suits any.)
pub fn other_platform(
    image: &kiln_cache::Image,
    want: &crate::graph::Platform,
) -> Option<crate::graph::Platform> {
    let config = &image.config;
    let has = crate::graph::Platform::from_parts(
        &config.os().to_string(),
        &config.architecture().to_string(),
        config.variant().as_deref().unwrap_or_default(),
    );
    if has.os.is_empty() || has.architecture.is_empty() {
        return None;
    }
    let differs = has.os != want.os
        || has.architecture != want.architecture
        || (!has.variant.is_empty() && !want.variant.is_empty() && has.variant != want.variant);
    differs.then_some(has)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    /// The first scratch directory is the one made ahead (in the lane, with
    /// its owner file); the next ones are made then. One made ahead and
    /// never taken goes with the last holder.
    #[test]
    fn the_first_scratch_directory_is_made_ahead() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(Store::open(root.path()).unwrap_or_else(|e| panic!("{e}")));
        let ahead = ScratchAhead::start(Arc::clone(&store));
        let runner = StoreRunner::new(
            Arc::clone(&store),
            Arc::new(BuildGraph {
                graph: petgraph::graph::DiGraph::new(),
                stages: Vec::new(),
                target: 0,
                context: None,
                unused_build_args: Vec::new(),
            }),
            RunnerOptions::default(),
        )
        .with_scratch_ahead(ahead);
        let lane = store.scratch_parent().to_path_buf();
        let first = runner.scratch("run-").unwrap_or_else(|e| panic!("{e}"));
        let second = runner
            .light()
            .scratch("file-")
            .unwrap_or_else(|e| panic!("{e}"));
        for (dir, prefix) in [(&first, "scratch-"), (&second, "file-")] {
            assert_eq!(dir.path().parent(), Some(lane.as_path()));
            let name = dir
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            assert!(name.starts_with(prefix), "{name}");
            assert_eq!(
                fs_err::read_to_string(dir.path().join(OWNER_FILE)).ok(),
                Some(std::process::id().to_string())
            );
        }
        drop(runner);

        let untaken = ScratchAhead::start(Arc::clone(&store));
        let made = untaken
            .0
            .lock()
            .ok()
            .and_then(|mut h| h.take())
            .and_then(|h| h.join().ok().flatten())
            .unwrap_or_else(|| panic!("nothing made ahead"));
        let path = made.path().to_path_buf();
        assert!(path.is_dir());
        drop(made);
        assert!(!path.exists());
        let untaken = ScratchAhead::start(Arc::clone(&store));
        drop(untaken);
        let left: Vec<_> = fs_err::read_dir(&lane)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let ours =
            [first.path(), second.path()].map(|p| p.file_name().unwrap_or_default().to_owned());
        assert!(
            left.iter().all(|n| ours.contains(n)),
            "an untaken scratch directory was left: {left:?}"
        );
    }

    #[test]
    fn sweep_removes_dead_owners_only() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(root.path()).unwrap_or_else(|e| panic!("{e}"));
        let tmp = root.path().join("tmp");
        let dead = tmp.join("run-dead");
        let alive = tmp.join("run-alive");
        let foreign = tmp.join("other");
        // Clones being thrown away by a dead build and by this one.
        let dead_trash = tmp.join("trash-99999999-0");
        let live_trash = tmp.join(format!("trash-{}-0", std::process::id()));
        // Scratch directories in a lane (see `Store::scratch_parent`).
        let lane = store.scratch_parent().to_path_buf();
        assert_ne!(lane, tmp);
        let dead_in_lane = lane.join("run-dead");
        let alive_in_lane = lane.join("run-alive");
        for d in [
            &dead,
            &alive,
            &foreign,
            &dead_trash,
            &live_trash,
            &dead_in_lane,
            &alive_in_lane,
        ] {
            fs_err::create_dir_all(d.join("upper/x")).unwrap_or_else(|e| panic!("{e}"));
        }
        // pid_max is at most 2^22: this pid cannot be running.
        for d in [&dead, &dead_in_lane] {
            fs_err::write(d.join(OWNER_FILE), "99999999").unwrap_or_else(|e| panic!("{e}"));
        }
        for d in [&alive, &alive_in_lane] {
            fs_err::write(d.join(OWNER_FILE), std::process::id().to_string())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(sweep_stale(&store), 3);
        assert!(!dead.exists());
        assert!(!dead_in_lane.exists());
        assert!(alive_in_lane.exists());
        assert!(lane.exists(), "the lane stays");
        assert!(!dead_trash.exists());
        assert!(alive.exists());
        assert!(live_trash.exists(), "a live build's trash is its own");
        assert!(
            foreign.exists(),
            "a directory without an owner file is not ours"
        );
    }
}
