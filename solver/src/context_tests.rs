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

/// The context `ctx` with the stat cache of `store` (no racy window).
fn cached_ctx(ctx: &Path, store: &Path) -> BuildContext {
    BuildContext::new(ctx, None)
        .with_racy_window(Duration::ZERO)
        .with_stat_cache(StatCache::open(store).expect("open"))
        .expect("load")
}

/// One build's checksum of `srcs` in `ctx` with the stat cache of `store`
/// (no racy window), flushed: the sum and the counters.
fn cached_run(ctx: &Path, store: &Path, srcs: &[&str]) -> (ContextChecksum, HashStats) {
    let mut c = cached_ctx(ctx, store);
    let s = sum(&mut c, srcs);
    c.flush().expect("flush");
    (s, c.stats())
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
    // Overlapping sources: each path once.
    let s = sum(&mut c, &["src/main.rs", "src", "src/lib"]);
    assert_eq!(paths(&s), ["src", "src/lib", "src/lib/a.rs", "src/main.rs"]);
    assert_eq!(s.digest, sum(&mut c, &["src"]).digest);
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
    // One thread or several: the same.
    let mut one = ctx(
        d.path(),
        &["**/*.log", "src/target", "docs", "!docs/keep.md"],
    )
    .with_threads(1);
    assert_eq!(sum(&mut one, &["."]), s);
    let mut three = ctx(
        d.path(),
        &["**/*.log", "src/target", "docs", "!docs/keep.md"],
    )
    .with_threads(3);
    assert_eq!(sum(&mut three, &["."]), s);
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
    let open = || cached_ctx(d.path(), store.path());
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
    let open = || cached_ctx(d.path(), store.path());
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
    // Dated an hour ahead (a clock that is behind, or a write just now):
    // racy however long the sums take.
    let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
    filetime::set_file_mtime(
        d.path().join("f"),
        filetime::FileTime::from_system_time(ahead),
    )
    .expect("mtime");
    let mut c = BuildContext::new(d.path(), None)
        .with_stat_cache(StatCache::open(store.path()).expect("open"))
        .expect("load");
    sum(&mut c, &["f"]);
    sum(&mut c, &["f"]);
    // Within the default window, so hashed both times.
    assert_eq!(c.stats().hashed, 2);
}

/// The racy window follows the times' granularity: 2 s for whole seconds
/// (a write later in the same second keeps them), 0.1 s for nanoseconds.
#[test]
fn the_racy_window_follows_the_granularity_of_the_times() {
    let now = std::time::SystemTime::now();
    let now_ns = i64::try_from(
        now.duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_nanos(),
    )
    .expect("fits");
    let key = |mtime_ns: i64, ctime_ns: i64| StatKey {
        size: 1,
        mtime_ns,
        ctime_ns,
        ino: 1,
        dev: 1,
        mode: 0o100644,
    };
    let window = 2_000_000_000;
    let fine = |ago_ms: i64| {
        let t = now_ns - ago_ms * 1_000_000;
        // Not a whole second.
        let t = if t % 1_000_000_000 == 0 { t - 1 } else { t };
        key(t, t)
    };
    assert!(fine(50).is_racy(now, window));
    assert!(!fine(500).is_racy(now, window));
    assert!(!fine(1500).is_racy(now, window));
    let whole = now_ns / 1_000_000_000 * 1_000_000_000 - 1_000_000_000;
    assert!(
        key(whole, whole).is_racy(now, window),
        "within 2 s, whole seconds"
    );
    assert!(!key(whole - 2_000_000_000, whole - 2_000_000_000).is_racy(now, window));
    // Either time with nanoseconds: they are kept.
    assert!(!key(whole, fine(500).ctime_ns).is_racy(now, window));
    // A smaller window than 0.1 s is kept as it is; none is none.
    assert!(!fine(50).is_racy(now, 10_000_000));
    assert!(!fine(0).is_racy(now, 0));
    // Times ahead of the clock are racy.
    assert!(fine(-5000).is_racy(now, window));
}

fn record(cache: &mut StatCache, root: &str, dir: &str, name: &str, k: StatKey, d: u8, free: bool) {
    cache.load(Path::new(root)).expect("load");
    cache.apply(vec![DirUpdate {
        dir: dir.to_owned(),
        listing: None,
        records: vec![StatRecord {
            name: name.into(),
            stat: k,
            digest: [d; 32],
            xattr_free: free,
        }],
    }]);
    cache.flush().expect("flush");
}

fn lookup(cache: &StatCache, dir: &str, name: &str) -> Option<CachedStat> {
    cache
        .index
        .dirs
        .get(dir)
        .and_then(|d| d.get(name.as_bytes()))
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
    record(&mut cache, "/ctx", "", "a", k, 1, true);
    record(&mut cache, "/ctx", "sub", "b", k, 2, false);
    record(&mut cache, "/ctx0", "", "c", k, 3, true);
    record(&mut cache, "/ctxx", "", "d", k, 4, true);
    drop(cache);
    let mut fresh = StatCache::open(store.path()).expect("open");
    assert_eq!(fresh.load(Path::new("/ctx")).expect("load"), 2);
    let b = lookup(&fresh, "sub", "b").expect("sub/b");
    assert_eq!((b.stat, b.digest, b.xattr_free), (k, [2; 32], false));
    let a = lookup(&fresh, "", "a").expect("a");
    assert_eq!((a.stat, a.digest, a.xattr_free), (k, [1; 32], true));
    assert_eq!(lookup(&fresh, "", "c"), None);
    assert_eq!(lookup(&fresh, "", "b"), None);
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

/// The entry digest as kiln has always computed it (the formula the cache
/// keys depend on), written out plainly.
fn reference_entry_digest(root: &Path, e: &FileEntry) -> String {
    let host = root.join(&e.path);
    let meta = fs_err::symlink_metadata(&host).expect("lstat");
    let mut h = Sha256::new();
    let header = format!(
        "{}\0{:?}\0{:o}\0{}\0{}\0{}\0{}\0",
        e.path,
        e.kind,
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        e.link_target.as_deref().unwrap_or(""),
        e.content.as_deref().unwrap_or(""),
    );
    h.update(header.as_bytes());
    if e.kind == EntryType::Special {
        h.update(format!("{}\0", meta.rdev()).as_bytes());
    }
    for (k, v) in &read_xattrs(&host) {
        h.update(k.as_bytes());
        h.update([b'=']);
        h.update(hex(v).as_bytes());
        h.update([0]);
    }
    format!("sha256:{}", hex(&h.finalize()))
}

#[test]
fn digests_keep_their_format_with_and_without_threads_and_cache() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    for i in 0..300 {
        write(
            d.path(),
            &format!("m{}/s{}/f{i}.c", i % 7, i % 3),
            &format!("int x{i};\n"),
        );
    }
    write(d.path(), "exec.sh", "#!/bin/sh\n");
    fs_err::set_permissions(
        d.path().join("exec.sh"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("m1/s1/f1.c", d.path().join("link")).expect("symlink");
    nix::unistd::mkfifo(&d.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let tagged = xattr::set(d.path().join("m0/s0/f0.c"), "user.kiln.t", b"\x01\xff").is_ok();
    assert!(tagged || std::env::var("CI").as_deref() != Ok("true"));
    let sum_with = |threads: usize, cache: bool| {
        let mut c = BuildContext::new(d.path(), None)
            .with_threads(threads)
            .with_racy_window(Duration::ZERO);
        if cache {
            c = c
                .with_stat_cache(StatCache::open(store.path()).expect("open"))
                .expect("load");
        }
        let s = sum(&mut c, &["."]);
        c.flush().expect("flush");
        (s, c.stats())
    };
    let (one, _) = sum_with(1, false);
    assert_eq!(one.files.len(), 300 + 7 + 7 * 3 + 3);
    for e in &one.files {
        assert_eq!(e.digest, reference_entry_digest(d.path(), e), "{}", e.path);
        // A file's content digest is BLAKE3 of its bytes.
        let content = (e.kind == EntryType::File).then(|| {
            let bytes = fs_err::read(d.path().join(&e.path)).expect("read");
            format!("blake3:{}", blake3::hash(&bytes).to_hex())
        });
        assert_eq!(e.content, content, "{}", e.path);
    }
    let mut h = Sha256::new();
    for e in &one.files {
        h.update(e.path.as_bytes());
        h.update([0]);
        h.update(e.digest.as_bytes());
        h.update([b'\n']);
    }
    assert_eq!(one.digest, format!("sha256:{}", hex(&h.finalize())));
    let fifo = one.files.iter().find(|f| f.path == "fifo").expect("fifo");
    assert_eq!(fifo.kind, EntryType::Special);
    // Threads and the stat cache (filling, then used) change nothing.
    let (four, _) = sum_with(4, false);
    assert_eq!(four, one);
    let (filled, s) = sum_with(2, true);
    assert_eq!(filled, one);
    assert_eq!((s.hashed, s.cached), (301, 0));
    let (cached, s) = sum_with(3, true);
    assert_eq!(cached, one);
    assert_eq!((s.hashed, s.cached), (0, 301));
}

#[test]
fn stat_cache_sees_every_stat_change_after_a_reload() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    for i in 0..40 {
        write(
            d.path(),
            &format!("d{}/f{i}", i % 4),
            &format!("content {i:03}"),
        );
    }
    let run = || cached_run(d.path(), store.path(), &["."]);
    let (first, _) = run();
    let (again, st) = run();
    assert_eq!(again, first);
    assert_eq!((st.hashed, st.cached), (0, 40));
    let digest_of = |s: &ContextChecksum, p: &str| {
        s.files
            .iter()
            .find(|f| f.path == p)
            .and_then(|f| f.content.clone())
            .expect("file")
    };
    // Same size, mtime put back: the ctime still tells.
    let f = d.path().join("d1/f1");
    let mtime =
        filetime::FileTime::from_last_modification_time(&fs_err::metadata(&f).expect("stat"));
    write(d.path(), "d1/f1", "CONTENT 001");
    filetime::set_file_mtime(&f, mtime).expect("mtime");
    let (s, st) = run();
    assert_eq!((st.hashed, st.cached), (1, 39));
    assert_ne!(digest_of(&s, "d1/f1"), digest_of(&first, "d1/f1"));
    // Replaced by another inode with the same content: hashed again, same
    // digest.
    write(d.path(), "d2/f2.new", "content 002");
    fs_err::rename(d.path().join("d2/f2.new"), d.path().join("d2/f2")).expect("rename");
    let (s2, st) = run();
    assert_eq!((st.hashed, st.cached), (1, 39));
    assert_eq!(s2, s);
    // A mode change.
    fs_err::set_permissions(
        d.path().join("d3/f3"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let (s3, st) = run();
    assert_eq!((st.hashed, st.cached), (1, 39));
    assert_ne!(s3.digest, s2.digest);
    // A removed file leaves its directory's row; a new one is hashed.
    fs_err::remove_file(d.path().join("d0/f0")).expect("rm");
    write(d.path(), "d0/new", "new");
    let (s4, st) = run();
    assert_eq!((st.hashed, st.cached), (1, 39));
    assert!(s4.files.iter().all(|f| f.path != "d0/f0"));
    let mut cache = StatCache::open(store.path()).expect("open");
    assert_eq!(cache.load(d.path()).expect("load"), 40);
    assert!(lookup(&cache, "d0", "f0").is_none());
    assert!(lookup(&cache, "d0", "new").is_some());
}

#[test]
fn a_stat_cache_of_an_older_kiln_is_not_trusted_and_is_replaced() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    for i in 0..10 {
        write(d.path(), &format!("s/f{i}"), &format!("c{i}"));
        write(d.path(), &format!("t/f{i}"), &format!("c{i}"));
    }
    let expected = sum(&mut BuildContext::new(d.path(), None), &["."]);
    let run = || cached_run(d.path(), store.path(), &["."]);
    assert_eq!(run().1.hashed, 20);
    // What older kilns wrote: sha256 content digests, in the per-file
    // table (for `t/`) and in version 1 parts (for `s/`), with stats that
    // match the files. Trusted, they would give `s/` and `t/` other keys.
    {
        let conn = rusqlite::Connection::open(store.path().join("statcache.db")).expect("db");
        let mut part: Vec<u8> = conn
            .query_row("SELECT entries FROM stat_parts WHERE dir = 's'", [], |r| {
                r.get(0)
            })
            .expect("part of s/");
        assert_eq!(part[0], 2, "parts are version 2");
        part[0] = 1;
        conn.execute(
            "UPDATE stat_parts SET entries = ?1 WHERE dir = 's'",
            [&part],
        )
        .expect("version 1");
        conn.execute("DELETE FROM stat_parts WHERE dir = 't'", [])
            .expect("delete t/");
        conn.execute_batch(
            "CREATE TABLE stat_cache (
                path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, dev INTEGER NOT NULL,
                mode INTEGER NOT NULL, digest TEXT NOT NULL
            ) WITHOUT ROWID;",
        )
        .expect("schema");
        for e in expected.files.iter().filter(|f| f.path.starts_with("t/f")) {
            let host = d.path().join(&e.path);
            let k = StatKey::of(&fs_err::metadata(&host).expect("stat"));
            let sha = hex(&Sha256::digest(fs_err::read(&host).expect("read")));
            conn.execute(
                "INSERT INTO stat_cache VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![
                    host.to_string_lossy(),
                    k.size as i64,
                    k.mtime_ns,
                    k.ctime_ns,
                    k.ino as i64,
                    k.dev as i64,
                    k.mode,
                    format!("sha256:{sha}")
                ],
            )
            .expect("row");
        }
    }
    let (s, st) = run();
    assert_eq!(s, expected);
    assert_eq!((st.hashed, st.cached), (20, 0));
    // Written in the new form: the next run uses it.
    let (s, st) = run();
    assert_eq!(s, expected);
    assert_eq!((st.hashed, st.cached), (0, 20));
}

#[test]
fn a_damaged_stat_cache_row_only_costs_a_rehash() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    write(d.path(), "a/x", "x");
    write(d.path(), "a/y", "y");
    let run = || cached_run(d.path(), store.path(), &["."]);
    let (first, _) = run();
    let conn = rusqlite::Connection::open(store.path().join("statcache.db")).expect("db");
    for bad in [&b""[..], &[1, 200, 0, 1][..], &[9; 100][..]] {
        conn.execute("UPDATE stat_parts SET entries = ?1 WHERE dir = 'a'", [bad])
            .expect("update");
        let (s, st) = run();
        assert_eq!(s, first);
        assert_eq!((st.hashed, st.cached), (2, 0));
    }
}

fn part_rows(store: &Path) -> Vec<(String, i64, Vec<u8>)> {
    let conn = rusqlite::Connection::open(store.join("statcache.db")).expect("db");
    let mut st = conn
        .prepare("SELECT dir, part, entries FROM stat_parts ORDER BY dir, part")
        .expect("query");
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn a_huge_directory_is_stored_in_parts_and_one_edit_rewrites_one() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    for i in 0..4000 {
        write(d.path(), &format!("big/f{i}"), &format!("{i}"));
    }
    let run = || cached_run(d.path(), store.path(), &["big"]);
    run();
    let rows = part_rows(store.path());
    assert_eq!(rows.iter().filter(|r| r.0 == "big").count(), 1);
    // Grown past a part: split in two, all still found.
    for i in 4000..4200 {
        write(d.path(), &format!("big/f{i}"), &format!("{i}"));
    }
    let (_, st) = run();
    assert_eq!((st.hashed, st.cached), (200, 4000));
    let before = part_rows(store.path());
    assert_eq!(before.iter().filter(|r| r.0 == "big").count(), 2);
    let (first, st) = run();
    assert_eq!((st.hashed, st.cached), (0, 4200));
    // One file edited: one part rewritten.
    write(d.path(), "big/f7", "seven");
    let (edited, st) = run();
    assert_eq!((st.hashed, st.cached), (1, 4199));
    assert_ne!(edited.digest, first.digest);
    let after = part_rows(store.path());
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(changed, 1);
}

#[test]
fn a_directory_that_shrank_drops_its_extra_parts() {
    let store = tempfile::tempdir().expect("store");
    let k = StatKey {
        size: 1,
        mtime_ns: 1,
        ctime_ns: 1,
        ino: 1,
        dev: 1,
        mode: 0o100644,
    };
    let rec = |i: usize| StatRecord {
        name: format!("f{i}").into(),
        stat: k,
        digest: [7; 32],
        xattr_free: true,
    };
    let mut cache = StatCache::open(store.path()).expect("open");
    cache.load(Path::new("/ctx")).expect("load");
    cache.apply(vec![DirUpdate {
        dir: "d".into(),
        listing: None,
        records: (0..9000).map(rec).collect(),
    }]);
    cache.flush().expect("flush");
    assert_eq!(part_rows(store.path()).len(), 4);
    // Read whole again, with only 20 files left.
    let mut cache = StatCache::open(store.path()).expect("open");
    assert_eq!(cache.load(Path::new("/ctx")).expect("load"), 9000);
    let listing: Vec<std::ffi::OsString> = (0..20).map(|i| format!("f{i}").into()).collect();
    cache.apply(vec![DirUpdate {
        dir: "d".into(),
        listing: Some(listing),
        records: (0..20).map(rec).collect(),
    }]);
    cache.flush().expect("flush");
    let rows = part_rows(store.path());
    assert_eq!(rows.len(), 1);
    let mut cache = StatCache::open(store.path()).expect("open");
    assert_eq!(cache.load(Path::new("/ctx")).expect("load"), 20);
    assert!(lookup(&cache, "d", "f19").is_some());
    assert!(lookup(&cache, "d", "f20").is_none());
}

#[test]
fn a_stage_hashes_big_files_through_a_mapping_to_the_same_digest() {
    let d = tempfile::tempdir().expect("ctx");
    let big: Vec<u8> = (0..(2 << 20) + 7).map(|i: u32| (i % 251) as u8).collect();
    fs_err::create_dir_all(d.path().join("out")).expect("mkdir");
    fs_err::write(d.path().join("out/big"), &big).expect("big");
    write(d.path(), "out/small", "s");
    let read = sum(&mut BuildContext::new(d.path(), None), &["out"]);
    let mut stage = BuildContext::of_stage(d.path());
    let mapped = sum(&mut stage, &["out"]);
    assert_eq!(mapped, read);
    assert_eq!(stage.stats().hashed, 2);
    assert_eq!(stage.stats().bytes, big.len() as u64 + 1);
}

#[test]
fn a_stage_takes_its_top_layers_digests_instead_of_reading_the_files() {
    let d = tempfile::tempdir().expect("ctx");
    let big: Vec<u8> = (0..(2 << 20) + 9).map(|i: u32| (i % 241) as u8).collect();
    fs_err::create_dir_all(d.path().join("out")).expect("mkdir");
    fs_err::write(d.path().join("out/big"), &big).expect("big");
    write(d.path(), "out/small", "s");
    write(d.path(), "out/other", "not in the layer's digests");
    let read = sum(&mut BuildContext::new(d.path(), None), &["out"]);
    // The digests a layer writer took of the same files.
    let mut out = Vec::new();
    let (_, _, digests) = kiln_cache::layer::write_layer_digesting(
        d.path(),
        &mut out,
        &kiln_cache::WriteOptions::default(),
        None,
    )
    .expect("layer");
    let mut only_two = kiln_cache::ContentDigests::default();
    for name in ["out/big", "out/small"] {
        let size = fs_err::metadata(d.path().join(name)).expect("stat").len();
        let digest = digests.get(name.as_bytes(), size).expect("digest taken");
        only_two.insert(name.as_bytes().to_vec(), size, digest);
    }
    let mut stage =
        BuildContext::of_stage(d.path()).with_top_layer_digests(std::sync::Arc::new(only_two));
    assert_eq!(sum(&mut stage, &["out"]), read);
    assert_eq!(stage.stats().from_layer, 2);
    assert_eq!(
        stage.stats().hashed,
        1,
        "only the file without a digest is read"
    );
    // The digests are taken as given (a wrong one changes the sum), and
    // only for the size they were taken at.
    let mut forged = kiln_cache::ContentDigests::default();
    forged.insert(b"out/small".to_vec(), 1, [7; 32]);
    let mut stage =
        BuildContext::of_stage(d.path()).with_top_layer_digests(std::sync::Arc::new(forged));
    assert_ne!(sum(&mut stage, &["out"]), read);
    let mut resized = kiln_cache::ContentDigests::default();
    resized.insert(b"out/small".to_vec(), 2, [7; 32]);
    let mut stage =
        BuildContext::of_stage(d.path()).with_top_layer_digests(std::sync::Arc::new(resized));
    assert_eq!(sum(&mut stage, &["out"]), read);
    assert_eq!(stage.stats().from_layer, 0);
}
