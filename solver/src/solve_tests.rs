//! Scheduler tests with a recording runner (the scheduler is what is under
//! test: ordering, parallelism, deduplication, cache hits, failures).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::event::Event;
use crate::graph::Op;
use crate::key::compute_keys;
use crate::plan::{BuildOptions, EmptyImages, plan};

#[derive(Debug, thiserror::Error)]
#[error("step `{0}` exited with code 1")]
struct StepFailed(String);

#[derive(Default)]
struct Recorder {
    store: Mutex<HashSet<CacheKey>>,
    runs: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// What `content_digest` says for a `COPY --from=<stage>`.
    content: Option<String>,
    /// `content_digest` returns only once a step with this in its name ran.
    digest_waits_for: Option<String>,
    /// Set when `content_digest` began (steps named `WAITDIGEST` wait for it).
    digest_started: std::sync::atomic::AtomicBool,
}

/// Poll `cond` every 10 ms for up to 10 s.
async fn wait_until(cond: impl Fn() -> bool) -> bool {
    for _ in 0..1000 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

impl StepRunner for Recorder {
    type Output = String;
    type Error = StepFailed;

    async fn lookup(&self, step: &Step) -> Result<Option<String>, StepFailed> {
        let hit = self
            .store
            .lock()
            .map(|s| s.contains(&step.key))
            .unwrap_or(false);
        Ok(hit.then(|| step.key.0.clone()))
    }

    async fn content_digest(
        &self,
        step: &Step,
        _inputs: &[String],
    ) -> Result<Option<String>, StepFailed> {
        self.digest_started.store(true, Ordering::SeqCst);
        if let Some(n) = &self.digest_waits_for {
            let ran = wait_until(|| {
                self.runs
                    .lock()
                    .map(|r| r.iter().any(|x| x.contains(n.as_str())))
                    .unwrap_or(false)
            })
            .await;
            if !ran {
                return Err(StepFailed(format!("digest: `{n}` never ran")));
            }
        }
        Ok(match &step.vertex.op {
            Op::File(crate::graph::FileOp::Copy(c))
                if matches!(c.from, crate::graph::InputRef::Stage { .. }) =>
            {
                self.content.clone()
            }
            _ => None,
        })
    }

    async fn run(
        &self,
        step: Step,
        inputs: Vec<String>,
        _progress: Progress,
    ) -> Result<String, StepFailed> {
        if step.vertex.name.contains("WAITDIGEST")
            && !wait_until(|| self.digest_started.load(Ordering::SeqCst)).await
        {
            return Err(StepFailed(step.vertex.name));
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        if let Ok(mut r) = self.runs.lock() {
            r.push(step.vertex.name.clone());
        }
        // Inputs arrive, parent first.
        assert_eq!(inputs.len(), step_inputs_expected(&step));
        if matches!(step.vertex.op, Op::Exec(_)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        if step.vertex.name.contains("PANIC") {
            panic!("runner bug");
        }
        if step.vertex.name.contains("FAIL") {
            return Err(StepFailed(step.vertex.name));
        }
        if let Ok(mut s) = self.store.lock() {
            s.insert(step.key.clone());
        }
        Ok(step.key.0)
    }
}

fn step_inputs_expected(step: &Step) -> usize {
    match &step.vertex.op {
        Op::Source(_) => 0,
        // The parent, and the context or the `--from` stage.
        Op::File(crate::graph::FileOp::Copy(_)) => 2,
        _ => 1,
    }
}

fn setup(src: &str) -> (BuildGraph, Vec<VertexKey>) {
    let df = kiln_parser::parse(src).expect("parses");
    let g = plan(&df, &BuildOptions::default(), &EmptyImages).expect("plans");
    let keys = compute_keys(&g, None).expect("keys");
    (g, keys)
}

fn opts(jobs: usize) -> SolveOptions {
    SolveOptions {
        jobs,
        no_cache: false,
    }
}

/// `solve` with no progress, no history and `jobs` at once.
async fn quiet<R: StepRunner>(
    g: &BuildGraph,
    keys: &[VertexKey],
    runner: &Arc<R>,
    jobs: usize,
) -> Result<Solved<R::Output>, SolveError<R::Error>> {
    solve(
        g,
        keys,
        Arc::clone(runner),
        Progress::discard(),
        None,
        &opts(jobs),
    )
    .await
}

const PARALLEL: &str = "\
FROM busybox AS a
RUN sleep a
FROM busybox AS b
RUN sleep b
FROM busybox
COPY --from=a /a /a
COPY --from=b /b /b
";

#[tokio::test]
async fn independent_stages_run_in_parallel_within_jobs() {
    let (g, keys) = setup(PARALLEL);
    for (jobs, expect_max) in [(1, 1), (4, 2)] {
        let r = Arc::new(Recorder::default());
        let out = quiet(&g, &keys, &r, jobs).await.expect("solves");
        assert_eq!(out.outputs.len(), g.graph.node_count());
        let max = r.max_running.load(Ordering::SeqCst);
        assert!(max <= jobs, "jobs={jobs} max={max}");
        if jobs > 1 {
            assert!(max >= expect_max, "the two RUNs overlapped: max={max}");
        }
        // Inputs before consumers.
        let runs = r.runs.lock().map(|r| r.clone()).unwrap_or_default();
        let pos = |n: &str| {
            runs.iter()
                .position(|r| r.contains(n))
                .unwrap_or(usize::MAX)
        };
        assert!(pos("RUN sleep a") < pos("COPY --from=a"));
        assert!(pos("RUN sleep b") < pos("COPY --from=b"));
    }
}

#[tokio::test]
async fn a_rebuild_is_all_cache_hits() {
    let (g, keys) = setup(PARALLEL);
    let r = Arc::new(Recorder::default());
    let first = quiet(&g, &keys, &r, 2).await.expect("first");
    assert!(first.ran > 0);
    let runs_before = r.runs.lock().map(|r| r.len()).unwrap_or(0);
    let (p, mut rx) = Progress::channel();
    let second = solve(&g, &keys, Arc::clone(&r), p, None, &opts(2))
        .await
        .expect("second");
    assert_eq!(second.ran, 0);
    assert_eq!(second.cached, g.graph.node_count());
    assert_eq!(r.runs.lock().map(|r| r.len()).unwrap_or(0), runs_before);
    let mut cached = 0;
    while let Ok(e) = rx.try_recv() {
        assert!(!matches!(e, Event::VertexMiss { .. }), "{e:?}");
        cached += usize::from(matches!(e, Event::VertexCached { .. }));
    }
    assert_eq!(cached, g.graph.node_count());
    // --no-cache runs everything again.
    let mut o = opts(2);
    o.no_cache = true;
    let third = solve(&g, &keys, Arc::clone(&r), Progress::discard(), None, &o)
        .await
        .expect("third");
    assert!(third.ran >= 5, "ran {}", third.ran);
}

#[tokio::test]
async fn identical_steps_run_once() {
    let (g, keys) = setup(
        "FROM busybox AS a\nRUN echo hi\nFROM busybox AS b\nRUN echo hi\nFROM scratch\nCOPY --from=a / /a\nCOPY --from=b / /b\n",
    );
    let r = Arc::new(Recorder::default());
    let out = quiet(&g, &keys, &r, 4).await.expect("solves");
    let runs = r.runs.lock().map(|r| r.clone()).unwrap_or_default();
    assert_eq!(
        runs.iter().filter(|n| n.contains("RUN echo hi")).count(),
        1,
        "{runs:?}"
    );
    assert_eq!(out.outputs.len(), g.graph.node_count());
}

#[tokio::test]
async fn a_failure_stops_the_build_and_names_the_step() {
    let (g, keys) = setup("FROM busybox\nRUN ok\nRUN FAIL\nRUN after\n");
    let r = Arc::new(Recorder::default());
    let (p, mut rx) = Progress::channel();
    let e = solve(&g, &keys, Arc::clone(&r), p, None, &opts(2))
        .await
        .expect_err("fails");
    match &e {
        SolveError::Step { name, .. } => assert!(name.contains("RUN FAIL"), "{name}"),
        other => panic!("{other:?}"),
    }
    let runs = r.runs.lock().map(|r| r.clone()).unwrap_or_default();
    assert!(!runs.iter().any(|n| n.contains("RUN after")));
    let mut failed = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let Event::VertexFailed { error, .. } = ev {
            failed.push(error);
        }
    }
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("exited with code 1"), "{failed:?}");
}

#[tokio::test]
async fn misses_carry_their_causes_from_the_history() {
    let store = tempfile::tempdir().expect("store");
    let ctx = tempfile::tempdir().expect("ctx");
    fs_err::write(ctx.path().join("app.txt"), "v1").expect("write");
    let src = "FROM busybox\nCOPY app.txt /app.txt\nRUN cat /app.txt\n";
    let df = kiln_parser::parse(src).expect("parses");
    let g = plan(&df, &BuildOptions::default(), &EmptyImages).expect("plans");
    let keys_for = || {
        let mut c = crate::context::BuildContext::new(ctx.path(), None);
        compute_keys(&g, Some(&mut c)).expect("keys")
    };
    let r = Arc::new(Recorder::default());
    let keys = keys_for();
    let mut h = KeyHistory::open(store.path(), "scope").expect("history");
    solve(
        &g,
        &keys,
        Arc::clone(&r),
        Progress::discard(),
        Some(&h),
        &opts(2),
    )
    .await
    .expect("first");
    h.record(keys.iter().map(|k| &k.inputs)).expect("record");

    fs_err::write(ctx.path().join("app.txt"), "v2").expect("edit");
    let keys = keys_for();
    let (p, mut rx) = Progress::channel();
    let out = solve(&g, &keys, Arc::clone(&r), p, Some(&h), &opts(2))
        .await
        .expect("second");
    assert_eq!(out.ran, 2, "the COPY and the RUN after it");
    let mut misses = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::VertexMiss { causes, .. } = e {
            misses.push(causes);
        }
    }
    assert_eq!(
        misses[0],
        [MissCause::FileChanged {
            path: "app.txt".into()
        }]
    );
    assert!(
        matches!(&misses[1][0], MissCause::ParentChanged { name } if name.contains("COPY app.txt"))
    );
}

#[tokio::test]
async fn a_panicking_step_is_reported_by_name() {
    let (g, keys) = setup("FROM busybox\nRUN ok\nRUN PANIC\n");
    let r = Arc::new(Recorder::default());
    let e = quiet(&g, &keys, &r, 2).await.expect_err("aborts");
    assert!(
        matches!(&e, SolveError::Aborted { name } if name.contains("RUN PANIC")),
        "{e:?}"
    );
}

/// The ids of the vertices that got a `VertexCached` event.
fn cached_ids(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> HashSet<usize> {
    let mut ids = HashSet::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::VertexCached { id } = e {
            ids.insert(id);
        }
    }
    ids
}

#[tokio::test]
async fn config_steps_are_cached_only_when_their_parent_was() {
    let (g, keys) = setup("FROM busybox\nRUN make\nENV A=1\nLABEL x=y\nCMD [\"app\"]\n");
    let config: Vec<usize> = g
        .graph
        .node_indices()
        .filter(|v| matches!(g.graph[*v].op, Op::Config(_)))
        .map(|v| v.index())
        .collect();
    assert_eq!(config.len(), 3);
    let r = Arc::new(Recorder::default());
    let (p, mut rx) = Progress::channel();
    let first = solve(&g, &keys, Arc::clone(&r), p, None, &opts(2))
        .await
        .expect("first");
    let ids = cached_ids(&mut rx);
    for c in &config {
        assert!(
            !ids.contains(c),
            "{} CACHED on a first build",
            g.graph[VertexId::new(*c)].name
        );
    }
    // The config steps are neither run nor cached.
    assert_eq!(first.cached + first.ran + 3, g.graph.node_count());
    let (p, mut rx) = Progress::channel();
    let second = solve(&g, &keys, Arc::clone(&r), p, None, &opts(2))
        .await
        .expect("second");
    assert_eq!(second.ran, 0);
    let ids = cached_ids(&mut rx);
    for c in &config {
        assert!(
            ids.contains(c),
            "{} not CACHED on a rebuild",
            g.graph[VertexId::new(*c)].name
        );
    }
}

#[tokio::test]
async fn copy_from_a_stage_is_keyed_by_the_copied_content() {
    let build = |version: &str| {
        setup(&format!(
            "FROM busybox AS a\nRUN gen {version}\nFROM busybox\nCOPY --from=a /out /out\nENV X=1\nRUN use\n"
        ))
    };
    let r = Arc::new(Recorder {
        content: Some("sha256:same-files".into()),
        ..Recorder::default()
    });
    let (g, keys) = build("v1");
    quiet(&g, &keys, &r, 2).await.expect("first");
    // The stage changes, the files it gives the copy do not: only the
    // stage's RUN runs again.
    let (g, keys) = build("v2");
    let before = r.runs.lock().map(|r| r.len()).unwrap_or(0);
    let out = quiet(&g, &keys, &r, 2).await.expect("second");
    let runs = r
        .runs
        .lock()
        .map(|r| r[before..].to_vec())
        .unwrap_or_default();
    assert_eq!(out.ran, 1, "{runs:?}");
    assert!(runs[0].contains("RUN gen v2"), "{runs:?}");
    // Other content: the copy and what follows run.
    let r2 = Arc::new(Recorder {
        content: Some("sha256:other-files".into()),
        store: Mutex::new(r.store.lock().map(|s| s.clone()).unwrap_or_default()),
        ..Recorder::default()
    });
    let out = quiet(&g, &keys, &r2, 2).await.expect("third");
    let runs = r2.runs.lock().map(|r| r.clone()).unwrap_or_default();
    // The copy and the RUN (the ENV between them is done, not cached).
    assert_eq!(out.ran, 2, "{runs:?}");
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().any(|n| n.contains("COPY --from=a")), "{runs:?}");
    assert!(runs.iter().any(|n| n.contains("RUN use")), "{runs:?}");
}

#[tokio::test]
async fn an_edited_config_step_after_hits_is_done_and_says_why() {
    let store = tempfile::tempdir().expect("store");
    let mut h = KeyHistory::open(store.path(), "scope").expect("history");
    let r = Arc::new(Recorder::default());
    let (g, keys) = setup("FROM busybox\nRUN make\nENV MODE=release\n");
    solve(
        &g,
        &keys,
        Arc::clone(&r),
        Progress::discard(),
        Some(&h),
        &opts(2),
    )
    .await
    .expect("first");
    h.record(keys.iter().map(|k| &k.inputs)).expect("record");
    let env_id = |g: &BuildGraph| {
        g.graph
            .node_indices()
            .find(|v| matches!(g.graph[*v].op, Op::Config(_)))
            .map(|v| v.index())
            .expect("ENV vertex")
    };
    // Unchanged: CACHED.
    let (p, mut rx) = Progress::channel();
    solve(&g, &keys, Arc::clone(&r), p, Some(&h), &opts(2))
        .await
        .expect("second");
    assert!(cached_ids(&mut rx).contains(&env_id(&g)));
    // Edited: not CACHED, and the miss names the instruction.
    let (g, keys) = setup("FROM busybox\nRUN make\nENV MODE=debug\n");
    let (p, mut rx) = Progress::channel();
    let out = solve(&g, &keys, Arc::clone(&r), p, Some(&h), &opts(2))
        .await
        .expect("third");
    let id = env_id(&g);
    let mut cached = false;
    let mut causes = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            Event::VertexCached { id: i } if i == id => cached = true,
            Event::VertexMiss { id: i, causes: c } if i == id => causes = c,
            _ => {}
        }
    }
    assert!(!cached);
    assert!(
        matches!(&causes[..], [MissCause::InstructionChanged { after, .. }] if after.contains("MODE=debug")),
        "{causes:?}"
    );
    assert_eq!(out.ran, 0, "the ENV runs nothing");
}

#[tokio::test]
async fn a_content_checksum_does_not_hold_up_other_steps() {
    // The COPY's checksum only ends once `RUN late` ran, and `late` can
    // only start after `WAITDIGEST` (which waits for the checksum to begin)
    // is done: a scheduler that waited for the checksum would stall.
    let (g, keys) = setup(
        "FROM busybox AS a\nRUN a\nFROM busybox AS b\nRUN WAITDIGEST\nRUN late\nFROM busybox\nCOPY --from=a /x /x\nCOPY --from=b /y /y\n",
    );
    let r = Arc::new(Recorder {
        content: Some("sha256:c".into()),
        digest_waits_for: Some("RUN late".into()),
        ..Recorder::default()
    });
    let out = quiet(&g, &keys, &r, 4)
        .await
        .expect("solves without stalling");
    assert_eq!(out.outputs.len(), g.graph.node_count());
}

#[test]
fn only_the_stages_read_by_path_are_keyed_by_content() {
    let (g, keys) = setup(
        "FROM busybox AS a\nRUN a\nFROM busybox AS b\nRUN b\nFROM busybox\n\
         RUN --mount=type=bind,from=a,source=/x,target=/x --mount=type=cache,from=b,target=/c use\n\
         RUN --mount=type=bind,from=a,target=/whole whole\n",
    );
    let find = |needle: &str| {
        g.graph
            .node_indices()
            .find(|v| g.graph[*v].name.contains(needle))
            .expect("vertex")
    };
    let (use_v, whole_v) = (
        find("RUN --mount=type=bind,from=a,source=/x"),
        find("whole"),
    );
    assert!(needs_content(&g, use_v));
    assert!(!needs_content(&g, whole_v), "a whole stage keeps its key");
    let vk = keys.iter().find(|k| k.vertex == use_v).expect("key");
    let none = HashMap::new();
    let k1 = key_for(&g, use_v, vk, &none, Some("sha256:d".into()));
    assert_eq!(k1, key_for(&g, use_v, vk, &none, Some("sha256:d".into())));
    assert_ne!(k1, key_for(&g, use_v, vk, &none, Some("sha256:e".into())));
    // Stage b (a cache mount's seed) still counts by its key.
    let b_last = find("RUN b");
    let other: HashMap<VertexId, CacheKey> = [(b_last, CacheKey("sha256:other".into()))]
        .into_iter()
        .collect();
    assert_ne!(k1, key_for(&g, use_v, vk, &other, Some("sha256:d".into())));
    // Stage a's key does not: its files do.
    let a_last = find("RUN a");
    let other: HashMap<VertexId, CacheKey> = [(a_last, CacheKey("sha256:other".into()))]
        .into_iter()
        .collect();
    assert_eq!(k1, key_for(&g, use_v, vk, &other, Some("sha256:d".into())));
}

/// A [`Recorder`] that, as an imported cache, knows which keys would hit
/// and the content digests of copies by their inputs' keys.
struct WithImport {
    r: Recorder,
    hits: HashSet<CacheKey>,
    known: std::collections::BTreeMap<String, String>,
    /// Steps whose record is gone by the time they are looked up.
    vanish: Option<&'static str>,
}

impl StepRunner for WithImport {
    type Output = String;
    type Error = StepFailed;

    async fn lookup(&self, step: &Step) -> Result<Option<String>, StepFailed> {
        if self.vanish.is_some_and(|n| step.vertex.name.contains(n)) {
            return Ok(None);
        }
        Ok(self.would_hit(step).then(|| step.key.0.clone()))
    }

    fn would_hit(&self, step: &Step) -> bool {
        matches!(step.vertex.op, Op::Source(_)) || self.hits.contains(&step.key)
    }

    fn known_content(&self, id: &str) -> Option<String> {
        self.known.get(id).cloned()
    }

    async fn content_digest(
        &self,
        step: &Step,
        inputs: &[String],
    ) -> Result<Option<String>, StepFailed> {
        self.r.content_digest(step, inputs).await
    }

    async fn run(
        &self,
        step: Step,
        inputs: Vec<String>,
        progress: Progress,
    ) -> Result<String, StepFailed> {
        self.r.run(step, inputs, progress).await
    }
}

#[tokio::test]
async fn a_stage_only_a_cached_copy_reads_is_left_out() {
    let (g, keys) =
        setup("FROM busybox AS a\nRUN gen\nFROM busybox\nCOPY --from=a /out /out\nRUN use\n");
    let first = solve(
        &g,
        &keys,
        Arc::new(Recorder {
            content: Some("sha256:files".into()),
            ..Recorder::default()
        }),
        Progress::discard(),
        None,
        &opts(2),
    )
    .await
    .expect("first");
    assert_eq!(first.contents.len(), 1, "{:?}", first.contents);
    let target = g.target_stage().map(|s| s.index);
    let final_keys: HashSet<CacheKey> = first
        .keys
        .iter()
        .filter(|(v, _)| g.graph[**v].stage == target)
        .map(|(_, k)| k.clone())
        .collect();
    // Another machine has the final stage's records and the copy's
    // content digest (mode=min): it runs nothing, and not `RUN gen`.
    let runner = Arc::new(WithImport {
        r: Recorder::default(),
        hits: final_keys.clone(),
        known: first.contents.clone(),
        vanish: None,
    });
    let out = quiet(&g, &keys, &runner, 2).await.expect("second");
    let runs = runner.r.runs.lock().map(|r| r.clone()).unwrap_or_default();
    assert_eq!(out.ran, 0, "{runs:?} skipped {}", out.skipped);
    assert_eq!(out.skipped, 1);
    assert!(!runner.r.digest_started.load(Ordering::SeqCst));
    assert_eq!(runner.r.runs.lock().map(|r| r.len()).unwrap_or(1), 0);
    // Without the content digest the copy's key needs the stage: it runs.
    let runner = Arc::new(WithImport {
        r: Recorder {
            content: Some("sha256:files".into()),
            ..Recorder::default()
        },
        hits: final_keys.clone(),
        known: std::collections::BTreeMap::new(),
        vanish: None,
    });
    let out = quiet(&g, &keys, &runner, 2).await.expect("third");
    assert_eq!(out.skipped, 0);
    let runs = runner.r.runs.lock().map(|r| r.clone()).unwrap_or_default();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs[0].contains("RUN gen"), "{runs:?}");
    // The copy's record vanishes between the plan and its lookup: a clear
    // error, not a run without its stage.
    let runner = Arc::new(WithImport {
        r: Recorder::default(),
        hits: final_keys,
        known: first.contents.clone(),
        vanish: Some("COPY --from=a"),
    });
    let err = quiet(&g, &keys, &runner, 2)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("COPY --from=a") && err.contains("expected in the cache"),
        "{err}"
    );
}
