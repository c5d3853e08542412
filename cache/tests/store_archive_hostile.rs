//! Hostile or broken archives: `load` refuses them with an error that names
//! the problem, reads nothing outside the archive, and leaves the store
//! consistent with nothing referenced.

use std::path::Path;

use kiln_cache::archive;
use kiln_cache::{Digest, Store, StoreError};
use serde_json::json;

/// A one-layer uncompressed layer tar holding `name` (written raw, so
/// hostile names are possible).
fn layer_tar(name: &str, body: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", body.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

fn config(diff_ids: &[&Digest]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(ToString::to_string).collect::<Vec<_>>()},
    }))
    .expect("json")
}

/// Writes a docker-archive *directory* with the given manifest entry.
fn docker_dir(
    dir: &Path,
    config_bytes: &[u8],
    config_name: Option<&str>,
    layers: &[(&str, &[u8])],
) {
    fs_err::create_dir_all(dir).expect("mkdir");
    let cname = config_name.map_or_else(
        || format!("{}.json", Digest::of_bytes(config_bytes).hex()),
        str::to_owned,
    );
    fs_err::write(dir.join(&cname), config_bytes).expect("config");
    for (name, bytes) in layers {
        // Only relative, `..`-free names are written as fixture files: `dir.join`
        // of an absolute name would write that host path itself (this once
        // overwrote the machine's /etc/passwd, as root).
        let path = Path::new(name);
        if !name.contains("..") && path.is_relative() {
            let p = dir.join(path);
            fs_err::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs_err::write(p, bytes).expect("layer");
        }
    }
    let manifest = json!([{"Config": cname, "RepoTags": ["hostile:1"], "Layers": layers.iter().map(|l| l.0).collect::<Vec<_>>()}]);
    fs_err::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).expect("json"),
    )
    .expect("manifest");
}

fn assert_nothing_loaded(store: &Store) {
    assert!(store.list_images().expect("list").is_empty());
    assert!(store.fsck(true).expect("fsck").is_empty());
    let tmp = store.root().join("tmp");
    assert_eq!(
        fs_err::read_dir(tmp).expect("tmp").count(),
        0,
        "no temp files left"
    );
}

#[test]
fn a_good_hand_made_archive_loads() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("hello.txt", b"hi\n");
    let d = Digest::of_bytes(&layer);
    docker_dir(
        &t.path().join("a"),
        &config(&[&d]),
        None,
        &[("l/layer.tar", &layer)],
    );
    let loaded = archive::load(&store, &t.path().join("a")).expect("load");
    assert_eq!(loaded[0].names[0].short(), "hostile:1");
    let snap = store.snapshot_for(&d).expect("unpack");
    assert_eq!(fs_err::read(snap.join("hello.txt")).expect("file"), b"hi\n");
}

#[test]
fn layer_paths_outside_the_archive_are_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("x", b"x");
    let d = Digest::of_bytes(&layer);
    // A real file right next to the archive directory.
    fs_err::write(t.path().join("outside.tar"), &layer).expect("outside");
    for evil in ["../outside.tar", "/etc/passwd", "./../outside.tar"] {
        let dir = t.path().join(format!("a{}", evil.len()));
        docker_dir(&dir, &config(&[&d]), None, &[(evil, &layer)]);
        let err = archive::load(&store, &dir).expect_err(evil);
        assert!(
            matches!(err, StoreError::ArchiveEntryMissing { ref entry, .. } if entry == evil),
            "{evil}: {err}"
        );
    }
    assert_nothing_loaded(&store);
}

#[test]
fn config_that_does_not_match_its_name_is_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("x", b"x");
    let d = Digest::of_bytes(&layer);
    let wrong = format!("{}.json", Digest::of_bytes(b"something else").hex());
    docker_dir(
        &t.path().join("a"),
        &config(&[&d]),
        Some(&wrong),
        &[("l.tar", &layer)],
    );
    let err = archive::load(&store, &t.path().join("a")).expect_err("mismatch");
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_nothing_loaded(&store);
}

#[test]
fn layer_whose_diff_id_differs_from_the_config_is_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("x", b"x");
    let claimed = Digest::of_bytes(b"another layer");
    docker_dir(
        &t.path().join("a"),
        &config(&[&claimed]),
        None,
        &[("l.tar", &layer)],
    );
    let err = archive::load(&store, &t.path().join("a")).expect_err("mismatch");
    assert!(
        matches!(err, StoreError::DiffIdMismatch { index: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&claimed.to_string()), "{err}");
    assert_nothing_loaded(&store);
    assert!(
        !store.has_blob(&Digest::of_bytes(&layer)),
        "the unverified layer is not stored"
    );
}

#[test]
fn layer_count_mismatch_and_bad_configs_are_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("x", b"x");
    let d = Digest::of_bytes(&layer);
    docker_dir(
        &t.path().join("a"),
        &config(&[&d, &d]),
        None,
        &[("l.tar", &layer)],
    );
    let err = archive::load(&store, &t.path().join("a")).expect_err("count");
    assert!(err.to_string().contains("2 layers"), "{err}");
    let bad_env = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["NOEQUALS"]},
        "rootfs": {"type": "layers", "diff_ids": [d.to_string()]},
    }))
    .expect("json");
    docker_dir(&t.path().join("b"), &bad_env, None, &[("l.tar", &layer)]);
    let err = archive::load(&store, &t.path().join("b")).expect_err("env");
    assert!(err.to_string().contains("NOEQUALS"), "{err}");
    assert_nothing_loaded(&store);
}

#[test]
fn huge_metadata_file_is_refused_without_reading_it() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let dir = t.path().join("a");
    fs_err::create_dir_all(&dir).expect("mkdir");
    let f = fs_err::File::create(dir.join("manifest.json")).expect("create");
    f.set_len(1 << 30).expect("sparse 1 GiB");
    let err = archive::load(&store, &dir).expect_err("huge");
    assert!(
        err.to_string().contains("more than a metadata file may be"),
        "{err}"
    );
    assert_nothing_loaded(&store);
}

#[test]
fn not_an_archive_is_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let junk = t.path().join("junk.tar");
    fs_err::write(&junk, vec![0x5a; 4096]).expect("junk");
    let err = archive::load(&store, &junk).expect_err("junk");
    assert!(matches!(err, StoreError::UnknownFormat { .. }), "{err}");
    let empty = t.path().join("empty");
    fs_err::create_dir_all(&empty).expect("mkdir");
    let err = archive::load(&store, &empty).expect_err("empty dir");
    assert!(err.to_string().contains("neither `manifest.json`"), "{err}");
    assert_nothing_loaded(&store);
}

#[test]
fn oci_manifest_with_wrong_digest_or_foreign_layer_is_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("x", b"x");
    let d = Digest::of_bytes(&layer);
    let cfg = config(&[&d]);
    let make = |dir: &Path, layer_media: &str, lie_about_manifest: bool| {
        let blobs = dir.join("blobs/sha256");
        fs_err::create_dir_all(&blobs).expect("mkdir");
        fs_err::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("layout");
        fs_err::write(blobs.join(d.hex()), &layer).expect("layer");
        let cd = Digest::of_bytes(&cfg);
        fs_err::write(blobs.join(cd.hex()), &cfg).expect("config");
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cfg.len()},
            "layers": [{"mediaType": layer_media, "digest": d.to_string(), "size": layer.len()}],
        }))
        .expect("json");
        let md = Digest::of_bytes(&m);
        fs_err::write(blobs.join(md.hex()), &m).expect("manifest");
        let named = if lie_about_manifest {
            Digest::of_bytes(b"lie")
        } else {
            md
        };
        if lie_about_manifest {
            fs_err::write(blobs.join(named.hex()), &m).expect("manifest under a wrong name");
        }
        let index = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": named.to_string(), "size": m.len(),
            "annotations": {"org.opencontainers.image.ref.name": "oci/hostile:1"}}]});
        fs_err::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("index");
    };
    make(
        &t.path().join("lie"),
        "application/vnd.oci.image.layer.v1.tar",
        true,
    );
    let err = archive::load(&store, &t.path().join("lie")).expect_err("lie");
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    make(
        &t.path().join("foreign"),
        "application/vnd.example.not-a-layer",
        false,
    );
    let err = archive::load(&store, &t.path().join("foreign")).expect_err("foreign");
    assert!(err.to_string().contains("not a layer kiln reads"), "{err}");
    assert_nothing_loaded(&store);
    make(
        &t.path().join("good"),
        "application/vnd.oci.image.layer.v1.tar",
        false,
    );
    let loaded = archive::load(&store, &t.path().join("good")).expect("good");
    assert_eq!(loaded[0].names[0].to_string(), "docker.io/oci/hostile:1");
}

#[test]
fn hostile_layer_loads_as_a_blob_but_never_unpacks_outside() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let layer = layer_tar("../../escaped", b"owned");
    let d = Digest::of_bytes(&layer);
    docker_dir(
        &t.path().join("a"),
        &config(&[&d]),
        None,
        &[("l.tar", &layer)],
    );
    archive::load(&store, &t.path().join("a")).expect("stored as content");
    let err = store.snapshot_for(&d).expect_err("refused");
    assert!(err.to_string().contains(&d.to_string()), "{err}");
    assert!(!t.path().join("escaped").exists() && !t.path().join("root/escaped").exists());
    let snaps: Vec<_> = fs_err::read_dir(store.root().join("snapshots"))
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(snaps.is_empty(), "no snapshot or temp dir left: {snaps:?}");
}

#[test]
fn import_of_a_file_that_is_not_a_tar_is_refused() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(t.path().join("root")).expect("open");
    let junk = t.path().join("rootfs.tar");
    fs_err::write(&junk, vec![0x41; 2048]).expect("junk");
    let err = archive::import_rootfs(&store, &junk, &[], &archive::ImportOptions::default())
        .expect_err("junk");
    assert!(err.to_string().contains("not a tar archive"), "{err}");
    assert!(store.list_images().expect("list").is_empty());
    // A real (gzip-compressed) tarball imports.
    let tarball = t.path().join("ok.tar");
    fs_err::write(&tarball, layer_tar("a.txt", b"a")).expect("tar");
    let gz = t.path().join("ok.tar.gz");
    kiln_cache::compress::compress(
        fs_err::File::open(&tarball).expect("open"),
        fs_err::File::create(&gz).expect("create"),
        kiln_cache::compress::Compression::Gzip,
        1,
    )
    .expect("gzip");
    let image = archive::import_rootfs(&store, &gz, &[], &archive::ImportOptions::default())
        .expect("import");
    assert_eq!(
        image.layers[0].diff_id,
        Digest::of_bytes(&fs_err::read(&tarball).expect("read"))
    );
}
