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
