//! WORKDIR: BuildKit's `dispatchWorkdir` makes the directory with
//! `llb.Mkdir(wd, 0755, WithParents(true), WithUser(USER))`: every missing
//! directory on the way is created 0755 and, when the stage has a USER,
//! owned by that user (looked up in the stage's own `/etc/passwd`); an
//! existing one is left alone. `/` makes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use filetime::FileTime;

use super::chown::resolve_owner;
use super::copy::with_path;
use super::root::{clean_abs, is_absent, resolve};
use super::{EntryKind, FileOpError, Report};

/// Create the WORKDIR `path` (absolute, already joined to the previous
/// WORKDIR by the planner) inside `root`, resolving symlinks inside it.
/// `user` is the stage's USER (`""` or `None`: root), `created_time` the
/// `SOURCE_DATE_EPOCH` time for the new directories.
pub fn mkdir_workdir(
    root: &Path,
    path: &str,
    user: Option<&str>,
    created_time: Option<SystemTime>,
    apply_ownership: bool,
) -> Result<Report, FileOpError> {
    let mut report = Report::default();
    let abs = clean_abs(path);
    if abs == "/" {
        return Ok(report);
    }
    let owner = match user.filter(|u| !u.is_empty()) {
        Some(u) => Some(resolve_owner(root, u)?),
        None => None,
    };
    let target = resolve(root, &abs, true)?;
    let mut missing = Vec::new();
    let mut cur = target.host.clone();
    while cur.starts_with(root) && cur != root {
        match fs_err::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(FileOpError::NotADirectory {
                    path: inner_of(root, &cur),
                });
            }
            Err(e) if is_absent(&e) => missing.push(cur.clone()),
            Err(e) => return Err(e.into()),
        }
        if !cur.pop() {
            break;
        }
    }
    let mut created = Vec::new();
    for dir in missing.into_iter().rev() {
        fs_err::create_dir(&dir)?;
        fs_err::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        if let Some(o) = owner.filter(|_| apply_ownership) {
            std::os::unix::fs::lchown(&dir, Some(o.uid), Some(o.gid))
                .map_err(|e| with_path(e, &dir))?;
        }
        report.push(inner_of(root, &dir), EntryKind::Dir);
        created.push(dir);
    }
    // Times last: making a child changed its parent's.
    if let Some(t) = created_time {
        let t = FileTime::from_system_time(t);
        for dir in &created {
            filetime::set_symlink_file_times(dir, t, t)?;
        }
    }
    Ok(report)
}

fn inner_of(root: &Path, host: &Path) -> String {
    match host.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.to_string_lossy()),
        Err(_) => host.to_string_lossy().into_owned(),
    }
}
