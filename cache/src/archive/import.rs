//! `kiln import`: a rootfs (directory or tarball) → a one-layer image.

use std::path::Path;

use serde_json::json;

use crate::error::{Result, StoreError};
use crate::image::{Image, format_rfc3339};
use crate::layer::WriteOptions;
use crate::reference::Reference;
use crate::store::{Store, now};

/// Options for [`import_rootfs`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The image config's `config` section (Env, Cmd, ...), as JSON.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// History comment (`docker import -m`).
    pub message: Option<String>,
    /// Clamp file times and set `created` to this (SOURCE_DATE_EPOCH).
    pub source_date_epoch: Option<i64>,
}

/// Makes a one-layer image from `source`: a directory (written as a
/// layer tar) or a tarball, compressed or not (stored as it is, after
/// decompression). Tags it with `names`.
pub fn import_rootfs(
    store: &Store,
    source: &Path,
    names: &[Reference],
    opts: &ImportOptions,
) -> Result<Image> {
    let _lock = store.lock_shared()?;
    let meta = fs_err::metadata(source).map_err(|e| StoreError::io("reading", source, e))?;
    let layer = if meta.is_dir() {
        let wopts = WriteOptions::default().with_source_date_epoch(opts.source_date_epoch);
        store.commit_layer_from_dir(source, &wopts)?
    } else {
        let f = fs_err::File::open(source).map_err(|e| StoreError::io("opening", source, e))?;
        let layer = store.commit_layer_from_tar(f, None, None, &source.display().to_string())?;
        check_is_tar(store, &layer.diff_id, source)?;
        layer
    };
    let created = format_rfc3339(opts.source_date_epoch.unwrap_or_else(now));
    let mut history = json!({
        "created": created,
        "created_by": format!("kiln import {}", source.display()),
    });
    if let (Some(m), Some(h)) = (&opts.message, history.as_object_mut()) {
        h.insert("comment".to_owned(), json!(m));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = json!({
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": opts.config,
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id.to_string()] },
        "history": [history],
    });
    let bytes = serde_json::to_vec(&config).map_err(|e| StoreError::InvalidDocument {
        kind: "config",
        what: source.display().to_string(),
        reason: e.to_string(),
    })?;
    store.put_image(names, &bytes, &[layer])
}

/// Refuses a "tarball" whose first header is not a tar header (the blob
/// stays unreferenced; GC removes it).
fn check_is_tar(store: &Store, diff_id: &crate::Digest, source: &Path) -> Result<()> {
    let reader = store.open_blob(diff_id)?;
    let mut archive = tar::Archive::new(reader);
    let first = archive
        .entries()
        .map_err(|e| StoreError::io("reading", source, e))?
        .next();
    match first {
        Some(Err(e)) => Err(StoreError::InvalidDocument {
            kind: "rootfs tarball",
            what: source.display().to_string(),
            reason: format!("it is not a tar archive: {e}"),
        }),
        _ => Ok(()),
    }
}
