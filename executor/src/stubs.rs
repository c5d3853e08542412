//! Mount-point stubs: files and directories the sandbox created in the rootfs only
//! so that something could be mounted on them (`/etc/hosts` in an image without
//! one, `/proc` in a bare rootfs, a bind mount's target). On an overlay they land
//! in the upper directory and would end up in the RUN step's layer, so after the
//! run they are removed again when still empty (BuildKit does the same,
//! `executor/stubs.go`), and a lower's entry they replaced gets its whiteout back.
//!
//! The upper is walked without following any symlink (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): the payload could have swapped a parent
//! directory for a link to a host path.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

fn open_beneath(upper: &OwnedFd, rel: &Path) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    openat2(upper, rel, how)
}

fn is_empty_stub(stat: &FileStat, dir: &OwnedFd, name: &Path) -> bool {
    let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    if kind == SFlag::S_IFREG {
        return stat.st_size == 0;
    }
    if kind == SFlag::S_IFDIR {
        // rmdir refuses non-empty directories itself; nothing to check here.
        let _ = (dir, name);
        return true;
    }
    false
}

/// Removes the stubs (absolute paths inside the rootfs, in creation order) from
/// `upper`. Best effort: a stub the payload filled or replaced is left alone.
pub(crate) fn remove_stubs(upper: &Path, lowers: &[PathBuf], stubs: &[String]) {
    let Ok(upper_fd) = nix::fcntl::open(
        upper,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    for stub in stubs.iter().rev() {
        let rel = Path::new(stub.trim_start_matches('/'));
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        let Ok(dir) = open_beneath(&upper_fd, parent) else {
            continue;
        };
        let Ok(stat) =
            nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        if !is_empty_stub(&stat, &dir, Path::new(name)) {
            continue;
        }
        let is_dir =
            SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
        let how = if is_dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        if nix::unistd::unlinkat(&dir, name, how).is_err() {
            continue;
        }
        if lowers
            .iter()
            .any(|l| fs_err::symlink_metadata(l.join(rel)).is_ok())
        {
            // The stub had replaced a whiteout: put it back.
            let _restored = nix::sys::stat::mknodat(&dir, name, SFlag::S_IFCHR, Mode::empty(), 0);
        }
    }
    drop_copied_up_parents(&upper_fd, lowers, stubs);
}

/// The directories holding stubs that overlayfs copied up from a lower only
/// because a stub was made in them (`/etc` for `/etc/hosts`): once empty
/// again, and with the lower's mode and owner, they go, so the lower's shows
/// as before the run. (BuildKit's overlay differ leaves such a directory out
/// of the layer, and restores its time.) Deepest first.
fn drop_copied_up_parents(upper_fd: &OwnedFd, lowers: &[PathBuf], stubs: &[String]) {
    let mut parents: Vec<&Path> = stubs
        .iter()
        .filter_map(|s| Path::new(s.trim_start_matches('/')).parent())
        .flat_map(Path::ancestors)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    parents.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    parents.dedup();
    for rel in parents {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        let Ok(dir) = open_beneath(upper_fd, parent) else {
            continue;
        };
        let Ok(st) = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
            continue;
        }
        // The topmost lower's entry (lowers are top-most first): a
        // directory with the same mode and owner.
        let lower = lowers
            .iter()
            .find_map(|l| fs_err::symlink_metadata(l.join(rel)).ok());
        let same = lower.is_some_and(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.is_dir()
                && m.mode() & 0o7777 == st.st_mode & 0o7777
                && m.uid() == st.st_uid
                && m.gid() == st.st_gid
        });
        // (rmdir leaves a directory with entries, whiteouts included.)
        if same {
            let _ = nix::unistd::unlinkat(&dir, name, UnlinkatFlags::RemoveDir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_empty_stubs_keeps_filled_ones_and_never_follows_links() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        let outside = tmp.path().join("outside");
        fs_err::create_dir_all(upper.join("etc")).unwrap();
        fs_err::create_dir_all(upper.join("run/secrets")).unwrap();
        fs_err::create_dir_all(&outside).unwrap();
        fs_err::write(upper.join("etc/hosts"), "").unwrap();
        fs_err::write(upper.join("etc/resolv.conf"), "written by the payload").unwrap();
        fs_err::write(outside.join("victim"), "").unwrap();
        std::os::unix::fs::symlink(&outside, upper.join("evil")).unwrap();
        let stubs: Vec<String> = [
            "/etc/hosts",
            "/etc/resolv.conf",
            "/run",
            "/run/secrets",
            "/evil/victim",
        ]
        .map(String::from)
        .to_vec();
        remove_stubs(&upper, &[], &stubs);
        assert!(!upper.join("etc/hosts").exists());
        assert!(
            upper.join("etc/resolv.conf").exists(),
            "a filled stub was removed"
        );
        assert!(!upper.join("run").exists(), "empty stub dirs stay");
        assert!(
            outside.join("victim").exists(),
            "followed a link out of the upper"
        );
    }

    #[test]
    fn a_parent_copied_up_for_a_stub_goes_when_empty_and_as_in_the_lower() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let (upper, lower) = (tmp.path().join("upper"), tmp.path().join("lower"));
        for d in ["etc", "run", "srv/data", "opt"] {
            fs_err::create_dir_all(upper.join(d)).unwrap();
            fs_err::create_dir_all(lower.join(d)).unwrap();
        }
        // /etc and /srv/data as copied up, holding only their stubs; /run
        // holding a file the payload wrote; /opt with another mode.
        fs_err::write(upper.join("etc/hosts"), "").unwrap();
        fs_err::write(upper.join("srv/data/x"), "").unwrap();
        fs_err::write(upper.join("run/stub"), "").unwrap();
        fs_err::write(upper.join("run/payload"), "kept").unwrap();
        fs_err::write(upper.join("opt/stub"), "").unwrap();
        fs_err::set_permissions(upper.join("opt"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let stubs = ["/etc/hosts", "/srv/data/x", "/run/stub", "/opt/stub"].map(String::from);
        remove_stubs(&upper, std::slice::from_ref(&lower), &stubs);
        assert!(!upper.join("etc").exists(), "an empty copied-up /etc stays");
        assert!(!upper.join("srv").exists(), "its empty parents too");
        assert_eq!(
            fs_err::read_to_string(upper.join("run/payload")).unwrap(),
            "kept"
        );
        assert!(upper.join("opt").is_dir(), "a changed mode is a change");
        // Without a lower directory there, an empty one is the payload's.
        fs_err::create_dir_all(upper.join("new")).unwrap();
        fs_err::write(upper.join("new/stub"), "").unwrap();
        remove_stubs(&upper, &[lower], &["/new/stub".to_owned()]);
        assert!(upper.join("new").is_dir());
    }

    #[test]
    fn a_stub_over_a_lower_entry_gets_its_whiteout_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (upper, lower) = (tmp.path().join("upper"), tmp.path().join("lower"));
        fs_err::create_dir_all(upper.join("etc")).unwrap();
        fs_err::create_dir_all(lower.join("etc")).unwrap();
        fs_err::write(lower.join("etc/hosts"), "lower").unwrap();
        fs_err::write(upper.join("etc/hosts"), "").unwrap();
        remove_stubs(&upper, &[lower], &["/etc/hosts".to_owned()]);
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let m = fs_err::symlink_metadata(upper.join("etc/hosts")).unwrap();
            assert!(m.file_type().is_char_device() && m.rdev() == 0);
        }
    }
}
