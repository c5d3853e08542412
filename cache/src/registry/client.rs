//! The distribution-spec HTTP client: one registry, one repository.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ureq::http::{self, Method, Response, StatusCode};

use super::RegistryError;
use super::auth::{Challenge, Credentials, DockerConfig, parse_challenge};
use super::reference::ImageRef;
use crate::digest::{Digest, Hasher};
use crate::validate::{
    MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};

/// The `Accept` header for manifests: OCI and Docker, images and indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (distribution's own limit is 4 MiB).
const MAX_MANIFEST: u64 = 8 << 20;

/// How the client connects and authenticates.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Allow plain http and unverified TLS for this registry (docker's
    /// `insecure-registries`, podman's `--tls-verify=false`). Registries on
    /// this machine (`localhost`, `127.0.0.0/8`, `::1`) are insecure even
    /// without it, as in docker.
    pub insecure: bool,
    /// Credentials to use; `None` looks in docker's config.json
    /// (see [`ClientOptions::docker_config`]).
    pub credentials: Option<Credentials>,
    /// Read credentials from docker's config.json when none are given.
    pub docker_config: bool,
    /// Attempts for a request that fails with a connection error, a 5xx or
    /// a 429 (at least 1).
    pub attempts: u32,
    /// First pause between attempts (doubled each time).
    pub backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            credentials: None,
            docker_config: true,
            attempts: 4,
            backoff: Duration::from_millis(250),
        }
    }
}

/// A manifest (or index) as fetched: its bytes, media type and digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The bytes, verbatim (their sha256 is `digest`).
    pub bytes: Vec<u8>,
    /// The media type (from `Content-Type`, else the document's
    /// `mediaType`).
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

impl FetchedManifest {
    /// Whether this is an index / manifest list.
    pub fn is_index(&self) -> bool {
        self.media_type == MEDIA_OCI_INDEX || self.media_type == MEDIA_DOCKER_LIST
    }
}

/// Body of a request.
enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    Reader(Option<&'a mut (dyn Read + Send)>),
}

/// A client for one repository of one registry. Cheap to share between
/// threads (`&RegistryClient` is `Sync`); tokens are cached per scope.
#[derive(Debug)]
pub struct RegistryClient {
    image: ImageRef,
    agent: ureq::Agent,
    options: ClientOptions,
    credentials: Option<Credentials>,
    base: OnceLock<String>,
    state: Mutex<AuthState>,
}

#[derive(Debug, Default)]
struct AuthState {
    challenge: Option<Challenge>,
    tokens: HashMap<String, String>,
}

impl RegistryClient {
    /// A client for `image`'s registry and repository.
    pub fn new(image: &ImageRef, options: ClientOptions) -> Result<RegistryClient, RegistryError> {
        let credentials = match &options.credentials {
            Some(c) => Some(c.clone()),
            None if options.docker_config => {
                DockerConfig::load_default()?.credentials(image.registry())?
            }
            None => None,
        };
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(system_roots())
            // docker treats registries on this machine as insecure too.
            .disable_verification(options.insecure || image.is_local())
            .build();
        // As Go's ProxyFromEnvironment: this machine is never proxied.
        let proxy = if image.is_local() {
            None
        } else {
            ureq::Proxy::try_from_env()
        };
        let agent = ureq::Agent::config_builder()
            .proxy(proxy)
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent(format!("kiln/{}", env!("CARGO_PKG_VERSION")))
            .max_redirects(8)
            .build()
            .new_agent();
        Ok(RegistryClient {
            image: image.clone(),
            agent,
            options,
            credentials,
            base: OnceLock::new(),
            state: Mutex::new(AuthState::default()),
        })
    }

    /// The image this client was made for.
    pub fn image(&self) -> &ImageRef {
        &self.image
    }

    /// Reaches the registry (`GET /v2/`, once per client): finds its
    /// scheme and how it wants to be authenticated.
    pub fn connect(&self) -> Result<(), RegistryError> {
        self.base_url().map(|_| ())
    }

    /// Checks that the registry answers and accepts the credentials
    /// (`GET /v2/`, then a token if it asks for one). Used by `login`.
    pub fn check_login(&self) -> Result<(), RegistryError> {
        let base = self.base_url()?;
        let challenge = self.lock().challenge.clone();
        match challenge {
            None => Ok(()),
            Some(Challenge::Basic) => {
                let url = format!("{base}/v2/");
                let resp = self.send(Method::GET, &url, None, &[], Payload::Empty, "login")?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(self.status_error(resp, "login"))
                }
            }
            Some(Challenge::Bearer { .. }) => {
                self.token_for("", true)?;
                Ok(())
            }
        }
    }

    /// The URL of manifest `reference` in this repository, and how errors
    /// name it.
    fn manifest_url(&self, reference: &str) -> Result<(String, String), RegistryError> {
        Ok((
            format!(
                "{}/v2/{}/manifests/{reference}",
                self.base_url()?,
                self.image.repository()
            ),
            format!("manifest `{reference}` of `{}`", self.repo_name()),
        ))
    }

    /// `GET /v2/<repo>/manifests/<reference>` (a tag or a digest), accepting
    /// OCI and Docker manifests and indexes. A digest reference is checked
    /// against the bytes.
    pub fn get_manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let (url, what) = self.manifest_url(reference)?;
        let resp = self.send(
            Method::GET,
            &url,
            Some(&self.pull_scope()),
            &[("Accept", MANIFEST_ACCEPT.to_owned())],
            Payload::Empty,
            &what,
        )?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                what: format!("manifest for {}:{reference}", self.repo_name()),
                detail: error_detail(resp),
            });
        }
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &what));
        }
        let header_type = header(&resp, "content-type")
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned());
        let mut body = resp.into_body();
        let bytes = body
            .with_config()
            .limit(MAX_MANIFEST)
            .read_to_vec()
            .map_err(|e| self.transport(&what, e))?;
        let digest = Digest::of_bytes(&bytes);
        if let Ok(want) = reference.parse::<Digest>()
            && want != digest
        {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: want.to_string(),
                actual: digest.to_string(),
            });
        }
        let media_type = match header_type {
            Some(t) if is_manifest_type(&t) => t,
            _ => sniff_media_type(&bytes).ok_or_else(|| RegistryError::Document {
                what: what.clone(),
                reason: "it is neither an OCI/Docker image manifest nor an index".to_owned(),
            })?,
        };
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// `PUT /v2/<repo>/manifests/<reference>`; returns the manifest digest.
    pub fn put_manifest(
        &self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let (url, what) = self.manifest_url(reference)?;
        let resp = self.send(
            Method::PUT,
            &url,
            Some(&self.push_scope()),
            &[("Content-Type", media_type.to_owned())],
            Payload::Bytes(bytes),
            &what,
        )?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &what));
        }
        Ok(Digest::of_bytes(bytes))
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: the blob's size if the registry
    /// has it.
    pub fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let url = self.blob_url(digest)?;
        let what = self.blob_what(digest);
        let resp = self.send(
            Method::HEAD,
            &url,
            Some(&self.pull_scope()),
            &[],
            Payload::Empty,
            &what,
        )?;
        match resp.status() {
            s if s.is_success() => Ok(Some(
                header(&resp, "content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(resp, &what)),
        }
    }

    /// Opens a blob for streaming. The reader fails (instead of reaching
    /// its end) when the content is longer or shorter than `size` or does
    /// not hash to `digest`; the error is a [`BlobMismatch`] in an
    /// `io::Error` of kind `InvalidData`.
    pub fn open_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<BlobStream, RegistryError> {
        let url = self.blob_url(digest)?;
        let what = self.blob_what(digest);
        let resp = self.send(
            Method::GET,
            &url,
            Some(&self.pull_scope()),
            &[],
            Payload::Empty,
            &what,
        )?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                what,
                detail: error_detail(resp),
            });
        }
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &what));
        }
        let announced = header(&resp, "content-length").and_then(|l| l.parse::<u64>().ok());
        if let (Some(a), Some(s)) = (announced, size)
            && a != s
        {
            return Err(RegistryError::Blob {
                image: self.repo_name(),
                digest: digest.to_string(),
                source: Box::new(RegistryError::Document {
                    what: "blob response".to_owned(),
                    reason: format!("the registry sends {a} bytes, the manifest says {s}"),
                }),
            });
        }
        Ok(BlobStream {
            inner: Box::new(resp.into_body().into_reader()),
            hasher: Hasher::new(),
            read: 0,
            size,
            digest: digest.clone(),
            checked: false,
        })
    }

    /// Downloads a blob into `out`, verifying its size and digest; returns
    /// the byte count. `out` may have received bytes when this fails.
    pub fn get_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        let mut stream = self.open_blob(digest, size)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.blob_io_error(digest, e)),
            };
            out.write_all(&buf[..n]).map_err(|e| RegistryError::Io {
                what: format!("writing {}", self.blob_what(digest)),
                source: e,
            })?;
            total += n as u64;
        }
        Ok(total)
    }

    /// Downloads a small blob (a config) into memory, verified.
    pub fn get_blob_bytes(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        self.retrying_body(|| {
            out.clear();
            self.get_blob(digest, size, &mut out)
        })?;
        Ok(out)
    }

    /// Uploads a blob from `reader` (`size` bytes) with a monolithic
    /// `POST` + `PUT`. The body is not retried (the reader is consumed);
    /// see [`RegistryClient::put_blob_with`].
    pub fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        reader: &mut (dyn Read + Send),
    ) -> Result<(), RegistryError> {
        let location = self.start_upload(digest)?;
        self.finish_upload(&location, digest, size, reader)
    }

    /// Uploads a blob, reopening it with `open` for each attempt, so an
    /// upload cut by a connection error or a 5xx is retried.
    pub fn put_blob_with(
        &self,
        digest: &Digest,
        size: u64,
        open: &(dyn Fn() -> io::Result<Box<dyn Read + Send>> + Sync),
    ) -> Result<(), RegistryError> {
        self.retrying(|| {
            let mut reader = open().map_err(|e| RegistryError::Io {
                what: format!("reading {} to upload it", self.blob_what(digest)),
                source: e,
            })?;
            self.put_blob(digest, size, &mut *reader)
        })
    }

    /// Asks the registry to mount `digest` from repository `from_repo` (in
    /// the same registry) instead of uploading it; whether it did.
    pub fn mount_blob(&self, digest: &Digest, from_repo: &str) -> Result<bool, RegistryError> {
        let url = format!(
            "{}/v2/{}/blobs/uploads/?mount={digest}&from={}",
            self.base_url()?,
            self.image.repository(),
            percent_encode(from_repo)
        );
        let scope = format!("{} repository:{from_repo}:pull", self.push_scope());
        let what = format!("mounting {} from `{from_repo}`", self.blob_what(digest));
        let resp = self.send(
            Method::POST,
            &url,
            Some(&scope),
            &[("Content-Length", "0".to_owned())],
            Payload::Bytes(&[]),
            &what,
        )?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // An upload session was opened instead: close it.
                if let Some(loc) = header(&resp, "location").map(str::to_owned)
                    && let Ok(u) = self.resolve_location(&loc)
                {
                    let _ = self.send(
                        Method::DELETE,
                        &u,
                        Some(&self.push_scope()),
                        &[],
                        Payload::Empty,
                        &what,
                    );
                }
                Ok(false)
            }
            _ => Err(self.status_error(resp, &what)),
        }
    }

    // ------------------------------------------------------------ internals

    fn repo_name(&self) -> String {
        self.image
            .with_tag("x")
            .to_string()
            .trim_end_matches(":x")
            .to_owned()
    }

    fn blob_what(&self, digest: &Digest) -> String {
        format!("blob `{digest}` of `{}`", self.repo_name())
    }

    fn blob_url(&self, digest: &Digest) -> Result<String, RegistryError> {
        Ok(format!(
            "{}/v2/{}/blobs/{digest}",
            self.base_url()?,
            self.image.repository()
        ))
    }

    fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.image.repository())
    }

    fn push_scope(&self) -> String {
        format!("repository:{}:pull,push", self.image.repository())
    }

    pub(crate) fn blob_io_error(&self, digest: &Digest, e: io::Error) -> RegistryError {
        RegistryError::Blob {
            image: self.repo_name(),
            digest: digest.to_string(),
            source: Box::new(RegistryError::Io {
                what: "downloading it".to_owned(),
                source: e,
            }),
        }
    }

    fn start_upload(&self, digest: &Digest) -> Result<String, RegistryError> {
        let url = format!(
            "{}/v2/{}/blobs/uploads/",
            self.base_url()?,
            self.image.repository()
        );
        let what = format!("starting the upload of {}", self.blob_what(digest));
        let resp = self.send(
            Method::POST,
            &url,
            Some(&self.push_scope()),
            &[("Content-Length", "0".to_owned())],
            Payload::Bytes(&[]),
            &what,
        )?;
        if resp.status() != StatusCode::ACCEPTED && !resp.status().is_success() {
            return Err(self.status_error(resp, &what));
        }
        let loc = header(&resp, "location").ok_or_else(|| RegistryError::Document {
            what: what.clone(),
            reason: "the registry answered without a Location".to_owned(),
        })?;
        self.resolve_location(loc)
    }

    fn finish_upload(
        &self,
        location: &str,
        digest: &Digest,
        size: u64,
        reader: &mut (dyn Read + Send),
    ) -> Result<(), RegistryError> {
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!(
            "{location}{sep}digest={}",
            percent_encode(&digest.to_string())
        );
        let what = format!("uploading {}", self.blob_what(digest));
        let resp = self.send(
            Method::PUT,
            &url,
            Some(&self.push_scope()),
            &[
                ("Content-Type", "application/octet-stream".to_owned()),
                ("Content-Length", size.to_string()),
            ],
            Payload::Reader(Some(reader)),
            &what,
        )?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &what));
        }
        Ok(())
    }

    fn resolve_location(&self, loc: &str) -> Result<String, RegistryError> {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            Ok(loc.to_owned())
        } else if loc.starts_with('/') {
            Ok(format!("{}{loc}", self.base_url()?))
        } else {
            Err(RegistryError::Document {
                what: format!("upload to `{}`", self.repo_name()),
                reason: format!("the registry gave an unusable Location `{loc}`"),
            })
        }
    }

    /// Runs `f` again after a pause when it fails with something worth
    /// retrying (see [`RegistryError::is_retryable`]).
    pub(crate) fn retrying<T>(
        &self,
        f: impl FnMut() -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.retry_when(f, RegistryError::is_retryable)
    }

    /// Like [`RegistryClient::retrying`], for a download whose request was
    /// retried already: only a body cut short by the network is tried
    /// again (the request's own failures were retried inside).
    pub(crate) fn retrying_body<T>(
        &self,
        f: impl FnMut() -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.retry_when(f, |e| match e {
            RegistryError::Blob { source, .. } => {
                matches!(**source, RegistryError::Io { .. }) && source.is_retryable()
            }
            RegistryError::Io { .. } => e.is_retryable(),
            _ => false,
        })
    }

    fn retry_when<T>(
        &self,
        mut f: impl FnMut() -> Result<T, RegistryError>,
        retry: impl Fn(&RegistryError) -> bool,
    ) -> Result<T, RegistryError> {
        let mut pause = self.options.backoff;
        let mut attempt = 1;
        loop {
            match f() {
                Err(e) if retry(&e) && attempt < self.options.attempts.max(1) => {
                    std::thread::sleep(pause);
                    pause = pause.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `https://host` or (for insecure and local registries, when https
    /// does not answer) `http://host`, found once with `GET /v2/`.
    fn base_url(&self) -> Result<String, RegistryError> {
        if let Some(b) = self.base.get() {
            return Ok(b.clone());
        }
        let host = self.image.api_host();
        let https = format!("https://{host}");
        let may_fall_back = self.options.insecure || self.image.is_local();
        let result = match self.ping(&https, !may_fall_back) {
            Ok(()) => https,
            Err(e) if may_fall_back && e.is_transport() => {
                let http = format!("http://{host}");
                self.ping(&http, true)?;
                http
            }
            Err(RegistryError::Transport {
                registry, source, ..
            }) if is_tls_failure(&source) => {
                return Err(RegistryError::Tls {
                    registry,
                    cause: source,
                });
            }
            Err(e) => return Err(e),
        };
        Ok(self.base.get_or_init(|| result).clone())
    }

    fn ping(&self, base: &str, retry: bool) -> Result<(), RegistryError> {
        let url = format!("{base}/v2/");
        let what = format!("GET {url}");
        let once = || {
            let r = self
                .agent
                .get(&url)
                .call()
                .map_err(|e| self.transport(&what, e))?;
            if is_retryable_status(r.status()) {
                return Err(RegistryError::Status {
                    what: what.clone(),
                    status: r.status().as_u16(),
                    detail: String::new(),
                });
            }
            Ok(r)
        };
        // First contact: a registry that cannot be connected to at all (no
        // route, a firewall dropping packets) fails at once instead of
        // after several connect timeouts; 5xx, 429 and a dropped
        // connection are retried.
        let first_contact_retry = |e: &RegistryError| match e {
            RegistryError::Transport { source, .. } => {
                !matches!(
                    **source,
                    ureq::Error::ConnectionFailed | ureq::Error::Timeout(_)
                ) && e.is_retryable()
            }
            _ => e.is_retryable(),
        };
        let resp = if retry {
            self.retry_when(once, first_contact_retry)?
        } else {
            once()?
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = header(&resp, "www-authenticate").and_then(parse_challenge);
            self.lock().challenge = challenge;
        }
        Ok(())
    }

    /// The `Authorization` value for `scope` (None: send none).
    fn authorization(
        &self,
        scope: Option<&str>,
        refresh: bool,
    ) -> Result<Option<String>, RegistryError> {
        let challenge = self.lock().challenge.clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.as_ref().map(Credentials::basic_header)),
            Some(Challenge::Bearer { .. }) => {
                let scope = scope.unwrap_or("");
                Ok(Some(format!("Bearer {}", self.token_for(scope, refresh)?)))
            }
        }
    }

    /// A bearer token for `scope` (space-separated scopes), cached.
    fn token_for(&self, scope: &str, refresh: bool) -> Result<String, RegistryError> {
        let (realm, service) = {
            let state = self.lock();
            if !refresh && let Some(t) = state.tokens.get(scope) {
                return Ok(t.clone());
            }
            match &state.challenge {
                Some(Challenge::Bearer { realm, service, .. }) => (realm.clone(), service.clone()),
                _ => {
                    return Err(RegistryError::Unauthorized {
                        registry: self.image.registry().to_owned(),
                        what: "token".to_owned(),
                        detail: "the registry did not ask for a bearer token".to_owned(),
                    });
                }
            }
        };
        let mut url = realm.clone();
        let mut params = Vec::new();
        if let Some(s) = &service {
            params.push(format!("service={}", percent_encode(s)));
        }
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            params.push(format!("scope={}", percent_encode(s)));
        }
        if !params.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&params.join("&"));
        }
        let what = format!("token from `{realm}`");
        let resp = self.retrying(|| {
            let mut req = self.agent.get(&url);
            if let Some(c) = &self.credentials {
                req = req.header("Authorization", c.basic_header());
            }
            let r = req.call().map_err(|e| self.transport(&what, e))?;
            if is_retryable_status(r.status()) {
                return Err(self.status_error(r, &what));
            }
            Ok(r)
        })?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.image.registry().to_owned(),
                what,
                detail: error_detail(resp),
            });
        }
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &what));
        }
        let json: serde_json::Value = resp
            .into_body()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| self.transport(&what, e))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| RegistryError::Document {
                    what: what.clone(),
                    reason: e.to_string(),
                })
            })?;
        let token = json
            .get("token")
            .or_else(|| json.get("access_token"))
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Document {
                what: what.clone(),
                reason: "the answer has no `token`".to_owned(),
            })?
            .to_owned();
        self.lock().tokens.insert(scope.to_owned(), token.clone());
        Ok(token)
    }

    /// Sends one request with auth, retrying connection errors, 5xx and
    /// 429 (a streamed body is sent once), and answering one 401 with a
    /// fresh token or credentials.
    fn send(
        &self,
        method: Method,
        url: &str,
        scope: Option<&str>,
        headers: &[(&str, String)],
        mut payload: Payload<'_>,
        what: &str,
    ) -> Result<Response<ureq::Body>, RegistryError> {
        let mut attempt = 1u32;
        let mut pause = self.options.backoff;
        let mut refreshed = false;
        loop {
            let auth = self.authorization(scope, false)?;
            let mut req = http::Request::builder().method(method.clone()).uri(url);
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            if let Some(a) = &auth {
                req = req.header("Authorization", a.as_str());
            }
            let one_shot = matches!(payload, Payload::Reader(_));
            let result = match &mut payload {
                Payload::Empty => req.body(()).map(|r| self.agent.run(r)),
                Payload::Bytes(b) => req.body(*b).map(|r| self.agent.run(r)),
                Payload::Reader(r) => match r.take() {
                    Some(r) => req
                        .body(ureq::SendBody::from_reader(r))
                        .map(|r| self.agent.run(r)),
                    None => {
                        return Err(RegistryError::Io {
                            what: what.to_owned(),
                            source: io::Error::other("the upload body was already sent"),
                        });
                    }
                },
            };
            let result = result.map_err(|e| RegistryError::Document {
                what: what.to_owned(),
                reason: format!("bad request: {e}"),
            })?;
            match result {
                Err(e) => {
                    let err = self.transport(what, e);
                    if one_shot || !err.is_retryable() || attempt >= self.options.attempts.max(1) {
                        return Err(err);
                    }
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    let challenge = header(&resp, "www-authenticate").and_then(parse_challenge);
                    let had_auth = auth.is_some();
                    if one_shot || refreshed || challenge.is_none() {
                        return Err(self.unauthorized(resp, what));
                    }
                    let basic_without_creds =
                        matches!(challenge, Some(Challenge::Basic)) && self.credentials.is_none();
                    self.lock().challenge = challenge;
                    if basic_without_creds {
                        return Err(self.unauthorized(resp, what));
                    }
                    if had_auth {
                        self.authorization(scope, true)?;
                    }
                    refreshed = true;
                    continue;
                }
                Ok(resp) if is_retryable_status(resp.status()) => {
                    if one_shot || attempt >= self.options.attempts.max(1) {
                        return Ok(resp);
                    }
                    if let Some(after) =
                        header(&resp, "retry-after").and_then(|s| s.parse::<u64>().ok())
                    {
                        pause = pause.max(Duration::from_secs(after.min(30)));
                    }
                }
                Ok(resp) => return Ok(resp),
            }
            std::thread::sleep(pause);
            pause = pause.saturating_mul(2);
            attempt += 1;
        }
    }

    fn transport(&self, what: &str, e: ureq::Error) -> RegistryError {
        RegistryError::Transport {
            registry: self.image.registry().to_owned(),
            what: what.to_owned(),
            source: Box::new(e),
        }
    }

    fn unauthorized(&self, resp: Response<ureq::Body>, what: &str) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.image.registry().to_owned(),
            what: what.to_owned(),
            detail: error_detail(resp),
        }
    }

    fn status_error(&self, resp: Response<ureq::Body>, what: &str) -> RegistryError {
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return self.unauthorized(resp, what);
        }
        RegistryError::Status {
            what: what.to_owned(),
            status,
            detail: error_detail(resp),
        }
    }
}

/// A certificate or TLS protocol failure (rustls errors come as
/// `InvalidData` I/O errors).
fn is_tls_failure(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
        ureq::Error::Io(io) => io.kind() == io::ErrorKind::InvalidData,
        _ => false,
    }
}

fn is_retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
}

fn header<'a>(resp: &'a Response<ureq::Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn is_manifest_type(t: &str) -> bool {
    matches!(
        t,
        MEDIA_OCI_MANIFEST | MEDIA_OCI_INDEX | MEDIA_DOCKER_MANIFEST | MEDIA_DOCKER_LIST
    )
}

/// The media type a manifest document declares, or an OCI one guessed
/// from its shape (`manifests` → index, `config` → manifest).
fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(t) = v.get("mediaType").and_then(serde_json::Value::as_str)
        && is_manifest_type(t)
    {
        return Some(t.to_owned());
    }
    if v.get("manifests").is_some() {
        Some(MEDIA_OCI_INDEX.to_owned())
    } else if v.get("config").is_some() {
        Some(MEDIA_OCI_MANIFEST.to_owned())
    } else {
        None
    }
}

/// `code: message` from a distribution error body, else the status text.
fn error_detail(resp: Response<ureq::Body>) -> String {
    let status = resp.status();
    let body = resp
        .into_body()
        .with_config()
        .limit(64 << 10)
        .read_to_vec()
        .unwrap_or_default();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(errors) = v.get("errors").and_then(serde_json::Value::as_array)
    {
        let parts: Vec<String> = errors
            .iter()
            .map(|e| {
                let code = e
                    .get("code")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("");
                let msg = e
                    .get("message")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("");
                format!("{}: {msg}", code.to_ascii_lowercase().replace('_', " "))
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() || text.len() > 200 {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The system's CA certificates (`SSL_CERT_FILE`, else Debian's / Fedora's
/// bundle); the built-in webpki roots when none are found.
fn system_roots() -> ureq::tls::RootCerts {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        candidates.push(f.into());
    }
    candidates.extend(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .map(std::path::PathBuf::from),
    );
    for path in candidates {
        let Ok(pem) = fs_err::read(&path) else {
            continue;
        };
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            return ureq::tls::RootCerts::Specific(Arc::new(certs));
        }
    }
    ureq::tls::RootCerts::WebPki
}

/// A blob's content did not match its descriptor.
#[derive(Debug, thiserror::Error)]
#[error("blob `{digest}`: {reason}")]
pub struct BlobMismatch {
    /// The digest asked for.
    pub digest: String,
    /// What differed.
    pub reason: String,
}

/// A downloading blob; see [`RegistryClient::open_blob`].
pub struct BlobStream {
    inner: Box<dyn Read + Send>,
    hasher: Hasher,
    read: u64,
    size: Option<u64>,
    digest: Digest,
    checked: bool,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("digest", &self.digest)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    fn mismatch(&self, reason: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            BlobMismatch {
                digest: self.digest.to_string(),
                reason,
            },
        )
    }
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.checked {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some(size) = self.size
                && self.read != size
            {
                return Err(self.mismatch(format!(
                    "the registry sent {} bytes, the descriptor says {size} (truncated?)",
                    self.read
                )));
            }
            let actual = std::mem::take(&mut self.hasher).finish();
            if actual != self.digest {
                return Err(self.mismatch(format!("the content hashes to `{actual}` (corrupted?)")));
            }
            self.checked = true;
            return Ok(0);
        }
        self.read += n as u64;
        if let Some(size) = self.size
            && self.read > size
        {
            return Err(self.mismatch(format!(
                "the registry sent more than the {size} bytes the descriptor says"
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_stream_verifies() {
        let data = b"hello world".to_vec();
        let digest = Digest::of_bytes(&data);
        let stream = |bytes: Vec<u8>, size| BlobStream {
            inner: Box::new(io::Cursor::new(bytes)),
            hasher: Hasher::new(),
            read: 0,
            size,
            digest: digest.clone(),
            checked: false,
        };
        let mut out = Vec::new();
        stream(data.clone(), Some(11))
            .read_to_end(&mut out)
            .expect("good blob");
        assert_eq!(out, data);
        let mut flipped = data.clone();
        flipped[3] ^= 1;
        let err = stream(flipped, Some(11))
            .read_to_end(&mut Vec::new())
            .expect_err("flip");
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        assert!(err.to_string().contains("hashes to"), "{err}");
        let err = stream(data[..5].to_vec(), Some(11))
            .read_to_end(&mut Vec::new())
            .expect_err("short");
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = stream(data.clone(), Some(5))
            .read_to_end(&mut Vec::new())
            .expect_err("long");
        assert!(err.to_string().contains("more than"), "{err}");
        assert!(err.get_ref().is_some_and(|e| e.is::<BlobMismatch>()));
    }

    #[test]
    fn sniffs_and_encodes() {
        assert_eq!(
            sniff_media_type(br#"{"manifests":[]}"#).as_deref(),
            Some(MEDIA_OCI_INDEX)
        );
        assert_eq!(
            sniff_media_type(format!(r#"{{"mediaType":"{MEDIA_DOCKER_MANIFEST}"}}"#).as_bytes())
                .as_deref(),
            Some(MEDIA_DOCKER_MANIFEST)
        );
        assert_eq!(sniff_media_type(b"[]"), None);
        assert_eq!(
            percent_encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
