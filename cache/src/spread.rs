//! Where ext2/3/4 put the inodes of new trees.
//!
//! ext4 places a new file's inode in its directory's block group, and a
//! new directory's near its parent's. Every scratch tree of a build is
//! made under the store's `tmp/`, so the files of a step land in the block
//! groups that the previous build's files (since pruned) used. On an ext4
//! without a journal, the allocator skips inodes freed in the last
//! `dirty_expire_centisecs` × 10 (30 s by default) and re-scans them for
//! each new inode: creating 20,000 files right after `kiln prune` removed
//! 20,000 took 4.9 s there, against 0.7 s otherwise.
//!
//! A directory flagged `FS_TOPDIR_FL` (`chattr +T`) makes the allocator
//! spread its subdirectories over the file system as it does those of
//! `/`, so each scratch tree starts in a block group of its own.

#![allow(
    unsafe_code,
    reason = "FS_IOC_GETFLAGS/SETFLAGS are ioctls, on a descriptor this module opens and closes"
)]

use std::os::fd::AsRawFd as _;
use std::path::Path;

/// `FS_TOPDIR_FL` of `linux/fs.h`.
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Flags `dir` as the top of directory hierarchies (see the module docs),
/// if its file system has the flag. Best effort: false when the flag is
/// not set (not supported, not permitted), which only costs speed.
pub(crate) fn spread_subdirectories(dir: &Path) -> bool {
    let Ok(d) = fs_err::File::open(dir) else {
        return false;
    };
    let fd = d.as_raw_fd();
    // The kernel reads and writes an int, whatever the ioctl's name says.
    let mut flags: libc::c_int = 0;
    // SAFETY: `fd` is open for the call; the kernel writes one int to
    // `flags`.
    if unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return false;
    }
    if flags & FS_TOPDIR_FL != 0 {
        return true;
    }
    flags |= FS_TOPDIR_FL;
    // SAFETY: as above; the kernel reads one int from `flags`.
    unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag is set on ext2/3/4 (where the store lives in CI: the root
    /// file system), `lsattr` agrees, and asking again is harmless.
    #[test]
    fn a_directory_is_flagged_as_a_top_directory() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap_or_else(|e| panic!("{e}"));
        let first = spread_subdirectories(dir.path());
        let on_ext4 = nix::sys::statfs::statfs(dir.path())
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC);
        if on_ext4 {
            assert!(first, "ext4 takes FS_TOPDIR_FL");
        }
        let out = std::process::Command::new("lsattr")
            .arg("-d")
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("lsattr (e2fsprogs): {e}"));
        if out.status.success() {
            let l = String::from_utf8_lossy(&out.stdout);
            let flags = l.split_whitespace().next().unwrap_or_default();
            assert_eq!(flags.contains('T'), first, "lsattr says {l:?}");
        } else {
            assert!(!on_ext4, "lsattr failed on ext4: {out:?}");
        }
        assert_eq!(spread_subdirectories(dir.path()), first);
        assert!(!spread_subdirectories(&dir.path().join("missing")));
    }
}
