//! Source patterns: Go's `filepath.Match`, fsutil's wildcard split and walk,
//! and [`resolve_sources`], shared with the cache-key code.

use std::path::{Path, PathBuf};

use kiln_parser::PatternMatcher;

use super::FileOpError;
use super::root::{clean_abs, is_absent, resolve};

/// How [`resolve_sources`] reads the source root.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResolveOptions<'a> {
    /// `--parents`: each entry keeps its path from the root, or from a
    /// `/./` pivot in the pattern.
    pub parents: bool,
    /// `.dockerignore` of the context: ignored paths are absent.
    pub ignore: Option<&'a PatternMatcher>,
    /// `--exclude`: a wildcard match whose path below the wildcard's fixed
    /// directory is excluded is dropped (`COPY --exclude=*.txt hom* /d/`
    /// copies no `hom*.txt`, as Docker documents). Paths inside a copied
    /// directory are matched by the copy itself, relative to that directory.
    pub exclude: Option<&'a PatternMatcher>,
}

/// One source that a COPY/ADD reads, after wildcard expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    /// The pattern it came from, as written.
    pub pattern: String,
    /// The path as matched, relative to the source root (`/`-separated, no
    /// leading `/`, `.` for the root), before following a final symlink.
    pub rel_path: String,
    /// The path read, relative to the source root, after following
    /// symlinks inside the root (what the cache key must hash).
    pub resolved_path: String,
    /// The host path read.
    pub host: PathBuf,
    /// A directory: the op reads its whole tree (minus excludes).
    pub is_dir: bool,
    /// The name used when the entry goes inside a directory destination
    /// (Go's `filepath.Base` of the matched path).
    pub name: String,
    /// `--parents`: the path kept under the destination.
    pub keep_path: Option<String>,
}

/// Expand `patterns` (COPY/ADD source paths as written) against `src_root`
/// with BuildKit's rules: each is cleaned against `/`; a pattern with
/// wildcards walks the directory before its first wildcard segment and keeps
/// the matches in lexical order (none is not an error); a plain path must
/// exist. Symlinks are followed inside the root.
pub fn resolve_sources(
    src_root: &Path,
    patterns: &[String],
    opts: &ResolveOptions<'_>,
) -> Result<Vec<SourceEntry>, FileOpError> {
    let mut out = Vec::new();
    for pattern in patterns {
        let (pivot, rest) = match (opts.parents, pattern.split_once("/./")) {
            (true, Some((pivot, rest))) => (clean_abs(pivot), rest.to_owned()),
            (true, None) => ("/".to_owned(), pattern.clone()),
            (false, _) => ("/".to_owned(), pattern.clone()),
        };
        let full = if opts.parents {
            clean_abs(&format!("{pivot}/{rest}"))
        } else {
            clean_abs(pattern)
        };
        let matches = if contains_wildcards(&full) {
            expand_wildcards(src_root, pattern, &full, opts)?
        } else {
            vec![full.clone()]
        };
        let wildcard = contains_wildcards(&full);
        for inner in matches {
            let rel = rel_of(&inner);
            if !wildcard && is_ignored(opts.ignore, &rel) {
                return Err(FileOpError::SourceNotFound {
                    path: pattern.clone(),
                });
            }
            let resolved = resolve(src_root, &inner, true)?;
            let meta = match fs_err::symlink_metadata(&resolved.host) {
                Ok(m) => m,
                Err(e) if is_absent(&e) => {
                    return Err(FileOpError::SourceNotFound {
                        path: pattern.clone(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let resolved_rel = rel_of(&resolved.inner);
            if resolved_rel != rel && is_ignored(opts.ignore, &resolved_rel) {
                return Err(FileOpError::SourceNotFound {
                    path: pattern.clone(),
                });
            }
            let keep_path = opts.parents.then(|| {
                let p = inner.strip_prefix(&pivot).unwrap_or(&inner);
                p.trim_start_matches('/').to_owned()
            });
            out.push(SourceEntry {
                pattern: pattern.clone(),
                name: base_name(&inner),
                rel_path: rel,
                resolved_path: resolved_rel,
                host: resolved.host,
                is_dir: meta.is_dir(),
                keep_path,
            });
        }
    }
    Ok(out)
}

/// Every path an op reads below the resolved `entries`, relative to the
/// source root (`/`-separated), in the order the copy visits them: each
/// entry itself, and for a directory its whole tree minus what `--exclude`
/// (relative to that directory) and `.dockerignore` (relative to the root)
/// leave out — the same rules the copy applies. This is the file list a
/// cache key must cover.
pub fn files_read(
    entries: &[SourceEntry],
    opts: &ResolveOptions<'_>,
) -> Result<Vec<String>, FileOpError> {
    let mut out = Vec::new();
    for e in entries {
        out.push(e.resolved_path.clone());
        if e.is_dir {
            walk_read(&e.host, &e.resolved_path, "", opts, &mut out)?;
        }
    }
    Ok(out)
}

fn walk_read(
    dir: &Path,
    rel: &str,
    comps: &str,
    opts: &ResolveOptions<'_>,
    out: &mut Vec<String>,
) -> Result<(), FileOpError> {
    let mut names: Vec<_> = fs_err::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let n = name.to_string_lossy();
        let child_comps = join_rel(comps, &n);
        let child_rel = join_rel(if rel == "." { "" } else { rel }, &n);
        let host = dir.join(&name);
        let is_dir = fs_err::symlink_metadata(&host)?.is_dir();
        if let Some(m) = opts.exclude
            && m.matches(&child_comps)
            && (!is_dir || m.can_skip_dir(&child_comps))
        {
            continue;
        }
        if let Some(m) = opts.ignore
            && m.matches(&child_rel)
            && (!is_dir || m.can_skip_dir(&child_rel))
        {
            continue;
        }
        out.push(child_rel.clone());
        if is_dir {
            walk_read(&host, &child_rel, &child_comps, opts, out)?;
        }
    }
    Ok(())
}

fn is_ignored(ignore: Option<&PatternMatcher>, rel: &str) -> bool {
    match ignore {
        Some(m) if rel != "." => m.matches(rel) && m.can_skip_dir(rel),
        _ => false,
    }
}

/// `/a/b` → `a/b`, `/` → `.`.
fn rel_of(inner: &str) -> String {
    let r = inner.trim_start_matches('/');
    if r.is_empty() {
        ".".to_owned()
    } else {
        r.to_owned()
    }
}

fn base_name(inner: &str) -> String {
    match inner.trim_end_matches('/').rsplit('/').next() {
        Some("") | None => "/".to_owned(),
        Some(n) => n.to_owned(),
    }
}

/// fsutil's `containsWildcards`: `*`, `?` or `[`, not escaped by `\`.
pub(super) fn contains_wildcards(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// fsutil's `splitWildcards` + `resolveWildcards`: walk the fixed directory
/// part (symlinks in it followed inside the root) and match the rest of the
/// pattern against each path relative to it; a matching directory is not
/// entered. Returns paths as seen inside the root, in lexical order.
fn expand_wildcards(
    root: &Path,
    pattern: &str,
    full: &str,
    opts: &ResolveOptions<'_>,
) -> Result<Vec<String>, FileOpError> {
    let segs: Vec<&str> = full.split('/').filter(|s| !s.is_empty()).collect();
    let first = segs
        .iter()
        .position(|s| contains_wildcards(s))
        .unwrap_or(segs.len());
    let fixed = format!("/{}", segs[..first].join("/"));
    let rest = segs[first..].join("/");
    // Check the pattern once, so a bad one fails even with nothing to match.
    go_match(&rest, "").map_err(|_| FileOpError::BadPattern {
        pattern: pattern.to_owned(),
    })?;
    let base = resolve(root, &fixed, true)?;
    match fs_err::metadata(&base.host) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(Vec::new()),
        Err(e) if is_absent(&e) => {
            return Err(FileOpError::WildcardDirNotFound {
                pattern: pattern.to_owned(),
                dir: fixed,
            });
        }
        Err(e) => return Err(e.into()),
    }
    let depth = segs.len() - first;
    let mut out = Vec::new();
    let mut matched = Vec::new();
    walk_match(
        &base.host,
        "",
        depth,
        &rest,
        &base.inner,
        pattern,
        opts.ignore,
        &mut matched,
    )?;
    for (inner, rel) in matched {
        if let Some(m) = opts.exclude
            && m.matches(&rel)
        {
            continue;
        }
        out.push(inner);
    }
    Ok(out)
}

#[expect(clippy::too_many_arguments, reason = "a private recursive walker")]
fn walk_match(
    dir: &Path,
    rel: &str,
    depth_left: usize,
    rest: &str,
    base_inner: &str,
    pattern: &str,
    ignore: Option<&PatternMatcher>,
    out: &mut Vec<(String, String)>,
) -> Result<(), FileOpError> {
    if depth_left == 0 {
        return Ok(());
    }
    let mut names: Vec<_> = fs_err::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let inner = if base_inner == "/" {
            format!("/{child_rel}")
        } else {
            format!("{base_inner}/{child_rel}")
        };
        let root_rel = inner.trim_start_matches('/');
        let host = dir.join(&name);
        let meta = fs_err::symlink_metadata(&host)?;
        if let Some(m) = ignore
            && m.matches(root_rel)
            && (!meta.is_dir() || m.can_skip_dir(root_rel))
        {
            continue;
        }
        let matched = go_match(rest, &child_rel).map_err(|_| FileOpError::BadPattern {
            pattern: pattern.to_owned(),
        })?;
        if matched {
            out.push((inner, child_rel));
            continue;
        }
        if meta.is_dir() {
            walk_match(
                &host,
                &child_rel,
                depth_left - 1,
                rest,
                base_inner,
                pattern,
                ignore,
                out,
            )?;
        }
    }
    Ok(())
}

/// The pattern is malformed (Go's `ErrBadPattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPattern;

/// Go's `filepath.Match` on Unix: `*` matches any run of non-`/`
/// characters, `?` one non-`/` character, `[...]` a class (`^` negates,
/// `a-z` ranges), `\` escapes. The whole name must match. A malformed
/// pattern is an error even when an earlier part already failed to match.
///
/// ```
/// use kiln_solver::fileop::go_match;
/// assert_eq!(go_match("*.txt", "a.txt"), Ok(true));
/// assert_eq!(go_match("*.txt", "d/a.txt"), Ok(false));
/// assert_eq!(go_match("a/[b-d]?", "a/cx"), Ok(true));
/// assert!(go_match("[", "x").is_err());
/// ```
pub fn go_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    validate(pattern)?;
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    Ok(match_from(&p, &n))
}

fn validate(p: &str) -> Result<(), BadPattern> {
    let c: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '\\' => {
                if i + 1 >= c.len() {
                    return Err(BadPattern);
                }
                i += 2;
            }
            '[' => {
                i = class_end(&c, i + 1)?;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// The index after the `]` closing a class whose body starts at `i`.
fn class_end(c: &[char], mut i: usize) -> Result<usize, BadPattern> {
    if c.get(i) == Some(&'^') {
        i += 1;
    }
    let mut first = true;
    loop {
        match c.get(i) {
            None => return Err(BadPattern),
            Some(']') if !first => return Ok(i + 1),
            Some(_) => {
                let (_, next) = class_char(c, i)?;
                i = next;
                if c.get(i) == Some(&'-') {
                    if c.get(i + 1) == Some(&']') || c.get(i + 1).is_none() {
                        return Err(BadPattern);
                    }
                    let (_, next) = class_char(c, i + 1)?;
                    i = next;
                }
            }
        }
        first = false;
    }
}

fn class_char(c: &[char], i: usize) -> Result<(char, usize), BadPattern> {
    match c.get(i) {
        Some('\\') => c.get(i + 1).map(|&ch| (ch, i + 2)).ok_or(BadPattern),
        Some('-') | Some(']') | None => Err(BadPattern),
        Some(&ch) => Ok((ch, i + 1)),
    }
}

fn match_from(p: &[char], n: &[char]) -> bool {
    let (mut pi, mut ni) = (0, 0);
    // Backtracking point for the last `*`: (pattern index after it, name index).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi + 1, ni));
                    pi += 1;
                    continue;
                }
                '?' if ni < n.len() && n[ni] != '/' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' if ni < n.len() && n[ni] != '/' => {
                    if let Some((ok, next)) = match_class(p, pi + 1, n[ni])
                        && ok
                    {
                        pi = next;
                        ni += 1;
                        continue;
                    }
                }
                '\\' if pi + 1 < p.len() && ni < n.len() && p[pi + 1] == n[ni] => {
                    pi += 2;
                    ni += 1;
                    continue;
                }
                ch if !matches!(ch, '?' | '[' | '\\') && ni < n.len() && ch == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        } else if ni == n.len() {
            return true;
        }
        // Mismatch: let the last `*` eat one more character, never a `/`.
        match star {
            Some((sp, sn)) if sn < n.len() && n[sn] != '/' => {
                star = Some((sp, sn + 1));
                pi = sp;
                ni = sn + 1;
            }
            _ => return false,
        }
    }
}

/// Match `ch` against the class whose body starts at `i`; the index after
/// the class. `None` when malformed (validated before, so not expected).
fn match_class(p: &[char], mut i: usize, ch: char) -> Option<(bool, usize)> {
    let negated = p.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        match p.get(i)? {
            ']' if !first => return Some((matched != negated, i + 1)),
            _ => {
                let (lo, next) = class_char(p, i).ok()?;
                i = next;
                let mut hi = lo;
                if p.get(i) == Some(&'-') {
                    let (h, next) = class_char(p, i + 1).ok()?;
                    hi = h;
                    i = next;
                }
                if lo <= ch && ch <= hi {
                    matched = true;
                }
            }
        }
        first = false;
    }
}

/// `base/name`, or `name` when `base` is empty (without `format!`, which
/// a walk of thousands of files pays for per file): a child's path below
/// a source root, as the pattern walk and the copier build it.
pub(super) fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        return name.to_owned();
    }
    let mut s = String::with_capacity(base.len() + 1 + name.len());
    s.push_str(base);
    s.push('/');
    s.push_str(name);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from Go's path/filepath match_test.go.
    #[test]
    fn go_match_vectors() {
        let cases: &[(&str, &str, Result<bool, BadPattern>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("a[^a][^a][^a]b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "x", Ok(true)),
            ("[x\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[\\-x]", "x", Ok(true)),
            ("[\\-x]", "-", Ok(true)),
            ("[\\-x]", "a", Ok(false)),
            ("[]a]", "]", Err(BadPattern)),
            ("[-]", "-", Err(BadPattern)),
            ("[x-]", "x", Err(BadPattern)),
            ("[x-]", "-", Err(BadPattern)),
            ("[x-]", "z", Err(BadPattern)),
            ("[-x]", "x", Err(BadPattern)),
            ("[-x]", "-", Err(BadPattern)),
            ("[-x]", "a", Err(BadPattern)),
            ("\\", "a", Err(BadPattern)),
            ("[a-b-c]", "a", Err(BadPattern)),
            ("[", "a", Err(BadPattern)),
            ("[^", "a", Err(BadPattern)),
            ("[^bc", "a", Err(BadPattern)),
            ("a[", "a", Err(BadPattern)),
            ("a[", "ab", Err(BadPattern)),
            ("a[", "x", Err(BadPattern)),
            ("a/b[", "x", Err(BadPattern)),
            ("*x", "xxx", Ok(true)),
        ];
        for (p, n, want) in cases {
            assert_eq!(go_match(p, n), *want, "pattern {p:?} name {n:?}");
        }
    }

    #[test]
    fn wildcard_detection_honours_escapes() {
        assert!(contains_wildcards("a/*.txt"));
        assert!(contains_wildcards("a[bc]"));
        assert!(!contains_wildcards("a\\*b"));
        assert!(!contains_wildcards("plain/path"));
    }
}
