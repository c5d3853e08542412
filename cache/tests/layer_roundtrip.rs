//! write_layer → apply_layer round trips, determinism, and the tar format details.

mod layer_common;

use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use kiln_cache::layer::{ApplyOptions, WhiteoutMode, WriteOptions, apply_layer, write_layer};
use layer_common::{snapshot, tar_names};
use proptest::prelude::*;

fn write(dir: &Path, opts: &WriteOptions) -> Vec<u8> {
    let mut out = Vec::new();
    let stats = write_layer(dir, &mut out, opts).expect("write_layer");
    assert_eq!(stats.bytes, out.len() as u64, "stats.bytes is the tar size");
    out
}

fn apply(tar: &[u8], dest: &Path) {
    let stats = apply_layer(tar, dest, &ApplyOptions::default()).expect("apply_layer");
    assert_eq!(
        stats.bytes,
        tar.len() as u64,
        "apply consumes the whole stream"
    );
}

fn set_mtime(path: &Path, secs: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

/// A tree with one of every kind kiln carries.
fn rich_tree(root: &Path) {
    let d = root.join("dir/sub");
    fs_err::create_dir_all(&d).unwrap();
    fs_err::write(d.join("file.txt"), b"hello\n").unwrap();
    fs_err::write(root.join("a.txt"), vec![7u8; 70_000]).unwrap();
    fs_err::write(root.join("empty"), b"").unwrap();
    let exe = root.join("dir/setuid");
    fs_err::write(&exe, b"#!/bin/sh\n").unwrap();
    fs_err::set_permissions(&exe, std::fs::Permissions::from_mode(0o4755)).unwrap();
    symlink("sub/file.txt", root.join("dir/rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    fs_err::hard_link(root.join("a.txt"), root.join("dir/hard-a")).unwrap();
    // A name longer than 100 bytes needs a pax header.
    let long = "l".repeat(150);
    fs_err::write(root.join("dir").join(&long), b"long").unwrap();
    symlink("x".repeat(200), root.join("long-target")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let ro = root.join("read-only-dir");
    fs_err::create_dir(&ro).unwrap();
    fs_err::write(ro.join("inside"), b"x").unwrap();
    fs_err::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    xattr::set(root.join("a.txt"), "user.kiln.test", b"value").unwrap();
    if nix::unistd::geteuid().is_root() {
        nix::sys::stat::mknod(
            &root.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        nix::unistd::chown(
            &root.join("a.txt"),
            Some(nix::unistd::Uid::from_raw(1234)),
            Some(nix::unistd::Gid::from_raw(5678)),
        )
        .unwrap();
        // security.capability (cap_net_bind_service=ep, v2 format).
        let cap: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        xattr::set(&exe, "security.capability", &cap).unwrap();
    }
    for (i, p) in ["a.txt", "dir/sub/file.txt", "dir/sub", "dir", "empty"]
        .iter()
        .enumerate()
    {
        set_mtime(&root.join(p), 1_600_000_000 + i as i64);
    }
}

#[test]
fn rich_tree_round_trips_and_rewrites_identically() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let tar = write(src.path(), &WriteOptions::default());
    assert_eq!(
        tar,
        write(src.path(), &WriteOptions::default()),
        "same tree, same bytes"
    );

    let dst = tempfile::tempdir().unwrap();
    apply(&tar, dst.path());
    assert_eq!(snapshot(src.path()), snapshot(dst.path()));
    // Writing the applied tree gives the very same bytes.
    assert_eq!(tar, write(dst.path(), &WriteOptions::default()));
}

#[test]
fn entries_are_sorted_with_directories_first_and_links_after_targets() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let names = tar_names(&write(src.path(), &WriteOptions::default()));
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} in {names:?}"))
    };
    assert!(pos("dir/") < pos("dir/sub/"));
    assert!(pos("dir/sub/") < pos("dir/sub/file.txt"));
    assert!(pos("a.txt") < pos("dir/hard-a"));
    assert!(
        pos("a.txt") < pos("abs-link"),
        "siblings sorted by name bytes"
    );
    assert!(
        names
            .iter()
            .any(|n| n == &format!("dir/{}", "l".repeat(150))),
        "pax path read back"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("./") || n.starts_with('/'))
    );
}

#[test]
fn hardlinks_become_link_entries_and_are_restored_as_links() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let tar = write(src.path(), &WriteOptions::default());
    let mut a = tar::Archive::new(&tar[..]);
    let link = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path_bytes().as_ref() == b"dir/hard-a")
        .expect("hard-a entry");
    assert_eq!(link.header().entry_type(), tar::EntryType::Link);
    assert_eq!(link.link_name_bytes().as_deref(), Some(&b"a.txt"[..]));

    let dst = tempfile::tempdir().unwrap();
    apply(&tar, dst.path());
    use std::os::unix::fs::MetadataExt;
    let a = fs_err::metadata(dst.path().join("a.txt")).unwrap();
    let b = fs_err::metadata(dst.path().join("dir/hard-a")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
}

#[test]
fn source_date_epoch_clamps_mtimes_and_only_newer_ones() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let epoch = 1_600_000_002;
    let tar = write(
        src.path(),
        &WriteOptions::default().with_source_date_epoch(Some(epoch)),
    );
    let mut a = tar::Archive::new(&tar[..]);
    let mut saw_old = false;
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        let m = e.header().mtime().unwrap() as i64;
        assert!(m <= epoch, "{:?} has mtime {m}", e.path());
        saw_old |= m < epoch;
    }
    assert!(saw_old, "mtimes older than the epoch are kept");
}

#[test]
fn no_pax_header_for_short_plain_entries_and_no_user_names() {
    let src = tempfile::tempdir().unwrap();
    fs_err::write(src.path().join("plain"), b"x").unwrap();
    let tar = write(src.path(), &WriteOptions::default());
    // one header + one data block + two end blocks
    assert_eq!(tar.len(), 4 * 512);
    assert_eq!(&tar[..6], b"plain\0");
    assert_eq!(&tar[257..263], b"ustar\0");
    assert!(tar[265..329].iter().all(|&b| b == 0), "uname/gname empty");
}

#[test]
fn gnu_tar_lists_and_extracts_the_layer() {
    if !layer_common::require_tool("gnu_tar_lists_and_extracts_the_layer", "tar") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let tar = write(src.path(), &WriteOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    fs_err::write(&file, &tar).unwrap();
    let out = dir.path().join("x");
    fs_err::create_dir(&out).unwrap();
    let status = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--same-owner", "-xpf"])
        .arg(&file)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let mut want = snapshot(src.path());
    let mut got = snapshot(&out);
    // GNU tar applies directory times too; compare everything but user xattrs' order.
    for n in want.values_mut().chain(got.values_mut()) {
        n.xattrs.retain(|(k, _)| k.starts_with("user."));
    }
    assert_eq!(want, got);
}

#[test]
fn apply_onto_existing_tree_replaces_kinds() {
    let dst = tempfile::tempdir().unwrap();
    fs_err::create_dir_all(dst.path().join("was-dir/child")).unwrap();
    fs_err::write(dst.path().join("was-file"), b"old").unwrap();
    let src = tempfile::tempdir().unwrap();
    fs_err::write(src.path().join("was-dir"), b"now a file").unwrap();
    fs_err::create_dir(src.path().join("was-file")).unwrap();
    let tar = write(src.path(), &WriteOptions::default());
    apply(&tar, dst.path());
    assert_eq!(
        fs_err::read(dst.path().join("was-dir")).unwrap(),
        b"now a file"
    );
    assert!(dst.path().join("was-file").is_dir());
}

#[test]
fn remove_mode_applies_whiteouts_by_deleting() {
    // Layer 1: a/x, a/y, b; layer 2 (hand-made): whiteout of b, opaque a with a new a/z.
    let dst = tempfile::tempdir().unwrap();
    fs_err::create_dir(dst.path().join("a")).unwrap();
    fs_err::write(dst.path().join("a/x"), b"x").unwrap();
    fs_err::write(dst.path().join("a/y"), b"y").unwrap();
    fs_err::write(dst.path().join("b"), b"b").unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    tar.append_data(&mut h.clone(), "a/", std::io::empty())
        .unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1);
    tar.append_data(&mut h.clone(), "a/z", &b"z"[..]).unwrap();
    h.set_size(0);
    tar.append_data(&mut h.clone(), "a/.wh..wh..opq", std::io::empty())
        .unwrap();
    tar.append_data(&mut h.clone(), ".wh.b", std::io::empty())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let opts = ApplyOptions::default().with_whiteouts(WhiteoutMode::Remove);
    apply_layer(&tar[..], dst.path(), &opts).unwrap();
    let names: Vec<String> = snapshot(dst.path()).into_keys().collect();
    assert_eq!(names, ["a", "a/z"]);
}

#[test]
fn sparse_file_is_written_as_data() {
    let src = tempfile::tempdir().unwrap();
    let f = fs_err::File::create(src.path().join("sparse")).unwrap();
    f.set_len(64 << 20).unwrap(); // 64 MiB hole
    let mut f = f;
    f.write_all(b"start").unwrap();
    drop(f);
    let mut sink = std::io::sink();
    let stats = write_layer(src.path(), &mut sink, &WriteOptions::default()).unwrap();
    assert_eq!(stats.bytes, 512 + (64 << 20) + 1024);
}

fn arb_tree() -> impl Strategy<Value = Vec<(u8, String, Vec<u8>, u32)>> {
    // (kind, name, content, mode): kind 0 file, 1 dir, 2 symlink, 3 hardlink to an earlier file
    prop::collection::vec(
        (
            0u8..4,
            "[a-c]{1,3}(/[a-c.]{1,3}){0,2}",
            prop::collection::vec(any::<u8>(), 0..600),
            0u32..0o1000,
        ),
        1..25,
    )
}

fn build(root: &Path, spec: &[(u8, String, Vec<u8>, u32)]) {
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for (kind, name, content, mode) in spec {
        if name
            .split('/')
            .any(|c| c == "." || c == ".." || c.starts_with(".wh."))
        {
            continue;
        }
        let p = root.join(name);
        let Some(parent) = p.parent() else { continue };
        if fs_err::create_dir_all(parent).is_err() || fs_err::symlink_metadata(&p).is_ok() {
            continue; // a parent is a file, or the name is taken
        }
        match kind {
            0 => {
                fs_err::write(&p, content).unwrap();
                fs_err::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o400)).unwrap();
                files.push(p);
            }
            1 => {
                fs_err::create_dir(&p).unwrap();
                fs_err::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o700)).unwrap();
            }
            2 => symlink(String::from_utf8_lossy(content).replace('\0', ""), &p).unwrap_or(()),
            _ => {
                if let Some(t) = files.first() {
                    fs_err::hard_link(t, &p).unwrap();
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_trees_round_trip(spec in arb_tree()) {
        let src = tempfile::tempdir().unwrap();
        build(src.path(), &spec);
        let tar = write(src.path(), &WriteOptions::default());
        let dst = tempfile::tempdir().unwrap();
        apply(&tar, dst.path());
        prop_assert_eq!(snapshot(src.path()), snapshot(dst.path()));
        prop_assert_eq!(&tar, &write(dst.path(), &WriteOptions::default()));
    }
}

#[test]
fn rootless_options_mark_opaque_with_user_xattr_and_skip_devices() {
    use kiln_cache::layer::OpaqueXattr;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_uid(4242);
    h.set_entry_type(tar::EntryType::Directory);
    b.append_data(&mut h.clone(), "d/", std::io::empty())
        .unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h.clone(), "d/.wh..wh..opq", std::io::empty())
        .unwrap();
    h.set_entry_type(tar::EntryType::Char);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "d/null", std::io::empty()).unwrap();
    let tar = b.into_inner().unwrap();
    let opts = ApplyOptions {
        preserve_ownership: false,
        create_devices: false,
        opaque_xattr: OpaqueXattr::User,
        ..ApplyOptions::default()
    };
    let dst = tempfile::tempdir().unwrap();
    let stats = apply_layer(&tar[..], dst.path(), &opts).unwrap();
    assert_eq!(stats.entries, 3);
    let d = dst.path().join("d");
    assert_eq!(
        xattr::get(&d, "user.overlay.opaque").unwrap().as_deref(),
        Some(&b"y"[..])
    );
    assert!(!d.join("null").exists(), "devices are skipped");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs_err::metadata(&d).unwrap().uid(),
        nix::unistd::geteuid().as_raw()
    );
}

/// Format-stability vector: the diffID of a fixed tree. If this changes, every layer kiln
/// writes changes digest, and so does every cache key built on one: change it only on purpose.
#[test]
fn fixed_tree_has_a_stable_diff_id() {
    if !layer_common::require_root("fixed_tree_has_a_stable_diff_id") {
        return;
    }
    use sha2::Digest as _;
    let src = tempfile::tempdir().unwrap();
    let r = src.path();
    fs_err::create_dir(r.join("etc")).unwrap();
    fs_err::write(r.join("etc/hostname"), b"kiln\n").unwrap();
    symlink("hostname", r.join("etc/name")).unwrap();
    fs_err::write(r.join("x".repeat(120)), b"long").unwrap();
    for p in ["etc", "etc/hostname", &"x".repeat(120)] {
        let mode = if p == "etc" { 0o755 } else { 0o644 };
        fs_err::set_permissions(r.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for p in ["etc/name", "etc/hostname", &"x".repeat(120), "etc"] {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &r.join(p),
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        set_mtime(&r.join(p), 1_700_000_000);
    }
    let tar = write(r, &WriteOptions::default());
    let digest: String = sha2::Sha256::digest(&tar)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(tar.len(), 512 * 10);
    assert_eq!(
        digest,
        "389bfe0f2f8bbe01f1e2d368d11e22dcab34e7ff8e8ae42db21c6fc949d89eb8"
    );
}

#[test]
fn reusing_writer_records_small_files_and_trusts_known_contents() {
    use kiln_cache::layer::{KnownFiles, write_layer_reusing};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    rich_tree(&root);
    let opts = WriteOptions::default();
    let plain = write(&root, &opts);
    // With nothing known, the same tar; small xattr-free regular files recorded.
    let mut out = Vec::new();
    let (stats, recorded) =
        write_layer_reusing(&root, &mut out, &opts, KnownFiles::default()).unwrap();
    assert_eq!(out, plain);
    assert_eq!(stats.bytes, out.len() as u64);
    assert_eq!(recorded.get(b"dir/sub/file.txt"), Some(&b"hello\n"[..]));
    assert_eq!(recorded.get(b"empty"), Some(&b""[..]));
    assert_eq!(
        recorded.get(b"a.txt"),
        None,
        "70,000 bytes is over the limit"
    );
    assert_eq!(recorded.get(b"dir/rel-link"), None, "not a regular file");
    // Reusing what was recorded (through its bytes, as a memo does) gives
    // the same tar, and the same set back.
    let loaded = KnownFiles::from_bytes(&recorded.to_bytes()).unwrap();
    let mut again = Vec::new();
    let (_, carried) = write_layer_reusing(&root, &mut again, &opts, loaded).unwrap();
    assert_eq!(again, plain);
    assert_eq!(carried, recorded);
    // The writer takes a known content instead of reading the file (the
    // caller vouches for it) when the size matches, and reads it otherwise;
    // a known path that is not in the tree is dropped.
    let mut forged = KnownFiles::default();
    forged.record(b"dir/sub/file.txt", b"HELLO\n");
    forged.record(b"read-only-dir/inside", b"too long");
    forged.record(b"gone", b"x");
    let mut trusted = Vec::new();
    let (_, after) = write_layer_reusing(&root, &mut trusted, &opts, forged).unwrap();
    assert_ne!(trusted, plain);
    assert_eq!(after.get(b"dir/sub/file.txt"), Some(&b"HELLO\n"[..]));
    assert_eq!(after.get(b"read-only-dir/inside"), Some(&b"x"[..]));
    assert_eq!(after.get(b"gone"), None);
    let dest = tmp.path().join("dest");
    fs_err::create_dir(&dest).unwrap();
    apply(&trusted, &dest);
    assert_eq!(
        fs_err::read(dest.join("dir/sub/file.txt")).unwrap(),
        b"HELLO\n"
    );
    assert_eq!(
        fs_err::read(dest.join("read-only-dir/inside")).unwrap(),
        b"x"
    );
    if nix::unistd::geteuid().is_root() {
        // A file with xattrs (a capability) is never recorded.
        assert_eq!(recorded.get(b"dir/setuid"), None);
    }
}

#[test]
fn big_files_round_trip_byte_for_byte() {
    // With `map_big_files`, files of 1 MiB and more are read through a mapping: the bytes in
    // the tar must be the file's, to the last one.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    fs_err::create_dir_all(&root).unwrap();
    let big: Vec<u8> = (0..(3 << 20) + 123)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    fs_err::write(root.join("big"), &big).unwrap();
    fs_err::write(root.join("small"), b"s").unwrap();
    let tar = write(&root, &WriteOptions::default().with_mapped_files());
    let dest = tmp.path().join("dest");
    fs_err::create_dir(&dest).unwrap();
    apply(&tar, &dest);
    assert_eq!(fs_err::read(dest.join("big")).unwrap(), big);
    // The same bytes as when the files are read.
    assert_eq!(write(&root, &WriteOptions::default()), tar);
}

#[test]
fn digesting_writer_gives_each_regular_files_content_digest_and_the_same_tar() {
    use kiln_cache::layer::{KnownFiles, write_layer_digesting};
    // Content digests are BLAKE3 (see `kiln_cache::content_digest`).
    let sha = |b: &[u8]| -> [u8; 32] { *blake3::hash(b).as_bytes() };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    fs_err::create_dir_all(root.join("d")).unwrap();
    // Two big files (read through mappings, hashed on threads) and more
    // than the writer hashes at once; a middle-sized and a small one (read).
    let big: Vec<u8> = (0..(2 << 20) + 77)
        .map(|i: u32| (i * 13 + i / 999) as u8)
        .collect();
    for name in ["big1", "d/big2", "d/big3"] {
        let mut b = big.clone();
        b.extend_from_slice(name.as_bytes());
        fs_err::write(root.join(name), &b).unwrap();
    }
    fs_err::write(root.join("mid"), vec![5u8; 300 * 1024]).unwrap();
    fs_err::write(root.join("d/small"), b"small").unwrap();
    fs_err::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("small", root.join("d/link")).unwrap();
    let opts = WriteOptions::default().with_mapped_files();
    let plain = write(&root, &opts);

    let mut out = Vec::new();
    let (stats, none, digests) = write_layer_digesting(&root, &mut out, &opts, None).unwrap();
    assert_eq!(out, plain, "taking digests does not change the tar");
    assert_eq!(stats.bytes, out.len() as u64);
    assert!(none.is_none());
    for name in ["big1", "d/big2", "d/big3", "mid", "d/small", "empty"] {
        let content = fs_err::read(root.join(name)).unwrap();
        assert_eq!(
            digests.get(name.as_bytes(), content.len() as u64),
            Some(sha(&content)),
            "{name}"
        );
        assert_eq!(digests.get(name.as_bytes(), content.len() as u64 + 1), None);
    }
    assert_eq!(digests.get(b"d/link", 5), None, "not a regular file");
    assert_eq!(digests.len(), 6);
    // Seen without any xattrs, all of them (big files too); not at another size.
    for name in ["big1", "d/big2", "d/big3", "mid", "d/small", "empty"] {
        let n = fs_err::metadata(root.join(name)).unwrap().len();
        assert!(digests.without_xattrs(name.as_bytes(), n), "{name}");
        assert!(!digests.without_xattrs(name.as_bytes(), n + 1), "{name}");
    }

    // A file with an xattr, even one the layer leaves out (overlayfs'
    // own, here as `user.overlay.*`), is not without xattrs.
    xattr::set(root.join("mid"), "user.overlay.origin", b"x").unwrap();
    xattr::set(root.join("big1"), "user.note", b"y").unwrap();
    let (_, _, marked) = write_layer_digesting(&root, std::io::sink(), &opts, None).unwrap();
    for (name, bare) in [
        ("mid", false),
        ("big1", false),
        ("d/big2", true),
        ("d/small", true),
    ] {
        let n = fs_err::metadata(root.join(name)).unwrap().len();
        assert_eq!(marked.without_xattrs(name.as_bytes(), n), bare, "{name}");
        assert!(marked.get(name.as_bytes(), n).is_some(), "{name}");
    }
    xattr::remove(root.join("mid"), "user.overlay.origin").unwrap();
    xattr::remove(root.join("big1"), "user.note").unwrap();

    // A file whose content is known is digested from what is known.
    let mut known = KnownFiles::default();
    known.record(b"d/small", b"SMALL");
    let mut again = Vec::new();
    let (_, carried, digests) =
        write_layer_digesting(&root, &mut again, &opts, Some(known)).unwrap();
    assert!(carried.is_some());
    assert_eq!(digests.get(b"d/small", 5), Some(sha(b"SMALL")));
    // (Its xattrs were not listed.)
    assert!(!digests.without_xattrs(b"d/small", 5));
    assert_eq!(
        digests.get(b"big1", big.len() as u64 + 4),
        Some(sha(&fs_err::read(root.join("big1")).unwrap()))
    );
}
