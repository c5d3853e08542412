//! Linking instead of copying: a COPY's regular file can often be the very
//! inode another immutable snapshot already holds, hard-linked into the new
//! upper directory, instead of a new inode with copied bytes. Creating
//! thousands of inodes (or copying big files) is most of a COPY's cost.
//!
//! Two sources of such inodes:
//! - **the previous run of the same context COPY** (same instruction, same
//!   parent layers, same fixed time): a file is linked from that run's
//!   snapshot when its source is the same inode with the same size, mtime
//!   and ctime as when that run copied it (any write, chmod, chown or xattr
//!   change moves ctime); sources whose ctime was within a clock tick of
//!   that run's start were never remembered (a change in the same tick as
//!   the stat could not be seen). Context files themselves are never
//!   linked: the user may change them in place.
//! - **the source stage's own layers** (`COPY --from`): the file the copy
//!   reads through the stage's overlay is a file of one of its snapshots;
//!   when a copy would keep its owner, mode and mtime (no `--chown`,
//!   `--chmod` or fixed time), that inode is linked.
//!
//! A stage's file is linked only when it looks exactly like a fresh copy
//! (type, size, mode, owner, mtime, and no overlayfs-private xattrs). The
//! previous run's file is linked as it is: the same instruction on the same
//! parents with the same fixed time made it from a source in the same state,
//! so it is what a copy would make now. Snapshots are never written in place: a later step's overlay copies a
//! file up before changing it. Links are made in the overlay's upper
//! directory behind the mounted overlay's back; the copier forgets a link
//! (unlinks it from the upper) before it writes that path again, so the
//! overlay's view and its upper never disagree about a path it touches.

use nix::sys::stat::FileStat;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What identifies a source file's state: if all of it is unchanged, so are
/// its content and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity(u64, u64, u64, i64, i64, i64, i64, u32, u32, u32);

impl FileIdentity {
    /// The file's size.
    pub fn size(&self) -> u64 {
        self.2
    }

    /// The identity of a file from its `lstat`.
    pub fn of(meta: &Metadata) -> FileIdentity {
        FileIdentity(
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.mode(),
            meta.uid(),
            meta.gid(),
        )
    }

    /// The ten fields, as stored in a memo.
    fn fields(&self) -> [u64; 10] {
        [
            self.0,
            self.1,
            self.2,
            self.3 as u64,
            self.4 as u64,
            self.5 as u64,
            self.6 as u64,
            u64::from(self.7),
            u64::from(self.8),
            u64::from(self.9),
        ]
    }

    /// The identity [`FileIdentity::fields`] gave; `None` when a 32-bit
    /// field does not fit.
    fn from_fields(f: [u64; 10]) -> Option<FileIdentity> {
        Some(FileIdentity(
            f[0],
            f[1],
            f[2],
            f[3] as i64,
            f[4] as i64,
            f[5] as i64,
            f[6] as i64,
            u32::try_from(f[7]).ok()?,
            u32::try_from(f[8]).ok()?,
            u32::try_from(f[9]).ok()?,
        ))
    }

    /// ctime in nanoseconds since the epoch.
    fn ctime_ns(&self) -> i128 {
        i128::from(self.5) * 1_000_000_000 + i128::from(self.6)
    }
}

/// Where a COPY may link files from, and what it records for the next run.
#[derive(Debug, Default)]
pub struct Reuse {
    /// Whether to remember source identities for the next run (context
    /// copies).
    pub remember: bool,
    /// The snapshot directories of the source stage, topmost first
    /// (`COPY --from`); empty for the context.
    pub source_layers: Vec<PathBuf>,
    /// The content digests of the topmost source layer, when this build
    /// committed it: a file they saw without any xattrs needs no check
    /// for overlayfs' own.
    pub source_top: Option<std::sync::Arc<kiln_cache::ContentDigests>>,
    /// The previous result's snapshot; `None`: nothing to link from (the
    /// copy still records identities for next time).
    pub prev_root: Option<PathBuf>,
    /// Source identities of the regular files and directories in
    /// `prev_root`, by path below the destination root, sorted by path.
    pub prev: std::sync::Arc<[(String, FileIdentity)]>,
    /// Where new entries really land: the overlay's upper directory (or the
    /// destination root itself when nothing is mounted).
    pub upper: PathBuf,
    /// Sources changed after this time are not remembered (see the module
    /// documentation).
    pub racy_after_ns: i128,
    /// `upper` holds a clone of `prev_root` already (directories made,
    /// every other entry linked): an unchanged file is left as it is, a
    /// changed one replaced, and what the sources no longer have is
    /// removed from `upper` at the end.
    pub prepared: bool,
    /// With `prepared`: the source files as the build's key checksums
    /// `lstat`ed them, by path below the source root; a file found here
    /// unchanged is kept without another `lstat`.
    pub seen: Option<std::sync::Arc<kiln_cache::FileMap<String, crate::context::SeenFile>>>,
    /// Where the next lookup in `prev` probably is: one past the last
    /// found (the copy visits a directory's files in order).
    pub next_prev: std::sync::atomic::AtomicUsize,
}

/// Changes within this long before a copy starts may share a clock tick
/// with the copy's `lstat`.
const RACY_WINDOW: Duration = Duration::from_millis(50);

impl Reuse {
    /// A reuse of `prev_root` (with its identities) writing into `upper`.
    pub fn new(
        prev_root: Option<PathBuf>,
        mut prev: Vec<(String, FileIdentity)>,
        upper: PathBuf,
    ) -> Reuse {
        if !prev.is_sorted_by(|a, b| a.0 <= b.0) {
            prev.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(RACY_WINDOW);
        Reuse {
            remember: true,
            source_layers: Vec::new(),
            source_top: None,
            prev_root,
            prev: prev.into(),
            upper,
            racy_after_ns: i128::try_from(now.as_nanos()).unwrap_or(i128::MAX),
            prepared: false,
            seen: None,
            next_prev: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Links from the source stage's layers (`layers` lowest first, as
    /// mounted), writing into `upper`; remembers nothing.
    pub fn from_layers(layers: &[PathBuf], upper: PathBuf) -> Reuse {
        Reuse {
            remember: false,
            source_layers: layers.iter().rev().cloned().collect(),
            upper,
            ..Reuse::default()
        }
    }

    /// With the topmost source layer's content digests (see
    /// [`Reuse::source_top`]).
    #[must_use]
    pub fn with_source_top(
        mut self,
        top: Option<std::sync::Arc<kiln_cache::ContentDigests>>,
    ) -> Self {
        self.source_top = top;
        self
    }

    /// Whether a source in this state may be remembered.
    pub(super) fn rememberable(&self, id: &FileIdentity) -> bool {
        id.ctime_ns() < self.racy_after_ns
    }

    /// The previous result's file for `rel`, when its source is unchanged
    /// since that run copied it. None when the previous result *is* the
    /// upper (taken over: its files are already where they belong).
    pub(super) fn previous(&self, rel: &str, id: &FileIdentity) -> Option<PathBuf> {
        let prev_root = self.prev_root.as_ref().filter(|r| **r != self.upper)?;
        self.has_previous(rel, id).then(|| prev_root.join(rel))
    }

    /// Whether [`Reuse::previous`] has a file (without making its path).
    pub(super) fn has_previous(&self, rel: &str, id: &FileIdentity) -> bool {
        self.previous_index(rel, id).is_some()
    }

    /// The index in [`Reuse::prev`] of the file [`Reuse::previous`] has.
    pub(super) fn previous_index(&self, rel: &str, id: &FileIdentity) -> Option<usize> {
        self.prev_root.as_ref()?;
        self.find_prev(rel).filter(|&i| self.prev[i].1 == *id)
    }

    /// The index of `rel` in `prev`: the entry after the last one found
    /// when it is that one (a copy walks a directory's files in order),
    /// else by binary search.
    fn find_prev(&self, rel: &str) -> Option<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let hint = self.next_prev.load(Relaxed);
        let i = match self.prev.get(hint) {
            Some((p, _)) if p == rel => hint,
            _ => self
                .prev
                .binary_search_by(|(p, _)| p.as_str().cmp(rel))
                .ok()?,
        };
        self.next_prev.store(i + 1, Relaxed);
        Some(i)
    }

    /// The snapshot file that `src_rel` (a path below the source root) is
    /// in the source stage's overlay: the topmost layer that has the path,
    /// when it is the inode `seen` (what the overlay showed). With it, what
    /// [`Reuse::link`] checks: no xattrs either when the topmost layer's
    /// digests saw the file without any.
    pub(super) fn in_source_layers(
        &self,
        src_rel: &str,
        seen: &Metadata,
        dirs: &mut DirFds,
    ) -> Option<(PathBuf, Check, FileStat)> {
        for (i, layer) in self.source_layers.iter().enumerate() {
            let candidate = layer.join(src_rel);
            let (Some(dir), Some(name)) = (candidate.parent(), candidate.file_name()) else {
                return None;
            };
            // Relative to the layer's directory, kept open for the files
            // after it (no walk of the whole path for each).
            let found = match dirs.from.open_or_err(dir) {
                Ok(fd) => {
                    nix::sys::stat::fstatat(fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                }
                Err(e) => Err(e),
            };
            match found {
                Ok(m) => {
                    let same = m.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG
                        && m.st_ino == seen.ino()
                        && u64::try_from(m.st_size).is_ok_and(|n| n == seen.size())
                        && (m.st_mtime, m.st_mtime_nsec) == (seen.mtime(), seen.mtime_nsec())
                        && (m.st_ctime, m.st_ctime_nsec) == (seen.ctime(), seen.ctime_nsec())
                        && m.st_mode == seen.mode()
                        && (m.st_uid, m.st_gid) == (seen.uid(), seen.gid());
                    let bare = i == 0
                        && self.source_top.as_ref().is_some_and(|t| {
                            t.without_xattrs(
                                src_rel.as_bytes(),
                                u64::try_from(m.st_size).unwrap_or(0),
                            )
                        });
                    let check = if bare { Check::Metadata } else { Check::Xattrs };
                    return same.then_some((candidate, check, m));
                }
                Err(nix::errno::Errno::ENOENT) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Links `from` (a snapshot's file) to `rel` in the upper. With `check`
    /// (a source stage's file), only when it looks as `expect` says and has
    /// no overlayfs xattrs; without (the previous run's file for the same
    /// source, same instruction, same parents, same fixed time: what a copy
    /// makes now is what it made then), as it is. False when it did not
    /// link. `dirs` keeps the last directories used open, so that files of
    /// one directory are stat'ed and linked relative to it.
    pub(super) fn link(
        &self,
        from: &Path,
        rel: &str,
        expect: &Expected,
        check: Check,
        stat: Option<FileStat>,
        dirs: &mut DirFds,
    ) -> bool {
        use nix::fcntl::AtFlags;
        let to = self.upper.join(rel);
        let (Some(from_dir), Some(from_name), Some(to_dir), Some(to_name)) =
            (from.parent(), from.file_name(), to.parent(), to.file_name())
        else {
            return false;
        };
        if dirs.from.open(from_dir).is_none() {
            return false;
        }
        if check == Check::Nothing {
            let Some(to_fd) = dirs.to.open(to_dir) else {
                return false;
            };
            let Some(from_fd) = dirs.from.get(from_dir) else {
                return false;
            };
            return nix::unistd::linkat(from_fd, from_name, to_fd, to_name, AtFlags::empty())
                .is_ok();
        }
        // (Checked: the stat `Reuse::in_source_layers` found it by.)
        let Some(pm) = stat else {
            return false;
        };
        let same = pm.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG
            && u64::try_from(pm.st_size).is_ok_and(|n| n == expect.size)
            && pm.st_mode & 0o7777 == expect.mode
            && expect.owner.is_none_or(|o| (pm.st_uid, pm.st_gid) == o)
            && (pm.st_mtime, pm.st_mtime_nsec) == expect.mtime;
        // A file that was copied up keeps overlayfs' own xattrs (origin,
        // ...): those must not reach another overlay's upper.
        let private = || {
            xattr::list(from).map_or(true, |mut names| {
                names.any(|n| {
                    let n = n.as_encoded_bytes();
                    n.starts_with(b"trusted.overlay.") || n.starts_with(b"user.overlay.")
                })
            })
        };
        if !same || (check == Check::Xattrs && private()) {
            return false;
        }
        let Some(to_fd) = dirs.to.open(to_dir) else {
            return false;
        };
        // `dirs.from` may have been replaced by opening `to_dir`: they are
        // separate slots.
        let Some(from_fd) = dirs.from.get(from_dir) else {
            return false;
        };
        nix::unistd::linkat(from_fd, from_name, to_fd, to_name, AtFlags::empty()).is_ok()
    }
}

/// What [`Reuse::link`] checks of the file it links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Nothing (the previous run's file).
    Nothing,
    /// That it looks as expected.
    Metadata,
    /// That it looks as expected and has no overlayfs xattrs.
    Xattrs,
}

/// The directories a copy worker linked from and to last, kept open.
#[derive(Debug, Default)]
pub(super) struct DirFds {
    from: DirSlot,
    to: DirSlot,
}

#[derive(Debug, Default)]
struct DirSlot(Option<(PathBuf, std::os::fd::OwnedFd)>);

impl DirSlot {
    /// The open directory `dir` (opened now unless it is the one held).
    fn open(&mut self, dir: &Path) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.open_or_err(dir).ok()
    }

    /// [`DirSlot::open`], with the error of a directory that cannot be
    /// opened (then none is held).
    fn open_or_err(&mut self, dir: &Path) -> nix::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        if self.0.as_ref().is_none_or(|(p, _)| p != dir) {
            self.0 = None;
            let fd = nix::fcntl::open(
                dir,
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            self.0 = Some((dir.to_owned(), fd));
        }
        self.0
            .as_ref()
            .map(|(_, fd)| fd.as_fd())
            .ok_or(nix::errno::Errno::EBADF)
    }

    /// The held directory, if it is `dir`.
    fn get(&self, dir: &Path) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.0
            .as_ref()
            .filter(|(p, _)| p == dir)
            .map(|(_, fd)| fd.as_fd())
    }
}

/// What a fresh copy of a file would look like.
#[derive(Debug)]
pub(super) struct Expected {
    pub size: u64,
    pub mode: u32,
    pub owner: Option<(u32, u32)>,
    pub mtime: (i64, i64),
}

/// The identities a COPY remembers, with the layer they went into and the
/// contents of that layer's small files, saved under the store for the next
/// run of the same COPY.
#[derive(Debug, Default)]
pub struct CopyMemo {
    /// The result layer's diffID.
    pub diff_id: String,
    /// Path below the destination root -> source identity (regular files
    /// and directories).
    pub files: Vec<(String, FileIdentity)>,
    /// The contents of the result layer's small files (see
    /// [`kiln_cache::KnownFiles`]).
    pub known: kiln_cache::KnownFiles,
}

const MEMO_MAGIC: &[u8] = b"kiln-copy-memo-2\n";

impl CopyMemo {
    /// The memo at `path`, if there is a readable one.
    pub fn load(path: &Path) -> Option<CopyMemo> {
        CopyMemo::from_vec(fs_err::read(path).ok()?)
    }

    /// Writes the memo to `path`: a temp file in `temp_dir` renamed into
    /// place, so a reader sees the old memo or the new one. `temp_dir` is
    /// the store's `tmp/` (same file system), which GC empties: a build
    /// killed while writing leaves nothing beside the memos.
    pub fn save(&self, path: &Path, temp_dir: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let dir = path.parent().unwrap_or(Path::new("."));
        fs_err::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(temp_dir)?;
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, tmp.as_file());
        self.write_to(&mut w)?;
        w.flush()?;
        drop(w);
        // Not renamed over the old memo: ext4 (`auto_da_alloc`) would then
        // start writing the new one back at once, and the build's next
        // fsync (its image's config and manifest) would wait for those
        // bytes. (A reader in between finds no memo and copies everything.)
        match fs_err::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match tmp.persist_noclobber(path) {
            Ok(_) => Ok(()),
            // Another build wrote its memo meanwhile: the same COPY's, kept.
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.error),
        }
    }

    /// The memo as bytes (see [`CopyMemo::write_to`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the memo: a magic line, the diffID, the identities (path
    /// length, path, ten 64-bit fields each), then the known contents.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(MEMO_MAGIC)?;
        out.write_all(&(self.diff_id.len() as u32).to_le_bytes())?;
        out.write_all(self.diff_id.as_bytes())?;
        out.write_all(&(self.files.len() as u64).to_le_bytes())?;
        let mut entry = Vec::with_capacity(256);
        for (rel, id) in &self.files {
            entry.clear();
            entry.extend_from_slice(&(rel.len() as u32).to_le_bytes());
            entry.extend_from_slice(rel.as_bytes());
            for v in id.fields() {
                entry.extend_from_slice(&v.to_le_bytes());
            }
            out.write_all(&entry)?;
        }
        self.known.write_to(out)
    }

    /// A memo written by [`CopyMemo::to_bytes`]; `None` for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<CopyMemo> {
        CopyMemo::from_vec(bytes.to_vec())
    }

    /// [`CopyMemo::from_bytes`], keeping `bytes` as the known contents'
    /// data.
    pub fn from_vec(bytes: Vec<u8>) -> Option<CopyMemo> {
        let (mut memo, contents) = CopyMemo::from_vec_deferred(bytes)?;
        memo.known = contents.parse()?;
        Some(memo)
    }

    /// [`CopyMemo::load`] without the known contents, which come back to
    /// be parsed later (by the layer commit, off a build's critical path):
    /// the memo's `known` is empty.
    pub fn load_deferred(path: &Path) -> Option<(CopyMemo, MemoContents)> {
        CopyMemo::from_vec_deferred(fs_err::read(path).ok()?)
    }

    /// [`CopyMemo::from_vec`], the known contents left to parse.
    fn from_vec_deferred(bytes: Vec<u8>) -> Option<(CopyMemo, MemoContents)> {
        let mut r = bytes.strip_prefix(MEMO_MAGIC)?;
        let mut take = |n: usize| -> Option<&[u8]> {
            if n > r.len() {
                return None;
            }
            let (head, tail) = r.split_at(n);
            r = tail;
            Some(head)
        };
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let diff_id = std::str::from_utf8(take(len)?).ok()?.to_owned();
        let n = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let n = usize::try_from(n).ok()?;
        // An entry takes at least 84 bytes: a bigger count is corrupt.
        if n > bytes.len() / 84 {
            return None;
        }
        let mut files = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let rel = std::str::from_utf8(take(len)?).ok()?.to_owned();
            let mut f = [0u64; 10];
            for v in &mut f {
                *v = u64::from_le_bytes(take(8)?.try_into().ok()?);
            }
            files.push((rel, FileIdentity::from_fields(f)?));
        }
        let start = bytes.len() - r.len();
        Some((
            CopyMemo {
                diff_id,
                files,
                known: kiln_cache::KnownFiles::default(),
            },
            MemoContents { bytes, start },
        ))
    }
}

/// A memo's known contents, not parsed yet (see [`CopyMemo::load_deferred`]).
#[derive(Debug)]
pub struct MemoContents {
    bytes: Vec<u8>,
    start: usize,
}

impl MemoContents {
    /// The known contents; `None` when they are damaged.
    pub fn parse(self) -> Option<kiln_cache::KnownFiles> {
        kiln_cache::KnownFiles::from_vec(self.bytes, self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_log_keeps_the_last_word_per_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (f, g) = (dir.path().join("f"), dir.path().join("g"));
        fs_err::write(&f, "x").expect("write");
        fs_err::write(&g, "yy").expect("write");
        let a = FileIdentity::of(&fs_err::symlink_metadata(&f).expect("stat"));
        let b = FileIdentity::of(&fs_err::symlink_metadata(&g).expect("stat"));
        let report = crate::fileop::Report {
            identities: vec![
                ("b".to_owned(), Some(a)),
                ("a".to_owned(), Some(a)),
                ("b".to_owned(), None),
                ("c".to_owned(), Some(a)),
                ("c".to_owned(), Some(b)),
                ("d".to_owned(), None),
            ],
            ..crate::fileop::Report::default()
        };
        assert_eq!(
            report.remembered(),
            vec![("a".to_owned(), a), ("c".to_owned(), b)]
        );
        // Lookups find the previous run's identities by binary search,
        // whatever order they came in.
        let reuse = Reuse::new(
            Some(dir.path().to_owned()),
            vec![("z".to_owned(), b), ("m".to_owned(), a)],
            dir.path().join("upper"),
        );
        assert_eq!(reuse.previous("m", &a), Some(dir.path().join("m")));
        assert_eq!(reuse.previous("z", &a), None);
        assert_eq!(reuse.previous("q", &a), None);
        // In order (the hint is the next entry), backwards and skipping
        // (binary search), and missing, after each other.
        let names: Vec<String> = (0..50).map(|i| format!("d/f{i:02}")).collect();
        let reuse = Reuse::new(
            Some(dir.path().to_owned()),
            names.iter().map(|n| (n.clone(), a)).collect(),
            dir.path().join("upper"),
        );
        let order = (0..50).chain((0..50).rev()).chain([3, 40, 7, 7, 8]);
        for i in order {
            assert!(reuse.has_previous(&names[i], &a), "{}", names[i]);
            assert!(!reuse.has_previous(&names[i], &b), "{}", names[i]);
            assert!(!reuse.has_previous(&format!("{}x", names[i]), &a));
        }
    }

    #[test]
    fn memo_round_trips_and_damaged_memos_are_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        fs_err::write(&f, "x").expect("write");
        let id = FileIdentity::of(&fs_err::symlink_metadata(&f).expect("stat"));
        let mut known = kiln_cache::KnownFiles::default();
        known.record(b"app/f", b"x");
        let memo = CopyMemo {
            diff_id: "sha256:00".to_owned(),
            files: vec![("app/f".to_owned(), id), ("app/g".to_owned(), id)],
            known,
        };
        let path = dir.path().join("memo");
        memo.save(&path, dir.path()).expect("save");
        let back = CopyMemo::load(&path).expect("load");
        assert_eq!(back.diff_id, memo.diff_id);
        assert_eq!(back.files, memo.files);
        assert_eq!(back.known, memo.known);
        // Loaded with its contents left for later: the same, once parsed.
        let (head, contents) = CopyMemo::load_deferred(&path).expect("load deferred");
        assert_eq!((&head.diff_id, &head.files), (&memo.diff_id, &memo.files));
        assert!(head.known.is_empty());
        assert_eq!(contents.parse(), Some(memo.known.clone()));
        // A later run's memo replaces it (the old one is removed first).
        let later = CopyMemo {
            diff_id: "sha256:01".to_owned(),
            files: vec![("app/f".to_owned(), id)],
            known: kiln_cache::KnownFiles::default(),
        };
        later.save(&path, dir.path()).expect("save again");
        let back = CopyMemo::load(&path).expect("load again");
        later.save(&path, dir.path()).expect("save once more");
        assert_eq!((back.diff_id, back.files), (later.diff_id, later.files));
        let bytes = memo.to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                CopyMemo::from_bytes(&bytes[..cut]).is_none(),
                "cut at {cut}"
            );
        }
        // A memo of an older kiln (JSON) is no memo.
        assert!(CopyMemo::from_bytes(br#"{"diff_id":"sha256:00","files":[]}"#).is_none());
    }
}
