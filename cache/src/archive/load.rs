//! `kiln load`: docker-archive, OCI archive and OCI layout directory.

use std::path::Path;

use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Deserialize;

use super::source::Source;
use super::{ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME};
use crate::compress::Compression;
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::image::{LayerInfo, parse_config};
use crate::reference::Reference;
use crate::store::Store;
use crate::validate::{
    DocumentKind, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
    validate_document,
};

/// An image `load` stored.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// Its id (config digest).
    pub id: Digest,
    /// The names it was given (empty: untagged).
    pub names: Vec<Reference>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Loads every image of a docker-archive, OCI archive or OCI layout
/// directory into the store. Names come from `RepoTags` (docker-archive)
/// or the `io.containerd.image.name` / `org.opencontainers.image.ref.name`
/// annotations (OCI), as `docker load` does.
pub fn load(store: &Store, path: &Path) -> Result<Vec<LoadedImage>> {
    let source = Source::open(path)?;
    // Hold the store lock shared from the first blob to the last ref, so GC
    // never sees our blobs before they are referenced.
    let _lock = store.lock_shared()?;
    // docker ≥ 25 writes both manifest.json and an OCI layout; manifest.json
    // has the RepoTags, so it wins.
    if source.exists("manifest.json") {
        load_docker(store, &source)
    } else if source.exists("index.json") {
        load_oci(store, &source)
    } else {
        Err(StoreError::UnknownFormat {
            path: path.to_owned(),
            reason: "it has neither `manifest.json` (docker-archive) nor `index.json` (OCI)"
                .to_owned(),
        })
    }
}

fn load_docker(store: &Store, source: &Source) -> Result<Vec<LoadedImage>> {
    let bytes = source.read("manifest.json")?;
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidDocument {
            kind: "docker-archive manifest",
            what: "manifest.json".to_owned(),
            reason: e.to_string(),
        })?;
    let mut out = Vec::new();
    for entry in entries {
        let config = source.read(&entry.config)?;
        // Config file names are `<hex>.json` or `blobs/sha256/<hex>`: check
        // the content against the name when it is a digest.
        let stem = entry
            .config
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".json");
        if let Ok(named) = Digest::from_hex(stem) {
            let actual = Digest::of_bytes(&config);
            if actual != named {
                return Err(StoreError::DigestMismatch {
                    expected: named.to_string(),
                    actual: actual.to_string(),
                    context: entry.config.clone(),
                });
            }
        }
        let layers = entry
            .layers
            .iter()
            .map(|l| (l.clone(), None))
            .collect::<Vec<(String, Option<Digest>)>>();
        let names = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| Reference::parse(t))
            .collect::<Result<Vec<_>>>()?;
        out.push(store_image(store, source, &config, &layers, names)?);
    }
    Ok(out)
}

fn read_index(source: &Source, name: &str) -> Result<ImageIndex> {
    let bytes = source.read(name)?;
    validate_document(DocumentKind::Index, &bytes, name)?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidDocument {
        kind: "index",
        what: name.to_owned(),
        reason: e.to_string(),
    })
}

fn blob_name(d: &oci_spec::image::Digest) -> Result<(String, Digest)> {
    let digest = Digest::from_oci(d)?;
    Ok((format!("blobs/sha256/{}", digest.hex()), digest))
}

fn read_verified(source: &Source, d: &oci_spec::image::Digest) -> Result<Vec<u8>> {
    let (name, digest) = blob_name(d)?;
    let bytes = source.read(&name)?;
    let actual = Digest::of_bytes(&bytes);
    if actual != digest {
        return Err(StoreError::DigestMismatch {
            expected: digest.to_string(),
            actual: actual.to_string(),
            context: name,
        });
    }
    Ok(bytes)
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn load_oci(store: &Store, source: &Source) -> Result<Vec<LoadedImage>> {
    if source.exists("oci-layout") {
        let layout = source.read("oci-layout")?;
        validate_document(DocumentKind::Layout, &layout, "oci-layout")?;
    }
    let index = read_index(source, "index.json")?;
    let mut out = Vec::new();
    for desc in index.manifests() {
        let names = name_from_annotations(desc.annotations().as_ref())?;
        let mut desc = desc.clone();
        // Follow nested indexes (multi-platform) to this host's manifest.
        for _ in 0..4 {
            let mt = desc.media_type().to_string();
            if mt != MEDIA_OCI_INDEX && mt != MEDIA_DOCKER_LIST {
                break;
            }
            let bytes = read_verified(source, desc.digest())?;
            validate_document(DocumentKind::Index, &bytes, desc.digest().as_ref())?;
            let nested: ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidDocument {
                    kind: "index",
                    what: desc.digest().to_string(),
                    reason: e.to_string(),
                })?;
            let pick = nested
                .manifests()
                .iter()
                .find(|m| {
                    m.platform().as_ref().is_some_and(|p| {
                        p.os().to_string() == "linux" && p.architecture().to_string() == host_arch()
                    })
                })
                .or_else(|| nested.manifests().first())
                .cloned();
            match pick {
                Some(p) => desc = p,
                None => {
                    return Err(StoreError::InvalidDocument {
                        kind: "index",
                        what: desc.digest().to_string(),
                        reason: "it lists no manifests".to_owned(),
                    });
                }
            }
        }
        let mt = desc.media_type().to_string();
        if mt != MEDIA_OCI_MANIFEST && mt != MEDIA_DOCKER_MANIFEST {
            return Err(StoreError::InvalidDocument {
                kind: "index",
                what: "index.json".to_owned(),
                reason: format!(
                    "`{}` has media type `{mt}`, not an image manifest",
                    desc.digest()
                ),
            });
        }
        let bytes = read_verified(source, desc.digest())?;
        validate_document(DocumentKind::Manifest, &bytes, desc.digest().as_ref())?;
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidDocument {
                kind: "manifest",
                what: desc.digest().to_string(),
                reason: e.to_string(),
            })?;
        let config = read_verified(source, manifest.config().digest())?;
        let mut layers = Vec::new();
        for l in manifest.layers() {
            let lmt = l.media_type().to_string();
            if Compression::from_media_type(&lmt).is_none() {
                return Err(StoreError::InvalidDocument {
                    kind: "manifest",
                    what: desc.digest().to_string(),
                    reason: format!(
                        "layer `{}` has media type `{lmt}`, which is not a layer kiln reads",
                        l.digest()
                    ),
                });
            }
            let (name, digest) = blob_name(l.digest())?;
            layers.push((name, Some(digest)));
        }
        out.push(store_image(store, source, &config, &layers, names)?);
    }
    Ok(out)
}

fn name_from_annotations(
    a: Option<&std::collections::HashMap<String, String>>,
) -> Result<Vec<Reference>> {
    let Some(a) = a else { return Ok(Vec::new()) };
    if let Some(n) = a.get(ANNOTATION_CONTAINERD_NAME) {
        return Ok(vec![Reference::parse(n)?]);
    }
    if let Some(n) = a.get(ANNOTATION_REF_NAME) {
        // A bare tag (`latest`, as `skopeo copy oci:dir:latest` writes)
        // names no repository: such an image loads untagged, as in docker.
        if n.contains(['/', ':']) {
            return Ok(vec![Reference::parse(n)?]);
        }
    }
    Ok(Vec::new())
}

fn store_image(
    store: &Store,
    source: &Source,
    config: &[u8],
    layers: &[(String, Option<Digest>)],
    names: Vec<Reference>,
) -> Result<LoadedImage> {
    let config_digest = Digest::of_bytes(config);
    let parsed = parse_config(config, &config_digest.to_string())?;
    let diff_ids = parsed.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(StoreError::InvalidDocument {
            kind: "config",
            what: config_digest.to_string(),
            reason: format!(
                "it lists {} layers (rootfs.diff_ids) but the manifest has {}",
                diff_ids.len(),
                layers.len()
            ),
        });
    }
    let mut infos = Vec::with_capacity(layers.len());
    for (i, ((name, compressed), want)) in layers.iter().zip(diff_ids).enumerate() {
        let want: Digest = want.parse()?;
        // Already stored (e.g. a base layer shared with another image, or
        // a retried load): the blob was verified when it was written.
        if store.has_blob(&want) {
            let size = fs_err::metadata(store.blob_path(&want))
                .map_err(|e| StoreError::io("reading blob metadata", store.blob_path(&want), e))?
                .len();
            infos.push(LayerInfo {
                diff_id: want,
                size,
            });
            continue;
        }
        let (reader, _) = source.open_entry(name)?;
        let what = format!("{}: {name}", source.path().display());
        let info = store
            .commit_layer_from_tar(reader, compressed.as_ref(), Some(&want), &what)
            .map_err(|e| match e {
                StoreError::DigestMismatch {
                    expected, actual, ..
                } if expected == want.to_string() => StoreError::DiffIdMismatch {
                    image: config_digest.to_string(),
                    index: i,
                    expected,
                    actual,
                },
                other => other,
            })?;
        infos.push(info);
    }
    let image = store.put_image(&names, config, &infos)?;
    Ok(LoadedImage {
        id: image.id,
        names,
    })
}
