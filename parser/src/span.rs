//! Source positions: every node of the AST carries a [`Span`].

use serde::Serialize;

/// A position in the source: 1-based line and 1-based column, the column
/// counted in characters (Unicode scalar values) from the start of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Default)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Position {
    /// A position from its line and column.
    pub fn new(line: usize, column: usize) -> Self {
        Self { line, column }
    }
}

/// The source range of a node: `start` is its first character, `end` is the
/// position just past its last character (on the last line it covers, which
/// for an instruction with heredocs is the terminator line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Span {
    /// The first character.
    pub start: Position,
    /// Just past the last character.
    pub end: Position,
}

impl Span {
    /// A span from two positions.
    pub fn new(start: Position, end: Position) -> Self {
        Self { start, end }
    }
}
