use std::io::Write as _;
use std::sync::Arc;

use super::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// A one-file layer tar, gzip-compressed: (gzip bytes, diffID, tar size).
fn layer(name: &str, body: &str) -> (Vec<u8>, Digest, u64) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, body.as_bytes())
        .unwrap_or_else(|e| panic!("tar: {e}"));
    let tar = b.into_inner().unwrap_or_else(|e| panic!("tar: {e}"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap_or_else(|e| panic!("gzip: {e}"));
    let gz = gz.finish().unwrap_or_else(|e| panic!("gzip: {e}"));
    (gz, Digest::of_bytes(&tar), tar.len() as u64)
}

fn put(dir: &std::path::Path, bytes: &[u8]) -> Digest {
    let d = Digest::of_bytes(bytes);
    let p = dir.join("blobs/sha256");
    fs_err::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
    fs_err::write(p.join(d.hex()), bytes).unwrap_or_else(|e| panic!("{e}"));
    d
}

#[test]
fn cache_to_specs() {
    let c = CacheTo::parse("type=local,dest=/tmp/c,mode=max").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.mode, ExportMode::Max);
    assert_eq!(
        c.location,
        CacheLocation::Local {
            dir: "/tmp/c".into(),
            tag: "latest".into()
        }
    );
    let c = CacheTo::parse("type=registry,ref=127.0.0.1:5000/app:cache")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.mode, ExportMode::Min);
    assert_eq!(
        c.location,
        CacheLocation::Registry {
            reference: "127.0.0.1:5000/app:cache".into()
        }
    );
    // BuildKit's attributes kiln has no use for are accepted.
    assert!(CacheTo::parse("type=local,dest=d,compression=gzip,oci-mediatypes=true").is_ok());
    for (spec, want) in [
        (
            "type=local,dest=d,mode=all",
            "attribute `mode`: `all` is not min or max",
        ),
        ("type=local", "type=local needs `dest=DIR`"),
        ("type=local,src=d", "unknown attribute `src`"),
        ("type=gha", "attribute `type`: `gha` is not supported"),
        ("type=registry", "type=registry needs `ref=REFERENCE`"),
        ("type=local,dest", "attribute `dest` is not KEY=VALUE"),
    ] {
        let e = CacheTo::parse(spec)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("invalid --cache-to"), "{spec}: {e}");
        assert!(e.contains(want), "{spec}: `{e}` should say `{want}`");
    }
}

#[test]
fn cache_from_specs() {
    assert_eq!(
        parse_cache_from("type=local,src=/c,tag=v1").unwrap_or_else(|e| panic!("{e}")),
        CacheLocation::Local {
            dir: "/c".into(),
            tag: "v1".into()
        }
    );
    assert_eq!(
        parse_cache_from("example.com/app:cache").unwrap_or_else(|e| panic!("{e}")),
        CacheLocation::Registry {
            reference: "example.com/app:cache".into()
        }
    );
    let e = parse_cache_from("type=local,dest=/c")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("--cache-from") && e.contains("`dest`"), "{e}");
}

/// A cache laid out as BuildKit's `type=local` exporter writes it without
/// `image-manifest=true`: an index listing the layer blobs and the config.
fn buildkit_layout(dir: &std::path::Path) -> (Digest, Digest) {
    let (l0, d0, _) = layer("a", "a\n");
    let (l1, d1, _) = layer("b", "b\n");
    let (b0, b1) = (put(dir, &l0), put(dir, &l1));
    let config = serde_json::json!({
        "layers": [
            {"blob": b0.to_string(), "parent": -1},
            {"blob": b1.to_string()},
        ],
        "records": [
            {"digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111"},
            {"layers": [{"layer": 0, "createdAt": "2024-01-02T03:04:05.123456789Z"}],
             "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
             "inputs": [[{"selector": "sha256:abc", "link": 0}]]},
            {"layers": [{"layer": 1, "createdAt": "2024-01-02T03:04:05Z"}],
             "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333",
             "inputs": [[{"link": 1}]]},
            {"chains": [{"layers": [{"layer": 0}]}],
             "digest": "sha256:4444444444444444444444444444444444444444444444444444444444444444",
             "type": "merge"},
        ],
    });
    let config = serde_json::to_vec(&config).unwrap_or_default();
    let c = put(dir, &config);
    let layer_desc = |b: &Digest, d: &Digest, len: usize| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": b.to_string(), "size": len,
            "annotations": {"buildkit/createdat": "2024-01-02T03:04:05Z",
                            "containerd.io/uncompressed": d.to_string()},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            layer_desc(&b0, &d0, l0.len()),
            layer_desc(&b1, &d1, l1.len()),
            {"mediaType": MEDIA_CACHE_CONFIG, "digest": c.to_string(), "size": config.len()},
        ],
    });
    let index = serde_json::to_vec(&index).unwrap_or_default();
    let i = put(dir, &index);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                       "digest": i.to_string(), "size": index.len(),
                       "annotations": {ANNOTATION_REF_NAME: "latest"}}],
    });
    fs_err::write(
        dir.join("index.json"),
        serde_json::to_vec(&top).unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    fs_err::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    (d0, d1)
}

#[test]
fn reads_a_buildkit_index_cache() {
    let t = tmp();
    let (d0, d1) = buildkit_layout(t.path());
    let mut cache = ImportedCache::new();
    let found = cache
        .add(Arc::new(LocalLayout::new(t.path(), "latest", false)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(found);
    // Records with results, their chains followed through `parent`
    // (an omitted parent is 0, as Go's omitempty writes it).
    assert_eq!(cache.len(), 2);
    let (chain, _) = cache
        .record("sha256:3333333333333333333333333333333333333333333333333333333333333333")
        .unwrap_or_else(|| panic!("record 3 missing"));
    let ids: Vec<&Digest> = chain.iter().map(|(d, _)| d).collect();
    assert_eq!(ids, vec![&d0, &d1]);
    assert!(cache.layer(&d1).is_some());
    // Another tag: no cache there.
    let mut other = ImportedCache::new();
    let found = other
        .add(Arc::new(LocalLayout::new(t.path(), "v2", false)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!found);
}

#[test]
fn missing_and_malformed_caches() {
    let t = tmp();
    let mut cache = ImportedCache::new();
    let none = cache
        .add(Arc::new(LocalLayout::new(
            t.path().join("nope"),
            "latest",
            false,
        )))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!none);
    fs_err::write(t.path().join("index.json"), "{not json").unwrap_or_else(|e| panic!("{e}"));
    let e = cache
        .add(Arc::new(LocalLayout::new(t.path(), "latest", false)))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("index.json"), "{e}");
}

#[test]
fn a_corrupt_layer_blob_is_named_and_not_stored() {
    let t = tmp();
    let (d0, _) = buildkit_layout(t.path());
    let layout = Arc::new(LocalLayout::new(t.path(), "latest", false));
    let mut cache = ImportedCache::new();
    cache
        .add(Arc::clone(&layout) as Arc<dyn CacheTransport>)
        .unwrap_or_else(|e| panic!("{e}"));
    let src = cache
        .layer(&d0)
        .cloned()
        .unwrap_or_else(|| panic!("layer missing"));
    // Replace the blob with other (valid gzip) bytes.
    let (other, _, _) = layer("evil", "x\n");
    fs_err::write(t.path().join("blobs/sha256").join(src.blob.hex()), other)
        .unwrap_or_else(|e| panic!("{e}"));
    let store = kiln_cache::Store::open(t.path().join("store")).unwrap_or_else(|e| panic!("{e}"));
    let e = fetch_layer(&store, &d0, &src)
        .err()
        .unwrap_or_else(|| panic!("a corrupt blob was accepted"));
    let text = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(text.contains(&src.blob.to_string()), "{text}");
    assert!(!store.has_layer(&d0), "a corrupt layer was stored");
    // The good bytes are accepted.
    let t2 = tmp();
    let (d0b, _) = buildkit_layout(t2.path());
    assert_eq!(d0, d0b);
    let good = LayerSource {
        transport: Arc::new(LocalLayout::new(t2.path(), "latest", false)),
        ..src
    };
    let size = fetch_layer(&store, &d0, &good).unwrap_or_else(|e| panic!("{e}"));
    assert!(size > 0);
    assert!(store.has_layer(&d0));
}

#[test]
fn config_serializes_with_buildkit_names() {
    let cc = CacheConfig {
        layers: vec![CacheLayer {
            blob: "sha256:aa".into(),
            parent_index: -1,
            annotations: None,
        }],
        records: vec![CacheRecord {
            results: vec![CacheResultRef {
                layer_index: 0,
                created_at: "2024-01-01T00:00:00Z".into(),
            }],
            digest: "sha256:bb".into(),
            inputs: vec![vec![CacheInput {
                selector: String::new(),
                link_index: 0,
            }]],
            ..CacheRecord::default()
        }],
        kiln_contents: BTreeMap::new(),
    };
    let v = serde_json::to_value(&cc).unwrap_or_default();
    assert_eq!(v["layers"][0]["blob"], "sha256:aa");
    assert_eq!(v["layers"][0]["parent"], -1);
    assert_eq!(v["records"][0]["layers"][0]["layer"], 0);
    assert_eq!(
        v["records"][0]["layers"][0]["createdAt"],
        "2024-01-01T00:00:00Z"
    );
    assert_eq!(v["records"][0]["inputs"][0][0]["link"], 0);
    assert_eq!(v["records"][0]["digest"], "sha256:bb");
    assert!(v.get("kiln.contentDigests").is_none());
}
