//! `kiln run` options, and the container configuration made from them and the
//! image's config as docker applies it.

use std::path::PathBuf;

use kiln_cache::Image;
use kiln_executor::{DEFAULT_PATH_ENV, Limits};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What `kiln run` was asked for (the CLI's flags, parsed).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The image, by name or id.
    pub image: String,
    /// `[CMD...]` after the image.
    pub cmd: Vec<String>,
    /// `--entrypoint` (an empty string clears the image's).
    pub entrypoint: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `-e K=V` or `-e K` (taken from kiln's environment).
    pub env: Vec<String>,
    /// `--env-file`.
    pub env_files: Vec<PathBuf>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`.
    pub user: Option<String>,
    /// `-v NAME:/path[:ro]` or `-v /host:/path[:ro]`.
    pub volumes: Vec<String>,
    /// `--tmpfs /path[:size=N]`.
    pub tmpfs: Vec<String>,
    /// `--read-only`.
    pub read_only: bool,
    /// `--network` (`none`, `host`, `bridge` or a network name).
    pub network: String,
    /// `--network-alias`.
    pub aliases: Vec<String>,
    /// `-p`.
    pub publish: Vec<String>,
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--memory`, `--cpus`, `--pids-limit`.
    pub limits: Limits,
    /// `--stop-signal`.
    pub stop_signal: Option<String>,
    /// `--stop-timeout` in seconds.
    pub stop_timeout: Option<u64>,
    /// `--restart`.
    pub restart: RestartPolicy,
    /// `-i`.
    pub interactive: bool,
    /// `-t`.
    pub tty: bool,
    /// `-d`.
    pub detach: bool,
    /// `--rm`.
    pub auto_remove: bool,
}

/// `--restart no|on-failure[:N]|always|unless-stopped`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never restart.
    #[default]
    No,
    /// Restart after a non-zero exit, at most `max` times (0: no limit).
    OnFailure {
        /// The most restarts.
        max: u32,
    },
    /// Restart whatever the exit, unless stopped by `kiln stop`.
    Always,
}

impl std::str::FromStr for RestartPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                format!("restart policy `{s}`"),
                "expected no, on-failure[:N], always or unless-stopped",
            )
        };
        match s.split_once(':') {
            None if s == "no" => Ok(Self::No),
            None if s == "always" || s == "unless-stopped" => Ok(Self::Always),
            None if s == "on-failure" => Ok(Self::OnFailure { max: 0 }),
            Some(("on-failure", n)) => n
                .parse()
                .map(|max| Self::OnFailure { max })
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl RestartPolicy {
    /// Whether a run that ended with `code` (`restarts` restarts so far) restarts.
    pub fn restarts_after(self, code: i32, restarts: u32) -> bool {
        match self {
            Self::No => false,
            Self::Always => true,
            Self::OnFailure { max } => code != 0 && (max == 0 || restarts < max),
        }
    }
}

/// Where a mount comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum MountSource {
    /// A named (or anonymous) volume.
    Volume {
        /// Its name.
        name: String,
        /// Made for an image `VOLUME` (removed with the container by `--rm`).
        anonymous: bool,
    },
    /// A host path.
    Bind(PathBuf),
    /// A fresh tmpfs.
    Tmpfs {
        /// Size limit in bytes.
        size: Option<u64>,
    },
}

/// One mount of a container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountConfig {
    /// What is mounted.
    pub source: MountSource,
    /// Where, inside the container.
    pub target: String,
    /// Read-only.
    pub readonly: bool,
}

/// Everything needed to (re)start a container; stored as JSON with its record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerConfig {
    /// The image's layer snapshots, top-most first (overlay order).
    pub lowers: Vec<PathBuf>,
    /// The image's layer diffIDs, bottom first.
    pub layers: Vec<String>,
    /// The resolved entrypoint (`Path` and `Args` in inspect are `args`).
    pub entrypoint: Vec<String>,
    /// The resolved command.
    pub cmd: Vec<String>,
    /// argv: entrypoint then command.
    pub args: Vec<String>,
    /// `KEY=value`.
    pub env: Vec<String>,
    /// The working directory.
    pub cwd: String,
    /// The user (`""`: root).
    pub user: String,
    /// The hostname.
    pub hostname: String,
    /// Mounts, in order.
    pub mounts: Vec<MountConfig>,
    /// `--read-only`.
    pub read_only: bool,
    /// The network mode or name.
    pub network: String,
    /// `--network-alias`.
    pub aliases: Vec<String>,
    /// `-p` specs as given.
    pub publish: Vec<String>,
    /// cgroup limits.
    pub limits: Limits,
    /// The stop signal name (`SIGTERM`).
    pub stop_signal: String,
    /// Seconds between the stop signal and SIGKILL.
    pub stop_timeout: u64,
    /// The restart policy.
    pub restart: RestartPolicy,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub interactive: bool,
    /// `--rm`.
    pub auto_remove: bool,
    /// Where `upper/` and `work/` live when not in the container's directory: a
    /// `--rm` container's writable layer is on tmpfs (see `container::create`).
    #[serde(default)]
    pub scratch: Option<PathBuf>,
}

impl ContainerConfig {
    /// The directory holding `upper/` and `work/`.
    pub fn layer_dir(&self, container_dir: &std::path::Path) -> PathBuf {
        self.scratch
            .clone()
            .unwrap_or_else(|| container_dir.to_path_buf())
    }
}

/// Parses a docker byte size: `512`, `64k`, `64m`, `1.5g`, `2t` (powers of
/// 1024; a trailing `b` after the unit, as in `64mb`, and `kib` etc. are
/// accepted), as docker's `RAMInBytes` does.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(
            format!("size `{s}`"),
            "expected a number with an optional unit b, k, m, g or t",
        )
    };
    let lower = s.trim().to_ascii_lowercase();
    let t = lower
        .strip_suffix('b')
        .filter(|t| !t.is_empty())
        .unwrap_or(&lower);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as u64)
}

/// Parses a docker memory size (see [`parse_bytes`]): at least 6 MB.
pub fn parse_memory(s: &str) -> Result<u64> {
    let bytes = parse_bytes(s).map_err(|_| {
        Error::invalid(
            format!("memory size `{s}`"),
            "expected a number with an optional unit b, k, m or g",
        )
    })?;
    if bytes < 6 << 20 {
        return Err(Error::invalid(
            format!("--memory `{s}`"),
            "minimum memory limit allowed is 6MB",
        ));
    }
    Ok(bytes)
}

/// Parses `--cpus 1.5` into thousandths of a CPU.
pub fn parse_cpus(s: &str) -> Result<u64> {
    let n: f64 = s
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| Error::invalid(format!("--cpus `{s}`"), "expected a positive number"))?;
    Ok(((n * 1000.0).round() as u64).max(1))
}

fn set_env(env: &mut Vec<String>, entry: String) {
    let key = entry.split('=').next().unwrap_or("").to_owned();
    env.retain(|e| e.split('=').next() != Some(key.as_str()));
    env.push(entry);
}

/// `-e K` takes K from kiln's environment (dropped when unset), `-e K=V` is literal.
fn env_entry(spec: &str) -> Option<String> {
    if spec.contains('=') {
        Some(spec.to_owned())
    } else {
        std::env::var(spec).ok().map(|v| format!("{spec}={v}"))
    }
}

fn read_env_file(path: &std::path::Path) -> Result<Vec<String>> {
    let text = fs_err::read_to_string(path).map_err(|e| Error::io("reading env file", path, e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(env_entry)
        .collect())
}

/// Parses one `-v` value into a mount: a source starting with `/` (or `.`) is a
/// bind mount, anything else a volume name.
pub(crate) fn parse_volume_flag(spec: &str) -> Result<MountConfig> {
    let bad = |reason: &str| Error::invalid(format!("volume specification `{spec}`"), reason);
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => ("", *target, ""),
        [source, target] => (*source, *target, ""),
        [source, target, mode] => (*source, *target, *mode),
        _ => return Err(bad("expected SOURCE:TARGET[:ro|rw]")),
    };
    if !target.starts_with('/') {
        return Err(bad("the container path must be absolute"));
    }
    let mut readonly = false;
    for m in mode.split(',').filter(|m| !m.is_empty()) {
        match m {
            "ro" => readonly = true,
            "rw" | "z" | "Z" | "rprivate" | "private" => {}
            other => return Err(bad(&format!("unknown mode `{other}`"))),
        }
    }
    let source = if source.is_empty() {
        MountSource::Volume {
            name: String::new(),
            anonymous: true,
        }
    } else if source.starts_with('/') || source.starts_with('.') {
        let path = std::path::absolute(source).map_err(|e| Error::io("resolving", source, e))?;
        MountSource::Bind(path)
    } else {
        crate::volume::validate_name(source)?;
        MountSource::Volume {
            name: source.to_owned(),
            anonymous: false,
        }
    };
    Ok(MountConfig {
        source,
        target: normalize_target(target),
        readonly,
    })
}

fn normalize_target(t: &str) -> String {
    let trimmed = t.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn parse_tmpfs(spec: &str) -> Result<MountConfig> {
    let (target, opts) = spec.split_once(':').unwrap_or((spec, ""));
    if !target.starts_with('/') {
        return Err(Error::invalid(
            format!("--tmpfs `{spec}`"),
            "the container path must be absolute",
        ));
    }
    let mut size = None;
    let mut readonly = false;
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        if let Some(v) = o.strip_prefix("size=") {
            size = Some(parse_memory_any(v)?);
        } else if o == "ro" {
            readonly = true;
        }
    }
    Ok(MountConfig {
        source: MountSource::Tmpfs { size },
        target: normalize_target(target),
        readonly,
    })
}

fn parse_memory_any(s: &str) -> Result<u64> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    num.parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .map_err(|_| {
            Error::invalid(
                format!("tmpfs size `{s}`"),
                "expected a number with k, m or g",
            )
        })
}

impl ContainerConfig {
    /// Applies the image config under the options, as docker does: `--entrypoint`
    /// replaces the image's Entrypoint and drops its Cmd; a command on the command
    /// line replaces Cmd; `-e`/`--env-file` override the image's Env by key; `-u`,
    /// `-w`, `--stop-signal` override User, WorkingDir, StopSignal; every image
    /// `VOLUME` not covered by a `-v` gets an anonymous volume.
    pub fn new(image: &Image, lowers: Vec<PathBuf>, opts: &RunOptions, id: &str) -> Result<Self> {
        let cfg = image.config.config().clone().unwrap_or_default();
        let (entrypoint, cmd) = match &opts.entrypoint {
            Some(e) if e.is_empty() => (Vec::new(), opts.cmd.clone()),
            Some(e) => (vec![e.clone()], opts.cmd.clone()),
            None => {
                let cmd = if opts.cmd.is_empty() {
                    cfg.cmd().clone().unwrap_or_default()
                } else {
                    opts.cmd.clone()
                };
                (cfg.entrypoint().clone().unwrap_or_default(), cmd)
            }
        };
        let args: Vec<String> = entrypoint.iter().chain(&cmd).cloned().collect();
        if args.is_empty() {
            return Err(Error::NoCommand);
        }
        let mut env: Vec<String> = Vec::new();
        for e in cfg.env().clone().unwrap_or_default() {
            set_env(&mut env, e);
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH_ENV.to_owned());
        }
        for f in &opts.env_files {
            for e in read_env_file(f)? {
                set_env(&mut env, e);
            }
        }
        for e in opts.env.iter().filter_map(|e| env_entry(e)) {
            set_env(&mut env, e);
        }
        let hostname = opts
            .hostname
            .clone()
            .unwrap_or_else(|| id.get(..12).unwrap_or(id).to_owned());
        if opts.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".to_owned());
        }
        if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
            env.insert(1.min(env.len()), format!("HOSTNAME={hostname}"));
        }
        let cwd = opts
            .workdir
            .clone()
            .or_else(|| cfg.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        if !cwd.starts_with('/') {
            return Err(Error::invalid(
                format!("working directory `{cwd}`"),
                "it must be absolute",
            ));
        }
        let mut mounts = Vec::new();
        for v in &opts.volumes {
            mounts.push(parse_volume_flag(v)?);
        }
        for t in &opts.tmpfs {
            mounts.push(parse_tmpfs(t)?);
        }
        for v in cfg.volumes().clone().unwrap_or_default() {
            let target = normalize_target(&v);
            if !mounts.iter().any(|m| m.target == target) {
                mounts.push(MountConfig {
                    source: MountSource::Volume {
                        name: String::new(),
                        anonymous: true,
                    },
                    target,
                    readonly: false,
                });
            }
        }
        let stop_signal = opts
            .stop_signal
            .clone()
            .or_else(|| cfg.stop_signal().clone())
            .unwrap_or_else(|| "SIGTERM".to_owned());
        crate::container::parse_signal(&stop_signal)?;
        if opts.detach && opts.auto_remove && opts.restart != RestartPolicy::No {
            return Err(Error::invalid(
                "--restart with --rm",
                "conflicting options: cannot specify both --restart and --rm",
            ));
        }
        Ok(Self {
            lowers,
            layers: image.layers.iter().map(|l| l.diff_id.to_string()).collect(),
            entrypoint,
            cmd,
            args,
            env,
            cwd,
            user: opts
                .user
                .clone()
                .or_else(|| cfg.user().clone())
                .unwrap_or_default(),
            hostname,
            mounts,
            read_only: opts.read_only,
            network: opts.network.clone(),
            aliases: opts.aliases.clone(),
            publish: opts.publish.clone(),
            limits: opts.limits.clone(),
            stop_signal,
            stop_timeout: opts.stop_timeout.unwrap_or(10),
            restart: opts.restart,
            tty: opts.tty,
            interactive: opts.interactive,
            auto_remove: opts.auto_remove,
            scratch: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_cpus_and_restart_policies_parse_as_docker() {
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("64MB").unwrap(), 64 << 20);
        assert!(parse_memory("1k").unwrap_err().to_string().contains("6MB"));
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("1.5gib").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("2t").unwrap(), 2 << 40);
        assert!(parse_bytes("-1g").is_err());
        assert!(parse_bytes("g").is_err());
        assert!(parse_bytes("1e30").is_err());
        assert_eq!(parse_cpus("1.5").unwrap(), 1500);
        assert_eq!(parse_cpus("0.01").unwrap(), 10);
        assert!(parse_cpus("-1").is_err());
        assert_eq!("no".parse::<RestartPolicy>().unwrap(), RestartPolicy::No);
        assert_eq!(
            "on-failure:3".parse::<RestartPolicy>().unwrap(),
            RestartPolicy::OnFailure { max: 3 }
        );
        assert!("sometimes".parse::<RestartPolicy>().is_err());
        assert!(RestartPolicy::OnFailure { max: 2 }.restarts_after(1, 1));
        assert!(!RestartPolicy::OnFailure { max: 2 }.restarts_after(1, 2));
        assert!(!RestartPolicy::OnFailure { max: 0 }.restarts_after(0, 0));
    }

    #[test]
    fn volume_flags_name_binds_and_modes() {
        let v = parse_volume_flag("data:/var/data:ro").unwrap();
        assert_eq!(
            v.source,
            MountSource::Volume {
                name: "data".into(),
                anonymous: false
            }
        );
        assert!(v.readonly);
        let b = parse_volume_flag("/srv/x:/x/").unwrap();
        assert_eq!(b.source, MountSource::Bind("/srv/x".into()));
        assert_eq!(b.target, "/x");
        assert!(!b.readonly);
        assert!(parse_volume_flag("data:rel").is_err());
        assert!(parse_volume_flag("data:/x:bogus").is_err());
        let t = parse_tmpfs("/run:size=1m").unwrap();
        assert_eq!(
            t.source,
            MountSource::Tmpfs {
                size: Some(1 << 20)
            }
        );
    }
}
