//! The parser's error: what went wrong ([`ErrorKind`]), where (file, line,
//! column), the source line, and a hint where one helps.
//!
//! Rendered like uv's `Pep508Error`:
//!
//! ```text
//! unknown instruction: `COPPY`
//!  --> Dockerfile:3:1
//!   |
//! 3 | COPPY . /app
//!   | ^^^^^
//!
//! hint: did you mean `COPY`?
//! ```

use std::fmt;
use std::path::PathBuf;

/// What went wrong. Every variant renders as a lower-case message with the
/// offending values in backticks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file holds no instruction (empty, or only comments/blank lines).
    #[error("the Dockerfile has no instructions")]
    Empty,
    /// An instruction keyword kiln (and BuildKit) does not know.
    #[error("unknown instruction: `{0}`")]
    UnknownInstruction(String),
    /// An instruction other than ARG before the first FROM.
    #[error("`{0}` comes before the first `FROM`")]
    BeforeFrom(String),
    /// A `--flag` the instruction does not accept.
    #[error("unknown flag `--{flag}` for `{instruction}`")]
    UnknownFlag {
        /// The instruction, upper case.
        instruction: String,
        /// The flag name without `--`.
        flag: String,
    },
    /// A flag given twice that may only be given once.
    #[error("duplicate flag `--{0}`")]
    DuplicateFlag(String),
    /// A word in the flag position that does not start with `--`.
    #[error("flag `{0}` should start with `--`")]
    MalformedFlag(String),
    /// A flag that needs a value was given without one.
    #[error("flag `--{0}` needs a value")]
    MissingFlagValue(String),
    /// A flag value that does not parse or is not allowed.
    #[error("bad value `{value}` for flag `--{flag}`: {reason}")]
    BadFlagValue {
        /// The flag name without `--`.
        flag: String,
        /// The value as written.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A `--mount` option that is not valid.
    #[error("bad `--mount` option `{option}`: {reason}")]
    BadMount {
        /// The option (`key=value` field) as written.
        option: String,
        /// Why it is refused.
        reason: String,
    },
    /// A heredoc whose terminator line never came.
    #[error("unterminated heredoc `{0}`")]
    UnterminatedHeredoc(String),
    /// A heredoc marker that cannot be lexed (e.g. an unterminated quote).
    #[error("bad heredoc marker `{0}`")]
    BadHeredoc(String),
    /// A JSON array (exec form) with an element that is not a string.
    #[error("a JSON array must hold only strings")]
    JsonNotStrings,
    /// A JSON array (exec form) that is never closed. BuildKit runs such
    /// text as a shell command; kiln refuses it.
    #[error("unterminated JSON array in `{0}`")]
    UnterminatedJson(String),
    /// An instruction that needs the JSON form got something else.
    #[error("`{instruction}` needs its arguments as a JSON array of strings, got `{got}`")]
    NotJson {
        /// The instruction, upper case.
        instruction: String,
        /// The arguments as written.
        got: String,
    },
    /// The wrong number of arguments.
    #[error("`{instruction}` {expected}")]
    Arguments {
        /// The instruction, upper case.
        instruction: String,
        /// What it needs, e.g. "needs exactly one argument".
        expected: String,
    },
    /// A bad argument value (stage name, key names, ports...).
    #[error("{0}")]
    BadArgument(String),
    /// The legacy `ENV key value` form without a value.
    #[error("`{0}` must have two arguments")]
    MissingValue(String),
    /// A `key=value` list with a word that has no `=`.
    #[error("can't find `=` in `{0}`: must be of the form `name=value`")]
    MissingEquals(String),
    /// ONBUILD with a trigger that is not allowed.
    #[error("`{0}` isn't allowed as an `ONBUILD` trigger")]
    BadOnbuildTrigger(String),
    /// A parser directive given twice.
    #[error("only one `{0}` parser directive can be used")]
    DuplicateDirective(String),
    /// `# escape=` with something other than `\` or a backtick.
    #[error("invalid escape token `{0}`: must be `\\` or a backtick")]
    BadEscape(String),
    /// A physical line longer than BuildKit's scanner accepts.
    #[error("line greater than the maximum allowed size of 65535 bytes")]
    LineTooLong,
}

/// A located parse error. `line` and `column` are 1-based; `column` counts
/// characters. [`fmt::Display`] renders the message, `file:line:column`, the
/// source line with a caret under the culprit, and a hint if there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// What went wrong (boxed to keep `Result<_, ParseError>` small).
    #[source]
    pub kind: Box<ErrorKind>,
    /// The file, when the source came from one (see [`ParseError::with_file`]).
    pub file: Option<PathBuf>,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// How many characters the caret underlines (at least 1).
    pub width: usize,
    /// The source line (without its line ending).
    pub source_line: String,
    /// A suggestion, e.g. "did you mean `COPY`?".
    pub hint: Option<String>,
}

impl ParseError {
    pub(crate) fn new(
        kind: ErrorKind,
        src: &str,
        line: usize,
        column: usize,
        width: usize,
    ) -> Self {
        let source_line = src
            .split('\n')
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim_end_matches(['\r', '\n'])
            .trim_start_matches('\u{feff}')
            .to_string();
        Self {
            kind: Box::new(kind),
            file: None,
            line,
            column: column.max(1),
            width: width.max(1),
            source_line,
            hint: None,
        }
    }

    pub(crate) fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    /// Names the file the source came from, for the `-->` line.
    pub fn with_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// The error message alone, without location or excerpt.
    pub fn message(&self) -> String {
        self.kind.to_string()
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self
            .file
            .as_ref()
            .map_or_else(|| "<input>".to_string(), |p| p.display().to_string());
        let number = self.line.to_string();
        let pad = " ".repeat(number.len());
        writeln!(f, "{}", self.kind)?;
        writeln!(f, "{pad}--> {file}:{}:{}", self.line, self.column)?;
        writeln!(f, "{pad} |")?;
        // Tabs would misalign the caret; show them as one space each.
        let shown: String = self
            .source_line
            .chars()
            .map(|c| if c == '\t' { ' ' } else { c })
            .collect();
        writeln!(f, "{number} | {shown}")?;
        let line_chars = shown.chars().count();
        let width = self
            .width
            .min(line_chars.saturating_sub(self.column - 1))
            .max(1);
        write!(
            f,
            "{pad} | {}{}",
            " ".repeat(self.column - 1),
            "^".repeat(width)
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n\nhint: {hint}")?;
        }
        Ok(())
    }
}

/// Edit distance counting a swap of two neighbours as one edit (optimal
/// string alignment), for "did you mean" hints: `chwon` is 1 from `chown`.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The closest candidate within a small edit distance, case-insensitively.
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    if lower.len() > 64 {
        return None;
    }
    candidates
        .iter()
        .map(|c| (edit_distance(&lower, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d > 0 && *d <= (c.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::{edit_distance, suggest};

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("chwon", "chown"), 1);
        assert_eq!(edit_distance("copy", "coppy"), 1);
        assert_eq!(suggest("COPPY", &["COPY", "CMD"]), Some("COPY"));
        assert_eq!(suggest("chwon", &["from", "chown"]), Some("chown"));
        assert_eq!(suggest("zzzzzz", &["COPY"]), None);
    }
}
