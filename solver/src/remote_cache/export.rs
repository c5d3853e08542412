//! `--cache-to`: the records and layers of a finished build as a BuildKit
//! cache config plus an image manifest, written through a transport.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_cache::{Compression, Digest, MEDIA_MANIFEST};

use super::{
    ANNOTATION_CREATED_AT, ANNOTATION_UNCOMPRESSED, ANNOTATION_UNCOMPRESSED_SIZE, CacheConfig,
    CacheInput, CacheLayer, CacheRecord, CacheResultRef, CacheTransport, LayerAnnotations,
    MEDIA_CACHE_CONFIG, RemoteCacheError,
};
use crate::graph::{BuildGraph, Op, SourceOp, StageBase, VertexId};
use crate::key::CacheKey;
use crate::runner::{Chain, StoreRunner};

/// `mode=` of `--cache-to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportMode {
    /// The steps of the exported image only (its stage and the stages it
    /// is built `FROM`).
    #[default]
    Min,
    /// Every step of every stage.
    Max,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Records (cache keys) in the config.
    pub records: usize,
    /// Layers in the config.
    pub layers: usize,
    /// Blobs the cache did not have yet.
    pub blobs_written: usize,
}

fn store_err(what: String) -> impl FnOnce(kiln_cache::StoreError) -> RemoteCacheError {
    move |e| RemoteCacheError::Store {
        what,
        source: Box::new(e),
    }
}

/// The stages whose steps `mode=min` exports: the target and its bases.
fn min_stages(graph: &BuildGraph) -> HashSet<usize> {
    let mut out = HashSet::new();
    let mut cur = graph.target_stage().map(|s| s.index);
    while let Some(i) = cur {
        if !out.insert(i) {
            break;
        }
        cur = match graph.stage(i).map(|s| &s.base) {
            Some(StageBase::Stage { index }) => Some(*index),
            _ => None,
        };
    }
    out
}

/// A layer's blob in the cache: digest, size, media type.
type LayerBlob = (Digest, u64, std::borrow::Cow<'static, str>);

/// The compressed blob of layer `diff_id`: the one an imported cache has
/// when the layer was never fetched here (nothing is downloaded), else
/// the store's gzip blob (made once and remembered).
fn layer_blob(
    runner: &StoreRunner,
    diff_id: &Digest,
    threads: usize,
) -> Result<LayerBlob, RemoteCacheError> {
    let store = runner.store();
    if !store.has_layer(diff_id)
        && let Some(src) = runner.imported_layer(diff_id)
        && src.blob_size > 0
    {
        return Ok((
            src.blob.clone(),
            src.blob_size,
            std::borrow::Cow::Owned(src.media_type.clone()),
        ));
    }
    runner.ensure_layer(diff_id)?;
    let (d, size, mt) =
        kiln_cache::archive::compressed_layer_blob(store, diff_id, Compression::Gzip, threads)
            .map_err(store_err(format!("compressing layer {diff_id}")))?;
    Ok((d, size, std::borrow::Cow::Borrowed(mt)))
}

/// Exports the cache of a build: for each step (per `mode`) its key, the
/// links to its inputs' records and the layer chain of its result; the
/// layers gzip-compressed (once: the compressed blob is remembered in the
/// store). `contents` are the content digests the steps were keyed by
/// ([`crate::solve::Solved::contents`]). Layers an import left in another
/// cache are copied from it, not fetched into the store.
pub fn export_cache(
    runner: &StoreRunner,
    graph: &BuildGraph,
    outputs: &HashMap<VertexId, Chain>,
    keys: &HashMap<VertexId, CacheKey>,
    contents: &BTreeMap<String, String>,
    mode: ExportMode,
    transport: &dyn CacheTransport,
) -> Result<ExportReport, RemoteCacheError> {
    let store = runner.store();
    let stages = min_stages(graph);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let created = kiln_cache::format_rfc3339(now);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);

    let mut cc = CacheConfig::default();
    let mut record_of: HashMap<CacheKey, usize> = HashMap::new();
    let mut layer_of: HashMap<(Digest, i64), usize> = HashMap::new();
    // Blobs in manifest order: (digest, size, media type, diffID, uncompressed size).
    let mut blobs: Vec<(Digest, u64, String, Digest, u64)> = Vec::new();
    let mut blob_seen: HashSet<Digest> = HashSet::new();
    let mut compressed: HashMap<Digest, LayerBlob> = HashMap::new();

    for v in graph.topo_order() {
        let vert = &graph.graph[v];
        let wanted = match mode {
            ExportMode::Max => true,
            ExportMode::Min => vert.stage.is_some_and(|s| stages.contains(&s)),
        };
        let with_result = match &vert.op {
            Op::Exec(_) | Op::File(_) | Op::StageRef { .. } => true,
            // A base image: a record without results, for the links.
            Op::Source(SourceOp::Image { .. }) => false,
            Op::Source(_) | Op::Config(_) => continue,
        };
        if !wanted {
            continue;
        }
        let (Some(key), Some(chain)) = (keys.get(&v), outputs.get(&v)) else {
            continue;
        };
        if record_of.contains_key(key) {
            continue;
        }
        let mut rec = CacheRecord {
            digest: key.0.clone(),
            ..CacheRecord::default()
        };
        for (p, _) in graph.inputs(v) {
            if let Some(&i) = keys.get(&p).and_then(|k| record_of.get(k)) {
                rec.inputs.push(vec![CacheInput {
                    selector: String::new(),
                    link_index: i as i64,
                }]);
            }
        }
        if with_result && !chain.layers.is_empty() {
            let mut parent: i64 = -1;
            for l in &chain.layers {
                let (blob, size, media_type) = match compressed.get(&l.diff_id) {
                    Some(c) => c.clone(),
                    None => {
                        let c = layer_blob(runner, &l.diff_id, threads)?;
                        compressed.insert(l.diff_id.clone(), c.clone());
                        c
                    }
                };
                let idx = *layer_of.entry((blob.clone(), parent)).or_insert_with(|| {
                    cc.layers.push(CacheLayer {
                        blob: blob.to_string(),
                        parent_index: parent,
                        annotations: Some(LayerAnnotations {
                            media_type: media_type.to_string(),
                            diff_id: l.diff_id.to_string(),
                            size: i64::try_from(size).unwrap_or(i64::MAX),
                            created_at: created.clone(),
                        }),
                    });
                    cc.layers.len() - 1
                });
                if blob_seen.insert(blob.clone()) {
                    blobs.push((
                        blob,
                        size,
                        media_type.to_string(),
                        l.diff_id.clone(),
                        l.size,
                    ));
                }
                parent = idx as i64;
            }
            rec.results.push(CacheResultRef {
                layer_index: parent,
                created_at: created.clone(),
            });
        }
        record_of.insert(key.clone(), cc.records.len());
        cc.records.push(rec);
    }
    cc.kiln_contents = runner.used_contents();
    cc.kiln_contents
        .extend(contents.iter().map(|(k, v)| (k.clone(), v.clone())));

    let mut report = ExportReport {
        records: cc.records.len(),
        layers: cc.layers.len(),
        blobs_written: 0,
    };
    for (blob, size, _, diff_id, _) in &blobs {
        if transport.has_blob(blob)? {
            continue;
        }
        if store.has_blob(blob) {
            let mut r = store
                .open_blob(blob)
                .map_err(store_err(format!("reading blob {blob}")))?;
            transport.put_blob(blob, *size, &mut r)?;
        } else if let Some(src) = runner.imported_layer(diff_id) {
            // Only in the imported cache: copied across, not stored here.
            let mut r = src.transport.get_blob(&src.blob)?;
            transport.put_blob(blob, *size, &mut r)?;
        }
        report.blobs_written += 1;
    }
    let config_bytes = serde_json::to_vec(&cc).map_err(|e| RemoteCacheError::Invalid {
        cache: transport.name(),
        what: "the cache config".into(),
        reason: e.to_string(),
    })?;
    let config_digest = Digest::of_bytes(&config_bytes);
    if !transport.has_blob(&config_digest)? {
        transport.put_blob(
            &config_digest,
            config_bytes.len() as u64,
            &mut &config_bytes[..],
        )?;
        report.blobs_written += 1;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CACHE_CONFIG,
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": blobs.iter().map(|(d, size, mt, diff_id, usize_)| {
            let mut ann = BTreeMap::new();
            ann.insert(ANNOTATION_UNCOMPRESSED, diff_id.to_string());
            ann.insert(ANNOTATION_CREATED_AT, created.clone());
            ann.insert(ANNOTATION_UNCOMPRESSED_SIZE, usize_.to_string());
            serde_json::json!({
                "mediaType": mt,
                "digest": d.to_string(),
                "size": size,
                "annotations": ann,
            })
        }).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| RemoteCacheError::Invalid {
        cache: transport.name(),
        what: "the cache manifest".into(),
        reason: e.to_string(),
    })?;
    transport.put_root(MEDIA_MANIFEST, &bytes)?;
    Ok(report)
}
