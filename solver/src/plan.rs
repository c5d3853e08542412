//! The planner: a parsed [`Dockerfile`] plus [`BuildOptions`] to a
//! [`BuildGraph`], with ARG and ENV handled as BuildKit's
//! `dockerfile2llb` does:
//!
//! * global ARGs (before the first FROM) start from the automatic platform
//!   args (`BUILDPLATFORM`, `TARGETARCH`, ...), take `--build-arg` values
//!   over their defaults, expand their defaults with the global args before
//!   them, and are visible in FROM lines only;
//! * inside a stage, `ARG name` without a default takes the global value;
//!   a `--build-arg` beats any default; a default is expanded with the
//!   stage's environment; a declared ARG with a value becomes an
//!   environment variable of the build state (RUN sees it) but not of the
//!   image config;
//! * ENV, LABEL, ADD, COPY, EXPOSE, STOPSIGNAL, USER, VOLUME, WORKDIR and
//!   `RUN --mount` options are expanded with the state's environment; all
//!   words of one instruction see the environment from BEFORE it
//!   (`ENV a=1 b=$a` uses the old `a`); RUN, CMD, ENTRYPOINT, SHELL,
//!   HEALTHCHECK and ONBUILD are never expanded;
//! * proxy args (`HTTP_PROXY`, ...) reach RUN without a declaration but
//!   stay out of the cache key and history unless declared;
//! * a stage built `FROM` another inherits its environment (ARGs
//!   included), config and ONBUILD triggers;
//! * only the stages the target needs are planned; `COPY --from` an
//!   unknown name is an image, a number is a stage index; stages must be
//!   used after they are defined and cycles are refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_parser::{
    Chmod, Command, Dockerfile, Healthcheck, Instruction, Lexer, MountType, ParseError,
    ShellOrExec, Source, Span,
};
use petgraph::graph::DiGraph;

use crate::graph::{
    BuildGraph, ConfigChange, CopyOp, CopySource, Edge, FileOp, HealthConfig, HistoryEntry,
    ImageConfig, InputRef, MountSpec, Op, Platform, RunOp, SourceOp, StageBase, StagePlan, Vertex,
    VertexId,
};

/// The proxy build args that need no ARG declaration.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Args that are never put in the environment (BuildKit's `nonEnvArgs`).
const NON_ENV_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

/// The `PATH` an image without one gets.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Options of one build that change the plan.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `--build-arg K=V`.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The platform the build runs on.
    pub build_platform: Platform,
    /// `--platform`, the platform of the result.
    pub target_platform: Platform,
    /// `--network`: the network of RUNs without their own `--network`
    /// (`None` or `Default`: the default). Part of their keys, as in
    /// BuildKit, where it is the exec op's network mode.
    pub network: Option<kiln_parser::Network>,
    /// `--add-host`: `/etc/hosts` lines (`IP\tNAME`) of every RUN.
    pub extra_hosts: Vec<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            build_args: BTreeMap::new(),
            target: None,
            build_platform: Platform::host(),
            target_platform: Platform::host(),
            network: None,
            extra_hosts: Vec::new(),
        }
    }
}

/// What the planner needs to know about a base image.
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    /// Its digest (a change is a "base image changed" miss).
    pub digest: Option<String>,
    /// Its config.
    pub config: ImageConfig,
}

/// An error from an [`ImageResolver`].
pub type ResolveError = Box<dyn std::error::Error + Send + Sync>;

/// Looks up base images (the store, or a registry) during planning.
pub trait ImageResolver {
    /// The config of `reference` for `platform`.
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ImageInfo, ResolveError>;
}

/// A resolver that knows no image: every base has an empty config. For
/// `kiln graph` and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyImages;

impl ImageResolver for EmptyImages {
    fn resolve(&self, _: &str, _: &Platform) -> Result<ImageInfo, ResolveError> {
        Ok(ImageInfo::default())
    }
}

/// Why a Dockerfile cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// No FROM.
    #[error("the Dockerfile has no stages to build\nhint: add a `FROM` line")]
    NoStages,
    /// `--target` names no stage.
    #[error(
        "target stage `{target}` could not be found{}",
        did_you_mean(suggestion)
    )]
    UnknownTarget {
        /// The target asked for.
        target: String,
        /// The closest stage name.
        suggestion: Option<String>,
    },
    /// Two stages with one name.
    #[error("line {line}: duplicate stage name `{name}` (first defined on line {first_line})")]
    DuplicateStage {
        /// The name.
        name: String,
        /// The second FROM.
        line: usize,
        /// The first FROM.
        first_line: usize,
    },
    /// A stage name BuildKit refuses.
    #[error(
        "line {line}: invalid stage name `{name}`\nhint: a stage name starts with a letter and has only letters, digits, `-`, `_` and `.`"
    )]
    InvalidStageName {
        /// The name.
        name: String,
        /// The FROM's line.
        line: usize,
    },
    /// `COPY --from=N` out of range.
    #[error("line {line}: invalid stage index {index} (the Dockerfile has {count} stages)")]
    StageIndex {
        /// The index.
        index: i64,
        /// The number of stages.
        count: usize,
        /// The instruction's line.
        line: usize,
    },
    /// Stages that depend on each other.
    #[error("line {line}: circular dependency detected on stage `{stage}` (cycle: {})", cycle.join(" -> "))]
    Cycle {
        /// The stage where the cycle was found.
        stage: String,
        /// The stages in the cycle.
        cycle: Vec<String>,
        /// The line of the instruction that closes the cycle.
        line: usize,
        /// Its column.
        column: usize,
    },
    /// A stage used before it is defined.
    #[error(
        "line {line}: cannot copy from stage `{from}`, it needs to be defined before current stage `{stage}`"
    )]
    UsedBeforeDefined {
        /// The referenced stage.
        from: String,
        /// The current stage.
        stage: String,
        /// The instruction's line.
        line: usize,
    },
    /// A variable expansion failed.
    #[error("line {line}: cannot expand `{keyword}` arguments")]
    Expand {
        /// The instruction keyword.
        keyword: String,
        /// Its line.
        line: usize,
        /// Its column.
        column: usize,
        /// The lexer's error.
        #[source]
        source: Box<kiln_parser::ExpandError>,
    },
    /// FROM expanded to nothing.
    #[error(
        "line {line}: base name (`{raw}`) should not be blank{}",
        unset_hint(unset)
    )]
    BlankBaseName {
        /// The FROM argument as written.
        raw: String,
        /// Variables it used that are unset.
        unset: Vec<String>,
        /// The line.
        line: usize,
    },
    /// `FROM --platform` that does not parse.
    #[error(
        "line {line}: invalid platform `{value}` (from `{raw}`){}",
        unset_hint(unset)
    )]
    Platform {
        /// The value after expansion.
        value: String,
        /// As written.
        raw: String,
        /// Unset variables it used.
        unset: Vec<String>,
        /// The line.
        line: usize,
    },
    /// The image resolver failed.
    #[error(
        "line {line}: cannot resolve base image `{reference}`{}",
        did_you_mean(suggestion)
    )]
    ResolveImage {
        /// The reference.
        reference: String,
        /// A stage name close to it.
        suggestion: Option<String>,
        /// The FROM (or COPY) line.
        line: usize,
        /// The resolver's error.
        #[source]
        source: ResolveError,
    },
    /// An ONBUILD trigger that does not parse.
    #[error("line {line}: cannot parse the ONBUILD trigger `{trigger}`")]
    Trigger {
        /// The trigger text.
        trigger: String,
        /// The FROM line.
        line: usize,
        /// The parse error.
        #[source]
        source: Box<ParseError>,
    },
    /// An ONBUILD trigger that is not allowed.
    #[error("line {line}: `{keyword}` is not allowed as an ONBUILD trigger")]
    TriggerKeyword {
        /// The keyword.
        keyword: String,
        /// The line.
        line: usize,
    },
    /// A bad EXPOSE port.
    #[error("line {line}: invalid port `{port}` in EXPOSE")]
    Port {
        /// The port spec.
        port: String,
        /// The line.
        line: usize,
    },
}

fn did_you_mean(s: &Option<String>) -> String {
    match s {
        Some(s) => format!("\nhint: did you mean `{s}`?"),
        None => String::new(),
    }
}

fn unset_hint(unset: &[String]) -> String {
    if unset.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = unset.iter().map(|u| format!("`{u}`")).collect();
        format!(
            "\nhint: unset variable(s) {}; pass them with --build-arg or give the ARG a default",
            names.join(", ")
        )
    }
}

/// The closest candidate to `word` (Levenshtein distance at most a third
/// of its length, at least 1), case-insensitively.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let w = word.to_lowercase();
    let max = (w.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (levenshtein(&w, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= max)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// An ordered environment with replace-in-place (llb's `AddOrReplace`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct EnvList(Vec<(String, String)>);

impl EnvList {
    fn set(&mut self, k: &str, v: &str) {
        match self.0.iter_mut().find(|(key, _)| key == k) {
            Some(kv) => kv.1 = v.to_owned(),
            None => self.0.push((k.to_owned(), v.to_owned())),
        }
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

impl kiln_parser::Env for EnvList {
    fn lookup(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.get(name).map(std::borrow::Cow::Borrowed)
    }
}

/// Plan a build.
pub fn plan(
    dockerfile: &Dockerfile,
    opts: &BuildOptions,
    resolver: &dyn ImageResolver,
) -> Result<BuildGraph, PlanError> {
    Planner::new(dockerfile, opts, resolver)?.run()
}

/// Per-stage facts known before planning.
struct StageInfo<'a> {
    from: &'a Instruction,
    name: Option<String>,
    /// The FROM argument expanded with the global args.
    base_name: String,
    /// Variables the FROM line used (for miss causes).
    base_vars: BTreeMap<String, String>,
    platform: Option<Platform>,
    /// The stage this one is built on.
    base_stage: Option<usize>,
    instructions: &'a [Instruction],
    /// Stages it reads (FROM, COPY --from, RUN --mount from=), with the
    /// line that reads them.
    deps: Vec<(usize, &'a Instruction)>,
}

struct Planner<'a> {
    df: &'a Dockerfile,
    opts: &'a BuildOptions,
    resolver: &'a dyn ImageResolver,
    lexer: Lexer,
    global: EnvList,
    stages: Vec<StageInfo<'a>>,
    by_name: HashMap<String, usize>,
    used_args: BTreeSet<String>,
}

/// The running state of one stage while it is planned.
#[derive(Debug, Clone)]
struct StageState {
    env: EnvList,
    config: ImageConfig,
    /// Declared ARGs of this stage (and its bases), with values.
    build_args: Vec<(String, Option<String>)>,
    cmd_set: bool,
    history: Vec<HistoryEntry>,
    /// ONBUILD instructions of this stage, for stages built on it.
    onbuild: Vec<Instruction>,
}

impl<'a> Planner<'a> {
    fn new(
        df: &'a Dockerfile,
        opts: &'a BuildOptions,
        resolver: &'a dyn ImageResolver,
    ) -> Result<Self, PlanError> {
        let lexer = Lexer::new(df.escape);
        let mut p = Self {
            df,
            opts,
            resolver,
            lexer,
            global: EnvList::default(),
            stages: Vec::new(),
            by_name: HashMap::new(),
            used_args: BTreeSet::new(),
        };
        p.global_args()?;
        p.collect_stages()?;
        Ok(p)
    }

    /// BuildKit's `defaultArgs` + `buildMetaArgs`.
    fn global_args(&mut self) -> Result<(), PlanError> {
        let (b, t) = (&self.opts.build_platform, &self.opts.target_platform);
        for (k, v) in [
            ("BUILDPLATFORM", b.to_string()),
            ("BUILDOS", b.os.clone()),
            ("BUILDARCH", b.architecture.clone()),
            ("BUILDVARIANT", b.variant.clone()),
            ("TARGETPLATFORM", t.to_string()),
            ("TARGETOS", t.os.clone()),
            ("TARGETARCH", t.architecture.clone()),
            ("TARGETVARIANT", t.variant.clone()),
        ] {
            self.global.set(k, &v);
        }
        for inst in self.df.global_args() {
            let Command::Arg(arg) = &inst.command else {
                continue;
            };
            for def in &arg.args {
                self.used_args.insert(def.name.clone());
                let value = match self.opts.build_args.get(&def.name) {
                    Some(v) => Some(v.clone()),
                    None => match &def.default {
                        Some(d) => Some(expand_word(&self.lexer, d, &self.global, inst)?.0),
                        None => None,
                    },
                };
                if let Some(v) = value {
                    self.global.set(&def.name, &v);
                }
            }
        }
        Ok(())
    }

    fn collect_stages(&mut self) -> Result<(), PlanError> {
        let stages = self.df.stages();
        if stages.is_empty() {
            return Err(PlanError::NoStages);
        }
        for (i, st) in stages.iter().enumerate() {
            let line = st.from.span.start.line;
            let exp = self
                .lexer
                .process_word_with_matches(&st.base.image, &self.global)
                .map_err(|source| expand_error(st.from, source))?;
            if exp.result.is_empty() {
                return Err(PlanError::BlankBaseName {
                    raw: st.base.image.clone(),
                    unset: exp.unmatched.into_iter().collect(),
                    line,
                });
            }
            let mut base_vars: BTreeMap<String, String> = exp
                .matched
                .iter()
                .filter_map(|k| self.global.get(k).map(|v| (k.clone(), v.to_owned())))
                .collect();
            let platform = match &st.base.platform {
                Some(raw) => {
                    let pe = self
                        .lexer
                        .process_word_with_matches(raw, &self.global)
                        .map_err(|source| expand_error(st.from, source))?;
                    for k in &pe.matched {
                        if let Some(v) = self.global.get(k) {
                            base_vars.insert(k.clone(), v.to_owned());
                        }
                    }
                    match Platform::parse(&pe.result) {
                        Some(p) => Some(p),
                        None => {
                            return Err(PlanError::Platform {
                                value: pe.result,
                                raw: raw.clone(),
                                unset: pe.unmatched.into_iter().collect(),
                                line,
                            });
                        }
                    }
                }
                None => None,
            };
            // BuildKit's addState: a FROM names a stage only if that stage
            // came before (a later one is an image of that name).
            let base_stage = self.by_name.get(&exp.result.to_lowercase()).copied();
            if let Some(name) = &st.base.name {
                if !valid_stage_name(name) {
                    return Err(PlanError::InvalidStageName {
                        name: name.clone(),
                        line,
                    });
                }
                if let Some(&first) = self.by_name.get(name) {
                    return Err(PlanError::DuplicateStage {
                        name: name.clone(),
                        line,
                        first_line: self.stages[first].from.span.start.line,
                    });
                }
                self.by_name.insert(name.clone(), i);
            }
            self.stages.push(StageInfo {
                from: st.from,
                name: st.base.name.clone(),
                base_name: exp.result,
                base_vars,
                platform,
                base_stage,
                instructions: st.instructions,
                deps: Vec::new(),
            });
        }
        // Stage dependencies (BuildKit's toCommand/detectRunMount).
        for i in 0..self.stages.len() {
            let mut deps = Vec::new();
            if let Some(b) = self.stages[i].base_stage {
                deps.push((b, self.stages[i].from));
            }
            for inst in self.stages[i].instructions {
                for from in stage_refs(inst) {
                    if let Some(s) = self.stage_ref(from, inst)? {
                        deps.push((s, inst));
                    }
                }
            }
            self.stages[i].deps = deps;
        }
        Ok(())
    }

    /// Resolve a `--from` value: a stage index, a stage name, or `None` for
    /// an image.
    fn stage_ref(&self, from: &str, inst: &Instruction) -> Result<Option<usize>, PlanError> {
        if let Ok(index) = from.parse::<i64>() {
            return match usize::try_from(index) {
                Ok(i) if i < self.stages.len() => Ok(Some(i)),
                _ => Err(PlanError::StageIndex {
                    index,
                    count: self.stages.len(),
                    line: inst.span.start.line,
                }),
            };
        }
        Ok(self.by_name.get(&from.to_lowercase()).copied())
    }

    fn stage_display(&self, i: usize) -> String {
        self.stages[i]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{i}"))
    }

    fn target_index(&self) -> Result<usize, PlanError> {
        match &self.opts.target {
            None => Ok(self.stages.len() - 1),
            Some(t) => self.by_name.get(&t.to_lowercase()).copied().ok_or_else(|| {
                PlanError::UnknownTarget {
                    target: t.clone(),
                    suggestion: suggest(t, self.by_name.keys().map(String::as_str)),
                }
            }),
        }
    }

    /// Depth-first search from the target: the stages it needs, and any
    /// cycle among them.
    fn reachable(&self, target: usize) -> Result<BTreeSet<usize>, PlanError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let mut mark = vec![Mark::New; self.stages.len()];
        let mut path: Vec<usize> = Vec::new();
        // Iterative DFS: (stage, next dep index).
        let mut stack: Vec<(usize, usize)> = vec![(target, 0)];
        mark[target] = Mark::Active;
        path.push(target);
        while let Some(&mut (s, ref mut next)) = stack.last_mut() {
            if let Some(&(d, inst)) = self.stages[s].deps.get(*next) {
                *next += 1;
                match mark[d] {
                    Mark::Active => {
                        let start = path.iter().position(|&p| p == d).unwrap_or(0);
                        let mut cycle: Vec<String> = path[start..]
                            .iter()
                            .map(|&p| self.stage_display(p))
                            .collect();
                        cycle.push(self.stage_display(d));
                        return Err(PlanError::Cycle {
                            stage: self.stage_display(s),
                            cycle,
                            line: inst.span.start.line,
                            column: inst.span.start.column,
                        });
                    }
                    Mark::New => {
                        mark[d] = Mark::Active;
                        path.push(d);
                        stack.push((d, 0));
                    }
                    Mark::Done => {}
                }
            } else {
                mark[s] = Mark::Done;
                path.pop();
                stack.pop();
            }
        }
        Ok((0..self.stages.len())
            .filter(|&i| mark[i] == Mark::Done)
            .collect())
    }

    fn run(mut self) -> Result<BuildGraph, PlanError> {
        let target = self.target_index()?;
        let needed = self.reachable(target)?;
        for &s in &needed {
            for &(d, inst) in &self.stages[s].deps {
                if d > s {
                    return Err(PlanError::UsedBeforeDefined {
                        from: self.stage_display(d),
                        stage: self.stage_display(s),
                        line: inst.span.start.line,
                    });
                }
            }
        }
        let mut b = GraphBuilder::default();
        let mut states: BTreeMap<usize, StageState> = BTreeMap::new();
        let mut plans: Vec<StagePlan> = Vec::new();
        for &s in &needed {
            let (plan, state) = self.plan_stage(s, &mut b, &states, &plans)?;
            states.insert(s, state);
            plans.push(plan);
        }
        let target_pos = plans.iter().position(|p| p.index == target).unwrap_or(0);
        let unused_build_args = self
            .opts
            .build_args
            .keys()
            .filter(|k| !self.used_args.contains(*k) && !PROXY_ARGS.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok(BuildGraph {
            graph: b.graph,
            stages: plans,
            target: target_pos,
            context: b.context,
            unused_build_args,
        })
    }

    fn plan_stage(
        &mut self,
        s: usize,
        b: &mut GraphBuilder,
        states: &BTreeMap<usize, StageState>,
        plans: &[StagePlan],
    ) -> Result<(StagePlan, StageState), PlanError> {
        let info = &self.stages[s];
        let from = info.from;
        let line = from.span.start.line;
        let platform = info
            .platform
            .clone()
            .unwrap_or_else(|| self.opts.target_platform.clone());
        let display = self.stage_display(s);
        let total = info.instructions.len() + 1;
        let base_vars = info.base_vars.clone();
        let (base, first, mut state, mut triggers) = match info.base_stage {
            Some(parent) => {
                let pstate = states
                    .get(&parent)
                    .cloned()
                    .ok_or(PlanError::UsedBeforeDefined {
                        from: self.stage_display(parent),
                        stage: display.clone(),
                        line,
                    })?;
                let plast = plans
                    .iter()
                    .find(|p| p.index == parent)
                    .map(|p| p.last)
                    .ok_or(PlanError::UsedBeforeDefined {
                        from: self.stage_display(parent),
                        stage: display.clone(),
                        line,
                    })?;
                let v = b.add(Vertex {
                    op: Op::StageRef {
                        stage: parent,
                        name: self.stage_display(parent),
                    },
                    stage: Some(s),
                    instruction: None,
                    span: Some(from.span),
                    name: format!("[{display} 1/{total}] FROM {}", self.stage_display(parent)),
                    history: None,
                    used_vars: base_vars,
                });
                b.edge(plast, v, Edge::Parent);
                let mut st = pstate;
                let triggers = std::mem::take(&mut st.onbuild);
                st.config.on_build.clear();
                st.history.clear();
                st.cmd_set = false;
                let triggers: Vec<String> = triggers.iter().map(trigger_text).collect();
                (StageBase::Stage { index: parent }, v, st, triggers)
            }
            None => {
                let scratch = info.base_name.eq_ignore_ascii_case("scratch");
                let (op, image) = if scratch {
                    (SourceOp::Scratch, ImageInfo::default())
                } else {
                    let image =
                        self.resolver
                            .resolve(&info.base_name, &platform)
                            .map_err(|source| PlanError::ResolveImage {
                                reference: info.base_name.clone(),
                                suggestion: suggest(
                                    &info.base_name,
                                    self.by_name.keys().map(String::as_str),
                                ),
                                line,
                                source,
                            })?;
                    (
                        SourceOp::Image {
                            reference: info.base_name.clone(),
                            platform: platform.clone(),
                            digest: image.digest.clone(),
                        },
                        image,
                    )
                };
                let src = b.source(op);
                // A per-stage vertex for the FROM so the stage has its own
                // first vertex even when two stages share a base.
                let v = b.add(Vertex {
                    op: Op::StageRef {
                        stage: s,
                        name: info.base_name.clone(),
                    },
                    stage: Some(s),
                    instruction: None,
                    span: Some(from.span),
                    name: format!("[{display} 1/{total}] FROM {}", info.base_name),
                    history: None,
                    used_vars: base_vars,
                });
                b.edge(src, v, Edge::Parent);
                let mut config = image.config;
                if config.env_get("PATH").is_none() {
                    config.env_set("PATH", DEFAULT_PATH);
                }
                let mut env = EnvList::default();
                for kv in &config.env {
                    let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                    env.set(k, v);
                }
                let triggers = std::mem::take(&mut config.on_build);
                let base = if scratch {
                    StageBase::Scratch
                } else {
                    StageBase::Image {
                        reference: info.base_name.clone(),
                    }
                };
                let st = StageState {
                    env,
                    config,
                    build_args: Vec::new(),
                    cmd_set: false,
                    history: Vec::new(),
                    onbuild: Vec::new(),
                };
                (base, v, st, triggers)
            }
        };
        // ONBUILD triggers of the base run first, located at the FROM.
        let mut instructions: Vec<Instruction> = Vec::new();
        for t in triggers.drain(..) {
            // The parser refuses instructions before a FROM: parse the
            // trigger as the body of a stage.
            let parsed = kiln_parser::parse(&format!("FROM scratch\n{t}\n")).map_err(|e| {
                PlanError::Trigger {
                    trigger: t.clone(),
                    line,
                    source: Box::new(e),
                }
            })?;
            for mut inst in parsed.instructions.into_iter().skip(1) {
                if matches!(
                    inst.command,
                    Command::From(_) | Command::Onbuild(_) | Command::Maintainer(_)
                ) {
                    return Err(PlanError::TriggerKeyword {
                        keyword: inst.keyword.to_uppercase(),
                        line,
                    });
                }
                inst.span = from.span;
                instructions.push(inst);
            }
        }
        instructions.extend(self.stages[s].instructions.iter().cloned());
        let total = instructions.len() + 1;
        let mut last = first;
        for (n, inst) in instructions.iter().enumerate() {
            let step = StepCtx {
                stage: s,
                workdir: workdir_of(&state.config),
                index: n,
                name: format!("[{display} {}/{total}] {}", n + 2, short(&inst.original)),
                plans,
            };
            last = self.plan_instruction(inst, &step, &mut state, b, last)?;
        }
        let plan = StagePlan {
            index: s,
            name: self.stages[s].name.clone(),
            base,
            platform,
            first,
            last,
            config: state.config.clone(),
            history: state.history.clone(),
            span: from.span,
        };
        Ok((plan, state))
    }

    fn plan_instruction(
        &mut self,
        inst: &Instruction,
        step: &StepCtx<'_>,
        st: &mut StageState,
        b: &mut GraphBuilder,
        parent: VertexId,
    ) -> Result<VertexId, PlanError> {
        let lexer = self.lexer;
        let mut used = BTreeMap::new();
        // Every word of one instruction sees the env from before it.
        let env = st.env.clone();
        let mut x = |w: &str| -> Result<String, PlanError> {
            let (r, m) = expand_word(&lexer, w, &env, inst)?;
            used.extend(m);
            Ok(r)
        };
        let workdir = workdir_of(&st.config);
        let mut extra_inputs: Vec<VertexId> = Vec::new();
        let (op, history) = match &inst.command {
            Command::From(_) => {
                // `Dockerfile::stages` splits at every FROM and triggers
                // with FROM are refused, so this is never reached.
                return Err(PlanError::TriggerKeyword {
                    keyword: "FROM".to_owned(),
                    line: inst.span.start.line,
                });
            }
            Command::Arg(arg) => {
                let mut out = Vec::new();
                for def in &arg.args {
                    self.used_args.insert(def.name.clone());
                    let has_value = self.opts.build_args.get(&def.name);
                    let mut value = None;
                    if def.default.is_none() && has_value.is_none() {
                        value = self.global.get(&def.name).map(str::to_owned);
                    }
                    if let Some(v) = has_value {
                        value = Some(v.clone());
                    } else if let Some(d) = &def.default {
                        let (r, m) = expand_word(&lexer, d, &st.env, inst)?;
                        used.extend(m);
                        value = Some(r);
                    }
                    if let Some(v) = &value {
                        if !NON_ENV_ARGS.contains(&def.name.as_str()) {
                            st.env.set(&def.name, v);
                        }
                        used.insert(def.name.clone(), v.clone());
                    }
                    st.build_args.retain(|(k, _)| k != &def.name);
                    st.build_args.push((def.name.clone(), value.clone()));
                    out.push((def.name.clone(), value));
                }
                let text: Vec<String> = out
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => format!("{k}={v}"),
                        None => k.clone(),
                    })
                    .collect();
                (
                    Op::Config(ConfigChange::Arg(out)),
                    empty_history(format!("ARG {}", text.join(" "))),
                )
            }
            Command::Env(kvs) => {
                let mut pairs = Vec::new();
                for kv in &kvs.pairs {
                    pairs.push((x(&kv.key)?, x(&kv.value)?));
                }
                let mut text = String::from("ENV");
                for (k, v) in &pairs {
                    st.env.set(k, v);
                    st.config.env_set(k, v);
                    text.push_str(&format!(" {k}={v}"));
                }
                (Op::Config(ConfigChange::Env(pairs)), empty_history(text))
            }
            Command::Label(kvs) => {
                let mut pairs = Vec::new();
                for kv in &kvs.pairs {
                    pairs.push((x(&kv.key)?, x(&kv.value)?));
                }
                let mut text = String::from("LABEL");
                for (k, v) in &pairs {
                    st.config.labels.insert(k.clone(), v.clone());
                    text.push_str(&format!(" {k}={v}"));
                }
                (Op::Config(ConfigChange::Label(pairs)), empty_history(text))
            }
            Command::User(u) => {
                let v = x(&u.value)?;
                st.config.user.clone_from(&v);
                let h = empty_history(format!("USER {v}"));
                (Op::Config(ConfigChange::User(v)), h)
            }
            Command::Stopsignal(sig) => {
                let v = x(&sig.value)?;
                st.config.stop_signal = Some(v.clone());
                let h = empty_history(format!("STOPSIGNAL {v}"));
                (Op::Config(ConfigChange::StopSignal(v)), h)
            }
            Command::Maintainer(m) => {
                let h = empty_history(format!("MAINTAINER {}", m.value));
                (Op::Config(ConfigChange::Maintainer(m.value.clone())), h)
            }
            Command::Volume(vol) => {
                let mut paths = Vec::new();
                for p in &vol.paths {
                    let v = x(p)?;
                    if v.is_empty() {
                        continue;
                    }
                    st.config.volumes.insert(v.clone());
                    paths.push(v);
                }
                let h = empty_history(format!("VOLUME [{}]", paths.join(" ")));
                (Op::Config(ConfigChange::Volume(paths)), h)
            }
            Command::Expose(e) => {
                let mut ports = Vec::new();
                for p in &e.ports {
                    let (words, m) = expand_words(&lexer, p, &env, inst)?;
                    used.extend(m);
                    for w in words {
                        for port in expand_port(&w).ok_or_else(|| PlanError::Port {
                            port: w.clone(),
                            line: inst.span.start.line,
                        })? {
                            st.config.exposed_ports.insert(port.clone());
                            ports.push(port);
                        }
                    }
                }
                // Go's `%v` of the port set: a map, printed sorted.
                let set: BTreeSet<&String> = ports.iter().collect();
                let text: Vec<String> = set.iter().map(|p| format!("{p}:{{}}")).collect();
                let h = empty_history(format!("EXPOSE map[{}]", text.join(" ")));
                (Op::Config(ConfigChange::Expose(ports)), h)
            }
            Command::Workdir(w) => {
                let v = x(&w.value)?;
                let path = if v.starts_with('/') {
                    clean_abs(&v)
                } else {
                    clean_abs(&format!("{workdir}/{v}"))
                };
                st.config.working_dir.clone_from(&path);
                // BuildKit adds a layer (mkdir) unless the path is `/`.
                let mut h = empty_history(format!("WORKDIR {path}"));
                h.empty_layer = path == "/";
                (
                    Op::File(FileOp::Mkdir {
                        path,
                        user: st.config.user.clone(),
                    }),
                    h,
                )
            }
            Command::Shell(sh) => {
                st.config.shell = Some(sh.shell.clone());
                let h = empty_history(format!("SHELL [{}]", sh.shell.join(" ")));
                (Op::Config(ConfigChange::Shell(sh.shell.clone())), h)
            }
            Command::Cmd(c) => {
                let args = argv(&c.command, &st.config);
                st.config.cmd = Some(args.clone());
                st.cmd_set = true;
                let h = empty_history(format!("CMD [{}]", quote_list(&args)));
                (Op::Config(ConfigChange::Cmd(args)), h)
            }
            Command::Entrypoint(c) => {
                let args = argv(&c.command, &st.config);
                st.config.entrypoint = Some(args.clone());
                // ENTRYPOINT resets a CMD inherited from the base.
                if !st.cmd_set {
                    st.config.cmd = None;
                }
                let h = empty_history(format!("ENTRYPOINT [{}]", quote_list(&args)));
                (Op::Config(ConfigChange::Entrypoint(args)), h)
            }
            Command::Healthcheck(hc) => {
                let cfg = match hc {
                    Healthcheck::None => HealthConfig {
                        test: vec!["NONE".to_owned()],
                        interval_ns: 0,
                        timeout_ns: 0,
                        start_period_ns: 0,
                        start_interval_ns: 0,
                        retries: 0,
                    },
                    Healthcheck::Cmd {
                        interval_ns,
                        timeout_ns,
                        start_period_ns,
                        start_interval_ns,
                        retries,
                        command,
                    } => HealthConfig {
                        test: match command {
                            ShellOrExec::Shell(s) => vec!["CMD-SHELL".to_owned(), s.clone()],
                            ShellOrExec::Exec(a) => {
                                let mut t = vec!["CMD".to_owned()];
                                t.extend(a.iter().cloned());
                                t
                            }
                        },
                        interval_ns: *interval_ns,
                        timeout_ns: *timeout_ns,
                        start_period_ns: *start_period_ns,
                        start_interval_ns: *start_interval_ns,
                        retries: *retries,
                    },
                };
                st.config.healthcheck = Some(cfg.clone());
                let h = empty_history(format!("HEALTHCHECK {}", cfg.test.join(" ")));
                (Op::Config(ConfigChange::Healthcheck(cfg)), h)
            }
            Command::Onbuild(inner) => {
                let text = trigger_text(inner);
                st.config.on_build.push(text.clone());
                st.onbuild.push((**inner).clone());
                let h = empty_history(format!("ONBUILD {text}"));
                (Op::Config(ConfigChange::OnBuild(text)), h)
            }
            Command::Run(run) => {
                let mut mounts = Vec::new();
                for m in &run.mounts {
                    let spec = self.mount_spec(m, inst, &env, &mut used, step, b)?;
                    if let Some(v) = spec.1 {
                        extra_inputs.push(v);
                    }
                    mounts.push(spec.0);
                }
                let args = argv(&run.command, &st.config);
                let proxy_env = PROXY_ARGS
                    .iter()
                    .filter(|k| st.env.get(k).is_none())
                    .filter_map(|k| {
                        self.opts
                            .build_args
                            .get(*k)
                            .map(|v| ((*k).to_owned(), v.clone()))
                    })
                    .collect();
                let h = HistoryEntry {
                    created_by: run_created_by(&args, &st.build_args),
                    empty_layer: false,
                };
                (
                    Op::Exec(RunOp {
                        args,
                        shell_form: matches!(run.command, ShellOrExec::Shell(_)),
                        heredocs: run.heredocs.clone(),
                        env: st.env.0.clone(),
                        proxy_env,
                        workdir: workdir.clone(),
                        user: st.config.user.clone(),
                        // `RUN --network=default` is the build's network.
                        network: match run.network {
                            None | Some(kiln_parser::Network::Default) => self
                                .opts
                                .network
                                .filter(|n| *n != kiln_parser::Network::Default),
                            n => n,
                        },
                        security: run.security,
                        mounts,
                        extra_hosts: self.opts.extra_hosts.clone(),
                    }),
                    h,
                )
            }
            Command::Copy(c) => {
                let (from, input) = self.copy_from(c.from.as_deref(), inst, step, b)?;
                if let Some(v) = input {
                    extra_inputs.push(v);
                }
                let sources = self.copy_sources(&c.sources, false, &mut x, &env, inst)?;
                let op = CopyOp {
                    add: false,
                    from,
                    sources,
                    dest: x(&c.dest)?,
                    workdir: workdir.clone(),
                    chown: c.chown.as_deref().map(&mut x).transpose()?,
                    chmod: c.chmod.as_ref().map(|m| x(&chmod_text(m))).transpose()?,
                    link: c.link,
                    parents: c.parents,
                    exclude: c.exclude.clone(),
                    checksum: None,
                    unpack: None,
                    keep_git_dir: false,
                };
                let h = HistoryEntry {
                    created_by: copy_created_by("COPY", &op),
                    empty_layer: false,
                };
                (Op::File(FileOp::Copy(op)), h)
            }
            Command::Add(a) => {
                let sources = self.copy_sources(&a.sources, true, &mut x, &env, inst)?;
                if sources.iter().any(|s| matches!(s, CopySource::Path { .. })) {
                    extra_inputs.push(b.context());
                }
                let op = CopyOp {
                    add: true,
                    from: InputRef::Context,
                    sources,
                    dest: x(&a.dest)?,
                    workdir: workdir.clone(),
                    chown: a.chown.as_deref().map(&mut x).transpose()?,
                    chmod: a.chmod.as_ref().map(|m| x(&chmod_text(m))).transpose()?,
                    link: a.link,
                    parents: false,
                    exclude: a.exclude.clone(),
                    checksum: a.checksum.as_deref().map(&mut x).transpose()?,
                    unpack: a.unpack,
                    keep_git_dir: a.keep_git_dir,
                };
                let h = HistoryEntry {
                    created_by: copy_created_by("ADD", &op),
                    empty_layer: false,
                };
                (Op::File(FileOp::Copy(op)), h)
            }
        };
        // Variables this op used: those its words expanded plus, for RUN,
        // the declared ARGs (they are in its env).
        if matches!(op, Op::Exec(_)) {
            for (k, v) in &st.build_args {
                if let Some(v) = v {
                    used.insert(k.clone(), v.clone());
                }
            }
        }
        st.history.push(history.clone());
        let v = b.add(Vertex {
            op,
            stage: Some(step.stage),
            instruction: Some(step.index),
            span: Some(inst.span),
            name: step.name.clone(),
            history: Some(history),
            used_vars: used,
        });
        b.edge(parent, v, Edge::Parent);
        for input in extra_inputs {
            b.edge(input, v, Edge::Source);
        }
        Ok(v)
    }

    /// `COPY --from`: the input and the vertex to connect.
    fn copy_from(
        &self,
        from: Option<&str>,
        inst: &Instruction,
        step: &StepCtx<'_>,
        b: &mut GraphBuilder,
    ) -> Result<(InputRef, Option<VertexId>), PlanError> {
        let Some(from) = from else {
            return Ok((InputRef::Context, Some(b.context())));
        };
        match self.stage_ref(from, inst)? {
            Some(index) => {
                let last = step
                    .plans
                    .iter()
                    .find(|p| p.index == index)
                    .map(|p| p.last)
                    .ok_or_else(|| PlanError::UsedBeforeDefined {
                        from: self.stage_display(index),
                        stage: self.stage_display(step.stage),
                        line: inst.span.start.line,
                    })?;
                Ok((InputRef::Stage { index }, Some(last)))
            }
            None => {
                // An image: resolve it for its digest (a new digest is a
                // "base image changed" miss); a name that is no image but
                // looks like a stage gets a "did you mean".
                let platform = self.opts.target_platform.clone();
                let image = self.resolver.resolve(from, &platform).map_err(|source| {
                    PlanError::ResolveImage {
                        reference: from.to_owned(),
                        suggestion: suggest(from, self.by_name.keys().map(String::as_str)),
                        line: inst.span.start.line,
                        source,
                    }
                })?;
                let v = b.source(SourceOp::Image {
                    reference: from.to_owned(),
                    platform,
                    digest: image.digest,
                });
                Ok((
                    InputRef::Image {
                        reference: from.to_owned(),
                    },
                    Some(v),
                ))
            }
        }
    }

    fn copy_sources(
        &self,
        sources: &[Source],
        add: bool,
        x: &mut impl FnMut(&str) -> Result<String, PlanError>,
        env: &EnvList,
        inst: &Instruction,
    ) -> Result<Vec<CopySource>, PlanError> {
        let mut out = Vec::new();
        for s in sources {
            out.push(match s {
                Source::Path { path } => {
                    let p = x(path)?;
                    if add && (p.starts_with("http://") || p.starts_with("https://")) {
                        CopySource::Url { url: p }
                    } else {
                        CopySource::Path { path: p }
                    }
                }
                Source::Heredoc {
                    name,
                    content,
                    expand,
                } => {
                    let content = if *expand {
                        // BuildKit expands heredoc bodies with quotes kept.
                        let raw = Lexer::new('\\').with_skip_process_quotes(true);
                        expand_word(&raw, content, env, inst)?.0
                    } else {
                        content.clone()
                    };
                    CopySource::Heredoc {
                        name: name.clone(),
                        content,
                    }
                }
            });
        }
        Ok(out)
    }

    fn mount_spec(
        &self,
        m: &kiln_parser::Mount,
        inst: &Instruction,
        env: &EnvList,
        used: &mut BTreeMap<String, String>,
        step: &StepCtx<'_>,
        b: &mut GraphBuilder,
    ) -> Result<(MountSpec, Option<VertexId>), PlanError> {
        let lexer = self.lexer;
        let mut x = |w: &Option<String>| -> Result<Option<String>, PlanError> {
            match w {
                Some(w) => {
                    let (r, mm) = expand_word(&lexer, w, env, inst)?;
                    used.extend(mm);
                    Ok(Some(r))
                }
                None => Ok(None),
            }
        };
        // A relative (or empty) target is relative to the working
        // directory; secrets and ssh sockets have their own defaults.
        let target = x(&m.target)?.unwrap_or_default();
        let target = match m.kind {
            MountType::Secret | MountType::Ssh if target.is_empty() => target,
            _ if target.starts_with('/') => clean_abs(&target),
            _ => clean_abs(&format!("{}/{target}", step.workdir)),
        };
        let from_raw = x(&m.from)?;
        let (from, input) = match (m.kind, from_raw.as_deref()) {
            (MountType::Bind, None) => (Some(InputRef::Context), Some(b.context())),
            (_, Some(f)) => {
                let (r, v) = self.copy_from(Some(f), inst, step, b)?;
                (Some(r), v)
            }
            (_, None) => (None, None),
        };
        Ok((
            MountSpec {
                kind: m.kind,
                target,
                source: x(&m.source)?,
                from,
                id: x(&m.id)?,
                sharing: m.sharing,
                readonly: m.readonly,
                required: m.required,
                mode: x(&m.mode)?,
                uid: x(&m.uid)?,
                gid: x(&m.gid)?,
                size: x(&m.size)?,
                env: x(&m.env)?,
            },
            input,
        ))
    }
}

struct StepCtx<'p> {
    stage: usize,
    workdir: String,
    index: usize,
    name: String,
    plans: &'p [StagePlan],
}

#[derive(Default)]
struct GraphBuilder {
    graph: DiGraph<Vertex, Edge>,
    context: Option<VertexId>,
    sources: HashMap<SourceOp, VertexId>,
}

impl GraphBuilder {
    fn add(&mut self, v: Vertex) -> VertexId {
        self.graph.add_node(v)
    }

    fn edge(&mut self, from: VertexId, to: VertexId, kind: Edge) {
        if !self.graph.contains_edge(from, to) {
            self.graph.add_edge(from, to, kind);
        }
    }

    /// One vertex per distinct source: identical sources load once.
    fn source(&mut self, op: SourceOp) -> VertexId {
        if let Some(&v) = self.sources.get(&op) {
            return v;
        }
        let name = match &op {
            SourceOp::Image {
                reference,
                platform,
                ..
            } => format!("[internal] load {reference} ({platform})"),
            SourceOp::Scratch => "[internal] scratch".to_owned(),
            SourceOp::Context => "[internal] load build context".to_owned(),
        };
        let v = self.graph.add_node(Vertex {
            op: Op::Source(op.clone()),
            stage: None,
            instruction: None,
            span: None,
            name,
            history: None,
            used_vars: BTreeMap::new(),
        });
        self.sources.insert(op, v);
        v
    }

    fn context(&mut self) -> VertexId {
        let v = self.source(SourceOp::Context);
        self.context = Some(v);
        v
    }
}

fn expand_error(inst: &Instruction, source: kiln_parser::ExpandError) -> PlanError {
    PlanError::Expand {
        keyword: inst.keyword.to_uppercase(),
        line: inst.span.start.line,
        column: inst.span.start.column,
        source: Box::new(source),
    }
}

/// Expand one word; also return the variables it used that are set.
fn expand_word(
    lexer: &Lexer,
    word: &str,
    env: &EnvList,
    inst: &Instruction,
) -> Result<(String, BTreeMap<String, String>), PlanError> {
    let e = lexer
        .process_word_with_matches(word, env)
        .map_err(|s| expand_error(inst, s))?;
    let used = e
        .matched
        .iter()
        .filter_map(|k| env.get(k).map(|v| (k.clone(), v.to_owned())))
        .collect();
    Ok((e.result, used))
}

fn expand_words(
    lexer: &Lexer,
    word: &str,
    env: &EnvList,
    inst: &Instruction,
) -> Result<(Vec<String>, BTreeMap<String, String>), PlanError> {
    let e = lexer
        .process_word_with_matches(word, env)
        .map_err(|s| expand_error(inst, s))?;
    let used = e
        .matched
        .iter()
        .filter_map(|k| env.get(k).map(|v| (k.clone(), v.to_owned())))
        .collect();
    Ok((e.words, used))
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// The `--from` values an instruction reads.
fn stage_refs(inst: &Instruction) -> Vec<&str> {
    match &inst.command {
        Command::Copy(c) => c.from.as_deref().into_iter().collect(),
        Command::Run(r) => r.mounts.iter().filter_map(|m| m.from.as_deref()).collect(),
        _ => Vec::new(),
    }
}

fn trigger_text(inst: &Instruction) -> String {
    let o = inst.original.trim();
    match o.get(..8) {
        Some(p) if p.eq_ignore_ascii_case("ONBUILD ") => o[8..].trim_start().to_owned(),
        _ => o.to_owned(),
    }
}

fn workdir_of(c: &ImageConfig) -> String {
    if c.working_dir.is_empty() {
        "/".to_owned()
    } else {
        c.working_dir.clone()
    }
}

/// `path.Clean` of an absolute path.
pub(crate) fn clean_abs(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

fn argv(cmd: &ShellOrExec, config: &ImageConfig) -> Vec<String> {
    match cmd {
        ShellOrExec::Exec(a) => a.clone(),
        ShellOrExec::Shell(s) => {
            let mut a = config
                .shell
                .clone()
                .unwrap_or_else(|| vec!["/bin/sh".to_owned(), "-c".to_owned()]);
            a.push(s.clone());
            a
        }
    }
}

fn chmod_text(m: &Chmod) -> String {
    match m {
        Chmod::Octal(o) => format!("{o:o}"),
        Chmod::Symbolic(s) | Chmod::Unexpanded(s) => s.clone(),
    }
}

fn empty_history(created_by: String) -> HistoryEntry {
    HistoryEntry {
        created_by: format!("{created_by} # buildkit"),
        empty_layer: true,
    }
}

fn quote_list(a: &[String]) -> String {
    a.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// BuildKit's `RUN |N K=V ... cmd` history text: the declared ARGs with
/// values prefix the command.
fn run_created_by(args: &[String], build_args: &[(String, Option<String>)]) -> String {
    let with_values: Vec<String> = build_args
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    let mut s = String::from("RUN ");
    if !with_values.is_empty() {
        s.push_str(&format!(
            "|{} {} ",
            with_values.len(),
            with_values.join(" ")
        ));
    }
    s.push_str(&args.join(" "));
    s.push_str(" # buildkit");
    s
}

fn copy_created_by(keyword: &str, op: &CopyOp) -> String {
    let srcs: Vec<&str> = op
        .sources
        .iter()
        .map(|s| match s {
            CopySource::Path { path } => path.as_str(),
            CopySource::Url { url } => url.as_str(),
            CopySource::Heredoc { name, .. } => name.as_str(),
        })
        .collect();
    format!("{keyword} {} {} # buildkit", srcs.join(" "), op.dest)
}

fn short(original: &str) -> String {
    let line = original.lines().next().unwrap_or("").trim();
    if line.chars().count() > 120 {
        let mut s: String = line.chars().take(117).collect();
        s.push_str("...");
        s
    } else {
        line.to_owned()
    }
}

/// `80`, `80/udp`, `8000-8002/tcp` to `["80/tcp"]`, ... (Docker's
/// `nat.ParsePortSpecs`); `None` when invalid.
fn expand_port(spec: &str) -> Option<Vec<String>> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_lowercase()),
        None => (spec, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return None;
    }
    // `ip:host:container` forms are accepted by Docker; keep the container port.
    let ports = ports.rsplit(':').next().unwrap_or(ports);
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?),
        None => {
            let p = ports.parse::<u16>().ok()?;
            (p, p)
        }
    };
    if hi < lo || hi - lo > 1024 {
        return None;
    }
    Some((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// A span's `line:column`, for messages.
pub fn location(span: &Span) -> String {
    format!("{}:{}", span.start.line, span.start.column)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
