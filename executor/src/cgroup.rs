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

/// The caller's cgroup path for a v1 controller, from `/proc/self/cgroup`.
fn own_v1_path(controller: &str) -> Result<String, Fail> {
    let text = fs_err::read_to_string("/proc/self/cgroup")
        .step(|| "read `/proc/self/cgroup`".to_owned())?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .next()
        .unwrap_or_else(|| "/".to_owned()))
}

impl Cgroup {
    /// Creates the cgroup and writes the limits.
    pub(crate) fn create(name: &str, limits: &Limits) -> Result<Self, Fail> {
        if Path::new(ROOT).join("cgroup.controllers").exists() {
            Self::create_v2(name, limits)
        } else {
            Self::create_v1(name, limits)
        }
    }

    fn create_v2(name: &str, limits: &Limits) -> Result<Self, Fail> {
        let parent = Path::new(ROOT).join("kiln");
        fs_err::create_dir_all(&parent)
            .step(|| format!("create the cgroup `{}`", parent.display()))?;
        for dir in [Path::new(ROOT), parent.as_path()] {
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

    fn create_v1(name: &str, limits: &Limits) -> Result<Self, Fail> {
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
            let mount = Path::new(ROOT).join(controller);
            if !mount.join("cgroup.procs").exists() {
                let _cleanup = cg.remove();
                return Err(Fail::step(
                    format!("find the `{controller}` cgroup controller under `{ROOT}`"),
                    libc::ENOENT,
                ));
            }
            let own = own_v1_path(controller)?;
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
