//! Applying a layer tar onto a snapshot directory (see the module docs of [`crate::layer`]).
//!
//! Every file-system call is relative to a directory fd that was opened with `O_NOFOLLOW`
//! from the snapshot root down, so no symlink is ever followed, whatever the tar contains
//! and in whatever order.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev,
    mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

use super::tar_format::{
    EntryHeader, KIND_BLOCK, KIND_CHAR, KIND_DIR, KIND_FIFO, KIND_FILE, KIND_LINK, KIND_SYMLINK,
    TarReader, display_name,
};
use super::{ApplyOptions, LayerError, LayerStats, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, WhiteoutMode};

/// Apply a layer tar (uncompressed stream) onto a snapshot directory.
///
/// OCI whiteouts become overlay whiteouts (or removals, per [`ApplyOptions::whiteouts`]).
/// The whole input is consumed, including padding after the end-of-archive marker, so a
/// digesting reader around `tar` sees every byte.
pub fn apply_layer<R: Read>(
    tar: R,
    dest: &Path,
    opts: &ApplyOptions,
) -> Result<LayerStats, LayerError> {
    let root = openat(
        nix::fcntl::AT_FDCWD,
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::Apply {
        entry: String::new(),
        dest: dest.to_path_buf(),
        op: "open the snapshot directory",
        source: e.into(),
    })?;
    let mut a = Applier {
        root,
        dest: dest.to_path_buf(),
        opts: opts.clone(),
        deferred: Vec::new(),
        created: HashSet::new(),
    };
    let mut reader = TarReader::new(tar, opts.limits);
    let mut stats = LayerStats::default();
    while let Some(h) = reader.next_entry()? {
        stats.entries += 1;
        a.entry(&h, &mut reader)?;
    }
    a.finish_dirs()?;
    let offset = reader.offset();
    let mut rest = reader.into_inner();
    let trailing = io::copy(&mut rest, &mut io::sink())
        .map_err(|source| LayerError::ReadTar { offset, source })?;
    stats.bytes = offset + trailing;
    Ok(stats)
}

struct Deferred {
    comps: Vec<Vec<u8>>,
    entry: String,
    mode: u32,
    mtime: i64,
}

struct Applier {
    root: OwnedFd,
    dest: PathBuf,
    opts: ApplyOptions,
    /// Directories whose mode and times are set after all entries.
    deferred: Vec<Deferred>,
    /// Names created by this layer (only kept in [`WhiteoutMode::Remove`]).
    created: HashSet<Vec<u8>>,
}

/// Split an entry name into components: `./` and `.` dropped, absolute names and `..` refused.
fn components(name: &[u8]) -> Result<Vec<Vec<u8>>, LayerError> {
    let entry = || display_name(name);
    if name.is_empty() || name.contains(&0) {
        return Err(LayerError::InvalidName { entry: entry() });
    }
    if name.starts_with(b"/") {
        return Err(LayerError::AbsolutePath { entry: entry() });
    }
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(LayerError::ParentComponent { entry: entry() }),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn join(comps: &[Vec<u8>]) -> Vec<u8> {
    comps.join(&b'/')
}

fn is_dir(fd: &OwnedFd, name: &[u8]) -> Result<Option<SFlag>, Errno> {
    match fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(
            st.st_mode & SFlag::S_IFMT.bits(),
        ))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn open_dir_nofollow(parent: &OwnedFd, name: &[u8]) -> Result<OwnedFd, Errno> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Remove `name` in `parent`, recursively if it is a directory, never following symlinks.
fn remove_at(parent: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
    match is_dir(parent, name)? {
        None => Ok(()),
        Some(SFlag::S_IFDIR) => {
            let fd = open_dir_nofollow(parent, name)?;
            clear_dir(&fd, &|_| true)?;
            unlinkat(parent, name, UnlinkatFlags::RemoveDir)
        }
        Some(_) => unlinkat(parent, name, UnlinkatFlags::NoRemoveDir),
    }
}

/// Remove every child of the directory `fd` for which `pick(name)` is true.
fn clear_dir(fd: &OwnedFd, pick: &dyn Fn(&[u8]) -> bool) -> Result<(), Errno> {
    let mut names = Vec::new();
    {
        let dup = fd
            .try_clone()
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
        let mut dir = nix::dir::Dir::from_fd(dup)?;
        for entry in dir.iter() {
            let entry = entry?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." && pick(n) {
                names.push(n.to_vec());
            }
        }
    }
    for n in names {
        remove_at(fd, &n)?;
    }
    Ok(())
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from(e)
}

fn timespec(secs: i64) -> TimeSpec {
    TimeSpec::new(secs, 0)
}

/// A `/proc/self/fd/N/name` path: the directory fd is trusted, `name` is not followed by the
/// `l*` xattr calls.
fn proc_path(parent: &OwnedFd, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", parent.as_raw_fd()));
    p.push(OsStr::from_bytes(name));
    p
}

/// Overlayfs' own xattrs are never taken from a tar: a layer could otherwise forge
/// `trusted.overlay.redirect`, `metacopy` or `opaque` and change how the overlay resolves
/// paths. Opaque directories come only from `.wh..wh..opq` markers.
fn allowed_xattr(name: &[u8]) -> bool {
    !(name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay."))
}

/// Xattr errors that mean "this file system or this user cannot have it": ignored, as docker
/// does, so that a rootless unpack of a layer with `trusted.*` xattrs still works.
fn ignorable_xattr_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM))
}

impl Applier {
    fn err(&self, entry: &str, op: &'static str) -> impl FnOnce(Errno) -> LayerError + '_ {
        let entry = entry.to_owned();
        move |e| LayerError::Apply {
            entry,
            dest: self.dest.clone(),
            op,
            source: errno_io(e),
        }
    }

    /// Open the directory `comps` (all of it), creating missing ones when `create`.
    /// `Ok(None)` when a component is missing and `!create`.
    fn open_dirs(
        &self,
        comps: &[Vec<u8>],
        entry: &str,
        create: bool,
    ) -> Result<Option<OwnedFd>, LayerError> {
        let mut cur = self.root.try_clone().map_err(|source| LayerError::Apply {
            entry: entry.to_owned(),
            dest: self.dest.clone(),
            op: "open the snapshot directory for",
            source,
        })?;
        for (i, c) in comps.iter().enumerate() {
            let next = match open_dir_nofollow(&cur, c) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&cur, c.as_slice(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.err(entry, "create a parent directory of")(e)),
                    }
                    open_dir_nofollow(&cur, c)
                        .map_err(|e| self.err(entry, "open a parent directory of")(e))?
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP) => {
                    return Err(LayerError::ThroughSymlink {
                        entry: entry.to_owned(),
                        component: display_name(&join(&comps[..=i])),
                    });
                }
                Err(Errno::ENOTDIR) => {
                    // O_NOFOLLOW|O_DIRECTORY on a symlink gives ENOTDIR on some kernels; tell
                    // the two apart for a precise message.
                    let kind = is_dir(&cur, c).ok().flatten();
                    let component = display_name(&join(&comps[..=i]));
                    if kind == Some(SFlag::S_IFLNK) {
                        return Err(LayerError::ThroughSymlink {
                            entry: entry.to_owned(),
                            component,
                        });
                    }
                    return Err(LayerError::ParentNotDirectory {
                        entry: entry.to_owned(),
                        component,
                    });
                }
                Err(e) => return Err(self.err(entry, "open a parent directory of")(e)),
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    fn entry<R: Read>(
        &mut self,
        h: &EntryHeader,
        reader: &mut TarReader<R>,
    ) -> Result<(), LayerError> {
        let entry = display_name(&h.name);
        let comps = components(&h.name)?;
        let Some((base, parents)) = comps.split_last() else {
            // The root itself (`./`): only a directory makes sense.
            if h.kind != KIND_DIR {
                return Err(LayerError::InvalidName { entry });
            }
            let root = self.root.try_clone().map_err(|source| LayerError::Apply {
                entry: entry.clone(),
                dest: self.dest.clone(),
                op: "open",
                source,
            })?;
            self.owner_and_xattrs_fd(&root, h, &entry)?;
            self.deferred.push(Deferred {
                comps,
                entry,
                mode: h.mode,
                mtime: h.mtime,
            });
            return Ok(());
        };

        if let Some(target) = base.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(h, &entry, parents, base, target);
        }

        let create_parents = true;
        let Some(parent) = self.open_dirs(parents, &entry, create_parents)? else {
            return Ok(());
        };

        // Hardlink targets are checked before anything at `base` is removed.
        let link_target = if h.kind == KIND_LINK {
            Some(self.link_target(h, &entry)?)
        } else {
            None
        };
        if let Some((tp, tb)) = &link_target {
            let same = tb == base
                && fstatat(tp, tb.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .ok()
                    .map(|s| (s.st_dev, s.st_ino))
                    == fstatat(&parent, base.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                        .ok()
                        .map(|s| (s.st_dev, s.st_ino));
            if same {
                return Ok(());
            }
        }

        let existing = is_dir(&parent, base).map_err(self.err(&entry, "inspect"))?;
        let keep_dir = h.kind == KIND_DIR && existing == Some(SFlag::S_IFDIR);
        // A directory that replaces an overlay whiteout (`.wh.d` then `d/` in one layer) must
        // hide what the lower layers have under `d`: it becomes opaque, as overlayfs itself
        // would have made it.
        let replaces_whiteout = h.kind == KIND_DIR
            && self.opts.whiteouts == WhiteoutMode::Overlay
            && existing == Some(SFlag::S_IFCHR)
            && fstatat(&parent, base.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| st.st_rdev == 0);
        if existing.is_some() && !keep_dir {
            remove_at(&parent, base).map_err(self.err(&entry, "replace"))?;
        }
        if self.opts.whiteouts == WhiteoutMode::Remove {
            self.created.insert(join(&comps));
        }

        match h.kind {
            KIND_DIR => {
                if !keep_dir {
                    mkdirat(&parent, base.as_slice(), Mode::from_bits_truncate(0o700))
                        .map_err(self.err(&entry, "create the directory"))?;
                }
                let fd = open_dir_nofollow(&parent, base).map_err(self.err(&entry, "open"))?;
                self.owner_and_xattrs_fd(&fd, h, &entry)?;
                if replaces_whiteout {
                    self.mark_opaque(&fd, &entry)?;
                }
                self.deferred.push(Deferred {
                    comps,
                    entry,
                    mode: h.mode,
                    mtime: h.mtime,
                });
            }
            KIND_FILE => {
                let fd = openat(
                    &parent,
                    base.as_slice(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(self.err(&entry, "create the file"))?;
                let mut file = File::from(fd);
                copy_data(&mut reader.data(), &mut file).map_err(|source| LayerError::Apply {
                    entry: entry.clone(),
                    dest: self.dest.clone(),
                    op: "write the file",
                    source,
                })?;
                let fd = OwnedFd::from(file);
                self.owner_and_xattrs_fd(&fd, h, &entry)?;
                fchmod(&fd, Mode::from_bits_truncate(h.mode)).map_err(self.err(&entry, "chmod"))?;
                let t = timespec(h.mtime);
                futimens(&fd, &t, &t).map_err(self.err(&entry, "set the times of"))?;
            }
            KIND_SYMLINK => {
                if h.link.is_empty() || h.link.contains(&0) {
                    return Err(LayerError::InvalidName { entry });
                }
                symlinkat(h.link.as_slice(), &parent, base.as_slice())
                    .map_err(self.err(&entry, "create the symlink"))?;
                self.finish_at(&parent, base, h, &entry, false)?;
            }
            KIND_LINK => {
                if let Some((tp, tb)) = link_target {
                    linkat(
                        &tp,
                        tb.as_slice(),
                        &parent,
                        base.as_slice(),
                        AtFlags::empty(),
                    )
                    .map_err(self.err(&entry, "create the hardlink"))?;
                }
            }
            KIND_CHAR | KIND_BLOCK | KIND_FIFO => {
                if !self.opts.create_devices {
                    return Ok(());
                }
                let (kind, dev) = match h.kind {
                    KIND_CHAR => (
                        SFlag::S_IFCHR,
                        makedev(h.dev_major.into(), h.dev_minor.into()),
                    ),
                    KIND_BLOCK => (
                        SFlag::S_IFBLK,
                        makedev(h.dev_major.into(), h.dev_minor.into()),
                    ),
                    _ => (SFlag::S_IFIFO, 0),
                };
                mknodat(
                    &parent,
                    base.as_slice(),
                    kind,
                    Mode::from_bits_truncate(h.mode & 0o777),
                    dev,
                )
                .map_err(self.err(&entry, "create the device node"))?;
                self.finish_at(&parent, base, h, &entry, true)?;
            }
            _ => {
                return Err(LayerError::UnsupportedEntry {
                    entry,
                    kind: char::from(h.kind),
                });
            }
        }
        Ok(())
    }

    /// Resolve a hardlink's target: inside the root, existing, not a directory.
    fn link_target(&self, h: &EntryHeader, entry: &str) -> Result<(OwnedFd, Vec<u8>), LayerError> {
        let target = display_name(&h.link);
        let bad = |problem| LayerError::BadHardlink {
            entry: entry.to_owned(),
            target: target.clone(),
            problem,
        };
        if h.link.starts_with(b"/") {
            return Err(bad("absolute"));
        }
        let comps = match components(&h.link) {
            Ok(c) => c,
            Err(LayerError::ParentComponent { .. }) => return Err(bad("outside the root (`..`)")),
            Err(_) => return Err(bad("not a valid name")),
        };
        let Some((tb, tparents)) = comps.split_last() else {
            return Err(bad("the root directory"));
        };
        let tp = match self.open_dirs(tparents, entry, false) {
            Ok(Some(fd)) => fd,
            Ok(None) => return Err(bad("not in the layer before it")),
            Err(LayerError::ThroughSymlink { .. }) => return Err(bad("reached through a symlink")),
            Err(e) => return Err(e),
        };
        match is_dir(&tp, tb) {
            Ok(None) => Err(bad("not in the layer before it")),
            Ok(Some(SFlag::S_IFDIR)) => Err(bad("a directory")),
            Ok(Some(_)) => Ok((tp, tb.clone())),
            Err(e) => Err(self.err(entry, "inspect the hardlink target of")(e)),
        }
    }

    fn whiteout(
        &mut self,
        h: &EntryHeader,
        entry: &str,
        parents: &[Vec<u8>],
        base: &[u8],
        target: &[u8],
    ) -> Result<(), LayerError> {
        let overlay = self.opts.whiteouts == WhiteoutMode::Overlay;
        if base == WHITEOUT_OPAQUE.as_bytes() {
            let Some(dir) = self.open_dirs(parents, entry, overlay)? else {
                return Ok(());
            };
            if overlay {
                self.mark_opaque(&dir, entry)?;
            } else {
                let prefix = join(parents);
                let created = &self.created;
                let pick = |name: &[u8]| {
                    let mut full = prefix.clone();
                    if !full.is_empty() {
                        full.push(b'/');
                    }
                    full.extend_from_slice(name);
                    !created.contains(&full)
                };
                clear_dir(&dir, &pick).map_err(self.err(entry, "empty the opaque directory of"))?;
            }
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            let mut t = join(parents);
            if !t.is_empty() {
                t.push(b'/');
            }
            t.extend_from_slice(target);
            return Err(LayerError::BadWhiteout {
                entry: entry.to_owned(),
                target: display_name(&t),
            });
        }
        if target.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // `.wh..wh.plnk` and friends are aufs metadata, not whiteouts; docker skips them.
            return Ok(());
        }
        let Some(parent) = self.open_dirs(parents, entry, overlay)? else {
            return Ok(());
        };
        remove_at(&parent, target).map_err(self.err(entry, "remove the whited-out file of"))?;
        if overlay {
            mknodat(
                &parent,
                target,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(h.mode & 0o777),
                0,
            )
            .map_err(self.err(entry, "create the whiteout device for"))?;
            self.finish_at(&parent, target, h, entry, true)?;
        }
        Ok(())
    }

    /// Set the overlay opaque xattr on a directory.
    fn mark_opaque(&self, dir: &OwnedFd, entry: &str) -> Result<(), LayerError> {
        let file = File::from(dir.try_clone().map_err(|source| LayerError::Apply {
            entry: entry.to_owned(),
            dest: self.dest.clone(),
            op: "open",
            source,
        })?);
        xattr::FileExt::set_xattr(&file, self.opts.opaque_xattr.name(), b"y").map_err(|source| {
            LayerError::Apply {
                entry: entry.to_owned(),
                dest: self.dest.clone(),
                op: "mark opaque",
                source,
            }
        })
    }

    /// Ownership and xattrs through an open fd (files and directories).
    fn owner_and_xattrs_fd(
        &self,
        fd: &OwnedFd,
        h: &EntryHeader,
        entry: &str,
    ) -> Result<(), LayerError> {
        if self.opts.preserve_ownership {
            let (uid, gid) = ids(h, entry, &self.dest)?;
            nix::unistd::fchown(fd, Some(uid), Some(gid)).map_err(self.err(entry, "chown"))?;
        }
        if !h.xattrs.is_empty() {
            let file = File::from(fd.try_clone().map_err(|source| LayerError::Apply {
                entry: entry.to_owned(),
                dest: self.dest.clone(),
                op: "open",
                source,
            })?);
            for (k, v) in h.xattrs.iter().filter(|(k, _)| allowed_xattr(k)) {
                if let Err(source) = xattr::FileExt::set_xattr(&file, OsStr::from_bytes(k), v)
                    && !ignorable_xattr_error(&source)
                {
                    return Err(LayerError::Apply {
                        entry: entry.to_owned(),
                        dest: self.dest.clone(),
                        op: "set an xattr on",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Ownership, mode (unless a symlink), xattrs and times of `name` in `parent`.
    fn finish_at(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        h: &EntryHeader,
        entry: &str,
        chmod: bool,
    ) -> Result<(), LayerError> {
        if self.opts.preserve_ownership {
            let (uid, gid) = ids(h, entry, &self.dest)?;
            fchownat(
                parent,
                name,
                Some(uid),
                Some(gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(self.err(entry, "chown"))?;
        }
        if chmod {
            // Not a symlink (we just made it), so following is harmless here.
            fchmodat(
                parent,
                name,
                Mode::from_bits_truncate(h.mode),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(self.err(entry, "chmod"))?;
        }
        let path = proc_path(parent, name);
        for (k, v) in h.xattrs.iter().filter(|(k, _)| allowed_xattr(k)) {
            if let Err(source) = xattr::set(&path, OsStr::from_bytes(k), v)
                && !ignorable_xattr_error(&source)
            {
                return Err(LayerError::Apply {
                    entry: entry.to_owned(),
                    dest: self.dest.clone(),
                    op: "set an xattr on",
                    source,
                });
            }
        }
        let t = timespec(h.mtime);
        utimensat(parent, name, &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(self.err(entry, "set the times of"))?;
        Ok(())
    }

    /// Directory modes and times, deepest first, after all entries.
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.sort_by_key(|d| std::cmp::Reverse(d.comps.len()));
        for d in &deferred {
            let t = timespec(d.mtime);
            let mode = Mode::from_bits_truncate(d.mode);
            let Some((base, parents)) = d.comps.split_last() else {
                fchmod(&self.root, mode).map_err(self.err(&d.entry, "chmod"))?;
                futimens(&self.root, &t, &t).map_err(self.err(&d.entry, "set the times of"))?;
                continue;
            };
            // A later entry may have removed or replaced the directory: then there is nothing
            // to finish.
            let Ok(Some(parent)) = self.open_dirs(parents, &d.entry, false) else {
                continue;
            };
            if is_dir(&parent, base).ok().flatten() != Some(SFlag::S_IFDIR) {
                continue;
            }
            fchmodat(&parent, base.as_slice(), mode, FchmodatFlags::FollowSymlink)
                .map_err(self.err(&d.entry, "chmod"))?;
            utimensat(
                &parent,
                base.as_slice(),
                &t,
                &t,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(self.err(&d.entry, "set the times of"))?;
        }
        Ok(())
    }
}

fn ids(h: &EntryHeader, entry: &str, dest: &Path) -> Result<(Uid, Gid), LayerError> {
    match (u32::try_from(h.uid), u32::try_from(h.gid)) {
        (Ok(u), Ok(g)) if u != u32::MAX && g != u32::MAX => {
            Ok((Uid::from_raw(u), Gid::from_raw(g)))
        }
        _ => Err(LayerError::Apply {
            entry: entry.to_owned(),
            dest: dest.to_path_buf(),
            op: "chown",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("uid `{}` or gid `{}` is out of range", h.uid, h.gid),
            ),
        }),
    }
}

fn copy_data<R: Read, W: Write>(r: &mut R, w: &mut W) -> io::Result<u64> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_drop_dots_and_refuse_escapes() {
        assert_eq!(
            components(b"./a/./b/").ok(),
            Some(vec![b"a".to_vec(), b"b".to_vec()])
        );
        assert!(matches!(
            components(b"a/../../b"),
            Err(LayerError::ParentComponent { .. })
        ));
        assert!(matches!(
            components(b"/etc"),
            Err(LayerError::AbsolutePath { .. })
        ));
        assert_eq!(components(b"./").ok(), Some(vec![]));
    }
}
