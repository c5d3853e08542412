//! Real overlayfs: changes made through a merged view, the upperdir written as a layer,
//! applied back, and mounted again. Needs root (fails under CI=true without it).

mod layer_common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use kiln_cache::layer::{ApplyOptions, WhiteoutMode, WriteOptions, apply_layer, write_layer};
use layer_common::{Node, require_root, snapshot};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

fn mount_overlay(lower: &str, upper: Option<(&Path, &Path)>, merged: &Path) {
    let mut data = format!("lowerdir={lower}");
    if let Some((u, w)) = upper {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount overlay ({data}): {e}"));
}

/// Compare trees ignoring overlay-private xattrs and whiteout inode sharing.
fn normalized(root: &Path) -> std::collections::BTreeMap<String, Node> {
    let mut s = snapshot(root);
    for n in s.values_mut() {
        n.xattrs
            .retain(|(k, _)| !k.starts_with("trusted.overlay.") || k == "trusted.overlay.opaque");
        if n.kind == "char" && n.rdev == 0 {
            n.link_group = None;
        }
    }
    s
}

#[test]
fn overlay_upperdir_to_layer_and_back() {
    if !require_root("overlay_upperdir_to_layer_and_back") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    for d in ["lower", "upper", "work", "merged", "snap", "flat", "check"] {
        fs_err::create_dir(p(d)).unwrap();
    }
    let lower = p("lower");
    fs_err::write(lower.join("keep.txt"), b"keep").unwrap();
    fs_err::write(lower.join("modify.txt"), b"old").unwrap();
    fs_err::write(lower.join("delete.txt"), b"bye").unwrap();
    fs_err::create_dir_all(lower.join("deldir/inner")).unwrap();
    fs_err::write(lower.join("deldir/inner/a"), b"a").unwrap();
    fs_err::create_dir(lower.join("redo")).unwrap();
    fs_err::write(lower.join("redo/old1"), b"1").unwrap();
    fs_err::write(lower.join("redo/old2"), b"2").unwrap();
    fs_err::create_dir_all(lower.join("sub/nested")).unwrap();
    fs_err::write(lower.join("sub/nested/file"), b"nested").unwrap();

    // Changes through the merged view.
    let merged = p("merged");
    mount_overlay(
        lower.to_str().unwrap(),
        Some((&p("upper"), &p("work"))),
        &merged,
    );
    let result = std::panic::catch_unwind(|| {
        fs_err::write(merged.join("new.txt"), b"new").unwrap();
        fs_err::hard_link(merged.join("new.txt"), merged.join("new-link")).unwrap();
        symlink("keep.txt", merged.join("to-keep")).unwrap();
        fs_err::write(merged.join("modify.txt"), b"new content").unwrap();
        fs_err::remove_file(merged.join("delete.txt")).unwrap();
        fs_err::remove_dir_all(merged.join("deldir")).unwrap();
        fs_err::remove_dir_all(merged.join("redo")).unwrap();
        fs_err::create_dir(merged.join("redo")).unwrap();
        fs_err::write(merged.join("redo/fresh"), b"fresh").unwrap();
        fs_err::set_permissions(
            merged.join("sub/nested/file"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        normalized(&merged)
    });
    umount2(&merged, MntFlags::MNT_DETACH).unwrap();
    let expected = result.unwrap();
    assert!(expected.contains_key("redo/fresh") && expected.contains_key("keep.txt"));
    assert!(!expected.contains_key("redo/old1") && !expected.contains_key("delete.txt"));

    // The layer: whiteouts and the opaque marker, nothing from the lower dir.
    let mut tar = Vec::new();
    write_layer(&p("upper"), &mut tar, &WriteOptions::default()).unwrap();
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(&tar[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        names.push(String::from_utf8_lossy(&e.path_bytes()).into_owned());
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let key = x.unwrap().key().unwrap().to_owned();
                assert!(
                    !key.contains("overlay"),
                    "overlay xattr `{key}` leaked into the layer"
                );
            }
        }
    }
    for want in [
        ".wh.delete.txt",
        ".wh.deldir",
        "redo/",
        "redo/.wh..wh..opq",
        "redo/fresh",
        "new.txt",
        "new-link",
        "modify.txt",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "`{want}` missing from {names:?}"
        );
    }
    for absent in ["keep.txt", "deldir/", "redo/old1"] {
        assert!(
            !names.iter().any(|n| n == absent),
            "`{absent}` should not be in {names:?}"
        );
    }
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert_eq!(
        pos("redo/.wh..wh..opq"),
        pos("redo/") + 1,
        "opaque marker right after its dir"
    );

    // Applied in overlay form, the snapshot equals the upperdir...
    apply_layer(&tar[..], &p("snap"), &ApplyOptions::default()).unwrap();
    assert_eq!(normalized(&p("upper")), normalized(&p("snap")));
    let opaque = xattr::get(p("snap").join("redo"), "trusted.overlay.opaque").unwrap();
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));

    // ...and mounted over the lower dir it shows the same view as the original merge.
    let check = p("check");
    mount_overlay(
        &format!("{}:{}", p("snap").display(), lower.display()),
        None,
        &check,
    );
    let view = std::panic::catch_unwind(|| normalized(&check));
    umount2(&check, MntFlags::MNT_DETACH).unwrap();
    assert_eq!(expected, view.unwrap());

    // Applied in remove mode onto a flat copy of the lower dir: the same view again.
    let mut base = Vec::new();
    write_layer(&lower, &mut base, &WriteOptions::default()).unwrap();
    apply_layer(&base[..], &p("flat"), &ApplyOptions::default()).unwrap();
    let opts = ApplyOptions::default().with_whiteouts(WhiteoutMode::Remove);
    apply_layer(&tar[..], &p("flat"), &opts).unwrap();
    assert_eq!(expected, normalized(&p("flat")));
}

#[test]
fn directory_replacing_a_whiteout_becomes_opaque() {
    if !require_root("directory_replacing_a_whiteout_becomes_opaque") {
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h.clone(), ".wh.d", std::io::empty())
        .unwrap();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    b.append_data(&mut h, "d/", std::io::empty()).unwrap();
    let tar = b.into_inner().unwrap();
    let dst = tempfile::tempdir().unwrap();
    apply_layer(&tar[..], dst.path(), &ApplyOptions::default()).unwrap();
    assert!(dst.path().join("d").is_dir());
    let opaque = xattr::get(dst.path().join("d"), "trusted.overlay.opaque").unwrap();
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
}

#[test]
fn redirect_dir_upperdirs_are_refused() {
    if !require_root("redirect_dir_upperdirs_are_refused") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    fs_err::create_dir(src.path().join("moved")).unwrap();
    xattr::set(
        src.path().join("moved"),
        "trusted.overlay.redirect",
        b"/orig",
    )
    .unwrap();
    let err = write_layer(src.path(), std::io::sink(), &WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("redirect_dir"), "{err}");
    assert!(err.to_string().contains("moved"), "{err}");
}

#[test]
fn hardlinked_whiteout_devices_are_each_a_whiteout_entry() {
    if !require_root("hardlinked_whiteout_devices_are_each_a_whiteout_entry") {
        return;
    }
    // overlayfs may make all whiteouts links of one shared inode.
    let src = tempfile::tempdir().unwrap();
    fs_err::create_dir(src.path().join("d")).unwrap();
    nix::sys::stat::mknod(
        &src.path().join("gone1"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    fs_err::hard_link(src.path().join("gone1"), src.path().join("d/gone2")).unwrap();
    let mut tar = Vec::new();
    write_layer(src.path(), &mut tar, &WriteOptions::default()).unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    let entries: Vec<(String, tar::EntryType)> = a
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.header().entry_type(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("d/".to_owned(), tar::EntryType::Directory),
            ("d/.wh.gone2".to_owned(), tar::EntryType::Regular),
            (".wh.gone1".to_owned(), tar::EntryType::Regular),
        ]
    );
}

#[test]
fn big_ids_and_pre_epoch_times_round_trip_through_pax() {
    if !require_root("big_ids_and_pre_epoch_times_round_trip_through_pax") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("f");
    fs_err::write(&f, b"x").unwrap();
    nix::unistd::chown(
        &f,
        Some(nix::unistd::Uid::from_raw(3_000_000)),
        Some(nix::unistd::Gid::from_raw(4_000_000)),
    )
    .unwrap();
    let t = nix::sys::time::TimeSpec::new(-86_400, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &f,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let mut tar = Vec::new();
    write_layer(src.path(), &mut tar, &WriteOptions::default()).unwrap();
    assert_eq!(&tar[156], &b'x', "a pax header precedes the entry");
    let dst = tempfile::tempdir().unwrap();
    apply_layer(&tar[..], dst.path(), &ApplyOptions::default()).unwrap();
    assert_eq!(snapshot(src.path()), snapshot(dst.path()));
    let got = snapshot(dst.path());
    assert_eq!(
        (got["f"].uid, got["f"].gid, got["f"].mtime),
        (3_000_000, 4_000_000, Some(-86_400))
    );
}
