//! `kiln parse`: parse a Dockerfile and print it, as BuildKit's AST dump or
//! as kiln's typed AST in JSON (with spans, for tools).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};

/// Output formats of `kiln parse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// BuildKit's `Node.Dump()` text: one `(instruction ...)` line each.
    Dump,
    /// The typed AST with source spans, as JSON.
    Json,
}

/// Parse a Dockerfile and print its syntax tree.
///
/// On a syntax error, prints the error with its file, line and column, the
/// source line and a caret on stderr, and exits with code 1.
#[derive(Debug, Args)]
pub(crate) struct ParseArgs {
    /// The Dockerfile to read.
    #[arg(
        short = 'f',
        long = "file",
        default_value = "Dockerfile",
        value_name = "PATH"
    )]
    file: PathBuf,
    /// What to print.
    #[arg(long, value_enum, default_value_t = Format::Dump)]
    format: Format,
}

/// Runs `kiln parse`.
pub(crate) fn run(args: &ParseArgs) -> anyhow::Result<ExitCode> {
    let dockerfile = match kiln_parser::parse_file(&args.file) {
        Ok(d) => d,
        Err(kiln_parser::FileError::Parse(e)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    let out = match args.format {
        Format::Dump => dockerfile.dump(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&dockerfile)
                .context("cannot serialize the syntax tree")?;
            s.push('\n');
            s
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .context("cannot write to stdout")?;
    stdout.flush().context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}
