//! `kiln push`: store → registry.
//!
//! Layers go up compressed (gzip by default, the store's deterministic
//! parallel gzip), made once and remembered (diffID → compressed blob), so
//! a second push does not compress again; the manifest is the one `kiln
//! save --format oci` writes. Blobs the registry has already (HEAD) are
//! skipped, blobs in another repository named by
//! [`PushOptions::mount_from`] are mounted; then the config, then the
//! manifest under the tag.

use std::io::{self, Read};
use std::sync::Mutex;

use super::RegistryError;
use super::client::RegistryClient;
use super::reference::ImageRef;
use crate::archive::save::{ExportLayer, export_layer, oci_manifest};
use crate::compress::Compression;
use crate::digest::Digest;
use crate::image::Image;
use crate::store::{MEDIA_MANIFEST, Store};

/// Options for [`push`].
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Layer compression (gzip unless asked otherwise).
    pub compression: Compression,
    /// Layers uploaded at once.
    pub threads: usize,
    /// Repositories in the same registry to try mounting blobs from.
    pub mount_from: Vec<String>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            compression: Compression::Gzip,
            threads: 3,
            mount_from: Vec::new(),
        }
    }
}

/// Progress of a push, for rendering.
#[derive(Debug, Clone)]
pub enum PushEvent {
    /// The registry has the blob already.
    LayerExists {
        /// Blob digest.
        digest: Digest,
    },
    /// The blob was mounted from another repository.
    LayerMounted {
        /// Blob digest.
        digest: Digest,
        /// Repository it came from.
        from: String,
    },
    /// Uploading started.
    LayerStarted {
        /// Blob digest.
        digest: Digest,
        /// Size.
        size: u64,
    },
    /// Uploaded.
    LayerDone {
        /// Blob digest.
        digest: Digest,
    },
}

/// What [`push`] did.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// The manifest digest.
    pub digest: Digest,
    /// The manifest size.
    pub size: u64,
}

/// Pushes `image` (from the store) to `target` (a tag) through `client`.
pub fn push(
    store: &Store,
    client: &RegistryClient,
    image: &Image,
    target: &ImageRef,
    opts: &PushOptions,
    progress: &(dyn Fn(PushEvent) + Sync),
) -> Result<PushedImage, RegistryError> {
    let name = target.to_string();
    client.connect()?;
    let _lock = store.lock_shared()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let workers = opts.threads.clamp(1, 8).min(image.layers.len().max(1));
    let results: Vec<Mutex<Option<Result<ExportLayer, RegistryError>>>> =
        image.layers.iter().map(|_| Mutex::new(None)).collect();
    let next = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..workers {
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
                    let Some(layer) = image.layers.get(i) else {
                        break;
                    };
                    let r = push_layer(
                        store,
                        client,
                        &name,
                        &layer.diff_id,
                        layer.size,
                        opts,
                        // Each layer gets every core: layers are rarely the same
                        // size, and the big one should not be slowed by the small.
                        cores,
                        progress,
                    );
                    let failed = r.is_err();
                    *results[i]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
                    if failed {
                        break;
                    }
                }
            });
        }
    });
    let mut layers = Vec::with_capacity(results.len());
    for r in results {
        match r
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(Ok(l)) => layers.push(l),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if layers.len() != image.layers.len() {
        return Err(RegistryError::Document {
            what: format!("pushing `{name}`"),
            reason: "a layer upload stopped early".to_owned(),
        });
    }
    // The config.
    if client.blob_exists(&image.id)?.is_none() {
        let bytes = image.config_bytes.clone();
        client
            .put_blob_with(&image.id, bytes.len() as u64, &|| {
                Ok(Box::new(io::Cursor::new(bytes.clone())) as Box<dyn Read + Send>)
            })
            .map_err(|e| wrap(&name, &image.id, e))?;
    }
    let manifest =
        serde_json::to_vec(&oci_manifest(image, &layers)).map_err(|e| RegistryError::Document {
            what: format!("manifest of `{name}`"),
            reason: e.to_string(),
        })?;
    let tag = target.reference();
    let digest = client.put_manifest(&tag, &manifest, MEDIA_MANIFEST)?;
    Ok(PushedImage {
        digest,
        size: manifest.len() as u64,
    })
}

fn wrap(image: &str, digest: &Digest, e: RegistryError) -> RegistryError {
    match e {
        e @ RegistryError::Blob { .. } => e,
        other => RegistryError::Blob {
            image: image.to_owned(),
            digest: digest.to_string(),
            source: Box::new(other),
        },
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one worker's whole job, called once"
)]
fn push_layer(
    store: &Store,
    client: &RegistryClient,
    image: &str,
    diff_id: &Digest,
    size: u64,
    opts: &PushOptions,
    threads: usize,
    progress: &(dyn Fn(PushEvent) + Sync),
) -> Result<ExportLayer, RegistryError> {
    if let Some(layer) = remembered_upstream(store, client, image, diff_id, opts, progress)? {
        return Ok(layer);
    }
    let layer = export_layer(store, diff_id, size, opts.compression, threads)?;
    let digest = layer.digest.clone();
    if client
        .blob_exists(&digest)
        .map_err(|e| wrap(image, &digest, e))?
        .is_some()
    {
        progress(PushEvent::LayerExists { digest });
        return Ok(layer);
    }
    for from in &opts.mount_from {
        if from != client.image().repository() && client.mount_blob(&digest, from).unwrap_or(false)
        {
            progress(PushEvent::LayerMounted {
                digest,
                from: from.clone(),
            });
            return Ok(layer);
        }
    }
    progress(PushEvent::LayerStarted {
        digest: digest.clone(),
        size: layer.size,
    });
    let open = || -> io::Result<Box<dyn Read + Send>> {
        // A compressed blob, or the uncompressed layer itself (blob or
        // snapshot stream); both fail at their end if they do not hash
        // to their name.
        let r = if layer.digest == *diff_id {
            store.open_layer(diff_id)
        } else {
            store
                .open_blob(&layer.digest)
                .map(crate::layer_source::LayerReader::Blob)
        };
        r.map(|r| Box::new(r) as Box<dyn Read + Send>)
            .map_err(io::Error::other)
    };
    client
        .put_blob_with(&digest, layer.size, &open)
        .map_err(|e| wrap(image, &digest, e))?;
    progress(PushEvent::LayerDone { digest });
    Ok(layer)
}

/// A compressed form of the layer that kiln remembers from a pull (it
/// kept the layer, not those bytes) and that the registry has in this
/// repository or can mount from another one.
fn remembered_upstream(
    store: &Store,
    client: &RegistryClient,
    image: &str,
    diff_id: &Digest,
    opts: &PushOptions,
    progress: &(dyn Fn(PushEvent) + Sync),
) -> Result<Option<ExportLayer>, RegistryError> {
    let rows: Vec<(String, String, i64)> = {
        let conn = store.db();
        let mut st = conn
            .prepare("SELECT blob, media_type, size FROM layer_blobs WHERE diff_id = ?1")
            .map_err(store.db_err("reading layer blobs"))?;
        st.query_map([diff_id.to_string()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .and_then(Iterator::collect)
        .map_err(store.db_err("reading layer blobs"))?
    };
    for (blob, media_type, size) in rows {
        let Ok(digest) = blob.parse::<Digest>() else {
            continue;
        };
        // A blob kiln has is pushed the ordinary way.
        if store.has_blob(&digest) {
            continue;
        }
        let Some(media_type) = [Compression::Gzip, Compression::Zstd, Compression::None]
            .into_iter()
            .map(Compression::oci_layer_media_type)
            .find(|m| *m == media_type)
        else {
            continue;
        };
        let layer = ExportLayer {
            digest: digest.clone(),
            size: size as u64,
            media_type,
        };
        if client
            .blob_exists(&digest)
            .map_err(|e| wrap(image, &digest, e))?
            .is_some()
        {
            progress(PushEvent::LayerExists { digest });
            return Ok(Some(layer));
        }
        for from in &opts.mount_from {
            if from != client.image().repository()
                && client.mount_blob(&digest, from).unwrap_or(false)
            {
                progress(PushEvent::LayerMounted {
                    digest,
                    from: from.clone(),
                });
                return Ok(Some(layer));
            }
        }
    }
    Ok(None)
}
