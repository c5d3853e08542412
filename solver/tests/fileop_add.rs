//! ADD (archives by content, URLs with checksums) and hostile inputs: links
//! and archive entries that try to leave the destination root.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use kiln_solver::fileop::{self, CopyOp, FileOpError};
use sha2::Digest;

struct Roots {
    tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
}

fn roots() -> Roots {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs_err::create_dir(&src).unwrap();
    fs_err::create_dir(&dst).unwrap();
    Roots { tmp, src, dst }
}

fn add(sources: &[&str], dest: &str) -> CopyOp {
    let mut op = CopyOp::new(sources, dest);
    op.is_add = true;
    op.apply_ownership = nix::unistd::geteuid().is_root();
    op
}

fn read(root: &Path, rel: &str) -> String {
    fs_err::read_to_string(root.join(rel)).unwrap()
}

/// A tar with `dir/`, `dir/a.txt`, a symlink and a hard link.
fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o750);
    h.set_size(0);
    h.set_mtime(1_000);
    b.append_data(&mut h, "dir/", &[][..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_size(5);
    h.set_mtime(2_000);
    b.append_data(&mut h, "dir/a.txt", &b"hello"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "dir/link", "a.txt").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "dir/hard", "dir/a.txt").unwrap();
    b.into_inner().unwrap()
}

/// A tar with one raw entry name (the tar crate refuses `..` in its
/// builder, so the header is written by hand).
fn raw_tar(name: &str, kind: tar::EntryType, link: &str, body: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn check_sample(dst: &Path, at: &str) {
    assert_eq!(read(dst, &format!("{at}/dir/a.txt")), "hello");
    let m = fs_err::metadata(dst.join(format!("{at}/dir/a.txt"))).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!(m.mtime(), 2_000);
    let d = fs_err::metadata(dst.join(format!("{at}/dir"))).unwrap();
    assert_eq!(d.mode() & 0o7777, 0o750);
    assert_eq!(d.mtime(), 1_000, "dir times are set after its entries");
    assert_eq!(
        fs_err::read_link(dst.join(format!("{at}/dir/link"))).unwrap(),
        Path::new("a.txt")
    );
    let h = fs_err::metadata(dst.join(format!("{at}/dir/hard"))).unwrap();
    assert_eq!(h.ino(), m.ino());
}

#[test]
fn add_extracts_plain_gzip_bzip2_xz_and_zstd_by_content() {
    let r = roots();
    let plain = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    bz.write_all(&plain).unwrap();
    let bz = bz.finish().unwrap();
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut &plain[..], &mut xz).unwrap();
    let zst = zstd::stream::encode_all(&plain[..], 3).unwrap();
    // Names that lie: detection is by content.
    for (name, bytes) in [
        ("plain.bin", &plain),
        ("gz.txt", &gz),
        ("bz", &bz),
        ("archive.zip", &xz),
        ("layer", &zst),
    ] {
        fs_err::write(r.src.join(name), bytes).unwrap();
        let at = format!("x-{name}");
        // No trailing slash: the destination is still a directory.
        let rep = fileop::copy(&r.src, &r.dst, &add(&[name], &format!("/{at}"))).unwrap();
        check_sample(&r.dst, &at);
        assert!(
            rep.written
                .iter()
                .any(|w| w.path == format!("/{at}/dir/a.txt"))
        );
    }
}

#[test]
fn copy_and_unpack_false_do_not_extract_and_non_archives_are_copied() {
    let r = roots();
    fs_err::write(r.src.join("a.tar"), sample_tar()).unwrap();
    let mut copy = add(&["a.tar"], "/c/");
    copy.is_add = false;
    fileop::copy(&r.src, &r.dst, &copy).unwrap();
    assert!(r.dst.join("c/a.tar").is_file());
    let mut o = add(&["a.tar"], "/u/");
    o.unpack = Some(false);
    fileop::copy(&r.src, &r.dst, &o).unwrap();
    assert!(r.dst.join("u/a.tar").is_file());
    fs_err::write(r.src.join("fake.tar.gz"), b"\x1f\x8bnot really gzip").unwrap();
    fileop::copy(&r.src, &r.dst, &add(&["fake.tar.gz"], "/f/")).unwrap();
    assert!(r.dst.join("f/fake.tar.gz").is_file());
}

#[test]
fn archive_entries_cannot_escape() {
    let r = roots();
    for (i, (name, kind, link)) in [
        ("../../escape.txt", tar::EntryType::Regular, ""),
        ("a/../../escape.txt", tar::EntryType::Regular, ""),
        ("h", tar::EntryType::Link, "../../../etc/passwd"),
    ]
    .into_iter()
    .enumerate()
    {
        let f = format!("evil{i}.tar");
        fs_err::write(r.src.join(&f), raw_tar(name, kind, link, b"pwned")).unwrap();
        let err = fileop::copy(&r.src, &r.dst, &add(&[&f], "/x/")).unwrap_err();
        assert!(
            matches!(err, FileOpError::ArchiveEscape { .. }),
            "{name}: {err}"
        );
        assert!(!r.tmp.path().join("escape.txt").exists());
    }
    // An absolute name lands inside the destination.
    fs_err::write(
        r.src.join("abs.tar"),
        raw_tar("/etc/abs", tar::EntryType::Regular, "", b"in"),
    )
    .unwrap();
    fileop::copy(&r.src, &r.dst, &add(&["abs.tar"], "/x/")).unwrap();
    assert_eq!(read(&r.dst, "x/etc/abs"), "in");
}

#[test]
fn archive_symlink_then_file_through_it_stays_inside() {
    let r = roots();
    let outside = r.tmp.path().join("outside");
    fs_err::create_dir(&outside).unwrap();
    // Entry 1: `up -> <outside host dir>`; entry 2: `up/pwned`.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "up", &outside).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "dots", "../../../..").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "up/pwned", &b"x"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "dots/pwned2", &b"y"[..]).unwrap();
    fs_err::write(r.src.join("t.tar"), b.into_inner().unwrap()).unwrap();
    fileop::copy(&r.src, &r.dst, &add(&["t.tar"], "/x/")).unwrap();
    assert!(
        !outside.join("pwned").exists(),
        "followed a link out of the root"
    );
    assert!(
        r.dst
            .join(outside.strip_prefix("/").unwrap())
            .join("pwned")
            .exists()
    );
    assert_eq!(
        read(&r.dst, "pwned2"),
        "y",
        "`../../../..` stops at the root"
    );
    assert!(!r.tmp.path().join("pwned2").exists());
}

#[test]
fn dest_symlinks_to_root_or_dotdot_never_lead_out() {
    let r = roots();
    fs_err::write(r.src.join("f"), "F").unwrap();
    symlink("/", r.dst.join("toroot")).unwrap();
    symlink("../../../../../../..", r.dst.join("dots")).unwrap();
    symlink(r.tmp.path(), r.dst.join("hostabs")).unwrap();
    for (dest, inside) in [
        ("/toroot/a", "a"),
        ("/dots/b", "b"),
        ("/toroot/../../c", "c"),
    ] {
        let mut o = add(&["f"], dest);
        o.is_add = false;
        fileop::copy(&r.src, &r.dst, &o).unwrap();
        assert_eq!(read(&r.dst, inside), "F", "{dest}");
        assert!(!r.tmp.path().join(inside).exists(), "{dest} escaped");
    }
    // An absolute link to a host path is read as a path inside the root.
    let mut o = add(&["f"], "/hostabs/d");
    o.is_add = false;
    fileop::copy(&r.src, &r.dst, &o).unwrap();
    assert!(!r.tmp.path().join("d").exists());
    let inside = r
        .dst
        .join(r.tmp.path().strip_prefix("/").unwrap())
        .join("d");
    assert_eq!(fs_err::read_to_string(inside).unwrap(), "F");
    // A directory copied onto `/toroot` merges into the root itself.
    fs_err::create_dir(r.src.join("tree")).unwrap();
    fs_err::write(r.src.join("tree/t"), "T").unwrap();
    fs_err::create_dir(r.src.join("wrap")).unwrap();
    fs_err::create_dir(r.src.join("wrap/toroot")).unwrap();
    fs_err::write(r.src.join("wrap/toroot/w"), "W").unwrap();
    let mut o = add(&["wrap"], "/");
    o.is_add = false;
    fileop::copy(&r.src, &r.dst, &o).unwrap();
    assert_eq!(read(&r.dst, "w"), "W");
    assert!(!r.tmp.path().join("w").exists());
}

#[test]
fn hostile_sources_stay_in_the_source_root() {
    let r = roots();
    symlink("/etc/passwd", r.src.join("pw")).unwrap();
    symlink("../../../../etc", r.src.join("etcdir")).unwrap();
    for s in ["../../etc/passwd", "pw", "etcdir/passwd", "/etc/passwd"] {
        let mut o = add(&[s], "/x");
        o.is_add = false;
        let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
        assert!(
            matches!(err, FileOpError::SourceNotFound { .. }),
            "{s}: {err}"
        );
    }
    assert!(!r.dst.join("x").exists());
}

fn serve(body: Vec<u8>, hits: usize) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        for _ in 0..hits {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let resp = if line.contains("/missing") {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            };
            let _ = s.write_all(&resp);
        }
    });
    (format!("http://{addr}"), h)
}

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn add_url_with_right_and_wrong_checksum() {
    let r = roots();
    let body = sample_tar();
    let (base, server) = serve(body.clone(), 4);
    // Right checksum: file named after the URL, 0600, mtime of
    // Last-Modified, not extracted.
    let mut o = add(&[&format!("{base}/files/app.tar?x=1")], "/dl/");
    o.checksum = Some(format!("sha256:{}", sha256_hex(&body)));
    let rep = fileop::copy(&r.src, &r.dst, &o).unwrap();
    let got = fs_err::read(r.dst.join("dl/app.tar")).unwrap();
    assert_eq!(got, body);
    let m = fs_err::metadata(r.dst.join("dl/app.tar")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(m.mtime(), 784_111_777);
    assert!(
        !r.dst.join("dl/dir").exists(),
        "URLs are not unpacked by default"
    );
    assert_eq!(rep.bytes, body.len() as u64);
    // Wrong checksum: both digests named, nothing written.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let mut o = add(&[&format!("{base}/files/app.tar")], "/bad/");
    o.checksum = Some(wrong.clone());
    let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FileOpError::ChecksumMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256_hex(&body)),
        "{msg}"
    );
    assert!(!r.dst.join("bad").exists());
    // --unpack=true extracts a URL archive; a file dest renames.
    let mut o = add(&[&format!("{base}/a.tar")], "/un");
    o.unpack = Some(true);
    fileop::copy(&r.src, &r.dst, &o).unwrap();
    assert_eq!(read(&r.dst, "un/dir/a.txt"), "hello");
    // 404 is an error naming the URL.
    let err = fileop::copy(&r.src, &r.dst, &add(&[&format!("{base}/missing")], "/m")).unwrap_err();
    assert!(
        matches!(err, FileOpError::HttpStatus { status: 404, .. }),
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn archive_pax_xattrs_are_applied() {
    let r = roots();
    let probe = r.dst.join("probe");
    fs_err::write(&probe, "p").unwrap();
    if let Err(e) = xattr::set(&probe, "user.probe", b"1") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the temp dir has no user xattrs: {e}"
        );
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.kiln", &b"tar-value"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "x.txt", &b"x"[..]).unwrap();
    fs_err::write(r.src.join("x.tar"), b.into_inner().unwrap()).unwrap();
    let rep = fileop::copy(&r.src, &r.dst, &add(&["x.tar"], "/out/")).unwrap();
    assert!(r.dst.join("out/x.txt").exists(), "{rep:?}");
    let v = xattr::get(r.dst.join("out/x.txt"), "user.kiln").unwrap();
    assert_eq!(v.as_deref(), Some(&b"tar-value"[..]));
}

#[test]
fn only_top_level_archives_unpack_and_links_to_them_do() {
    let r = roots();
    fs_err::create_dir(r.src.join("pkg")).unwrap();
    fs_err::write(r.src.join("pkg/inner.tar"), sample_tar()).unwrap();
    fileop::copy(&r.src, &r.dst, &add(&["pkg"], "/p/")).unwrap();
    assert!(
        r.dst.join("p/inner.tar").is_file(),
        "archives inside a dir are copied"
    );
    symlink("pkg/inner.tar", r.src.join("latest.tar")).unwrap();
    fileop::copy(&r.src, &r.dst, &add(&["latest.tar"], "/l/")).unwrap();
    check_sample(&r.dst, "l");
}

#[test]
fn sources_are_classified_like_buildkit() {
    use fileop::Source;
    assert!(matches!(
        Source::classify("https://example.com/a.tgz"),
        Source::Url(_)
    ));
    assert!(matches!(Source::classify("http://h/x"), Source::Url(_)));
    assert!(matches!(
        Source::classify("https://github.com/moby/buildkit.git#v0.12"),
        Source::Git(_)
    ));
    assert!(matches!(
        Source::classify("git@github.com:a/b.git"),
        Source::Git(_)
    ));
    assert!(matches!(Source::classify("git://h/r"), Source::Git(_)));
    assert!(matches!(Source::classify("src/http.rs"), Source::Path(_)));
    assert!(matches!(Source::classify("httpdocs/"), Source::Path(_)));
}
