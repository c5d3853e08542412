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
                let patterns = path_sources(c);
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
        // (A view is kept for the copy, which reads the same files next.)
        let source = self.stage_source(&step.vertex.name, chain, patterns, parents, true)?;
        kiln_cache::timing::mark("stage digest: mounted");
        let mut stage = BuildContext::of_stage(&source.root);
        // The stage's top layer, if this build committed it with digests.
        if let Some(d) = self.top_layer_digests(chain) {
            stage = stage.with_top_layer_digests(d);
        }
        let sum = stage.checksum(patterns, exclude, parents);
        kiln_cache::timing::mark("stage digest: summed");
        drop(source);
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

/// The paths (patterns) a `COPY` copies, without its URLs and heredocs.
pub(super) fn path_sources(c: &crate::graph::CopyOp) -> Vec<String> {
    c.sources
        .iter()
        .filter_map(|s| match s {
            CopySource::Path { path } => Some(path.clone()),
            _ => None,
        })
        .collect()
}

/// Whether every pattern of a `COPY --from` (or a bind mount's source)
/// names a path that only the top layer of `layers` (snapshot directories,
/// lowest first) has: then that layer's directory holds exactly what the
/// stage's filesystem shows there, and the path is read in it rather than
/// through an overlay (whose every first lookup costs several times more:
/// bench s1's stage digest of 2,000 files took 15 ms that way).
///
/// Only plain paths qualify (no wildcards, no `..`, not the root), whose
/// parents in the top layer are directories and which is a directory or a
/// regular file there, and which no lower layer has (an existing lower
/// entry, or any doubt, means no: the overlay is used).
pub(super) fn only_in_top(layers: &[std::path::PathBuf], patterns: &[String]) -> bool {
    let Some((top, lowers)) = layers.split_last() else {
        return false;
    };
    !patterns.is_empty()
        && patterns.iter().all(|p| {
            if p.contains(['*', '?', '[', '\\']) {
                return false;
            }
            let parts: Vec<&str> = p
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            if parts.is_empty() || parts.contains(&"..") {
                return false;
            }
            let mut at = top.clone();
            for (i, part) in parts.iter().enumerate() {
                at.push(part);
                let Ok(m) = fs_err::symlink_metadata(&at) else {
                    return false;
                };
                let ft = m.file_type();
                let last = i + 1 == parts.len();
                if !(ft.is_dir() || (last && ft.is_file())) {
                    return false;
                }
            }
            let rel: std::path::PathBuf = parts.iter().collect();
            lowers.iter().all(|l| {
                fs_err::symlink_metadata(l.join(&rel)).is_err_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    )
                })
            })
        })
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    use super::only_in_top;
    use crate::context::BuildContext;
    use crate::runner::MergedMount;

    fn write(path: &Path, text: &str) {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        }
        fs_err::write(path, text).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Two layers: `/etc` and `/shared` in both, `/out` (a tree) and
    /// `/file` only in the top one, `/link` a symlink to a directory there.
    fn layers(root: &Path) -> Vec<PathBuf> {
        let (lower, top) = (root.join("lower"), root.join("top"));
        write(&lower.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n");
        write(&lower.join("shared/a"), "lower\n");
        write(&top.join("etc/hosts"), "127.0.0.1 localhost\n");
        write(&top.join("shared/b"), "top\n");
        write(&top.join("out/small/f1.txt"), "one\n");
        write(&top.join("out/small/f2.txt"), "two\n");
        write(&top.join("out/big.bin"), &"x".repeat(3 << 20));
        fs_err::set_permissions(
            top.join("out/small/f2.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("sub", top.join("out/link")).unwrap_or_else(|e| panic!("{e}"));
        write(&top.join("file"), "file\n");
        std::os::unix::fs::symlink("out", top.join("link")).unwrap_or_else(|e| panic!("{e}"));
        vec![lower, top]
    }

    fn patterns(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn only_paths_the_top_layer_alone_has_are_read_in_it() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let l = layers(root.path());
        // (`/shared/b`: its directory is merged, the file is the top's.)
        for yes in [
            &["/out"][..],
            &["out/small", "/file"],
            &["/out/small/./f1.txt"],
            &["/shared/b"],
        ] {
            assert!(only_in_top(&l, &patterns(yes)), "{yes:?}");
        }
        for no in [
            &["/etc"][..],
            &["/shared"],
            &["/out", "/etc"],
            &["/out/*.bin"],
            &["/out/../etc"],
            &["/"],
            &["/link"],
            &["/link/small"],
            &["/missing"],
            &[],
        ] {
            assert!(!only_in_top(&l, &patterns(no)), "{no:?}");
        }
        assert!(!only_in_top(&l[..0], &patterns(&["/out"])));
    }

    /// Read in the top layer or through the overlay, a selection only the
    /// top layer has gives the same digest (the key of a `COPY --from` does
    /// not depend on how it was read).
    #[test]
    fn the_top_layer_and_the_overlay_give_the_same_digest() {
        if !crate::runner::mount::can_mount_in_tests() {
            return;
        }
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let l = layers(root.path());
        // overlayfs' own xattrs: hidden by the overlay (`trusted.`), or
        // shown (`user.`, on a mount without `userxattr`); neither counts.
        let f1 = l[1].join("out/small/f1.txt");
        for name in ["trusted.overlay.kiln-test", "user.overlay.kiln-test"] {
            xattr::set(&f1, name, b"y").unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        xattr::set(&f1, "user.kept", b"1").unwrap_or_else(|e| panic!("{e}"));
        let mnt = root.path().join("mnt");
        fs_err::create_dir(&mnt).unwrap_or_else(|e| panic!("{e}"));
        let merged = MergedMount::mount(&l, &mnt).unwrap_or_else(|e| panic!("{e}"));
        for sel in [
            &["/out"][..],
            &["/out/small", "/file"],
            &["/out/big.bin"],
            &["/shared/b"],
        ] {
            let sel = patterns(sel);
            assert!(only_in_top(&l, &sel));
            let through = BuildContext::of_stage(merged.path())
                .checksum(&sel, &[], false)
                .unwrap_or_else(|e| panic!("{e}"));
            let direct = BuildContext::of_stage(&l[1])
                .checksum(&sel, &["**/f2.txt".to_owned()], false)
                .unwrap_or_else(|e| panic!("{e}"));
            let direct_all = BuildContext::of_stage(&l[1])
                .checksum(&sel, &[], false)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(through.digest, direct_all.digest, "{sel:?}");
            assert!(!through.files.is_empty());
            if sel[0] == "/out" {
                assert_ne!(direct.digest, direct_all.digest, "the exclusion counts");
            }
        }
        drop(merged);
        // (An xattr that is not overlayfs' own counts.)
        let out = patterns(&["/out"]);
        let before = BuildContext::of_stage(&l[1]).checksum(&out, &[], false);
        xattr::remove(&f1, "user.kept").unwrap_or_else(|e| panic!("{e}"));
        let after = BuildContext::of_stage(&l[1]).checksum(&out, &[], false);
        assert_ne!(before.map(|c| c.digest).ok(), after.map(|c| c.digest).ok());
    }
}
