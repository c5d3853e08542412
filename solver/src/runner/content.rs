//! Content keys of `COPY --from=<stage>`: the digest of exactly the files
//! the copy reads from the stage's filesystem (tarsum-style, as for the
//! context), so that a stage whose key changed but whose copied files did
//! not still gives a cache hit for the copy and the steps after it (as
//! BuildKit's content-based cache keys do).
//!
//! The digest of one (filesystem, selection) pair never changes — layers
//! are content-addressed — so it is remembered in the store's
//! `statcache.db` and a no-op rebuild mounts nothing.
//!
//! Also content keys of `ADD <url>` without `--checksum`: the digest of
//! what the server sends now (BuildKit's http source is keyed by content
//! too), with the server's `ETag` remembered so an unchanged file is
//! answered with a 304 and not downloaded again. With `--checksum` the
//! checksum (in the op's definition) is the key, and nothing is fetched.

use sha2::Digest as _;

use super::{Chain, RunnerError, StoreRunner};
use crate::context::{BuildContext, hex};
use crate::graph::{CopySource, FileOp, InputRef, Op};
use crate::solve::Step;

impl StoreRunner {
    /// The content digest of what `step` reads from other stages
    /// (`COPY --from=<stage>`: the copied files; `RUN --mount=type=bind,
    /// from=<stage>`: the mounted trees), or of the URLs an `ADD` without
    /// `--checksum` fetches. `None` when it reads neither, or a source
    /// does not resolve (the step itself then fails with the path and line).
    pub(super) fn content_digest_sync(
        &self,
        step: &Step,
        inputs: &[Chain],
    ) -> Result<Option<String>, RunnerError> {
        match &step.vertex.op {
            Op::File(FileOp::Copy(c)) if matches!(c.from, InputRef::Stage { .. }) => {
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
                self.stage_digest(step, &chain, &patterns, &c.exclude, c.parents)
            }
            Op::File(FileOp::Copy(c)) if c.checksum.is_none() => Ok(self.url_digest(c)),
            Op::Exec(r) => {
                let mut all = sha2::Sha256::new();
                let mut any = false;
                for m in &r.mounts {
                    let Some(from @ InputRef::Stage { .. }) = &m.from else {
                        continue;
                    };
                    if m.kind != kiln_parser::MountType::Bind {
                        continue;
                    }
                    // A whole stage mounted: keyed by the stage's key (the
                    // scheduler asks only when every mount names a path).
                    if !crate::solve::is_sub_path(m.source.as_deref()) {
                        return Ok(None);
                    }
                    let chain = self.input_chain(step, inputs, from)?;
                    let source = m.source.clone().unwrap_or_else(|| "/".to_owned());
                    let Some(d) = self.stage_digest(step, &chain, &[source], &[], false)? else {
                        return Ok(None);
                    };
                    for part in [m.target.as_str(), d.as_str()] {
                        all.update((part.len() as u64).to_le_bytes());
                        all.update(part.as_bytes());
                    }
                    any = true;
                }
                Ok(any.then(|| format!("sha256:{}", hex(&all.finalize()))))
            }
            _ => Ok(None),
        }
    }

    /// The digest of `patterns` (after `exclude`) in the filesystem
    /// `chain`, remembered by chain and selection.
    fn stage_digest(
        &self,
        step: &Step,
        chain: &Chain,
        patterns: &[String],
        exclude: &[String],
        parents: bool,
    ) -> Result<Option<String>, RunnerError> {
        // What identifies the selection on this filesystem.
        let mut h = sha2::Sha256::new();
        for l in &chain.layers {
            h.update(l.diff_id.to_string().as_bytes());
            h.update([0]);
        }
        let (sources, excluded) = (patterns.join("\n"), exclude.join("\n"));
        for part in [
            sources.as_str(),
            excluded.as_str(),
            if parents { "parents" } else { "" },
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let memo_id = format!("sha256:{}", hex(&h.finalize()));
        let remember = |d: &str| {
            if let Ok(mut m) = self.used_contents.lock() {
                m.insert(memo_id.clone(), d.to_owned());
            }
        };
        // An imported cache may know it: then the stage's layers need
        // not be fetched to key this step.
        if let Some(d) = self.imported.as_ref().and_then(|c| c.content(&memo_id)) {
            remember(d);
            return Ok(Some(d.to_owned()));
        }
        // The memo is an optimisation: when it fails, compute.
        if let Some(d) = self.with_memo(|m| m.get(&memo_id).ok().flatten()).flatten() {
            remember(&d);
            return Ok(Some(d));
        }
        // (Kept for the copy, which reads the same files next.)
        let merged = self.source_view(&step.vertex.name, chain, true)?;
        kiln_cache::timing::mark("stage digest: mounted");
        let mut stage = BuildContext::of_stage(merged.path());
        // The stage's top layer, if this build committed it with digests.
        if let Some(d) = self.top_layer_digests(chain) {
            stage = stage.with_top_layer_digests(d);
        }
        let sum = stage.checksum(patterns, exclude, parents);
        kiln_cache::timing::mark("stage digest: summed");
        drop(merged);
        let Ok(sum) = sum else {
            return Ok(None);
        };
        let _ = self.with_memo(|m| m.put(&memo_id, &sum.digest));
        remember(&sum.digest);
        Ok(Some(sum.digest))
    }

    /// The digest of what the URLs of an `ADD` serve now, or `None` when
    /// one cannot be fetched (the ADD then fails, naming the URL). A
    /// server's `ETag` is remembered and sent back (`If-None-Match`), so
    /// an unchanged file is not downloaded again for its key.
    fn url_digest(&self, c: &crate::graph::CopyOp) -> Option<String> {
        let urls: Vec<&str> = c
            .sources
            .iter()
            .filter_map(|s| match s {
                CopySource::Url { url } => Some(url.as_str()),
                _ => None,
            })
            .collect();
        if urls.is_empty() {
            return None;
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(std::time::Duration::from_secs(30)))
            .build()
            .new_agent();
        let mut all = sha2::Sha256::new();
        for url in urls {
            let memo_id = format!("url:{url}");
            let known: Option<(String, String)> = self
                .with_memo(|m| m.get(&memo_id).ok().flatten())
                .flatten()
                .and_then(|v| {
                    v.split_once('\t')
                        .map(|(e, d)| (e.to_owned(), d.to_owned()))
                });
            let mut req = agent.get(url);
            if let Some((etag, _)) = &known {
                req = req.header("If-None-Match", etag.as_str());
            }
            let mut resp = req.call().ok()?;
            let status = resp.status().as_u16();
            let digest = match (status, known) {
                (304, Some((_, d))) => d,
                (200..=299, _) => {
                    let etag = resp
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let mut h = sha2::Sha256::new();
                    let mut body = resp.body_mut().as_reader();
                    std::io::copy(&mut body, &mut HashWriter(&mut h)).ok()?;
                    let d = format!("sha256:{}", hex(&h.finalize()));
                    if let Some(e) = etag {
                        let _ = self.with_memo(|m| m.put(&memo_id, &format!("{e}\t{d}")));
                    }
                    d
                }
                _ => return None,
            };
            all.update(url.as_bytes());
            all.update([0]);
            all.update(digest.as_bytes());
            all.update([0]);
        }
        Some(format!("sha256:{}", hex(&all.finalize())))
    }
}

/// Feeds written bytes to a hasher.
struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
