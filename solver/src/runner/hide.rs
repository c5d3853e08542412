//! The context as `RUN --mount=type=bind` shows it: without the entries
//! the `.dockerignore` leaves out (BuildKit mounts the filtered context it
//! received). The view is an overlay whose top lower layer holds a
//! whiteout (a 0:0 character device) for each ignored entry; directories
//! made on the way copy the mode and owner of the context's.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use kiln_parser::{MatchInfo, PatternMatcher};

use super::RunnerError;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunnerError + '_ {
    move |source| RunnerError::Scratch {
        path: path.to_owned(),
        source,
    }
}

/// Write into `layer` a whiteout for every entry below `source` (the
/// context directory at context-relative `rel`, `.` for the root) that
/// `ignore` leaves out. Returns how many there are.
pub(super) fn whiteout_layer(
    source: &Path,
    rel: &str,
    ignore: &PatternMatcher,
    layer: &Path,
) -> Result<usize, RunnerError> {
    fs_err::create_dir_all(layer).map_err(io_err(layer))?;
    let mut count = 0;
    // (context-relative dir, host dir, path below `source`, match info)
    let mut stack: Vec<(String, PathBuf, PathBuf, MatchInfo)> = vec![(
        rel.to_owned(),
        source.to_owned(),
        PathBuf::new(),
        MatchInfo::default(),
    )];
    while let Some((rel_dir, host_dir, sub_dir, info)) = stack.pop() {
        let entries = fs_err::read_dir(&host_dir).map_err(io_err(&host_dir))?;
        for e in entries {
            let e = e.map_err(io_err(&host_dir))?;
            let name = e.file_name();
            let name_s = name.to_string_lossy();
            let rel_path = if rel_dir == "." || rel_dir.is_empty() {
                name_s.into_owned()
            } else {
                format!("{rel_dir}/{name_s}")
            };
            let host = host_dir.join(&name);
            let sub = sub_dir.join(&name);
            let is_dir = e.file_type().map_err(io_err(&host))?.is_dir();
            let (ignored, child_info) = ignore.matches_with_parent(&rel_path, &info);
            if ignored {
                if is_dir && !ignore.can_skip_dir(&rel_path) {
                    // Something below may be re-included (`!` rule).
                    stack.push((rel_path, host, sub, child_info));
                } else {
                    whiteout(source, layer, &sub)?;
                    count += 1;
                }
            } else if is_dir {
                stack.push((rel_path, host, sub, child_info));
            }
        }
    }
    Ok(count)
}

/// A whiteout at `layer/sub`, its parent directories made like those
/// of `source`.
fn whiteout(source: &Path, layer: &Path, sub: &Path) -> Result<(), RunnerError> {
    let mut dir = PathBuf::new();
    if let Some(parent) = sub.parent() {
        for c in parent.components() {
            dir.push(c);
            let made = layer.join(&dir);
            if made.is_dir() {
                continue;
            }
            fs_err::create_dir(&made).map_err(io_err(&made))?;
            let from = source.join(&dir);
            let meta = fs_err::symlink_metadata(&from).map_err(io_err(&from))?;
            std::os::unix::fs::chown(&made, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err(&made))?;
            use std::os::unix::fs::PermissionsExt as _;
            fs_err::set_permissions(&made, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_err(&made))?;
        }
    }
    let path = layer.join(sub);
    nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    )
    .map_err(|e| RunnerError::Scratch {
        path: path.clone(),
        source: std::io::Error::from(e),
    })
}
