//! Building the sandbox's file system view, run by the sandbox's init inside its
//! own mount namespace.
//!
//! The order is what makes a hostile rootfs harmless:
//!
//! 1. every host source (device nodes, the generated `/etc/hosts`, bind mounts) is
//!    cloned into a detached mount with `open_tree(OPEN_TREE_CLONE)` while the host
//!    tree is still visible;
//! 2. the rootfs is mounted and `pivot_root` moves into it, and the old root is
//!    detached: from then on no host path can be named at all;
//! 3. only then are mount targets (`/proc`, `/dev`, `/etc/hosts`, ...) created and
//!    mounted on. A symlink such as `/etc/hosts -> /../../host/file` now resolves
//!    against the sandbox's root (`..` of `/` is `/`), so the worst it can do is
//!    redirect a mount to another place inside the rootfs.

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::fail::{Fail, Step};
#[cfg(test)]
use crate::spec::{Mount, RootfsSpec};
use crate::spec::{MountKind, SandboxSpec};
use crate::sys;

/// Device nodes bind-mounted from the host into the sandbox's `/dev`.
pub(crate) const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

pub(crate) fn cstring(path: &Path) -> Result<CString, Fail> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Fail::step(
            format!("path `{}` contains a NUL byte", path.display()),
            libc::EINVAL,
        )
    })
}

/// Host-side sources cloned before `pivot_root` (detached mounts; labels in tests).
pub(crate) struct Sources<H = OwnedFd> {
    dev: Vec<(&'static str, H)>,
    etc: Vec<(&'static str, H)>,
    /// One per spec mount (`None` for tmpfs), with whether the source is a directory.
    mounts: Vec<Option<(H, Kind)>>,
    /// The host's `/sys`, when the sandbox shares the host network.
    sys: Option<H>,
    /// A fresh sysfs (for a new network namespace), made before `pivot_root`.
    sysfs: Option<H>,
    /// A fresh proc for the sandbox's pid namespace.
    proc: H,
}

/// The privileged operations [`populate`] performs, behind a trait so that the mount
/// plan is unit-tested without root through a recording double (youki's `Syscall`).
pub(crate) trait MountOps {
    /// A detached mount to attach.
    type Handle;
    /// See [`ensure_target`].
    fn ensure_target(
        &mut self,
        path: &Path,
        kind: Kind,
        stubs: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, Fail>;
    /// Makes sure `target` exists, then attaches `source` there; returns the resolved target.
    fn attach(
        &mut self,
        source: &Self::Handle,
        target: &Path,
        kind: Kind,
        stubs: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, Fail>;
    /// Mounts a fresh `fstype` on `target`.
    fn mount_fs(
        &mut self,
        fstype: &str,
        target: &Path,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), Fail>;
    /// Remounts the bind mount at `target` read-only.
    fn remount_ro(&mut self, target: &Path) -> Result<(), Fail>;
    /// Creates a directory.
    fn mkdir(&mut self, path: &Path) -> Result<(), Fail>;
    /// Creates a symlink `at` pointing to `to`.
    fn symlink(&mut self, to: &str, at: &Path) -> Result<(), Fail>;
}

/// The real thing.
pub(crate) struct Kernel;

impl MountOps for Kernel {
    type Handle = OwnedFd;
    fn ensure_target(
        &mut self,
        path: &Path,
        kind: Kind,
        stubs: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, Fail> {
        ensure_target(path, kind, stubs)
    }
    fn attach(
        &mut self,
        source: &OwnedFd,
        target: &Path,
        kind: Kind,
        stubs: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, Fail> {
        attach(source, target, kind, stubs)
    }
    fn mount_fs(
        &mut self,
        fstype: &str,
        target: &Path,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), Fail> {
        mount_fs(fstype, target, flags, data)
    }
    fn remount_ro(&mut self, target: &Path) -> Result<(), Fail> {
        remount_ro(target)
    }
    fn mkdir(&mut self, path: &Path) -> Result<(), Fail> {
        fs_err::create_dir(path).step(|| format!("create `{}`", path.display()))
    }
    fn symlink(&mut self, to: &str, at: &Path) -> Result<(), Fail> {
        std::os::unix::fs::symlink(to, at).step(|| format!("create the link `{}`", at.display()))
    }
}

/// A detached mount of a fresh `fstype`. proc and sysfs are made this way, before
/// `pivot_root`: inside a user namespace the kernel only allows them while a fully
/// visible instance is still in the mount namespace (`mount_too_revealing`), and
/// after `pivot_root` the host's are gone.
fn fresh_fs(fstype: &CStr, attrs: libc::c_uint) -> Result<OwnedFd, Fail> {
    let what = || format!("create a fresh {}", fstype.to_string_lossy());
    let fs = sys::fsopen(fstype).step(what)?;
    sys::fs_create_and_mount(&fs, attrs).step(what)
}

/// Clones every host source the sandbox needs into detached mounts.
pub(crate) fn clone_sources(
    spec: &SandboxSpec,
    state: &Path,
    host_sys: bool,
) -> Result<Sources, Fail> {
    let clone = |path: &Path, recursive: bool| -> Result<OwnedFd, Fail> {
        let c = cstring(path)?;
        sys::open_tree_clone(&c, recursive)
            .step(|| format!("clone a bind mount of `{}`", path.display()))
    };
    let mut dev = Vec::new();
    for node in DEV_NODES {
        dev.push((node, clone(&Path::new("/dev").join(node), false)?));
    }
    let mut etc = Vec::new();
    for name in ["hosts", "resolv.conf", "hostname"] {
        etc.push((name, clone(&state.join(name), false)?));
    }
    let mut mounts = Vec::new();
    for m in &spec.mounts {
        mounts.push(match &m.kind {
            MountKind::Bind { source, .. }
            | MountKind::Cache { source }
            | MountKind::Secret { source } => {
                let kind = if fs_err::metadata(source)
                    .step(|| "inspect the mount source".to_owned())?
                    .is_dir()
                {
                    Kind::Dir
                } else {
                    Kind::File
                };
                Some((clone(source, true)?, kind))
            }
            MountKind::Tmpfs { .. } => None,
        });
    }
    let sys = if host_sys {
        Some(clone(Path::new("/sys"), true)?)
    } else {
        None
    };
    let locked = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC;
    let sysfs = if host_sys {
        None
    } else {
        Some(fresh_fs(c"sysfs", locked | sys::MOUNT_ATTR_RDONLY)?)
    };
    let proc = fresh_fs(c"proc", locked)?;
    Ok(Sources {
        dev,
        etc,
        mounts,
        sys,
        sysfs,
        proc,
    })
}

/// Where the classic `mount(2)` of an overlay must run for its relative lower names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chdir {
    /// Absolute names: anywhere.
    Stay,
    /// Names relative to the lowers' common parent.
    Base(PathBuf),
    /// Names `0`, `1`, ...: symlinks to the lowers, made in a private directory.
    Links,
}

/// The overlay mount options for the classic `mount(2)` call, under the kernel's
/// one-page limit: absolute names when they fit, else names relative to the lowers'
/// common parent, else index-named symlinks (~800 lowers fit).
pub(crate) fn overlay_options(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    userxattr: bool,
    volatile: bool,
) -> Result<(String, Chdir), Fail> {
    fn escape(p: &Path) -> String {
        let s = p.to_string_lossy();
        s.replace('\\', "\\\\")
            .replace(':', "\\:")
            .replace(',', "\\,")
    }
    let build = |lower_names: &[String]| {
        let mut opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower_names.join(":"),
            escape(upper),
            escape(work)
        );
        if userxattr {
            opts.push_str(",userxattr");
        }
        if volatile {
            opts.push_str(",volatile");
        }
        opts
    };
    let absolute: Vec<String> = lowers.iter().map(|p| escape(p)).collect();
    let opts = build(&absolute);
    // The kernel copies at most one page of options (4096 bytes with the NUL).
    const LIMIT: usize = 4000;
    if opts.len() <= LIMIT {
        return Ok((opts, Chdir::Stay));
    }
    // Lowers usually share a parent (the snapshot store): name them from there.
    let mut base = lowers
        .first()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    while !lowers.iter().all(|l| l.starts_with(&base)) {
        if !base.pop() {
            break;
        }
    }
    let relative: Vec<String> = lowers
        .iter()
        .map(|l| escape(l.strip_prefix(&base).unwrap_or(l)))
        .collect();
    let opts = build(&relative);
    if opts.len() <= LIMIT && !base.as_os_str().is_empty() {
        return Ok((opts, Chdir::Base(base)));
    }
    let indexed: Vec<String> = (0..lowers.len()).map(|i| i.to_string()).collect();
    let opts = build(&indexed);
    if opts.len() > LIMIT {
        return Err(Fail::step(
            format!(
                "mount an overlay of {} lowers: the options are {} bytes even with the shortest names (limit {LIMIT})",
                lowers.len(),
                opts.len()
            ),
            libc::E2BIG,
        ));
    }
    Ok((opts, Chdir::Links))
}

/// Mounts an overlay on `target`: the new mount API (`lowerdir+`, kernel 6.8+, no
/// option-size limit) first, the classic `mount(2)` with short names otherwise.
pub(crate) fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    userxattr: bool,
    volatile: bool,
) -> Result<(), Fail> {
    if lowers.is_empty() {
        return Err(Fail::step(
            "mount an overlay with no lower directory",
            libc::EINVAL,
        ));
    }
    let target_c = cstring(target)?;
    // `KILN_SANDBOX_CLASSIC_OVERLAY` (any value) forces the classic path: a test
    // and debugging knob, since this kernel never needs the fallback.
    if std::env::var_os("KILN_SANDBOX_CLASSIC_OVERLAY").is_none() {
        match overlay_fsopen(lowers, upper, work, userxattr, volatile) {
            Ok(fd) => {
                return sys::move_mount_fd(&fd, &target_c)
                    .step(|| format!("attach the overlay on `{}`", target.display()));
            }
            // Only an old kernel (no fsopen, or no `lowerdir+`) falls back; any other
            // error is the real one and is reported as such.
            Err(OverlayApi::Unsupported) => {}
            Err(OverlayApi::Failed(fail)) => return Err(fail),
        }
    }
    let (opts, chdir) = overlay_options(lowers, upper, work, userxattr, volatile)?;
    let cwd = std::env::current_dir().step(|| "read the current directory".to_owned())?;
    let dir = match chdir {
        Chdir::Stay => None,
        Chdir::Base(base) => Some(base),
        Chdir::Links => {
            // Beside the mount point, in the helper's private state directory.
            let links = target.with_file_name("lowers");
            fs_err::create_dir(&links).step(|| format!("create `{}`", links.display()))?;
            for (i, lower) in lowers.iter().enumerate() {
                let at = links.join(i.to_string());
                std::os::unix::fs::symlink(lower, &at)
                    .step(|| format!("link `{}`", at.display()))?;
            }
            Some(links)
        }
    };
    if let Some(dir) = &dir {
        nix::unistd::chdir(dir).step(|| format!("chdir into `{}`", dir.display()))?;
    }
    let result = mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .step(|| {
        format!(
            "mount an overlay on `{}` (lowerdir count {})",
            target.display(),
            lowers.len()
        )
    });
    nix::unistd::chdir(&cwd).step(|| format!("chdir back into `{}`", cwd.display()))?;
    result
}

enum OverlayApi {
    Unsupported,
    Failed(Fail),
}

fn overlay_fsopen(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    userxattr: bool,
    volatile: bool,
) -> Result<OwnedFd, OverlayApi> {
    let fs = sys::fsopen(c"overlay").map_err(|_| OverlayApi::Unsupported)?;
    let set = |key: &CStr, value: &Path| -> Result<(), OverlayApi> {
        let v = cstring(value).map_err(OverlayApi::Failed)?;
        sys::fsconfig_string(&fs, key, &v).map_err(|errno| {
            if errno == nix::errno::Errno::EINVAL && key == c"lowerdir+" {
                OverlayApi::Unsupported
            } else {
                OverlayApi::Failed(Fail::step(
                    format!(
                        "configure overlay {}=`{}`",
                        key.to_string_lossy(),
                        value.display()
                    ),
                    errno as i32,
                ))
            }
        })
    };
    for lower in lowers {
        set(c"lowerdir+", lower)?;
    }
    set(c"upperdir", upper)?;
    set(c"workdir", work)?;
    for (wanted, flag) in [(userxattr, c"userxattr"), (volatile, c"volatile")] {
        if wanted {
            sys::fsconfig_flag(&fs, flag).map_err(|e| {
                OverlayApi::Failed(Fail::step(
                    format!("configure overlay {}", flag.to_string_lossy()),
                    e as i32,
                ))
            })?;
        }
    }
    let created = sys::fs_create(&fs);
    let what = if created.is_ok() { "mount" } else { "create" };
    created.and_then(|()| sys::fs_mount(&fs, 0)).map_err(|e| {
        let mut why = String::new();
        let log = sys::fs_log(&fs);
        if !log.is_empty() {
            why = format!(", the kernel says `{}`", log.join("; "));
        }
        let marker = work.join("work/incompat/volatile");
        if fs_err::symlink_metadata(&marker).is_ok() {
            why.push_str(&format!(
                "; hint: `{}` exists: the work directory was used by a volatile overlay \
                 and must be emptied first",
                marker.display()
            ));
        }
        OverlayApi::Failed(Fail::step(
            format!(
                "{what} the overlay (upper `{}`, work `{}`, {} lowers{why})",
                upper.display(),
                work.display(),
                lowers.len()
            ),
            e as i32,
        ))
    })
}

/// Moves into `new_root` and detaches the old root, so no host path is reachable.
pub(crate) fn pivot_into(new_root: &Path) -> Result<(), Fail> {
    nix::unistd::chdir(new_root)
        .step(|| format!("chdir into the rootfs `{}`", new_root.display()))?;
    sys::pivot_root_dot().step(|| format!("pivot_root into `{}`", new_root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detach the old root".to_owned())?;
    nix::unistd::chdir("/").step(|| "chdir to the new `/`".to_owned())
}

/// What a mount target must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
}

/// Makes sure `path` (absolute, inside the sandbox, after `pivot_root`) exists as a
/// `kind`, resolving it one component at a time the way the kernel will when
/// mounting: symlinks are followed (absolute ones from the sandbox's root, `..`
/// stops at `/`), and whatever is missing, including the targets of dangling links,
/// is created and recorded in `stubs` (parents first). Only ever called after
/// `pivot_root` and before /proc is attached, so every path is inside the rootfs
/// whatever the links say. Returns the resolved path.
pub(crate) fn ensure_target(
    path: &Path,
    kind: Kind,
    stubs: &mut Vec<PathBuf>,
) -> Result<PathBuf, Fail> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::path::Component;
    fn parts(p: &Path) -> impl Iterator<Item = OsString> + '_ {
        p.components().filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
    }
    let mut pending: VecDeque<OsString> = parts(path).collect();
    let mut resolved = PathBuf::from("/");
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let next = resolved.join(&part);
        let last = pending.is_empty();
        match fs_err::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(Fail::step(
                        format!(
                            "resolve the mount point `{}`: too many symlinks",
                            path.display()
                        ),
                        libc::ELOOP,
                    ));
                }
                let link = fs_err::read_link(&next)
                    .step(|| format!("read the link `{}`", next.display()))?;
                if link.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                let mut spliced: VecDeque<OsString> = parts(&link).collect();
                spliced.extend(pending.drain(..));
                pending = spliced;
            }
            Ok(meta) => {
                if !last && !meta.is_dir() {
                    return Err(Fail::step(
                        format!(
                            "resolve the mount point `{}`: `{}` is not a directory",
                            path.display(),
                            next.display()
                        ),
                        libc::ENOTDIR,
                    ));
                }
                resolved = next;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                match (last, kind) {
                    (true, Kind::File) => fs_err::File::create(&next).map(drop),
                    _ => fs_err::create_dir(&next),
                }
                .step(|| format!("create the mount point `{}`", next.display()))?;
                stubs.push(next.clone());
                resolved = next;
            }
            Err(err) => {
                return Err(err).step(|| format!("inspect the mount point `{}`", next.display()));
            }
        }
    }
    Ok(resolved)
}

fn attach(
    fd: &OwnedFd,
    target: &Path,
    kind: Kind,
    stubs: &mut Vec<PathBuf>,
) -> Result<PathBuf, Fail> {
    let resolved = ensure_target(target, kind, stubs)?;
    let c = cstring(&resolved)?;
    sys::move_mount_fd(fd, &c).step(|| format!("bind mount onto `{}`", resolved.display()))?;
    Ok(resolved)
}

fn remount_ro(target: &Path) -> Result<(), Fail> {
    // A bind remount keeps the locked flags (nosuid, nodev, ...) of the source
    // mount only if they are repeated; read them back from statvfs.
    let keep = nix::sys::statvfs::statvfs(target)
        .map(|st| {
            use nix::sys::statvfs::FsFlags;
            let mut flags = MsFlags::empty();
            let f = st.flags();
            if f.contains(FsFlags::ST_NOSUID) {
                flags |= MsFlags::MS_NOSUID;
            }
            if f.contains(FsFlags::ST_NODEV) {
                flags |= MsFlags::MS_NODEV;
            }
            if f.contains(FsFlags::ST_NOEXEC) {
                flags |= MsFlags::MS_NOEXEC;
            }
            flags
        })
        .unwrap_or(MsFlags::empty());
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
        None::<&str>,
    )
    .step(|| format!("remount `{}` read-only", target.display()))
}

fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: &str) -> Result<(), Fail> {
    let data = if data.is_empty() { None } else { Some(data) };
    mount(Some(fstype), target, Some(fstype), flags, data).step(|| {
        format!(
            "mount {fstype} on `{}` ({})",
            target.display(),
            data.unwrap_or("")
        )
    })
}

/// Mounts `/proc`, `/dev`, `/sys`, `/etc/{hosts,resolv.conf,hostname}` and the spec's
/// mounts. Runs after [`pivot_into`].
/// Returns the mount-point stubs it created.
pub(crate) fn populate<O: MountOps>(
    spec: &SandboxSpec,
    sources: &Sources<O::Handle>,
    ops: &mut O,
    rootless: bool,
) -> Result<Vec<PathBuf>, Fail> {
    let mut stubs = Vec::new();
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

    let dev = ops.ensure_target(Path::new("/dev"), Kind::Dir, &mut stubs)?;
    ops.mount_fs(
        "tmpfs",
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    for (node, fd) in &sources.dev {
        // Inside the fresh tmpfs: never in the upper, not stubs.
        ops.attach(fd, &dev.join(node), Kind::File, &mut Vec::new())?;
    }
    let pts = dev.join("pts");
    ops.mkdir(&pts)?;
    // gid=5 (tty) only exists when the sandbox owns its ids; a rootless single-id
    // map has no group 5.
    let pts_opts = if rootless {
        "newinstance,ptmxmode=0666,mode=620"
    } else {
        "newinstance,ptmxmode=0666,mode=620,gid=5"
    };
    ops.mount_fs(
        "devpts",
        &pts,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        pts_opts,
    )?;
    let shm = dev.join("shm");
    ops.mkdir(&shm)?;
    ops.mount_fs("tmpfs", &shm, nosuid_nodev_noexec, "mode=1777,size=65536k")?;
    let mqueue = dev.join("mqueue");
    ops.mkdir(&mqueue)?;
    ops.mount_fs("mqueue", &mqueue, nosuid_nodev_noexec, "")?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        let at = dev.join(link);
        ops.symlink(to, &at)?;
    }

    let sys_dir = ops.ensure_target(Path::new("/sys"), Kind::Dir, &mut stubs)?;
    match (&sources.sys, &sources.sysfs) {
        (Some(fd), _) => {
            let at = ops.attach(fd, &sys_dir, Kind::Dir, &mut stubs)?;
            ops.remount_ro(&at)?;
        }
        (None, Some(fd)) => {
            ops.attach(fd, &sys_dir, Kind::Dir, &mut stubs)?;
        }
        (None, None) => return Err(Fail::step("mount /sys: no source", libc::EINVAL)),
    }

    for (name, fd) in &sources.etc {
        ops.attach(fd, &Path::new("/etc").join(name), Kind::File, &mut stubs)?;
    }

    for (m, fd) in spec.mounts.iter().zip(&sources.mounts) {
        let target = Path::new(&m.target);
        if !target.is_absolute() {
            return Err(Fail::step(
                format!("mount target `{}` is not absolute", m.target),
                libc::EINVAL,
            ));
        }
        match (&m.kind, fd) {
            (MountKind::Tmpfs { size }, _) => {
                let at = ops.ensure_target(target, Kind::Dir, &mut stubs)?;
                let data = size.map(|s| format!("size={s}")).unwrap_or_default();
                ops.mount_fs("tmpfs", &at, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, &data)?;
            }
            (MountKind::Bind { readonly, .. }, Some((fd, kind))) => {
                let at = ops.attach(fd, target, *kind, &mut stubs)?;
                if *readonly {
                    ops.remount_ro(&at)?;
                }
            }
            (MountKind::Cache { .. }, Some((fd, kind))) => {
                ops.attach(fd, target, *kind, &mut stubs)?;
            }
            (MountKind::Secret { .. }, Some((fd, kind))) => {
                let at = ops.attach(fd, target, *kind, &mut stubs)?;
                ops.remount_ro(&at)?;
            }
            (_, None) => {
                return Err(Fail::step(
                    format!("no source cloned for the mount on `{}`", m.target),
                    libc::EINVAL,
                ));
            }
        }
    }

    // /proc comes last: until it is attached no procfs is reachable in the new
    // root, so no hostile link through `/proc/self/fd/N` or `/proc/N/root` can
    // point a mount target at one of the host directories init holds open.
    ops.attach(&sources.proc, Path::new("/proc"), Kind::Dir, &mut stubs)?;

    if spec.readonly_rootfs {
        ops.remount_ro(Path::new("/"))?;
    }
    Ok(stubs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every operation as a line; handles are labels.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl MountOps for Recorder {
        type Handle = String;
        fn ensure_target(
            &mut self,
            path: &Path,
            _: Kind,
            _: &mut Vec<PathBuf>,
        ) -> Result<PathBuf, Fail> {
            Ok(path.to_path_buf())
        }
        fn attach(
            &mut self,
            source: &String,
            target: &Path,
            kind: Kind,
            _: &mut Vec<PathBuf>,
        ) -> Result<PathBuf, Fail> {
            self.0
                .push(format!("attach {source} {} {kind:?}", target.display()));
            Ok(target.to_path_buf())
        }
        fn mount_fs(
            &mut self,
            fstype: &str,
            target: &Path,
            flags: MsFlags,
            data: &str,
        ) -> Result<(), Fail> {
            self.0.push(format!(
                "mount {fstype} {} {:#x} {data}",
                target.display(),
                flags.bits()
            ));
            Ok(())
        }
        fn remount_ro(&mut self, target: &Path) -> Result<(), Fail> {
            self.0.push(format!("ro {}", target.display()));
            Ok(())
        }
        fn mkdir(&mut self, path: &Path) -> Result<(), Fail> {
            self.0.push(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn symlink(&mut self, to: &str, at: &Path) -> Result<(), Fail> {
            self.0.push(format!("link {} -> {to}", at.display()));
            Ok(())
        }
    }

    fn sources(host_net: bool, mounts: Vec<Option<(String, Kind)>>) -> Sources<String> {
        Sources {
            dev: DEV_NODES.iter().map(|n| (*n, format!("dev:{n}"))).collect(),
            etc: ["hosts", "resolv.conf", "hostname"]
                .map(|n| (n, format!("etc:{n}")))
                .to_vec(),
            mounts,
            sys: host_net.then(|| "host-sys".to_owned()),
            sysfs: (!host_net).then(|| "fresh-sysfs".to_owned()),
            proc: "fresh-proc".to_owned(),
        }
    }

    fn spec() -> SandboxSpec {
        SandboxSpec::new(
            RootfsSpec::Dir(PathBuf::from("/r")),
            crate::spec::ProcessSpec::new(["true"]),
        )
    }

    #[test]
    fn the_default_plan_mounts_proc_dev_sys_etc_in_order() {
        let mut rec = Recorder::default();
        populate(&spec(), &sources(false, vec![]), &mut rec, false).unwrap();
        let nosuid_nodev_noexec =
            (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC).bits();
        let expected = [
            format!(
                "mount tmpfs /dev {:#x} mode=755,size=65536k",
                (MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME).bits()
            ),
            "attach dev:null /dev/null File".to_owned(),
            "attach dev:zero /dev/zero File".to_owned(),
            "attach dev:full /dev/full File".to_owned(),
            "attach dev:random /dev/random File".to_owned(),
            "attach dev:urandom /dev/urandom File".to_owned(),
            "attach dev:tty /dev/tty File".to_owned(),
            "mkdir /dev/pts".to_owned(),
            format!(
                "mount devpts /dev/pts {:#x} newinstance,ptmxmode=0666,mode=620,gid=5",
                (MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC).bits()
            ),
            "mkdir /dev/shm".to_owned(),
            format!("mount tmpfs /dev/shm {nosuid_nodev_noexec:#x} mode=1777,size=65536k"),
            "mkdir /dev/mqueue".to_owned(),
            format!("mount mqueue /dev/mqueue {nosuid_nodev_noexec:#x} "),
            "link /dev/ptmx -> pts/ptmx".to_owned(),
            "link /dev/fd -> /proc/self/fd".to_owned(),
            "link /dev/stdin -> /proc/self/fd/0".to_owned(),
            "link /dev/stdout -> /proc/self/fd/1".to_owned(),
            "link /dev/stderr -> /proc/self/fd/2".to_owned(),
            "link /dev/core -> /proc/kcore".to_owned(),
            "attach fresh-sysfs /sys Dir".to_owned(),
            "attach etc:hosts /etc/hosts File".to_owned(),
            "attach etc:resolv.conf /etc/resolv.conf File".to_owned(),
            "attach etc:hostname /etc/hostname File".to_owned(),
            "attach fresh-proc /proc Dir".to_owned(),
        ];
        assert_eq!(rec.0, expected);
    }

    #[test]
    fn host_network_binds_sys_read_only_and_rootless_drops_the_tty_gid() {
        let mut rec = Recorder::default();
        populate(&spec(), &sources(true, vec![]), &mut rec, true).unwrap();
        let sys = rec
            .0
            .iter()
            .position(|l| l == "attach host-sys /sys Dir")
            .unwrap();
        assert_eq!(rec.0[sys + 1], "ro /sys");
        assert!(
            rec.0
                .iter()
                .any(|l| l.starts_with("mount devpts") && l.ends_with("mode=620"))
        );
    }

    #[test]
    fn spec_mounts_come_last_in_order_with_their_modes() {
        let mut spec = spec();
        spec.readonly_rootfs = true;
        let bind = |readonly| MountKind::Bind {
            source: PathBuf::from("/h"),
            readonly,
        };
        spec.mounts = vec![
            Mount {
                target: "/ro".into(),
                kind: bind(true),
            },
            Mount {
                target: "/rw".into(),
                kind: bind(false),
            },
            Mount {
                target: "/t".into(),
                kind: MountKind::Tmpfs { size: Some(4096) },
            },
            Mount {
                target: "/c".into(),
                kind: MountKind::Cache {
                    source: PathBuf::from("/cache"),
                },
            },
            Mount {
                target: "/run/secrets/s".into(),
                kind: MountKind::Secret {
                    source: PathBuf::from("/s"),
                },
            },
        ];
        let srcs = vec![
            Some(("m0".to_owned(), Kind::Dir)),
            Some(("m1".to_owned(), Kind::File)),
            None,
            Some(("m3".to_owned(), Kind::Dir)),
            Some(("m4".to_owned(), Kind::File)),
        ];
        let mut rec = Recorder::default();
        populate(&spec, &sources(false, srcs), &mut rec, false).unwrap();
        let start = rec
            .0
            .iter()
            .position(|l| l == "attach etc:hostname /etc/hostname File")
            .unwrap()
            + 1;
        let tmpfs_flags = (MsFlags::MS_NOSUID | MsFlags::MS_NODEV).bits();
        assert_eq!(
            rec.0[start..],
            [
                "attach m0 /ro Dir".to_owned(),
                "ro /ro".to_owned(),
                "attach m1 /rw File".to_owned(),
                format!("mount tmpfs /t {tmpfs_flags:#x} size=4096"),
                "attach m3 /c Dir".to_owned(),
                "attach m4 /run/secrets/s File".to_owned(),
                "ro /run/secrets/s".to_owned(),
                "attach fresh-proc /proc Dir".to_owned(),
                "ro /".to_owned(),
            ]
        );
    }

    #[test]
    fn relative_mount_targets_are_refused() {
        let mut spec = spec();
        spec.mounts = vec![Mount {
            target: "etc/x".into(),
            kind: MountKind::Tmpfs { size: None },
        }];
        let err = populate(
            &spec,
            &sources(false, vec![None]),
            &mut Recorder::default(),
            false,
        )
        .unwrap_err();
        assert!(matches!(
            err.report,
            crate::fail::Report::SetupFailed {
                errno: libc::EINVAL,
                ..
            }
        ));
    }

    #[test]
    fn short_option_lists_stay_absolute() {
        let lowers = vec![PathBuf::from("/s/1/fs"), PathBuf::from("/s/2/fs")];
        let (opts, base) =
            overlay_options(&lowers, Path::new("/u"), Path::new("/w"), false, false).unwrap();
        assert_eq!(opts, "lowerdir=/s/1/fs:/s/2/fs,upperdir=/u,workdir=/w");
        assert_eq!(base, Chdir::Stay);
    }

    #[test]
    fn long_option_lists_become_relative_to_the_common_parent() {
        let store = "/var/lib/kiln/snapshots/a-rather-long-directory-name-for-the-store";
        let lowers: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("{store}/{i:03}")))
            .collect();
        let (opts, base) =
            overlay_options(&lowers, Path::new("/u"), Path::new("/w"), true, true).unwrap();
        assert_eq!(base, Chdir::Base(PathBuf::from(store)));
        assert!(opts.starts_with("lowerdir=000:001:002:"), "{opts}");
        assert!(
            opts.ends_with(",upperdir=/u,workdir=/w,userxattr,volatile"),
            "{opts}"
        );
        assert!(opts.len() < 4000);
    }

    #[test]
    fn digest_named_lowers_become_indexed_links() {
        // 64-hex-digit snapshot names: even relative, 200 of them exceed a page.
        let lowers: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/store/{i:064x}/fs")))
            .collect();
        let (opts, chdir) =
            overlay_options(&lowers, Path::new("/u"), Path::new("/w"), false, false).unwrap();
        assert_eq!(chdir, Chdir::Links);
        assert!(opts.starts_with("lowerdir=0:1:2:3:"), "{opts}");
        assert!(opts.contains(":199,upperdir=/u,"), "{opts}");
    }

    #[test]
    fn too_many_lowers_is_a_clear_error() {
        let lowers: Vec<PathBuf> = (0..2000)
            .map(|i| PathBuf::from(format!("/s/layer-number-{i:05}")))
            .collect();
        let err =
            overlay_options(&lowers, Path::new("/u"), Path::new("/w"), false, false).unwrap_err();
        assert!(matches!(
            err.report,
            crate::fail::Report::SetupFailed {
                errno: libc::E2BIG,
                ..
            }
        ));
    }

    #[test]
    fn separators_in_paths_are_escaped() {
        let lowers = vec![PathBuf::from("/a:b,c")];
        let (opts, _) =
            overlay_options(&lowers, Path::new("/u"), Path::new("/w"), false, false).unwrap();
        assert!(opts.starts_with("lowerdir=/a\\:b\\,c,"), "{opts}");
    }
}
