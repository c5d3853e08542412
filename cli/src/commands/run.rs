//! `kiln run`: create and start a container (docker's flags and exit codes).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use kiln_executor::Limits;
use kiln_runtime::{RestartPolicy, RunOptions, RunOutcome};

use super::Global;

/// `kiln run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Keep stdin open and pass it to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Give the container a terminal (a pty).
    #[arg(short, long)]
    tty: bool,
    /// Run in the background and print the container id.
    #[arg(short, long)]
    detach: bool,
    /// Remove the container (and its anonymous volumes) when it exits.
    #[arg(long)]
    rm: bool,
    /// The container's name.
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (`K=V`, or `K` to pass kiln's value).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Read environment variables from a file.
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// The working directory inside the container.
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// The user (`name`, `uid`, `uid:gid`, ...).
    #[arg(short, long)]
    user: Option<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Mount a volume (`NAME:/path[:ro]`) or a host path (`/host:/path[:ro]`).
    #[arg(short, long = "volume", value_name = "SRC:DST[:ro]")]
    volume: Vec<String>,
    /// Mount a tmpfs (`/path[:size=N]`).
    #[arg(long, value_name = "PATH")]
    tmpfs: Vec<String>,
    /// Mount the container's root file system read-only.
    #[arg(long = "read-only")]
    read_only: bool,
    /// The network: bridge (the default, as docker's; `default` names it too), none, host
    /// or a network name.
    #[arg(long, default_value = "bridge")]
    network: String,
    /// A name for the container on its network.
    #[arg(long = "network-alias", value_name = "ALIAS")]
    network_alias: Vec<String>,
    /// Publish a port (`[IP:]HOST:CTR[/udp]`).
    #[arg(short, long, value_name = "SPEC")]
    publish: Vec<String>,
    /// The container's hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit (`64m`, `1g`).
    #[arg(short, long, value_name = "SIZE")]
    memory: Option<String>,
    /// CPU limit (`1.5`).
    #[arg(long)]
    cpus: Option<String>,
    /// Maximum number of processes.
    #[arg(long = "pids-limit", value_name = "N")]
    pids_limit: Option<u64>,
    /// The signal `kiln stop` sends first.
    #[arg(long = "stop-signal", value_name = "SIGNAL")]
    stop_signal: Option<String>,
    /// Seconds `kiln stop` waits before SIGKILL.
    #[arg(long = "stop-timeout", value_name = "SECONDS")]
    stop_timeout: Option<u64>,
    /// Restart policy: no, on-failure[:N], always.
    #[arg(long, default_value = "no")]
    restart: String,
    /// The image, then the command and its arguments (default: the image's).
    /// Everything after the image belongs to the command, as in docker.
    #[arg(
        required = true,
        value_name = "IMAGE [COMMAND [ARG...]]",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    image_and_command: Vec<String>,
}

fn options(a: &RunArgs) -> kiln_runtime::Result<RunOptions> {
    let memory = a
        .memory
        .as_deref()
        .map(kiln_runtime::parse_memory)
        .transpose()?;
    let millicpus = a
        .cpus
        .as_deref()
        .map(kiln_runtime::parse_cpus)
        .transpose()?;
    Ok(RunOptions {
        image: a.image_and_command.first().cloned().unwrap_or_default(),
        cmd: a.image_and_command.get(1..).unwrap_or_default().to_vec(),
        entrypoint: a.entrypoint.clone(),
        name: a.name.clone(),
        env: a.env.clone(),
        env_files: a.env_file.clone(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        volumes: a.volume.clone(),
        tmpfs: a.tmpfs.clone(),
        read_only: a.read_only,
        // docker's name for the daemon's default network: the bridge.
        network: if a.network == "default" {
            kiln_runtime::network::DEFAULT_NETWORK.to_owned()
        } else {
            a.network.clone()
        },
        aliases: a.network_alias.clone(),
        publish: a.publish.clone(),
        hostname: a.hostname.clone(),
        limits: Limits {
            memory,
            millicpus,
            pids: a.pids_limit,
        },
        stop_signal: a.stop_signal.clone(),
        stop_timeout: a.stop_timeout,
        restart: a.restart.parse::<RestartPolicy>()?,
        interactive: a.interactive,
        tty: a.tty,
        detach: a.detach,
        auto_remove: a.rm,
    })
}

/// Exit code from an int (`ExitCode` takes a u8; docker's codes fit).
pub(crate) fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c.clamp(0, 255)).unwrap_or(255))
}

/// Prints a runtime error and returns docker's exit code for it.
pub(crate) fn fail(e: &kiln_runtime::Error) -> ExitCode {
    eprintln!("kiln: error: {e:#}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    code(e.exit_code())
}

pub(crate) fn run(a: &RunArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match global.store() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            return Ok(code(125));
        }
    };
    let outcome = options(a).and_then(|o| kiln_runtime::run(&store, &o));
    match outcome {
        Ok(RunOutcome::Detached(id)) => {
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(RunOutcome::Exited(c)) => Ok(code(c)),
        Err(e) => Ok(fail(&e)),
    }
}
