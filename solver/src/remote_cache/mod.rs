//! Build cache export and import in BuildKit's format
//! (`--cache-to`/`--cache-from`), so that several machines share one
//! cache and a cache written by one tool can be read by the other.
//!
//! # Format
//!
//! A cache is one OCI image manifest whose config blob has the media type
//! [`MEDIA_CACHE_CONFIG`] (`application/vnd.buildkit.cacheconfig.v0`) and
//! whose layers are the cached layers, gzip-compressed (what BuildKit
//! writes with `image-manifest=true`); BuildKit's older form, an image
//! index listing the layers and the config blob, is read too. The config
//! ([`CacheConfig`]) lists layers (`blob`, `parent` index) and records:
//! a record's `digest` is a cache key, its `layers` its results (the
//! index of its top layer; the chain is followed through `parent`), its
//! `inputs` links to the records of its inputs.
//!
//! kiln writes its own cache keys as record digests: BuildKit's keys are
//! digests of its LLB definitions, which kiln does not produce, so a cache
//! written by BuildKit is read without error but gives no hits (and the
//! other way round). Two things are kiln's own and ignored by BuildKit:
//! the uncompressed size of a layer (a layer descriptor annotation) and
//! the content digests of what steps read from other stages (a
//! `kiln.contentDigests` field of the config), so that an importing build
//! computes the key of a `COPY --from=<stage>` without the stage's layers.
//!
//! # Import is lazy
//!
//! An imported record makes a step a hit, but its layers are fetched only
//! when something needs their content: a later step that runs on them, or
//! the final image. A hit on the last step of a stage therefore downloads
//! none of the layers of the steps before it.
//!
//! Transports ([`CacheTransport`]): a local OCI layout directory
//! ([`LocalLayout`], `type=local`) and a registry repository
//! ([`RegistryCache`], `type=registry`).

mod export;
mod registry;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_cache::{Digest, StoreError};
use serde::{Deserialize, Serialize};

pub use export::{ExportMode, ExportReport, export_cache};
pub use registry::RegistryCache;
pub use transport::{CacheTransport, LocalLayout, READ_LOG_ENV};

/// The media type of BuildKit's cache config blob.
pub const MEDIA_CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";
/// The annotation of a layer descriptor with its diffID (containerd's).
pub const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// The annotation of a layer descriptor with its creation time (BuildKit's).
pub const ANNOTATION_CREATED_AT: &str = "buildkit/createdat";
/// kiln's annotation of a layer descriptor with its uncompressed size.
pub const ANNOTATION_UNCOMPRESSED_SIZE: &str = "io.kiln.uncompressed-size";
/// The annotation naming a manifest in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// BuildKit's cache config (`cache/remotecache/v1/spec.go`), field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// The layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    /// The records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
    /// kiln's: content digests of what steps read from other stages, by
    /// the id of (stage filesystem, selection). BuildKit ignores it.
    #[serde(
        default,
        rename = "kiln.contentDigests",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub kiln_contents: BTreeMap<String, String>,
}

/// One layer: its blob and the layer under it (`-1`: none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The (compressed) blob's digest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blob: String,
    /// The index of the layer under it, `-1` for a bottom layer.
    #[serde(default, rename = "parent")]
    pub parent_index: i64,
    /// What the blob is (BuildKit writes these too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

/// A layer's media type, diffID, size and time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerAnnotations {
    /// The blob's media type.
    #[serde(
        default,
        rename = "mediaType",
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    /// The uncompressed digest.
    #[serde(default, rename = "diffID", skip_serializing_if = "String::is_empty")]
    pub diff_id: String,
    /// The blob's size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    /// When it was made (RFC 3339).
    #[serde(
        default,
        rename = "createdAt",
        skip_serializing_if = "String::is_empty"
    )]
    pub created_at: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One cache key, its results and its inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Results: the top layer of each (BuildKit's field name is `layers`).
    #[serde(default, rename = "layers", skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResultRef>,
    /// Results made of several chains (BuildKit's merge/diff ops): read,
    /// never written, never a hit for kiln.
    #[serde(default, rename = "chains", skip_serializing_if = "Vec::is_empty")]
    pub chained_results: Vec<serde_json::Value>,
    /// The cache key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Per input of the op, the records that can be that input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

/// A result: the index of its top layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheResultRef {
    /// The layer index.
    #[serde(rename = "layer")]
    pub layer_index: i64,
    /// When it was made (RFC 3339).
    #[serde(
        default,
        rename = "createdAt",
        skip_serializing_if = "String::is_empty"
    )]
    pub created_at: String,
}

/// A link to the record of an input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInput {
    /// What of the input the op uses (BuildKit's selectors; kiln: empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// The index of the input's record.
    #[serde(rename = "link")]
    pub link_index: i64,
}

/// Why a cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RemoteCacheError {
    /// Reading or writing a file of a cache.
    #[error("{what} `{}`", path.display())]
    Io {
        /// What was being done.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A document of the cache is not what it should be.
    #[error("cache {cache}: {what}: {reason}")]
    Invalid {
        /// The cache (`type=local,src=DIR`).
        cache: String,
        /// Which document or blob.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob's bytes do not hash to its name.
    #[error("cache {cache}: blob {digest} is corrupt (its content hashes to {actual})")]
    Corrupt {
        /// The cache.
        cache: String,
        /// The blob.
        digest: String,
        /// What it hashes to.
        actual: String,
    },
    /// The transport failed (the registry said no, the network failed).
    #[error("cache {cache}: {what}: {reason}")]
    Transport {
        /// The cache.
        cache: String,
        /// What was being done.
        what: String,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
}

/// Where a layer of an imported cache can be fetched from.
#[derive(Debug, Clone)]
pub struct LayerSource {
    /// The cache.
    pub transport: Arc<dyn CacheTransport>,
    /// The compressed blob.
    pub blob: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size (0 when the cache does not say).
    pub blob_size: u64,
}

/// One layer of an imported result: diffID and uncompressed size (0 when
/// the cache does not say; the real size is known once it is fetched).
pub type ImportedLayer = (Digest, u64);

/// The caches given with `--cache-from`, merged: records by key, where
/// each layer can be fetched, and content digests.
#[derive(Debug, Default)]
pub struct ImportedCache {
    records: HashMap<String, (Vec<ImportedLayer>, String)>,
    layers: HashMap<Digest, LayerSource>,
    contents: HashMap<String, String>,
}

impl ImportedCache {
    /// An empty import.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the cache of `transport` and adds its records. `Ok(false)`
    /// when there is no cache there (a warning for the caller, as in
    /// BuildKit).
    pub fn add(&mut self, transport: Arc<dyn CacheTransport>) -> Result<bool, RemoteCacheError> {
        let name = transport.name();
        let Some((media_type, bytes)) = transport.get_root()? else {
            return Ok(false);
        };
        let invalid = |what: &str, reason: String| RemoteCacheError::Invalid {
            cache: name.clone(),
            what: what.to_owned(),
            reason,
        };
        let root: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid("the cache manifest", e.to_string()))?;
        let media_type = root["mediaType"].as_str().map_or(media_type, str::to_owned);
        // The config descriptor and the layer descriptors.
        let (config, descriptors): (serde_json::Value, Vec<serde_json::Value>) = if media_type
            .contains("index")
            || media_type.contains("manifest.list")
        {
            // BuildKit's index form: the config is one of the manifests.
            let all = root["manifests"].as_array().cloned().unwrap_or_default();
            let config = all
                .iter()
                .find(|d| d["mediaType"] == MEDIA_CACHE_CONFIG)
                .cloned()
                .ok_or_else(|| {
                    invalid(
                        "the cache index",
                        format!("it lists no `{MEDIA_CACHE_CONFIG}` blob"),
                    )
                })?;
            let layers = all
                .into_iter()
                .filter(|d| d["mediaType"] != MEDIA_CACHE_CONFIG)
                .collect();
            (config, layers)
        } else {
            let config = root["config"].clone();
            if config["mediaType"] != MEDIA_CACHE_CONFIG {
                return Err(invalid(
                    "the cache manifest",
                    format!(
                        "its config has media type {} (want `{MEDIA_CACHE_CONFIG}`): not a build cache",
                        config["mediaType"]
                    ),
                ));
            }
            (
                config,
                root["layers"].as_array().cloned().unwrap_or_default(),
            )
        };
        let config_digest = descriptor_digest(&config)
            .ok_or_else(|| invalid("the cache manifest", "the config has no digest".into()))?;
        let config_bytes = transport.get_small_blob(&config_digest)?;
        let cc: CacheConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(&format!("the cache config {config_digest}"), e.to_string()))?;
        // What the manifest says of each blob.
        let mut by_blob: HashMap<String, &serde_json::Value> = HashMap::new();
        for d in &descriptors {
            if let Some(dg) = d["digest"].as_str() {
                by_blob.insert(dg.to_owned(), d);
            }
        }
        // Each layer: (diffID, size, blob, media type, blob size), or None
        // when the cache does not say what it is (then its records are
        // skipped).
        let layer_info: Vec<Option<LayerRow>> = cc
            .layers
            .iter()
            .map(|l| {
                let desc = by_blob.get(&l.blob);
                let ann = l.annotations.clone().unwrap_or_default();
                let diff_id = if ann.diff_id.is_empty() {
                    desc.and_then(|d| d["annotations"][ANNOTATION_UNCOMPRESSED].as_str())
                        .map(str::to_owned)?
                } else {
                    ann.diff_id
                };
                let size = desc
                    .and_then(|d| d["annotations"][ANNOTATION_UNCOMPRESSED_SIZE].as_str())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let media_type = if ann.media_type.is_empty() {
                    desc.and_then(|d| d["mediaType"].as_str())
                        .unwrap_or(kiln_cache::MEDIA_LAYER_GZIP)
                        .to_owned()
                } else {
                    ann.media_type
                };
                let blob_size = desc
                    .and_then(|d| d["size"].as_u64())
                    .or_else(|| u64::try_from(ann.size).ok())
                    .unwrap_or(0);
                Some((
                    diff_id.parse().ok()?,
                    size,
                    l.blob.parse().ok()?,
                    media_type,
                    blob_size,
                ))
            })
            .collect();
        for rec in &cc.records {
            let Some(result) = rec.results.first() else {
                continue;
            };
            // Follow the chain down; a loop or a bad index skips the record.
            let mut chain = Vec::new();
            let mut i = result.layer_index;
            let mut ok = true;
            while i >= 0 {
                let Some(Some(info)) = usize::try_from(i).ok().and_then(|u| layer_info.get(u))
                else {
                    ok = false;
                    break;
                };
                if chain.len() > cc.layers.len() {
                    ok = false;
                    break;
                }
                chain.push(info.clone());
                i = cc.layers[usize::try_from(i).unwrap_or(0)].parent_index;
            }
            if !ok {
                continue;
            }
            chain.reverse();
            let layers = chain.iter().map(|(d, s, ..)| (d.clone(), *s)).collect();
            for (diff_id, _, blob, media_type, blob_size) in chain {
                self.layers.entry(diff_id).or_insert_with(|| LayerSource {
                    transport: Arc::clone(&transport),
                    blob,
                    media_type,
                    blob_size,
                });
            }
            self.records
                .entry(rec.digest.clone())
                .or_insert((layers, name.clone()));
        }
        for (k, v) in cc.kiln_contents {
            self.contents.entry(k).or_insert(v);
        }
        Ok(true)
    }

    /// The result of `key` (its layers, lowest first) and which cache has it.
    pub fn record(&self, key: &str) -> Option<(&[ImportedLayer], &str)> {
        self.records
            .get(key)
            .map(|(l, n)| (l.as_slice(), n.as_str()))
    }

    /// Where layer `diff_id` can be fetched from.
    pub fn layer(&self, diff_id: &Digest) -> Option<&LayerSource> {
        self.layers.get(diff_id)
    }

    /// A content digest the cache remembers (see [`CacheConfig::kiln_contents`]).
    pub fn content(&self, id: &str) -> Option<&str> {
        self.contents.get(id).map(String::as_str)
    }

    /// How many records were imported.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing was imported.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// A layer of a cache config: diffID, uncompressed size, blob, media
/// type, blob size.
type LayerRow = (Digest, u64, Digest, String, u64);

fn descriptor_digest(d: &serde_json::Value) -> Option<Digest> {
    d["digest"].as_str()?.parse().ok()
}

/// Fetches layer `diff_id` from `src` into `store`: the blob is
/// decompressed into the store and checked against both its compressed
/// digest and the diffID before it is committed (a bad blob leaves
/// nothing behind). Returns the uncompressed size.
pub fn fetch_layer(
    store: &kiln_cache::Store,
    diff_id: &Digest,
    src: &LayerSource,
) -> Result<u64, RemoteCacheError> {
    let reader = src.transport.get_blob(&src.blob)?;
    let what = format!("layer blob {} of cache {}", src.blob, src.transport.name());
    let info = store
        .commit_layer_from_tar(reader, Some(&src.blob), Some(diff_id), &what)
        .map_err(|e| RemoteCacheError::Store {
            what: format!("fetching {what}"),
            source: Box::new(e),
        })?;
    Ok(info.size)
}

/// `--cache-to`/`--cache-from` specs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// `type=local,dest=DIR` / `type=local,src=DIR` (and `tag=`, default `latest`).
    Local {
        /// The directory.
        dir: PathBuf,
        /// The tag in `index.json`.
        tag: String,
    },
    /// `type=registry,ref=R`.
    Registry {
        /// The reference.
        reference: String,
    },
}

/// A parsed `--cache-to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTo {
    /// Where.
    pub location: CacheLocation,
    /// `mode=min|max`.
    pub mode: ExportMode,
}

/// A bad `--cache-to`/`--cache-from` value.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} `{spec}`: {reason}")]
pub struct SpecError {
    /// `--cache-to` or `--cache-from`.
    pub flag: &'static str,
    /// The value.
    pub spec: String,
    /// What is wrong.
    pub reason: String,
}

fn parse_attrs(
    flag: &'static str,
    spec: &str,
    allowed: &[&str],
) -> Result<BTreeMap<String, String>, SpecError> {
    let err = |reason: String| SpecError {
        flag,
        spec: spec.to_owned(),
        reason,
    };
    let mut out = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(err(format!("attribute `{part}` is not KEY=VALUE")));
        };
        let k = k.trim().to_ascii_lowercase();
        // BuildKit's attributes kiln accepts and does not need.
        if [
            "compression",
            "compression-level",
            "force-compression",
            "oci-mediatypes",
            "image-manifest",
            "ignore-error",
        ]
        .contains(&k.as_str())
        {
            continue;
        }
        if !allowed.contains(&k.as_str()) {
            return Err(err(format!(
                "unknown attribute `{k}` (known: {})",
                allowed.join(", ")
            )));
        }
        out.insert(k, v.to_owned());
    }
    Ok(out)
}

fn parse_location(
    flag: &'static str,
    spec: &str,
    attrs: &BTreeMap<String, String>,
    dir_attr: &str,
) -> Result<CacheLocation, SpecError> {
    let err = |reason: String| SpecError {
        flag,
        spec: spec.to_owned(),
        reason,
    };
    let ty = attrs.get("type").map_or("registry", String::as_str);
    match ty {
        "local" => {
            let dir = attrs
                .get(dir_attr)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| err(format!("type=local needs `{dir_attr}=DIR`")))?;
            if attrs.contains_key("ref") {
                return Err(err("attribute `ref` is for type=registry".into()));
            }
            Ok(CacheLocation::Local {
                dir: PathBuf::from(dir),
                tag: attrs.get("tag").cloned().unwrap_or_else(|| "latest".into()),
            })
        }
        "registry" => {
            let reference = attrs
                .get("ref")
                .filter(|r| !r.is_empty())
                .ok_or_else(|| err("type=registry needs `ref=REFERENCE`".into()))?;
            if let Some(a) = ["src", "dest", "tag"]
                .iter()
                .find(|a| attrs.contains_key(**a))
            {
                return Err(err(format!("attribute `{a}` is for type=local")));
            }
            Ok(CacheLocation::Registry {
                reference: reference.clone(),
            })
        }
        other => Err(err(format!(
            "attribute `type`: `{other}` is not supported (local, registry)"
        ))),
    }
}

impl CacheTo {
    /// Parses `type=local,dest=DIR[,mode=min|max][,tag=T]` or
    /// `type=registry,ref=R[,mode=..]`.
    pub fn parse(spec: &str) -> Result<CacheTo, SpecError> {
        const FLAG: &str = "--cache-to";
        let attrs = parse_attrs(FLAG, spec, &["type", "dest", "ref", "mode", "tag"])?;
        let mode = match attrs.get("mode").map(String::as_str) {
            None | Some("min") => ExportMode::Min,
            Some("max") => ExportMode::Max,
            Some(other) => {
                return Err(SpecError {
                    flag: FLAG,
                    spec: spec.to_owned(),
                    reason: format!("attribute `mode`: `{other}` is not min or max"),
                });
            }
        };
        Ok(CacheTo {
            location: parse_location(FLAG, spec, &attrs, "dest")?,
            mode,
        })
    }
}

/// Parses a `--cache-from`: `type=local,src=DIR[,tag=T]`,
/// `type=registry,ref=R`, or a bare reference (a registry, as BuildKit).
pub fn parse_cache_from(spec: &str) -> Result<CacheLocation, SpecError> {
    const FLAG: &str = "--cache-from";
    if !spec.contains('=') {
        return Ok(CacheLocation::Registry {
            reference: spec.to_owned(),
        });
    }
    let attrs = parse_attrs(FLAG, spec, &["type", "src", "ref", "tag", "digest"])?;
    parse_location(FLAG, spec, &attrs, "src")
}

#[cfg(test)]
mod tests;
