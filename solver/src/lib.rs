//! kiln-solver: a parsed Dockerfile plus build options to a DAG of ops,
//! build-context checksums with a stat cache, cache keys that explain their
//! misses, and the progress events the CLI renders.
//!
//! # Layout
//!
//! A build goes through the modules in this order:
//!
//! 1. [`plan::plan`]: `Dockerfile` + [`plan::BuildOptions`] (+ an
//!    [`plan::ImageResolver`] for base image configs) → [`graph::BuildGraph`],
//!    with ARG/ENV expanded as BuildKit does, only the stages the target
//!    needs, and [`graph::BuildGraph::to_dot`] for `--print-graph`;
//! 2. [`context::BuildContext`]: checksums of exactly the context files an
//!    op reads, with a [`context::StatCache`] in `statcache.db`;
//! 3. [`key::compute_keys`]: a [`key::CacheKey`] and its [`key::KeyInputs`]
//!    per vertex; [`key::KeyHistory`] and [`key::explain_miss`] turn two
//!    builds' inputs into [`key::MissCause`]s;
//! 4. [`solve::solve`]: the DAG walk on tokio over a [`solve::StepRunner`]
//!    (`--jobs`, identical keys once, cache hits skipped), sending
//!    [`event::Event`]s through [`event::Progress`];
//! 5. [`fileop`]: COPY/ADD/WORKDIR on a root directory.

// Modules of the plan/context/key/event part.
pub mod context;
pub mod event;
pub mod graph;
pub mod key;
pub mod plan;
pub mod solve;

// COPY/ADD/WORKDIR file operations (BuildKit semantics).
pub mod fileop;

// The concrete step runner over the store and the sandbox, and image export.
pub mod export;
pub mod runner;

// Build cache export/import in BuildKit's format (`--cache-to`/`--cache-from`).
pub mod remote_cache;
