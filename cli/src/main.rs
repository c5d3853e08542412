//! The `kiln` binary: clap commands, rendering and exit codes.
//!
//! Each subcommand lives in its own file under `commands/` and is a thin
//! adapter from its flags onto the library crates.
#![expect(clippy::print_stdout, clippy::print_stderr, reason = "the CLI prints")]

mod commands;
mod progress;

use std::process::ExitCode;

use clap::Parser;

/// kiln builds container images from Dockerfiles and runs them, with no daemon.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: commands::Global,
    #[command(subcommand)]
    command: commands::Command,
}

/// [`Cli`] with `build` alone. clap builds every subcommand's arguments
/// before it parses: for `kiln build` that was about 0.2 ms and 60 page
/// faults of a fully cached rebuild's 1.9 ms. What this does not parse
/// (help, a mistake, anything but `build` first) goes to [`Cli`], whose
/// messages stay the only ones users see.
#[derive(Debug, Parser)]
#[command(name = "kiln", max_term_width = 100)]
struct QuickCli {
    #[command(flatten)]
    global: commands::Global,
    #[command(subcommand)]
    command: Quick,
}

#[derive(Debug, clap::Subcommand)]
enum Quick {
    Build(Box<commands::build::BuildArgs>),
}

impl From<QuickCli> for Cli {
    fn from(q: QuickCli) -> Self {
        let Quick::Build(a) = q.command;
        Cli {
            global: q.global,
            command: commands::Command::Build(a),
        }
    }
}

/// The command line, parsed by [`QuickCli`] when it can.
fn parse() -> Cli {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("build"))
        && let Ok(q) = QuickCli::try_parse()
    {
        return q.into();
    }
    Cli::parse()
}

fn main() -> ExitCode {
    kiln_executor::tune_allocator();
    // When re-executed as the sandbox helper (argv[1] is `__kiln-sandbox`), this runs
    // the helper and exits: it must come before anything starts a thread.
    kiln_executor::helper_main_if_requested();
    // Likewise the detached container's supervisor (`__kiln-supervise`).
    kiln_runtime::supervisor_main_if_requested();
    kiln_cache::timing::mark("start");
    let cli = parse();
    let result = commands::run(cli.command, &cli.global);
    kiln_cache::timing::mark("end");
    match result {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`kiln ... | head`) is not an error.
            if err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick parser reads a `build` command line as the full one does,
    /// or not at all (leaving help and mistakes to the full one).
    #[test]
    fn the_quick_parser_agrees_with_the_full_one() {
        let lines: &[&[&str]] = &[
            &["kiln", "build", "."],
            &[
                "kiln",
                "build",
                "-t",
                "a",
                "-t",
                "b:1",
                "--build-arg",
                "X=1",
                "-f",
                "D",
                "--no-cache",
                "--secret",
                "id=s,src=f",
                "ctx",
            ],
            &[
                "kiln",
                "build",
                "--progress=plain",
                "--network=none",
                "--root",
                "/tmp/r",
                "--target",
                "s",
                "-o",
                "type=local,dest=out",
                ".",
            ],
            &[
                "kiln",
                "build",
                "-q",
                "--platform",
                "linux/arm64/v8",
                "--rm",
                "--force-rm=false",
                ".",
            ],
        ];
        for line in lines {
            let full = Cli::try_parse_from(*line).expect("the full parser reads it");
            let quick: Cli = QuickCli::try_parse_from(*line)
                .expect("the quick parser reads it")
                .into();
            assert_eq!(format!("{quick:?}"), format!("{full:?}"), "{line:?}");
        }
        for line in [
            &["kiln", "build", "--help"][..],
            &["kiln", "build", "--no-such-flag", "."],
            &["kiln", "build"],
            &["kiln", "images"],
        ] {
            assert!(QuickCli::try_parse_from(line).is_err(), "{line:?}");
        }
    }
}
