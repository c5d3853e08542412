//! The registry client against a real registry (Debian's docker-registry).

mod registry_support;

use std::io::Read;

use kiln_cache::Digest;
use kiln_cache::registry::{ClientOptions, Credentials, ImageRef, RegistryClient, RegistryError};
use registry_support::{Registry, available};

fn opts() -> ClientOptions {
    ClientOptions {
        docker_config: false,
        ..ClientOptions::default()
    }
}

#[test]
fn blobs_and_manifests_round_trip() {
    if !available() {
        return;
    }
    let reg = Registry::start(None);
    let image = ImageRef::parse(&format!(
        "{}/kiln/client-{}:v1",
        reg.host(),
        std::process::id()
    ))
    .expect("ref");
    let c = RegistryClient::new(&image, opts()).expect("client");

    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = Digest::of_bytes(config);
    assert_eq!(c.blob_exists(&cd).expect("head"), None);
    c.put_blob(&cd, config.len() as u64, &mut &config[..])
        .expect("upload");
    assert_eq!(c.blob_exists(&cd).expect("head"), Some(config.len() as u64));
    let mut got = Vec::new();
    assert_eq!(
        c.get_blob(&cd, Some(config.len() as u64), &mut got)
            .expect("get"),
        config.len() as u64
    );
    assert_eq!(got, config);

    // A size or digest that does not match is caught.
    let err = c
        .get_blob(&cd, Some(3), &mut Vec::new())
        .expect_err("wrong size");
    assert!(err.to_string().contains(&cd.to_string()), "{err}");
    let other = Digest::of_bytes(b"other");
    let err = c.open_blob(&other, None).expect_err("missing blob");
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");

    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [],
    }))
    .expect("json");
    let md = c
        .put_manifest(
            "v1",
            &manifest,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .expect("put manifest");
    assert_eq!(md, Digest::of_bytes(&manifest));
    let m = c.get_manifest("v1").expect("get manifest");
    assert_eq!(
        (m.bytes.as_slice(), m.digest.clone()),
        (manifest.as_slice(), md.clone())
    );
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
    assert!(!m.is_index());
    assert_eq!(
        c.get_manifest(&md.to_string()).expect("by digest").bytes,
        manifest
    );
    let err = c.get_manifest("nope").expect_err("missing tag");
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    // Cross-repository mount.
    let other_repo = ImageRef::parse(&format!(
        "{}/kiln/mounted-{}:v1",
        reg.host(),
        std::process::id()
    ))
    .expect("ref");
    let c2 = RegistryClient::new(&other_repo, opts()).expect("client");
    assert_eq!(c2.blob_exists(&cd).expect("head"), None);
    assert!(c2.mount_blob(&cd, image.repository()).expect("mount"));
    assert_eq!(
        c2.blob_exists(&cd).expect("head"),
        Some(config.len() as u64)
    );
    assert!(
        !c2.mount_blob(&other, image.repository())
            .expect("mount of a missing blob")
    );

    // Streaming read.
    let mut s = c2.open_blob(&cd, Some(config.len() as u64)).expect("open");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert!(text.contains("amd64"));
}

#[test]
fn basic_auth_is_checked() {
    if !available() {
        return;
    }
    let reg = Registry::start(Some(("kiln", "s3cret")));
    let image = ImageRef::parse(&format!(
        "{}/kiln/auth-{}:v1",
        reg.host(),
        std::process::id()
    ))
    .expect("ref");
    let with = |user: &str, pw: &str| {
        RegistryClient::new(
            &image,
            ClientOptions {
                credentials: Some(Credentials {
                    username: user.to_owned(),
                    password: pw.to_owned(),
                }),
                ..opts()
            },
        )
        .expect("client")
    };
    with("kiln", "s3cret")
        .check_login()
        .expect("good credentials");
    let err = with("kiln", "wrong")
        .check_login()
        .expect_err("bad password");
    assert!(err.is_unauthorized(), "{err}");
    assert!(err.to_string().contains("unauthorized"), "{err}");
    let anon = RegistryClient::new(&image, opts()).expect("client");
    let err = anon
        .blob_exists(&Digest::of_bytes(b"x"))
        .expect_err("anonymous");
    assert!(err.is_unauthorized(), "{err}");
    let d = Digest::of_bytes(b"data");
    let c = with("kiln", "s3cret");
    c.put_blob(&d, 4, &mut &b"data"[..])
        .expect("upload with credentials");
    assert_eq!(c.blob_exists(&d).expect("head"), Some(4));
}

/// A tiny HTTP/1.1 server (one request per connection) answering with
/// `handler(method, path, authorization)` → (status, headers, body).
struct Fake {
    port: u16,
    hits: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

type Handler =
    dyn Fn(&str, &str, Option<&str>, usize) -> (u16, Vec<(String, String)>, Vec<u8>) + Send + Sync;

impl Fake {
    fn start(handler: std::sync::Arc<Handler>) -> Fake {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let h2 = std::sync::Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                // A TLS ClientHello (the client tries https first): hang up.
                let mut first = [0u8; 1];
                if conn.peek(&mut first).is_err() || first[0] == 0x16 {
                    continue;
                }
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || !line.starts_with(char::is_alphabetic) {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_owned();
                let path = parts.next().unwrap_or("").to_owned();
                let mut auth = None;
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") {
                            auth = Some(v.trim().to_owned());
                        }
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let n = {
                    let mut hits = h2.lock().expect("lock");
                    hits.push(format!("{method} {path}"));
                    hits.iter()
                        .filter(|h| **h == format!("{method} {path}"))
                        .count()
                };
                let (status, headers, body) = handler(&method, &path, auth.as_deref(), n);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = conn.write_all(out.as_bytes());
                if method != "HEAD" {
                    let _ = conn.write_all(&body);
                }
            }
        });
        Fake { port, hits }
    }

    fn count(&self, prefix: &str) -> usize {
        self.hits
            .lock()
            .expect("lock")
            .iter()
            .filter(|h| h.starts_with(prefix))
            .count()
    }
}

fn quick() -> ClientOptions {
    ClientOptions {
        backoff: std::time::Duration::from_millis(10),
        ..opts()
    }
}

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":2},"layers":[]}"#;

#[test]
fn bearer_tokens_are_fetched_with_credentials_and_cached_per_scope() {
    let port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
    let p = std::sync::Arc::clone(&port);
    let good = Credentials {
        username: "u".to_owned(),
        password: "p".to_owned(),
    }
    .basic_header();
    let fake = Fake::start(std::sync::Arc::new(move |method, path, auth, _| {
        let realm = format!("http://127.0.0.1:{}/token", p.get().copied().unwrap_or(0));
        let challenge = |scope: &str| {
            vec![(
                "WWW-Authenticate".to_owned(),
                format!(r#"Bearer realm="{realm}",service="fake",scope="{scope}""#),
            )]
        };
        if path.starts_with("/token") {
            assert!(path.contains("service=fake"), "{path}");
            return match auth {
                Some(a) if a == good => (200, vec![], br#"{"token":"good-token"}"#.to_vec()),
                Some(_) => (
                    401,
                    vec![],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad creds"}]}"#.to_vec(),
                ),
                None => (200, vec![], br#"{"access_token":"anon-token"}"#.to_vec()),
            };
        }
        if path == "/v2/" {
            return (401, challenge(""), Vec::new());
        }
        if method == "GET" && path == "/v2/x/y/manifests/t" {
            return match auth {
                Some("Bearer good-token") => (
                    200,
                    vec![(
                        "Content-Type".to_owned(),
                        "application/vnd.oci.image.manifest.v1+json".to_owned(),
                    )],
                    MANIFEST.as_bytes().to_vec(),
                ),
                _ => (
                    401,
                    challenge("repository:x/y:pull"),
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"need a token"}]}"#.to_vec(),
                ),
            };
        }
        (404, vec![], Vec::new())
    }));
    port.set(fake.port).expect("set once");
    let image = ImageRef::parse(&format!("127.0.0.1:{}/x/y:t", fake.port)).expect("ref");
    let c = RegistryClient::new(
        &image,
        ClientOptions {
            credentials: Some(Credentials {
                username: "u".to_owned(),
                password: "p".to_owned(),
            }),
            ..quick()
        },
    )
    .expect("client");
    let m = c.get_manifest("t").expect("manifest with a token");
    assert_eq!(m.bytes, MANIFEST.as_bytes());
    c.get_manifest("t").expect("again");
    assert_eq!(
        fake.count("GET /token"),
        1,
        "the token is cached for its scope"
    );
    assert!(
        fake.hits
            .lock()
            .expect("lock")
            .iter()
            .any(|h| h.contains("scope=repository%3Ax%2Fy%3Apull")),
        "the scope is asked for"
    );
    c.check_login().expect("login check gets a token");

    // Wrong credentials: a clear auth error, not retried.
    let bad = RegistryClient::new(
        &image,
        ClientOptions {
            credentials: Some(Credentials {
                username: "u".to_owned(),
                password: "nope".to_owned(),
            }),
            ..quick()
        },
    )
    .expect("client");
    let before = fake.count("GET /token");
    let err = bad.get_manifest("t").expect_err("bad creds");
    assert!(err.is_unauthorized(), "{err}");
    assert!(err.to_string().contains("bad creds"), "{err}");
    assert_eq!(fake.count("GET /token"), before + 1, "4xx is not retried");

    // Anonymous: an anonymous token that the registry refuses.
    let anon = RegistryClient::new(&image, quick()).expect("client");
    let err = anon.get_manifest("t").expect_err("anonymous");
    assert!(err.is_unauthorized(), "{err}");
    assert!(err.to_string().contains("need a token"), "{err}");
}

#[test]
fn server_errors_are_retried_and_client_errors_are_not() {
    let fake = Fake::start(std::sync::Arc::new(|_method, path, _auth, n| {
        let manifest = || {
            (
                200,
                vec![(
                    "Content-Type".to_owned(),
                    "application/vnd.oci.image.manifest.v1+json".to_owned(),
                )],
                MANIFEST.as_bytes().to_vec(),
            )
        };
        match path {
            "/v2/" => (200, vec![], Vec::new()),
            "/v2/r/manifests/flaky" if n == 1 => (503, vec![], Vec::new()),
            "/v2/r/manifests/flaky" if n == 2 => (
                429,
                vec![("Retry-After".to_owned(), "0".to_owned())],
                Vec::new(),
            ),
            "/v2/r/manifests/flaky" => manifest(),
            "/v2/r/manifests/down" => (500, vec![], b"boom".to_vec()),
            "/v2/r/manifests/denied" => (
                403,
                vec![],
                br#"{"errors":[{"code":"DENIED","message":"no"}]}"#.to_vec(),
            ),
            _ => (
                404,
                vec![],
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
                    .to_vec(),
            ),
        }
    }));
    let image = ImageRef::parse(&format!("localhost:{}/r:flaky", fake.port)).expect("ref");
    let c = RegistryClient::new(&image, quick()).expect("client");
    c.get_manifest("flaky")
        .expect("succeeds after a 503 and a 429");
    assert_eq!(fake.count("GET /v2/r/manifests/flaky"), 3);
    let err = c.get_manifest("down").expect_err("always 500");
    assert!(err.to_string().contains("500"), "{err}");
    assert_eq!(fake.count("GET /v2/r/manifests/down"), 4, "a few tries");
    let err = c.get_manifest("missing").expect_err("404");
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("manifest unknown"), "{err}");
    assert_eq!(
        fake.count("GET /v2/r/manifests/missing"),
        1,
        "404 is not retried"
    );
    let err = c.get_manifest("denied").expect_err("403");
    assert!(err.is_unauthorized(), "{err}");
    assert_eq!(
        fake.count("GET /v2/r/manifests/denied"),
        1,
        "403 is not retried"
    );
}
