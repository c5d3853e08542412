//! The store's public API against a real SQLite database and real files.

use std::io::{Read, Write};
use std::path::Path;

use kiln_cache::archive::{self, ArchiveFormat, ImportOptions, SaveItem, SaveOptions};
use kiln_cache::compress::Compression;
use kiln_cache::{CacheResult, Digest, GcOptions, Reference, Store, StoreError};

fn tree(dir: &Path, seed: &str) {
    if dir.exists() {
        return;
    }
    fs_err::create_dir_all(dir.join("etc")).expect("mkdir");
    fs_err::create_dir_all(dir.join("bin")).expect("mkdir");
    fs_err::write(dir.join("etc/hostname"), format!("host-{seed}\n")).expect("write");
    fs_err::write(dir.join("bin/tool"), vec![7u8; 100_000]).expect("write");
    std::os::unix::fs::symlink("tool", dir.join("bin/alias")).expect("symlink");
}

fn import(store: &Store, tmp: &Path, seed: &str, name: &str) -> kiln_cache::Image {
    let src = tmp.join(format!("src-{seed}"));
    tree(&src, seed);
    let names = [Reference::parse(name).expect("name")];
    archive::import_rootfs(store, &src, &names, &ImportOptions::default()).expect("import")
}

/// The store at `root` left nothing in its `tmp/`.
fn assert_tmp_empty(root: &Path) {
    let left: Vec<_> = fs_err::read_dir(root.join("tmp"))
        .expect("tmp")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in tmp/: {left:?}");
}

#[test]
fn blobs_are_content_addressed_and_verified() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let d = store.put_blob_bytes(b"hello").expect("put");
    assert_eq!(d, Digest::of_bytes(b"hello"));
    assert_eq!(
        store.put_blob_bytes(b"hello").expect("again"),
        d,
        "idempotent"
    );
    assert_eq!(store.read_blob(&d).expect("read"), b"hello");

    // A wrong expected digest stores nothing.
    let other = Digest::of_bytes(b"other");
    let err = store
        .put_blob_from_reader(&b"not other"[..], Some(&other))
        .expect_err("mismatch");
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!store.has_blob(&Digest::of_bytes(b"not other")));

    // No temp files left behind by either.
    assert_tmp_empty(&tmp.path().join("root"));
}

/// An image's config and manifest are stored together: each written once
/// (one already there, or given twice, is not written again), readable and
/// verified, and nothing is left in `tmp/`.
#[test]
fn small_blobs_are_stored_together() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let old = store.put_blob_bytes(b"already here").expect("put");
    let blobs: [&[u8]; 4] = [b"config", b"already here", b"manifest", b"config"];
    let digests = store.put_small_blobs(&blobs).expect("put together");
    assert_eq!(
        digests,
        blobs
            .iter()
            .map(|b| Digest::of_bytes(b))
            .collect::<Vec<_>>()
    );
    assert_eq!(digests[1], old);
    for (d, b) in digests.iter().zip(blobs) {
        assert_eq!(store.read_blob(d).expect("read"), b);
        store.verify_blob(d).expect("verify");
    }
    assert_tmp_empty(&tmp.path().join("root"));
}

#[test]
fn big_blob_goes_through_the_background_syncer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let len = (70u64 << 20) + 17; // more than two 32 MiB sync intervals
    let mut expected = kiln_cache::Hasher::new();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        expected.update(&chunk[..n]);
        left -= n as u64;
    }
    let expected = expected.finish();
    let (d, n) = store
        .put_blob_from_reader(std::io::repeat(0xa5).take(len), Some(&expected))
        .expect("put");
    assert_eq!((d, n), (expected.clone(), len));
    store.verify_blob(&expected).expect("verified");
    assert_tmp_empty(&tmp.path().join("root"));
}

#[test]
fn corrupted_blob_is_detected_reported_and_never_used() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let image = import(&store, tmp.path(), "a", "app:1");
    let layer = image.layers[0].diff_id.clone();
    let path = store.blob_path(&layer);
    let mut bytes = fs_err::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs_err::write(&path, &bytes).expect("corrupt it");

    // Reading it fails with an error naming the digest.
    let err = store.verify_blob(&layer).expect_err("corrupt");
    assert!(
        matches!(err, StoreError::Corrupt { ref digest, .. } if *digest == layer.to_string()),
        "{err}"
    );
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    // It was moved aside: from now on it is absent, and fsck says so.
    assert!(!store.has_blob(&layer));
    let problems = store.fsck(true).expect("fsck");
    assert!(
        problems.iter().any(|p| p.message.contains("missing")),
        "{problems:?}"
    );

    // Saving the image fails instead of exporting bad bytes.
    let item = SaveItem {
        names: image.names.clone(),
        image: image.clone(),
    };
    let mut out = Vec::new();
    assert!(archive::save(&store, &[item], &mut out, &SaveOptions::default()).is_err());

    // Importing the same tree again heals the store.
    import(&store, tmp.path(), "a", "app:1");
    assert!(store.fsck(true).expect("fsck").is_empty());
}

#[test]
fn corrupt_blob_inside_a_snapshot_unpack_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let image = import(&store, tmp.path(), "s", "snap:1");
    let layer = image.layers[0].diff_id.clone();
    // Corrupt the tail padding only: the tar still applies, but the digest
    // check at the end must refuse the snapshot.
    let path = store.blob_path(&layer);
    let mut f = fs_err::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    f.write_all(&[0u8; 512]).expect("append");
    drop(f);
    let err = store.snapshot_for(&layer).expect_err("corrupt");
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert!(
        !tmp.path()
            .join("root/snapshots")
            .join(format!("v1-{}", layer.hex()))
            .exists()
    );
}

#[test]
fn names_resolve_tag_and_remove_like_docker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let a = import(&store, tmp.path(), "a", "busybox");
    assert_eq!(a.names[0].to_string(), "docker.io/library/busybox:latest");
    for name in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox",
        &a.id.to_string(),
        a.id.short(),
        &a.id.hex()[..5],
    ] {
        assert_eq!(store.resolve(name).expect(name).id, a.id, "{name}");
    }
    assert!(matches!(
        store.resolve("nope"),
        Err(StoreError::NoSuchImage { .. })
    ));

    store
        .tag("busybox", &Reference::parse("me/box:v2").expect("ref"))
        .expect("tag");
    assert_eq!(store.resolve("me/box:v2").expect("tagged").names.len(), 2);
    // By id with two names: refused without force.
    let err = store.remove(a.id.short(), false).expect_err("in use");
    assert!(matches!(err, StoreError::ImageInUse { .. }), "{err}");
    // By name: untag only, the image stays.
    let r = store.remove("busybox", false).expect("untag");
    assert_eq!(r.untagged.len(), 1);
    assert!(r.deleted.is_empty());
    // Last name: the image goes.
    let r = store.remove("me/box:v2", false).expect("rm");
    assert_eq!(r.deleted, vec![a.id.clone()]);
    assert!(store.list_images().expect("list").is_empty());
    assert!(store.fsck(true).expect("fsck").is_empty());
    // Its blobs are still there until GC.
    assert!(store.has_blob(&a.layers[0].diff_id));
    let report = store.gc(GcOptions::default()).expect("gc");
    assert!(report.blobs >= 3, "manifest, config, layer: {report:?}");
    assert!(!store.has_blob(&a.layers[0].diff_id));
    assert!(store.fsck(true).expect("fsck").is_empty());
}

#[test]
fn registry_digests_name_images_like_docker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let a = import(&store, tmp.path(), "a", "busybox");
    let b = import(&store, tmp.path(), "b", "other");
    let d = Digest::of_bytes(b"a manifest");
    let name = kiln_cache::digest_name(&format!("busybox@{d}")).expect("digest name");
    assert_eq!(name, format!("docker.io/library/busybox@{d}"));
    store.add_repo_digest(&name, &a.id).expect("record");
    // Every spelling docker accepts finds it; a tag beside the digest is
    // ignored; another repository or digest does not.
    for r in [
        format!("busybox@{d}"),
        format!("docker.io/library/busybox@{d}"),
        format!("busybox:whatever@{d}"),
    ] {
        assert_eq!(store.resolve(&r).expect(&r).id, a.id, "{r}");
    }
    for r in [
        format!("other@{d}"),
        format!("busybox@{}", Digest::of_bytes(b"another manifest")),
    ] {
        assert!(
            matches!(store.resolve(&r), Err(StoreError::NoSuchImage { .. })),
            "{r}"
        );
    }
    let err = store
        .resolve("busybox@sha256:abc")
        .expect_err("short digest");
    assert!(
        matches!(err, StoreError::InvalidReference { .. }) && err.to_string().contains("64"),
        "{err}"
    );
    assert_eq!(
        store.resolve("busybox").expect("tag").repo_digests,
        vec![name.clone()]
    );
    // Recording a digest for an image that is not there fails.
    assert!(
        store
            .add_repo_digest(&name, &Digest::of_bytes(b"none"))
            .is_err()
    );

    // As docker: removing the last tag takes the image, digests and all.
    let r = store.remove("busybox", false).expect("untag");
    assert_eq!(r.deleted, vec![a.id.clone()]);
    assert_eq!(r.untagged_digests, vec![name.clone()]);
    assert!(store.resolve(&format!("busybox@{d}")).is_err());

    // An image with a digest and no tag (what a pull by digest leaves) is
    // not dangling: GC keeps it, and collects a truly untagged one.
    let untagged = |seed: &str| {
        let src = tmp.path().join(format!("src-{seed}"));
        tree(&src, seed);
        archive::import_rootfs(&store, &src, &[], &ImportOptions::default()).expect("import")
    };
    let pinned = untagged("p");
    let dangling = untagged("x");
    let pinned_name = kiln_cache::digest_name(&format!("pinned@{d}")).expect("name");
    store
        .add_repo_digest(&pinned_name, &pinned.id)
        .expect("record");
    let report = store.gc(GcOptions::default()).expect("gc");
    assert_eq!(report.images, vec![dangling.id.clone()]);
    assert_eq!(
        store.resolve(&format!("pinned@{d}")).expect("kept").id,
        pinned.id
    );
    // `rmi name@digest` drops the digest, and the image with its last name.
    let r = store.remove(&format!("pinned@{d}"), false).expect("rmi");
    assert_eq!(r.untagged_digests, vec![pinned_name]);
    assert_eq!(r.deleted, vec![pinned.id.clone()]);
    let err = store
        .remove(&format!("pinned@{d}"), false)
        .expect_err("gone");
    assert!(matches!(err, StoreError::NoSuchImage { .. }), "{err}");
    // One digest of several goes; the image stays while it has a name.
    let other = kiln_cache::digest_name(&format!("other@{d}")).expect("name");
    let other2 = kiln_cache::digest_name(&format!("other2@{d}")).expect("name");
    store.add_repo_digest(&other, &b.id).expect("record");
    store.add_repo_digest(&other2, &b.id).expect("record");
    let r = store.remove(&format!("other@{d}"), false).expect("rmi");
    assert!(r.deleted.is_empty(), "{r:?}");
    assert_eq!(
        store.resolve(&format!("other2@{d}")).expect("left").id,
        b.id
    );
    let r = store.remove("other", false).expect("rmi");
    assert_eq!(
        (r.deleted, r.untagged_digests),
        (vec![b.id.clone()], vec![other2])
    );
    assert!(store.fsck(true).expect("fsck").is_empty());
}

#[test]
fn gc_keeps_what_names_and_cache_records_need() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let kept = import(&store, tmp.path(), "k", "kept");
    let cached = import(&store, tmp.path(), "c", "cached");
    let gone = import(&store, tmp.path(), "g", "gone");
    store
        .put_cache_record(
            "key-1",
            &CacheResult {
                diff_ids: vec![cached.layers[0].diff_id.clone()],
                config: None,
                extra: serde_json::json!({"step": 3}),
            },
        )
        .expect("record");
    store.remove("cached", false).expect("rm");
    store.remove("gone", false).expect("rm");
    fs_err::write(tmp.path().join("root/tmp/stale"), b"x").expect("stale temp");
    // A scratch tree left in a lane: it goes, the lane stays.
    let lane = store.scratch_parent().to_path_buf();
    fs_err::create_dir_all(lane.join("run-x/upper")).expect("scratch in a lane");
    let dry = store
        .gc(GcOptions {
            all: false,
            dry_run: true,
            ..GcOptions::default()
        })
        .expect("dry");
    assert!(
        store.has_blob(&gone.layers[0].diff_id),
        "dry run changes nothing"
    );
    let report = store.gc(GcOptions::default()).expect("gc");
    assert_eq!(report.blobs, dry.blobs);
    assert_eq!(report.temp_files, 2);
    assert!(lane.is_dir(), "lanes stay");
    assert_eq!(fs_err::read_dir(&lane).expect("lane").count(), 0);
    let left: Vec<_> = fs_err::read_dir(tmp.path().join("root/tmp"))
        .expect("tmp")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.iter().all(|n| kiln_cache::is_lane(n)), "{left:?}");
    assert!(store.has_blob(&kept.layers[0].diff_id));
    assert!(
        store.has_blob(&cached.layers[0].diff_id),
        "a cache record needs it"
    );
    assert!(!store.has_blob(&gone.layers[0].diff_id));
    let rec = store
        .get_cache_record("key-1")
        .expect("get")
        .expect("present");
    assert_eq!(rec.extra["step"], 3);
    assert!(store.get_cache_record("key-2").expect("get").is_none());

    let all = store
        .gc(GcOptions {
            all: true,
            dry_run: false,
            ..GcOptions::default()
        })
        .expect("gc all");
    assert!(all.images.is_empty(), "named images survive prune --all");
    assert_eq!(all.cache_records, 1);
    assert!(store.get_cache_record("key-1").expect("get").is_none());
    assert!(store.has_blob(&kept.layers[0].diff_id), "a name needs it");
    assert!(
        !store.has_blob(&cached.layers[0].diff_id),
        "only the dropped cache record needed it"
    );
    assert!(store.fsck(true).expect("fsck").is_empty());
}

#[test]
fn save_and_load_round_trip_between_stores() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = Store::open(tmp.path().join("a")).expect("open");
    let b = Store::open(tmp.path().join("b")).expect("open");
    let image = import(&a, tmp.path(), "rt", "rt:1");
    for (format, compression) in [
        (ArchiveFormat::Docker, Compression::None),
        (ArchiveFormat::Docker, Compression::Gzip),
        (ArchiveFormat::Oci, Compression::Gzip),
        (ArchiveFormat::Oci, Compression::Zstd),
        (ArchiveFormat::Oci, Compression::None),
    ] {
        let file = tmp.path().join(format!("{format:?}-{compression}.tar"));
        let opts = SaveOptions {
            format,
            compression,
            threads: 2,
        };
        let item = SaveItem {
            names: image.names.clone(),
            image: image.clone(),
        };
        archive::save(
            &a,
            &[item],
            fs_err::File::create(&file).expect("create"),
            &opts,
        )
        .expect("save");
        let loaded = archive::load(&b, &file).expect("load");
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            loaded[0].id, image.id,
            "{format:?} {compression}: same config, same id"
        );
        assert_eq!(loaded[0].names, image.names, "{format:?} {compression}");
        b.remove("rt:1", false).expect("rm");
        b.gc(GcOptions::default()).expect("gc");
    }
}

#[test]
fn second_compressed_save_reuses_the_compressed_blob() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let image = import(&store, tmp.path(), "z", "z:1");
    let save = || {
        let mut out = Vec::new();
        let opts = SaveOptions {
            format: ArchiveFormat::Oci,
            compression: Compression::Gzip,
            threads: 2,
        };
        let item = SaveItem {
            names: image.names.clone(),
            image: image.clone(),
        };
        archive::save(&store, &[item], &mut out, &opts).expect("save");
        out
    };
    let first = save();
    let blobs = fs_err::read_dir(tmp.path().join("root/blobs/sha256"))
        .expect("dir")
        .count();
    let compressed = store
        .compressed_layer(&image.layers[0].diff_id, kiln_cache::MEDIA_LAYER_GZIP)
        .expect("lookup")
        .expect("remembered");
    assert_ne!(compressed.0, image.layers[0].diff_id);
    let second = save();
    assert_eq!(first, second, "same bytes");
    assert_eq!(
        fs_err::read_dir(tmp.path().join("root/blobs/sha256"))
            .expect("dir")
            .count(),
        blobs
    );
}

#[test]
fn snapshot_is_unpacked_once_by_concurrent_callers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let image = import(&store, tmp.path(), "snap", "snap:1");
    let diff_id = image.layers[0].diff_id.clone();
    let dirs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| store.snapshot_for(&diff_id)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("snapshot"))
            .collect()
    });
    assert!(dirs.windows(2).all(|w| w[0] == w[1]));
    let dir = &dirs[0];
    assert_eq!(
        fs_err::read_to_string(dir.join("etc/hostname")).expect("file"),
        "host-snap\n"
    );
    assert_eq!(
        fs_err::read_link(dir.join("bin/alias")).expect("link"),
        Path::new("tool")
    );
    let leftovers = fs_err::read_dir(tmp.path().join("root/snapshots"))
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0);
    assert!(store.fsck(false).expect("fsck").is_empty());
}

#[test]
fn newer_schema_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("root");
    drop(Store::open(&root).expect("create"));
    rusqlite_set_version(&root.join("meta.db"), 99);
    let err = Store::open(&root).expect_err("too new");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

/// `keep_bytes` (`prune --keep-storage`): the least recently used cache
/// records go until the layers only cache records need fit; a layer a named
/// image has does not count, and a dry run only reports.
#[test]
fn gc_keep_bytes_drops_the_least_recently_used_records() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("root");
    let store = Store::open(&root).expect("open");
    let named = import(&store, tmp.path(), "n", "named");
    let imgs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|s| import(&store, tmp.path(), s, &format!("img-{s}")))
        .collect();
    let record = |key: &str, layers: Vec<Digest>| {
        store
            .put_cache_record(
                key,
                &CacheResult {
                    diff_ids: layers,
                    config: None,
                    extra: serde_json::Value::Null,
                },
            )
            .expect("record");
    };
    let layer = |i: &kiln_cache::Image| i.layers[0].diff_id.clone();
    record("old", vec![layer(&imgs[0])]);
    record("mid", vec![layer(&imgs[1]), layer(&named)]);
    record("new", vec![layer(&imgs[2])]);
    for s in ["a", "b", "c"] {
        store.remove(&format!("img-{s}"), false).expect("rm");
    }
    {
        let conn = rusqlite::Connection::open(root.join("meta.db")).expect("db");
        for (key, t) in [("old", 100), ("mid", 200), ("new", 300)] {
            conn.execute(
                "UPDATE cache_records SET last_used = ?1 WHERE key = ?2",
                rusqlite::params![t, key],
            )
            .expect("age");
        }
    }
    let size = |i: &kiln_cache::Image| {
        store
            .layer_size(&layer(i))
            .expect("size")
            .expect("recorded")
    };
    // "old" and "mid" must go to fit; "new" alone fits. (Peeking at the
    // records does not count as a use.)
    let keep = size(&imgs[1]) + size(&imgs[2]) - 1;
    let opts = GcOptions {
        keep_bytes: Some(keep),
        ..GcOptions::default()
    };
    let dry = store
        .gc(GcOptions {
            dry_run: true,
            ..opts
        })
        .expect("dry");
    assert_eq!(dry.cache_records, 2);
    assert!(store.peek_cache_record("old").expect("get").is_some());
    let report = store.gc(opts).expect("gc");
    assert_eq!(report.cache_records, 2);
    assert!(store.peek_cache_record("old").expect("get").is_none());
    assert!(store.peek_cache_record("mid").expect("get").is_none());
    assert!(store.peek_cache_record("new").expect("get").is_some());
    assert!(!store.has_blob(&layer(&imgs[0])));
    assert!(!store.has_blob(&layer(&imgs[1])));
    assert!(store.has_blob(&layer(&imgs[2])));
    assert!(
        store.has_blob(&layer(&named)),
        "a named image's layer stays"
    );
    // Within the limit: nothing more goes.
    let again = store.gc(opts).expect("gc");
    assert_eq!(again.cache_records, 0);
    assert!(store.fsck(true).expect("fsck").is_empty());
}

#[test]
fn a_version_2_store_gains_the_digest_table() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("root");
    let store = Store::open(&root).expect("create");
    let a = import(&store, tmp.path(), "a", "busybox");
    drop(store);
    {
        // What a kiln of schema 2 left.
        let conn = rusqlite::Connection::open(root.join("meta.db")).expect("db");
        conn.execute_batch("DROP TABLE repo_digests; PRAGMA user_version = 2;")
            .expect("downgrade");
    }
    let store = Store::open(&root).expect("migrate");
    let name = kiln_cache::digest_name(&format!("busybox@{}", Digest::of_bytes(b"m"))).expect("n");
    store
        .add_repo_digest(&name, &a.id)
        .expect("the table is there");
    assert_eq!(
        store.resolve("busybox").expect("kept").repo_digests,
        vec![name]
    );
}

fn rusqlite_set_version(db: &Path, v: u32) {
    // Simulate a newer kiln writing its schema version.
    let conn = rusqlite::Connection::open(db).expect("db");
    conn.pragma_update(None, "user_version", v)
        .expect("set user_version");
}
