//! Writing a layer tar from a directory diff (see the module docs of [`crate::layer`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use xattr::FileExt as _;

use super::digests::{ContentDigests, Digesting};
use super::known::{self, KnownFiles};
use super::tar_format::{
    self, EntryHeader, KIND_BLOCK, KIND_CHAR, KIND_DIR, KIND_FIFO, KIND_FILE, KIND_LINK,
    KIND_SYMLINK,
};
use super::{LayerError, LayerStats, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, WriteOptions};
use crate::digest::HashTap;

/// Write the OCI layer tar for an overlay upperdir (or any plain directory = a full layer).
///
/// The output is deterministic: the same tree always gives the same bytes. `out` should be
/// buffered or fast; writes are batched internally in 64 KiB chunks.
pub fn write_layer<W: Write>(
    diff_dir: &Path,
    out: W,
    opts: &WriteOptions,
) -> Result<LayerStats, LayerError> {
    write_inner(diff_dir, out, opts, None, None, None).map(|(stats, _)| stats)
}

/// [`write_layer`], taking the content of the regular files `known` has
/// (by path in the layer, when the size is the same) from there instead
/// of reading them. Gives back the contents of the layer's small files for
/// the next time (see [`KnownFiles`]): those it took from `known` and
/// those it read. The tar is the one [`write_layer`] writes when `known`
/// is right about every file it has.
pub fn write_layer_reusing<W: Write>(
    diff_dir: &Path,
    out: W,
    opts: &WriteOptions,
    known: KnownFiles,
) -> Result<(LayerStats, KnownFiles), LayerError> {
    let (stats, known, _) = write_layer_with(diff_dir, out, opts, Some(known), None)?;
    Ok((stats, known.unwrap_or_default()))
}

/// [`write_layer_reusing`] (or [`write_layer`], without `known`) that also
/// takes the content digest of every regular file's content (see
/// [`ContentDigests`]); big files are hashed on another thread meanwhile.
pub fn write_layer_digesting<W: Write>(
    diff_dir: &Path,
    out: W,
    opts: &WriteOptions,
    known: Option<KnownFiles>,
) -> Result<(LayerStats, Option<KnownFiles>, ContentDigests), LayerError> {
    let opts = WriteOptions {
        content_digests: true,
        ..opts.clone()
    };
    let (stats, known, digests) = write_layer_with(diff_dir, out, &opts, known, None)?;
    Ok((stats, known, digests.unwrap_or_default()))
}

/// [`write_layer_reusing`] with `known`, else [`write_layer`]; with
/// [`WriteOptions::content_digests`], also the content digests. With a
/// `tap` (of the [`crate::digest::PipeHasher`] that `out` ends in, when
/// nothing else between them needs the bytes), big mapped files go to the
/// hasher as mappings, without a copy: the walk goes on to the next files
/// while they are hashed.
pub(crate) fn write_layer_with<W: Write>(
    diff_dir: &Path,
    out: W,
    opts: &WriteOptions,
    known: Option<KnownFiles>,
    tap: Option<HashTap>,
) -> Result<(LayerStats, Option<KnownFiles>, Option<ContentDigests>), LayerError> {
    match known {
        Some(mut known) => {
            let mut recorded = KnownFiles::default();
            let (stats, digests) = write_inner(
                diff_dir,
                out,
                opts,
                Some(&mut known),
                Some(&mut recorded),
                tap,
            )?;
            known.keep_used();
            known.absorb(recorded);
            Ok((stats, Some(known), digests))
        }
        None => {
            let (stats, digests) = write_inner(diff_dir, out, opts, None, None, tap)?;
            Ok((stats, None, digests))
        }
    }
}

fn write_inner<W: Write>(
    diff_dir: &Path,
    out: W,
    opts: &WriteOptions,
    known: Option<&mut KnownFiles>,
    record: Option<&mut KnownFiles>,
    tap: Option<HashTap>,
) -> Result<(LayerStats, Option<ContentDigests>), LayerError> {
    let mut w = Writer {
        out: BufWriter::with_capacity(64 * 1024, out),
        stats: LayerStats::default(),
        opts: opts.clone(),
        links: HashMap::new(),
        header: Vec::with_capacity(2048),
        // Grown to the biggest file read (up to 128 KiB): a layer of small
        // files touches no more memory than they need.
        copy_buf: Vec::new(),
        known,
        record,
        content: Vec::new(),
        digesting: opts.content_digests.then(Digesting::default),
        tap,
    };
    // The root itself must be a directory; its own metadata is not part of the diff.
    let md = fs_err::metadata(diff_dir).map_err(|source| LayerError::ReadDiff {
        path: diff_dir.to_path_buf(),
        source,
    })?;
    if !md.is_dir() {
        return Err(LayerError::UnsupportedFile {
            path: diff_dir.to_path_buf(),
            reason: "the diff must be a directory",
        });
    }
    let root = openat(
        nix::fcntl::AT_FDCWD,
        diff_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_err(diff_dir))?;
    w.walk(&root, diff_dir, b"")?;
    w.stats.bytes += tar_format::write_end(&mut w.out).map_err(LayerError::WriteTar)?;
    w.out.flush().map_err(LayerError::WriteTar)?;
    Ok((w.stats, w.digesting.map(Digesting::finish)))
}

struct Writer<'k, W: Write> {
    out: BufWriter<W>,
    stats: LayerStats,
    opts: WriteOptions,
    /// (dev, ino) of multiply-linked files → the first name written for them.
    links: HashMap<(u64, u64), Vec<u8>>,
    header: Vec<u8>,
    copy_buf: Vec<u8>,
    /// Contents not to read again (see [`KnownFiles`]).
    known: Option<&'k mut KnownFiles>,
    /// Where to record small files' contents.
    record: Option<&'k mut KnownFiles>,
    /// The content of the file being copied, when it is recorded.
    content: Vec<u8>,
    /// The content digests being taken, if they are.
    digesting: Option<Digesting>,
    /// Where big mapped files go without a copy, if anywhere.
    tap: Option<HashTap>,
}

/// Regular files from this size are read through a mapping.
const MAP_FROM: u64 = 1 << 20;

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::ReadDiff {
        path: path.to_path_buf(),
        source,
    }
}

/// Xattrs worth recording: everything but overlayfs' private ones and host SELinux labels.
fn keep_xattr(name: &[u8]) -> bool {
    !(name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name == b"security.selinux")
}

/// Xattrs as `(name, value)` pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Where to read xattrs from: an open file (no path walk) or, for symlinks and device nodes
/// that cannot be opened safely, the path (`llistxattr`, not following).
enum XattrSource<'a> {
    Fd(&'a File),
    Path,
}

/// What [`read_xattrs`] found.
struct FoundXattrs {
    /// The xattrs to record.
    kept: Xattrs,
    /// Whether the directory is overlay-opaque.
    opaque: bool,
    /// Whether there were none at all (not even overlayfs' own).
    none: bool,
}

/// The xattrs of `path` (see [`FoundXattrs`]).
fn read_xattrs(path: &Path, src: XattrSource<'_>) -> Result<FoundXattrs, LayerError> {
    let mut out = Vec::new();
    let mut opaque = false;
    let mut none = true;
    let listed = match src {
        XattrSource::Fd(f) => f.list_xattr(),
        XattrSource::Path => xattr::list(path),
    };
    let names = match listed {
        Ok(n) => n,
        // File systems without xattrs (or a kernel refusing `user.` on symlinks) have none.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            return Ok(FoundXattrs {
                kept: out,
                opaque,
                none,
            });
        }
        Err(e) => {
            return Err(LayerError::ReadDiff {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    for name in names {
        none = false;
        let bytes = name.as_bytes();
        if bytes.ends_with(b".overlay.redirect") || bytes.ends_with(b".overlay.metacopy") {
            // With `redirect_dir` or `metacopy` the upperdir is not a self-contained diff
            // (renamed directories and data-less copy-ups point into the lower layers).
            return Err(LayerError::UnsupportedFile {
                path: path.to_path_buf(),
                reason: "overlayfs `redirect_dir`/`metacopy` upperdirs cannot be written as a layer; mount with redirect_dir=off,metacopy=off",
            });
        }
        let is_opaque_key = bytes == b"trusted.overlay.opaque" || bytes == b"user.overlay.opaque";
        if !is_opaque_key && !keep_xattr(bytes) {
            continue;
        }
        let value = match src {
            XattrSource::Fd(f) => f.get_xattr(&name),
            XattrSource::Path => xattr::get(path, &name),
        };
        let Some(value) = value.map_err(read_err(path))? else {
            continue;
        };
        if is_opaque_key {
            opaque |= value == b"y";
        } else {
            out.push((bytes.to_vec(), value));
        }
    }
    out.sort();
    Ok(FoundXattrs {
        kept: out,
        opaque,
        none,
    })
}

fn errno_err(path: &Path) -> impl FnOnce(Errno) -> LayerError + '_ {
    move |e| LayerError::ReadDiff {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn open_at(dir: &OwnedFd, name: &[u8], path: &Path, flags: OFlag) -> Result<File, LayerError> {
    openat(
        dir,
        name,
        flags | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(errno_err(path))
}

impl<W: Write> Writer<'_, W> {
    fn clamp(&self, mtime: i64) -> i64 {
        match self.opts.source_date_epoch {
            Some(epoch) if mtime > epoch => epoch,
            _ => mtime,
        }
    }

    fn emit(&mut self, h: &EntryHeader) -> Result<(), LayerError> {
        self.header.clear();
        let n = tar_format::encode_header(h, &mut self.header);
        self.out
            .write_all(&self.header)
            .map_err(LayerError::WriteTar)?;
        self.stats.bytes += n as u64;
        self.stats.entries += 1;
        Ok(())
    }

    fn base_header(&self, name: Vec<u8>, kind: u8, st: &FileStat) -> EntryHeader {
        EntryHeader {
            name,
            kind,
            mode: st.st_mode & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            mtime: self.clamp(st.st_mtime),
            ..EntryHeader::default()
        }
    }

    /// Write the entries of the directory `dir` (open fd; `dir_path` names it in errors).
    /// All file-system access is relative to directory fds: no path is walked twice and no
    /// symlink is followed.
    fn walk(&mut self, dir: &OwnedFd, dir_path: &Path, prefix: &[u8]) -> Result<(), LayerError> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        {
            let dup = dir.try_clone().map_err(read_err(dir_path))?;
            let mut d = nix::dir::Dir::from_fd(dup).map_err(errno_err(dir_path))?;
            for entry in d.iter() {
                let entry = entry.map_err(errno_err(dir_path))?;
                let n = entry.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(n.to_vec());
                }
            }
        }
        names.sort();
        for name in names {
            let path = dir_path.join(OsStr::from_bytes(&name));
            let mut rel = prefix.to_vec();
            rel.extend_from_slice(&name);
            self.entry(dir, &path, &name, rel)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: &OwnedFd,
        path: &Path,
        base: &[u8],
        rel: Vec<u8>,
    ) -> Result<(), LayerError> {
        let st = fstatat(dir, base, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno_err(path))?;
        let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());

        // An overlay whiteout: a 0/0 character device.
        if fmt == SFlag::S_IFCHR && st.st_rdev == 0 {
            let mut name = rel[..rel.len() - base.len()].to_vec();
            name.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
            name.extend_from_slice(base);
            let h = self.base_header(name, KIND_FILE, &st);
            return self.emit(&h);
        }
        if base.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return Err(LayerError::UnsupportedFile {
                path: path.to_path_buf(),
                reason: "names starting with `.wh.` are reserved for OCI whiteouts",
            });
        }

        if fmt == SFlag::S_IFDIR {
            let sub = open_at(dir, base, path, OFlag::O_DIRECTORY)?;
            let FoundXattrs {
                kept: xattrs,
                opaque,
                ..
            } = read_xattrs(path, XattrSource::Fd(&sub))?;
            let mut name = rel.clone();
            name.push(b'/');
            let mut h = self.base_header(name.clone(), KIND_DIR, &st);
            h.xattrs = xattrs;
            self.emit(&h)?;
            if opaque {
                let mut marker = name.clone();
                marker.extend_from_slice(WHITEOUT_OPAQUE.as_bytes());
                let mut o = self.base_header(marker, KIND_FILE, &st);
                o.mode &= 0o777;
                self.emit(&o)?;
            }
            let sub = OwnedFd::from(sub);
            return self.walk(&sub, path, &name);
        }

        let kind = match fmt {
            SFlag::S_IFREG => KIND_FILE,
            SFlag::S_IFLNK => KIND_SYMLINK,
            SFlag::S_IFCHR => KIND_CHAR,
            SFlag::S_IFBLK => KIND_BLOCK,
            SFlag::S_IFIFO => KIND_FIFO,
            // Sockets cannot be archived; docker and containerd skip them too.
            _ => return Ok(()),
        };

        if kind == KIND_FILE
            && let Some(known) = self.known.as_deref_mut()
            && known
                .get(&rel)
                .is_some_and(|c| u64::try_from(st.st_size).is_ok_and(|n| n == c.len() as u64))
        {
            return self.known_file(rel, &st);
        }
        let file = if kind == KIND_FILE {
            Some(open_at(dir, base, path, OFlag::empty())?)
        } else {
            None
        };
        let FoundXattrs {
            kept: xattrs, none, ..
        } = match &file {
            Some(f) => read_xattrs(path, XattrSource::Fd(f))?,
            None => read_xattrs(path, XattrSource::Path)?,
        };
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let mut h = self.base_header(rel, KIND_LINK, &st);
                h.link = first.clone();
                h.xattrs = xattrs;
                return self.emit(&h);
            }
            self.links.insert(key, rel.clone());
        }

        // Small files without xattrs are recorded (for a later
        // `write_layer_reusing` of a layer linking them).
        let record = kind == KIND_FILE
            && xattrs.is_empty()
            && self.record.is_some()
            && u64::try_from(st.st_size).is_ok_and(|n| n <= known::MAX_FILE);
        let rel_for_record = record.then(|| rel.clone());
        let mut h = self.base_header(rel, kind, &st);
        h.xattrs = xattrs;
        match (kind, file) {
            (KIND_SYMLINK, _) => {
                h.link = readlinkat(dir, base)
                    .map_err(errno_err(path))?
                    .as_bytes()
                    .to_vec();
                self.emit(&h)
            }
            (KIND_CHAR | KIND_BLOCK, _) => {
                let rdev = st.st_rdev;
                h.dev_major = u32::try_from(nix::sys::stat::major(rdev)).unwrap_or(u32::MAX);
                h.dev_minor = u32::try_from(nix::sys::stat::minor(rdev)).unwrap_or(u32::MAX);
                self.emit(&h)
            }
            (KIND_FILE, Some(file)) => {
                h.size = u64::try_from(st.st_size).unwrap_or(0);
                self.emit(&h)?;
                self.content.clear();
                let digest_as = self.digesting.is_some().then(|| h.name.clone());
                self.copy_file(file, path, h.size, record, digest_as.map(|n| (n, none)))?;
                if let (Some(rel), Some(rec)) = (rel_for_record, self.record.as_deref_mut()) {
                    rec.record(&rel, &self.content);
                }
                Ok(())
            }
            _ => self.emit(&h),
        }
    }

    /// Stream exactly `size` bytes of `path` (its size when stat'ed) into the tar.
    /// A regular file whose content `known` has: its header (no xattrs:
    /// only xattr-free files are recorded), then the known bytes.
    fn known_file(&mut self, rel: Vec<u8>, st: &FileStat) -> Result<(), LayerError> {
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let mut h = self.base_header(rel, KIND_LINK, st);
                h.link = first.clone();
                return self.emit(&h);
            }
            self.links.insert(key, rel.clone());
        }
        let Some(known) = self.known.as_deref_mut() else {
            return Ok(());
        };
        let size = known.take(&rel).map_or(0, <[u8]>::len) as u64;
        let mut h = self.base_header(rel, KIND_FILE, st);
        h.size = size;
        self.header.clear();
        let n = tar_format::encode_header(&h, &mut self.header);
        self.stats.bytes += n as u64;
        self.stats.entries += 1;
        let pad = tar_format::padding(size);
        let content = self
            .known
            .as_deref()
            .and_then(|k| k.get(&h.name))
            .unwrap_or_default();
        self.out
            .write_all(&self.header)
            .and_then(|()| self.out.write_all(content))
            .and_then(|()| self.out.write_all(&[0u8; tar_format::BLOCK][..pad]))
            .map_err(LayerError::WriteTar)?;
        self.stats.bytes += size + pad as u64;
        if let Some(d) = self.digesting.as_mut() {
            // (Its xattrs were not listed: not known to have none.)
            d.add(h.name, size, crate::content_digest(content), false);
        }
        Ok(())
    }

    fn copy_file(
        &mut self,
        file: File,
        path: &Path,
        size: u64,
        record: bool,
        digest_as: Option<(Vec<u8>, bool)>,
    ) -> Result<(), LayerError> {
        if size >= MAP_FROM && !record && self.opts.map_big_files {
            // The file's size now must be the size stat'ed (the mapping's
            // length): a file that changed is an error, as when reading.
            let now = file.metadata().map(|m| m.len()).unwrap_or(0);
            if now != size {
                return Err(LayerError::ReadDiff {
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file changed size while it was being archived",
                    ),
                });
            }
            // The file's own digest is taken on another core while its
            // bytes go to the tar (the two hashes are independent).
            let spawned = match (self.digesting.as_mut(), digest_as.as_ref()) {
                (Some(d), Some((name, bare))) => d.spawn_mapped(name.clone(), &file, size, *bare),
                _ => false,
            };
            let out = &mut self.out;
            let mut write_err = None;
            let mapped = match &self.tap {
                // What is buffered goes first, then the mappings.
                Some(tap) => match out.flush() {
                    Ok(()) => super::mapped::for_each_mapping(&file, size, |m| {
                        tap.send(std::sync::Arc::new(m)).map_err(|e| {
                            let kind = e.kind();
                            write_err = Some(e);
                            io::Error::from(kind)
                        })
                    }),
                    Err(e) => return Err(LayerError::WriteTar(e)),
                },
                None => super::mapped::for_each_window(&file, size, |bytes| {
                    bytes
                        .chunks(1 << 20)
                        .try_for_each(|c| out.write_all(c))
                        .map_err(|e| {
                            let kind = e.kind();
                            write_err = Some(e);
                            io::Error::from(kind)
                        })
                }),
            };
            if let Some(e) = write_err {
                return Err(LayerError::WriteTar(e));
            }
            if mapped.map_err(read_err(path))? {
                if !spawned
                    && let (Some(d), Some((name, bare))) = (self.digesting.as_mut(), digest_as)
                {
                    d.spawn_mapped(name, &file, size, bare);
                }
                let pad = tar_format::padding(size);
                self.out
                    .write_all(&[0u8; tar_format::BLOCK][..pad])
                    .map_err(LayerError::WriteTar)?;
                self.stats.bytes += size + pad as u64;
                return Ok(());
            }
        }
        let want = usize::try_from(size.clamp(1, 128 * 1024)).unwrap_or(128 * 1024);
        if self.copy_buf.len() < want {
            self.copy_buf.resize(want, 0);
        }
        let mut left = size;
        let mut content_hash = digest_as.as_ref().map(|_| crate::ContentHasher::new());
        let mut reader = file.take(size);
        while left > 0 {
            let n = match reader.read(&mut self.copy_buf) {
                Ok(0) => {
                    return Err(LayerError::ReadDiff {
                        path: path.to_path_buf(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the file shrank while it was being archived",
                        ),
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(LayerError::ReadDiff {
                        path: path.to_path_buf(),
                        source: e,
                    });
                }
            };
            self.out
                .write_all(&self.copy_buf[..n])
                .map_err(LayerError::WriteTar)?;
            if record {
                self.content.extend_from_slice(&self.copy_buf[..n]);
            }
            if let Some(h) = content_hash.as_mut() {
                h.update(&self.copy_buf[..n]);
            }
            left -= n as u64;
        }
        if let (Some(d), Some((name, bare)), Some(h)) =
            (self.digesting.as_mut(), digest_as, content_hash)
        {
            d.add(name, size, h.finalize(), bare);
        }
        let pad = tar_format::padding(size);
        self.out
            .write_all(&[0u8; tar_format::BLOCK][..pad])
            .map_err(LayerError::WriteTar)?;
        self.stats.bytes += size + pad as u64;
        Ok(())
    }
}
