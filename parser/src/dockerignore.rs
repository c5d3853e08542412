//! `.dockerignore` files and the patterns in them, with the semantics of
//! moby/patternmatcher (`patternmatcher.go`) and its `ignorefile.ReadAll`
//! reader, which is what BuildKit and the docker CLI use.
//!
//! * [`read_ignore_patterns`] turns file text into patterns: `#` lines are
//!   comments, lines are trimmed, empty lines dropped, each pattern is cleaned
//!   like Go's `filepath.Clean` and loses a leading `/`, and a `!` prefix marks
//!   an exception (re-inclusion).
//! * [`PatternMatcher`] compiles each pattern once. A path is excluded when the
//!   last pattern that matches it, or matches one of its parent directories,
//!   is not an exception. `*` and `?` never cross `/`, `**` crosses any number
//!   of directories, `[a-z]`/`[^a-z]` are character classes and `\` escapes.
//! * [`read_dockerignore`] picks the file: `<Dockerfile name>.dockerignore`
//!   beside the Dockerfile wins over the context's `.dockerignore`. It is the
//!   only function here that does I/O.
//!
//! Matching is a hand-written matcher over the pattern's tokens (no regex per
//! path). Per-byte bitsets first pick the patterns a path can match at all
//! (by the byte a match must start and end with); of those, exact, prefix
//! (`dir/**`) and suffix (`**/name`) patterns are a string comparison, and the
//! rest reject on their literal prefix, suffix or longest literal before a
//! backtracking matcher runs. The backtracker has a step budget; past it, the
//! pattern runs as an NFA over the path, linear whatever the pattern.
//!
//! A directory walker should call [`PatternMatcher::matches_with_parent`],
//! passing each directory's result to its children (what BuildKit does), and
//! [`PatternMatcher::can_skip_dir`] to prune; [`PatternMatcher::matches`]
//! answers for one path on its own.
//!
//! Known differences from patternmatcher, all on patterns no real ignore file
//! has: upstream copies a pattern into a Go regular expression, so `*` or `?`
//! inside `[...]`, Perl escapes inside a class (`[\d]`) and escapes such as
//! `\b`, `\pL` or `\x41` take regexp meanings there; kiln treats the first two
//! literally and refuses the last kind as a bad pattern. A reversed range
//! (`[z-a]`) makes upstream fail on every match; kiln refuses it when the
//! pattern is compiled. Lines longer than 64 KiB, which Go's line scanner
//! rejects, are accepted.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};

mod glob;

use glob::{Kind, bad_pattern_reason, compile_kind};

/// Errors from reading or compiling ignore patterns.
#[derive(Debug, thiserror::Error)]
pub enum DockerignoreError {
    /// A pattern that is only `!`.
    #[error("illegal exclusion pattern `!`{}", at_line(*.line))]
    IllegalExclusion {
        /// 1-based line in the ignore file, when the pattern came from one.
        line: Option<usize>,
    },
    /// A pattern that Go's `filepath.Match` rejects (an unclosed `[`, a bad
    /// range, a trailing `\`) or that upstream's regexp cannot compile.
    #[error("syntax error in pattern `{pattern}`{}: {reason}\n\nhint: `\\` makes the next character literal, and `[...]` is a character class such as `[a-z]` (write `\\[` for a literal `[`)", at_line(*.line))]
    BadPattern {
        /// The pattern, after cleaning.
        pattern: String,
        /// 1-based line in the ignore file, when the pattern came from one.
        line: Option<usize>,
        /// What is wrong with it.
        reason: String,
    },
    /// An ignore file that could not be read.
    #[error("failed to read ignore file `{}`", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An error in a pattern of an ignore file.
    #[error("in ignore file `{}`", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The error in one of its patterns.
        #[source]
        source: Box<DockerignoreError>,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" on line {l}")).unwrap_or_default()
}

/// Go's `filepath.Clean` on Unix: the shortest path equivalent to `path` by
/// purely lexical processing (`//` → `/`, `.` dropped, `x/..` removed, `..`
/// at the root dropped, no trailing `/`, empty → `.`).
pub fn clean_path(path: &str) -> Cow<'_, str> {
    if is_clean(path) {
        return Cow::Borrowed(path);
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    Cow::Owned(match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    })
}

fn is_clean(path: &str) -> bool {
    if path.is_empty() {
        return false;
    }
    if path == "/" || path == "." {
        return true;
    }
    if path.ends_with('/') {
        return false;
    }
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut only_dotdot = true;
    for p in body.split('/') {
        match p {
            "" | "." => return false,
            ".." if !only_dotdot || path.starts_with('/') => return false,
            ".." => {}
            _ => only_dotdot = false,
        }
    }
    true
}

/// Go's `filepath.Dir`: everything before the last `/`, cleaned.
fn go_dir(path: &str) -> Cow<'_, str> {
    match path.rfind('/') {
        // `a/b/` cleans to `a/b`: when that is already clean, borrow it.
        Some(0) => Cow::Borrowed("/"),
        Some(i) if is_clean(&path[..i]) => Cow::Borrowed(&path[..i]),
        Some(i) => clean_path(&path[..=i]),
        None => Cow::Borrowed("."),
    }
}

// Short-string comparisons written out: the patterns and paths compared here
// are a few bytes long, and a loop that rejects on the first (or, for
// suffixes, the last) byte is several times faster than a call to `memcmp`.
#[inline]
fn has_prefix(s: &str, prefix: &str) -> bool {
    let (s, p) = (s.as_bytes(), prefix.as_bytes());
    s.len() >= p.len() && p.iter().zip(s).all(|(a, b)| a == b)
}

#[inline]
fn has_suffix(s: &str, suffix: &str) -> bool {
    let (s, p) = (s.as_bytes(), suffix.as_bytes());
    s.len() >= p.len() && p.iter().rev().zip(s.iter().rev()).all(|(a, b)| a == b)
}

#[inline]
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && has_prefix(a, b)
}

/// The patterns of an ignore file, as `ignorefile.ReadAll` returns them.
///
/// ```
/// let p = kiln_parser::read_ignore_patterns("# comment\n/build/\n! /keep/me \n\n*.log\n");
/// assert_eq!(p, ["build", "!keep/me", "*.log"]);
/// ```
pub fn read_ignore_patterns(text: &str) -> Vec<String> {
    read_ignore_lines(text)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Like [`read_ignore_patterns`], with the 1-based line of each pattern.
fn read_ignore_lines(text: &str) -> Vec<(usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    // bufio.ScanLines: split on `\n`, drop one `\r` before it, and a final
    // line without a newline still counts.
    let lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
    for (index, line) in lines.enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if text.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            let c = clean_path(pattern);
            cleaned = match c.strip_prefix('/') {
                Some(rest) if c.len() > 1 => rest.to_owned(),
                _ => c.into_owned(),
            };
        }
        if invert {
            cleaned.insert(0, '!');
        }
        out.push((index + 1, cleaned));
    }
    out
}

/// One compiled pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    exclusion: bool,
    kind: Kind,
    quick: Quick,
}

/// Byte checks that reject most paths before any real matching: the byte a
/// match must start with, the byte it must end with, and for exact patterns
/// the length.
#[derive(Debug, Clone, Copy, Default)]
struct Quick {
    first: Option<u8>,
    last: Option<u8>,
    len: Option<usize>,
}

impl Quick {
    fn of(text: &str, kind: &Kind) -> Self {
        let first = |s: &str| s.as_bytes().first().copied();
        let last = |s: &str| s.as_bytes().last().copied();
        match kind {
            Kind::Exact => Self {
                first: first(text),
                last: last(text),
                len: Some(text.len()),
            },
            Kind::Prefix(p) => Self {
                first: first(p),
                ..Self::default()
            },
            Kind::Suffix(s) => Self {
                last: last(s),
                ..Self::default()
            },
            Kind::Glob(g) => Self {
                first: first(&g.prefix),
                last: last(&g.suffix),
                len: None,
            },
        }
    }

    #[inline]
    fn may_match(&self, path: &[u8]) -> bool {
        self.len.is_none_or(|l| l == path.len())
            && self.first.is_none_or(|b| path.first() == Some(&b))
            && self.last.is_none_or(|b| path.last() == Some(&b))
    }
}

impl Pattern {
    /// The cleaned pattern, without its `!`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this is a `!` exception, which re-includes what it matches.
    pub fn is_exclusion(&self) -> bool {
        self.exclusion
    }

    /// Whether the pattern matches `path` itself (no parent matching).
    #[inline]
    pub fn matches(&self, path: &str) -> bool {
        self.quick.may_match(path.as_bytes()) && self.matches_unfiltered(path)
    }

    #[inline(never)]
    fn matches_unfiltered(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => same(path, &self.text),
            Kind::Prefix(prefix) => has_prefix(path, prefix),
            Kind::Suffix(suffix) => suffix_matches(suffix, path),
            Kind::Glob(glob) => glob.matches(path),
        }
    }

    /// Whether the pattern matches `path` or one of the directories of
    /// `parent` (Go's `filepath.Dir(path)`): `parent` itself and each prefix of
    /// it that ends before a `/`.
    fn matches_self_or_parent(&self, path: &str, parent: &str) -> bool {
        if self.matches(path) {
            return true;
        }
        if parent == "." {
            return false;
        }
        match &self.kind {
            Kind::Exact => {
                has_prefix(parent, &self.text)
                    && (parent.len() == self.text.len()
                        || parent.as_bytes()[self.text.len()] == b'/')
            }
            Kind::Prefix(prefix) => has_prefix(parent, prefix),
            // The quick byte checks first: most directories fail them.
            Kind::Suffix(_) | Kind::Glob(_) => dir_prefixes(parent).any(|d| self.matches(d)),
        }
    }
}

/// `parent` split at each `/`, as the joined prefixes `a`, `a/b`, `a/b/c`.
fn dir_prefixes(parent: &str) -> impl Iterator<Item = &str> {
    let bytes = parent.as_bytes();
    (1..bytes.len())
        .filter(|i| bytes[*i] == b'/')
        .map(|i| &parent[..i])
        // A leading `/` gives an empty first directory, as Go's Split does.
        .chain(bytes.first().filter(|b| **b == b'/').map(|_| ""))
        .chain(std::iter::once(parent))
}

fn suffix_matches(suffix: &str, path: &str) -> bool {
    // `**/foo` also matches `foo` itself.
    has_suffix(path, suffix) || suffix.strip_prefix('/').is_some_and(|s| same(s, path))
}

/// What [`PatternMatcher::matches_with_parent`] remembers about a directory
/// for its children: which patterns matched it or one of its parents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchInfo {
    /// A bitset over the patterns, one bit per pattern.
    parent_matched: Vec<u64>,
}

/// A compiled list of ignore patterns.
///
/// ```
/// use kiln_parser::PatternMatcher;
/// let m = PatternMatcher::new(["docs", "!docs/README.md", "**/*.log"]).unwrap();
/// assert!(m.matches("docs/guide.md"));
/// assert!(!m.matches("docs/README.md"));
/// assert!(m.matches("a/b/c.log"));
/// assert!(!m.matches("src/main.rs"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
    index: Index,
}

/// For each byte value, the patterns a string starting (ending) with that
/// byte can match, as bitsets: the quick checks of every pattern done at once
/// by ANDing two words, so a path is only matched against its candidates.
#[derive(Debug, Clone, Default)]
struct Index {
    /// 64-bit words per bitset.
    words: usize,
    /// 257 bitsets each: one per byte value, the last one for the empty string.
    first: Vec<u64>,
    last: Vec<u64>,
}

impl Index {
    fn build(patterns: &[Pattern]) -> Self {
        let words = patterns.len().div_ceil(64);
        let mut first = vec![0u64; 257 * words];
        let mut last = vec![0u64; 257 * words];
        for (i, p) in patterns.iter().enumerate() {
            let (w, bit) = (i / 64, 1u64 << (i % 64));
            for b in 0..257 {
                let byte = u8::try_from(b).ok();
                if p.quick.first.is_none_or(|f| Some(f) == byte) {
                    first[b * words + w] |= bit;
                }
                if p.quick.last.is_none_or(|l| Some(l) == byte) {
                    last[b * words + w] |= bit;
                }
            }
        }
        Self { words, first, last }
    }

    fn slot(byte: Option<&u8>) -> usize {
        byte.map_or(256, |b| usize::from(*b))
    }

    fn first_of(&self, s: &str) -> &[u64] {
        let at = Self::slot(s.as_bytes().first()) * self.words;
        &self.first[at..at + self.words]
    }

    fn last_of(&self, s: &str) -> &[u64] {
        let at = Self::slot(s.as_bytes().last()) * self.words;
        &self.last[at..at + self.words]
    }
}

/// A candidate bitset: on the stack for up to 256 patterns.
enum Candidates {
    Small([u64; 4], usize),
    Large(Vec<u64>),
}

impl Candidates {
    fn new(words: usize) -> Self {
        if words <= 4 {
            Self::Small([0; 4], words)
        } else {
            Self::Large(vec![0; words])
        }
    }

    fn bits(&self) -> &[u64] {
        match self {
            Self::Small(a, n) => &a[..*n],
            Self::Large(v) => v,
        }
    }

    fn bits_mut(&mut self) -> &mut [u64] {
        match self {
            Self::Small(a, n) => &mut a[..*n],
            Self::Large(v) => v,
        }
    }
}

/// The patterns to look at, in order, given a candidate bitset.
fn each_bit(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(w, word)| {
        let mut rest = *word;
        std::iter::from_fn(move || {
            (rest != 0).then(|| {
                let i = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                w * 64 + i
            })
        })
    })
}

impl PatternMatcher {
    /// Compile patterns as patternmatcher's `New` does: each is trimmed,
    /// empty ones are dropped, each is cleaned, a leading `!` makes an
    /// exception, and the syntax is checked.
    pub fn new<I, S>(patterns: I) -> Result<Self, DockerignoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::compile(patterns.into_iter().map(|p| (None, p)))
    }

    /// Read the text of an ignore file ([`read_ignore_patterns`]) and compile
    /// its patterns; errors name the line.
    pub fn from_ignore_file_text(text: &str) -> Result<Self, DockerignoreError> {
        Self::compile(
            read_ignore_lines(text)
                .into_iter()
                .map(|(l, p)| (Some(l), p)),
        )
    }

    fn compile<S: AsRef<str>>(
        patterns: impl Iterator<Item = (Option<usize>, S)>,
    ) -> Result<Self, DockerignoreError> {
        let mut out = Self::default();
        for (line, p) in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                continue;
            }
            let p = clean_path(p);
            let (exclusion, text) = match p.strip_prefix('!') {
                Some("") => return Err(DockerignoreError::IllegalExclusion { line }),
                Some(rest) => (true, rest),
                None => (false, p.as_ref()),
            };
            out.exclusions |= exclusion;
            let kind = compile_kind(text).ok_or_else(|| DockerignoreError::BadPattern {
                pattern: text.to_owned(),
                line,
                reason: bad_pattern_reason(text),
            })?;
            out.patterns.push(Pattern {
                quick: Quick::of(text, &kind),
                text: text.to_owned(),
                exclusion,
                kind,
            });
        }
        out.index = Index::build(&out.patterns);
        Ok(out)
    }

    /// The compiled patterns, in file order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether any pattern is a `!` exception.
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// Whether `path` is ignored: the last pattern that matches it or one of
    /// its parent directories decides (patternmatcher's
    /// `MatchesOrParentMatches`). `path` is relative to the context, with `/`
    /// separators; it is used as given (see [`clean_path`]).
    pub fn matches(&self, path: &str) -> bool {
        let parent = go_dir(path);
        let candidates = self.candidates_with_parents(path, &parent);
        let mut matched = false;
        for i in each_bit(candidates.bits()) {
            let pattern = &self.patterns[i];
            // An inclusion cannot change a match, an exception cannot change
            // a non-match: skip them.
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.matches_self_or_parent(path, &parent) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// The patterns that can match `path` itself.
    fn candidates(&self, path: &str) -> Candidates {
        let mut out = Candidates::new(self.index.words);
        let (first, last) = (self.index.first_of(path), self.index.last_of(path));
        for ((acc, f), l) in out.bits_mut().iter_mut().zip(first).zip(last) {
            *acc = f & l;
        }
        out
    }

    /// The patterns that can match `path` or one of the directories of
    /// `parent`.
    fn candidates_with_parents(&self, path: &str, parent: &str) -> Candidates {
        let mut out = self.candidates(path);
        if parent != "." {
            for dir in dir_prefixes(parent) {
                let (first, last) = (self.index.first_of(dir), self.index.last_of(dir));
                for ((acc, f), l) in out.bits_mut().iter_mut().zip(first).zip(last) {
                    *acc |= f & l;
                }
            }
        }
        out
    }

    /// Like [`matches`](Self::matches), but only the path itself is matched,
    /// never its parents (patternmatcher's `MatchesExact`).
    pub fn matches_exact(&self, path: &str) -> bool {
        let mut matched = false;
        for i in each_bit(self.candidates(path).bits()) {
            let pattern = &self.patterns[i];
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.matches(path) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// The form a directory walker uses (patternmatcher's
    /// `MatchesUsingParentResults`, which BuildKit's context walker calls):
    /// pass the [`MatchInfo`] returned for the parent directory (or the
    /// default for a top-level entry, which then falls back to checking the
    /// parents itself) and each pattern is matched against `path` alone.
    pub fn matches_with_parent(&self, path: &str, parent: &MatchInfo) -> (bool, MatchInfo) {
        let words = self.index.words;
        let known = words > 0 && parent.parent_matched.len() == words;
        let dir = (!known).then(|| go_dir(path));
        let mut candidates = match &dir {
            Some(d) => self.candidates_with_parents(path, d),
            None => self.candidates(path),
        };
        if known {
            for (c, p) in candidates.bits_mut().iter_mut().zip(&parent.parent_matched) {
                *c |= p;
            }
        }
        let mut info = MatchInfo {
            parent_matched: vec![0; words],
        };
        let mut matched = false;
        for i in each_bit(candidates.bits()) {
            let pattern = &self.patterns[i];
            let mut m = known && parent.parent_matched[i / 64] & (1 << (i % 64)) != 0;
            if !m {
                if pattern.exclusion != matched {
                    continue;
                }
                m = match &dir {
                    Some(d) => pattern.matches_self_or_parent(path, d),
                    None => pattern.matches(path),
                };
            }
            if m {
                info.parent_matched[i / 64] |= 1 << (i % 64);
                matched = !pattern.exclusion;
            }
        }
        (matched, info)
    }

    /// The plain loop over every pattern that [`matches`](Self::matches)
    /// speeds up with its index: the reference it is tested against.
    #[cfg(test)]
    fn matches_linear(&self, path: &str) -> bool {
        let parent = go_dir(path);
        let mut matched = false;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.matches_self_or_parent(path, &parent) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// For a directory `dir` that [`matches`](Self::matches) excluded: whether
    /// a walker may skip everything under it. This is BuildKit's (fsutil's)
    /// rule: yes when there are no exceptions, or when no exception pattern
    /// followed by `/` starts with `dir/`. Like BuildKit, an exception that
    /// does not spell out the directory (`!**/keep`) does not stop the skip.
    pub fn can_skip_dir(&self, dir: &str) -> bool {
        if !self.exclusions {
            return true;
        }
        !self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            let pat = p.text.as_str();
            // `pat + "/"` starts with `dir + "/"`.
            pat.len() >= dir.len()
                && pat.starts_with(dir)
                && (pat.len() == dir.len() || pat.as_bytes()[dir.len()] == b'/')
        })
    }
}

/// An ignore file that was found and read.
#[derive(Debug, Clone)]
pub struct IgnoreFile {
    /// The file that was used.
    pub path: PathBuf,
    /// Its compiled patterns.
    pub matcher: PatternMatcher,
}

/// Find and read the ignore file for a build, as BuildKit does: the file
/// `<Dockerfile name>.dockerignore` in the Dockerfile's directory if it
/// exists, else `.dockerignore` at the root of the context, else none.
pub fn read_dockerignore(
    context_dir: &Path,
    dockerfile: &Path,
) -> Result<Option<IgnoreFile>, DockerignoreError> {
    let mut candidates = Vec::with_capacity(2);
    if let Some(name) = dockerfile.file_name() {
        let mut specific = name.to_os_string();
        specific.push(".dockerignore");
        candidates.push(dockerfile.with_file_name(specific));
    }
    candidates.push(context_dir.join(".dockerignore"));
    for path in candidates {
        let bytes = match fs_err::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(DockerignoreError::Read { path, source }),
        };
        let text = String::from_utf8_lossy(&bytes);
        return match PatternMatcher::from_ignore_file_text(&text) {
            Ok(matcher) => Ok(Some(IgnoreFile { path, matcher })),
            Err(e) => Err(DockerignoreError::InFile {
                path,
                source: Box::new(e),
            }),
        };
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_go() {
        for (input, want) in [
            ("", "."),
            (".", "."),
            ("/", "/"),
            ("a/", "a"),
            ("a//b", "a/b"),
            ("./a/./b/", "a/b"),
            ("a/../b", "b"),
            ("a/..", "."),
            ("../a", "../a"),
            ("../../a/..", "../.."),
            ("/../a", "/a"),
            ("/a/b/../../..", "/"),
            ("**/", "**"),
            ("abc", "abc"),
            ("..", ".."),
            ("a/b/..", "a"),
        ] {
            assert_eq!(clean_path(input), want, "clean({input:?})");
        }
    }

    #[test]
    fn dir_follows_go() {
        assert_eq!(go_dir("a/b/c"), "a/b");
        assert_eq!(go_dir("a"), ".");
        assert_eq!(go_dir("dir/dir2/file/"), "dir/dir2/file");
        assert_eq!(go_dir("/a"), "/");
    }

    #[test]
    fn kinds_follow_patternmatcher_compile() {
        // From patternmatcher's compile table: which patterns are plain
        // string comparisons.
        let kind = |p: &str| match compile_kind(p) {
            Some(Kind::Exact) => "exact",
            Some(Kind::Prefix(_)) => "prefix",
            Some(Kind::Suffix(_)) => "suffix",
            Some(Kind::Glob(_)) => "regexp",
            None => "error",
        };
        assert_eq!(kind("*"), "regexp");
        assert_eq!(kind("**"), "suffix");
        assert_eq!(kind("**/**"), "regexp");
        assert_eq!(kind("dir/**"), "prefix");
        assert_eq!(kind("**/dir"), "suffix");
        assert_eq!(kind("**file"), "suffix");
        assert_eq!(kind("**/dir2/*"), "regexp");
        assert_eq!(kind("a.|)$(}+{bc"), "exact");
        assert_eq!(kind("abc"), "exact");
        assert_eq!(kind("a\\*b"), "regexp");
        assert_eq!(kind("a[b-d]e"), "regexp");
        assert_eq!(kind("["), "error");
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    /// The index only skips patterns that cannot match.
    #[test]
    fn index_agrees_with_the_plain_loop() {
        let mut seed: u64 = 11;
        let mut rand = move |n: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 33) as usize) % n
        };
        let atoms = ["a", "b", "/", "*", "**", "?", "!", ".", "[ab]", "c/"];
        let path_atoms = ["a", "b", "/", ".", "c", "ab"];
        let mut checked = 0;
        for _ in 0..3_000 {
            let patterns: Vec<String> = (0..1 + rand(70))
                .map(|_| (0..1 + rand(4)).map(|_| atoms[rand(atoms.len())]).collect())
                .collect();
            let Ok(m) = PatternMatcher::new(&patterns) else {
                continue;
            };
            for _ in 0..10 {
                let path: String = (0..rand(7))
                    .map(|_| path_atoms[rand(path_atoms.len())])
                    .collect();
                assert_eq!(
                    m.matches(&path),
                    m.matches_linear(&path),
                    "{patterns:?} {path:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 10_000, "{checked}");
    }
}
