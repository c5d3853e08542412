//! Where ext2/3/4 put the inodes of new trees.
//!
//! ext4 places a new file's inode in its directory's block group, and a
//! new directory's near its parent's. Every scratch tree of a build is
//! made under the store's `tmp/`, so the files of a step land in the block
//! groups that the previous build's files (since pruned) used. On an ext4
//! without a journal, the allocator skips inodes freed in the last 60 s
//! (360 s while their inode table block is not written back yet; see
//! `recently_deleted` in the kernel's `fs/ext4/ialloc.c`) and re-scans
//! them for each new inode: creating 20,000 files right after `kiln prune`
//! removed 20,000 took 4.9 s there, against 0.7 s otherwise.
//!
//! A directory flagged `FS_TOPDIR_FL` (`chattr +T`) makes the allocator
//! spread its subdirectories over the file system as it does those of
//! `/`. That alone is not enough: it puts a new directory in the group
//! with the fewest directories, which is the one the last build's pruned
//! tree has just left. So `tmp/` holds [`LANES`] directories (`lane-00`,
//! ...), spread once, kept by GC; each process makes its scratch trees in
//! the next lane in turn (a counter in `tmp/lane-next`), so the next build
//! writes its files in other block groups than the last one's. Right
//! after a prune, the RUN of bench s1 (2,000 files) took 450 ms this way
//! against 660-1,800 ms in about a third of builds before.

#![allow(
    unsafe_code,
    reason = "FS_IOC_GETFLAGS/SETFLAGS are ioctls, on a descriptor this module opens and closes"
)]

use std::ffi::OsStr;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

/// How many lanes the scratch trees of successive processes rotate over:
/// with a build every 6 s, a lane comes back after the allocator has
/// stopped skipping what its last tree freed (up to 360 s). With 16, a
/// loop of cold builds came back to its first lanes within that window,
/// and the RUN's file creation in them showed `recently_deleted` again.
pub(crate) const LANES: u32 = 64;

/// The counter of the next lane, in `tmp/`.
const NEXT_LANE: &str = "lane-next";

/// Whether `name`, an entry of the store's `tmp/`, is a lane or the lanes'
/// counter (kept by GC; a lane's contents are not).
pub fn is_lane(name: &OsStr) -> bool {
    name == NEXT_LANE || lane_number(name).is_some()
}

/// `n` of a lane `lane-<n>`.
fn lane_number(name: &OsStr) -> Option<u32> {
    let n = name.to_str()?.strip_prefix("lane-")?;
    (n.len() == 2).then(|| n.parse().ok()).flatten()
}

/// The lane of `tmp` (the store's `tmp/`) that this process takes: the
/// counter's next one, made if missing. Best effort: two processes may
/// take the same lane, and `tmp` itself is the answer if the lane cannot
/// be made.
pub(crate) fn take_lane(tmp: &Path) -> PathBuf {
    let n = next_lane(&tmp.join(NEXT_LANE)).unwrap_or(0);
    let lane = tmp.join(format!("lane-{n:02}"));
    match fs_err::create_dir(&lane) {
        Ok(()) => lane,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => lane,
        Err(_) => tmp.to_path_buf(),
    }
}

/// Reads the counter at `path` and writes the one after it (in place: no
/// new inode per build).
fn next_lane(path: &Path) -> std::io::Result<u32> {
    let mut f = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let n = text.trim().parse::<u32>().map_or(0, |n| n % LANES);
    f.rewind()?;
    f.write_all(format!("{:02}", (n + 1) % LANES).as_bytes())?;
    f.set_len(2)?;
    Ok(n)
}

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

    /// Successive takers get the lanes in turn, made on demand, and come
    /// back to the first after the last; a damaged counter starts over.
    #[test]
    fn lanes_are_taken_in_turn() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let taken: Vec<PathBuf> = (0..LANES + 2).map(|_| take_lane(tmp.path())).collect();
        for (i, lane) in taken.iter().enumerate() {
            let n = u32::try_from(i).unwrap_or(0) % LANES;
            assert_eq!(lane, &tmp.path().join(format!("lane-{n:02}")));
            assert!(lane.is_dir());
            assert!(is_lane(lane.file_name().unwrap_or_default()));
        }
        assert!(is_lane(OsStr::new(NEXT_LANE)));
        for other in ["lane-1", "lane-001", "lane-xx", "run-1234", "trash-1-2"] {
            assert!(!is_lane(OsStr::new(other)), "{other}");
        }
        fs_err::write(tmp.path().join(NEXT_LANE), "garbage").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(take_lane(tmp.path()), tmp.path().join("lane-00"));
        assert_eq!(take_lane(tmp.path()), tmp.path().join("lane-01"));
        // Where no lane can be made, `tmp` itself.
        let missing = tmp.path().join("missing");
        assert_eq!(take_lane(&missing), missing);
    }
}
