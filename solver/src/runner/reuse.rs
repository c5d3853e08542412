//! Where a context COPY finds its previous result to link unchanged files
//! from ([`crate::fileop::Reuse`]), and where it leaves its own for the next
//! build: a memo per COPY under `<store>/copy-memo/`, named by a digest of
//! everything but the context's content (the instruction, the parent
//! layers, `SOURCE_DATE_EPOCH`). A memo only points at a snapshot; a memo
//! whose snapshot is gone links nothing.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cache::{Digest, KnownFiles, Store};
use sha2::{Digest as _, Sha256};

use super::Chain;
use crate::context::SeenFile;
use crate::fileop::{CopyMemo, MemoContents, Reuse};
use crate::graph::CopyOp;

/// Forgets every COPY memo of the store (`kiln prune --all`): the next run
/// of each COPY copies everything again.
pub fn clear_memos(store: &Store) -> std::io::Result<()> {
    match fs_err::remove_dir_all(store.root().join("copy-memo")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The memo file of `op` on `parent`.
pub(super) fn memo_path(
    store: &Store,
    op: &CopyOp,
    parent: &Chain,
    epoch: Option<i64>,
) -> Option<PathBuf> {
    let def = serde_json::to_vec(op).ok()?;
    let mut h = Sha256::new();
    h.update(b"kiln-copy-reuse-v2\0");
    h.update(&def);
    for l in &parent.layers {
        h.update(b"\0");
        h.update(l.diff_id.to_string().as_bytes());
    }
    h.update(format!("\0{epoch:?}").as_bytes());
    Some(
        store
            .root()
            .join("copy-memo")
            .join(crate::context::hex(&h.finalize())),
    )
}

/// What a context COPY found in its memo: the previous result (its layer
/// and snapshot), the identities of the sources it was made from, and the
/// contents of its small files.
pub(super) struct Loaded {
    /// The previous result's layer and snapshot, when the snapshot is here.
    pub prev: Option<(Digest, PathBuf)>,
    files: Vec<(String, crate::fileop::FileIdentity)>,
    /// Parsed by the layer commit (see [`CopyMemo::load_deferred`]).
    pub known: Option<MemoContents>,
    /// Whether there was a memo at all (this COPY ran before).
    pub had_memo: bool,
}

/// What the memo at `memo` says.
pub(super) fn load(store: &Store, memo: &Path) -> Loaded {
    match CopyMemo::load_deferred(memo) {
        Some((m, contents)) => {
            let prev = m
                .diff_id
                .parse::<Digest>()
                .ok()
                .and_then(|d| store.snapshot_dir(&d).map(|dir| (d, dir)));
            let known = prev.is_some().then_some(contents);
            Loaded {
                prev,
                files: m.files,
                known,
                had_memo: true,
            }
        }
        None => Loaded {
            prev: None,
            files: Vec::new(),
            known: None,
            had_memo: false,
        },
    }
}

impl Loaded {
    /// The previous result's snapshot is now `upper` (taken over with
    /// `Store::take_snapshot`): the copy starts from it as from a clone.
    pub(super) fn taken_as(&mut self, upper: &Path) {
        if let Some((_, dir)) = &mut self.prev {
            *dir = upper.to_owned();
        }
    }

    /// The reuse for a copy writing into `upper`. With `prepared`, `upper`
    /// already holds a clone of the previous result (see [`prepare`]), and
    /// the context files as the keys' checksums found them are given.
    pub(super) fn reuse(
        &mut self,
        upper: &Path,
        prepared: Option<Arc<kiln_cache::FileMap<String, SeenFile>>>,
    ) -> Arc<Reuse> {
        let mut reuse = Reuse::new(
            self.prev.as_ref().map(|(_, dir)| dir.clone()),
            std::mem::take(&mut self.files),
            upper.to_owned(),
        );
        reuse.prepared = prepared.is_some();
        reuse.seen = prepared.filter(|s| !s.is_empty());
        Arc::new(reuse)
    }
}

// ------------------------------------------------------------- prepared

/// The size (bytes of tar) below which a context COPY's result keeps its
/// tar as a blob, so that its next run takes the snapshot over
/// (`Store::take_snapshot`) instead of a clone being made for it. Above,
/// the blob would cost more than the clone.
/// (`KILN_TAKE_BELOW` sets another limit, in bytes: tests of the clones
/// use 0.)
pub(super) fn small_layer() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("KILN_TAKE_BELOW")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64 << 20)
    })
}

/// The directory of prepared clones (see [`prepare`]).
fn prepared_dir(store: &Store) -> PathBuf {
    store.root().join("copy-memo").join("prepared")
}

/// The name of the clone of `diff_id`'s snapshot for the COPY of `memo`.
fn prepared_name(memo: &Path, diff_id: &Digest) -> Option<(String, String)> {
    let key = memo.file_name()?.to_str()?;
    Some((format!("{key}-"), format!("{key}-{}", diff_id.hex())))
}

/// Takes the clone [`prepare`] left of `diff_id`'s snapshot for the COPY
/// of `memo`, moving it to `upper` (which must not exist yet). True when
/// there was one: `upper` then holds the previous result, every entry but
/// the directories a hard link to the snapshot's.
pub(super) fn claim_prepared(store: &Store, memo: &Path, diff_id: &Digest, upper: &Path) -> bool {
    let Some((_, name)) = prepared_name(memo, diff_id) else {
        return false;
    };
    fs_err::rename(prepared_dir(store).join(name), upper).is_ok()
}

/// Whether a COPY may start from its last result: a clone waits for its
/// next run, or a memo may let it take its last snapshot over (else the
/// keys need not keep their `lstat`s for it).
pub fn has_prepared(store: &Store) -> bool {
    fs_err::read_dir(prepared_dir(store)).is_ok_and(|mut d| d.next().is_some())
        || fs_err::read_dir(store.root().join("copy-memo"))
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != "prepared")))
}

/// The prepared clones (`kiln system df`): how many, and the bytes of the
/// files only they still hold (their snapshot is gone; `kiln prune` frees
/// them). Their other files are the snapshots' own inodes.
pub fn prepared_usage(store: &Store) -> (u64, u64) {
    let Ok(clones) = fs_err::read_dir(prepared_dir(store)) else {
        return (0, 0);
    };
    let (mut count, mut only) = (0, 0);
    for clone in clones.flatten() {
        count += 1;
        let mut stack = vec![clone.path()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs_err::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(m) = e.metadata() else {
                    continue;
                };
                if m.is_dir() {
                    stack.push(e.path());
                } else if m.is_file() && m.nlink() == 1 {
                    only += m.len();
                }
            }
        }
    }
    (count, only)
}

/// Forgets every prepared clone (`kiln prune`): they hold the inodes of
/// the snapshots they were made from.
pub fn clear_prepared(store: &Store) -> std::io::Result<()> {
    discard(store, &prepared_dir(store))
}

/// Removes the prepared clones whose snapshot is gone (a GC collected its
/// layer): no COPY can start from them any more (see [`claim_prepared`]),
/// and they hold the collected files' inodes. The others stay for their
/// next run.
pub fn clear_orphaned_prepared(store: &Store) -> std::io::Result<()> {
    let entries = match fs_err::read_dir(prepared_dir(store)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let layer = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, hex)| format!("sha256:{hex}").parse::<Digest>().ok());
        if layer.is_none_or(|d| store.snapshot_dir(&d).is_none()) {
            discard(store, &entry.path())?;
        }
    }
    Ok(())
}

/// Removes `path` (a clone, or the clones' directory) without racing a
/// build that claims a clone: it is first renamed away whole (a claim
/// after that finds nothing), then removed; deleting it in place could
/// empty a clone another build has just taken as its upper.
fn discard(store: &Store, path: &Path) -> std::io::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let trash = store
        .root()
        .join("tmp")
        .join(format!("trash-{}-{n}", std::process::id()));
    match fs_err::rename(path, &trash) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => fs_err::remove_dir_all(&trash),
    }
}

/// For the next run of the COPY of `memo`: clones `snapshot` (the layer
/// `diff_id` it just made) into `scratch/tree` — the same directories,
/// every other entry hard-linked — and leaves it under
/// `copy-memo/prepared/`, replacing older clones for that COPY. The next
/// run takes the clone as its upper directory and only writes what
/// changed, instead of linking every unchanged file while the build waits.
/// This runs beside the build's later steps. Nothing is left when the
/// snapshot has overlay whiteouts or opaque directories (a clone would not
/// mean the same as a fresh upper) or a step fails.
pub(super) fn prepare(
    store: &Store,
    memo: &Path,
    diff_id: &Digest,
    snapshot: &Path,
    scratch: &Path,
) -> std::io::Result<bool> {
    if !clone_for_next(open_dir(None, snapshot)?, scratch)? {
        return Ok(false);
    }
    publish(store, memo, diff_id, scratch)
}

/// The first half of [`prepare`]: clones the tree of `src` (an open
/// directory: it may be moved meanwhile, as a COPY's upper becomes its
/// snapshot) into `scratch/tree`. False when it cannot stand for a fresh
/// upper (see [`prepare`]).
pub(super) fn clone_for_next(src: OwnedFd, scratch: &Path) -> std::io::Result<bool> {
    clone_tree(src, &scratch.join("tree"))
}

/// The second half of [`prepare`]: leaves `scratch/tree` as the clone of
/// `diff_id` for the COPY of `memo`, replacing older clones for it.
pub(super) fn publish(
    store: &Store,
    memo: &Path,
    diff_id: &Digest,
    scratch: &Path,
) -> std::io::Result<bool> {
    let Some((prefix, name)) = prepared_name(memo, diff_id) else {
        return Ok(false);
    };
    let tree = scratch.join("tree");
    let dir = prepared_dir(store);
    fs_err::create_dir_all(&dir)?;
    for e in fs_err::read_dir(&dir)?.flatten() {
        let n = e.file_name();
        if n.to_str().is_some_and(|n| n.starts_with(&prefix)) {
            discard(store, &e.path())?;
        }
    }
    // (Published whole: a claim sees all of it or nothing.)
    fs_err::rename(&tree, dir.join(&name))?;
    Ok(true)
}

/// Opens the directory `path` (relative to `dir` if given), not following
/// a symlink.
pub(super) fn open_dir(dir: Option<&OwnedFd>, path: &Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let at = dir.map_or(nix::fcntl::AT_FDCWD, std::os::fd::AsFd::as_fd);
    openat(
        at,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
}

/// A directory's metadata, as the clone gives it to its copy.
struct DirMeta {
    uid: u32,
    gid: u32,
    mode: u32,
    atime: filetime::FileTime,
    mtime: filetime::FileTime,
    xattrs: Vec<(std::ffi::OsString, Vec<u8>)>,
}

/// The metadata of the open directory `fd`; `None` for an opaque one
/// (which a clone cannot stand for).
fn dir_meta(fd: &OwnedFd) -> std::io::Result<Option<DirMeta>> {
    use xattr::FileExt as _;
    let f = std::fs::File::from(fd.try_clone()?);
    let m = f.metadata()?;
    let mut xattrs = Vec::new();
    for name in f.list_xattr()? {
        let n = name.as_encoded_bytes();
        if n.starts_with(b"trusted.overlay.") || n.starts_with(b"user.overlay.") {
            if n.ends_with(b".opaque") {
                return Ok(None);
            }
            continue;
        }
        if let Some(v) = f.get_xattr(&name)? {
            xattrs.push((name, v));
        }
    }
    Ok(Some(DirMeta {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode() & 0o7777,
        atime: filetime::FileTime::from_last_access_time(&m),
        mtime: filetime::FileTime::from_last_modification_time(&m),
        xattrs,
    }))
}

/// Clones the tree of the open directory `src` into `dest` (made here):
/// directories with their owner, mode, times and xattrs, everything else
/// hard-linked. Works through file descriptors only, so `src` may be
/// renamed meanwhile. False (and `dest` partly made) when `src` holds an
/// overlay whiteout or an opaque directory.
fn clone_tree(src: OwnedFd, dest: &Path) -> std::io::Result<bool> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{Mode, fstatat};
    fs_err::create_dir(dest)?;
    // (source dir fd, dest dir fd, dest path)
    let mut stack = vec![(src, open_dir(None, dest)?, dest.to_path_buf())];
    // Directories whose metadata is set once their entries are in.
    let mut finish: Vec<(PathBuf, DirMeta)> = Vec::new();
    while let Some((sfd, dfd, dpath)) = stack.pop() {
        let mut d = nix::dir::Dir::from_fd(sfd.try_clone()?)?;
        let mut subdirs = Vec::new();
        for entry in d.iter() {
            let entry = entry?;
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let kind = match entry.file_type() {
                Some(t) => t,
                None => {
                    let st = fstatat(&sfd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    match st.st_mode & nix::libc::S_IFMT {
                        nix::libc::S_IFDIR => nix::dir::Type::Directory,
                        nix::libc::S_IFCHR => nix::dir::Type::CharacterDevice,
                        _ => nix::dir::Type::File,
                    }
                }
            };
            match kind {
                nix::dir::Type::Directory => subdirs.push(name.to_owned()),
                nix::dir::Type::CharacterDevice => {
                    let st = fstatat(&sfd, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    if st.st_rdev == 0 {
                        return Ok(false);
                    }
                    nix::unistd::linkat(&sfd, name, &dfd, name, AtFlags::empty())?;
                }
                _ => nix::unistd::linkat(&sfd, name, &dfd, name, AtFlags::empty())?,
            }
        }
        for name in subdirs {
            let os = std::ffi::OsStr::from_bytes(name.to_bytes());
            let t = dpath.join(os);
            let sub = open_dir(Some(&sfd), Path::new(os))?;
            let Some(meta) = dir_meta(&sub)? else {
                return Ok(false);
            };
            nix::sys::stat::mkdirat(&dfd, name.as_c_str(), Mode::from_bits_truncate(0o700))?;
            stack.push((sub, open_dir(Some(&dfd), Path::new(os))?, t.clone()));
            finish.push((t, meta));
        }
    }
    // Deepest first, so a parent's mtime is set after its children's.
    for (t, m) in finish.iter().rev() {
        for (name, v) in &m.xattrs {
            xattr::set(t, name, v)?;
        }
        std::os::unix::fs::lchown(t, Some(m.uid), Some(m.gid))?;
        fs_err::set_permissions(t, std::fs::Permissions::from_mode(m.mode))?;
        filetime::set_symlink_file_times(t, m.atime, m.mtime)?;
    }
    Ok(true)
}

/// The contents the layer writer may take from the memo: those of the
/// files the copy linked from the previous result or kept where it was
/// (the same inodes, so the same bytes at the same path), and no others.
pub(super) fn known_for(mut known: KnownFiles, report: &crate::fileop::Report) -> KnownFiles {
    // (A hashed set: a binary search per file of a 5,000-file memo made
    // 65,000 string comparisons, 1.5 ms of the copy.)
    let mut linked: kiln_cache::FileSet<&[u8]> = kiln_cache::FileSet::with_capacity_and_hasher(
        report.linked.len() + report.kept.len(),
        Default::default(),
    );
    linked.extend(report.linked.iter().map(|l| l.as_bytes()));
    linked.extend(report.kept.iter().map(|(p, _)| p.as_bytes()));
    known.retain(|p| linked.contains(p));
    known
}

/// Leaves the memo for the next build: the files of `report` went into the
/// layer `diff_id`, whose small files' contents are `known`.
pub(super) fn save(
    memo: &Path,
    temp_dir: &Path,
    diff_id: &Digest,
    report: crate::fileop::Report,
    known: KnownFiles,
) {
    let files = report.remembered();
    let memo_data = CopyMemo {
        diff_id: diff_id.to_string(),
        files,
        known,
    };
    // Only a speed-up: a memo that cannot be written costs the next build
    // a full copy.
    let _ = memo_data.save(memo, temp_dir);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    /// The layer writer takes from the memo the contents of the files the
    /// copy linked or kept in place, never those of files it wrote anew or
    /// that are gone.
    #[test]
    fn the_writer_is_given_the_contents_of_linked_and_kept_files_only() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = tmp.path().join("f");
        fs_err::write(&f, "x").unwrap_or_else(|e| panic!("{e}"));
        let id = crate::fileop::FileIdentity::of(
            &fs_err::symlink_metadata(&f).unwrap_or_else(|e| panic!("{e}")),
        );
        let reuse = Reuse::new(
            Some(tmp.path().to_owned()),
            vec![("app/gone".to_owned(), id), ("app/kept".to_owned(), id)],
            tmp.path().to_owned(),
        );
        let mut known = KnownFiles::default();
        for p in ["app/kept", "app/linked", "app/written", "app/gone"] {
            known.record(p.as_bytes(), p.as_bytes());
        }
        let mut report = crate::fileop::Report {
            linked: vec!["app/linked".to_owned()],
            ..crate::fileop::Report::default()
        };
        assert!(report.kept.push(&reuse, 1));
        let known = known_for(known, &report);
        assert_eq!(known.get(b"app/kept"), Some(&b"app/kept"[..]));
        assert_eq!(known.get(b"app/linked"), Some(&b"app/linked"[..]));
        assert_eq!(known.get(b"app/written"), None);
        assert_eq!(known.get(b"app/gone"), None);
        assert_eq!(known.len(), 2);
    }

    /// After a GC: the clones whose snapshot went (and names that are no
    /// clone's) are removed; a clone whose snapshot is still here stays.
    #[test]
    fn only_the_clones_of_collected_snapshots_are_removed() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(tmp.path().join("store")).unwrap_or_else(|e| panic!("{e}"));
        let upper = tmp.path().join("upper");
        fs_err::create_dir_all(&upper).unwrap_or_else(|e| panic!("{e}"));
        fs_err::write(upper.join("f"), "f").unwrap_or_else(|e| panic!("{e}"));
        let layer = store
            .commit_snapshot_from_dir(&upper, &kiln_cache::WriteOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .diff_id;
        assert!(store.snapshot_dir(&layer).is_some());
        let gone = Digest::of_bytes(b"collected");
        let dir = prepared_dir(&store);
        let live = dir.join(format!("memo1-{}", layer.hex()));
        let orphan = dir.join(format!("memo2-{}", gone.hex()));
        let junk = dir.join("not-a-clone");
        for d in [&live, &orphan, &junk] {
            fs_err::create_dir_all(d.join("sub")).unwrap_or_else(|e| panic!("{e}"));
        }
        clear_orphaned_prepared(&store).unwrap_or_else(|e| panic!("{e}"));
        assert!(live.is_dir());
        assert!(!orphan.exists());
        assert!(!junk.exists());
        // Nothing is left behind in the store's tmp/ either.
        let trash: Vec<_> = fs_err::read_dir(store.root().join("tmp"))
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("trash-"))
            .collect();
        assert!(trash.is_empty(), "{trash:?}");
    }

    #[test]
    fn a_clone_has_the_directories_metadata_and_links_the_rest() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let src = tmp.path().join("src");
        fs_err::create_dir_all(src.join("a/b")).unwrap_or_else(|e| panic!("{e}"));
        fs_err::write(src.join("a/b/f"), "f").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("b/f", src.join("a/l")).unwrap_or_else(|e| panic!("{e}"));
        xattr::set(src.join("a"), "user.kiln.test", b"v").unwrap_or_else(|e| panic!("{e}"));
        fs_err::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o750))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = filetime::FileTime::from_unix_time(1_000_000, 5);
        for d in ["a/b", "a"] {
            filetime::set_file_times(src.join(d), t, t).unwrap_or_else(|e| panic!("{e}"));
        }
        let dest = tmp.path().join("dest");
        // Opened, then moved (as a COPY's upper becomes its snapshot while
        // it is cloned): the clone goes by the descriptor.
        let fd = open_dir(None, &src).unwrap_or_else(|e| panic!("{e}"));
        let moved = tmp.path().join("moved");
        fs_err::rename(&src, &moved).unwrap_or_else(|e| panic!("{e}"));
        let src = moved;
        assert!(clone_tree(fd, &dest).unwrap_or_else(|e| panic!("{e}")));
        let m = |p: &Path| fs_err::symlink_metadata(p).unwrap_or_else(|e| panic!("{e}"));
        for f in ["a/b/f", "a/l"] {
            assert_eq!(
                m(&src.join(f)).ino(),
                m(&dest.join(f)).ino(),
                "{f} is linked"
            );
        }
        for d in ["a", "a/b"] {
            let (s, c) = (m(&src.join(d)), m(&dest.join(d)));
            assert_ne!(s.ino(), c.ino(), "{d} is a new directory");
            assert_eq!(
                (s.mode(), s.uid(), s.gid(), s.mtime(), s.mtime_nsec()),
                (c.mode(), c.uid(), c.gid(), c.mtime(), c.mtime_nsec()),
                "{d}"
            );
        }
        assert_eq!(
            xattr::get(dest.join("a"), "user.kiln.test").unwrap_or_else(|e| panic!("{e}")),
            Some(b"v".to_vec())
        );
    }

    #[test]
    fn a_tree_with_a_whiteout_or_an_opaque_directory_is_not_cloned() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: this test needs root (whiteouts, trusted xattrs)"
            );
            return;
        }
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let src = tmp.path().join("src");
        fs_err::create_dir_all(src.join("d")).unwrap_or_else(|e| panic!("{e}"));
        nix::sys::stat::mknod(
            &src.join("d/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !clone_tree(
                open_dir(None, &src).unwrap_or_else(|e| panic!("{e}")),
                &tmp.path().join("c1")
            )
            .unwrap_or_else(|e| panic!("{e}"))
        );
        fs_err::remove_file(src.join("d/gone")).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            clone_tree(
                open_dir(None, &src).unwrap_or_else(|e| panic!("{e}")),
                &tmp.path().join("c2")
            )
            .unwrap_or_else(|e| panic!("{e}"))
        );
        xattr::set(src.join("d"), "trusted.overlay.opaque", b"y").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !clone_tree(
                open_dir(None, &src).unwrap_or_else(|e| panic!("{e}")),
                &tmp.path().join("c3")
            )
            .unwrap_or_else(|e| panic!("{e}"))
        );
    }
}
