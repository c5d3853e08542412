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

fn main() -> ExitCode {
    kiln_executor::tune_allocator();
    // When re-executed as the sandbox helper (argv[1] is `__kiln-sandbox`), this runs
    // the helper and exits: it must come before anything starts a thread.
    kiln_executor::helper_main_if_requested();
    // Likewise the detached container's supervisor (`__kiln-supervise`).
    kiln_runtime::supervisor_main_if_requested();
    kiln_cache::timing::mark("start");
    let cli = Cli::parse();
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
