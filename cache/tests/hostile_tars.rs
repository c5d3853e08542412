//! Hostile layer tars: each is refused with its specific error, and nothing appears outside
//! the destination. The tars are built byte by byte, because well-behaved writers (the `tar`
//! crate included) refuse to produce most of them.

mod layer_common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use kiln_cache::layer::{ApplyOptions, LayerError, Limits, apply_layer};
use layer_common::{Node, snapshot};

/// One raw ustar header; `size` is written as given (the data may be shorter: truncation).
fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    b[100..108].copy_from_slice(b"0000644\0");
    b[108..116].copy_from_slice(b"0000000\0");
    b[116..124].copy_from_slice(b"0000000\0");
    let s = format!("{size:011o}\0");
    b[124..136].copy_from_slice(&s.as_bytes()[s.len() - 12..]);
    b[136..148].copy_from_slice(b"00000000000\0");
    b[156] = kind;
    b[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    checksum(&mut b);
    b
}

fn checksum(b: &mut [u8; 512]) {
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn raw(mut self, h: [u8; 512], data: &[u8]) -> Self {
        self.0.extend_from_slice(&h);
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.resize(self.0.len() + pad, 0);
        self
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(header(name.as_bytes(), b'0', data.len() as u64, b""), data)
    }
    fn dir(self, name: &str) -> Self {
        self.raw(header(name.as_bytes(), b'5', 0, b""), b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(header(name.as_bytes(), b'2', 0, target.as_bytes()), b"")
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(header(name.as_bytes(), b'1', 0, target.as_bytes()), b"")
    }
    fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(header(b"PaxHeaders/x", b'x', data.len() as u64, b""), &data)
    }
    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// A sandbox: `base/root` is the destination, `base/outside/` holds a sentinel file that a
/// hostile tar would like to reach.
struct Sandbox {
    base: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let base = tempfile::tempdir().unwrap();
        fs_err::create_dir(base.path().join("root")).unwrap();
        fs_err::create_dir(base.path().join("outside")).unwrap();
        fs_err::write(base.path().join("outside/sentinel"), b"untouched").unwrap();
        Sandbox { base }
    }
    fn root(&self) -> std::path::PathBuf {
        self.base.path().join("root")
    }
    fn outside_view(&self) -> BTreeMap<String, Node> {
        let mut all = snapshot(self.base.path());
        all.retain(|k, _| !(k == "root" || k.starts_with("root/")));
        all
    }
    /// Apply `tar` with `opts`; check that the outside is exactly as before and that no
    /// absolute-path victim appeared; return the error.
    fn refuse_with<R: Read>(&self, tar: R, opts: &ApplyOptions) -> LayerError {
        let before = self.outside_view();
        let res = apply_layer(tar, &self.root(), opts);
        assert_eq!(
            before,
            self.outside_view(),
            "something outside the root changed"
        );
        assert!(!Path::new("/tmp/kiln-hostile-evil").exists());
        assert!(!Path::new("/kiln-hostile-evil").exists());
        match res {
            Ok(stats) => panic!("hostile tar was accepted: {stats:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty() && msg.chars().next().is_some_and(|c| c.is_lowercase()));
                e
            }
        }
    }
    fn refuse(&self, tar: &[u8]) -> LayerError {
        self.refuse_with(tar, &ApplyOptions::default())
    }
}

fn assert_names(e: &LayerError, entry: &str) {
    assert!(
        e.to_string().contains(entry),
        "error `{e}` does not name `{entry}`"
    );
}

#[test]
fn h01_parent_traversal() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().file("../outside/evil", b"x").end());
    assert!(matches!(e, LayerError::ParentComponent { .. }), "{e:?}");
    assert_names(&e, "../outside/evil");
}

#[test]
fn h02_parent_traversal_in_the_middle() {
    let s = Sandbox::new();
    let e = s.refuse(
        &Tar::default()
            .dir("a/")
            .file("a/../../outside/evil", b"x")
            .end(),
    );
    assert!(matches!(e, LayerError::ParentComponent { .. }), "{e:?}");
}

#[test]
fn h03_absolute_name() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().file("/tmp/kiln-hostile-evil", b"x").end());
    assert!(matches!(e, LayerError::AbsolutePath { .. }), "{e:?}");
    assert_names(&e, "/tmp/kiln-hostile-evil");
}

#[test]
fn h04_symlink_parent_relative_escape() {
    let s = Sandbox::new();
    let e = s.refuse(
        &Tar::default()
            .symlink("link", "../outside")
            .file("link/evil", b"x")
            .end(),
    );
    assert!(
        matches!(e, LayerError::ThroughSymlink { ref component, .. } if component == "link"),
        "{e:?}"
    );
}

#[test]
fn h05_symlink_parent_absolute() {
    let s = Sandbox::new();
    let e = s.refuse(
        &Tar::default()
            .symlink("etc", "/tmp")
            .file("etc/kiln-hostile-evil", b"x")
            .end(),
    );
    assert!(matches!(e, LayerError::ThroughSymlink { .. }), "{e:?}");
    assert_names(&e, "etc/kiln-hostile-evil");
}

#[test]
fn h06_symlink_chain_escape() {
    let s = Sandbox::new();
    let tar = Tar::default()
        .dir("d/")
        .symlink("d/up", "..")
        .symlink("a", "d/up/../outside")
        .file("a/evil", b"x")
        .end();
    let e = s.refuse(&tar);
    assert!(matches!(e, LayerError::ThroughSymlink { .. }), "{e:?}");
}

#[test]
fn h07_dir_replaced_by_symlink_then_written_through() {
    let s = Sandbox::new();
    let outside = s.base.path().join("outside");
    let tar = Tar::default()
        .dir("d/")
        .symlink("d", outside.to_str().unwrap())
        .file("d/sentinel", b"overwritten!")
        .end();
    let e = s.refuse(&tar);
    assert!(matches!(e, LayerError::ThroughSymlink { .. }), "{e:?}");
}

#[test]
fn h08_hardlink_parent_traversal() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().hardlink("h", "../outside/sentinel").end());
    assert!(matches!(e, LayerError::BadHardlink { .. }), "{e:?}");
    assert_names(&e, "../outside/sentinel");
}

#[test]
fn h09_hardlink_absolute() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().hardlink("h", "/etc/passwd").end());
    assert!(
        matches!(
            e,
            LayerError::BadHardlink {
                problem: "absolute",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn h10_hardlink_through_symlinked_dir() {
    let s = Sandbox::new();
    let tar = Tar::default()
        .symlink("o", "../outside")
        .hardlink("h", "o/sentinel")
        .end();
    let e = s.refuse(&tar);
    assert!(
        matches!(
            e,
            LayerError::BadHardlink {
                problem: "reached through a symlink",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn h11_hardlink_to_missing_target() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().hardlink("h", "not-there").end());
    assert!(matches!(e, LayerError::BadHardlink { .. }), "{e:?}");
}

#[test]
fn h12_write_through_symlink_target_is_contained() {
    // A symlink to outside, then a file with the same name: the symlink is replaced, the
    // outside is not written. Then a hardlink to a symlink that points out copies the link.
    let s = Sandbox::new();
    let outside = s.base.path().join("outside/sentinel");
    let tar = Tar::default()
        .symlink("s", outside.to_str().unwrap())
        .file("s", b"replaced")
        .symlink("t", outside.to_str().unwrap())
        .hardlink("h", "t")
        .end();
    let before = s.outside_view();
    apply_layer(&tar[..], &s.root(), &ApplyOptions::default()).unwrap();
    assert_eq!(before, s.outside_view());
    assert_eq!(fs_err::read(s.root().join("s")).unwrap(), b"replaced");
    assert!(
        fs_err::symlink_metadata(s.root().join("h"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn h13_whiteout_of_dotdot() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().file(".wh...", b"").end());
    assert!(matches!(e, LayerError::BadWhiteout { .. }), "{e:?}");
}

#[test]
fn h14_whiteout_of_dot_in_subdir() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().dir("a/").file("a/.wh..", b"").end());
    assert!(matches!(e, LayerError::BadWhiteout { .. }), "{e:?}");
    assert_names(&e, "a/.wh..");
}

#[test]
fn h15_whiteout_of_empty_name() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().file(".wh.", b"").end());
    assert!(matches!(e, LayerError::BadWhiteout { .. }), "{e:?}");
}

#[test]
fn h16_whiteout_through_symlink() {
    let s = Sandbox::new();
    let e = s.refuse(
        &Tar::default()
            .symlink("o", "../outside")
            .file("o/.wh.sentinel", b"")
            .end(),
    );
    assert!(matches!(e, LayerError::ThroughSymlink { .. }), "{e:?}");
}

#[test]
fn h17_huge_pax_header_is_refused_before_reading() {
    let s = Sandbox::new();
    // Declares 4 GiB of pax data, has none: must fail on the size, not on EOF or memory.
    let mut tar = Vec::new();
    tar.extend_from_slice(&header(b"PaxHeaders/huge", b'x', 1 << 32, b""));
    let e = s.refuse(&tar);
    assert!(
        matches!(e, LayerError::HeaderTooLarge { size, .. } if size == 1 << 32),
        "{e:?}"
    );
}

#[test]
fn h18_huge_gnu_long_name() {
    let s = Sandbox::new();
    let mut tar = Vec::new();
    tar.extend_from_slice(&header(b"././@LongLink", b'L', 200 << 20, b""));
    let e = s.refuse(&tar);
    assert!(matches!(e, LayerError::HeaderTooLarge { .. }), "{e:?}");
}

#[test]
fn h19_path_too_long() {
    let s = Sandbox::new();
    let long = "a/".repeat(3000) + "f";
    let tar = Tar::default()
        .pax(&[("path", long.as_bytes())])
        .file("short", b"")
        .end();
    let e = s.refuse(&tar);
    assert!(
        matches!(e, LayerError::PathTooLong { len: 6001, .. }),
        "{e:?}"
    );
}

#[test]
fn h20_too_many_entries() {
    let s = Sandbox::new();
    let mut t = Tar::default();
    for i in 0..200 {
        t = t.file(&format!("f{i}"), b"");
    }
    let opts = ApplyOptions::default().with_limits(Limits {
        max_entries: 100,
        ..Limits::default()
    });
    let e = s.refuse_with(&t.end()[..], &opts);
    assert!(
        matches!(e, LayerError::TooManyEntries { limit: 100, .. }),
        "{e:?}"
    );
    assert_names(&e, "f100");
}

#[test]
fn h21_gzip_bomb_hits_the_byte_limit() {
    let s = Sandbox::new();
    // 256 MiB of zeros in one file, gzipped to a few hundred KiB, streamed through decompress.
    let size: u64 = 256 << 20;
    let mut raw = Vec::new();
    raw.extend_from_slice(&header(b"bomb", b'0', size, b""));
    let mut gz = Vec::new();
    {
        let mut enc = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::best());
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) + 1 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        enc.finish().unwrap();
    }
    assert!(gz.len() < 2 << 20, "the bomb is small: {} bytes", gz.len());
    let tar = kiln_cache::decompress(std::io::Cursor::new(gz)).unwrap();
    let opts = ApplyOptions::default().with_limits(Limits {
        max_total_bytes: 16 << 20,
        ..Limits::default()
    });
    let e = s.refuse_with(tar, &opts);
    assert!(
        matches!(e, LayerError::TooLarge { size: s, .. } if s == 256 << 20),
        "{e:?}"
    );
    assert!(
        !s.root().join("bomb").exists(),
        "nothing of the bomb is written"
    );
}

#[test]
fn h22_bad_checksum() {
    let s = Sandbox::new();
    let mut h = header(b"file", b'0', 0, b"");
    h[0] = b'g'; // change the name after the checksum was computed
    let e = s.refuse(&Tar::default().raw(h, b"").end());
    assert!(
        matches!(
            e,
            LayerError::BadHeader {
                offset: 0,
                problem: "checksum mismatch"
            }
        ),
        "{e:?}"
    );
}

#[test]
fn h23_truncated_data() {
    let s = Sandbox::new();
    let mut tar = header(b"file", b'0', 10_000, b"").to_vec();
    tar.extend_from_slice(b"only a little");
    let e = s.refuse(&tar);
    assert!(
        matches!(
            e,
            LayerError::Apply {
                op: "write the file",
                ..
            }
        ),
        "{e:?}"
    );
    assert_names(&e, "file");
}

#[test]
fn h24_garbage_in_size_field() {
    let s = Sandbox::new();
    let mut h = header(b"file", b'0', 0, b"");
    h[124..136].copy_from_slice(b"9999999999x\0");
    checksum(&mut h);
    let e = s.refuse(&Tar::default().raw(h, b"").end());
    assert!(matches!(e, LayerError::BadHeader { .. }), "{e:?}");
}

#[test]
fn h25_gnu_sparse_entry_is_unsupported() {
    let s = Sandbox::new();
    let e = s.refuse(
        &Tar::default()
            .raw(header(b"sparse", b'S', 0, b""), b"")
            .end(),
    );
    assert!(
        matches!(e, LayerError::UnsupportedEntry { kind: 'S', .. }),
        "{e:?}"
    );
    assert_names(&e, "sparse");
}

#[test]
fn h26_pax_path_overrides_innocent_name() {
    let s = Sandbox::new();
    let tar = Tar::default()
        .pax(&[("path", b"../outside/evil")])
        .file("innocent", b"x")
        .end();
    let e = s.refuse(&tar);
    assert!(matches!(e, LayerError::ParentComponent { .. }), "{e:?}");
    assert_names(&e, "../outside/evil");
}

#[test]
fn h27_pax_linkpath_escape() {
    let s = Sandbox::new();
    let tar = Tar::default()
        .pax(&[("linkpath", b"../outside/sentinel")])
        .hardlink("h", "ok")
        .end();
    let e = s.refuse(&tar);
    assert!(matches!(e, LayerError::BadHardlink { .. }), "{e:?}");
}

#[test]
fn h28_nul_in_pax_path() {
    let s = Sandbox::new();
    let tar = Tar::default()
        .pax(&[("path", b"a\0/../../evil")])
        .file("x", b"")
        .end();
    let e = s.refuse(&tar);
    assert!(
        matches!(
            e,
            LayerError::InvalidName { .. } | LayerError::ParentComponent { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn h29_base256_absurd_size() {
    let s = Sandbox::new();
    let mut h = header(b"big", b'0', 0, b"");
    h[124..136].copy_from_slice(&[
        0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    checksum(&mut h);
    let e = s.refuse(&Tar::default().raw(h, b"").end());
    assert!(matches!(e, LayerError::TooLarge { .. }), "{e:?}");
}

#[test]
fn h30_file_over_the_root_itself() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().file("./", b"x").end());
    assert!(matches!(e, LayerError::InvalidName { .. }), "{e:?}");
}

#[test]
fn h31_truncated_header() {
    let s = Sandbox::new();
    let tar = header(b"file", b'0', 0, b"")[..300].to_vec();
    let e = s.refuse(&tar);
    assert!(matches!(e, LayerError::ReadTar { .. }), "{e:?}");
}

#[test]
fn h32_hardlink_to_a_directory() {
    let s = Sandbox::new();
    let e = s.refuse(&Tar::default().dir("d/").hardlink("h", "d").end());
    assert!(
        matches!(
            e,
            LayerError::BadHardlink {
                problem: "a directory",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn h33_random_corruption_never_panics_or_escapes() {
    // A small deterministic fuzz loop over a valid tar with hostile bits: flip bytes, and
    // check no panic and nothing outside changes (errors are fine).
    let base = Tar::default()
        .dir("d/")
        .symlink("d/l", "../../outside")
        .file("d/f", b"data")
        .hardlink("d/h", "d/f")
        .pax(&[("path", b"p/long"), ("SCHILY.xattr.user.k", b"v")])
        .file("x", b"y")
        .end();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..300 {
        let s = Sandbox::new();
        let mut t = base.clone();
        for _ in 0..4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed % t.len() as u64) as usize;
            t[i] = (seed >> 32) as u8;
        }
        let before = s.outside_view();
        let _ = apply_layer(&t[..], &s.root(), &ApplyOptions::default());
        assert_eq!(before, s.outside_view());
    }
}

#[test]
fn h34_forged_overlay_xattrs_are_dropped() {
    if !layer_common::require_root("h34_forged_overlay_xattrs_are_dropped") {
        return;
    }
    let s = Sandbox::new();
    let tar = Tar::default()
        .pax(&[
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.user.kept", b"1"),
        ])
        .dir("d/")
        .end();
    apply_layer(&tar[..], &s.root(), &ApplyOptions::default()).unwrap();
    let d = s.root().join("d");
    assert_eq!(xattr::get(&d, "trusted.overlay.redirect").unwrap(), None);
    assert_eq!(xattr::get(&d, "trusted.overlay.opaque").unwrap(), None);
    assert_eq!(
        xattr::get(&d, "user.kept").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}
