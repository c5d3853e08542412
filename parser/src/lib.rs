//! kiln-parser: Dockerfile text to a typed AST with source spans, BuildKit's
//! shell-word expansion, and `.dockerignore` matching.
//!
//! Pure functions over `&str`; the only I/O is reading a file in the
//! functions that say so.
#![deny(missing_docs)]

mod dockerignore;
mod error;
mod expand;
mod instruction;
mod json_array;
mod node;
mod parse;
mod quote;
mod span;

pub use dockerignore::{
    DockerignoreError, IgnoreFile, MatchInfo, Pattern, PatternMatcher, clean_path,
    read_dockerignore, read_ignore_patterns,
};
pub use expand::{Env, ExpandError, ExpandErrorKind, Expansion, Lexer};

// The Dockerfile parser (two layers: BuildKit's `Node`s, then typed instructions).
pub use error::{ErrorKind, ParseError};
pub use instruction::{
    Add, Arg, ArgDef, Chmod, Command, CommandLine, Copy, Dockerfile, Expose, Flag, From,
    Healthcheck, Instruction, KeyValue, KeyValues, Mount, MountType, Network, Run, Security,
    Sharing, Shell, ShellOrExec, Single, Source, Stage, Volume,
};
pub use node::{Directive, Heredoc, Node, NodeFile, Warning, parse_nodes};
pub use parse::{FileError, INSTRUCTIONS, parse, parse_file};
pub use quote::go_quote;
pub use span::{Position, Span};
