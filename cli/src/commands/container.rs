//! Container commands: ps, logs, stop, kill, start, rm, exec, inspect.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use kiln_runtime::ExecOptions;

use super::Global;
use super::format::{human_age, table};
use super::run::{code, fail};

/// `kiln ps`.
#[derive(Debug, Args)]
pub(crate) struct PsArgs {
    /// Show all containers (default: running ones).
    #[arg(short, long)]
    all: bool,
    /// Print only ids.
    #[arg(short, long)]
    quiet: bool,
    /// Don't truncate ids and commands.
    #[arg(long = "no-trunc")]
    no_trunc: bool,
}

/// `kiln logs`.
#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// Keep printing new output until the container stops.
    #[arg(short, long)]
    follow: bool,
    /// The container.
    container: String,
}

/// `kiln stop`.
#[derive(Debug, Args)]
pub(crate) struct StopArgs {
    /// Seconds to wait before SIGKILL (default: the container's stop timeout, 10).
    #[arg(
        short,
        long = "time",
        visible_alias = "timeout",
        value_name = "SECONDS"
    )]
    time: Option<u64>,
    /// The containers.
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `kiln kill`.
#[derive(Debug, Args)]
pub(crate) struct KillArgs {
    /// The signal (default SIGKILL).
    #[arg(short, long)]
    signal: Option<String>,
    /// The containers.
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `kiln start`.
#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// The containers.
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `kiln rm`.
#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// Kill and remove a running container.
    #[arg(short, long)]
    force: bool,
    /// Also remove its anonymous volumes.
    #[arg(short, long)]
    volumes: bool,
    /// The containers.
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `kiln inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Containers (or, as docker, images: a name that is no container).
    #[arg(required = true)]
    containers: Vec<String>,
}

/// `kiln exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Keep stdin open and pass it to the process.
    #[arg(short, long)]
    interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable.
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// The user.
    #[arg(short, long)]
    user: Option<String>,
    /// The working directory.
    #[arg(short, long)]
    workdir: Option<String>,
    /// The container, then the command and its arguments.
    #[arg(
        required = true,
        num_args = 2..,
        value_name = "CONTAINER COMMAND [ARG...]",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    container_and_command: Vec<String>,
}

fn store(global: &Global) -> Result<kiln_cache::Store, ExitCode> {
    global.store().map_err(|e| {
        eprintln!("kiln: error: {e:#}");
        code(125)
    })
}

/// Runs `f` on each name, printing what it returns; the exit code is 1 when any failed.
fn each(
    names: &[String],
    mut f: impl FnMut(&str) -> kiln_runtime::Result<String>,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for n in names {
        match f(n) {
            Ok(out) => println!("{out}"),
            Err(e) => {
                eprintln!("kiln: error: {e:#}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn status_text(info: &kiln_runtime::ContainerInfo, now: i64) -> String {
    let r = &info.record;
    let secs = |t: Option<i64>| (now - t.unwrap_or(now)).div_euclid(1_000_000_000);
    match r.state.as_str() {
        "running" => {
            let age = human_age(secs(r.started));
            format!("Up {}", age.trim_end_matches(" ago"))
        }
        "restarting" => format!(
            "Restarting ({}) {}",
            r.exit_code.unwrap_or(0),
            human_age(secs(r.finished))
        ),
        "exited" => format!(
            "Exited ({}) {}",
            r.exit_code.unwrap_or(0),
            human_age(secs(r.finished))
        ),
        _ => "Created".to_owned(),
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub(crate) fn ps(a: &PsArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    let list = kiln_runtime::list(&store, a.all)?;
    let short = |id: &str| {
        if a.no_trunc {
            id.to_owned()
        } else {
            id.get(..12).unwrap_or(id).to_owned()
        }
    };
    if a.quiet {
        for c in &list {
            println!("{}", short(&c.record.id));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_nanos();
    let mut rows = vec![
        [
            "CONTAINER ID",
            "IMAGE",
            "COMMAND",
            "CREATED",
            "STATUS",
            "PORTS",
            "NAMES",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for c in &list {
        let mut cmd = c.config.args.join(" ");
        if !a.no_trunc && cmd.chars().count() > 20 {
            cmd = format!("{}…", cmd.chars().take(19).collect::<String>());
        }
        rows.push(vec![
            short(&c.record.id),
            c.record.image_name.clone(),
            format!("\"{cmd}\""),
            human_age((now - c.record.created).div_euclid(1_000_000_000)),
            status_text(c, now),
            c.config.publish.join(", "),
            c.record.name.clone(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn logs(a: &LogsArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let result = kiln_runtime::logs(&store, &a.container, a.follow, |entry| {
        if entry.stream == "stderr" {
            let mut e = stderr.lock();
            e.write_all(entry.log.as_bytes())?;
            e.flush()
        } else {
            let mut o = stdout.lock();
            o.write_all(entry.log.as_bytes())?;
            o.flush()
        }
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

pub(crate) fn stop(a: &StopArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    each(&a.containers, |n| {
        kiln_runtime::stop(&store, n, a.time).map(|_| n.to_owned())
    })
}

pub(crate) fn kill(a: &KillArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    each(&a.containers, |n| {
        kiln_runtime::kill(&store, n, a.signal.as_deref()).map(|_| n.to_owned())
    })
}

pub(crate) fn start(a: &StartArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    each(&a.containers, |n| {
        kiln_runtime::start(&store, n).map(|_| n.to_owned())
    })
}

pub(crate) fn rm(a: &RmArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    each(&a.containers, |n| {
        kiln_runtime::remove(&store, n, a.force, a.volumes).map(|_| n.to_owned())
    })
}

pub(crate) fn inspect(a: &InspectArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    let mut out = Vec::new();
    let mut failed = false;
    for n in &a.containers {
        match kiln_runtime::inspect(&store, n) {
            Ok(serde_json::Value::Array(v)) => out.extend(v),
            Ok(other) => out.push(other),
            Err(kiln_runtime::Error::Store(kiln_cache::StoreError::NoSuch { .. }))
                if store.resolve(n).is_ok() =>
            {
                out.push(super::image::inspect_json(&store.resolve(n)?)?);
            }
            Err(e) => {
                eprintln!("kiln: error: {e:#}");
                failed = true;
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) fn exec(a: &ExecArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = match store(global) {
        Ok(s) => s,
        Err(c) => return Ok(c),
    };
    let opts = ExecOptions {
        cmd: a
            .container_and_command
            .get(1..)
            .unwrap_or_default()
            .to_vec(),
        env: a.env.clone(),
        user: a.user.clone(),
        workdir: a.workdir.clone(),
        interactive: a.interactive,
        tty: a.tty,
    };
    let container = a.container_and_command.first().cloned().unwrap_or_default();
    match kiln_runtime::exec(&store, &container, &opts) {
        Ok(c) => Ok(code(c)),
        Err(e) => Ok(fail(&e)),
    }
}
