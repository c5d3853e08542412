//! `type=registry,ref=R`: the cache manifest pushed to (and pulled from)
//! a registry as an image manifest under `R`'s tag (default `latest`),
//! through [`kiln_cache::registry::RegistryClient`].

use std::io::Read;

use kiln_cache::Digest;
use kiln_cache::registry::{ClientOptions, ImageRef, RegistryClient, RegistryError};

use super::{CacheTransport, RemoteCacheError};

/// A cache in a registry repository.
#[derive(Debug)]
pub struct RegistryCache {
    client: RegistryClient,
    reference: String,
    writing: bool,
}

impl RegistryCache {
    /// The cache at `reference` (`host/repo:tag`); `writing` names it as
    /// `--cache-to` would.
    pub fn new(reference: &str, writing: bool) -> Result<Self, RemoteCacheError> {
        let fail = |e: RegistryError| RemoteCacheError::Transport {
            cache: format!("type=registry,ref={reference}"),
            what: "opening the registry".into(),
            reason: chain(&e),
        };
        let image = ImageRef::parse(reference).map_err(fail)?;
        let client = RegistryClient::new(&image, ClientOptions::default()).map_err(fail)?;
        Ok(Self {
            client,
            reference: reference.to_owned(),
            writing,
        })
    }

    fn tag(&self) -> String {
        let image = self.client.image();
        match (image.digest(), image.tag()) {
            (Some(d), _) if !self.writing => d.to_string(),
            (_, Some(t)) => t.to_owned(),
            _ => "latest".to_owned(),
        }
    }

    fn err(&self, what: String) -> impl FnOnce(RegistryError) -> RemoteCacheError {
        let cache = self.name();
        move |e| RemoteCacheError::Transport {
            cache,
            what,
            reason: chain(&e),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl CacheTransport for RegistryCache {
    fn name(&self) -> String {
        format!("type=registry,ref={}", self.reference)
    }

    fn get_root(&self) -> Result<Option<(String, Vec<u8>)>, RemoteCacheError> {
        let tag = self.tag();
        match self.client.get_manifest(&tag) {
            Ok(m) => Ok(Some((m.media_type, m.bytes))),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(format!("fetching the cache manifest `{tag}`"))(e)),
        }
    }

    fn get_blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, RemoteCacheError> {
        let s = self
            .client
            .open_blob(digest, None)
            .map_err(self.err(format!("fetching blob {digest}")))?;
        Ok(Box::new(s))
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, RemoteCacheError> {
        self.client
            .blob_exists(digest)
            .map(|s| s.is_some())
            .map_err(self.err(format!("checking blob {digest}")))
    }

    fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        data: &mut (dyn Read + Send),
    ) -> Result<(), RemoteCacheError> {
        self.client
            .put_blob(digest, size, data)
            .map_err(self.err(format!("uploading blob {digest}")))
    }

    fn put_root(&self, media_type: &str, bytes: &[u8]) -> Result<(), RemoteCacheError> {
        let tag = self.tag();
        self.client
            .put_manifest(&tag, bytes, media_type)
            .map(|_| ())
            .map_err(self.err(format!("pushing the cache manifest `{tag}`")))
    }
}
