//! Thin wrappers over the Linux syscalls `nix` does not cover: the new mount API
//! (`open_tree`, `move_mount`, `fsopen`, `fsconfig`, `fsmount`), `capset`,
//! `pivot_root` with `"."` and prctl calls. Each returns `nix::Result`.

use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

pub const OPEN_TREE_CLONE: libc::c_uint = 1;
pub const AT_RECURSIVE: libc::c_uint = 0x8000;
pub const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
pub const FSOPEN_CLOEXEC: libc::c_uint = 1;
pub const FSMOUNT_CLOEXEC: libc::c_uint = 1;
pub const FSCONFIG_SET_FLAG: libc::c_uint = 0;
pub const FSCONFIG_SET_STRING: libc::c_uint = 1;
pub const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

fn fd_result(ret: libc::c_long) -> nix::Result<OwnedFd> {
    if ret < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this descriptor to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unit_result(ret: libc::c_long) -> nix::Result<()> {
    if ret < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | AT_RECURSIVE? | O_CLOEXEC)`: a detached
/// copy of the mount at `path`, to attach later with [`move_mount_fd`].
pub fn open_tree_clone(path: &CStr, recursive: bool) -> nix::Result<OwnedFd> {
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    fd_result(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })
}

/// Attaches the detached mount `fd` at `target` (resolved from the current root).
pub fn move_mount_fd(fd: &OwnedFd, target: &CStr) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let empty = c"";
    // SAFETY: both strings are valid NUL-terminated strings; `fd` is an open descriptor.
    unit_result(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
}

/// `fsopen(name, FSOPEN_CLOEXEC)`.
pub fn fsopen(fs: &CStr) -> nix::Result<OwnedFd> {
    // SAFETY: `fs` is a valid NUL-terminated string.
    fd_result(unsafe { libc::syscall(libc::SYS_fsopen, fs.as_ptr(), FSOPEN_CLOEXEC) })
}

/// `fsconfig(fd, FSCONFIG_SET_STRING, key, value, 0)`.
pub fn fsconfig_string(fd: &OwnedFd, key: &CStr, value: &CStr) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid strings and descriptor; the kernel copies them.
    unit_result(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    })
}

/// `fsconfig(fd, FSCONFIG_SET_FLAG, key, NULL, 0)`.
pub fn fsconfig_flag(fd: &OwnedFd, key: &CStr) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid string and descriptor; a NULL value is what SET_FLAG expects.
    unit_result(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })
}

pub const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
pub const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
pub const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
pub const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

/// The messages the kernel logged on a file system context (`e overlayfs: ...`),
/// oldest first; read after a failed `fsconfig` to say why.
pub fn fs_log(fd: &OwnedFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..8 {
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) if n > 0 => {
                out.push(String::from_utf8_lossy(buf.get(..n).unwrap_or(&[])).into_owned())
            }
            _ => break,
        }
    }
    out
}

/// `fsconfig(fd, FSCONFIG_CMD_CREATE)` then `fsmount(fd, FSMOUNT_CLOEXEC, attrs)`.
pub fn fs_create_and_mount(fd: &OwnedFd, attrs: libc::c_uint) -> nix::Result<OwnedFd> {
    fs_create(fd)?;
    fs_mount(fd, attrs)
}

/// `fsconfig(fd, FSCONFIG_CMD_CREATE)`: makes the superblock.
pub fn fs_create(fd: &OwnedFd) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid descriptor; CMD_CREATE takes no key or value.
    unit_result(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })
}

/// `fsmount(fd, FSMOUNT_CLOEXEC, attrs)`: a detached mount of a created superblock.
pub fn fs_mount(fd: &OwnedFd, attrs: libc::c_uint) -> nix::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid descriptor of a configured file system context.
    fd_result(unsafe { libc::syscall(libc::SYS_fsmount, fd.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })
}

/// `pivot_root(".", ".")`: the new root is the current directory and the old root
/// is stacked on top of it, to be detached right after (runc does the same, it
/// needs no directory for the old root inside the new one).
pub fn pivot_root_dot() -> nix::Result<()> {
    let dot = c".";
    // SAFETY: valid NUL-terminated strings.
    unit_result(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `capset` on the calling thread: effective, permitted, inheritable as 64-bit masks.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> nix::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = |m: u64| (m & 0xffff_ffff) as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let data = [
        CapData {
            effective: lo(effective),
            permitted: lo(permitted),
            inheritable: lo(inheritable),
        },
        CapData {
            effective: hi(effective),
            permitted: hi(permitted),
            inheritable: hi(inheritable),
        },
    ];
    // SAFETY: header and a 2-element data array as capset(2) v3 requires, alive for the call.
    unit_result(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })
}

/// `prctl(option, arg2, 0, 0, 0)`.
pub fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> nix::Result<libc::c_int> {
    // SAFETY: the prctl options used in this crate take integer arguments only.
    let ret = unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
pub fn clear_ambient() -> nix::Result<()> {
    // SAFETY: integer arguments only.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if ret < 0 { Err(Errno::last()) } else { Ok(()) }
}
