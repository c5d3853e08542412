//! `kiln build --cache-to/--cache-from`: the flags, their transports, and
//! the calls around the solve (import before, export after).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use kiln_solver::graph::{BuildGraph, VertexId};
use kiln_solver::remote_cache::{
    CacheLocation, CacheTo, CacheTransport, ImportedCache, LocalLayout, RegistryCache,
    export_cache, parse_cache_from,
};
use kiln_solver::runner::{Chain, StoreRunner};
use kiln_solver::solve::Solved;

/// The transport of a cache location.
fn transport(loc: &CacheLocation, writing: bool) -> anyhow::Result<Arc<dyn CacheTransport>> {
    match loc {
        CacheLocation::Local { dir, tag } => Ok(Arc::new(LocalLayout::new(
            dir.clone(),
            tag.clone(),
            writing,
        ))),
        CacheLocation::Registry { reference } => {
            Ok(Arc::new(RegistryCache::new(reference, writing)?))
        }
    }
}

/// Parses every `--cache-to`.
pub(crate) fn parse_cache_to(specs: &[String]) -> anyhow::Result<Vec<CacheTo>> {
    specs
        .iter()
        .map(|s| CacheTo::parse(s).map_err(anyhow::Error::from))
        .collect()
}

/// Reads every `--cache-from`: a cache that is not there, or cannot be
/// read, is a warning (as in BuildKit); a malformed flag is an error.
pub(crate) fn import(specs: &[String]) -> anyhow::Result<Option<Arc<ImportedCache>>> {
    if specs.is_empty() {
        return Ok(None);
    }
    let mut cache = ImportedCache::new();
    for spec in specs {
        let loc = parse_cache_from(spec)?;
        let t = match transport(&loc, false) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("warning: {e:#}");
                continue;
            }
        };
        match cache.add(Arc::clone(&t)) {
            Ok(true) => {}
            Ok(false) => eprintln!("warning: --cache-from {}: no cache found there", t.name()),
            Err(e) => eprintln!(
                "warning: --cache-from {}: cannot read the cache, ignoring it: {}",
                t.name(),
                chain_text(&e)
            ),
        }
    }
    Ok(Some(Arc::new(cache)))
}

/// Makes sure the target's layers are in the store (an imported hit
/// leaves them in the cache until something needs them), with their sizes.
pub(crate) fn materialize_target(
    runner: &StoreRunner,
    graph: &BuildGraph,
    outputs: &mut HashMap<VertexId, Chain>,
) -> anyhow::Result<()> {
    let Some(last) = graph.target_stage().map(|s| s.last) else {
        return Ok(());
    };
    if let Some(chain) = outputs.get(&last) {
        let full = runner
            .materialize(chain)
            .context("fetching the image's layers from the imported cache")?;
        outputs.insert(last, full);
    }
    runner.keep_imported_hits();
    Ok(())
}

/// Writes the cache to every `--cache-to`.
pub(crate) fn export(
    runner: &StoreRunner,
    graph: &BuildGraph,
    solved: &Solved<Chain>,
    to: &[CacheTo],
) -> anyhow::Result<()> {
    for c in to {
        let t = transport(&c.location, true)?;
        let report = export_cache(
            runner,
            graph,
            &solved.outputs,
            &solved.keys,
            &solved.contents,
            c.mode,
            &*t,
        )
        .with_context(|| format!("exporting the build cache to {}", t.name()))?;
        eprintln!(
            "exported build cache to {}: {} records, {} layers ({} blobs written)",
            t.name(),
            report.records,
            report.layers,
            report.blobs_written
        );
    }
    Ok(())
}

fn chain_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
