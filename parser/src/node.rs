//! The first layer: BuildKit's `parser.Parse`, reproduced. It turns the text
//! into one [`Node`] per instruction (keyword, flags, arguments, heredocs,
//! lines) with exactly the rules of BuildKit's Dockerfile frontend:
//! directives, line continuations, comments and blank lines inside a
//! continuation, per-instruction argument splitting, heredoc detection.
//!
//! It does not know which instructions exist or which flags they take; that
//! is the second layer ([`crate::parse`]). The differential test compares
//! this layer with BuildKit's own Go parser.

use serde::Serialize;

use crate::error::{ErrorKind, ParseError};
use crate::json_array::{JsonArray, parse_json_array};
use crate::quote::go_quote;
use crate::span::{Position, Span};

/// A parser directive (`# syntax=`, `# escape=`, `# check=`) from the top
/// of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directive {
    /// The name, lower case.
    pub name: String,
    /// The value as written (surrounding whitespace removed).
    pub value: String,
    /// The directive's line.
    pub span: Span,
}

/// A heredoc attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The delimiter word, with its quotes removed.
    pub name: String,
    /// The file descriptor before `<<` (`3<<EOF`), 0 when absent.
    pub file_descriptor: u64,
    /// False when any part of the delimiter was quoted: the body is then
    /// not subject to variable expansion.
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the body and the terminator.
    pub chomp: bool,
    /// The body exactly as read, every line with its line ending; leading
    /// tabs are NOT yet removed for `chomp` (see [`Heredoc::chomped_content`]).
    pub content: String,
}

impl Heredoc {
    /// The body with leading tabs removed from every line when `chomp` is set
    /// (BuildKit's `ChompHeredocContent`), else the body as is.
    pub fn chomped_content(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        self.content
            .split_inclusive('\n')
            .map(|l| l.trim_start_matches('\t'))
            .collect()
    }
}

/// A warning the parser found (BuildKit warns about these, it does not fail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// What is wrong.
    pub message: String,
    /// The line of the instruction it is about.
    pub line: usize,
}

/// One instruction as BuildKit's parser sees it (its `Node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The keyword as written (`RUN`, `run`, `Copy`...).
    pub keyword: String,
    /// The leading `--flags`, after quote and escape removal, as BuildKit
    /// stores them (`--from=build`).
    pub flags: Vec<String>,
    /// Where the keyword is (usually `span.start`; later when the
    /// instruction begins with empty continuation lines).
    pub keyword_position: Position,
    /// Where each flag starts, parallel to `flags`.
    pub flag_positions: Vec<Position>,
    /// The arguments, split by the keyword's rules (see the conformance
    /// README); for ONBUILD empty, the trigger is in `sub`.
    pub args: Vec<String>,
    /// Where the arguments start (after the flags).
    pub args_position: Position,
    /// The arguments came from a JSON array (exec form).
    pub json: bool,
    /// ONBUILD's trigger instruction.
    pub sub: Option<Box<Node>>,
    /// The logical line: continuations joined, comments dropped, the first
    /// line's leading whitespace removed.
    pub original: String,
    /// Heredocs, in the order of their markers.
    pub heredocs: Vec<Heredoc>,
    /// The comment lines right above the instruction, `#` and surrounding
    /// whitespace removed (BuildKit's `PrevComment`, used for stage and ARG
    /// descriptions); an empty `#` line restarts the list.
    pub comments: Vec<String>,
    /// From the keyword to the end of the last line (the heredoc terminator
    /// when there are heredocs).
    pub span: Span,
}

impl Node {
    /// BuildKit's `Node.Dump()` for this instruction, without the enclosing
    /// parentheses: `copy ["--from=a"] "x" "/y"`.
    pub fn dump(&self) -> String {
        let mut s = self.keyword.to_lowercase();
        if !self.flags.is_empty() {
            let flags: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(" [");
            s.push_str(&flags.join(" "));
            s.push(']');
        }
        if let Some(sub) = &self.sub {
            s.push_str(" (");
            s.push_str(&sub.dump());
            s.push(')');
        } else if self.keyword_is("onbuild") {
            // `ONBUILD` with nothing after it has no argument node at all.
        } else {
            for a in &self.args {
                s.push(' ');
                s.push_str(&go_quote(a));
            }
        }
        s.trim_matches(char::is_whitespace).to_string()
    }

    /// Whether the keyword is `k` (lower case), ignoring case.
    pub fn keyword_is(&self, k: &str) -> bool {
        self.keyword.eq_ignore_ascii_case(k)
    }
}

/// The whole file as BuildKit's parser sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFile {
    /// The parser directives found before the first instruction.
    pub directives: Vec<Directive>,
    /// The escape character in effect (`\` or `` ` ``).
    pub escape: char,
    /// The instructions, in source order.
    pub nodes: Vec<Node>,
    /// Empty continuation lines and the like.
    pub warnings: Vec<Warning>,
}

impl NodeFile {
    /// BuildKit's `AST.Dump() + "\n"`: the text of the conformance `result`
    /// files.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push('(');
            s.push_str(&n.dump());
            s.push_str(")\n");
        }
        s
    }
}

/// Go's `unicode.IsSpace`, which equals Rust's `char::is_whitespace`.
fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// `unicode.IsSpace(rune(b))` on a single byte, as BuildKit's flag and
/// HEALTHCHECK splitters do (so the UTF-8 continuation bytes 0x85 and 0xA0
/// count as spaces there, exactly as in BuildKit).
fn is_space_byte(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0)
}

/// The `[\t\v\f\r ]` class of BuildKit's `reWhitespace`/`tokenWhitespace`.
fn is_token_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{0b}' | '\u{0c}' | '\r' | ' ')
}

/// Go regexp's `\s`: `[\t\n\f\r ]`.
fn is_re_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{0c}' | '\r' | ' ')
}

/// `reWhitespace.Split(s, -1)` (or `n` pieces when `limit` is set).
pub(crate) fn split_token_ws(s: &str, limit: Option<usize>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        if limit.is_some_and(|n| out.len() + 1 == n) {
            out.push(rest.to_string());
            break;
        }
        match rest.find(is_token_ws) {
            None => {
                out.push(rest.to_string());
                break;
            }
            Some(i) => {
                out.push(rest[..i].to_string());
                let after = &rest[i..];
                rest = after.trim_start_matches(is_token_ws);
            }
        }
    }
    out
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The directive state machine of BuildKit's `DirectiveParser`.
struct Directives {
    escape: char,
    done: bool,
    seen: Vec<String>,
}

impl Directives {
    /// Looks at one line; `Ok(Some((name, value)))` for a directive.
    fn possible(&mut self, line: &str) -> Result<Option<(String, String)>, ErrorKind> {
        if self.done {
            return Ok(None);
        }
        let Some((key, value)) = match_directive(line) else {
            self.done = true;
            return Ok(None);
        };
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&key) {
            return Err(ErrorKind::DuplicateDirective(key));
        }
        self.seen.push(key.clone());
        if key == "escape" {
            match value.as_str() {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                _ => return Err(ErrorKind::BadEscape(value)),
            }
        }
        Ok(Some((key, value)))
    }
}

/// `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`, by hand.
fn match_directive(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix('#')?.trim_start_matches(is_re_space);
    if !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let key_end = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let key = &rest[..key_end];
    let rest = rest[key_end..]
        .trim_start_matches(is_re_space)
        .strip_prefix('=')?;
    if rest.is_empty() || rest.contains('\n') {
        return None;
    }
    let value = rest.trim_matches(is_re_space);
    if value.is_empty() {
        // All whitespace: `.+?` takes the last whitespace character.
        let last = rest.chars().last()?;
        return Some((key.to_string(), last.to_string()));
    }
    Some((key.to_string(), value.to_string()))
}

/// BuildKit's `lineContinuationRegex`: `([^E])E[ \t]*$|^E[ \t]*$` with E the
/// escape character. Returns the line without the continuation and whether
/// the logical line ends here.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let t = line.trim_end_matches([' ', '\t']);
    if let Some(before) = t.strip_suffix(escape)
        && (before.is_empty() || !before.ends_with(escape))
    {
        return (before, false);
    }
    (line, true)
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    line.trim_start_matches(is_space).starts_with('#')
}

/// A piece of the logical line and where it came from.
struct Segment {
    logical_start: usize,
    line: usize,
    /// Byte offset of the piece within its physical line.
    byte_in_line: usize,
}

/// Maps byte offsets of a logical line back to source positions.
struct LineMap<'a> {
    lines: &'a [&'a str],
    segments: Vec<Segment>,
}

impl LineMap<'_> {
    fn position(&self, logical: usize) -> Position {
        let seg = self
            .segments
            .iter()
            .rev()
            .find(|s| s.logical_start <= logical)
            .or(self.segments.first());
        let Some(seg) = seg else {
            return Position::new(1, 1);
        };
        let text = self.lines.get(seg.line - 1).copied().unwrap_or("");
        let byte = (seg.byte_in_line + logical - seg.logical_start).min(text.len());
        let column = text.char_indices().take_while(|(i, _)| *i < byte).count() + 1;
        Position::new(seg.line, column)
    }
}

/// Parses a Dockerfile the way BuildKit's `parser.Parse` does.
///
/// Fails on what BuildKit's parser fails on: no instruction, a bad or
/// repeated directive, a legacy `ENV`/`LABEL` without value, a `key=value`
/// list with a bare word, a JSON array with a non-string element, an
/// unterminated heredoc, an overlong line.
pub fn parse_nodes(src: &str) -> Result<NodeFile, ParseError> {
    let body = src.strip_prefix('\u{feff}').unwrap_or(src);
    let lines: Vec<&str> = body.split_inclusive('\n').collect();
    let err_at = |kind: ErrorKind, line: usize, column: usize, width: usize| {
        ParseError::new(kind, src, line, column, width)
    };

    for (i, l) in lines.iter().enumerate() {
        if l.len() > 65_536 || (!l.ends_with('\n') && l.len() >= 65_536) {
            return Err(err_at(ErrorKind::LineTooLong, i + 1, 1, 1));
        }
    }

    let mut d = Directives {
        escape: '\\',
        done: false,
        seen: Vec::new(),
    };
    let mut directives = Vec::new();
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    let mut i = 0;
    let mut current_line = 0;
    let mut comments: Vec<String> = Vec::new();

    while i < lines.len() {
        let raw = lines[i];
        i += 1;
        if is_comment(raw) {
            // BuildKit drops the first byte (the `#` unless indented).
            let mut rest = raw.chars();
            rest.next();
            let comment = rest.as_str().trim();
            if comment.is_empty() {
                comments.clear();
            } else {
                comments.push(comment.to_string());
            }
        }
        let token = trim_newline(raw).trim_start_matches(is_space);
        let lead = trim_newline(raw).len() - token.len();
        match d.possible(token) {
            Ok(Some((name, value))) => {
                comments.pop();
                let len = token.chars().count();
                let span = Span::new(
                    Position::new(current_line + 1, 1),
                    Position::new(current_line + 1, len + 1),
                );
                directives.push(Directive { name, value, span });
            }
            Ok(None) => {}
            Err(kind) => return Err(err_at(kind, current_line + 1, 1, token.chars().count())),
        }
        let processed = if is_comment(token) { "" } else { token };
        current_line += 1;
        let start_line = current_line;
        let (first, mut eol) = trim_continuation(processed, d.escape);
        if eol && first.is_empty() {
            continue;
        }
        let mut logical = first.to_string();
        // Empty pieces get no segment, so positions map to real text.
        let mut segments = Vec::new();
        if !first.is_empty() {
            segments.push(Segment {
                logical_start: 0,
                line: start_line,
                byte_in_line: lead,
            });
        }
        let mut has_empty_continuation = false;
        while !eol && i < lines.len() {
            let raw = lines[i];
            i += 1;
            let token = trim_newline(raw);
            if let Err(kind) = d.possible(token) {
                return Err(err_at(kind, current_line + 1, 1, token.chars().count()));
            }
            current_line += 1;
            if is_comment(raw) {
                continue;
            }
            if token.trim_start_matches(is_space).is_empty() {
                has_empty_continuation = true;
                continue;
            }
            let (piece, e) = trim_continuation(token, d.escape);
            if !piece.is_empty() {
                segments.push(Segment {
                    logical_start: logical.len(),
                    line: current_line,
                    byte_in_line: 0,
                });
            }
            logical.push_str(piece);
            eol = e;
        }
        if has_empty_continuation {
            warnings.push(Warning {
                message: format!("empty continuation line found in: {logical}"),
                line: current_line,
            });
        }
        if segments.is_empty() {
            segments.push(Segment {
                logical_start: 0,
                line: start_line,
                byte_in_line: lead,
            });
        }
        let map = LineMap {
            lines: &lines,
            segments,
        };
        let mut node = node_from_line(&logical, 0, d.escape, &map).map_err(|(kind, at)| {
            let p = map.position(at);
            err_at(kind, p.line, p.column, 1)
        })?;

        if can_contain_heredoc(&node) && logical.contains("<<") {
            let docs = heredocs_from_line(&logical).map_err(|kind| {
                let p = map.position(0);
                err_at(kind, p.line, p.column, 1)
            })?;
            for mut doc in docs {
                let mut terminated = false;
                while i < lines.len() {
                    let raw = lines[i];
                    i += 1;
                    current_line += 1;
                    let mut t = trim_newline(raw);
                    if doc.chomp {
                        t = t.trim_start_matches('\t');
                    }
                    if t == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                }
                if !terminated {
                    let p = node.span.start;
                    let at = logical
                        .find(&format!("<<{}", doc.name))
                        .or_else(|| logical.find("<<"));
                    let p = at.map_or(p, |a| map.position(a));
                    return Err(err_at(
                        ErrorKind::UnterminatedHeredoc(doc.name.clone()),
                        p.line,
                        p.column,
                        2 + doc.name.chars().count(),
                    ));
                }
                node.heredocs.push(doc);
            }
        }
        // BuildKit's start line is the instruction's first line, even when
        // the keyword itself sits on a later (continuation) line.
        if node.span.start.line != start_line {
            node.span.start = Position::new(start_line, 1);
        }
        let last = trim_newline(lines.get(current_line - 1).copied().unwrap_or(""));
        node.span.end = Position::new(current_line, last.chars().count() + 1);
        node.comments = std::mem::take(&mut comments);
        nodes.push(node);
    }

    if nodes.is_empty() {
        return Err(err_at(ErrorKind::Empty, current_line.max(1), 1, 1));
    }
    Ok(NodeFile {
        directives,
        escape: d.escape,
        nodes,
        warnings,
    })
}

/// BuildKit's `newNodeFromLine`: split keyword and flags, then dispatch on
/// the keyword. `base` is the offset of `line` in the logical line (for
/// ONBUILD's trigger). Errors carry the logical offset they are about.
fn node_from_line(
    line: &str,
    base: usize,
    escape: char,
    map: &LineMap<'_>,
) -> Result<Node, (ErrorKind, usize)> {
    let lead = line.len() - line.trim_start_matches(is_space).len();
    let trimmed = line.trim_matches(is_space);
    let (keyword, rest, rest_off) = match trimmed.find(is_token_ws) {
        None => (trimmed, "", trimmed.len()),
        Some(p) => {
            let after = trimmed[p..].trim_start_matches(is_token_ws);
            (&trimmed[..p], after, trimmed.len() - after.len())
        }
    };
    let (remaining, flags) = extract_builder_flags(rest);
    let flag_positions = flags
        .iter()
        .map(|(_, off)| map.position(base + lead + rest_off + off))
        .collect();
    let flags: Vec<String> = flags.into_iter().map(|(f, _)| f).collect();
    let args_lead = remaining.len() - remaining.trim_start_matches(is_space).len();
    let args_off = base + lead + rest_off + (rest.len() - remaining.len()) + args_lead;
    let args_text = remaining.trim_matches(is_space);
    let mut node = Node {
        keyword: keyword.to_string(),
        flags,
        flag_positions,
        args: Vec::new(),
        args_position: map.position(args_off),
        json: false,
        sub: None,
        original: line.to_string(),
        heredocs: Vec::new(),
        comments: Vec::new(),
        keyword_position: map.position(base + lead),
        span: Span::new(map.position(base + lead), Position::default()),
    };
    match keyword.to_ascii_lowercase().as_str() {
        "add" | "copy" | "volume" => match parse_json_array(args_text) {
            JsonArray::Strings(v) => {
                node.args = v;
                node.json = true;
            }
            JsonArray::NotStrings => return Err((ErrorKind::JsonNotStrings, args_off)),
            JsonArray::Invalid | JsonArray::Unterminated => {
                node.args = whitespace_delimited(args_text);
            }
        },
        "run" | "cmd" | "entrypoint" | "shell" => {
            let (args, json) = maybe_json(args_text).map_err(|k| (k, args_off))?;
            node.args = args;
            node.json = json;
        }
        "from" | "expose" => node.args = whitespace_delimited(args_text),
        "maintainer" | "user" | "workdir" | "stopsignal" => {
            if !args_text.is_empty() {
                node.args = vec![args_text.to_string()];
            }
        }
        "arg" => node.args = parse_words(args_text, escape),
        "env" | "label" => {
            node.args = parse_name_val(args_text, &keyword.to_ascii_uppercase(), escape)
                .map_err(|k| (k, args_off))?
        }
        "healthcheck" => {
            let bytes = args_text.as_bytes();
            let sep = bytes
                .iter()
                .position(|b| is_space_byte(*b))
                .unwrap_or(bytes.len());
            let next = bytes[sep..]
                .iter()
                .position(|b| !is_space_byte(*b))
                .map_or(bytes.len(), |p| sep + p);
            if sep > 0 {
                node.args.push(lossy(&bytes[..sep]));
                let (args, json) = maybe_json(&lossy(&bytes[next..])).map_err(|k| (k, args_off))?;
                node.args.extend(args);
                node.json = json;
            }
        }
        "onbuild" => {
            if !args_text.is_empty() {
                let sub = node_from_line(args_text, args_off, escape, map)?;
                node.sub = Some(Box::new(sub));
            }
        }
        // An unknown keyword gets one empty argument, as in BuildKit
        // (`parseIgnore`); the second layer turns it into an error.
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

fn whitespace_delimited(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        Vec::new()
    } else {
        split_token_ws(rest, None)
    }
}

/// `parseMaybeJSON`: a JSON array of strings, or the whole text as one arg.
fn maybe_json(rest: &str) -> Result<(Vec<String>, bool), ErrorKind> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json_array(rest) {
        JsonArray::Strings(v) => Ok((v, true)),
        JsonArray::NotStrings => Err(ErrorKind::JsonNotStrings),
        JsonArray::Invalid | JsonArray::Unterminated => Ok((vec![rest.to_string()], false)),
    }
}

/// BuildKit's `extractBuilderFlags`: the leading `--flags` (quotes and `\`
/// escapes removed, working byte by byte as BuildKit does) and the rest of
/// the line. Returns (rest, [(flag, byte offset of its start)]).
fn extract_builder_flags(line: &str) -> (String, Vec<(String, usize)>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let b = line.as_bytes();
    let mut words: Vec<(String, usize)> = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut word_start = 0;
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= b.len() {
        let ch = if pos < b.len() { b[pos] } else { 0 };
        if phase == Phase::Spaces {
            if pos == b.len() {
                break;
            }
            if is_space_byte(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == b.len() || b[pos + 1] != b'-' {
                return (lossy(&b[pos..]), words);
            }
            phase = Phase::Word;
            word_start = pos;
        }
        if pos == b.len() {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push((word, word_start));
            }
            break;
        }
        if phase == Phase::Word {
            if is_space_byte(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    return (lossy(&b[pos..]), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push((std::mem::take(&mut word), word_start));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            let mut c = ch;
            if c == b'\\' {
                if pos + 1 == b.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                c = b[pos];
            }
            // `word += string(rune(byte))`: a byte, not a UTF-8 sequence.
            word.push(char::from(c));
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        let mut c = ch;
        if c == b'\\' {
            if pos + 1 == b.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            c = b[pos];
        }
        word.push(char::from(c));
        pos += 1;
    }
    (String::new(), words)
}

/// BuildKit's `parseWords`: quote-aware words with quotes and escapes kept.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = if at_end { '\0' } else { chars[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

/// BuildKit's `parseNameVal` for ENV and LABEL: (key, value, separator)
/// triples, flattened.
fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Vec<String>, ErrorKind> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        let parts = split_token_ws(rest, Some(2));
        if parts.len() < 2 {
            return Err(ErrorKind::MissingValue(key.to_string()));
        }
        return Ok(vec![parts[0].clone(), parts[1].clone(), String::new()]);
    }
    let mut out = Vec::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(ErrorKind::MissingEquals(w));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

/// `canContainHeredoc`: RUN, COPY, ADD (also as ONBUILD trigger), not JSON.
fn can_contain_heredoc(node: &Node) -> bool {
    let node = match &node.sub {
        Some(sub) if node.keyword_is("onbuild") => sub,
        _ => node,
    };
    ["run", "copy", "add"].iter().any(|k| node.keyword_is(k)) && !node.json
}

/// BuildKit's `heredocsFromLine`: lex the logical line into words (raw
/// quotes and escapes, unset variables kept) and take every word that is a
/// heredoc marker.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, ErrorKind> {
    let Some(words) = shell_words(line, true, true) else {
        return Ok(Vec::new());
    };
    let mut docs = Vec::new();
    for w in words {
        if let Some(doc) = parse_heredoc_marker(&w)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// BuildKit's `ParseHeredoc`: `^(\d*)<<(-?)([^<]*)$`, then the delimiter
/// word with and without quote removal to decide `expand`.
pub fn parse_heredoc_marker(word: &str) -> Result<Option<Heredoc>, ErrorKind> {
    let digits = word.len() - word.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let Some(after) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, after),
    };
    if rest.contains('<') || rest.is_empty() {
        return Ok(None);
    }
    let fd = word[..digits].parse::<u64>().unwrap_or(0);
    let Some(cooked) = shell_words(rest, false, false) else {
        return Err(ErrorKind::BadHeredoc(word.to_string()));
    };
    if cooked.len() != 1 {
        return Ok(None);
    }
    let Some(raw) = shell_words(rest, true, false) else {
        return Err(ErrorKind::BadHeredoc(word.to_string()));
    };
    if raw.len() != 1 {
        return Err(ErrorKind::BadHeredoc(word.to_string()));
    }
    let quotes = |s: &str| s.chars().filter(|c| *c == '\'' || *c == '"').count();
    Ok(Some(Heredoc {
        name: cooked[0].clone(),
        file_descriptor: fd,
        expand: quotes(&cooked[0]) == quotes(&raw[0]),
        chomp,
        content: String::new(),
    }))
}

/// BuildKit's shell lexer `ProcessWords` with an empty environment and
/// `SkipUnsetEnv` (so `$x` and `${x...}` come back as written), as the
/// parser uses it to find heredoc markers. `raw_quotes`/`raw_escapes` keep
/// quotes and escape characters in the words. `None` on a lexing error
/// (unterminated quote, `${`, bad substitution), where BuildKit gets no
/// words at all.
fn shell_words(s: &str, raw_quotes: bool, raw_escapes: bool) -> Option<Vec<String>> {
    let mut lx = Lexer {
        chars: s.chars().collect(),
        pos: 0,
        raw_quotes,
        raw_escapes,
    };
    lx.process_stop_on(None, raw_escapes)
        .map(|(_, words)| words)
}

/// Go's `wordsStruct`: whitespace from plain text and `$` expansions splits
/// words, quoted text does not; empty words are dropped.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if is_space(c) {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(c);
        }
    }

    fn add_raw_char(&mut self, c: char) {
        self.word.push(c);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
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

/// The state of [`shell_words`]: BuildKit's `shellWord` over characters.
struct Lexer {
    chars: Vec<char>,
    pos: usize,
    raw_quotes: bool,
    raw_escapes: bool,
}

impl Lexer {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// `processStopOn`: up to `stop` (consumed) or the end.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Option<(String, Vec<String>)> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let out = self.stop_on(stop);
        self.raw_escapes = saved;
        out
    }

    fn stop_on(&mut self, stop: Option<char>) -> Option<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Some((result, words.finish()));
            }
            match c {
                '$' => {
                    let t = self.dollar()?;
                    result.push_str(&t);
                    words.add_string(&t);
                }
                '\'' | '"' => {
                    let t = if c == '"' {
                        self.double_quote()?
                    } else {
                        self.single_quote()?
                    };
                    result.push_str(&t);
                    words.add_raw_string(&t);
                }
                _ => {
                    self.pos += 1;
                    let mut ch = c;
                    if c == '\\' {
                        if self.raw_escapes {
                            words.add_raw_char(c);
                            result.push(c);
                        }
                        match self.next() {
                            None => break,
                            Some(n) => {
                                words.add_raw_char(n);
                                ch = n;
                            }
                        }
                    } else {
                        words.add_char(c);
                    }
                    result.push(ch);
                }
            }
        }
        if stop.is_some() {
            return None;
        }
        Some((result, words.finish()))
    }

    fn single_quote(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = String::new();
        if self.raw_quotes {
            out.push('\'');
        }
        loop {
            match self.next()? {
                '\'' => {
                    if self.raw_quotes {
                        out.push('\'');
                    }
                    return Some(out);
                }
                c => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = String::new();
        if self.raw_quotes {
            out.push('"');
        }
        loop {
            match self.peek()? {
                '"' => {
                    self.pos += 1;
                    if self.raw_quotes {
                        out.push('"');
                    }
                    return Some(out);
                }
                '$' => {
                    let t = self.dollar()?;
                    out.push_str(&t);
                }
                _ => {
                    let mut ch = self.next()?;
                    if ch == '\\' {
                        if self.raw_escapes {
                            out.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some('"' | '$' | '\\') => ch = self.next()?,
                            Some(_) => {}
                        }
                    }
                    out.push(ch);
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let is_digit = |c: char| c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric());
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|d| is_digit(*d)) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return c.to_string();
            }
            if !(c.is_alphabetic() || is_digit(c) || c == '_') {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    /// `processDollar` with every variable unset and `SkipUnsetEnv`.
    fn dollar(&mut self) -> Option<String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            return Some(format!("${name}"));
        }
        self.pos += 1;
        match self.peek() {
            None | Some('{' | '}' | ':') => return None,
            Some(_) => {}
        }
        let name = self.name();
        match self.next()? {
            '}' => Some(format!("${{{name}}}")),
            ':' => {
                let op = self.next()?;
                let (word, _) = self.process_stop_on(Some('}'), op == '#' || op == '%')?;
                Some(format!("${{{name}:{op}{word}}}"))
            }
            op @ ('+' | '-' | '?' | '#' | '%') => {
                let (word, _) = self.process_stop_on(Some('}'), op == '#' || op == '%')?;
                Some(format!("${{{name}{op}{word}}}"))
            }
            '/' => {
                if self.peek() == Some('/') {
                    self.pos += 1;
                }
                let (pattern, _) = self.process_stop_on(Some('/'), true)?;
                let (replacement, _) = self.process_stop_on(Some('}'), true)?;
                Some(format!("${{{name}/{pattern}/{replacement}}}"))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_byte_wise_like_buildkit() {
        let (rest, flags) = extract_builder_flags("--chown=\u{e0} a b");
        assert_eq!(flags[0].0, "--chown=\u{c3}");
        assert_eq!(rest, "a b");
        let (rest, flags) = extract_builder_flags("--a=\"b c\" -- --x y");
        assert_eq!(
            flags.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
            ["--a=b c"]
        );
        assert_eq!(rest, " --x y");
    }

    #[test]
    fn continuation_regex() {
        assert_eq!(trim_continuation("a \\  ", '\\'), ("a ", false));
        assert_eq!(trim_continuation("\\", '\\'), ("", false));
        assert_eq!(trim_continuation("a \\\\", '\\'), ("a \\\\", true));
        assert_eq!(trim_continuation("a `", '`'), ("a ", false));
    }

    #[test]
    fn directive_regex() {
        assert_eq!(
            match_directive("# escape = `"),
            Some(("escape".into(), "`".into()))
        );
        assert_eq!(
            match_directive("#syntax=docker/dockerfile:1 "),
            Some(("syntax".into(), "docker/dockerfile:1".into()))
        );
        assert_eq!(
            match_directive("# escape= "),
            Some(("escape".into(), " ".into()))
        );
        assert_eq!(match_directive("# escape="), None);
        assert_eq!(match_directive("# 1x=y"), None);
    }

    #[test]
    fn heredoc_markers() {
        let d = parse_heredoc_marker("3<<-'EOF'").unwrap().unwrap();
        assert_eq!(
            (d.name.as_str(), d.file_descriptor, d.chomp, d.expand),
            ("EOF", 3, true, false)
        );
        assert!(parse_heredoc_marker("cat<<EOF").unwrap().is_none());
        assert!(parse_heredoc_marker("<<").unwrap().is_none());
        assert!(parse_heredoc_marker("<<\"EOF").is_err());
        assert!(parse_heredoc_marker("<<''").unwrap().is_none());
        assert_eq!(
            shell_words("a ${x:-b c}d \"e f\"", false, false),
            Some(vec![
                "a".into(),
                "${x:-b".into(),
                "c}d".into(),
                "e f".into()
            ])
        );
        assert_eq!(
            shell_words("\"a\\b\"", true, true),
            Some(vec!["\"a\\\\b\"".into()])
        );
        assert_eq!(shell_words("${x", true, true), None);
        let docs = heredocs_from_line("RUN <<A cat <<-\"B\" '<<C'").unwrap();
        assert_eq!(
            docs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
    }
}
