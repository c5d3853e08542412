//! The build graph: a petgraph DAG of [`Vertex`]es, each one [`Op`], with
//! [`Edge`]s from an op's inputs to the op.
//!
//! Edges point from the input to its consumer (`parent -> child`), so a
//! topological order of the graph is an execution order. Every stage is a
//! chain of `Parent` edges from its source (an image, scratch, or the last
//! vertex of the stage it is built `FROM`); `COPY --from`, `RUN
//! --mount=from=` and the build context add `Source` edges into the chain.
//!
//! All values in an op are fully expanded (ARG/ENV substituted as BuildKit
//! does it); the op, serialized, is the canonical definition that the cache
//! key hashes (fields that must not be in the key are `#[serde(skip)]`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kiln_parser::{Heredoc, MountType, Network, Security, Sharing, Span};
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Serialize};

/// The id of a vertex in a [`BuildGraph`].
pub type VertexId = NodeIndex;

/// An OS/architecture/variant triple (`linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v7`, `v8`, or empty.
    pub variant: String,
}

impl Platform {
    /// The platform of this machine (Go's names for the architecture).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Self {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: String::new(),
        }
    }

    /// Parse `os[/arch[/variant]]`; `None` when a part is empty or there
    /// are more than three.
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let host = Self::host();
        Some(Self::from_parts(
            parts[0],
            parts.get(1).copied().unwrap_or(&host.architecture),
            parts.get(2).copied().unwrap_or_default(),
        ))
    }

    /// The platform of these parts, as an image config or a manifest names
    /// them: lowercase, the architecture by Go's name.
    pub fn from_parts(os: &str, architecture: &str, variant: &str) -> Self {
        Self {
            os: os.to_lowercase(),
            architecture: normalize_arch(&architecture.to_lowercase()),
            variant: variant.to_lowercase(),
        }
    }
}

fn normalize_arch(a: &str) -> String {
    match a {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" => "386",
        other => other,
    }
    .to_owned()
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// A healthcheck in the image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", "..."]`.
    pub test: Vec<String>,
    /// Nanoseconds, 0 = default.
    pub interval_ns: u64,
    /// Nanoseconds, 0 = default.
    pub timeout_ns: u64,
    /// Nanoseconds, 0 = default.
    pub start_period_ns: u64,
    /// Nanoseconds, 0 = default.
    pub start_interval_ns: u64,
    /// 0 = default.
    pub retries: u32,
}

/// The parts of an OCI image config that a Dockerfile changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value`, in order.
    pub env: Vec<String>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `User`.
    pub user: String,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts`, as `80/tcp`.
    pub exposed_ports: BTreeSet<String>,
    /// `Volumes`.
    pub volumes: BTreeSet<String>,
    /// `StopSignal`.
    pub stop_signal: Option<String>,
    /// `Healthcheck`.
    pub healthcheck: Option<HealthConfig>,
    /// `Shell` (Docker extension).
    pub shell: Option<Vec<String>>,
    /// `OnBuild` triggers (Docker extension).
    pub on_build: Vec<String>,
}

impl ImageConfig {
    /// The value of `key` in [`env`](Self::env).
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find_map(|kv| match kv.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if kv == key => Some(""),
                _ => None,
            })
    }

    /// Set `key` in [`env`](Self::env), replacing it in place if present.
    pub fn env_set(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self
            .env
            .iter_mut()
            .find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == key)
        {
            Some(kv) => *kv = entry,
            None => self.env.push(entry),
        }
    }
}

/// One history entry of the image being built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// `created_by`.
    pub created_by: String,
    /// No layer for this step.
    pub empty_layer: bool,
}

/// What a graph vertex does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A source of a filesystem: an image, scratch or the build context.
    Source(SourceOp),
    /// The start of a stage that is built `FROM` another stage.
    StageRef {
        /// The index of the parent stage (or of this stage, for an image
        /// base). Not part of the key: two stages with the same base and
        /// steps have the same keys and run once.
        #[serde(skip)]
        stage: usize,
        /// Its name (or `stage-N`).
        name: String,
    },
    /// `RUN`.
    Exec(RunOp),
    /// `COPY`, `ADD`, `WORKDIR`.
    File(FileOp),
    /// An instruction that changes only the image config.
    Config(ConfigChange),
}

impl Op {
    /// A short kind name: `source`, `stage`, `exec`, `file`, `config`.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Source(_) => "source",
            Op::StageRef { .. } => "stage",
            Op::Exec(_) => "exec",
            Op::File(_) => "file",
            Op::Config(_) => "config",
        }
    }
}

/// A filesystem source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceOp {
    /// An image, from the store or a registry.
    Image {
        /// The reference as written after expansion (`busybox:latest`).
        reference: String,
        /// The platform to select.
        platform: Platform,
        /// The config/manifest digest the resolver found, if any: a new
        /// digest for the same reference is a "base image changed" miss.
        digest: Option<String>,
    },
    /// The empty filesystem (`FROM scratch`).
    Scratch,
    /// The build context directory.
    Context,
}

/// `RUN`, ready for the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunOp {
    /// The argv: for the shell form, the SHELL plus the command text; for
    /// the exec form, the JSON array.
    pub args: Vec<String>,
    /// The command was in shell form.
    pub shell_form: bool,
    /// Heredocs of `RUN <<EOF` (bodies unexpanded; the shell expands them).
    pub heredocs: Vec<Heredoc>,
    /// The environment: the image's ENV, the stage's ENV and the ARGs in
    /// scope with values (ARGs are env vars for RUN, as in BuildKit).
    pub env: Vec<(String, String)>,
    /// Proxy build args (`HTTP_PROXY`, ...) given with `--build-arg` and
    /// not declared: passed to the process, but never in the cache key or
    /// the history.
    #[serde(skip)]
    pub proxy_env: Vec<(String, String)>,
    /// The working directory (absolute).
    pub workdir: String,
    /// `USER`, empty for the image default (root).
    pub user: String,
    /// `--network`.
    pub network: Option<Network>,
    /// `--security`.
    pub security: Option<Security>,
    /// `--mount`s, expanded.
    pub mounts: Vec<MountSpec>,
    /// `/etc/hosts` lines (`IP\tNAME`) of the build's `--add-host`s: part
    /// of the key, as in BuildKit's exec op (absent when there are none,
    /// so other keys stay as they were).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
}

/// Where a `RUN --mount` or a `COPY` reads from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputRef {
    /// The build context.
    Context,
    /// Another stage's result (its index).
    Stage {
        /// The stage index.
        index: usize,
    },
    /// An image that is not a stage.
    Image {
        /// The reference.
        reference: String,
    },
}

/// One expanded `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountSpec {
    /// The mount type.
    pub kind: MountType,
    /// Where in the container.
    pub target: String,
    /// `source=` inside `from` (bind, cache).
    pub source: Option<String>,
    /// `from=`, resolved; `None` for the context (bind) or an empty cache.
    pub from: Option<InputRef>,
    /// `id=` (cache, secret).
    pub id: Option<String>,
    /// `sharing=`.
    pub sharing: Option<Sharing>,
    /// Read-only.
    pub readonly: Option<bool>,
    /// `required=`.
    pub required: Option<bool>,
    /// `mode=`.
    pub mode: Option<String>,
    /// `uid=`.
    pub uid: Option<String>,
    /// `gid=`.
    pub gid: Option<String>,
    /// `size=`.
    pub size: Option<String>,
    /// `env=` (secret).
    pub env: Option<String>,
}

impl MountSpec {
    /// `uid=`, when it is a number.
    pub fn uid(&self) -> Option<u32> {
        self.uid.as_deref().and_then(|u| u.parse().ok())
    }

    /// `gid=`, when it is a number.
    pub fn gid(&self) -> Option<u32> {
        self.gid.as_deref().and_then(|g| g.parse().ok())
    }

    /// `mode=`, when it is an octal number.
    pub fn mode(&self) -> Option<u32> {
        self.mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
    }
}

/// A file operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileOp {
    /// `COPY` or `ADD`.
    Copy(CopyOp),
    /// `WORKDIR`: create the directory (owned by `user` when set).
    Mkdir {
        /// The absolute path.
        path: String,
        /// The USER in effect.
        user: String,
    },
}

/// One COPY/ADD source, expanded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CopySource {
    /// A path (or wildcard) in the source filesystem.
    Path {
        /// As expanded.
        path: String,
    },
    /// An http(s) URL (ADD only).
    Url {
        /// The URL.
        url: String,
    },
    /// A heredoc: a file named `name` with `content`.
    Heredoc {
        /// The file name.
        name: String,
        /// The content, expanded when the heredoc allowed it.
        content: String,
    },
}

/// `COPY`/`ADD`, expanded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyOp {
    /// This is an ADD (URLs, archive extraction).
    pub add: bool,
    /// Where the sources come from.
    pub from: InputRef,
    /// The sources.
    pub sources: Vec<CopySource>,
    /// The destination as written after expansion (a trailing `/` matters).
    pub dest: String,
    /// The working directory the destination is relative to.
    pub workdir: String,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod` (octal or symbolic).
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude`.
    pub exclude: Vec<String>,
    /// `ADD --checksum`.
    pub checksum: Option<String>,
    /// `ADD --unpack`.
    pub unpack: Option<bool>,
    /// `ADD --keep-git-dir`.
    pub keep_git_dir: bool,
}

/// A config-only change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum ConfigChange {
    /// `ENV`.
    Env(Vec<(String, String)>),
    /// `ARG` (names and the values in effect).
    Arg(Vec<(String, Option<String>)>),
    /// `LABEL`.
    Label(Vec<(String, String)>),
    /// `USER`.
    User(String),
    /// `EXPOSE` (`80/tcp`).
    Expose(Vec<String>),
    /// `VOLUME`.
    Volume(Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// `CMD`.
    Cmd(Vec<String>),
    /// `ENTRYPOINT`.
    Entrypoint(Vec<String>),
    /// `HEALTHCHECK`.
    Healthcheck(HealthConfig),
    /// `SHELL`.
    Shell(Vec<String>),
    /// `ONBUILD`.
    OnBuild(String),
    /// `MAINTAINER`.
    Maintainer(String),
}

/// One vertex of the graph.
#[derive(Debug, Clone, Serialize)]
pub struct Vertex {
    /// The operation.
    pub op: Op,
    /// The stage it belongs to (`None` for shared sources).
    pub stage: Option<usize>,
    /// The index of its instruction in the stage (0 = the first after
    /// FROM; ONBUILD triggers come first).
    pub instruction: Option<usize>,
    /// The Dockerfile span of the instruction.
    pub span: Option<Span>,
    /// The display name, BuildKit style: `[build 2/4] RUN make`.
    pub name: String,
    /// The history entry this step adds to the image, if any.
    pub history: Option<HistoryEntry>,
    /// The ARGs and ENVs (by name) whose values this op used in expansion,
    /// so a miss can name a changed ARG.
    pub used_vars: BTreeMap<String, String>,
}

/// Why an edge exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Edge {
    /// The previous filesystem state of the same stage.
    Parent,
    /// An extra input: COPY --from, a bind mount, the context.
    Source,
}

/// The base of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StageBase {
    /// An image reference.
    Image {
        /// The reference.
        reference: String,
    },
    /// `scratch`.
    Scratch,
    /// Another stage.
    Stage {
        /// Its index.
        index: usize,
    },
}

/// A planned stage.
#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    /// The stage's index in the Dockerfile.
    pub index: usize,
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// What it is built on.
    pub base: StageBase,
    /// Its platform.
    pub platform: Platform,
    /// The first vertex (the source or stage reference).
    #[serde(skip)]
    pub first: VertexId,
    /// The last vertex: the stage's result.
    #[serde(skip)]
    pub last: VertexId,
    /// The image config after the last instruction.
    pub config: ImageConfig,
    /// The history entries this stage adds (after its base's).
    pub history: Vec<HistoryEntry>,
    /// The span of its FROM.
    pub span: Span,
}

impl StagePlan {
    /// `name`, or BuildKit's `stage-N`.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// The planned build: the DAG and its stages.
#[derive(Debug, Clone)]
pub struct BuildGraph {
    /// The DAG; edges go from input to consumer.
    pub graph: DiGraph<Vertex, Edge>,
    /// The stages that the target needs, in Dockerfile order.
    pub stages: Vec<StagePlan>,
    /// The index into [`stages`](Self::stages) of the target.
    pub target: usize,
    /// The build context vertex, if any op reads the context.
    pub context: Option<VertexId>,
    /// `--build-arg`s that no ARG declared (BuildKit warns about them).
    pub unused_build_args: Vec<String>,
}

impl BuildGraph {
    /// The target stage.
    pub fn target_stage(&self) -> Option<&StagePlan> {
        self.stages.get(self.target)
    }

    /// The stage with Dockerfile index `index`, if planned.
    pub fn stage(&self, index: usize) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.index == index)
    }

    /// The inputs of `v`: `(input, edge kind)`, parent first.
    pub fn inputs(&self, v: VertexId) -> Vec<(VertexId, Edge)> {
        let mut ins: Vec<(VertexId, Edge)> = self
            .graph
            .edges_directed(v, Direction::Incoming)
            .map(|e| (e.source(), *e.weight()))
            .collect();
        // petgraph lists incoming edges newest first; order them stably:
        // parent first, then sources by vertex id.
        ins.sort_by_key(|(id, kind)| (*kind != Edge::Parent, id.index()));
        ins
    }

    /// A topological order of the vertices (inputs before consumers).
    pub fn topo_order(&self) -> Vec<VertexId> {
        // The planner only adds edges from existing vertices to a new one,
        // so vertex ids are already a topological order.
        self.graph.node_indices().collect()
    }

    /// The graph in Graphviz DOT, for `--print-graph` / `kiln graph`.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph kiln {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        for s in &self.stages {
            let _ = writeln!(
                out,
                "  subgraph cluster_{} {{\n    label=\"{}\";",
                s.index,
                dot_escape(&s.display_name())
            );
            for v in self.graph.node_indices() {
                if self.graph[v].stage == Some(s.index) {
                    let _ = writeln!(out, "    n{};", v.index());
                }
            }
            out.push_str("  }\n");
        }
        for v in self.graph.node_indices() {
            let vert = &self.graph[v];
            let shape = match vert.op {
                Op::Source(_) => ", shape=ellipse",
                Op::Config(_) => ", style=dashed",
                _ => "",
            };
            let _ = writeln!(
                out,
                "  n{} [label=\"{}\"{}];",
                v.index(),
                dot_escape(&vert.name),
                shape
            );
        }
        for e in self.graph.edge_references() {
            let style = match e.weight() {
                Edge::Parent => "",
                Edge::Source => " [style=dashed]",
            };
            let _ = writeln!(
                out,
                "  n{} -> n{}{};",
                e.source().index(),
                e.target().index(),
                style
            );
        }
        out.push_str("}\n");
        out
    }
}

fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_parse_and_display() {
        let p = Platform::parse("linux/arm64/v8").unwrap_or_else(Platform::host);
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let p = Platform::parse("Linux/x86_64").unwrap_or_else(Platform::host);
        assert_eq!(p.to_string(), "linux/amd64");
        assert_eq!(Platform::parse(""), None);
        assert_eq!(Platform::parse("linux//v7"), None);
        assert_eq!(Platform::parse("a/b/c/d"), None);
    }

    #[test]
    fn env_set_replaces_in_place() {
        let mut c = ImageConfig::default();
        c.env_set("A", "1");
        c.env_set("B", "2");
        c.env_set("A", "3");
        assert_eq!(c.env, ["A=3", "B=2"]);
        assert_eq!(c.env_get("A"), Some("3"));
        assert_eq!(c.env_get("C"), None);
    }

    #[test]
    fn dot_escapes_quotes() {
        assert_eq!(
            dot_escape("RUN echo \"a\\b\"\n"),
            "RUN echo \\\"a\\\\b\\\"\\n"
        );
    }
}
