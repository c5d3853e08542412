//! One `.dockerignore` pattern compiled to tokens, and the matcher over
//! them: what patternmatcher does with a Go regular expression, written out.

use super::{has_prefix, has_suffix};

#[derive(Debug, Clone)]
pub(super) enum Kind {
    /// No wildcard: the path equals the pattern.
    Exact,
    /// `literal**`: the path starts with the literal.
    Prefix(String),
    /// `**literal`: the path ends with the literal (or is it, without its `/`).
    Suffix(String),
    /// Anything else.
    Glob(Glob),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(String),
    /// `?`: one character but `/`.
    One,
    /// `*`: any run of characters without `/`.
    Star,
    /// `**` followed by more pattern: `(.*/)?`, any number of whole directories.
    Dirs,
    /// `**` at the end of a pattern that had wildcards before: `.*`.
    Rest,
    /// `[...]`.
    Class(Class),
    /// An unescaped `^` in a pattern that became a regular expression
    /// upstream, where it is a start-of-text anchor.
    Caret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn contains(&self, c: char) -> bool {
        self.ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != self.negated
    }
}

#[derive(Debug, Clone)]
pub(super) struct Glob {
    toks: Vec<Tok>,
    /// Literal the path must start / end with: a cheap reject before matching.
    pub(super) prefix: String,
    pub(super) suffix: String,
    /// When there is neither: the longest literal, which must occur.
    required: String,
}

/// Backtracking steps a match may take before it starts over as an NFA
/// simulation (linear whatever the pattern, but slower and allocating, which
/// typical patterns never need).
const STEP_BUDGET: usize = 4096;

impl Glob {
    fn new(toks: Vec<Tok>) -> Self {
        let prefix = match toks.first() {
            Some(Tok::Lit(s)) => s.clone(),
            _ => String::new(),
        };
        let suffix = match toks.last() {
            Some(Tok::Lit(s)) if toks.len() > 1 => s.clone(),
            _ => String::new(),
        };
        let required = if prefix.is_empty() && suffix.is_empty() {
            toks.iter()
                .filter_map(|t| match t {
                    Tok::Lit(s) => Some(s),
                    _ => None,
                })
                .max_by_key(|s| s.len())
                .cloned()
                .unwrap_or_default()
        } else {
            String::new()
        };
        Self {
            toks,
            prefix,
            suffix,
            required,
        }
    }

    pub(super) fn matches(&self, path: &str) -> bool {
        if !has_prefix(path, &self.prefix) || !has_suffix(path, &self.suffix) {
            return false;
        }
        if !self.required.is_empty() && !path.contains(self.required.as_str()) {
            return false;
        }
        let mut budget = STEP_BUDGET;
        match self.step(path, 0, 0, &mut budget) {
            Some(found) => found,
            None => self.simulate(path),
        }
    }

    /// The same question answered by running the pattern as an NFA over the
    /// characters of `path`: linear in (characters x tokens) whatever the
    /// pattern, for the rare pattern that exhausts the backtracking budget.
    fn simulate(&self, path: &str) -> bool {
        // One character per token: literals are spelled out.
        let mut toks: Vec<(&Tok, Option<char>)> = Vec::new();
        for tok in &self.toks {
            match tok {
                Tok::Lit(s) => toks.extend(s.chars().map(|c| (tok, Some(c)))),
                other => toks.push((other, None)),
            }
        }
        let n = toks.len();
        // before[i]: about to match token i; group[i]: inside the `.*/` of a
        // `**` token i.
        let mut before = vec![false; n + 1];
        let mut group = vec![false; n + 1];
        let close = |before: &mut Vec<bool>, group: &mut Vec<bool>, at_start: bool| {
            for i in 0..n {
                if !before[i] {
                    continue;
                }
                match toks[i].0 {
                    Tok::Star | Tok::Rest => before[i + 1] = true,
                    Tok::Dirs => {
                        before[i + 1] = true;
                        group[i] = true;
                    }
                    Tok::Caret if at_start => before[i + 1] = true,
                    _ => {}
                }
            }
        };
        before[0] = true;
        close(&mut before, &mut group, true);
        for c in path.chars() {
            let mut next_before = vec![false; n + 1];
            let mut next_group = vec![false; n + 1];
            for i in 0..n {
                if group[i] {
                    if c != '\n' {
                        next_group[i] = true;
                    }
                    if c == '/' {
                        next_before[i + 1] = true;
                    }
                }
                if !before[i] {
                    continue;
                }
                let advance = match toks[i].0 {
                    Tok::Lit(_) => toks[i].1 == Some(c),
                    Tok::One => c != '/',
                    Tok::Class(class) => class.contains(c),
                    Tok::Star => {
                        next_before[i] |= c != '/';
                        false
                    }
                    Tok::Rest => {
                        next_before[i] |= c != '\n';
                        false
                    }
                    Tok::Dirs | Tok::Caret => false,
                };
                if advance {
                    next_before[i + 1] = true;
                }
            }
            before = next_before;
            group = next_group;
            close(&mut before, &mut group, false);
        }
        before[n]
    }

    /// Whether `toks[ti..]` matches `path[pos..]` to the end; `None` when the
    /// step budget ran out.
    fn step(&self, path: &str, ti: usize, pos: usize, budget: &mut usize) -> Option<bool> {
        *budget = budget.checked_sub(1)?;
        let (mut t, mut p) = (ti, pos);
        let ok = loop {
            let Some(tok) = self.toks.get(t) else {
                break p == path.len();
            };
            let rest = &path[p..];
            match tok {
                Tok::Lit(s) if has_prefix(rest, s) => p += s.len(),
                Tok::One => match rest.chars().next() {
                    Some(c) if c != '/' => p += c.len_utf8(),
                    _ => break false,
                },
                Tok::Class(class) => match rest.chars().next() {
                    Some(c) if class.contains(c) => p += c.len_utf8(),
                    _ => break false,
                },
                Tok::Caret if p == 0 => {}
                Tok::Lit(_) | Tok::Caret => break false,
                Tok::Star | Tok::Rest => {
                    let stop = if *tok == Tok::Star { b'/' } else { b'\n' };
                    let run = rest.bytes().position(|b| b == stop).unwrap_or(rest.len());
                    // When only a literal (or nothing) follows, the run can
                    // only end where that literal ends the path.
                    let tail = match self.toks.get(t + 1..) {
                        Some([]) => Some(0),
                        Some([Tok::Lit(s)]) => Some(s.len()),
                        _ => None,
                    };
                    if let Some(tail) = tail {
                        let Some(end) = path.len().checked_sub(tail) else {
                            break false;
                        };
                        break end >= p
                            && end <= p + run
                            && path.is_char_boundary(end)
                            && self.step(path, t + 1, end, budget)?;
                    }
                    let mut found = false;
                    for end in (p..=p + run).filter(|e| path.is_char_boundary(*e)) {
                        if self.step(path, t + 1, end, budget)? {
                            found = true;
                            break;
                        }
                    }
                    break found;
                }
                Tok::Dirs => {
                    // Skip the group, or take `.*/` up to any later `/` that
                    // no newline separates from here.
                    let run = rest.bytes().position(|b| b == b'\n').unwrap_or(rest.len());
                    let mut found = self.step(path, t + 1, p, budget)?;
                    if !found {
                        for (i, b) in rest.as_bytes()[..run].iter().enumerate() {
                            if *b == b'/' && self.step(path, t + 1, p + i + 1, budget)? {
                                found = true;
                                break;
                            }
                        }
                    }
                    break found;
                }
            }
            t += 1;
        };
        Some(ok)
    }
}

/// Compile one cleaned pattern (without `!`); `None` when Go's
/// `filepath.Match` would call it malformed.
pub(super) fn compile_kind(pattern: &str) -> Option<Kind> {
    validate_glob(pattern)?;
    #[derive(PartialEq)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Regexp,
    }
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks: Vec<Tok> = Vec::new();
    let push_char = |toks: &mut Vec<Tok>, c: char| match toks.last_mut() {
        Some(Tok::Lit(s)) => s.push(c),
        _ => toks.push(Tok::Lit(c.to_string())),
    };
    let mut detected = Detected::Exact;
    let mut idx = 0;
    let mut iteration = 0;
    while idx < chars.len() {
        let ch = chars[idx];
        idx += 1;
        match ch {
            '*' if chars.get(idx) == Some(&'*') => {
                idx += 1;
                if chars.get(idx) == Some(&'/') {
                    idx += 1;
                }
                if idx == chars.len() {
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        toks.push(Tok::Rest);
                        detected = Detected::Regexp;
                    }
                } else {
                    toks.push(Tok::Dirs);
                    detected = Detected::Regexp;
                }
                if iteration == 0 {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                toks.push(Tok::Star);
                detected = Detected::Regexp;
            }
            '?' => {
                toks.push(Tok::One);
                detected = Detected::Regexp;
            }
            '\\' => {
                // Validation guarantees a character follows.
                let next = chars.get(idx).copied()?;
                idx += 1;
                match regexp_escape(next)? {
                    Escaped::Char(c) => push_char(&mut toks, c),
                    Escaped::Class(class) => toks.push(Tok::Class(class)),
                }
                detected = Detected::Regexp;
            }
            '[' => {
                let (class, used) = parse_class(&chars[idx..])?;
                idx += used;
                toks.push(Tok::Class(class));
                detected = Detected::Regexp;
            }
            ']' => {
                // A `]` outside a class is literal in a Go regexp.
                push_char(&mut toks, ']');
                detected = Detected::Regexp;
            }
            '^' => toks.push(Tok::Caret),
            c => push_char(&mut toks, c),
        }
        iteration += 1;
    }
    Some(match detected {
        Detected::Exact => Kind::Exact,
        Detected::Prefix => Kind::Prefix(pattern[..pattern.len() - 2].to_owned()),
        Detected::Suffix => Kind::Suffix(pattern[2..].to_owned()),
        Detected::Regexp => Kind::Glob(Glob::new(toks)),
    })
}

enum Escaped {
    Char(char),
    Class(Class),
}

/// What `\x` means once patternmatcher has copied it into a Go regexp:
/// punctuation is literal, `\t \n \r \f \v \a` are control characters,
/// `\d \s \w` (and their negations) are Perl classes. Anything else (`\b`,
/// `\pL`, `\x41`, `\q`, a non-ASCII character...) is refused: Go either fails
/// to compile it or gives it a meaning (assertions, hex codes) this matcher
/// does not model.
fn regexp_escape(c: char) -> Option<Escaped> {
    let class = |negated, ranges: &[(char, char)]| {
        Some(Escaped::Class(Class {
            negated,
            ranges: ranges.to_vec(),
        }))
    };
    const DIGIT: &[(char, char)] = &[('0', '9')];
    const SPACE: &[(char, char)] = &[('\t', '\n'), ('\x0c', '\r'), (' ', ' ')];
    const WORD: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];
    match c {
        't' => Some(Escaped::Char('\t')),
        'n' => Some(Escaped::Char('\n')),
        'r' => Some(Escaped::Char('\r')),
        'f' => Some(Escaped::Char('\x0c')),
        'v' => Some(Escaped::Char('\x0b')),
        'a' => Some(Escaped::Char('\x07')),
        'd' => class(false, DIGIT),
        'D' => class(true, DIGIT),
        's' => class(false, SPACE),
        'S' => class(true, SPACE),
        'w' => class(false, WORD),
        'W' => class(true, WORD),
        c if c.is_ascii() && !c.is_ascii_alphanumeric() => Some(Escaped::Char(c)),
        _ => None,
    }
}

/// Why [`compile_kind`] refused `pattern`, in words.
pub(super) fn bad_pattern_reason(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => match chars.get(i + 1) {
                None => return "it ends with a lone `\\`".to_owned(),
                Some(c) if regexp_escape(*c).is_none() => {
                    return format!("`\\{c}` is not a supported escape");
                }
                Some(_) => i += 2,
            },
            '[' => match parse_class(&chars[i + 1..]) {
                Some((_, used)) => i += 1 + used,
                None => {
                    return "a character class is not closed, empty, or has a bad range".to_owned();
                }
            },
            _ => i += 1,
        }
    }
    "it is malformed".to_owned()
}

/// Parse a character class after its `[`: `^` negates, ranges `a-z`, `\`
/// escapes, at least one range, closed by `]`. Returns the class and the
/// number of characters used, `]` included.
fn parse_class(chars: &[char]) -> Option<(Class, usize)> {
    let mut i = 0;
    let negated = chars.first() == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        if chars.get(i) == Some(&']') && !ranges.is_empty() {
            return Some((Class { negated, ranges }, i + 1));
        }
        let (lo, n) = class_char(&chars[i..])?;
        i += n;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            let (h, n) = class_char(&chars[i + 1..])?;
            hi = h;
            i += 1 + n;
        }
        // Go's filepath.Match accepts `z-a` (it never matches), but the
        // regexp compiler rejects it, so patternmatcher fails on every
        // match. Refusing it up front gives the error earlier.
        if lo > hi {
            return None;
        }
        ranges.push((lo, hi));
    }
}

/// Go's `getEsc`: one class character, maybe escaped; never an unescaped
/// `-` or `]`, and the class must go on after it.
fn class_char(chars: &[char]) -> Option<(char, usize)> {
    let mut i = 0;
    match chars.first() {
        None | Some('-' | ']') => return None,
        Some('\\') => i += 1,
        Some(_) => {}
    }
    let c = *chars.get(i)?;
    if i + 1 >= chars.len() {
        return None;
    }
    Some((c, i + 1))
}

/// The syntax check of Go's `filepath.Match`: every `[` opens a well-formed
/// class and no `\` is last. Stars split chunks but a `*` inside a class
/// does not.
fn validate_glob(pattern: &str) -> Option<()> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return None;
                }
                i += 2;
            }
            '[' => {
                let (_, used) = parse_class(&chars[i + 1..])?;
                i += 1 + used;
            }
            _ => i += 1,
        }
    }
    Some(())
}

#[cfg(test)]
mod simulation_tests {
    use super::*;
    use crate::dockerignore::clean_path;

    /// The NFA fallback and the backtracking matcher must agree everywhere.
    #[test]
    fn simulation_agrees_with_backtracking() {
        let mut seed: u64 = 7;
        let mut rand = move |n: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 33) as usize) % n
        };
        let pattern_chars = ['a', 'b', '/', '*', '?', '^', '\n'];
        let path_chars = ['a', 'b', '/', '\n', 'é'];
        let mut compared = 0;
        for _ in 0..20_000 {
            let pattern: String = (0..1 + rand(7))
                .map(|_| pattern_chars[rand(pattern_chars.len())])
                .collect();
            let path: String = (0..rand(9))
                .map(|_| path_chars[rand(path_chars.len())])
                .collect();
            let Some(Kind::Glob(glob)) = compile_kind(&clean_path(&pattern)) else {
                continue;
            };
            let mut budget = usize::MAX;
            let backtracked = glob.step(&path, 0, 0, &mut budget);
            assert_eq!(
                backtracked,
                Some(glob.simulate(&path)),
                "{pattern:?} vs {path:?}"
            );
            compared += 1;
        }
        assert!(compared > 5_000, "{compared}");
    }

    #[test]
    fn pathological_patterns_end() {
        let pattern = format!("{}b", "*a".repeat(20));
        let Some(Kind::Glob(glob)) = compile_kind(&pattern) else {
            panic!("a glob")
        };
        let path = "a".repeat(200);
        assert!(!glob.matches(&path));
        assert!(glob.matches(&format!("{path}b")));
    }
}
