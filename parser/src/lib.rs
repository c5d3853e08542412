//! kiln-parser: Dockerfile text to a typed AST with source spans, BuildKit's
//! shell-word expansion, and `.dockerignore` matching.
//!
//! Pure functions over `&str`; the only I/O is reading a file in the
//! functions that say so.
#![deny(missing_docs)]

mod dockerignore;
mod expand;

pub use dockerignore::{
    DockerignoreError, IgnoreFile, MatchInfo, Pattern, PatternMatcher, clean_path,
    read_dockerignore, read_ignore_patterns,
};
pub use expand::{Env, ExpandError, ExpandErrorKind, Expansion, Lexer};
