//! `kiln pull`: registry → store, with nothing half-stored.
//!
//! The manifest (through an index, for the platform asked for) and the
//! config are fetched into memory and checked. Layers are downloaded by a
//! few threads, each streamed through [`Store::commit_layer_from_tar`]:
//! decompressed while it arrives, its raw bytes checked against the
//! descriptor (digest and size) and its tar against the config's diffID
//! before the blob is committed. The image and its name are recorded last,
//! in one transaction ([`Store::put_image`]); a failure before leaves at
//! most complete, verified, unreferenced layers that GC removes.

use std::fmt;
use std::sync::Mutex;

use oci_spec::image::{ImageIndex, ImageManifest};

use super::RegistryError;
use super::client::{FetchedManifest, RegistryClient};
use super::reference::ImageRef;
use crate::compress::Compression;
use crate::digest::Digest;
use crate::error::StoreError;
use crate::image::{LayerInfo, parse_config};
use crate::store::Store;
use crate::validate::{DocumentKind, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST, validate_document};

/// An `os/arch[/variant]` platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v7`, `v8`, ...
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, RegistryError> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || RegistryError::InvalidReference {
            reference: s.to_owned(),
            reason: "a platform is `os/arch[/variant]`, e.g. `linux/arm64`".to_owned(),
        };
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Platform {
            os: parts[0].to_ascii_lowercase(),
            architecture: normalize_arch(&parts[1].to_ascii_lowercase()),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }

    /// The machine kiln runs on.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }
}

fn normalize_arch(a: &str) -> String {
    match a {
        "x86_64" | "x86-64" => "amd64".to_owned(),
        "aarch64" => "arm64".to_owned(),
        other => other.to_owned(),
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Options for [`pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to pick from an index (default: the host's).
    pub platform: Option<Platform>,
    /// Layers downloaded at once.
    pub threads: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            threads: 3,
        }
    }
}

/// Progress of a pull, for rendering.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The manifest was found.
    Resolved {
        /// The manifest digest (of the platform's manifest).
        digest: Digest,
    },
    /// The layer is in the store already.
    LayerExists {
        /// Compressed digest.
        digest: Digest,
    },
    /// Downloading started.
    LayerStarted {
        /// Compressed digest.
        digest: Digest,
        /// Compressed size.
        size: u64,
    },
    /// The layer is downloaded, verified and stored.
    LayerDone {
        /// Compressed digest.
        digest: Digest,
    },
}

/// What [`pull`] stored.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The image id (config digest).
    pub id: Digest,
    /// The manifest digest the registry knows the image by (the index's
    /// when the reference named an index).
    pub digest: Digest,
    /// The name recorded in the store (none for a digest-only reference).
    pub name: Option<crate::reference::Reference>,
    /// Whether the image (by id) was in the store already.
    pub up_to_date: bool,
}

/// Picks `platform`'s manifest from an index: exact os/arch/variant, then
/// os/arch with any variant (`arm64` → `v8`).
pub fn select_platform(
    index_bytes: &[u8],
    what: &str,
    platform: &Platform,
) -> Result<(Digest, Option<u64>), RegistryError> {
    let index: ImageIndex =
        serde_json::from_slice(index_bytes).map_err(|e| RegistryError::Document {
            what: format!("index of `{what}`"),
            reason: e.to_string(),
        })?;
    let mut candidates = Vec::new();
    let mut available = Vec::new();
    for m in index.manifests() {
        let Some(p) = m.platform() else { continue };
        let os = p.os().to_string();
        let arch = normalize_arch(&p.architecture().to_string());
        let variant = p.variant().clone();
        available.push(match &variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        });
        if os != platform.os || arch != platform.architecture {
            continue;
        }
        let rank = match (&platform.variant, &variant) {
            (Some(w), Some(v)) if w == v => 0,
            (Some(_), Some(_)) => continue,
            (None, None) => 0,
            _ => 1,
        };
        candidates.push((rank, m));
    }
    candidates.sort_by_key(|(rank, _)| *rank);
    match candidates.first() {
        Some((_, m)) => Ok((Digest::from_oci(m.digest())?, Some(m.size()))),
        None => Err(RegistryError::NoPlatform {
            image: what.to_owned(),
            platform: platform.to_string(),
            available: if available.is_empty() {
                "no platforms".to_owned()
            } else {
                available.join(", ")
            },
        }),
    }
}

/// Pulls `image` into the store and names it (for a tag reference). See
/// the module docs for what is verified when.
pub fn pull(
    store: &Store,
    client: &RegistryClient,
    image: &ImageRef,
    opts: &PullOptions,
    progress: &(dyn Fn(PullEvent) + Sync),
) -> Result<PulledImage, RegistryError> {
    let name = image.to_string();
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let top = client.get_manifest(&image.reference())?;
    let top_digest = top.digest.clone();
    let was_index = top.is_index();
    let manifest = if was_index {
        validate_document(DocumentKind::Index, &top.bytes, &name)?;
        let (digest, size) = select_platform(&top.bytes, &name, &platform)?;
        let m = client.get_manifest(&digest.to_string())?;
        if size.is_some_and(|s| s != m.bytes.len() as u64) {
            return Err(RegistryError::Document {
                what: format!("manifest `{digest}` of `{name}`"),
                reason: "its size differs from the index's descriptor".to_owned(),
            });
        }
        m
    } else {
        top
    };
    progress(PullEvent::Resolved {
        digest: manifest.digest.clone(),
    });
    let FetchedManifest {
        bytes, media_type, ..
    } = &manifest;
    if media_type != MEDIA_OCI_MANIFEST && media_type != MEDIA_DOCKER_MANIFEST {
        return Err(RegistryError::Document {
            what: format!("manifest of `{name}`"),
            reason: format!("media type `{media_type}` is not an image manifest kiln pulls"),
        });
    }
    validate_document(DocumentKind::Manifest, bytes, &name)?;
    let parsed: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Document {
            what: format!("manifest of `{name}`"),
            reason: e.to_string(),
        })?;
    let config_digest = Digest::from_oci(parsed.config().digest())?;
    let config = client
        .get_blob_bytes(&config_digest, Some(parsed.config().size()))
        .map_err(|e| wrap_blob(&name, &config_digest, e))?;
    let config_parsed = parse_config(&config, &config_digest.to_string())?;
    let diff_ids = config_parsed.rootfs().diff_ids();
    if diff_ids.len() != parsed.layers().len() {
        return Err(RegistryError::Document {
            what: format!("image `{name}`"),
            reason: format!(
                "its config lists {} layers (rootfs.diff_ids) but its manifest has {}",
                diff_ids.len(),
                parsed.layers().len()
            ),
        });
    }
    // A single-platform image must be the platform asked for (docker:
    // "does not match the specified platform").
    if !was_index && let Some(want) = &opts.platform {
        let os = config_parsed.os().to_string();
        let arch = normalize_arch(&config_parsed.architecture().to_string());
        let variant = config_parsed.variant().clone();
        if os != want.os
            || arch != want.architecture
            || (want.variant.is_some() && variant.is_some() && want.variant != variant)
        {
            let found = Platform {
                os,
                architecture: arch,
                variant,
            };
            return Err(RegistryError::NoPlatform {
                image: name,
                platform: want.to_string(),
                available: found.to_string(),
            });
        }
    }
    let up_to_date = store.resolve(&config_digest.to_string()).is_ok();

    // Hold the store lock shared from the first blob to the name, so GC
    // never sees our layers before the image references them.
    let _lock = store.lock_shared()?;
    let mut jobs = Vec::new();
    for (l, diff_id) in parsed.layers().iter().zip(diff_ids) {
        let lmt = l.media_type().to_string();
        let Some(compression) = Compression::from_media_type(&lmt) else {
            return Err(RegistryError::Document {
                what: format!("manifest of `{name}`"),
                reason: format!(
                    "layer `{}` has media type `{lmt}`, which is not a layer kiln reads",
                    l.digest()
                ),
            });
        };
        jobs.push(Job {
            digest: Digest::from_oci(l.digest())?,
            size: l.size(),
            diff_id: diff_id.parse::<Digest>()?,
            compression,
        });
    }
    let results: Vec<Mutex<Option<Result<LayerInfo, RegistryError>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = Mutex::new(0usize);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..opts.threads.clamp(1, 8).min(jobs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(job) = jobs.get(i) else { break };
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let r = pull_layer(store, client, &name, job, progress);
                    if r.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    *results[i]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
                }
            });
        }
    });
    let mut infos = Vec::with_capacity(jobs.len());
    for r in results {
        match r
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(Ok(info)) => infos.push(info),
            Some(Err(e)) => return Err(e),
            // Skipped after another layer failed: that error is reported.
            None => {}
        }
    }
    if infos.len() != jobs.len() {
        return Err(RegistryError::Document {
            what: format!("image `{name}`"),
            reason: "a layer download stopped early".to_owned(),
        });
    }
    // A pinned reference names no tag (its tag, if any, was only a label):
    // the image is known by its digest.
    let names: Vec<_> = if image.digest().is_some() {
        Vec::new()
    } else {
        image.store_reference().into_iter().collect()
    };
    let stored = store.put_image(&names, &config, &infos)?;
    // As docker's RepoDigests: the digest the registry knows it by.
    if let Some(name) = image.with_digest(top_digest.clone()).digest_name() {
        store.add_repo_digest(&name, &stored.id)?;
    }
    Ok(PulledImage {
        id: stored.id,
        digest: top_digest,
        name: names.into_iter().next(),
        up_to_date,
    })
}

fn wrap_blob(image: &str, digest: &Digest, e: RegistryError) -> RegistryError {
    match e {
        e @ RegistryError::Blob { .. } => e,
        other => RegistryError::Blob {
            image: image.to_owned(),
            digest: digest.to_string(),
            source: Box::new(other),
        },
    }
}

/// One layer to fetch.
struct Job {
    digest: Digest,
    size: u64,
    diff_id: Digest,
    compression: Compression,
}

/// The recorded uncompressed size of a layer the store has.
fn known_layer(store: &Store, diff_id: &Digest) -> Result<Option<LayerInfo>, StoreError> {
    if !store.has_layer(diff_id) {
        return Ok(None);
    }
    Ok(store.recorded_layer_size(diff_id)?.map(|size| LayerInfo {
        diff_id: diff_id.clone(),
        size,
    }))
}

fn pull_layer(
    store: &Store,
    client: &RegistryClient,
    image: &str,
    job: &Job,
    progress: &(dyn Fn(PullEvent) + Sync),
) -> Result<LayerInfo, RegistryError> {
    let Job {
        digest,
        size,
        diff_id,
        compression,
    } = job;
    let info = if let Some(info) = known_layer(store, diff_id)? {
        progress(PullEvent::LayerExists {
            digest: digest.clone(),
        });
        info
    } else {
        progress(PullEvent::LayerStarted {
            digest: digest.clone(),
            size: *size,
        });
        let what = format!("{image}: layer {digest}");
        let info = client
            .retrying_body(|| {
                let stream = client.open_blob(digest, Some(*size))?;
                store
                    .commit_layer_from_tar(stream, Some(digest), Some(diff_id), &what)
                    .map_err(|e| match e {
                        StoreError::Io { source, .. } => client.blob_io_error(digest, source),
                        other => RegistryError::Store(other),
                    })
            })
            .map_err(|e| wrap_blob(image, digest, e))?;
        progress(PullEvent::LayerDone {
            digest: digest.clone(),
        });
        info
    };
    // Remember the registry's compressed form (without keeping its bytes):
    // a later push to this registry can then find or mount it instead of
    // compressing and uploading the layer again.
    if digest != diff_id {
        store.record_compressed_layer(
            diff_id,
            digest,
            compression.oci_layer_media_type(),
            *size,
        )?;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_platforms() {
        let p = Platform::parse("linux/arm64/v8").expect("parses");
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("linux/x86_64")
                .expect("parses")
                .architecture,
            "amd64"
        );
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selects_from_an_index() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": d('a'), "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": d('b'), "size": 2,
                 "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": d('c'), "size": 3,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ]
        });
        let bytes = serde_json::to_vec(&index).expect("json");
        let pick = |p: &str| select_platform(&bytes, "x", &Platform::parse(p).expect("platform"));
        assert_eq!(pick("linux/amd64").expect("amd64").0.to_string(), d('a'));
        assert_eq!(pick("linux/arm/v7").expect("arm").0.to_string(), d('b'));
        assert_eq!(pick("linux/arm64").expect("arm64").0.to_string(), d('c'));
        let err = pick("linux/s390x").expect_err("absent");
        assert!(err.to_string().contains("linux/s390x"), "{err}");
        assert!(err.to_string().contains("linux/arm/v7"), "{err}");
        assert!(pick("linux/arm/v6").is_err());
    }
}
