//! Path resolution inside a root, like a chroot (continuity's `fs.RootPath`).
//!
//! Every component is looked up under the root; a symlink is replaced by its
//! target, an absolute target restarts from the root, and `..` never climbs
//! above the root. A component that does not exist ends the lookups: the
//! rest is appended as written (cleaned). The result is always a path under
//! the root, whatever the links say.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::{FileOpError, InRoot};

/// The most symlinks one resolution follows (Linux's `MAXSYMLINKS` is 40;
/// continuity allows 255).
const MAX_LINKS: usize = 255;

/// Resolve `path` (absolute, or relative to `/`) inside `root`. With
/// `follow_final`, a symlink in the last component is followed too;
/// otherwise only the parents are resolved and the last name is kept.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("kiln-doc-root-{}", std::process::id()));
/// # let _ = fs_err::create_dir_all(dir.join("opt/app"));
/// # let _ = std::os::unix::fs::symlink("/opt/app", dir.join("app"));
/// use kiln_solver::fileop::resolve_in_root;
/// // `/app -> /opt/app`: followed inside the root.
/// assert_eq!(resolve_in_root(&dir, "/app/x", true).unwrap(), dir.join("opt/app/x"));
/// // `..` after the link climbs from `/opt/app`, and stops at the root.
/// assert_eq!(resolve_in_root(&dir, "/app/../../../etc", true).unwrap(), dir.join("etc"));
/// # let _ = fs_err::remove_dir_all(&dir);
/// ```
pub fn resolve_in_root(
    root: &Path,
    path: &str,
    follow_final: bool,
) -> Result<PathBuf, FileOpError> {
    Ok(resolve(root, path, follow_final)?.host)
}

/// [`resolve_in_root`], also returning the path as seen inside the root.
pub(super) fn resolve(root: &Path, path: &str, follow_final: bool) -> Result<InRoot, FileOpError> {
    let mut pending: VecDeque<OsString> = components(Path::new(path));
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    let mut missing = false;
    while let Some(comp) = pending.pop_front() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        if missing {
            resolved.push(comp);
            continue;
        }
        let is_last = pending.is_empty();
        let mut candidate = root.to_path_buf();
        candidate.extend(resolved.iter());
        candidate.push(&comp);
        match fs_err::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() && (!is_last || follow_final) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(FileOpError::SymlinkLoop {
                        path: path.to_owned(),
                    });
                }
                let target = fs_err::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in components(&target).into_iter().rev() {
                    pending.push_front(c);
                }
            }
            Ok(_) => resolved.push(comp),
            Err(e) if is_absent(&e) => {
                missing = true;
                resolved.push(comp);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut host = root.to_path_buf();
    host.extend(resolved.iter());
    let mut inner = String::new();
    for c in &resolved {
        inner.push('/');
        inner.push_str(&c.to_string_lossy());
    }
    if inner.is_empty() {
        inner.push('/');
    }
    Ok(InRoot { host, inner })
}

/// The normal and `..` components of a path (`/`, `.` and empty dropped).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// `NotFound`, or `ENOTDIR` (a parent is a file): the path does not exist.
pub(super) fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Go's `path.Clean` of `/` + `p`: the absolute, lexically clean form.
pub(super) fn clean_abs(p: &str) -> String {
    let joined = format!("/{p}");
    kiln_parser::clean_path(&joined).into_owned()
}

/// `inner` joined with `name`, as seen inside the root.
pub(super) fn join_inner(inner: &str, name: &std::ffi::OsStr) -> String {
    let name = String::from_utf8_lossy(name.as_bytes());
    if inner.ends_with('/') {
        format!("{inner}{name}")
    } else {
        format!("{inner}/{name}")
    }
}
