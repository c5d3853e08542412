//! Content keys of `COPY --from=<stage>`: the digest of exactly the files
//! the copy reads from the stage's filesystem (tarsum-style, as for the
//! context), so that a stage whose key changed but whose copied files did
//! not still gives a cache hit for the copy and the steps after it (as
//! BuildKit's content-based cache keys do).
//!
//! The digest of one (filesystem, selection) pair never changes — layers
//! are content-addressed — so it is remembered in the store's
//! `statcache.db` and a no-op rebuild mounts nothing.

use sha2::Digest as _;

use super::{Chain, MergedMount, RunnerError, StoreRunner};
use crate::context::{BuildContext, hex};
use crate::graph::{CopySource, FileOp, InputRef, Op};
use crate::key::ContentMemo;
use crate::solve::Step;

impl StoreRunner {
    /// The content digest of what `step` copies from another stage, or
    /// `None` when it copies from no stage, or its sources do not resolve
    /// (the copy itself then fails with the path and line).
    pub(super) fn content_digest_sync(
        &self,
        step: &Step,
        inputs: &[Chain],
    ) -> Result<Option<String>, RunnerError> {
        let Op::File(FileOp::Copy(c)) = &step.vertex.op else {
            return Ok(None);
        };
        if !matches!(c.from, InputRef::Stage { .. }) {
            return Ok(None);
        }
        let patterns: Vec<String> = c
            .sources
            .iter()
            .filter_map(|s| match s {
                CopySource::Path { path } => Some(path.clone()),
                _ => None,
            })
            .collect();
        if patterns.is_empty() {
            return Ok(None);
        }
        let chain = self.input_chain(step, inputs, &c.from)?;
        // What identifies the selection on this filesystem.
        let mut h = sha2::Sha256::new();
        for l in &chain.layers {
            h.update(l.diff_id.to_string().as_bytes());
            h.update([0]);
        }
        let (sources, exclude) = (patterns.join("\n"), c.exclude.join("\n"));
        for part in [
            sources.as_str(),
            exclude.as_str(),
            if c.parents { "parents" } else { "" },
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let memo_id = format!("sha256:{}", hex(&h.finalize()));
        // The memo is an optimisation: when it fails, compute.
        let memo = ContentMemo::open(self.store.root()).ok();
        if let Some(d) = memo.as_ref().and_then(|m| m.get(&memo_id).ok().flatten()) {
            return Ok(Some(d));
        }
        let lowers = self.snapshots(&chain)?;
        let dir = self.scratch("sum-")?;
        let merged =
            MergedMount::mount(&lowers, dir.path()).map_err(|source| RunnerError::Mount {
                step: step.vertex.name.clone(),
                source,
            })?;
        let sum = BuildContext::new(merged.path(), None).checksum(&patterns, &c.exclude, c.parents);
        drop(merged);
        let Ok(sum) = sum else {
            return Ok(None);
        };
        if let Some(m) = &memo {
            let _ = m.put(&memo_id, &sum.digest);
        }
        Ok(Some(sum.digest))
    }
}
