//! Garbage collection, disk usage and the consistency check of the store.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use rusqlite::TransactionBehavior;

use crate::digest::Digest;
use crate::error::Result;
use crate::image::parse_config;
use crate::store::{
    CacheResult, DiskUsage, FsckProblem, GcOptions, GcReport, SNAPSHOT_PREFIX, Store, read_dir,
    remove_path,
};

impl Store {
    // ------------------------------------------------------------------- gc

    /// Removes what no name, image or cache record needs: dangling images
    /// (and every build cache record with `all`), unreferenced blobs,
    /// snapshots and temp files. Holds the store lock exclusively.
    pub fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        // A dry run only reads: the shared lock lets it run beside loads.
        let _lock = if opts.skip_if_busy && !opts.dry_run {
            match self.try_lock_exclusive()? {
                Some(l) => l,
                None => {
                    return Ok(GcReport {
                        busy: true,
                        ..GcReport::default()
                    });
                }
            }
        } else {
            self.lock(!opts.dry_run)?
        };
        let mut report = GcReport::default();
        // The uncompressed sizes of the layers that go: what their
        // snapshots free.
        let mut dead_sizes: std::collections::HashMap<String, u64> = Default::default();
        let e = self.db_err("collecting garbage");
        let (live_blobs, live_layers) = {
            let mut conn = self.db();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.db_err("starting transaction"))?;
            // Named images (a tag or a registry digest) are never
            // collected, with or without `all`:
            // `kiln rmi` removes names (as `docker image prune` keeps tagged
            // images and `docker builder prune -a` only drops build cache).
            let doomed: Vec<String> = tx
                .prepare(
                    "SELECT id FROM images WHERE id NOT IN (SELECT image FROM names)
                     AND id NOT IN (SELECT image FROM repo_digests)
                     AND id NOT IN (SELECT target FROM leases WHERE kind = 'image')",
                )
                .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                .map_err(&e)?;
            for id in &doomed {
                report.images.push(id.parse()?);
            }
            if !opts.dry_run {
                for id in &doomed {
                    tx.execute("DELETE FROM names WHERE image = ?1", [id])
                        .map_err(&e)?;
                    tx.execute("DELETE FROM repo_digests WHERE image = ?1", [id])
                        .map_err(&e)?;
                    tx.execute("DELETE FROM images WHERE id = ?1", [id])
                        .map_err(&e)?;
                }
            }
            let records: i64 = tx
                .query_row("SELECT count(*) FROM cache_records", [], |r| r.get(0))
                .map_err(&e)?;
            if opts.all {
                report.cache_records = records as u64;
                if !opts.dry_run {
                    tx.execute("DELETE FROM cache_records", []).map_err(&e)?;
                }
            }
            let doomed: HashSet<String> = doomed.into_iter().collect();
            let mut live_blobs = BTreeSet::new();
            let mut live_layers = BTreeSet::new();
            let images: Vec<(String, String)> = tx
                .prepare("SELECT id, manifest FROM images")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            for (id, manifest) in images.into_iter().filter(|(id, _)| !doomed.contains(id)) {
                live_blobs.insert(id);
                live_blobs.insert(manifest);
            }
            let layers: Vec<(String, String)> = tx
                .prepare("SELECT image, diff_id FROM image_layers")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            for (_, diff_id) in layers.into_iter().filter(|(i, _)| !doomed.contains(i)) {
                live_layers.insert(diff_id);
            }
            // Leases: what containers use stays, even after `rmi` (see `crate::containers`).
            let leased: Vec<(String, String)> = tx
                .prepare("SELECT kind, target FROM leases WHERE kind IN ('image', 'layer')")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            for (kind, target) in leased {
                if kind == "image" {
                    live_blobs.insert(target);
                } else {
                    live_layers.insert(target);
                }
            }
            // Every layer with its uncompressed size (for the eviction, and
            // what the snapshots that go free).
            let all_layers: Vec<(String, u64)> = tx
                .prepare("SELECT diff_id, size FROM layers")
                .and_then(|mut st| {
                    st.query_map([], |r| {
                        Ok((r.get(0)?, u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0)))
                    })?
                    .collect()
                })
                .map_err(&e)?;
            // Over `keep_bytes`: the least recently used records go first.
            let evicted = match opts.keep_bytes {
                Some(keep) if !opts.all => {
                    let sizes: std::collections::HashMap<&str, u64> =
                        all_layers.iter().map(|(l, n)| (l.as_str(), *n)).collect();
                    least_recently_used(&tx, &live_layers, &sizes, keep).map_err(&e)?
                }
                _ => HashSet::new(),
            };
            report.cache_records += evicted.len() as u64;
            if !opts.dry_run {
                for key in &evicted {
                    tx.execute("DELETE FROM cache_records WHERE key = ?1", [key])
                        .map_err(&e)?;
                }
            }
            if !opts.all {
                let results: Vec<(String, String)> = tx
                    .prepare("SELECT key, result FROM cache_records")
                    .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                    .map_err(&e)?;
                for (_, json) in results.into_iter().filter(|(k, _)| !evicted.contains(k)) {
                    if let Ok(r) = serde_json::from_str::<CacheResult>(&json) {
                        live_layers.extend(r.diff_ids.iter().map(ToString::to_string));
                        live_blobs.extend(r.config.iter().map(ToString::to_string));
                    }
                }
            }
            let compressed: Vec<(String, String)> = tx
                .prepare("SELECT blob, diff_id FROM layer_blobs")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            for (blob, diff_id) in compressed {
                if live_layers.contains(&diff_id) {
                    live_blobs.insert(blob);
                }
            }
            live_blobs.extend(live_layers.iter().cloned());
            for (l, size) in &all_layers {
                if !live_layers.contains(l) {
                    dead_sizes.insert(l.clone(), *size);
                }
            }
            if !opts.dry_run {
                for l in all_layers
                    .iter()
                    .map(|(l, _)| l)
                    .filter(|l| !live_layers.contains(*l))
                {
                    tx.execute("DELETE FROM layers WHERE diff_id = ?1", [l])
                        .map_err(&e)?;
                    tx.execute("DELETE FROM layer_blobs WHERE diff_id = ?1", [l])
                        .map_err(&e)?;
                    tx.execute("DELETE FROM snapshots WHERE diff_id = ?1", [l])
                        .map_err(&e)?;
                }
                tx.commit().map_err(self.db_err("committing gc"))?;
            }
            (live_blobs, live_layers)
        };
        // Blob files.
        let blobs_dir = self.root().join("blobs/sha256");
        for entry in read_dir(&blobs_dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if live_blobs.contains(&format!("sha256:{name}")) {
                continue;
            }
            report.blobs += 1;
            report.bytes += entry.metadata().map_or(0, |m| m.len());
            if !opts.dry_run {
                remove_path(&entry.path())?;
            }
        }
        // Snapshots.
        let snapshots = self.root().join("snapshots");
        for entry in read_dir(&snapshots)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".lock").unwrap_or(&name);
            let live = base
                .strip_prefix(SNAPSHOT_PREFIX)
                .is_some_and(|hex| live_layers.contains(&format!("sha256:{hex}")));
            if live {
                continue;
            }
            if !name.ends_with(".lock") {
                if name.starts_with(".tmp-") {
                    report.temp_files += 1;
                } else {
                    report.snapshots += 1;
                    report.snapshot_bytes += base
                        .strip_prefix(SNAPSHOT_PREFIX)
                        .and_then(|hex| dead_sizes.get(&format!("sha256:{hex}")))
                        .copied()
                        .unwrap_or(0);
                }
            }
            if !opts.dry_run {
                remove_path(&entry.path())?;
            }
        }
        // Temp files: nobody else holds the store lock, so none is in use.
        // The scratch lanes and their counter stay (where they are placed
        // matters, see `spread`), their contents go.
        let tmp = self.root().join("tmp");
        let mut temps = Vec::new();
        for entry in read_dir(&tmp)? {
            if !crate::spread::is_lane(&entry.file_name()) {
                temps.push(entry);
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                temps.extend(read_dir(&entry.path())?);
            }
        }
        for entry in temps {
            report.temp_files += 1;
            report.bytes += entry.metadata().map_or(0, |m| m.len());
            if !opts.dry_run {
                remove_path(&entry.path())?;
            }
        }
        Ok(report)
    }

    /// Space used, and what `kiln prune` would free.
    pub fn disk_usage(&self) -> Result<DiskUsage> {
        let mut du = DiskUsage::default();
        {
            let conn = self.db();
            let e = self.db_err("measuring");
            du.images = conn
                .query_row("SELECT count(*) FROM images", [], |r| r.get::<_, i64>(0))
                .map_err(&e)? as u64;
            du.images_named = conn
                .query_row("SELECT count(DISTINCT image) FROM names", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(&e)? as u64;
            du.images_bytes = conn
                .query_row(
                    "SELECT COALESCE(sum(size), 0) FROM layers WHERE diff_id IN (SELECT diff_id FROM image_layers)",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(&e)? as u64;
            du.cache_records = conn
                .query_row("SELECT count(*) FROM cache_records", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(&e)? as u64;
        }
        for entry in read_dir(&self.root().join("blobs/sha256"))? {
            du.blobs += 1;
            du.blobs_bytes += entry.metadata().map_or(0, |m| m.len());
        }
        du.snapshots = read_dir(&self.root().join("snapshots"))?
            .iter()
            .filter(|e| {
                e.file_name().to_string_lossy().starts_with(SNAPSHOT_PREFIX) && e.path().is_dir()
            })
            .count() as u64;
        du.reclaimable_bytes = self
            .gc(GcOptions {
                all: false,
                dry_run: true,
                ..GcOptions::default()
            })?
            .bytes;
        Ok(du)
    }

    // ----------------------------------------------------------------- fsck

    /// Checks that every name points to an image whose manifest, config and
    /// layer blobs exist (and, with `verify_content`, hash to their names),
    /// that configs agree with their layer lists, and that recorded
    /// snapshots exist. Returns the problems found (empty: consistent).
    pub fn fsck(&self, verify_content: bool) -> Result<Vec<FsckProblem>> {
        let mut problems = Vec::new();
        let mut p = |message: String| problems.push(FsckProblem { message });
        let (names, images, layers, snapshots) = {
            let conn = self.db();
            let e = self.db_err("checking");
            let ok: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .map_err(&e)?;
            if ok != "ok" {
                p(format!("database integrity check: {ok}"));
            }
            let names: Vec<(String, String)> = conn
                .prepare("SELECT name, image FROM names")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            let images: Vec<(String, String)> = conn
                .prepare("SELECT id, manifest FROM images")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            let mut layers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let rows: Vec<(String, String)> = conn
                .prepare("SELECT image, diff_id FROM image_layers ORDER BY image, position")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&e)?;
            for (image, d) in rows {
                layers.entry(image).or_default().push(d);
            }
            let snapshots: Vec<String> = conn
                .prepare("SELECT id FROM snapshots")
                .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                .map_err(&e)?;
            (names, images, layers, snapshots)
        };
        let ids: HashSet<&String> = images.iter().map(|(id, _)| id).collect();
        for (name, image) in &names {
            if !ids.contains(image) {
                p(format!("name `{name}` points to missing image `{image}`"));
            }
        }
        let check = |d: &str, what: &str, p: &mut dyn FnMut(String)| -> Option<Digest> {
            let digest = match d.parse::<Digest>() {
                Ok(d) => d,
                Err(_) => {
                    p(format!("{what}: invalid digest `{d}`"));
                    return None;
                }
            };
            if !self.has_blob(&digest) {
                p(format!("{what}: blob `{digest}` is missing"));
                return None;
            }
            if verify_content && let Err(e) = self.verify_blob(&digest) {
                p(format!("{what}: {e}"));
                return None;
            }
            Some(digest)
        };
        for (id, manifest) in &images {
            let what = format!("image `{id}`");
            check(manifest, &format!("{what} manifest"), &mut p);
            let image_layers = layers.get(id).cloned().unwrap_or_default();
            if let Some(cd) = check(id, &format!("{what} config"), &mut p) {
                match self.read_blob(&cd).and_then(|b| parse_config(&b, id)) {
                    Ok(config) => {
                        if *config.rootfs().diff_ids() != image_layers {
                            p(format!(
                                "{what}: config diff_ids differ from the recorded layers"
                            ));
                        }
                    }
                    Err(e) => p(format!("{what}: {e}")),
                }
            }
            for l in &image_layers {
                let Ok(d) = l.parse::<Digest>() else {
                    p(format!("{what} layer: invalid digest `{l}`"));
                    continue;
                };
                if self.has_blob(&d) {
                    check(l, &format!("{what} layer"), &mut p);
                } else if let Ok(Some(packed)) = self.packed_layer(&d) {
                    // The packed blob, and what it unpacks to.
                    if check(&packed.to_string(), &format!("{what} packed layer"), &mut p).is_some()
                        && verify_content
                        && let Err(e) = self.verify_layer(&d)
                    {
                        p(format!("{what} layer: {e}"));
                    }
                } else if self.snapshot_dir(&d).is_none() {
                    p(format!("{what} layer: blob `{d}` is missing"));
                } else if verify_content && let Err(e) = self.verify_layer(&d) {
                    p(format!("{what} layer: {e}"));
                }
            }
        }
        for s in snapshots {
            if !self.root().join("snapshots").join(&s).is_dir() {
                p(format!(
                    "snapshot `{s}` is recorded but its directory is missing"
                ));
            }
        }
        Ok(problems)
    }
}

/// The cache records to drop, least recently used first, so that the
/// layers only cache records need (not those of `pinned`: kept images,
/// leases) add up to at most `keep` bytes (uncompressed, from `sizes`).
fn least_recently_used(
    tx: &rusqlite::Transaction<'_>,
    pinned: &BTreeSet<String>,
    sizes: &std::collections::HashMap<&str, u64>,
    keep: u64,
) -> rusqlite::Result<HashSet<String>> {
    let records: Vec<(String, Vec<String>)> = tx
        .prepare("SELECT key, result FROM cache_records ORDER BY last_used, created, key")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .map(|row| {
            row.map(|(key, json)| {
                let mut layers: Vec<String> = serde_json::from_str::<CacheResult>(&json)
                    .map(|r| r.diff_ids.iter().map(ToString::to_string).collect())
                    .unwrap_or_default();
                layers.retain(|l| !pinned.contains(l));
                layers.sort_unstable();
                layers.dedup();
                (key, layers)
            })
        })
        // A record whose layers are all kept anyway frees nothing.
        .filter(|row| row.as_ref().map_or(true, |(_, layers)| !layers.is_empty()))
        .collect::<rusqlite::Result<_>>()?;
    let mut holders: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (_, layers) in &records {
        for l in layers {
            *holders.entry(l.as_str()).or_default() += 1;
        }
    }
    let size = |l: &str| sizes.get(l).copied().unwrap_or(0);
    let mut held: u64 = holders.keys().map(|l| size(l)).sum();
    let mut out = HashSet::new();
    for (key, layers) in &records {
        if held <= keep {
            break;
        }
        out.insert(key.clone());
        for l in layers {
            if let Some(n) = holders.get_mut(l.as_str()) {
                *n -= 1;
                if *n == 0 {
                    held = held.saturating_sub(size(l));
                }
            }
        }
    }
    Ok(out)
}
