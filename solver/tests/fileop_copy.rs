//! COPY and WORKDIR rules, each in its own pair of temp roots.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_solver::fileop::{self, CopyOp, FileOpError, Source, SourceKind, mkdir_workdir};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Ownership can only be set as root; without root, chown assertions are
/// skipped (CI runs as root, so there they always run).
fn owners_checked() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not root: chown tests need root"
    );
    #[expect(clippy::print_stderr, reason = "a test's skip notice")]
    {
        eprintln!("skip: ownership assertions need root");
    }
    false
}

struct Roots {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
}

fn roots() -> Roots {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs_err::create_dir(&src).unwrap();
    fs_err::create_dir(&dst).unwrap();
    Roots {
        _tmp: tmp,
        src,
        dst,
    }
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs_err::create_dir_all(p.parent().unwrap()).unwrap();
    fs_err::write(&p, content).unwrap();
}

fn read(root: &Path, rel: &str) -> String {
    fs_err::read_to_string(root.join(rel)).unwrap()
}

fn op(sources: &[&str], dest: &str) -> CopyOp {
    let mut op = CopyOp::new(sources, dest);
    op.apply_ownership = is_root();
    op
}

fn run(r: &Roots, op: &CopyOp) -> fileop::Report {
    fileop::copy(&r.src, &r.dst, op).unwrap()
}

#[test]
fn file_into_dir_with_trailing_slash() {
    let r = roots();
    write(&r.src, "a.txt", "A");
    let rep = run(&r, &op(&["a.txt"], "/app/"));
    assert_eq!(read(&r.dst, "app/a.txt"), "A");
    assert_eq!(rep.sources_read, ["a.txt"]);
    assert!(rep.written.iter().any(|w| w.path == "/app/a.txt"));
    let m = fs_err::metadata(r.dst.join("app")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o755);
}

#[test]
fn file_to_path_is_renamed_and_parents_created() {
    let r = roots();
    write(&r.src, "a.txt", "A");
    run(&r, &op(&["a.txt"], "/x/y/b.txt"));
    assert_eq!(read(&r.dst, "x/y/b.txt"), "A");
}

#[test]
fn file_into_existing_dir_without_slash() {
    let r = roots();
    write(&r.src, "a.txt", "A");
    fs_err::create_dir(r.dst.join("app")).unwrap();
    run(&r, &op(&["a.txt"], "/app"));
    assert_eq!(read(&r.dst, "app/a.txt"), "A");
}

#[test]
fn directory_copies_its_contents() {
    let r = roots();
    write(&r.src, "dir/one", "1");
    write(&r.src, "dir/sub/two", "2");
    run(&r, &op(&["dir"], "/app"));
    assert_eq!(read(&r.dst, "app/one"), "1");
    assert_eq!(read(&r.dst, "app/sub/two"), "2");
    assert!(!r.dst.join("app/dir").exists());
}

#[test]
fn dot_copies_the_whole_context_relative_to_workdir() {
    let r = roots();
    write(&r.src, "f", "F");
    write(&r.src, "d/g", "G");
    let mut o = op(&["."], ".");
    o.workdir = "/srv/app".into();
    run(&r, &o);
    assert_eq!(read(&r.dst, "srv/app/f"), "F");
    assert_eq!(read(&r.dst, "srv/app/d/g"), "G");
    let mut o = op(&["f"], "rel/");
    o.workdir = "/w".into();
    run(&r, &o);
    assert_eq!(read(&r.dst, "w/rel/f"), "F");
}

#[test]
fn wildcards_expand_per_segment_in_order() {
    let r = roots();
    write(&r.src, "a1.txt", "1");
    write(&r.src, "a2.txt", "2");
    write(&r.src, "b.txt", "b");
    write(&r.src, "sub/a3.txt", "3");
    let rep = run(&r, &op(&["a*.txt"], "/out/"));
    assert_eq!(rep.sources_read, ["a1.txt", "a2.txt"]);
    assert!(r.dst.join("out/a1.txt").exists());
    assert!(!r.dst.join("out/b.txt").exists());
    assert!(!r.dst.join("out/a3.txt").exists());
    let rep = run(&r, &op(&["*/a?.txt"], "/out2/"));
    assert_eq!(rep.sources_read, ["sub/a3.txt"]);
    assert_eq!(read(&r.dst, "out2/a3.txt"), "3");
}

#[test]
fn wildcard_matching_nothing_copies_nothing() {
    let r = roots();
    write(&r.src, "keep.txt", "k");
    // BuildKit's AllowEmptyWildcard: a non-matching wildcard is not an error.
    let rep = run(&r, &op(&["nomatch*", "keep.txt"], "/out/"));
    assert_eq!(rep.sources_read, ["keep.txt"]);
    assert_eq!(read(&r.dst, "out/keep.txt"), "k");
    // But its directory part must exist.
    let err = fileop::copy(&r.src, &r.dst, &op(&["nodir/*.txt"], "/o/")).unwrap_err();
    assert!(
        matches!(err, FileOpError::WildcardDirNotFound { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/nodir"), "{err}");
    let err = fileop::copy(&r.src, &r.dst, &op(&["[bad"], "/o/")).unwrap_err();
    assert!(matches!(err, FileOpError::BadPattern { .. }), "{err}");
}

#[test]
fn missing_source_names_the_path_and_writes_nothing() {
    let r = roots();
    write(&r.src, "a", "a");
    let err = fileop::copy(&r.src, &r.dst, &op(&["a", "missing/file.txt"], "/out/")).unwrap_err();
    assert!(matches!(err, FileOpError::SourceNotFound { .. }));
    assert!(err.to_string().contains("`missing/file.txt`"), "{err}");
    assert!(
        !r.dst.join("out").exists(),
        "nothing written before the error"
    );
}

#[test]
fn several_sources_need_a_directory_destination() {
    let r = roots();
    write(&r.src, "a", "a");
    write(&r.src, "b", "b");
    let err = fileop::copy(&r.src, &r.dst, &op(&["a", "b"], "/file")).unwrap_err();
    assert!(
        matches!(err, FileOpError::MultipleSourcesNeedDir { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("must be a directory and end with a /")
    );
    let err = fileop::copy(&r.src, &r.dst, &op(&["*"], "/file")).unwrap_err();
    assert!(
        matches!(err, FileOpError::MultipleSourcesNeedDir { .. }),
        "{err}"
    );
    // An existing directory is fine without the slash.
    fs_err::create_dir(r.dst.join("dir")).unwrap();
    run(&r, &op(&["a", "b"], "/dir"));
    assert_eq!(read(&r.dst, "dir/b"), "b");
}

#[test]
fn source_parent_refs_are_cleaned_inside_the_source_root() {
    let r = roots();
    write(&r.src, "etc/passwd", "context copy");
    let rep = run(&r, &op(&["../../etc/passwd"], "/got"));
    assert_eq!(rep.sources_read, ["etc/passwd"]);
    assert_eq!(read(&r.dst, "got"), "context copy");
}

#[test]
fn dest_symlink_is_followed_inside_the_root() {
    let r = roots();
    write(&r.src, "a", "A");
    fs_err::create_dir_all(r.dst.join("opt/app")).unwrap();
    symlink("/opt/app", r.dst.join("app")).unwrap();
    run(&r, &op(&["a"], "/app/"));
    assert_eq!(read(&r.dst, "opt/app/a"), "A");
    assert!(
        r.dst
            .join("app")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A file onto a symlink *name* without slash: the link resolves to a dir.
    write(&r.src, "b", "B");
    run(&r, &op(&["b"], "/app"));
    assert_eq!(read(&r.dst, "opt/app/b"), "B");
}

// moby/moby#47367: `COPY rootfs /` onto an image whose /bin -> usr/bin.
#[test]
fn directory_merges_through_symlinked_dir_in_dest() {
    let r = roots();
    write(&r.src, "rootfs/bin/foo.sh", "#!/bin/sh");
    write(&r.src, "rootfs/etc/conf", "c");
    fs_err::create_dir_all(r.dst.join("usr/bin")).unwrap();
    symlink("usr/bin", r.dst.join("bin")).unwrap();
    run(&r, &op(&["rootfs"], "/"));
    assert_eq!(read(&r.dst, "usr/bin/foo.sh"), "#!/bin/sh");
    assert!(
        r.dst
            .join("bin")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(read(&r.dst, "etc/conf"), "c");
    // A symlink to a file is still not a directory.
    write(&r.dst, "target", "t");
    symlink("/target", r.dst.join("lnk")).unwrap();
    write(&r.src, "tree/lnk/x", "x");
    let err = fileop::copy(&r.src, &r.dst, &op(&["tree"], "/")).unwrap_err();
    assert!(matches!(err, FileOpError::NotADirectory { .. }), "{err}");
}

#[test]
fn file_replaces_an_existing_symlink_not_its_target() {
    let r = roots();
    write(&r.src, "f", "new");
    write(&r.dst, "real", "old");
    symlink("real", r.dst.join("f")).unwrap();
    run(&r, &op(&["f"], "/"));
    assert_eq!(read(&r.dst, "real"), "old");
    let m = r.dst.join("f").symlink_metadata().unwrap();
    assert!(m.file_type().is_file());
    assert_eq!(read(&r.dst, "f"), "new");
    // A file never replaces a directory.
    fs_err::create_dir(r.dst.join("d")).unwrap();
    write(&r.src, "tree/d", "x");
    let err = fileop::copy(&r.src, &r.dst, &op(&["tree"], "/")).unwrap_err();
    assert!(
        matches!(err, FileOpError::ReplaceDirWithFile { .. }),
        "{err}"
    );
}

#[test]
fn file_onto_directory_goes_inside_it() {
    let r = roots();
    fs_err::create_dir(r.dst.join("d")).unwrap();
    write(&r.src, "d", "x");
    run(&r, &op(&["d"], "/d"));
    assert_eq!(read(&r.dst, "d/d"), "x");
}

#[test]
fn chmod_octal_and_symbolic_apply_to_files_and_dirs() {
    let r = roots();
    write(&r.src, "dir/f", "f");
    fs_err::set_permissions(r.src.join("dir/f"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut o = op(&["dir"], "/oct/");
    o.chmod = Some("0751".into());
    run(&r, &o);
    let mode = |p: &str| fs_err::metadata(r.dst.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("oct/f"), 0o751);
    let mut o = op(&["dir/f"], "/sym/f");
    o.chmod = Some("u+x,g-r,o+r".into());
    run(&r, &o);
    assert_eq!(mode("sym/f"), 0o704);
    let mut o = op(&["dir/f"], "/x");
    o.chmod = Some("u+z".into());
    let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
    assert!(matches!(err, FileOpError::BadChmod { .. }), "{err}");
}

#[test]
fn modes_mtimes_symlinks_and_hardlinks_are_preserved() {
    let r = roots();
    write(&r.src, "d/exe", "#!");
    fs_err::set_permissions(r.src.join("d/exe"), std::fs::Permissions::from_mode(0o751)).unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    filetime::set_file_mtime(
        r.src.join("d/exe"),
        filetime::FileTime::from_system_time(old),
    )
    .unwrap();
    symlink("exe", r.src.join("d/link")).unwrap();
    symlink("/nowhere/at/all", r.src.join("d/dangling")).unwrap();
    fs_err::hard_link(r.src.join("d/exe"), r.src.join("d/hard")).unwrap();
    fs_err::create_dir(r.src.join("d/sub")).unwrap();
    filetime::set_file_mtime(
        r.src.join("d/sub"),
        filetime::FileTime::from_system_time(old),
    )
    .unwrap();
    let rep = run(&r, &op(&["d"], "/out/d"));
    let m = fs_err::metadata(r.dst.join("out/d/exe")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o751);
    assert_eq!(m.mtime(), 1_000_000);
    assert_eq!(
        fs_err::read_link(r.dst.join("out/d/link")).unwrap(),
        Path::new("exe")
    );
    assert_eq!(
        fs_err::read_link(r.dst.join("out/d/dangling")).unwrap(),
        Path::new("/nowhere/at/all")
    );
    let h = fs_err::metadata(r.dst.join("out/d/hard")).unwrap();
    assert_eq!(h.ino(), m.ino(), "hard links stay linked");
    assert!(
        rep.written
            .iter()
            .any(|w| w.kind == fileop::EntryKind::Hardlink)
    );
    // A copied directory takes the source's mtime; the destination itself
    // is made like a parent (0755, now), as fsutil's `prepareTargetDir` does.
    let d = fs_err::metadata(r.dst.join("out/d/sub")).unwrap();
    assert_eq!(d.mtime(), 1_000_000);
    let top = fs_err::metadata(r.dst.join("out/d")).unwrap();
    assert_ne!(top.mtime(), 1_000_000);
    assert_eq!(top.mode() & 0o7777, 0o755);
}

#[test]
fn a_source_symlink_is_followed_inside_the_source_root() {
    let r = roots();
    write(&r.src, "real/data", "D");
    symlink("/real/data", r.src.join("link")).unwrap();
    let rep = run(&r, &op(&["link"], "/out/"));
    assert_eq!(rep.sources_read, ["real/data"]);
    // The entry keeps the name it was asked by.
    let m = r.dst.join("out/link").symlink_metadata().unwrap();
    assert!(m.file_type().is_file());
    assert_eq!(read(&r.dst, "out/link"), "D");
}

#[test]
fn created_time_overrides_every_mtime() {
    let r = roots();
    write(&r.src, "d/f", "f");
    let mut o = op(&["d"], "/new/deep/");
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(42);
    o.created_time = Some(epoch);
    run(&r, &o);
    for p in ["new", "new/deep", "new/deep/f"] {
        assert_eq!(fs_err::metadata(r.dst.join(p)).unwrap().mtime(), 42, "{p}");
    }
}

#[test]
fn exclude_patterns_skip_paths_below_the_source() {
    let r = roots();
    write(&r.src, "app/main.rs", "m");
    write(&r.src, "app/notes.txt", "n");
    write(&r.src, "app/target/big", "b");
    write(&r.src, "app/docs/keep.txt", "k");
    let mut o = op(&["app"], "/app/");
    o.exclude = vec!["*.txt".into(), "target".into()];
    run(&r, &o);
    assert!(r.dst.join("app/main.rs").exists());
    assert!(!r.dst.join("app/notes.txt").exists());
    assert!(!r.dst.join("app/target").exists());
    assert!(
        r.dst.join("app/docs/keep.txt").exists(),
        "*.txt is one segment"
    );
    let mut o = op(&["app"], "/app2/");
    o.exclude = vec!["docs".into(), "!docs/keep.txt".into()];
    run(&r, &o);
    assert!(r.dst.join("app2/docs/keep.txt").exists());
}

#[test]
fn exclude_applies_to_wildcard_matches() {
    let r = roots();
    write(&r.src, "home.txt", "t");
    write(&r.src, "home.rs", "r");
    write(&r.src, "homedir/x.txt", "x");
    let mut o = op(&["hom*"], "/mydir/");
    o.exclude = vec!["*.txt".into()];
    let rep = run(&r, &o);
    assert_eq!(rep.sources_read, ["home.rs", "homedir"]);
    assert!(!r.dst.join("mydir/home.txt").exists());
    assert!(r.dst.join("mydir/home.rs").exists());
    // Inside a copied directory, paths are relative to it.
    assert!(!r.dst.join("mydir/x.txt").exists());
}

#[test]
fn dockerignore_hides_context_paths() {
    let r = roots();
    write(&r.src, "src/a.rs", "a");
    write(&r.src, "secret.env", "s");
    write(&r.src, "logs/x.log", "l");
    let mut o = op(&["."], "/ctx/");
    o.ignore = Some(kiln_parser::PatternMatcher::new(["secret.env", "logs"]).unwrap());
    run(&r, &o);
    assert!(r.dst.join("ctx/src/a.rs").exists());
    assert!(!r.dst.join("ctx/secret.env").exists());
    assert!(!r.dst.join("ctx/logs").exists());
    let err = fileop::copy(&r.src, &r.dst, &o.clone_with_sources(&["secret.env"])).unwrap_err();
    assert!(matches!(err, FileOpError::SourceNotFound { .. }), "{err}");
    let mut w = op(&["*.env"], "/w/");
    w.ignore = o.ignore.clone();
    let rep = run(&r, &w);
    assert!(rep.sources_read.is_empty());
}

trait WithSources {
    fn clone_with_sources(&self, s: &[&str]) -> CopyOp;
}

impl WithSources for CopyOp {
    fn clone_with_sources(&self, s: &[&str]) -> CopyOp {
        let mut o = self.clone();
        o.sources = s.iter().map(|w| Source::classify(w)).collect();
        o
    }
}

#[test]
fn parents_keep_the_path_and_honour_the_pivot() {
    let r = roots();
    write(&r.src, "x/y/z/f", "f");
    write(&r.src, "x/y/w/g", "g");
    let mut o = op(&["x/y/z/f", "x/y/w"], "/dst/");
    o.parents = true;
    run(&r, &o);
    assert_eq!(read(&r.dst, "dst/x/y/z/f"), "f");
    assert_eq!(read(&r.dst, "dst/x/y/w/g"), "g");
    let mut o = op(&["./x/./y/z"], "/piv/");
    o.parents = true;
    run(&r, &o);
    assert_eq!(read(&r.dst, "piv/y/z/f"), "f");
    assert!(!r.dst.join("piv/x").exists());
    let mut o = op(&["x/*/z/f"], "/wild/");
    o.parents = true;
    run(&r, &o);
    assert_eq!(read(&r.dst, "wild/x/y/z/f"), "f");
}

#[test]
fn heredoc_sources_are_files_0644() {
    let r = roots();
    let mut o = op(&[], "/etc/");
    o.sources = vec![Source::Heredoc {
        name: "motd".into(),
        content: b"hello\n".to_vec(),
    }];
    run(&r, &o);
    assert_eq!(read(&r.dst, "etc/motd"), "hello\n");
    let m = fs_err::metadata(r.dst.join("etc/motd")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o644);
    let mut o = op(&[], "/bin/run.sh");
    o.sources = vec![Source::Heredoc {
        name: "EOF".into(),
        content: b"#!/bin/sh\n".to_vec(),
    }];
    o.chmod = Some("755".into());
    run(&r, &o);
    assert_eq!(
        fs_err::metadata(r.dst.join("bin/run.sh")).unwrap().mode() & 0o7777,
        0o755
    );
}

#[test]
fn link_into_an_empty_root_creates_parents() {
    let r = roots();
    write(&r.src, "bin/tool", "t");
    let mut o = op(&["bin/tool"], "/usr/local/bin/");
    o.source_kind = SourceKind::Stage;
    let rep = run(&r, &o);
    assert_eq!(read(&r.dst, "usr/local/bin/tool"), "t");
    let dirs: Vec<_> = rep
        .written
        .iter()
        .filter(|w| w.kind == fileop::EntryKind::Dir)
        .map(|w| w.path.as_str())
        .collect();
    assert_eq!(dirs, ["/usr", "/usr/local", "/usr/local/bin"]);
}

#[test]
fn copy_rejects_urls_and_git_and_misplaced_checksum() {
    let r = roots();
    let err = fileop::copy(&r.src, &r.dst, &op(&["http://127.0.0.1:1/x"], "/")).unwrap_err();
    assert!(matches!(err, FileOpError::UrlInCopy { .. }), "{err}");
    let mut o = op(&["git@github.com:moby/buildkit.git"], "/src");
    o.is_add = true;
    let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
    assert!(matches!(err, FileOpError::GitUnsupported { .. }), "{err}");
    write(&r.src, "a", "a");
    let mut o = op(&["a"], "/");
    o.checksum = Some(format!("sha256:{}", "0".repeat(64)));
    let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
    assert!(matches!(err, FileOpError::ChecksumNotAllowed), "{err}");
}

fn passwd(r: &Roots) {
    write(
        &r.dst,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
    );
    write(
        &r.dst,
        "etc/group",
        "root:x:0:\nappgrp:x:1001:\nstaff:x:50:app\n",
    );
}

#[test]
fn chown_by_name_and_id_from_the_destination_files() {
    let r = roots();
    passwd(&r);
    write(&r.src, "d/f", "f");
    let cases = [
        ("app", (1000, 1001)),
        ("app:staff", (1000, 50)),
        ("1234", (1234, 1234)),
        ("1234:staff", (1234, 50)),
        (":staff", (0, 50)),
        ("app:77", (1000, 77)),
    ];
    for (i, (spec, want)) in cases.iter().enumerate() {
        let mut o = op(&["d"], &format!("/c{i}/new/"));
        o.chown = Some((*spec).to_owned());
        run(&r, &o);
        if owners_checked() {
            for p in ["new", "new/f"] {
                let m = fs_err::metadata(r.dst.join(format!("c{i}/{p}"))).unwrap();
                assert_eq!((m.uid(), m.gid()), *want, "{spec} {p}");
            }
        }
    }
    let mut o = op(&["d"], "/bad/");
    o.chown = Some("nobody".into());
    let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
    assert!(
        matches!(err, FileOpError::UnknownId { what: "user", .. }),
        "{err}"
    );
    o.chown = Some("app:nogroup".into());
    let err = fileop::copy(&r.src, &r.dst, &o).unwrap_err();
    assert!(err.to_string().contains("`nogroup`"), "{err}");
    assert!(!r.dst.join("bad").exists());
}

#[test]
fn context_files_become_root_owned_stage_files_keep_owners() {
    if !owners_checked() {
        return;
    }
    let r = roots();
    write(&r.src, "f", "f");
    std::os::unix::fs::chown(r.src.join("f"), Some(4242), Some(4343)).unwrap();
    run(&r, &op(&["f"], "/ctx"));
    let m = fs_err::metadata(r.dst.join("ctx")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0));
    let mut o = op(&["f"], "/stage");
    o.source_kind = SourceKind::Stage;
    run(&r, &o);
    let m = fs_err::metadata(r.dst.join("stage")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4242, 4343));
}

#[test]
fn workdir_is_created_with_the_users_ownership() {
    let r = roots();
    passwd(&r);
    let rep = mkdir_workdir(&r.dst, "/srv/app", Some("app"), None, is_root()).unwrap();
    let paths: Vec<_> = rep.written.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(paths, ["/srv", "/srv/app"]);
    let m = fs_err::metadata(r.dst.join("srv/app")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o755);
    if owners_checked() {
        assert_eq!((m.uid(), m.gid()), (1000, 1001));
    }
    // Existing: nothing written; `/`: nothing.
    assert!(
        mkdir_workdir(&r.dst, "/srv/app", None, None, true)
            .unwrap()
            .written
            .is_empty()
    );
    assert!(
        mkdir_workdir(&r.dst, "/", None, None, true)
            .unwrap()
            .written
            .is_empty()
    );
    // Through a symlink, inside the root.
    symlink("/srv", r.dst.join("s")).unwrap();
    mkdir_workdir(&r.dst, "/s/other", None, None, is_root()).unwrap();
    assert!(r.dst.join("srv/other").is_dir());
    // A file in the way.
    write(&r.dst, "file", "x");
    let err = mkdir_workdir(&r.dst, "/file/sub", None, None, true).unwrap_err();
    assert!(matches!(err, FileOpError::NotADirectory { .. }), "{err}");
    let err = mkdir_workdir(&r.dst, "/w", Some("ghost"), None, true).unwrap_err();
    assert!(matches!(err, FileOpError::UnknownId { .. }), "{err}");
}

#[test]
fn resolve_sources_lists_what_the_op_reads() {
    let r = roots();
    write(&r.src, "a/x.txt", "x");
    write(&r.src, "a/y.txt", "y");
    write(&r.src, "b", "b");
    let got = fileop::resolve_sources(
        &r.src,
        &["a/*.txt".to_owned(), "b".to_owned(), "a".to_owned()],
        &fileop::ResolveOptions::default(),
    )
    .unwrap();
    let rel: Vec<_> = got
        .iter()
        .map(|e| (e.rel_path.as_str(), e.is_dir))
        .collect();
    assert_eq!(
        rel,
        [
            ("a/x.txt", false),
            ("a/y.txt", false),
            ("b", false),
            ("a", true)
        ]
    );
}

#[test]
fn xattrs_and_fifos_are_copied() {
    let r = roots();
    write(&r.src, "d/f", "f");
    nix::unistd::mkfifo(
        &r.src.join("d/pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    // overlayfs' own (as a stage's layer, read in its directory, may
    // have) are not copied: a snapshot would carry them to its overlays.
    let xattrs = match xattr::set(r.src.join("d/f"), "user.kiln", b"v1")
        .and_then(|()| xattr::set(r.src.join("d/f"), "user.overlay.origin", b"x"))
    {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the temp dir has no user xattrs: {e}"
            );
            false
        }
    };
    run(&r, &op(&["d"], "/out/"));
    let m = fs_err::symlink_metadata(r.dst.join("out/pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    assert_eq!(m.mode() & 0o7777, 0o640);
    if xattrs {
        let v = xattr::get(r.dst.join("out/f"), "user.kiln").unwrap();
        assert_eq!(v.as_deref(), Some(&b"v1"[..]));
        let names: Vec<_> = xattr::list(r.dst.join("out/f")).unwrap().collect();
        assert_eq!(names, ["user.kiln"], "{names:?}");
    }
}

#[test]
fn files_read_lists_exactly_what_the_copy_writes() {
    let r = roots();
    write(&r.src, "app/a.rs", "a");
    write(&r.src, "app/b.txt", "b");
    write(&r.src, "app/sub/c.rs", "c");
    write(&r.src, "app/sub/d.txt", "d");
    write(&r.src, "app/skip/e", "e");
    write(&r.src, "app/ign/f", "f");
    write(&r.src, "lone.rs", "l");
    let ignore = kiln_parser::PatternMatcher::new(["app/ign"]).unwrap();
    let exclude = kiln_parser::PatternMatcher::new(["*.txt", "skip"]).unwrap();
    let opts = fileop::ResolveOptions {
        parents: false,
        ignore: Some(&ignore),
        exclude: Some(&exclude),
    };
    let patterns = ["app".to_owned(), "*.rs".to_owned()];
    let entries = fileop::resolve_sources(&r.src, &patterns, &opts).unwrap();
    let read_paths = fileop::files_read(&entries, &opts).unwrap();
    assert_eq!(
        read_paths,
        // `*.txt` is matched from the top of the copied directory only
        // (patternmatcher rules), so `sub/d.txt` stays.
        [
            "app",
            "app/a.rs",
            "app/sub",
            "app/sub/c.rs",
            "app/sub/d.txt",
            "lone.rs"
        ]
    );
    let mut o = op(&["app", "*.rs"], "/out/");
    o.ignore = Some(ignore.clone());
    o.exclude = vec!["*.txt".into(), "skip".into()];
    let rep = run(&r, &o);
    let written: Vec<_> = rep
        .written
        .iter()
        .filter(|w| w.kind != fileop::EntryKind::Dir || w.path != "/out")
        .map(|w| w.path.clone())
        .collect();
    assert_eq!(
        written,
        [
            "/out/a.rs",
            "/out/sub",
            "/out/sub/c.rs",
            "/out/sub/d.txt",
            "/out/lone.rs"
        ]
    );
}

#[test]
fn planned_copy_ops_run() {
    use kiln_solver::graph::{self, CopySource, InputRef};
    let r = roots();
    write(&r.src, "bin/tool", "t");
    let planned = graph::CopyOp {
        add: false,
        from: InputRef::Stage { index: 0 },
        sources: vec![
            CopySource::Path {
                path: "bin/tool".into(),
            },
            CopySource::Heredoc {
                name: "note".into(),
                content: "hi\n".into(),
            },
        ],
        dest: "opt/".into(),
        workdir: "/srv".into(),
        chown: None,
        chmod: Some("0700".into()),
        link: true,
        parents: false,
        exclude: Vec::new(),
        checksum: None,
        unpack: None,
        keep_git_dir: false,
    };
    let mut o = CopyOp::from_plan(&planned);
    assert_eq!(o.source_kind, SourceKind::Stage);
    o.apply_ownership = is_root();
    run(&r, &o);
    assert_eq!(read(&r.dst, "srv/opt/tool"), "t");
    assert_eq!(read(&r.dst, "srv/opt/note"), "hi\n");
    let m = fs_err::metadata(r.dst.join("srv/opt/note")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o700);
}

#[test]
fn workdir_takes_the_fixed_time() {
    let r = roots();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
    mkdir_workdir(&r.dst, "/a/b/c", None, Some(t), is_root()).unwrap();
    for p in ["a", "a/b", "a/b/c"] {
        let m = fs_err::metadata(r.dst.join(p)).unwrap();
        assert_eq!(m.mtime(), 7, "{p}");
    }
}

/// With `record_contents`, the copy hands the layer writer what it wrote:
/// small xattr-free files written once, and nothing else. The layer hashed
/// with those contents is the layer hashed from the disk.
#[test]
fn recorded_contents_are_what_was_written_and_hash_to_the_same_layer() {
    let r = roots();
    write(&r.src, "d/a.txt", "alpha");
    write(&r.src, "d/sub/b.txt", "beta");
    write(&r.src, "over/a.txt", "second a");
    // Bigger than a recorded file may be.
    let big = "x".repeat(usize::try_from(kiln_cache::layer::known::MAX_FILE).unwrap() + 1);
    write(&r.src, "d/big.txt", &big);
    // Modes the copy creates files with directly, and ones it sets after.
    write(&r.src, "d/ro.txt", "read only");
    fs_err::set_permissions(
        r.src.join("d/ro.txt"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    write(&r.src, "d/suid", "set-id");
    fs_err::set_permissions(
        r.src.join("d/suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    write(&r.src, "d/x.txt", "with an xattr");
    let xattrs = xattr::set(r.src.join("d/x.txt"), "user.kiln", b"v").is_ok();
    assert!(
        xattrs || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but the temp dir has no user xattrs"
    );

    let mut o = op(&["d", "over"], "/out/");
    o.record_contents = true;
    let rep = run(&r, &o);
    let known = &rep.contents;
    assert_eq!(known.get(b"out/sub/b.txt"), Some(&b"beta"[..]));
    assert_eq!(known.get(b"out/ro.txt"), Some(&b"read only"[..]));
    assert_eq!(known.get(b"out/suid"), Some(&b"set-id"[..]));
    assert_eq!(read(&r.dst, "out/a.txt"), "second a");
    assert_eq!(
        known.get(b"out/a.txt"),
        None,
        "written twice: not vouched for"
    );
    assert_eq!(known.get(b"out/big.txt"), None, "too big to record");
    if xattrs {
        assert_eq!(known.get(b"out/x.txt"), None, "has an xattr");
    }
    let mode = |p: &str| fs_err::metadata(r.dst.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("out/ro.txt"), 0o444);
    assert_eq!(mode("out/suid"), 0o4755);
    assert_eq!(mode("out/sub/b.txt"), 0o644);

    // Hashed with the recorded contents or from the disk: one layer; and
    // the recorded contents were taken (a forged one changes the digest).
    let opts = kiln_cache::WriteOptions::default();
    let digest = |known: Option<kiln_cache::KnownFiles>| {
        let mut w = kiln_cache::HashingWriter::new(std::io::sink());
        match known {
            Some(k) => kiln_cache::layer::write_layer_reusing(&r.dst, &mut w, &opts, k).map(|_| ()),
            None => kiln_cache::write_layer(&r.dst, &mut w, &opts).map(|_| ()),
        }
        .unwrap();
        w.finish().1
    };
    assert_eq!(digest(Some(known.clone())), digest(None));
    let mut forged = kiln_cache::KnownFiles::default();
    forged.record(b"out/sub/b.txt", b"BETA");
    assert_ne!(digest(Some(forged)), digest(None));

    // Without `record_contents`, nothing is kept.
    let r2 = roots();
    write(&r2.src, "d/a.txt", "alpha");
    assert!(run(&r2, &op(&["d"], "/out/")).contents.is_empty());
}

/// The regular files below `root` as a COPY's keys `lstat` them (what a
/// copy into a prepared upper is handed), by path below `root`.
fn seen_files(root: &Path) -> kiln_cache::FileMap<String, kiln_solver::context::SeenFile> {
    let mut out = kiln_cache::FileMap::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs_err::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = fs_err::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                let id = fileop::FileIdentity::of(&m);
                out.insert(
                    rel,
                    kiln_solver::context::SeenFile {
                        id,
                        nlink: m.nlink(),
                    },
                );
            }
        }
    }
    out
}

/// Every entry below `root`: path, type and mode, content or link target.
fn tree(root: &Path) -> Vec<(String, u32, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs_err::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs_err::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let body = if m.is_dir() {
                stack.push(p.clone());
                String::new()
            } else if m.file_type().is_symlink() {
                fs_err::read_link(&p).unwrap().display().to_string()
            } else {
                fs_err::read_to_string(&p).unwrap()
            };
            // (Times from the sources: not those of the destination
            // directory the copy made, stamped as it wrote into it.)
            let body = if rel.contains('/') {
                format!("{body} @{}.{}", m.mtime(), m.mtime_nsec())
            } else {
                body
            };
            out.push((rel, m.mode(), body));
        }
    }
    out.sort();
    out
}

/// A copy into a prepared upper (the previous result, written in place)
/// keeps the files whose sources are unchanged (the same inodes, listed in
/// `kept` only), writes the changed and new ones, and removes what the
/// source no longer has or the `.dockerignore` now hides, directory by
/// directory: the upper ends up as a fresh copy would make it.
#[test]
fn a_prepared_copy_keeps_unchanged_files_and_removes_what_is_gone() {
    use std::sync::Arc;
    let r = roots();
    for f in [
        "a/f1",
        "a/f2",
        "a/sub/g1",
        "a/sub/g2",
        "b/h1",
        "b/deep/h2",
        "top.txt",
    ] {
        write(&r.src, f, f);
    }
    symlink("f1", r.src.join("a/link")).unwrap();
    // Sources changed within a clock tick of a copy are not remembered.
    std::thread::sleep(Duration::from_millis(200));
    let upper = r.dst.clone();
    let mut first = op(&["."], "/app/");
    first.reuse = Some(Arc::new(fileop::Reuse::new(
        None,
        Vec::new(),
        upper.clone(),
    )));
    let rep = run(&r, &first);
    assert!(rep.kept.is_empty());
    let prev = rep.remembered();
    // Seven regular files and five directories (not the link).
    assert_eq!(prev.len(), 12, "{prev:?}");
    let ino = |rel: &str| fs_err::symlink_metadata(upper.join(rel)).unwrap().ino();
    let (g2_ino, top_ino) = (ino("app/a/sub/g2"), ino("app/top.txt"));

    // Edit one file, remove another and a whole directory, add a file and a
    // directory, and hide one more file with the `.dockerignore`.
    write(&r.src, "a/f1", "edited");
    fs_err::remove_file(r.src.join("a/f2")).unwrap();
    fs_err::remove_dir_all(r.src.join("b")).unwrap();
    write(&r.src, "a/new", "new");
    write(&r.src, "c/x", "x");
    std::thread::sleep(Duration::from_millis(200));
    let mut second = op(&["."], "/app/");
    second.ignore = Some(kiln_parser::PatternMatcher::new(["a/sub/g1"]).unwrap());
    let mut reuse = fileop::Reuse::new(Some(upper.clone()), prev, upper.clone());
    reuse.prepared = true;
    reuse.seen = Some(Arc::new(seen_files(&r.src)));
    second.reuse = Some(Arc::new(reuse));
    let rep = run(&r, &second);

    // Kept: a/sub/g2 and top.txt, in place, listed only in `kept`.
    let mut kept: Vec<&str> = rep.kept.iter().map(|(p, _)| p.as_str()).collect();
    kept.sort_unstable();
    assert_eq!(kept, ["app/a/sub/g2", "app/top.txt"]);
    assert_eq!((ino("app/a/sub/g2"), ino("app/top.txt")), (g2_ino, top_ino));
    assert!(
        !rep.written.iter().any(|w| w.path == "/app/top.txt"),
        "{:?}",
        rep.written
    );
    assert!(rep.written.iter().any(|w| w.path == "/app/a/f1"));
    // What the next run remembers: the kept files and the ones written.
    let prev = rep.remembered();
    let next: Vec<&str> = prev.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        next,
        [
            "app",
            "app/a",
            "app/a/f1",
            "app/a/new",
            "app/a/sub",
            "app/a/sub/g2",
            "app/c",
            "app/c/x",
            "app/top.txt"
        ]
    );

    // The upper is what a fresh copy of the sources makes.
    let fresh = r._tmp.path().join("fresh");
    fs_err::create_dir(&fresh).unwrap();
    let mut clean = op(&["."], "/app/");
    clean.ignore = second.ignore.clone();
    fileop::copy(&r.src, &fresh, &clean).unwrap();
    assert_eq!(tree(&upper), tree(&fresh));
    assert!(!upper.join("app/b").exists());
    assert!(!upper.join("app/a/f2").exists());
    assert!(!upper.join("app/a/sub/g1").exists());

    // A third run after one more edit: the directories whose sources are
    // as they were, every entry copied, are neither read again nor given
    // their metadata again (their ctimes stay); the edited file's
    // directory is.
    let ctime = |rel: &str| {
        let m = fs_err::symlink_metadata(upper.join(rel)).unwrap();
        (m.ctime(), m.ctime_nsec())
    };
    let before = (ctime("app/c"), ctime("app/a/sub"), ctime("app/a"));
    write(&r.src, "a/f1", "edited again");
    std::thread::sleep(Duration::from_millis(200));
    let mut third = op(&["."], "/app/");
    third.ignore = second.ignore.clone();
    let mut reuse = fileop::Reuse::new(Some(upper.clone()), prev, upper.clone());
    reuse.prepared = true;
    reuse.seen = Some(Arc::new(seen_files(&r.src)));
    third.reuse = Some(Arc::new(reuse));
    let rep = run(&r, &third);
    let written: Vec<&str> = rep.written.iter().map(|w| w.path.as_str()).collect();
    // (A symlink is made anew each time.)
    assert_eq!(written, ["/app/a/f1", "/app/a/link"]);
    assert_eq!(ctime("app/c"), before.0);
    // (One with an entry the patterns leave out is gone through again.)
    assert_ne!(ctime("app/a/sub"), before.1);
    assert_ne!(ctime("app/a"), before.2);
    let fresh = r._tmp.path().join("fresh2");
    fs_err::create_dir(&fresh).unwrap();
    fileop::copy(&r.src, &fresh, &clean).unwrap();
    assert_eq!(tree(&upper), tree(&fresh));

    // A file the `.dockerignore` now hides in such a directory is still
    // removed (not every entry was gone through).
    let prev = rep.remembered();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = op(&["."], "/app/");
    fourth.ignore = Some(kiln_parser::PatternMatcher::new(["a/sub/g1", "c/x"]).unwrap());
    let mut reuse = fileop::Reuse::new(Some(upper.clone()), prev, upper.clone());
    reuse.prepared = true;
    reuse.seen = Some(Arc::new(seen_files(&r.src)));
    fourth.reuse = Some(Arc::new(reuse));
    let rep = run(&r, &fourth);
    assert!(
        rep.written
            .iter()
            .all(|w| w.kind == fileop::EntryKind::Symlink),
        "{:?}",
        rep.written
    );
    assert!(!upper.join("app/c/x").exists());
    let fresh = r._tmp.path().join("fresh3");
    fs_err::create_dir(&fresh).unwrap();
    let mut clean = op(&["."], "/app/");
    clean.ignore = fourth.ignore.clone();
    fileop::copy(&r.src, &fresh, &clean).unwrap();
    assert_eq!(tree(&upper), tree(&fresh));
}
