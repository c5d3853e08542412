//! cgroup limits for one sandbox: memory, cpu, pids, on cgroup v1, v2 or the hybrid
//! layout of this machine (v1 controllers, a controller-less v2 tree beside them).
//!
//! Hand-written rather than youki's `libcgroups`: the executor needs three
//! controllers, create / join / read OOM / remove, and nothing else; `libcgroups`
//! brings systemd and dbus support by default and a much larger build. The layout:
//!
//! - v2 (`/sys/fs/cgroup/cgroup.controllers` exists): `/sys/fs/cgroup/kiln/<name>`,
//!   with `+memory +pids +cpu` enabled on the way down.
//! - v1: `<controller mount>/<our own cgroup>/kiln/<name>` for each of `memory`,
//!   `pids`, `cpu`, nested under the caller's cgroup so its limits still apply.

use std::path::{Path, PathBuf};

use crate::fail::{Fail, Step};
use crate::spec::Limits;

const ROOT: &str = "/sys/fs/cgroup";

/// A cgroup made for one sandbox (one directory per v1 controller, one for v2).
#[derive(Debug)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
    memory_dir: Option<PathBuf>,
    v2: bool,
}

fn write(path: &Path, value: &str) -> Result<(), Fail> {
    fs_err::write(path, value)
        .step(|| format!("write `{value}` to the cgroup file `{}`", path.display()))
}

/// The caller's cgroup path for a v1 controller, from `/proc/self/cgroup` text.
fn own_v1_path(text: &str, controller: &str) -> String {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .next()
        .unwrap_or_else(|| "/".to_owned())
}

impl Cgroup {
    /// Creates the cgroup and writes the limits.
    pub(crate) fn create(name: &str, limits: &Limits) -> Result<Self, Fail> {
        let own = fs_err::read_to_string("/proc/self/cgroup")
            .step(|| "read `/proc/self/cgroup`".to_owned())?;
        Self::create_in(Path::new(ROOT), &own, name, limits)
    }

    /// [`Cgroup::create`] under `root` (the cgroup file system's mount point), with
    /// the caller's `/proc/self/cgroup` text given: unit tests point it at a tempdir.
    fn create_in(root: &Path, own: &str, name: &str, limits: &Limits) -> Result<Self, Fail> {
        if root.join("cgroup.controllers").exists() {
            Self::create_v2(root, name, limits)
        } else {
            Self::create_v1(root, own, name, limits)
        }
    }

    fn create_v2(root: &Path, name: &str, limits: &Limits) -> Result<Self, Fail> {
        let parent = root.join("kiln");
        fs_err::create_dir_all(&parent)
            .step(|| format!("create the cgroup `{}`", parent.display()))?;
        for dir in [root, parent.as_path()] {
            write(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
        }
        let dir = parent.join(name);
        fs_err::create_dir(&dir).step(|| format!("create the cgroup `{}`", dir.display()))?;
        let cg = Self {
            dirs: vec![dir.clone()],
            memory_dir: Some(dir.clone()),
            v2: true,
        };
        let fill = || -> Result<(), Fail> {
            if let Some(m) = limits.memory {
                write(&dir.join("memory.max"), &m.to_string())?;
                write(&dir.join("memory.swap.max"), "0")?;
            }
            if let Some(p) = limits.pids {
                write(&dir.join("pids.max"), &p.to_string())?;
            }
            if let Some(c) = limits.millicpus {
                write(
                    &dir.join("cpu.max"),
                    &format!("{} 100000", c.saturating_mul(100).max(1000)),
                )?;
            }
            Ok(())
        };
        match fill() {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _cleanup = cg.remove();
                Err(e)
            }
        }
    }

    fn create_v1(root: &Path, own: &str, name: &str, limits: &Limits) -> Result<Self, Fail> {
        let mut cg = Self {
            dirs: Vec::new(),
            memory_dir: None,
            v2: false,
        };
        let mut wanted = Vec::new();
        if limits.memory.is_some() {
            wanted.push("memory");
        }
        if limits.pids.is_some() {
            wanted.push("pids");
        }
        if limits.millicpus.is_some() {
            wanted.push("cpu");
        }
        for controller in wanted {
            let mount = root.join(controller);
            if !mount.join("cgroup.procs").exists() {
                let _cleanup = cg.remove();
                return Err(Fail::step(
                    format!(
                        "find the `{controller}` cgroup controller under `{}`",
                        root.display()
                    ),
                    libc::ENOENT,
                ));
            }
            let own = own_v1_path(own, controller);
            let dir = mount
                .join(own.trim_start_matches('/'))
                .join("kiln")
                .join(name);
            let made = fs_err::create_dir_all(&dir)
                .step(|| format!("create the cgroup `{}`", dir.display()));
            if let Err(e) = made {
                let _cleanup = cg.remove();
                return Err(e);
            }
            cg.dirs.push(dir.clone());
            let filled = match controller {
                "memory" => {
                    cg.memory_dir = Some(dir.clone());
                    let m = limits.memory.unwrap_or(u64::MAX).to_string();
                    write(&dir.join("memory.limit_in_bytes"), &m).and_then(|()| {
                        // Without swap accounting the file is absent; then swap is not limited.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &m)
                        } else {
                            Ok(())
                        }
                    })
                }
                "pids" => write(&dir.join("pids.max"), &limits.pids.unwrap_or(0).to_string()),
                _ => write(&dir.join("cpu.cfs_period_us"), "100000").and_then(|()| {
                    let quota = limits.millicpus.unwrap_or(0).saturating_mul(100).max(1000);
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())
                }),
            };
            if let Err(e) = filled {
                let _cleanup = cg.remove();
                return Err(e);
            }
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a process writes `0` to in order to join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// True when the kernel OOM-killed a process in this cgroup.
    pub(crate) fn oom_killed(&self) -> bool {
        let Some(dir) = &self.memory_dir else {
            return false;
        };
        let file = if self.v2 {
            dir.join("memory.events")
        } else {
            dir.join("memory.oom_control")
        };
        fs_err::read_to_string(file)
            .map(|text| {
                text.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            })
            .unwrap_or(false)
    }

    /// Kills what is left and removes the directories. Processes of a dead pid
    /// namespace can take a moment to leave, so `rmdir` is retried for up to ~1 s.
    pub(crate) fn remove(&self) -> Result<(), Fail> {
        for dir in &self.dirs {
            let mut last = Ok(());
            for attempt in 0..1000 {
                if let Ok(pids) = fs_err::read_to_string(dir.join("cgroup.procs")) {
                    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        let _gone = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                match fs_err::remove_dir(dir) {
                    Ok(()) => {
                        last = Ok(());
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        last = Ok(());
                        break;
                    }
                    Err(e) => {
                        last = Err(e);
                        std::thread::sleep(std::time::Duration::from_millis(if attempt < 10 {
                            1
                        } else {
                            5
                        }));
                    }
                }
            }
            last.step(|| format!("remove the cgroup `{}`", dir.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/ci/job-7\n1:cpu,cpuacct:/\n0::/\n";

    fn read(p: PathBuf) -> String {
        fs_err::read_to_string(p).unwrap().trim().to_owned()
    }

    #[test]
    fn v1_nests_under_the_callers_cgroup_and_writes_limits() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "cpu"] {
            fs_err::create_dir_all(root.path().join(c)).unwrap();
            fs_err::write(root.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let limits = Limits {
            memory: Some(64 << 20),
            millicpus: Some(1500),
            pids: Some(42),
        };
        let cg = Cgroup::create_in(root.path(), HYBRID, "sandbox-1", &limits).unwrap();
        let mem = root.path().join("memory/ci/job-7/kiln/sandbox-1");
        assert_eq!(
            read(mem.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(root.path().join("pids/kiln/sandbox-1/pids.max")), "42");
        assert_eq!(
            read(root.path().join("cpu/kiln/sandbox-1/cpu.cfs_quota_us")),
            "150000"
        );
        assert_eq!(
            read(root.path().join("cpu/kiln/sandbox-1/cpu.cfs_period_us")),
            "100000"
        );
        assert_eq!(cg.procs_files().len(), 3);
        assert!(!cg.oom_killed());
        fs_err::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(cg.oom_killed());
    }

    #[test]
    fn v1_only_makes_the_controllers_it_needs_and_fails_clearly_without_them() {
        let root = tempfile::tempdir().unwrap();
        fs_err::create_dir_all(root.path().join("pids")).unwrap();
        fs_err::write(root.path().join("pids/cgroup.procs"), "").unwrap();
        let pids_only = Limits {
            pids: Some(5),
            ..Limits::default()
        };
        let cg = Cgroup::create_in(root.path(), HYBRID, "s", &pids_only).unwrap();
        assert_eq!(
            cg.procs_files(),
            [root.path().join("pids/kiln/s/cgroup.procs")]
        );
        let with_memory = Limits {
            memory: Some(1),
            ..Limits::default()
        };
        let err = Cgroup::create_in(root.path(), HYBRID, "t", &with_memory).unwrap_err();
        assert!(matches!(
            err.report,
            crate::fail::Report::SetupFailed {
                errno: libc::ENOENT,
                ..
            }
        ));
    }

    #[test]
    fn v2_enables_controllers_and_writes_limits() {
        let root = tempfile::tempdir().unwrap();
        fs_err::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let limits = Limits {
            memory: Some(1 << 30),
            millicpus: Some(500),
            pids: Some(100),
        };
        let cg = Cgroup::create_in(root.path(), "0::/\n", "sandbox-2", &limits).unwrap();
        let dir = root.path().join("kiln/sandbox-2");
        assert_eq!(
            read(root.path().join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            read(root.path().join("kiln/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(dir.join("memory.max")), (1u64 << 30).to_string());
        assert_eq!(read(dir.join("memory.swap.max")), "0");
        assert_eq!(read(dir.join("pids.max")), "100");
        assert_eq!(read(dir.join("cpu.max")), "50000 100000");
        assert_eq!(cg.procs_files(), [dir.join("cgroup.procs")]);
        fs_err::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n",
        )
        .unwrap();
        assert!(cg.oom_killed());
    }
}
