//! Layers committed as snapshot directories (the build path): hashed without
//! writing a tar, streamed as a tar on demand, verified, collected and
//! checked like blob layers.

use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_cache::{CacheResult, Digest, GcOptions, HashingWriter, Store, StoreError, WriteOptions};

fn upper(store: &Store, name: &str) -> PathBuf {
    let dir = store.root().join("tmp").join(name);
    fs_err::create_dir_all(dir.join("etc/app")).expect("mkdir");
    fs_err::write(dir.join("etc/app/conf"), "a = 1\n").expect("write");
    fs_err::write(dir.join("big"), vec![3u8; 300_000]).expect("write");
    std::os::unix::fs::symlink("big", dir.join("link")).expect("symlink");
    fs_err::hard_link(dir.join("big"), dir.join("big2")).expect("hardlink");
    dir
}

/// A content digest (BLAKE3, see `kiln_cache::content_digest`).
fn sha(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

fn tar_of(dir: &Path, opts: &WriteOptions) -> (Vec<u8>, Digest) {
    let mut w = HashingWriter::new(Vec::new());
    kiln_cache::write_layer(dir, &mut w, opts).expect("write layer");
    let (bytes, digest, _) = w.finish();
    (bytes, digest)
}

#[test]
fn a_snapshot_layer_streams_the_tar_it_was_hashed_as() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let up = upper(&store, "up1");
    let (expected, expected_digest) = tar_of(&up, &WriteOptions::default());

    let layer = store
        .commit_snapshot_from_dir(&up, &WriteOptions::default())
        .expect("commit");
    assert_eq!(layer.diff_id, expected_digest);
    assert_eq!(layer.size, expected.len() as u64);
    assert!(!up.exists(), "the upper became the snapshot");
    assert!(
        !store.has_blob(&layer.diff_id),
        "no tar is written on commit"
    );
    assert!(store.has_layer(&layer.diff_id));
    let snap = store.snapshot_dir(&layer.diff_id).expect("snapshot dir");
    assert_eq!(store.snapshot_for(&layer.diff_id).expect("for"), snap);

    let mut r = store.open_layer(&layer.diff_id).expect("open layer");
    assert_eq!(r.len().expect("len"), layer.size);
    let mut got = Vec::new();
    r.read_to_end(&mut got).expect("read");
    assert_eq!(got, expected, "same bytes as the tar that was hashed");

    // A second identical upper is the same layer: it is dropped.
    let up2 = upper(&store, "up2");
    let again = store
        .commit_snapshot_from_dir(&up2, &WriteOptions::default())
        .expect("commit again");
    assert_eq!(again, layer);
    assert!(!up2.exists());

    // On demand, a blob is made, verified.
    store.ensure_layer_blob(&layer.diff_id).expect("blob");
    assert!(store.has_blob(&layer.diff_id));
    assert_eq!(
        store.read_blob(&layer.diff_id).expect("read blob"),
        expected
    );
}

/// Big files (mapped) between small ones, hashed as mappings handed to the
/// hashing thread while the walk goes on: the same diffID, size and
/// content digests as the tar written byte by byte. With a kept blob (no
/// hand-over: the copy needs the bytes) too.
#[test]
fn big_files_handed_to_the_hasher_hash_as_the_tar_written_in_full() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let make = |name: &str| {
        let dir = store.root().join("tmp").join(name);
        fs_err::create_dir_all(dir.join("d")).expect("mkdir");
        // 16 MiB + 5 bytes: two mappings, the second short.
        let big: Vec<u8> = (0..(16u32 << 20) + 5).map(|i| (i % 251) as u8).collect();
        fs_err::write(dir.join("a.bin"), &big).expect("write");
        for i in 0..40 {
            fs_err::write(dir.join(format!("d/f{i}")), format!("small {i}\n")).expect("write");
        }
        fs_err::write(dir.join("d/m.bin"), &big[..(1 << 20) + 1]).expect("write");
        fs_err::write(dir.join("z"), "last\n").expect("write");
        dir
    };
    // (Times clamped: the two trees are made at different times.)
    let epoch = Some(1_000_000);
    let opts = WriteOptions::default()
        .with_mapped_files()
        .with_content_digests(true)
        .with_source_date_epoch(epoch);
    let up = make("tap1");
    let (expected, expected_digest) =
        tar_of(&up, &WriteOptions::default().with_source_date_epoch(epoch));
    let (layer, _, digests) = store
        .commit_snapshot_reusing(&up, &opts, None)
        .expect("commit");
    assert_eq!(layer.diff_id, expected_digest);
    assert_eq!(layer.size, expected.len() as u64);
    let digests = digests.expect("content digests");
    let big: Vec<u8> = (0..(16u32 << 20) + 5).map(|i| (i % 251) as u8).collect();
    assert_eq!(digests.get(b"a.bin", big.len() as u64), Some(sha(&big)));
    assert_eq!(digests.get(b"d/f7", 8), Some(sha(b"small 7\n")));
    let mut r = store.open_layer(&layer.diff_id).expect("open layer");
    let mut got = Vec::new();
    r.read_to_end(&mut got).expect("read");
    assert_eq!(got, expected);

    // Kept as a blob: written whole, the same layer.
    let up = make("tap2");
    let kept = store
        .commit_snapshot_from_dir(&up, &opts.clone().with_blob_below(Some(64 << 20)))
        .expect("commit kept");
    assert_eq!(kept, layer);
}

#[test]
fn a_tampered_snapshot_is_reported_not_streamed_as_good() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let up = upper(&store, "up");
    let layer = store
        .commit_snapshot_from_dir(&up, &WriteOptions::default())
        .expect("commit");
    let snap = store.snapshot_dir(&layer.diff_id).expect("snapshot");
    fs_err::write(snap.join("etc/app/conf"), "a = 2\n").expect("tamper");

    let mut r = store.open_layer(&layer.diff_id).expect("open");
    let err = r.read_to_end(&mut Vec::new()).expect_err("must not verify");
    let err = r.error(err);
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(store.verify_layer(&layer.diff_id).is_err());
    let err = store
        .ensure_layer_blob(&layer.diff_id)
        .expect_err("no blob from a bad snapshot");
    assert!(err.to_string().contains(layer.diff_id.short()), "{err}");
    assert!(!store.has_blob(&layer.diff_id));

    // fsck --verify names it once an image uses it.
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id.to_string()]},
    });
    let names = [kiln_cache::Reference::parse("t:1").expect("ref")];
    store
        .put_image(
            &names,
            &serde_json::to_vec(&config).expect("json"),
            std::slice::from_ref(&layer),
        )
        .expect("image over a snapshot-only layer");
    assert!(store.fsck(false).expect("fsck").is_empty());
    let problems = store.fsck(true).expect("fsck verify");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].message.contains("layer"), "{problems:?}");
}

#[test]
fn source_date_epoch_is_applied_to_the_snapshot_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let up = upper(&store, "up");
    let opts = WriteOptions::default().with_source_date_epoch(Some(1_000));
    let (expected, digest) = tar_of(&up, &opts);
    let layer = store.commit_snapshot_from_dir(&up, &opts).expect("commit");
    assert_eq!(layer.diff_id, digest);
    let snap = store.snapshot_dir(&layer.diff_id).expect("snapshot");
    let mtime = std::os::unix::fs::MetadataExt::mtime(
        &fs_err::symlink_metadata(snap.join("etc/app/conf")).expect("stat"),
    );
    assert_eq!(mtime, 1_000);
    let mut got = Vec::new();
    store
        .open_layer(&layer.diff_id)
        .expect("open")
        .read_to_end(&mut got)
        .expect("read");
    assert_eq!(got, expected);
}

#[test]
fn gc_keeps_snapshot_layers_that_cache_records_need_and_drops_the_rest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let kept = store
        .commit_snapshot_from_dir(&upper(&store, "a"), &WriteOptions::default())
        .expect("commit a");
    let b = store.root().join("tmp/b");
    fs_err::create_dir_all(&b).expect("mkdir");
    fs_err::write(b.join("only-b"), "b").expect("write");
    let dropped = store
        .commit_snapshot_from_dir(&b, &WriteOptions::default())
        .expect("commit b");
    store
        .put_cache_record(
            "key-a",
            &CacheResult {
                diff_ids: vec![kept.diff_id.clone()],
                config: None,
                extra: serde_json::Value::Null,
            },
        )
        .expect("record");
    assert!(store.get_cache_record("key-a").expect("get").is_some());
    let report = store.gc(GcOptions::default()).expect("gc");
    assert_eq!(report.snapshots, 1, "{report:?}");
    // What the snapshot held counts in what was freed: its layer's size.
    assert_eq!(report.snapshot_bytes, dropped.size, "{report:?}");
    assert!(store.has_layer(&kept.diff_id));
    assert!(!store.has_layer(&dropped.diff_id));
    // `prune --all` drops the cache record, and with it the layer.
    store
        .gc(GcOptions {
            all: true,
            dry_run: false,
            ..GcOptions::default()
        })
        .expect("gc all");
    assert!(!store.has_layer(&kept.diff_id));
    assert!(store.get_cache_record("key-a").expect("get").is_none());
}

/// A small layer committed with `keep_blob_below` keeps its tar as a blob,
/// and its snapshot may then be taken over, but only when nothing can miss
/// it: without a blob, while a build uses it, while a container leases it.
/// Taken, the layer reads back whole from the blob and unpacks again.
#[test]
fn a_snapshot_is_taken_over_only_when_nothing_can_miss_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let dest = |n: &str| store.root().join("tmp").join(n);

    // Over the limit: no blob, nothing to take.
    let up = upper(&store, "big");
    let (expected, _) = tar_of(&up, &WriteOptions::default());
    let limit = expected.len() as u64;
    let big = store
        .commit_snapshot_from_dir(&up, &WriteOptions::default().with_blob_below(Some(limit)))
        .expect("commit");
    assert!(
        !store.has_blob(&big.diff_id),
        "a tar at the limit is not kept"
    );
    assert!(
        !store
            .take_snapshot(&big.diff_id, &dest("t0"))
            .expect("take")
    );
    assert!(store.snapshot_dir(&big.diff_id).is_some());

    // Under it: the tar is kept, packed (zstd) into a blob of its own.
    let up = upper(&store, "small");
    fs_err::write(up.join("extra"), "x").expect("write");
    let (expected, digest) = tar_of(&up, &WriteOptions::default());
    let small = store
        .commit_snapshot_from_dir(
            &up,
            &WriteOptions::default().with_blob_below(Some(expected.len() as u64 + 1)),
        )
        .expect("commit");
    assert_eq!(small.diff_id, digest);
    assert!(!store.has_blob(&digest), "not kept as a plain blob");
    assert!(store.has_layer_tar(&digest).expect("layer tar"));
    let packed = store.packed_layer(&digest).expect("packed").expect("blob");
    let packed_bytes = store.read_blob(&packed).expect("packed blob");
    assert!(packed_bytes.len() < expected.len() / 4, "compressed");
    assert_eq!(
        zstd::decode_all(packed_bytes.as_slice()).expect("zstd"),
        expected
    );
    let snap = store.snapshot_dir(&digest).expect("snapshot");

    // In use by a build: not taken (the lock is per open file, so this
    // process's own use counts too).
    let (dir, used) = store.use_snapshot(&digest).expect("use");
    assert_eq!(dir, snap);
    assert!(!store.take_snapshot(&digest, &dest("t1")).expect("take"));
    drop(used);

    // Leased by a container: not taken.
    let rec = kiln_cache::ContainerRecord::created(
        "c".repeat(64),
        "holder".to_owned(),
        "sha256:0".to_owned(),
        "x".to_owned(),
        "{}".to_owned(),
        0,
    );
    store
        .create_container(&rec, &[(kiln_cache::LeaseKind::Layer, digest.to_string())])
        .expect("container");
    assert!(!store.take_snapshot(&digest, &dest("t2")).expect("take"));
    store.remove_container(&rec.id).expect("remove container");

    // Free: taken, whole; the layer is blob-only, reads back as before, and
    // unpacks again on demand; the store checks clean.
    let taken = dest("t3");
    assert!(store.take_snapshot(&digest, &taken).expect("take"));
    assert!(!snap.exists());
    assert!(taken.join("etc/app/conf").is_file());
    assert_eq!(tar_of(&taken, &WriteOptions::default()).1, digest);
    assert!(store.has_layer(&digest));
    assert!(store.snapshot_dir(&digest).is_none());
    store.verify_layer(&digest).expect("verify");
    let mut tar = Vec::new();
    store
        .open_layer(&digest)
        .expect("open")
        .read_to_end(&mut tar)
        .expect("read");
    assert_eq!(tar, expected, "the layer reads back from its packed blob");
    assert_eq!(
        store.layer_size(&digest).expect("size"),
        Some(tar.len() as u64)
    );
    assert!(store.fsck(true).expect("fsck").is_empty());
    assert_eq!(store.snapshot_for(&digest).expect("unpack"), snap);
    assert_eq!(tar_of(&snap, &WriteOptions::default()).1, digest);
    // Onto a destination that exists: an error, and the snapshot stays.
    assert!(store.take_snapshot(&digest, &taken).is_err());
    assert!(snap.join("etc/app/conf").is_file());
    assert!(store.fsck(true).expect("fsck").is_empty());
}

/// A layer whose only copy is its packed blob (its snapshot taken over):
/// GC keeps the packed blob while the layer is live and drops it with the
/// layer; a packed blob that does not unpack to the diffID is refused when
/// read, unpacked or checked, and leaves no snapshot behind.
#[test]
fn a_packed_layer_is_kept_by_gc_and_refused_when_it_does_not_match() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path().join("root")).expect("open");
    let dest = |n: &str| store.root().join("tmp").join(n);
    let up = upper(&store, "p");
    let (expected, _) = tar_of(&up, &WriteOptions::default());
    let layer = store
        .commit_snapshot_from_dir(&up, &WriteOptions::default().with_blob_below(Some(1 << 20)))
        .expect("commit");
    assert!(
        store
            .take_snapshot(&layer.diff_id, &dest("t"))
            .expect("take")
    );
    let packed = store
        .packed_layer(&layer.diff_id)
        .expect("packed")
        .expect("blob");
    store
        .put_cache_record(
            "key-p",
            &CacheResult {
                diff_ids: vec![layer.diff_id.clone()],
                config: None,
                extra: serde_json::Value::Null,
            },
        )
        .expect("record");
    store.gc(GcOptions::default()).expect("gc");
    assert!(store.has_blob(&packed), "a live layer's packed blob stays");
    assert!(store.has_layer(&layer.diff_id));
    store.verify_layer(&layer.diff_id).expect("verify");

    // Swap in a packed blob of another tar (a good blob, the wrong layer).
    let mut other = expected.clone();
    let at = other
        .windows(6)
        .position(|w| w == b"a = 1\n")
        .expect("file content in the tar");
    other[at + 4] = b'9';
    let bad = store
        .put_blob_bytes(&zstd::encode_all(other.as_slice(), 1).expect("zstd"))
        .expect("blob");
    fs_err::remove_file(store.blob_path(&packed)).expect("remove");
    store
        .record_compressed_layer(
            &layer.diff_id,
            &bad,
            kiln_cache::MEDIA_LAYER_ZSTD,
            other.len() as u64,
        )
        .expect("record");
    assert_eq!(
        store.packed_layer(&layer.diff_id).expect("packed"),
        Some(bad.clone())
    );
    let mut r = store.open_layer(&layer.diff_id).expect("open");
    let err = r.read_to_end(&mut Vec::new()).expect_err("must not verify");
    let err = r.error(err);
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let err = store
        .snapshot_for(&layer.diff_id)
        .expect_err("no snapshot from a bad packed blob");
    let chain: Vec<String> =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect();
    let chain = chain.join(": ");
    assert!(chain.contains(layer.diff_id.short()), "{chain}");
    assert!(chain.contains("corrupt"), "{chain}");
    assert!(store.snapshot_dir(&layer.diff_id).is_none());
    let left: Vec<_> = fs_err::read_dir(store.root().join("snapshots"))
        .expect("snapshots")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "nothing half-unpacked: {left:?}");
    let problems = store.fsck(true).expect("fsck");
    assert!(problems.is_empty(), "no image uses it yet: {problems:?}");

    // `prune --all` drops the layer and its packed blob.
    store
        .gc(GcOptions {
            all: true,
            dry_run: false,
            ..GcOptions::default()
        })
        .expect("gc all");
    assert!(!store.has_blob(&bad));
    assert!(!store.has_layer(&layer.diff_id));
}
