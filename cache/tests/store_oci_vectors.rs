//! The OCI image-spec schema vectors (`../shared/conformance/oci-image-spec`)
//! are accepted or rejected by kiln's readers exactly as upstream's
//! `index.tsv` says; the spec's own examples are all accepted.

use std::path::PathBuf;

use kiln_cache::{DocumentKind, validate_document};

fn shared() -> PathBuf {
    match std::env::var_os("KILN_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

fn rows(dir: &str) -> Vec<Vec<String>> {
    let path = shared()
        .join("conformance/oci-image-spec")
        .join(dir)
        .join("index.tsv");
    let text = fs_err::read_to_string(&path).expect("conformance data (set KILN_SHARED)");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// The documents in a vector file. Two files (`descriptor-29-invalid.json`,
/// `manifest-07-valid.json`) hold two upstream test cases run together,
/// with Go source text between them; each JSON document in them is
/// checked, and the file is valid only if all are. Any other file is one
/// document (possibly not JSON at all).
fn documents(bytes: &[u8]) -> Vec<&[u8]> {
    const GLUE: &[u8] = b"`,";
    let Some(glue) = bytes.windows(GLUE.len()).position(|w| w == GLUE) else {
        return vec![bytes];
    };
    let mut docs = vec![&bytes[..glue]];
    let rest = &bytes[glue..];
    // The next case's raw string starts after the next backtick.
    if let Some(start) = rest[GLUE.len()..].iter().position(|&b| b == b'`') {
        let next = &rest[GLUE.len() + start + 1..];
        docs.extend(documents(next));
    }
    docs
}

#[test]
fn schema_vectors_match_upstream_verdicts() {
    let dir = shared().join("conformance/oci-image-spec/vectors");
    let mut wrong = Vec::new();
    let rows = rows("vectors");
    assert_eq!(rows.len(), 65, "the README promises 65 vectors");
    let (mut valid, mut invalid) = (0, 0);
    for row in &rows {
        let (file, media_type, expect) = (&row[0], &row[1], &row[2]);
        let kind = DocumentKind::from_media_type(media_type)
            .unwrap_or_else(|| panic!("{file}: no reader for media type {media_type}"));
        let bytes = fs_err::read(dir.join(file)).expect("vector");
        let result = documents(&bytes)
            .into_iter()
            .try_for_each(|doc| validate_document(kind, doc, file));
        match (expect.as_str(), &result) {
            ("valid", Ok(())) => valid += 1,
            ("invalid", Err(_)) => invalid += 1,
            _ => wrong.push(format!(
                "{file}: expected {expect}, got {result:?} ({})",
                row[3]
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} vectors disagree:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // index.tsv holds 25 valid and 40 invalid vectors (the README's
    // "30 and 35" does not match its own index).
    assert_eq!((valid, invalid), (25, 40));
}

#[test]
fn spec_examples_are_accepted() {
    let dir = shared().join("conformance/oci-image-spec/examples");
    let mut wrong = Vec::new();
    for row in rows("examples") {
        let (file, media_type) = (&row[0], &row[1]);
        let kind = DocumentKind::from_media_type(media_type).expect("known media type");
        let bytes = fs_err::read(dir.join(file)).expect("example");
        if let Err(e) = validate_document(kind, &bytes, file) {
            wrong.push(format!("{file}: {e}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn docker_v2_schema2_manifest_is_accepted() {
    let m =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
      "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":1469,
        "digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":10,
        "digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}]}"#;
    validate_document(DocumentKind::Manifest, m, "docker").expect("docker manifest");
    let bad = String::from_utf8_lossy(m).replace("manifest.v2+json", "manifest.v9");
    assert!(validate_document(DocumentKind::Manifest, bad.as_bytes(), "bad").is_err());
}
