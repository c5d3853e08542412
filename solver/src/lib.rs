//! kiln-solver: a parsed Dockerfile plus build options to a DAG of ops,
//! build-context checksums with a stat cache, cache keys that explain their
//! misses, and the progress events the CLI renders.

// Modules of the plan/context/key/event part.
pub mod context;
pub mod event;
pub mod graph;
pub mod key;
pub mod plan;
pub mod solve;

// COPY/ADD/WORKDIR file operations (BuildKit semantics).
pub mod fileop;
