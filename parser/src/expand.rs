//! Shell-word expansion with the semantics of BuildKit's Dockerfile shell lexer
//! (`frontend/dockerfile/shell/lex.go`).
//!
//! This is not a shell: there is no command substitution, no arithmetic and no
//! globbing of file names. It is the small, bash-flavoured language that
//! Dockerfile instructions use for their arguments:
//!
//! * `$name` and `${name}`, where a name is letters, digits and `_`, a run of
//!   digits (`$1`, `$001`), or one special parameter (`$@ $* $# $? $- $$ $! $0`);
//!   an unset variable expands to the empty string;
//! * `${name:-word}`, `${name-word}`, `${name:+word}`, `${name+word}`,
//!   `${name:?message}`, `${name?message}`: the colon forms treat an empty value
//!   like an unset one;
//! * `${name#pattern}`, `${name##pattern}`, `${name%pattern}`, `${name%%pattern}`
//!   (remove the shortest/longest matching prefix/suffix) and `${name/pattern/repl}`,
//!   `${name//pattern/repl}` (replace the first/every match). Patterns know `*`,
//!   `?` and `\`-escapes only; BuildKit has no `[...]` bracket expressions, so `[`
//!   is an ordinary character;
//! * single quotes (everything literal), double quotes (only `$` expands; the
//!   escape character escapes `"`, `$` and itself, and is kept before anything
//!   else) and the escape character outside quotes (the next character is
//!   literal; a trailing escape character is dropped).
//!
//! `${#name}` (length) and `${name:=word}` are not supported, as in BuildKit:
//! they are errors. The escape character is `\` or, after `# escape=`` ` ``, a
//! backtick.
//!
//! [`Lexer::process_word`] gives one string (BuildKit's `ProcessWord`);
//! [`Lexer::process_words`] splits the result into fields on whitespace that
//! is neither quoted nor escaped, including whitespace that an unquoted
//! variable expansion produced (`ProcessWords`); [`Lexer::process_word_with_matches`]
//! also reports which variables were looked up and found, and which were
//! unset (`ProcessWordWithMatches`: the solver uses it to name a changed
//! `ARG` as the cause of a cache miss).
//!
//! Known differences from BuildKit, all on inputs no real Dockerfile has:
//! variable names use Rust's `char::is_alphabetic` / `is_numeric` where Go uses
//! the Unicode categories L and Nd (they differ on combining marks and on
//! numerals such as `²`); an error's message after `${` at the very end of the
//! word says "missing `}`" where Go prints an "unsupported modifier" with a
//! replacement character. Matching a `#`/`%`/`/` pattern recurses once per
//! `*` in it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// A source of variable values for expansion.
///
/// Implemented for `HashMap<String, String>`, `BTreeMap<String, String>`,
/// slices of `(name, value)` pairs (the last pair of a name wins, as in a
/// `KEY=VALUE` environment list) and closures `Fn(&str) -> Option<String>`.
pub trait Env {
    /// The value of `name`, or `None` when it is unset. A variable that is set
    /// to the empty string must return `Some("")`.
    fn lookup(&self, name: &str) -> Option<Cow<'_, str>>;
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn lookup(&self, name: &str) -> Option<Cow<'_, str>> {
        self.get(name).map(|v| Cow::Borrowed(v.as_str()))
    }
}

impl Env for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<Cow<'_, str>> {
        self.get(name).map(|v| Cow::Borrowed(v.as_str()))
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Env for [(K, V)] {
    fn lookup(&self, name: &str) -> Option<Cow<'_, str>> {
        self.iter()
            .rev()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| Cow::Borrowed(v.as_ref()))
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Env for Vec<(K, V)> {
    fn lookup(&self, name: &str) -> Option<Cow<'_, str>> {
        self.as_slice().lookup(name)
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn lookup(&self, name: &str) -> Option<Cow<'_, str>> {
        self(name).map(Cow::Owned)
    }
}

/// An expansion that failed: the word, the byte offset in it where the lexer
/// stood when it gave up, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to expand `{word}` at offset {position}: {kind}")]
pub struct ExpandError {
    /// The whole word that was being expanded.
    pub word: String,
    /// Byte offset into `word` where the error was detected.
    pub position: usize,
    /// What went wrong.
    pub kind: ExpandErrorKind,
}

/// Why an expansion failed. The messages follow BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandErrorKind {
    /// `'...` without the closing quote.
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    /// `"...` without the closing quote.
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    /// `${...` without the closing brace.
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    /// `${name/pattern` without the second `/`.
    #[error("syntax error: missing '/' in ${{}}")]
    MissingSlash,
    /// `${}`, `${{...}`, `${:...}`.
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    /// A modifier BuildKit does not know, such as `${v:=w}` or `${#v}`.
    #[error("unsupported modifier (`{modifier}`) in substitution")]
    UnsupportedModifier {
        /// The modifier text, such as `:=`.
        modifier: String,
    },
    /// `${#name}`: the length of a variable, which BuildKit does not support
    /// (it reports an unsupported modifier).
    #[error(
        "unsupported modifier in substitution: `${{#{name}}}`, the length of a variable, is not supported by BuildKit"
    )]
    Length {
        /// The variable.
        name: String,
    },
    /// `${name?message}` / `${name:?message}` on an unset (or empty) variable.
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// The message from the word, or BuildKit's default.
        message: String,
    },
    /// A `#`, `%` or `/` pattern with a bad escape.
    #[error("invalid pattern (`{pattern}`) in substitution: invalid escape `\\{escaped}`")]
    InvalidPattern {
        /// The pattern after expansion.
        pattern: String,
        /// The character after the backslash (empty at the end of the pattern).
        escaped: String,
    },
}

/// The full result of an expansion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded word, as one string ([`Lexer::process_word`]).
    pub result: String,
    /// The expanded word split into fields ([`Lexer::process_words`]).
    pub words: Vec<String>,
    /// Variables that were looked up and were set.
    pub matched: BTreeSet<String>,
    /// Variables that were looked up and were not set.
    pub unmatched: BTreeSet<String>,
}

/// BuildKit's shell lexer, configured with its escape character and options.
///
/// ```
/// use kiln_parser::Lexer;
/// let env = vec![("HOME", "/root"), ("EMPTY", "")];
/// let lexer = Lexer::new('\\');
/// assert_eq!(lexer.process_word("${HOME}/x ${EMPTY:-dflt}", &env).unwrap(), "/root/x dflt");
/// assert_eq!(lexer.process_words("a 'b c' $HOME", &env).unwrap(), ["a", "b c", "/root"]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexer {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_process_quotes: bool,
    skip_unset_env: bool,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new('\\')
    }
}

impl Lexer {
    /// A lexer with the given escape character (`\` by default, `` ` `` after
    /// an `# escape=`` ` `` directive) and every option off.
    pub fn new(escape: char) -> Self {
        Self {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Keep quote characters in the output (BuildKit `RawQuotes`).
    pub fn with_raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// Keep escape characters in the output (BuildKit `RawEscapes`).
    pub fn with_raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// Treat quotes as ordinary characters (BuildKit `SkipProcessQuotes`).
    pub fn with_skip_process_quotes(mut self, on: bool) -> Self {
        self.skip_process_quotes = on;
        self
    }

    /// Leave references to unset variables as they were written, `$x` or
    /// `${x...}` (BuildKit `SkipUnsetEnv`).
    pub fn with_skip_unset_env(mut self, on: bool) -> Self {
        self.skip_unset_env = on;
        self
    }

    /// The escape character.
    pub fn escape(&self) -> char {
        self.escape
    }

    /// Expand `word` into one string (BuildKit `ProcessWord`).
    pub fn process_word<E: Env + ?Sized>(
        &self,
        word: &str,
        env: &E,
    ) -> Result<String, ExpandError> {
        self.process_word_with_matches(word, env).map(|e| e.result)
    }

    /// Expand `word` and split it into fields (BuildKit `ProcessWords`).
    pub fn process_words<E: Env + ?Sized>(
        &self,
        word: &str,
        env: &E,
    ) -> Result<Vec<String>, ExpandError> {
        self.process_word_with_matches(word, env).map(|e| e.words)
    }

    /// Expand `word`, giving the string, the fields, and the variables that
    /// were found and not found (BuildKit `ProcessWordWithMatches`).
    pub fn process_word_with_matches<E: Env + ?Sized>(
        &self,
        word: &str,
        env: &E,
    ) -> Result<Expansion, ExpandError> {
        let mut sw = ShellWord {
            lexer: *self,
            src: word,
            pos: 0,
            env,
            raw_escapes: self.raw_escapes,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((result, words)) => Ok(Expansion {
                result,
                words,
                matched: sw.matched,
                unmatched: sw.unmatched,
            }),
            Err(kind) => Err(ExpandError {
                word: word.to_owned(),
                position: sw.pos,
                kind,
            }),
        }
    }
}

/// Field splitting as BuildKit does it while it expands.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    /// A character that splits on whitespace.
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }

    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

struct ShellWord<'a, E: ?Sized> {
    lexer: Lexer,
    src: &'a str,
    pos: usize,
    env: &'a E,
    /// The current raw-escapes mode: `#`/`%`/`/` words switch it on while
    /// they are read, so that the pattern still sees its `\*` escapes.
    raw_escapes: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

type Step<T> = Result<T, ExpandErrorKind>;

impl<E: Env + ?Sized> ShellWord<'_, E> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek()?;
        self.pos += ch.len_utf8();
        Some(ch)
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        match self.env.lookup(name) {
            Some(v) => {
                self.matched.insert(name.to_owned());
                Some(v.into_owned())
            }
            None => {
                self.unmatched.insert(name.to_owned());
                None
            }
        }
    }

    /// Read up to `stop` (consumed) or to the end when `stop` is `None`.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Step<(String, Vec<String>)> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let out = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        out
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> Step<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        let quotes = !self.lexer.skip_process_quotes;
        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.next();
                return Ok((result, words.finish()));
            }
            if ch == '$' {
                let tmp = self.process_dollar()?;
                result.push_str(&tmp);
                words.add_string(&tmp);
            } else if quotes && ch == '\'' {
                let tmp = self.process_single_quote()?;
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
            } else if quotes && ch == '"' {
                let tmp = self.process_double_quote()?;
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
            } else {
                self.next();
                let mut ch = ch;
                if ch == self.lexer.escape {
                    if self.raw_escapes {
                        words.add_raw_char(ch);
                        result.push(ch);
                    }
                    match self.next() {
                        // A trailing escape character is dropped.
                        None => break,
                        Some(escaped) => {
                            ch = escaped;
                            words.add_raw_char(ch);
                        }
                    }
                } else {
                    words.add_char(ch);
                }
                result.push(ch);
            }
        }
        match stop {
            // BuildKit reports a missing stop character with the generic
            // "unexpected end" error; every caller turns it into a more
            // precise one (missing `}` or `/`), so the kind is a placeholder.
            Some(_) => Err(ExpandErrorKind::MissingBrace),
            None => Ok((result, words.finish())),
        }
    }

    fn process_single_quote(&mut self) -> Step<String> {
        let mut result = String::new();
        let open = self.next();
        if self.lexer.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => return Err(ExpandErrorKind::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.lexer.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(ch) => result.push(ch),
            }
        }
    }

    fn process_double_quote(&mut self) -> Step<String> {
        let mut result = String::new();
        let open = self.next();
        if self.lexer.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => return Err(ExpandErrorKind::UnterminatedDoubleQuote),
                Some('"') => {
                    self.next();
                    if self.lexer.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(_) => {
                    let Some(mut ch) = self.next() else { continue };
                    if ch == self.lexer.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            // An escape just before the end is dropped; the
                            // loop then reports the missing quote.
                            None => continue,
                            Some(next)
                                if next == '"' || next == '$' || next == self.lexer.escape =>
                            {
                                self.next();
                                ch = next;
                            }
                            // Before anything else the escape character is
                            // kept literally.
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Step<String> {
        self.next(); // the '$'
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".to_owned());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lexer.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next(); // the '{'
        match self.peek() {
            None => return Err(ExpandErrorKind::MissingBrace),
            Some('{' | '}' | ':') => return Err(ExpandErrorKind::BadSubstitution),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(mut ch) = self.next() else {
            return Err(ExpandErrorKind::MissingBrace);
        };
        let mut modifier = ch.to_string();
        match ch {
            '}' => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lexer.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let null_is_unset = ch == ':';
                if null_is_unset {
                    // BuildKit takes whatever follows the colon as the
                    // modifier and only rejects it after reading the word.
                    ch = self.next().ok_or(ExpandErrorKind::MissingBrace)?;
                    modifier.push(ch);
                }
                let raw = ch == '#' || ch == '%';
                let (word, _) = self
                    .process_stop_on(Some('}'), raw)
                    .map_err(|e| self.at_end_or(e))?;
                let value = self.get_env(&name);
                if self.lexer.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{modifier}{word}}}"));
                }
                let empty_is_unset =
                    |v: &Option<String>| v.is_none() || (null_is_unset && v.as_deref() == Some(""));
                match ch {
                    '-' => Ok(if empty_is_unset(&value) {
                        word
                    } else {
                        value.unwrap_or_default()
                    }),
                    '+' => Ok(if empty_is_unset(&value) {
                        String::new()
                    } else {
                        word
                    }),
                    '?' => match value {
                        None => Err(required(name, word, "is not allowed to be unset")),
                        Some(v) if null_is_unset && v.is_empty() => {
                            Err(required(name, word, "is not allowed to be empty"))
                        }
                        Some(v) => Ok(v),
                    },
                    '#' | '%' => {
                        let value = value.unwrap_or_default();
                        let (greedy, pattern) = match word.strip_prefix(ch) {
                            Some(rest) => (true, rest),
                            None => (false, word.as_str()),
                        };
                        if ch == '%' {
                            trim_suffix(pattern, &value, greedy)
                        } else {
                            trim_prefix(pattern, &value, greedy)
                        }
                    }
                    _ => Err(ExpandErrorKind::UnsupportedModifier { modifier }),
                }
            }
            '/' => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.next();
                }
                let (pattern, _) = self.process_stop_on(Some('/'), true).map_err(|e| {
                    if self.peek().is_none() {
                        ExpandErrorKind::MissingSlash
                    } else {
                        e
                    }
                })?;
                let (replacement, _) = self
                    .process_stop_on(Some('}'), true)
                    .map_err(|e| self.at_end_or(e))?;
                let value = self.get_env(&name);
                if self.lexer.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let glob = Glob::compile(&pattern, true)?;
                let chars: Vec<char> = value.chars().collect();
                Ok(if replace_all {
                    glob.replace_all(&chars, &replacement)
                } else {
                    match glob.find(&chars) {
                        Some((start, end)) => {
                            let mut out: String = chars[..start].iter().collect();
                            out.push_str(&replacement);
                            out.extend(&chars[end..]);
                            out
                        }
                        None => value,
                    }
                })
            }
            // `${#name}`: `#` is read as a special parameter and the name's
            // first character as the modifier.
            c if name == "#" && (c.is_alphabetic() || c == '_') => {
                let mut rest = self.process_name();
                rest.insert(0, c);
                Err(ExpandErrorKind::Length { name: rest })
            }
            _ => Err(ExpandErrorKind::UnsupportedModifier { modifier }),
        }
    }

    /// BuildKit turns any error inside `${...}` into "missing `}`" when the
    /// input ran out.
    fn at_end_or(&self, e: ExpandErrorKind) -> ExpandErrorKind {
        if self.peek().is_none() {
            ExpandErrorKind::MissingBrace
        } else {
            e
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(d) = self.peek().filter(|c| is_digit(*c)) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && is_special_param(ch) {
                self.next();
                name.push(ch);
                return name;
            }
            if !ch.is_alphabetic() && !is_digit(ch) && ch != '_' {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }
}

fn required(name: String, word: String, default: &str) -> ExpandErrorKind {
    let message = if word.is_empty() {
        default.to_owned()
    } else {
        word
    };
    ExpandErrorKind::Required { name, message }
}

/// Go's `unicode.IsDigit` is the `Nd` category; Rust's `is_numeric` is all of
/// `N`. They agree on every decimal digit, which is what names contain.
fn is_digit(ch: char) -> bool {
    ch.is_ascii_digit() || (!ch.is_ascii() && ch.is_numeric())
}

/// POSIX special parameters: expanded (to nothing, they are never set) but
/// never part of a longer name.
fn is_special_param(ch: char) -> bool {
    matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Step<String> {
    let glob = Glob::compile(pattern, greedy)?;
    let chars: Vec<char> = value.chars().collect();
    Ok(match glob.match_at(&chars, 0) {
        Some(end) => chars[end..].iter().collect(),
        None => value.to_owned(),
    })
}

/// Regular expressions cannot find the shortest rightmost match, so BuildKit
/// reverses both the value and the pattern (keeping `\x` escapes in order)
/// and trims a prefix instead.
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Step<String> {
    let reversed_value: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed_value, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; chars.len()];
    let last = chars.len().saturating_sub(1);
    let mut i = 0;
    while i < chars.len() {
        let out_idx = last - i;
        if chars[i] == '\\' && i != last {
            out[out_idx - 1] = '\\';
            out[out_idx] = chars[i + 1];
            i += 2;
        } else {
            out[out_idx] = chars[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// One element of a compiled shell pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`: any one character but a newline (Go's `.`).
    Any,
    /// `*`: any run of characters without a newline (Go's `.*` / `.*?`).
    Star,
}

/// A shell pattern compiled the way BuildKit turns it into a Go regular
/// expression, matched with the same leftmost-first preference a backtracking
/// engine has: greedy stars try the longest run first, lazy ones the shortest.
/// Failed (token, position) pairs are remembered, so matching stays
/// polynomial whatever the pattern.
struct Glob {
    toks: Vec<Tok>,
    greedy: bool,
}

impl Glob {
    fn compile(pattern: &str, greedy: bool) -> Step<Self> {
        let mut toks = Vec::new();
        let mut it = pattern.chars().peekable();
        while let Some(ch) = it.next() {
            match ch {
                // `**` means the same as `*` (for both greedy and lazy
                // preference), and one star means fewer states.
                '*' if toks.last() == Some(&Tok::Star) => {}
                '*' => toks.push(Tok::Star),
                '?' => toks.push(Tok::Any),
                '\\' => {
                    // `\}` and `\/` were needed to write the pattern inside
                    // `${}`; the backslash is not part of the pattern.
                    if matches!(it.peek(), Some('}' | '/')) {
                        continue;
                    }
                    match it.next() {
                        Some(c @ ('*' | '?' | '\\')) => toks.push(Tok::Lit(c)),
                        other => {
                            return Err(ExpandErrorKind::InvalidPattern {
                                pattern: pattern.to_owned(),
                                escaped: other.map(String::from).unwrap_or_default(),
                            });
                        }
                    }
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Self { toks, greedy })
    }

    /// The end of the preferred match that starts at `start`, if any.
    fn match_at(&self, text: &[char], start: usize) -> Option<usize> {
        self.step(text, start, &mut self.table(text))
    }

    /// The states of the match after state `(ti, pos)`, most preferred first.
    /// A star is "one more character" or "done"; greedy stars prefer the
    /// former, lazy ones the latter, which is how a backtracking engine
    /// orders them.
    fn successors(&self, text: &[char], ti: usize, pos: usize) -> [Option<(usize, usize)>; 2] {
        let ch = text.get(pos);
        match self.toks.get(ti) {
            None => [None, None],
            Some(Tok::Lit(c)) => [(ch == Some(c)).then_some((ti + 1, pos + 1)), None],
            Some(Tok::Any) => [
                ch.is_some_and(|c| *c != '\n').then_some((ti + 1, pos + 1)),
                None,
            ],
            Some(Tok::Star) => {
                let more = ch.is_some_and(|c| *c != '\n').then_some((ti, pos + 1));
                let done = Some((ti + 1, pos));
                if self.greedy {
                    [more, done]
                } else {
                    [done, more]
                }
            }
        }
    }

    /// A depth-first search in preference order, so the first match found
    /// is the one a backtracking engine returns. It keeps its own stack
    /// (patterns and values can be long) and records states whose every
    /// continuation failed, so no state is explored twice: the work is at
    /// most (tokens x characters).
    fn step(&self, text: &[char], start: usize, failed: &mut [bool]) -> Option<usize> {
        let key = |ti: usize, pos: usize| ti * (text.len() + 1) + pos;
        if failed[key(0, start)] {
            return None;
        }
        // (token, position, how many successors were tried)
        let mut stack: Vec<(usize, usize, usize)> = vec![(0, start, 0)];
        while let Some(top) = stack.last_mut() {
            let (ti, pos, tried) = *top;
            if ti == self.toks.len() {
                return Some(pos);
            }
            let next = self.successors(text, ti, pos);
            match next.get(tried) {
                Some(candidate) => {
                    top.2 += 1;
                    if let Some((nt, np)) = *candidate
                        && !failed[key(nt, np)]
                    {
                        stack.push((nt, np, 0));
                    }
                }
                None => {
                    failed[key(ti, pos)] = true;
                    stack.pop();
                }
            }
        }
        None
    }

    /// Leftmost match anywhere in `text`, as `(start, end)`.
    /// `failed` is the table of failed states; whether a state fails does not
    /// depend on where the search started, so one table serves every search
    /// over the same text.
    fn find_from(&self, text: &[char], from: usize, failed: &mut [bool]) -> Option<(usize, usize)> {
        (from..=text.len()).find_map(|s| self.step(text, s, failed).map(|e| (s, e)))
    }

    fn table(&self, text: &[char]) -> Vec<bool> {
        vec![false; (self.toks.len() + 1) * (text.len() + 1)]
    }

    fn find(&self, text: &[char]) -> Option<(usize, usize)> {
        self.find_from(text, 0, &mut self.table(text))
    }

    /// Go's `Regexp.ReplaceAllString`: non-overlapping matches left to right,
    /// an empty match right after a previous match is not replaced, and the
    /// replacement is a template in which `$0`/`${0}` is the match, `$$` is `$`
    /// and any other `$name` is empty (the pattern has no groups).
    fn replace_all(&self, text: &[char], template: &str) -> String {
        let mut out = String::new();
        let mut last_end = 0;
        let mut search = 0;
        let mut failed = self.table(text);
        while search <= text.len() {
            let Some((a, b)) = self.find_from(text, search, &mut failed) else {
                break;
            };
            out.extend(&text[last_end..a]);
            if b > last_end || a == 0 {
                let matched: String = text[a..b].iter().collect();
                expand_template(&mut out, template, &matched);
            }
            last_end = b;
            search = if search + 1 > b { search + 1 } else { b };
        }
        out.extend(&text[last_end.min(text.len())..]);
        out
    }
}

/// Go's `Regexp.expand` for a pattern without capture groups.
fn expand_template(out: &mut String, template: &str, matched: &str) {
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (brace, body) = match rest.strip_prefix('{') {
            Some(b) => (true, b),
            None => (false, rest),
        };
        let name_len: usize = body
            .chars()
            .take_while(|c| c.is_alphabetic() || is_digit(*c) || *c == '_')
            .map(char::len_utf8)
            .sum();
        if name_len == 0 || (brace && !body[name_len..].starts_with('}')) {
            out.push('$');
            continue;
        }
        let name = &body[..name_len];
        rest = &body[name_len + usize::from(brace)..];
        // Only group 0 exists; names that are all digits are group numbers
        // (Go gives up on numbers of 1e8 and more and treats them as names).
        if name.bytes().all(|b| b.is_ascii_digit()) && name.trim_start_matches('0').is_empty() {
            out.push_str(matched);
        }
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_pattern_keeps_escapes_in_order() {
        // Cases from BuildKit's TestReversePattern.
        assert_eq!(reverse_pattern("a\\*c"), "c\\*a");
        assert_eq!(reverse_pattern("\\\\\\ab"), "b\\a\\\\");
        assert_eq!(reverse_pattern("ab\\"), "\\ba");
        assert_eq!(reverse_pattern("👽\\🚀🖖"), "🖖\\🚀👽");
        assert_eq!(reverse_pattern("\\\\b"), "b\\\\");
        assert_eq!(reverse_pattern(""), "");
    }

    #[test]
    fn invalid_pattern_escapes_are_errors() {
        for p in ["\\", "\\x", "\\\\\\"] {
            assert!(Glob::compile(p, true).is_err(), "{p:?}");
        }
        assert!(Glob::compile("(()[]{\\}^$.\\*\\?|\\\\", true).is_ok());
    }

    #[test]
    fn template_expansion_follows_go() {
        let mut s = String::new();
        expand_template(&mut s, "<$0|${0}|$$|$1|${x}|${|$>", "m");
        assert_eq!(s, "<m|m|$|||${|$>");
    }
}
