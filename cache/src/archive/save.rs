//! `kiln save`: docker-archive or OCI archive, streamed to the output.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};

use serde_json::json;

use super::{ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME};
use crate::compress::{self, Compression};
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::image::Image;
use crate::layer_source::LayerReader;
use crate::reference::Reference;
use crate::store::{MEDIA_CONFIG, MEDIA_MANIFEST, Store};
use crate::validate::MEDIA_OCI_INDEX;

/// The archive format `save` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArchiveFormat {
    /// `docker save`'s format: `manifest.json` + `repositories` + blobs.
    #[default]
    Docker,
    /// An OCI image layout in a tar: `oci-layout`, `index.json`, blobs.
    Oci,
}

/// Options for [`save`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveOptions {
    /// Archive format.
    pub format: ArchiveFormat,
    /// Layer compression.
    pub compression: Compression,
    /// Threads for gzip (0: all cores).
    pub threads: usize,
}

/// One image to save and the names to record for it.
#[derive(Debug, Clone)]
pub struct SaveItem {
    /// The image.
    pub image: Image,
    /// Names written into the archive (`RepoTags`, index annotations).
    pub names: Vec<Reference>,
}

/// A layer as exported: the blob written for it.
pub(crate) struct ExportLayer {
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    pub(crate) media_type: &'static str,
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::io("writing archive", "<output>", e)
}

/// Writes `items` as an archive into `out`, streaming: blobs are copied
/// from the store as they are written (and verified on the way: a corrupt
/// blob fails the save with an error naming it).
pub fn save<W: Write>(store: &Store, items: &[SaveItem], out: W, opts: &SaveOptions) -> Result<()> {
    let _lock = store.lock_shared()?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        opts.threads
    };
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut written: HashSet<Digest> = HashSet::new();
    add_dir(&mut tar, "blobs/")?;
    add_dir(&mut tar, "blobs/sha256/")?;
    if opts.format == ArchiveFormat::Oci {
        add_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    let mut docker_manifest = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut index_manifests = Vec::new();
    for item in items {
        let image = &item.image;
        let mut layers = Vec::with_capacity(image.layers.len());
        for l in &image.layers {
            let el = export_layer(store, &l.diff_id, l.size, opts.compression, threads)?;
            if written.insert(el.digest.clone()) {
                let mut reader = if el.digest == l.diff_id {
                    store.open_layer(&el.digest)?
                } else {
                    LayerReader::Blob(store.open_blob(&el.digest)?)
                };
                let path = format!("blobs/sha256/{}", el.digest.hex());
                append_blob(&mut tar, &path, &mut reader).map_err(|e| reader.error(e))?;
            }
            layers.push(el);
        }
        if written.insert(image.id.clone()) {
            add_bytes(
                &mut tar,
                &format!("blobs/sha256/{}", image.id.hex()),
                &image.config_bytes,
            )?;
        }
        match opts.format {
            ArchiveFormat::Docker => {
                docker_manifest.push(json!({
                    "Config": format!("blobs/sha256/{}", image.id.hex()),
                    "RepoTags": item.names.iter().map(Reference::short).collect::<Vec<_>>(),
                    "Layers": layers.iter().map(|l| format!("blobs/sha256/{}", l.digest.hex())).collect::<Vec<_>>(),
                }));
                if let Some(top) = layers.last() {
                    for n in &item.names {
                        repositories
                            .entry(n.short_repository().to_owned())
                            .or_default()
                            .insert(n.tag().to_owned(), top.digest.hex().to_owned());
                    }
                }
            }
            ArchiveFormat::Oci => {
                let manifest = oci_manifest(image, &layers);
                let bytes = to_json(&manifest)?;
                let digest = Digest::of_bytes(&bytes);
                if written.insert(digest.clone()) {
                    add_bytes(&mut tar, &format!("blobs/sha256/{}", digest.hex()), &bytes)?;
                }
                let platform = json!({
                    "architecture": image.config.architecture().to_string(),
                    "os": image.config.os().to_string(),
                });
                let desc = |annotations: Option<serde_json::Value>| {
                    let mut d = json!({
                        "mediaType": MEDIA_MANIFEST,
                        "digest": digest.to_string(),
                        "size": bytes.len(),
                        "platform": platform,
                    });
                    if let (Some(a), Some(o)) = (annotations, d.as_object_mut()) {
                        o.insert("annotations".to_owned(), a);
                    }
                    d
                };
                if item.names.is_empty() {
                    index_manifests.push(desc(None));
                }
                for n in &item.names {
                    index_manifests.push(desc(Some(json!({
                        ANNOTATION_CONTAINERD_NAME: n.to_string(),
                        ANNOTATION_REF_NAME: n.tag(),
                    }))));
                }
            }
        }
    }
    match opts.format {
        ArchiveFormat::Docker => {
            add_bytes(&mut tar, "manifest.json", &to_json(&docker_manifest)?)?;
            add_bytes(&mut tar, "repositories", &to_json(&repositories)?)?;
        }
        ArchiveFormat::Oci => {
            let index = json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX,
                "manifests": index_manifests,
            });
            add_bytes(&mut tar, "index.json", &to_json(&index)?)?;
        }
    }
    let mut out = tar.into_inner().map_err(io_err)?;
    out.flush().map_err(io_err)
}

/// The compressed blob of layer `diff_id` (made now and remembered with
/// [`Store::record_compressed_layer`], or found from an earlier save or
/// export), as `(digest, size, media type)`: what `kiln save --compress`
/// and the build cache export share, so a layer is compressed once.
pub fn compressed_layer_blob(
    store: &Store,
    diff_id: &Digest,
    c: Compression,
    threads: usize,
) -> Result<(Digest, u64, &'static str)> {
    let el = export_layer(store, diff_id, 0, c, threads)?;
    Ok((el.digest, el.size, el.media_type))
}

/// The OCI manifest of `image` over the exported `layers` (what `save
/// --format oci` writes and `push` uploads).
pub(crate) fn oci_manifest(image: &Image, layers: &[ExportLayer]) -> serde_json::Value {
    json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": image.id.to_string(),
            "size": image.config_bytes.len(),
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type,
            "digest": l.digest.to_string(),
            "size": l.size,
        })).collect::<Vec<_>>(),
    })
}

/// The blob to export for a layer: the uncompressed one, or a compressed
/// variant (made now and remembered, or found from an earlier save).
pub(crate) fn export_layer(
    store: &Store,
    diff_id: &Digest,
    size: u64,
    c: Compression,
    threads: usize,
) -> Result<ExportLayer> {
    let media_type = c.oci_layer_media_type();
    if c == Compression::None {
        return Ok(ExportLayer {
            digest: diff_id.clone(),
            size,
            media_type,
        });
    }
    if let Some((digest, size)) = store.compressed_layer(diff_id, media_type)? {
        return Ok(ExportLayer {
            digest,
            size,
            media_type,
        });
    }
    let mut reader = store.open_layer(diff_id)?;
    let mut w = store.blob_writer()?;
    compress::compress(&mut reader, &mut w, c, threads).map_err(|source| {
        // A corrupt source blob surfaces as a read error inside; name it.
        StoreError::Compress {
            what: diff_id.to_string(),
            source,
        }
    })?;
    let (digest, size) = w.commit(None, "compressed layer")?;
    store.record_compressed_layer(diff_id, &digest, media_type, size)?;
    Ok(ExportLayer {
        digest,
        size,
        media_type,
    })
}

/// Appends a blob as a tar entry, copying in 1 MiB chunks: with reads and
/// writes at least as large as the buffers below them, the bytes go from
/// the page cache to the output with one copy (`tar::Builder::append`
/// would go through an 8 KiB buffer).
fn append_blob<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    reader: &mut LayerReader,
) -> io::Result<()> {
    let size = reader.len().map_err(io::Error::other)?;
    let mut header = file_header(size);
    header.set_path(path)?;
    header.set_cksum();
    let out = tar.get_mut();
    out.write_all(header.as_bytes())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        copied += n as u64;
    }
    if copied != size {
        return Err(io::Error::other(format!(
            "blob `{path}` changed size while being saved"
        )));
    }
    let pad = usize::try_from((512 - size % 512) % 512).unwrap_or(0);
    out.write_all(&[0u8; 512][..pad])
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::InvalidDocument {
        kind: "archive metadata",
        what: "<output>".to_owned(),
        reason: e.to_string(),
    })
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

fn add_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(0);
    tar.append_data(&mut h, path, io::empty()).map_err(io_err)
}

fn add_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> Result<()> {
    let mut h = file_header(data.len() as u64);
    tar.append_data(&mut h, path, data).map_err(io_err)
}
