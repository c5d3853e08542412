//! An OCI distribution-spec client, and pull/push between a registry and
//! the store.
//!
//! [`RegistryClient`] talks to one repository of one registry over `ureq`
//! (rustls, the system's CA roots): manifests ([`RegistryClient::get_manifest`],
//! [`RegistryClient::put_manifest`]) and blobs ([`RegistryClient::blob_exists`],
//! [`RegistryClient::open_blob`] / [`RegistryClient::get_blob`] verified
//! against digest and size, [`RegistryClient::put_blob`],
//! [`RegistryClient::mount_blob`]). Auth is basic or bearer
//! (`WWW-Authenticate: Bearer realm=..,service=..,scope=..`; tokens cached
//! per scope), with credentials from docker's `config.json`
//! ([`DockerConfig`]). Plain http is used only for registries marked
//! insecure and for this machine's (`localhost`, `127.0.0.0/8`, `::1`), as
//! docker does. Connection errors, 5xx and 429 are retried with backoff;
//! 4xx never are.
//!
//! [`pull()`] and [`push()`] move images between a registry and the store.
//!
//! ```no_run
//! use kiln_cache::registry::{ClientOptions, ImageRef, RegistryClient};
//!
//! let image = ImageRef::parse("localhost:5000/app:1")?;
//! let client = RegistryClient::new(&image, ClientOptions::default())?;
//! let manifest = client.get_manifest(&image.reference())?;
//! println!("{} {}", manifest.media_type, manifest.digest);
//! # Ok::<(), kiln_cache::registry::RegistryError>(())
//! ```

mod auth;
mod client;
mod pull;
mod push;
mod reference;

use std::path::PathBuf;

pub use auth::{
    Credentials, DOCKER_HUB_CONFIG_KEY, DockerConfig, config_key, default_config_path,
    normalize_registry,
};
pub use client::{
    BlobMismatch, BlobStream, ClientOptions, FetchedManifest, MANIFEST_ACCEPT, RegistryClient,
};
pub use pull::{Platform, PullEvent, PullOptions, PulledImage, pull, select_platform};
pub use push::{PushEvent, PushOptions, PushedImage, push};
pub use reference::{DOCKER_HUB, DOCKER_HUB_API, ImageRef, is_local_host};

use crate::error::StoreError;

/// What talking to a registry can fail with. Every variant names the
/// registry, image or blob it was about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The reference text is malformed.
    #[error("invalid reference format `{reference}`: {reason}")]
    InvalidReference {
        /// The text.
        reference: String,
        /// Why it is refused.
        reason: String,
    },
    /// The registry could not be reached or the connection broke (after
    /// retries).
    #[error("{what}: cannot talk to registry `{registry}`")]
    Transport {
        /// The registry host.
        registry: String,
        /// What kiln was doing.
        what: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The TLS handshake failed (an unknown certificate authority, or a
    /// registry that speaks plain http).
    #[error(
        "registry `{registry}`: TLS handshake failed: {cause}\n\nhint: trust its CA (system store or SSL_CERT_FILE), or if it has a self-signed certificate or speaks plain http, use `--tls-verify=false`"
    )]
    Tls {
        /// The registry host.
        registry: String,
        /// The cause (in the message: the hint comes last).
        cause: Box<ureq::Error>,
    },
    /// The registry refused the credentials (or asked for some).
    #[error("{what}: unauthorized: authentication required for `{registry}` ({detail})")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// What kiln was doing.
        what: String,
        /// The registry's words.
        detail: String,
    },
    /// A manifest or blob does not exist.
    #[error("{what} not found: {detail}")]
    NotFound {
        /// What was asked for.
        what: String,
        /// The registry's words.
        detail: String,
    },
    /// The registry answered with an unexpected status.
    #[error("{what}: the registry answered {status}: {detail}")]
    Status {
        /// What kiln was doing.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's words.
        detail: String,
    },
    /// Content did not hash to the digest it was asked by.
    #[error("{what}: content hashes to `{actual}`, not `{expected}`")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// The digest asked for.
        expected: String,
        /// What it hashes to.
        actual: String,
    },
    /// Fetching or storing one blob of an image failed.
    #[error("image `{image}`: blob `{digest}`")]
    Blob {
        /// The image (or repository).
        image: String,
        /// The blob's digest.
        digest: String,
        /// The cause.
        #[source]
        source: Box<RegistryError>,
    },
    /// A manifest, index or token answer is not what it should be.
    #[error("{what}: {reason}")]
    Document {
        /// What was read.
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// An index has no manifest for the platform asked for.
    #[error(
        "image `{image}`: no matching manifest for {platform} in the manifest list entries (it has: {available})"
    )]
    NoPlatform {
        /// The image.
        image: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },
    /// docker's config file could not be read or written.
    #[error("docker config `{}`: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Reading or writing local data failed.
    #[error("{what}")]
    Io {
        /// What kiln was doing.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Whether trying again may help: connection errors, 5xx and 429, and
    /// a download cut short by the network (not a digest mismatch).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Transport { source, .. } => match &**source {
                ureq::Error::HostNotFound
                | ureq::Error::BadUri(_)
                | ureq::Error::Tls(_)
                | ureq::Error::Rustls(_)
                | ureq::Error::TooManyRedirects
                | ureq::Error::RequireHttpsOnly(_) => false,
                // TLS failures (a bad certificate, https to an http
                // server) come as `InvalidData`: trying again won't help.
                ureq::Error::Io(e) => e.kind() != std::io::ErrorKind::InvalidData,
                _ => true,
            },
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
            RegistryError::Blob { source, .. } => source.is_retryable(),
            RegistryError::Io { source, .. } => is_transient_io(source),
            _ => false,
        }
    }

    /// Whether this is a failure to reach the registry at all.
    pub(crate) fn is_transport(&self) -> bool {
        matches!(self, RegistryError::Transport { .. })
    }

    /// Whether the registry refused the credentials.
    pub fn is_unauthorized(&self) -> bool {
        match self {
            RegistryError::Unauthorized { .. } => true,
            RegistryError::Blob { source, .. } => source.is_unauthorized(),
            _ => false,
        }
    }
}

/// An I/O error from a broken download (not a verification failure).
fn is_transient_io(e: &std::io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<BlobMismatch>() {
            return false;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && inner.is::<BlobMismatch>()
        {
            return false;
        }
        cause = c.source();
    }
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::Other
    )
}
