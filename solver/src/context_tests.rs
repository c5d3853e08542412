//! Context checksum and stat cache tests on real directories.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use super::*;

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d).expect("mkdir");
    }
    fs_err::write(&p, content).expect("write");
}

fn ctx(root: &Path, ignore: &[&str]) -> BuildContext {
    let m = (!ignore.is_empty()).then(|| PatternMatcher::new(ignore).expect("patterns"));
    BuildContext::new(root, m)
}

fn sum(c: &mut BuildContext, srcs: &[&str]) -> ContextChecksum {
    let srcs: Vec<String> = srcs.iter().map(|s| (*s).to_owned()).collect();
    c.checksum(&srcs, &[], false).expect("checksum")
}

fn paths(c: &ContextChecksum) -> Vec<&str> {
    c.files.iter().map(|f| f.path.as_str()).collect()
}

#[test]
fn lists_exactly_the_files_a_source_reads() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "src/main.rs", "fn main() {}");
    write(d.path(), "src/lib/a.rs", "a");
    write(d.path(), "README", "r");
    write(d.path(), "x.txt", "x");
    write(d.path(), "y.txt", "y");
    let mut c = ctx(d.path(), &[]);
    let s = sum(&mut c, &["src"]);
    assert_eq!(paths(&s), ["src", "src/lib", "src/lib/a.rs", "src/main.rs"]);
    let s = sum(&mut c, &["*.txt"]);
    assert_eq!(paths(&s), ["x.txt", "y.txt"]);
    let s = sum(&mut c, &["./README", "/src/main.rs"]);
    assert_eq!(paths(&s), ["README", "src/main.rs"]);
    let e = c
        .checksum(&["nope".to_owned()], &[], false)
        .expect_err("missing source");
    assert!(e.to_string().contains("`nope`"), "{e}");
}

#[test]
fn digest_ignores_times_but_sees_content_mode_and_links() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "a/f", "one");
    std::os::unix::fs::symlink("f", d.path().join("a/l")).expect("symlink");
    let mut c = ctx(d.path(), &[]);
    let base = sum(&mut c, &["a"]);
    // mtime only: same digest.
    filetime::set_file_mtime(
        d.path().join("a/f"),
        filetime::FileTime::from_unix_time(1_000_000, 0),
    )
    .expect("mtime");
    assert_eq!(sum(&mut c, &["a"]).digest, base.digest);
    // Content.
    write(d.path(), "a/f", "two");
    let changed = sum(&mut c, &["a"]);
    assert_ne!(changed.digest, base.digest);
    write(d.path(), "a/f", "one");
    assert_eq!(sum(&mut c, &["a"]).digest, base.digest);
    // Mode.
    fs_err::set_permissions(d.path().join("a/f"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    assert_ne!(sum(&mut c, &["a"]).digest, base.digest);
    fs_err::set_permissions(d.path().join("a/f"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let restored = sum(&mut c, &["a"]);
    // Link target.
    fs_err::remove_file(d.path().join("a/l")).expect("rm");
    std::os::unix::fs::symlink("g", d.path().join("a/l")).expect("symlink");
    let relinked = sum(&mut c, &["a"]);
    assert_ne!(relinked.digest, restored.digest);
    let l = relinked
        .files
        .iter()
        .find(|f| f.path == "a/l")
        .expect("link entry");
    assert_eq!(l.kind, EntryType::Symlink);
    assert_eq!(l.link_target.as_deref(), Some("g"));
    // A file rename inside the source changes the digest.
    fs_err::rename(d.path().join("a/f"), d.path().join("a/f2")).expect("rename");
    assert_ne!(sum(&mut c, &["a"]).digest, relinked.digest);
}

#[test]
fn symlinks_are_not_followed_out_of_the_context() {
    let outside = tempfile::tempdir().expect("tempdir");
    write(outside.path(), "secret", "s");
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "dir/f", "f");
    std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("dir/out"))
        .expect("symlink");
    let mut c = ctx(d.path(), &[]);
    let s = sum(&mut c, &["dir"]);
    let before = s.digest.clone();
    assert!(s.files.iter().all(|f| !f.path.contains("secret")));
    write(outside.path(), "secret", "changed");
    assert_eq!(sum(&mut c, &["dir"]).digest, before);
}

#[test]
fn dockerignore_hides_files_and_prunes_dirs() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "src/a.rs", "a");
    write(d.path(), "src/a.log", "log");
    write(d.path(), "src/target/big", "b");
    write(d.path(), "docs/keep.md", "k");
    write(d.path(), "docs/drop.md", "d");
    let mut c = ctx(
        d.path(),
        &["**/*.log", "src/target", "docs", "!docs/keep.md"],
    );
    let s = sum(&mut c, &["."]);
    assert_eq!(paths(&s), ["docs", "docs/keep.md", "src", "src/a.rs"]);
    let before = s.digest;
    // Changing an ignored file does not change the digest.
    write(d.path(), "src/a.log", "other");
    write(d.path(), "src/target/big", "other");
    assert_eq!(sum(&mut c, &["."]).digest, before);
    write(d.path(), "docs/keep.md", "changed");
    assert_ne!(sum(&mut c, &["."]).digest, before);
}

#[test]
fn exclude_patterns_apply_below_the_source() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "app/a.rs", "a");
    write(d.path(), "app/notes.txt", "n");
    write(d.path(), "app/sub/b.txt", "b");
    let mut c = ctx(d.path(), &[]);
    let s = c
        .checksum(
            &["app".to_owned()],
            &["*.txt".to_owned(), "sub".to_owned()],
            false,
        )
        .expect("checksum");
    assert_eq!(paths(&s), ["app", "app/a.rs"]);
}

#[test]
fn stat_cache_skips_unchanged_files_across_runs() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    for i in 0..20 {
        write(d.path(), &format!("f/{i}"), &format!("content {i}"));
    }
    let open = || {
        BuildContext::new(d.path(), None)
            .with_racy_window(Duration::ZERO)
            .with_stat_cache(StatCache::open(store.path()).expect("open"))
            .expect("load")
    };
    let mut c = open();
    let first = sum(&mut c, &["f"]);
    assert_eq!(c.stats().hashed, 20);
    assert_eq!(c.stats().cached, 0);
    c.flush().expect("flush");
    drop(c);
    assert!(store.path().join("statcache.db").exists());

    let mut c = open();
    let second = sum(&mut c, &["f"]);
    assert_eq!(second, first);
    assert_eq!(c.stats().hashed, 0);
    assert_eq!(c.stats().cached, 20);

    // An edit with the same size is still seen (mtime/ctime differ).
    write(d.path(), "f/3", "CONTENT 3");
    let third = sum(&mut c, &["f"]);
    assert_eq!(c.stats().hashed, 1);
    assert_ne!(third.digest, first.digest);
    let changed: Vec<&str> = third
        .files
        .iter()
        .zip(&first.files)
        .filter(|(a, b)| a.digest != b.digest)
        .map(|(a, _)| a.path.as_str())
        .collect();
    assert_eq!(changed, ["f/3"]);
}

#[test]
fn a_cached_file_whose_xattrs_change_is_seen() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    write(d.path(), "f/a", "a");
    write(d.path(), "f/b", "b");
    let open = || {
        BuildContext::new(d.path(), None)
            .with_racy_window(Duration::ZERO)
            .with_stat_cache(StatCache::open(store.path()).expect("open"))
            .expect("load")
    };
    let mut c = open();
    let first = sum(&mut c, &["f"]);
    c.flush().expect("flush");
    drop(c);
    // Hashed before, no xattrs then: served from the cache.
    let mut c = open();
    assert_eq!(sum(&mut c, &["f"]), first);
    assert_eq!(c.stats().cached, 2);
    // Setting an xattr moves ctime: the file is read (and hashed) again.
    if let Err(e) = xattr::set(d.path().join("f/a"), "user.kiln.test", b"1") {
        // Only a file system without user xattrs excuses this, never CI.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "setting a user xattr in {}: {e}",
            d.path().display()
        );
        return;
    }
    let mut c = open();
    let second = sum(&mut c, &["f"]);
    assert_eq!(c.stats().cached, 1);
    assert_ne!(second.digest, first.digest);
}

#[test]
fn racy_files_are_not_cached() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    write(d.path(), "f", "x");
    let mut c = BuildContext::new(d.path(), None)
        .with_stat_cache(StatCache::open(store.path()).expect("open"))
        .expect("load");
    sum(&mut c, &["f"]);
    sum(&mut c, &["f"]);
    // Just written: within the default window, so hashed both times.
    assert_eq!(c.stats().hashed, 2);
}

#[test]
fn stat_cache_load_is_limited_to_the_context() {
    let store = tempfile::tempdir().expect("store");
    let mut cache = StatCache::open(store.path()).expect("open");
    let k = StatKey {
        size: 1,
        mtime_ns: 1,
        ctime_ns: 1,
        ino: 1,
        dev: 1,
        mode: 0o100644,
    };
    cache.record(Path::new("/ctx/a"), k, "sha256:a", true);
    cache.record(Path::new("/ctx/sub/b"), k, "sha256:b", false);
    cache.record(Path::new("/ctx0/c"), k, "sha256:c", true);
    cache.record(Path::new("/ctxx/d"), k, "sha256:d", true);
    cache.flush().expect("flush");
    let mut fresh = StatCache::open(store.path()).expect("open");
    assert_eq!(fresh.load(Path::new("/ctx")).expect("load"), 2);
    assert_eq!(
        fresh.lookup(Path::new("/ctx/sub/b"), &k),
        Some(("sha256:b", false))
    );
    assert_eq!(
        fresh.lookup(Path::new("/ctx/a"), &k),
        Some(("sha256:a", true))
    );
    let other = StatKey { size: 2, ..k };
    assert_eq!(fresh.lookup(Path::new("/ctx/a"), &other), None);
}

#[test]
fn open_reads_the_dockerignore_for_the_dockerfile() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "a.txt", "a");
    write(d.path(), "b.log", "b");
    write(d.path(), "c.md", "c");
    write(d.path(), ".dockerignore", "*.log\n");
    write(d.path(), "Dockerfile", "FROM scratch\n");
    let mut c = BuildContext::open(d.path(), &d.path().join("Dockerfile")).expect("open");
    let s = sum(&mut c, &["."]);
    assert!(paths(&s).contains(&"a.txt") && !paths(&s).contains(&"b.log"));
    // A Dockerfile-specific ignore file wins.
    write(d.path(), "app.Dockerfile", "FROM scratch\n");
    write(d.path(), "app.Dockerfile.dockerignore", "*.md\n");
    let mut c = BuildContext::open(d.path(), &d.path().join("app.Dockerfile")).expect("open");
    let s = sum(&mut c, &["."]);
    assert!(paths(&s).contains(&"b.log") && !paths(&s).contains(&"c.md"));
    write(d.path(), ".dockerignore", "!\n");
    let e = BuildContext::open(d.path(), &d.path().join("Dockerfile")).expect_err("bad pattern");
    assert!(matches!(e, ContextError::Ignore { .. }));
}
