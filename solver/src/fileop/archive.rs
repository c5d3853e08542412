//! ADD of a local archive: detected by content (gzip, bzip2, xz, zstd or
//! plain tar, as BuildKit's `isArchivePath` via `DecompressStream`), extracted
//! into the destination directory like Docker's `chrootarchive.Untar`:
//! absolute names are taken relative to the destination, a name whose `..`
//! climbs above it is refused, parents are resolved through symlinks inside
//! the root (never out of it), and an existing non-directory is replaced.

use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;

use super::copy::with_path;
use super::root::{is_absent, resolve};
use super::{EntryKind, FileOpError, InRoot, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// A writer that keeps the first `limit` bytes and then fails, to stop a
/// decoder that can only write whole streams.
struct Head {
    buf: Vec<u8>,
    limit: usize,
}

impl Write for Head {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.limit - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.limit {
            return Err(io::Error::other("enough"));
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `path` is a regular file holding a (possibly compressed) tar
/// archive: its first header must read.
pub(super) fn is_archive(path: &Path) -> Result<bool, FileOpError> {
    let meta = fs_err::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Ok(false);
    }
    let mut file = fs_err::File::open(path)?;
    let mut head = [0u8; 6];
    let n = read_up_to(&mut file, &mut head)?;
    file.rewind()?;
    // Enough for PAX/GNU long-name headers before the first real entry.
    const PEEK: u64 = 64 * 1024;
    let mut first = Vec::new();
    match sniff(&head[..n]) {
        Compression::Gzip => {
            let _ = flate2::read::MultiGzDecoder::new(file)
                .take(PEEK)
                .read_to_end(&mut first);
        }
        Compression::Bzip2 => {
            let _ = bzip2::read::MultiBzDecoder::new(file)
                .take(PEEK)
                .read_to_end(&mut first);
        }
        Compression::Zstd => {
            if let Ok(d) = zstd::stream::read::Decoder::new(file) {
                let _ = d.take(PEEK).read_to_end(&mut first);
            }
        }
        Compression::Xz => {
            let mut w = Head {
                buf: Vec::new(),
                limit: PEEK as usize,
            };
            // The decoder stops with an error once `Head` is full; what was
            // written is all we need, whatever the outcome.
            let _ = lzma_rs::xz_decompress(&mut BufReader::new(file), &mut w);
            first = w.buf;
        }
        Compression::None => {
            let _ = file.take(PEEK).read_to_end(&mut first);
        }
    }
    if first.len() < 512 {
        return Ok(false);
    }
    let mut ar = tar::Archive::new(&first[..]);
    let ok = matches!(ar.entries().map(|mut e| e.next()), Ok(Some(Ok(_))));
    Ok(ok && header_checksum_ok(&first[..512]))
}

/// The tar crate accepts some garbage as a header; check the checksum as
/// Go's `archive/tar` does.
fn header_checksum_ok(h: &[u8]) -> bool {
    let field = &h[148..156];
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let Ok(want) = u64::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    sum == want
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Extract the archive at `path` into the directory `dst` (created by the
/// caller) inside `dest_root`. `label` names the archive in errors.
pub(super) fn extract(
    path: &Path,
    label: &str,
    dest_root: &Path,
    dst: &InRoot,
    report: &mut Report,
    apply_ownership: bool,
) -> Result<(), FileOpError> {
    let mut file = fs_err::File::open(path)?;
    let mut head = [0u8; 6];
    let n = read_up_to(&mut file, &mut head)?;
    file.rewind()?;
    let bad = |source: io::Error| FileOpError::Archive {
        archive: label.to_owned(),
        source,
    };
    // xz has no streaming reader here: decode to a private temp file first.
    let mut spool;
    let reader: Box<dyn Read> = match sniff(&head[..n]) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file).map_err(bad)?),
        Compression::Xz => {
            spool = tempfile::tempfile()?;
            lzma_rs::xz_decompress(&mut BufReader::new(file), &mut spool)
                .map_err(|e| bad(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
            spool.rewind()?;
            Box::new(spool)
        }
        Compression::None => Box::new(file),
    };
    let mut ar = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, FileTime)> = Vec::new();
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path().map_err(bad)?.into_owned();
        let Some(rel) = contained(&raw) else {
            return Err(FileOpError::ArchiveEscape {
                archive: label.to_owned(),
                entry: raw.to_string_lossy().into_owned(),
            });
        };
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            continue; // `./` itself
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent_inner = join_inner(&dst.inner, parent_rel);
        let parent = resolve(dest_root, &parent_inner, true)?;
        mkdir_parents(dest_root, &parent.host)?;
        let target = parent.host.join(&name);
        let inner = super::root::join_inner(&parent.inner, &name);
        let header = entry.header().clone();
        let xattrs = pax_xattrs(&mut entry).map_err(bad)?;
        let kind = header.entry_type();
        // Replace what is there, unless a directory meets a directory.
        match fs_err::symlink_metadata(&target) {
            Ok(m) if m.is_dir() && kind.is_dir() => {}
            Ok(m) if m.is_dir() => fs_err::remove_dir_all(&target)?,
            Ok(_) => fs_err::remove_file(&target)?,
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e.into()),
        }
        // Go's archive/tar reads an empty numeric field as 0; so do we.
        let mode = header.mode().unwrap_or(0) & 0o7777;
        let written = if kind.is_dir() {
            if !target.exists() {
                fs_err::create_dir(&target)?;
            }
            EntryKind::Dir
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut out = fs_err::File::create(&target)?;
            report.bytes += io::copy(&mut entry, &mut out).map_err(bad)?;
            EntryKind::File
        } else if kind.is_symlink() {
            let link = entry.link_name().map_err(bad)?.unwrap_or_default();
            fs_err::os::unix::fs::symlink(link.as_ref(), &target)?;
            EntryKind::Symlink
        } else if kind.is_hard_link() {
            let link = entry.link_name().map_err(bad)?.unwrap_or_default();
            let Some(link_rel) = contained(&link) else {
                return Err(FileOpError::ArchiveEscape {
                    archive: label.to_owned(),
                    entry: link.to_string_lossy().into_owned(),
                });
            };
            let src = resolve(dest_root, &join_inner(&dst.inner, &link_rel), false)?;
            fs_err::hard_link(&src.host, &target)?;
            report.push(inner, EntryKind::Hardlink);
            continue;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            use nix::sys::stat::{Mode, SFlag, makedev, mknod};
            let sflag = if kind.is_fifo() {
                SFlag::S_IFIFO
            } else if kind.is_block_special() {
                SFlag::S_IFBLK
            } else {
                SFlag::S_IFCHR
            };
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            mknod(
                &target,
                sflag,
                Mode::from_bits_truncate(mode),
                makedev(u64::from(major), u64::from(minor)),
            )
            .map_err(|e| with_path(io::Error::from(e), &target))?;
            EntryKind::Special
        } else {
            continue; // pax globals and other metadata-only entries
        };
        if apply_ownership {
            let uid = u32::try_from(header.uid().unwrap_or(0)).unwrap_or(0);
            let gid = u32::try_from(header.gid().unwrap_or(0)).unwrap_or(0);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(|e| with_path(e, &target))?;
        }
        for (key, value) in &xattrs {
            set_xattr(&target, key, value)?;
        }
        let mtime = FileTime::from_unix_time(header.mtime().unwrap_or(0) as i64, 0);
        if written != EntryKind::Symlink {
            fs_err::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        }
        if written == EntryKind::Dir {
            dirs.push((target.clone(), mtime));
        } else {
            filetime::set_symlink_file_times(&target, mtime, mtime)
                .map_err(|e| with_path(e, &target))?;
        }
        report.push(inner, written);
    }
    // Directory times last: writing their children changed them.
    for (dir, mtime) in dirs.into_iter().rev() {
        filetime::set_symlink_file_times(&dir, mtime, mtime).map_err(|e| with_path(e, &dir))?;
    }
    Ok(())
}

/// `SCHILY.xattr.*` PAX records of an entry.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix("SCHILY.xattr.")
            {
                out.push((name.to_owned(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Docker's `createTarFile`: an xattr the file system does not support, or
/// that this process may not set, is skipped; other failures are errors.
fn set_xattr(target: &Path, key: &str, value: &[u8]) -> Result<(), FileOpError> {
    match xattr::set(target, key, value) {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::Unsupported
                || e.kind() == io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(nix::errno::Errno::EOPNOTSUPP as i32)
                || e.raw_os_error() == Some(nix::errno::Errno::EPERM as i32) =>
        {
            Ok(())
        }
        Err(e) => Err(with_path(e, target).into()),
    }
}

/// The entry name as a relative path inside the destination: leading `/`
/// dropped, `.` removed, `..` applied; `None` when it climbs out.
fn contained(name: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

fn join_inner(base: &str, rel: &Path) -> String {
    let rel = rel.to_string_lossy();
    if rel.is_empty() {
        base.to_owned()
    } else if base.ends_with('/') {
        format!("{base}{rel}")
    } else {
        format!("{base}/{rel}")
    }
}

/// Create missing parents (0755) of an already-resolved host path.
fn mkdir_parents(root: &Path, dir: &Path) -> Result<(), FileOpError> {
    let mut missing = Vec::new();
    let mut cur = dir.to_path_buf();
    while cur.starts_with(root) && cur != root {
        match fs_err::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(FileOpError::NotADirectory {
                    path: cur.to_string_lossy().into_owned(),
                });
            }
            Err(e) if is_absent(&e) => missing.push(cur.clone()),
            Err(e) => return Err(e.into()),
        }
        if !cur.pop() {
            break;
        }
    }
    for d in missing.into_iter().rev() {
        fs_err::create_dir(&d)?;
        fs_err::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}
