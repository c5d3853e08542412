//! Where a cache lives: the [`CacheTransport`] trait and the local OCI
//! layout ([`LocalLayout`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kiln_cache::Digest;
use sha2::Digest as _;

use super::{ANNOTATION_REF_NAME, RemoteCacheError};
use crate::context::hex;

/// If set, the local layout appends the digest of every blob it opens for
/// reading to this file, one a line (tests count what an import reads).
pub const READ_LOG_ENV: &str = "KILN_CACHE_READ_LOG";

/// The biggest manifest or config kiln reads into memory.
const MAX_DOCUMENT: u64 = 64 << 20;

/// A place a cache is read from and written to. Blocking: call it from a
/// blocking task.
pub trait CacheTransport: Send + Sync + std::fmt::Debug {
    /// How messages name it (`type=local,src=DIR`).
    fn name(&self) -> String;

    /// The cache's root document (an image manifest or index) and its
    /// media type, or `None` when there is no cache there.
    fn get_root(&self) -> Result<Option<(String, Vec<u8>)>, RemoteCacheError>;

    /// Opens blob `digest` (the reader is not verified: the caller checks
    /// the digest of what it reads).
    fn get_blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, RemoteCacheError>;

    /// Whether the cache has blob `digest` already.
    fn has_blob(&self, digest: &Digest) -> Result<bool, RemoteCacheError>;

    /// Stores blob `digest` of `size` bytes from `data`.
    fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        data: &mut (dyn Read + Send),
    ) -> Result<(), RemoteCacheError>;

    /// Stores the root document (after all the blobs it names).
    fn put_root(&self, media_type: &str, bytes: &[u8]) -> Result<(), RemoteCacheError>;

    /// Reads a small blob (a config, a manifest) whole, verified.
    fn get_small_blob(&self, digest: &Digest) -> Result<Vec<u8>, RemoteCacheError> {
        let mut r = self.get_blob(digest)?.take(MAX_DOCUMENT);
        let mut buf = Vec::new();
        r.read_to_end(&mut buf)
            .map_err(|e| RemoteCacheError::Transport {
                cache: self.name(),
                what: format!("reading blob {digest}"),
                reason: e.to_string(),
            })?;
        let actual = Digest::of_bytes(&buf);
        if actual != *digest {
            return Err(RemoteCacheError::Corrupt {
                cache: self.name(),
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(buf)
    }
}

/// A cache in an OCI image layout directory, as BuildKit's `type=local`:
/// `oci-layout`, `index.json` naming the cache manifest by tag (annotation
/// `org.opencontainers.image.ref.name`), `blobs/sha256/<hex>`.
#[derive(Debug, Clone)]
pub struct LocalLayout {
    dir: PathBuf,
    tag: String,
    writing: bool,
}

impl LocalLayout {
    /// The layout in `dir`, its cache under `tag`; `writing` only changes
    /// how it is named (`dest=` rather than `src=`).
    pub fn new(dir: impl Into<PathBuf>, tag: impl Into<String>, writing: bool) -> Self {
        Self {
            dir: dir.into(),
            tag: tag.into(),
            writing,
        }
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> RemoteCacheError {
        let (what, path) = (what.to_owned(), path.to_owned());
        move |source| RemoteCacheError::Io { what, path, source }
    }

    fn invalid(&self, what: &str, reason: impl Into<String>) -> RemoteCacheError {
        RemoteCacheError::Invalid {
            cache: self.name(),
            what: what.to_owned(),
            reason: reason.into(),
        }
    }

    /// Writes `bytes` to `path` through a temp file and a rename.
    fn write_atomic(&self, path: &Path, data: &mut dyn Read) -> Result<Digest, RemoteCacheError> {
        let parent = path.parent().unwrap_or(&self.dir);
        fs_err::create_dir_all(parent).map_err(Self::io("creating directory", parent))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(parent)
            .map_err(Self::io("creating a temp file in", parent))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = data
                .read(&mut buf)
                .map_err(Self::io("reading data for", path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(Self::io("writing", tmp.path()))?;
        }
        // Readable by all, as a shared cache directory should be.
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(Self::io("setting the mode of", tmp.path()))?;
        tmp.as_file()
            .sync_all()
            .map_err(Self::io("syncing", path))?;
        tmp.persist(path).map_err(|e| RemoteCacheError::Io {
            what: "renaming into place".into(),
            path: path.to_owned(),
            source: e.error,
        })?;
        format!("sha256:{}", hex(&h.finalize()))
            .parse()
            .map_err(|_| self.invalid("a blob", "bad digest"))
    }

    fn read_index(&self) -> Result<Option<serde_json::Value>, RemoteCacheError> {
        let path = self.dir.join("index.json");
        let bytes = match fs_err::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io("reading", &path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| self.invalid("index.json", e.to_string()))
    }
}

impl CacheTransport for LocalLayout {
    fn name(&self) -> String {
        let attr = if self.writing { "dest" } else { "src" };
        format!("type=local,{attr}={}", self.dir.display())
    }

    fn get_root(&self) -> Result<Option<(String, Vec<u8>)>, RemoteCacheError> {
        let Some(index) = self.read_index()? else {
            return Ok(None);
        };
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let named = manifests
            .iter()
            .find(|m| m["annotations"][ANNOTATION_REF_NAME] == self.tag.as_str());
        // An index without names: its only manifest (BuildKit's importer
        // does the same for `latest`).
        let desc = match named {
            Some(d) => d,
            None if self.tag == "latest" && manifests.len() == 1 => &manifests[0],
            None => return Ok(None),
        };
        let digest: Digest = desc["digest"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| self.invalid("index.json", "a manifest has no valid digest"))?;
        let media_type = desc["mediaType"].as_str().unwrap_or_default().to_owned();
        let bytes = self.get_small_blob(&digest)?;
        Ok(Some((media_type, bytes)))
    }

    fn get_blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, RemoteCacheError> {
        let path = self.blob_path(digest);
        let f = fs_err::File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                self.invalid(&format!("blob {digest}"), "it is missing")
            } else {
                Self::io("opening", &path)(e)
            }
        })?;
        if let Some(log) = std::env::var_os(READ_LOG_ENV) {
            // A test hook: best effort.
            if let Ok(mut l) = fs_err::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = writeln!(l, "{digest}");
            }
        }
        Ok(Box::new(f))
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, RemoteCacheError> {
        Ok(self.blob_path(digest).is_file())
    }

    fn put_blob(
        &self,
        digest: &Digest,
        _size: u64,
        data: &mut (dyn Read + Send),
    ) -> Result<(), RemoteCacheError> {
        let path = self.blob_path(digest);
        let actual = self.write_atomic(&path, data)?;
        if actual != *digest {
            let _ = fs_err::remove_file(&path);
            return Err(RemoteCacheError::Corrupt {
                cache: self.name(),
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    fn put_root(&self, media_type: &str, bytes: &[u8]) -> Result<(), RemoteCacheError> {
        let digest = Digest::of_bytes(bytes);
        self.put_blob(&digest, bytes.len() as u64, &mut &bytes[..])?;
        let layout = self.dir.join("oci-layout");
        self.write_atomic(&layout, &mut &br#"{"imageLayoutVersion":"1.0.0"}"#[..])?;
        // Keep the other tags' entries; replace this tag's.
        let mut manifests: Vec<serde_json::Value> = self
            .read_index()?
            .and_then(|i| i["manifests"].as_array().cloned())
            .unwrap_or_default();
        manifests.retain(|m| m["annotations"][ANNOTATION_REF_NAME] != self.tag.as_str());
        manifests.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest.to_string(),
            "size": bytes.len(),
            "annotations": { ANNOTATION_REF_NAME: self.tag },
        }));
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": kiln_cache::MEDIA_OCI_INDEX,
            "manifests": manifests,
        });
        let bytes =
            serde_json::to_vec(&index).map_err(|e| self.invalid("index.json", e.to_string()))?;
        self.write_atomic(&self.dir.join("index.json"), &mut &bytes[..])?;
        Ok(())
    }
}
