//! Runs one sandbox from flags: the executor's test and benchmark entry point, and
//! the helper binary its tests re-execute.
//!
//! ```text
//! kiln-sandbox-run [--lower DIR]... [--upper DIR --work DIR | --dir DIR]
//!                  [--net none|host] [--user SPEC] [--memory BYTES] [--pids N]
//!                  [--init] [--repeat N] [--helper BIN] -- ARGS...
//! ```
//! With `--lower` and no `--upper`, each run gets a fresh upper and work directory
//! (as a RUN step does), made and removed inside the timed loop. `--helper` re-execs
//! another binary as the helper (e.g. the `kiln` binary, to measure its start-up).
//! `--init` runs the payload under `kiln-init` (PID 2) instead of as PID 1.
//! Prints nothing of its own; the payload's output is inherited. Exits with the
//! payload's shell code (of the last run with `--repeat`).
#![expect(
    clippy::print_stderr,
    reason = "a command-line tool reports its errors"
)]

use std::path::PathBuf;
use std::process::ExitCode;

use kiln_executor::{Limits, Network, ProcessSpec, RootfsSpec, Sandbox, SandboxSpec, Stdio, User};

fn main() -> ExitCode {
    kiln_executor::helper_main_if_requested();
    match run() {
        Ok(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(125)
        }
    }
}

fn run() -> Result<i32, String> {
    let mut args = std::env::args().skip(1);
    let (mut lowers, mut upper, mut work, mut dir) = (Vec::new(), None, None, None);
    let (mut network, mut user, mut limits, mut repeat) =
        (Network::None, None, Limits::default(), 1u32);
    let mut payload = Vec::new();
    let mut helper = None;
    let mut init = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("`{arg}` needs a value"));
        match arg.as_str() {
            "--lower" => lowers.push(PathBuf::from(value()?)),
            "--upper" => upper = Some(PathBuf::from(value()?)),
            "--work" => work = Some(PathBuf::from(value()?)),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--net" => {
                network = match value()?.as_str() {
                    "none" => Network::None,
                    "host" => Network::Host,
                    other => return Err(format!("unknown network `{other}`")),
                }
            }
            "--user" => user = Some(value()?),
            "--memory" => {
                limits.memory = Some(value()?.parse().map_err(|e| format!("--memory: {e}"))?)
            }
            "--pids" => limits.pids = Some(value()?.parse().map_err(|e| format!("--pids: {e}"))?),
            "--helper" => helper = Some(PathBuf::from(value()?)),
            "--init" => init = true,
            "--repeat" => repeat = value()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            "--" => {
                payload.extend(args.by_ref());
            }
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    let fresh = upper.is_none() && dir.is_none();
    let scratch = std::env::temp_dir().join(format!("kiln-sandbox-run.{}", std::process::id()));
    let rootfs = match (dir, upper, work) {
        (Some(d), None, None) if lowers.is_empty() => RootfsSpec::Dir(d),
        (None, Some(upper), Some(work)) if !lowers.is_empty() => RootfsSpec::Overlay {
            lowers,
            upper,
            work,
        },
        (None, None, None) if !lowers.is_empty() => RootfsSpec::Overlay {
            lowers,
            upper: scratch.join("upper"),
            work: scratch.join("work"),
        },
        _ => {
            return Err(
                "give either --dir, or --lower (repeatable) with optional --upper and --work"
                    .to_owned(),
            );
        }
    };
    let mut process = ProcessSpec::new(payload);
    if let Some(u) = user {
        process.user = User::Spec(u);
    }
    let mut spec = SandboxSpec::new(rootfs, process);
    spec.network = network;
    spec.limits = limits;
    spec.stdio = Stdio::Inherit;
    spec.init = init;
    let sandbox = match helper {
        Some(h) => Sandbox::new().with_helper(h),
        None => Sandbox::new(),
    };
    let mut code = 0;
    for _ in 0..repeat {
        if fresh {
            // A run SIGKILLed before its cleanup leaves its scratch behind, and pids
            // are reused: never mount a stale (volatile-marked) work dir.
            remove_scratch(&scratch)?;
            for d in ["upper", "work"] {
                fs_err::create_dir_all(scratch.join(d)).map_err(|e| e.to_string())?;
            }
        }
        let status = sandbox
            .spawn(&spec)
            .map_err(|e| error_chain(&e))
            .and_then(|mut running| running.wait().map_err(|e| error_chain(&e)));
        if fresh {
            remove_scratch(&scratch)?;
        }
        code = status?.shell_code();
    }
    Ok(code)
}

fn remove_scratch(scratch: &std::path::Path) -> Result<(), String> {
    match fs_err::remove_dir_all(scratch) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
        _ => Ok(()),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
