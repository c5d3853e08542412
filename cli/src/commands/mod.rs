//! One module per subcommand (or group of subcommands).

mod parse;

use std::process::ExitCode;

use clap::Subcommand;

/// Every kiln subcommand.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the version.
    Version,
    /// Parse a Dockerfile and print its syntax tree.
    Parse(parse::ParseArgs),
}

/// Runs one subcommand and returns the process exit code.
pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Version => {
            println!("kiln {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Parse(args) => parse::run(&args),
    }
}
