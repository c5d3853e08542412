//! `.dockerignore` semantics: moby/patternmatcher's test tables (written out
//! here as data), its `ignorefile` reader, the Dockerfile-specific ignore file
//! rule with real files, and property tests.

use kiln_parser::{
    DockerignoreError, MatchInfo, PatternMatcher, clean_path, read_dockerignore,
    read_ignore_patterns,
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pass {
    /// No match, not even through a parent directory.
    Fail,
    /// The path itself matches.
    Exact,
    /// Only a parent directory of the path matches.
    Inexact,
}
use Pass::{Exact, Fail, Inexact};

/// patternmatcher's `TestMatches` table (Unix).
const SINGLE: &[(&str, &str, Pass)] = &[
    ("**", "file", Exact),
    ("**", "file/", Exact),
    ("**/", "file", Exact),
    ("**/", "file/", Exact),
    ("**", "/", Exact),
    ("**/", "/", Exact),
    ("**", "dir/file", Exact),
    ("**/", "dir/file", Exact),
    ("**", "dir/file/", Exact),
    ("**/", "dir/file/", Exact),
    ("**/**", "dir/file", Exact),
    ("**/**", "dir/file/", Exact),
    ("dir/**", "dir/file", Exact),
    ("dir/**", "dir/file/", Exact),
    ("dir/**", "dir/dir2/file", Exact),
    ("dir/**", "dir/dir2/file/", Exact),
    ("**/dir", "dir", Exact),
    ("**/dir", "dir/file", Inexact),
    ("**/dir2/*", "dir/dir2/file", Exact),
    ("**/dir2/*", "dir/dir2/file/", Inexact),
    ("**/dir2/**", "dir/dir2/dir3/file", Exact),
    ("**/dir2/**", "dir/dir2/dir3/file/", Exact),
    ("**file", "file", Exact),
    ("**file", "dir/file", Exact),
    ("**/file", "dir/file", Exact),
    ("**file", "dir/dir/file", Exact),
    ("**/file", "dir/dir/file", Exact),
    ("**/file*", "dir/dir/file", Exact),
    ("**/file*", "dir/dir/file.txt", Exact),
    ("**/file*txt", "dir/dir/file.txt", Exact),
    ("**/file*.txt", "dir/dir/file.txt", Exact),
    ("**/file*.txt*", "dir/dir/file.txt", Exact),
    ("**/**/*.txt", "dir/dir/file.txt", Exact),
    ("**/**/*.txt2", "dir/dir/file.txt", Fail),
    ("**/*.txt", "file.txt", Exact),
    ("**/**/*.txt", "file.txt", Exact),
    ("a**/*.txt", "a/file.txt", Exact),
    ("a**/*.txt", "a/dir/file.txt", Exact),
    ("a**/*.txt", "a/dir/dir/file.txt", Exact),
    ("a/*.txt", "a/dir/file.txt", Fail),
    ("a/*.txt", "a/file.txt", Exact),
    ("a/*.txt**", "a/file.txt", Exact),
    ("a[b-d]e", "ae", Fail),
    ("a[b-d]e", "ace", Exact),
    ("a[b-d]e", "aae", Fail),
    ("a[^b-d]e", "aze", Exact),
    (".*", ".foo", Exact),
    (".*", "foo", Fail),
    ("abc.def", "abcdef", Fail),
    ("abc.def", "abc.def", Exact),
    ("abc.def", "abcZdef", Fail),
    ("abc?def", "abcZdef", Exact),
    ("abc?def", "abcdef", Fail),
    ("**/foo/bar", "foo/bar", Exact),
    ("**/foo/bar", "dir/foo/bar", Exact),
    ("**/foo/bar", "dir/dir2/foo/bar", Exact),
    ("abc/**", "abc", Fail),
    ("abc/**", "abc/def", Exact),
    ("abc/**", "abc/def/ghi", Exact),
    ("**/.foo", ".foo", Exact),
    ("**/.foo", "bar.foo", Fail),
    ("a(b)c/def", "a(b)c/def", Exact),
    ("a(b)c/def", "a(b)c/xyz", Fail),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", Exact),
    (
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        Exact,
    ),
    (
        "dist/*.whl",
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        Exact,
    ),
    // Unix only: `\` escapes.
    ("a\\\\", "a\\", Exact),
    ("a\\*b", "a*b", Exact),
    // Added here: parent directories, classes, escapes and anchors.
    ("node_modules", "node_modules/a/b.js", Inexact),
    ("node_modules", "src/node_modules/a.js", Fail),
    ("*/node_modules", "src/node_modules/a.js", Inexact),
    ("*.md", "README.md", Exact),
    ("*.md", "docs/README.md", Fail),
    ("docs/*.md", "docs/a.md", Exact),
    ("docs", "docs", Exact),
    ("docs", "docsx", Fail),
    ("[!a]x", "!x", Exact),
    ("[\\]a]", "]", Exact),
    ("x\\tx", "x\tx", Exact),
    ("x\\dy", "x7y", Exact),
    ("x\\dy", "xdy", Fail),
    ("a^b", "a^b", Exact),
    ("a^b*", "a^bc", Fail),
    ("^a*", "abc", Exact),
    ("é?", "éè", Exact),
    ("??", "é", Fail),
    ("**/x/**/y", "x/y", Exact),
    ("**/x/**/y", "a/x/b/c/y", Exact),
    ("**/x/**/y", "a/x/b/c/y/z", Inexact),
    ("a**b", "a/b", Exact),
    ("a**b", "ab", Exact),
    ("a**b", "a/c/b", Exact),
    ("***", "a/b", Exact),
];

/// patternmatcher's multi-pattern table, and more of the same kind.
const MULTI: &[(&[&str], &str, bool)] = &[
    (&["**", "!util/docker/web"], "util/docker/web/foo", false),
    (
        &["**", "!util/docker/web", "util/docker/web/foo"],
        "util/docker/web/foo",
        true,
    ),
    (
        &[
            "**",
            "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        ],
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        false,
    ),
    (
        &["**", "!dist/*.whl"],
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        false,
    ),
    // The exception tests from patternmatcher's single-purpose tests.
    (&["!fileutils.go", "*.go"], "fileutils.go", true),
    (&["docs", "!docs/README.md"], "docs/README.md", false),
    (&["docs/", "!docs/README.md"], "docs/README.md", false),
    (&["docs/*", "!docs/README.md"], "docs/README.md", false),
    (&["*.go", "!fileutils.go"], "fileutils.go", false),
    (&["*"], "fileutils.go", true),
    (&["*.go"], "fileutils.go", true),
    (&[], "any/path/there", false),
    // The last matching line wins.
    (&["*.log", "!keep.log", "*.log"], "keep.log", true),
    (&["!keep.log", "*.log"], "keep.log", true),
    (&["*", "!*.md", "README*"], "README.md", true),
    (&["*", "!*.md", "README*"], "CHANGES.md", false),
    (
        &["build", "!build/keep", "build/keep/tmp"],
        "build/keep/tmp/x",
        true,
    ),
    (
        &["build", "!build/keep", "build/keep/tmp"],
        "build/keep/y",
        false,
    ),
];

#[test]
fn single_pattern_table() {
    for (pattern, text, pass) in SINGLE {
        let m = PatternMatcher::new([pattern]).unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
        let desc = format!("pattern={pattern:?} text={text:?}");
        assert_eq!(m.matches_exact(text), *pass == Exact, "exact {desc}");
        assert_eq!(m.matches(text), *pass != Fail, "or-parent {desc}");
        assert_eq!(walk_parents(&m, text), *pass != Fail, "using-parent {desc}");
        assert_eq!(
            m.matches_with_parent(text, &MatchInfo::default()).0,
            *pass != Fail,
            "no-context {desc}"
        );
    }
}

#[test]
fn multi_pattern_table() {
    for (patterns, text, want) in MULTI {
        let m = PatternMatcher::new(patterns.iter()).unwrap();
        let desc = format!("patterns={patterns:?} text={text:?}");
        assert_eq!(m.matches(text), *want, "or-parent {desc}");
        assert_eq!(walk_parents(&m, text), *want, "using-parent {desc}");
    }
}

/// Match `text` the way a directory walker does: each parent directory
/// first, carrying the [`MatchInfo`] down (patternmatcher's
/// MatchesUsingParentResults test).
fn walk_parents(m: &PatternMatcher, text: &str) -> bool {
    let mut info = MatchInfo::default();
    let parent = match text.rfind('/') {
        Some(i) => clean_path(&text[..=i]).into_owned(),
        None => ".".to_owned(),
    };
    if parent != "." {
        let parts: Vec<&str> = parent.split('/').collect();
        for i in 0..parts.len() {
            info = m.matches_with_parent(&parts[..=i].join("/"), &info).1;
        }
    }
    m.matches_with_parent(text, &info).0
}

/// Go's filepath.Match tests as patternmatcher runs them (pattern, path,
/// match, bad pattern).
const GO_MATCH: &[(&str, &str, bool, bool)] = &[
    ("abc", "abc", true, false),
    ("*", "abc", true, false),
    ("*c", "abc", true, false),
    ("a*", "a", true, false),
    ("a*", "abc", true, false),
    ("a*", "ab/c", true, false),
    ("a*/b", "abc/b", true, false),
    ("a*/b", "a/c/b", false, false),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", true, false),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true, false),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false, false),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", false, false),
    ("a*b?c*x", "abxbbxdbxebxczzx", true, false),
    ("a*b?c*x", "abxbbxdbxebxczzy", false, false),
    ("ab[c]", "abc", true, false),
    ("ab[b-d]", "abc", true, false),
    ("ab[e-g]", "abc", false, false),
    ("ab[^c]", "abc", false, false),
    ("ab[^b-d]", "abc", false, false),
    ("ab[^e-g]", "abc", true, false),
    ("a\\*b", "a*b", true, false),
    ("a\\*b", "ab", false, false),
    ("a?b", "a☺b", true, false),
    ("a[^a]b", "a☺b", true, false),
    ("a???b", "a☺b", false, false),
    ("a[^a][^a][^a]b", "a☺b", false, false),
    ("[a-ζ]*", "α", true, false),
    ("*[a-ζ]", "A", false, false),
    ("a?b", "a/b", false, false),
    ("a*b", "a/b", false, false),
    ("[\\]a]", "]", true, false),
    ("[\\-]", "-", true, false),
    ("[x\\-]", "x", true, false),
    ("[x\\-]", "-", true, false),
    ("[x\\-]", "z", false, false),
    ("[\\-x]", "x", true, false),
    ("[\\-x]", "-", true, false),
    ("[\\-x]", "a", false, false),
    ("[]a]", "]", false, true),
    ("[-]", "-", false, true),
    ("[x-]", "x", false, true),
    ("[x-]", "-", false, true),
    ("[x-]", "z", false, true),
    ("[-x]", "x", false, true),
    ("[-x]", "-", false, true),
    ("[-x]", "a", false, true),
    ("\\", "a", false, true),
    ("[a-b-c]", "a", false, true),
    ("[", "a", false, true),
    ("[^", "a", false, true),
    ("[^bc", "a", false, true),
    ("a[", "a", false, true),
    ("a[", "ab", false, true),
    ("*x", "xxx", true, false),
    // patternmatcher's regression case: Go accepts the pattern and then
    // fails on every match (reversed range); kiln refuses it up front.
    ("[Local-Only]/", "x", false, true),
];

#[test]
fn go_filepath_match_table() {
    for (pattern, path, want, bad) in GO_MATCH {
        match PatternMatcher::new([pattern]) {
            Err(e) => {
                assert!(bad, "{pattern:?} should compile: {e}");
                assert!(matches!(e, DockerignoreError::BadPattern { .. }), "{e}");
            }
            Ok(m) => {
                assert!(!bad, "{pattern:?} should be a bad pattern");
                assert_eq!(
                    m.matches(&clean_path(path)),
                    *want,
                    "{pattern:?} vs {path:?}"
                );
            }
        }
    }
}

#[test]
fn construction_cleans_trims_and_flags_exceptions() {
    let m = PatternMatcher::new(["docs", "config", ""]).unwrap();
    assert_eq!(m.patterns().len(), 2);
    assert!(!m.has_exclusions());
    for patterns in [
        ["docs", "!docs/README.md"],
        ["docs", "  !docs/README.md"],
        ["docs", "!docs/README.md  "],
    ] {
        let m = PatternMatcher::new(patterns).unwrap();
        assert!(m.has_exclusions(), "{patterns:?}");
        assert_eq!(m.patterns()[1].as_str(), "docs/README.md");
        assert!(m.patterns()[1].is_exclusion());
    }
    let m = PatternMatcher::new(["./a//b/../c/"]).unwrap();
    assert_eq!(m.patterns()[0].as_str(), "a/c");
    let err = PatternMatcher::new(["!"]).unwrap_err();
    assert!(matches!(
        err,
        DockerignoreError::IllegalExclusion { line: None }
    ));
    assert_eq!(err.to_string(), "illegal exclusion pattern `!`");
}

#[test]
fn ignore_file_reader() {
    // patternmatcher's ignorefile TestReadAll.
    let content =
        "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
    assert_eq!(
        read_ignore_patterns(content),
        [
            "test1",
            "test2",
            "a/file/here",
            "lastfile",
            "!inverted/abs/path",
            "!",
            "!"
        ]
    );
    assert!(read_ignore_patterns("").is_empty());
    // A BOM, CRLF line ends, a comment only at column 0, cleaning.
    assert_eq!(
        read_ignore_patterns("\u{feff}a\r\n  # not a comment\r\n/\r\n./b/../c/\r\n\t*.log \r\n"),
        ["a", "# not a comment", "/", "c", "*.log"]
    );
}

#[test]
fn ignore_file_errors_name_the_line() {
    let err = PatternMatcher::from_ignore_file_text("a\n# c\n\nb[\n").unwrap_err();
    assert!(
        matches!(&err, DockerignoreError::BadPattern { pattern, line: Some(4), .. } if pattern == "b["),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("syntax error in pattern `b[` on line 4"),
        "{text}"
    );
    assert!(text.contains("hint:"), "{text}");
    let err = PatternMatcher::from_ignore_file_text("a\n!\n").unwrap_err();
    assert_eq!(err.to_string(), "illegal exclusion pattern `!` on line 2");
}

#[test]
fn skipping_directories_follows_buildkit() {
    let m = PatternMatcher::new(["node_modules", "build"]).unwrap();
    assert!(m.can_skip_dir("node_modules"));
    let m = PatternMatcher::new(["build", "!build/keep/me.txt", "*.tmp"]).unwrap();
    assert!(m.matches("build"));
    assert!(!m.can_skip_dir("build"), "an exception lies inside build/");
    assert!(m.can_skip_dir("other"));
    assert!(!m.can_skip_dir("build/keep"));
    assert!(m.can_skip_dir("build/keeps"));
    assert!(!m.matches("build/keep/me.txt"));
    // BuildKit only looks at the literal text of exceptions.
    let m = PatternMatcher::new(["build", "!**/keep"]).unwrap();
    assert!(m.can_skip_dir("build"));
}

#[test]
fn dockerfile_specific_ignore_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    fs_err::create_dir_all(ctx.join("sub")).unwrap();
    fs_err::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    fs_err::write(ctx.join("sub/app.Dockerfile"), "FROM scratch\n").unwrap();

    // No ignore file at all.
    assert!(
        read_dockerignore(ctx, &ctx.join("Dockerfile"))
            .unwrap()
            .is_none()
    );

    fs_err::write(ctx.join(".dockerignore"), "# context\n*.log\n").unwrap();
    let found = read_dockerignore(ctx, &ctx.join("Dockerfile"))
        .unwrap()
        .unwrap();
    assert_eq!(found.path, ctx.join(".dockerignore"));
    assert!(found.matcher.matches("x.log"));

    // Without its own file, a Dockerfile elsewhere uses the context's.
    let found = read_dockerignore(ctx, &ctx.join("sub/app.Dockerfile"))
        .unwrap()
        .unwrap();
    assert_eq!(found.path, ctx.join(".dockerignore"));

    // `<name>.dockerignore` beside the Dockerfile wins, and is not merged.
    fs_err::write(ctx.join("sub/app.Dockerfile.dockerignore"), "secrets\n").unwrap();
    let found = read_dockerignore(ctx, &ctx.join("sub/app.Dockerfile"))
        .unwrap()
        .unwrap();
    assert_eq!(found.path, ctx.join("sub/app.Dockerfile.dockerignore"));
    assert!(found.matcher.matches("secrets/key"));
    assert!(!found.matcher.matches("x.log"));

    // The plain Dockerfile still uses the context's file.
    let found = read_dockerignore(ctx, &ctx.join("Dockerfile"))
        .unwrap()
        .unwrap();
    assert_eq!(found.path, ctx.join(".dockerignore"));

    // Errors name the file and the line.
    fs_err::write(ctx.join("Dockerfile.dockerignore"), "ok\n[bad\n").unwrap();
    let err = read_dockerignore(ctx, &ctx.join("Dockerfile")).unwrap_err();
    assert!(err.to_string().contains("Dockerfile.dockerignore"), "{err}");
    let source = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(source.contains("on line 2"), "{source}");

    // A directory where the file should be is a read error, not "absent".
    fs_err::remove_file(ctx.join("Dockerfile.dockerignore")).unwrap();
    fs_err::create_dir(ctx.join("Dockerfile.dockerignore")).unwrap();
    let err = read_dockerignore(ctx, &ctx.join("Dockerfile")).unwrap_err();
    assert!(matches!(err, DockerignoreError::Read { .. }), "{err:?}");
}

proptest! {
    #[test]
    fn never_panics(pattern in "\\PC{0,20}", path in "\\PC{0,30}") {
        if let Ok(m) = PatternMatcher::new([&pattern, "!x"]) {
            let _ = m.matches(&path);
            let _ = m.matches_exact(&path);
            let _ = m.matches_with_parent(&path, &MatchInfo::default());
            let _ = m.can_skip_dir(&path);
        }
        let _ = PatternMatcher::from_ignore_file_text(&pattern);
    }

    #[test]
    fn never_panics_on_glob_like_input(
        pattern in "[a-c*?/\\[\\]^!\\\\.-]{0,16}",
        path in "[a-c/.]{0,16}",
    ) {
        if let Ok(m) = PatternMatcher::new([&pattern]) {
            let (fast, _) = m.matches_with_parent(&path, &MatchInfo::default());
            prop_assert_eq!(fast, m.matches(&path));
        }
    }

    /// A literal name excludes itself and everything under it, and nothing
    /// beside it.
    #[test]
    fn literal_directory_covers_its_tree(
        dir in "[a-z]{1,8}(/[a-z]{1,8}){0,2}",
        rest in "[a-z]{1,8}(/[a-z]{1,8}){0,2}",
    ) {
        let m = PatternMatcher::new([&dir]).unwrap();
        prop_assert!(m.matches(&dir));
        let inside = format!("{dir}/{rest}");
        prop_assert!(m.matches(&inside));
        let beside = format!("{dir}x/{rest}");
        prop_assert!(!m.matches(&beside));
        // An exception for the same tree re-includes it.
        let m = PatternMatcher::new([dir.as_str(), &format!("!{dir}")]).unwrap();
        prop_assert!(!m.matches(&inside));
    }
}

#[test]
fn walker_form_keeps_patternmatcher_quirk() {
    // MatchesUsingParentResults (what BuildKit's walker calls) only re-checks
    // a pattern against the path itself when the parent skipped it; with an
    // exception that matched only the parent, it disagrees with
    // MatchesOrParentMatches. kiln keeps both, each exact.
    let m = PatternMatcher::new(["a/*", "!a"]).unwrap();
    assert!(!m.matches("a/b"));
    assert!(walk_parents(&m, "a/b"));
    // With no parent information both forms agree.
    assert!(!m.matches_with_parent("a/b", &MatchInfo::default()).0);
}

#[test]
fn unclean_and_odd_paths() {
    let m = PatternMatcher::new(["a/b", "**/c"]).unwrap();
    // Paths are used as given; parents are cleaned like Go's filepath.Dir.
    assert!(m.matches("a/b//x"));
    assert!(m.matches("x/c/"));
    assert!(!m.matches("a//b"));
    assert!(m.matches(&clean_path("a//b")));
    // Absolute paths split into an empty first directory, as in Go.
    let m = PatternMatcher::new(["**"]).unwrap();
    assert!(m.matches("/abs/path"));
    let m = PatternMatcher::new(["abs"]).unwrap();
    assert!(!m.matches("/abs/path"));
}

#[test]
fn error_messages() {
    let texts = ["ok\n[abc\n", "a\n\n!\n", "x/[z-a]\n", "\\q\n", "a\\\n"];
    let out: String = texts
        .iter()
        .map(|t| match PatternMatcher::from_ignore_file_text(t) {
            Ok(_) => format!("{t:?}\n  ok\n"),
            Err(e) => format!("{t:?}\n  {e}\n"),
        })
        .collect();
    insta::assert_snapshot!(out);
}

/// patternmatcher builds a Go regular expression from each pattern; this is
/// that construction again, with the `regex` crate (the same RE2 syntax for
/// everything generated below), as an independent reference for kiln's
/// hand-written matcher. `None` when the pattern is refused.
fn reference_match(pattern: &str, path: &str) -> Option<bool> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut re = String::from("^");
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regexp,
    }
    let mut kind = Kind::Exact;
    let (mut idx, mut iteration) = (0, 0);
    while idx < chars.len() {
        let ch = chars[idx];
        idx += 1;
        if ch == '*' {
            if chars.get(idx) == Some(&'*') {
                idx += 1;
                if chars.get(idx) == Some(&'/') {
                    idx += 1;
                }
                if idx == chars.len() {
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = Kind::Regexp;
                    }
                } else {
                    re.push_str("(.*/)?");
                    kind = Kind::Regexp;
                }
                if iteration == 0 {
                    kind = Kind::Suffix;
                }
            } else {
                re.push_str("[^/]*");
                kind = Kind::Regexp;
            }
        } else if ch == '?' {
            re.push_str("[^/]");
            kind = Kind::Regexp;
        } else if ".+()|{}$".contains(ch) {
            re.push('\\');
            re.push(ch);
        } else if ch == '\\' {
            let next = *chars.get(idx)?;
            idx += 1;
            re.push('\\');
            re.push(next);
            kind = Kind::Regexp;
        } else {
            if ch == '[' || ch == ']' {
                kind = Kind::Regexp;
            }
            re.push(ch);
        }
        iteration += 1;
    }
    Some(match kind {
        Kind::Exact => path == pattern,
        Kind::Prefix => path.starts_with(&pattern[..pattern.len() - 2]),
        Kind::Suffix => {
            let suffix = &pattern[2..];
            path.ends_with(suffix) || suffix.strip_prefix('/').is_some_and(|s| s == path)
        }
        Kind::Regexp => {
            re.push('$');
            regex::Regex::new(&re).ok()?.is_match(path)
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// kiln's matcher against the regular expression upstream would build.
    #[test]
    fn matcher_agrees_with_upstream_regexp(
        atoms in prop::collection::vec(
            prop::sample::select(vec![
                "a", "b", "/", "*", "**", "**/", "?", ".", "^", "[ab]", "[^a]", "[a-c]", "\\*", "\\.", "+", "é",
            ]),
            1..7,
        ),
        path_atoms in prop::collection::vec(prop::sample::select(vec!["a", "b", "/", ".", "\n", "é", "c", "+"]), 0..9),
    ) {
        let pattern = clean_path(&atoms.concat()).into_owned();
        let path: String = path_atoms.concat();
        let Ok(m) = PatternMatcher::new([&pattern]) else { return Ok(()) };
        // Patterns that compiled here compile upstream too.
        let want = reference_match(m.patterns()[0].as_str(), &path);
        prop_assert!(want.is_some(), "{pattern:?}");
        prop_assert_eq!(m.matches_exact(&path), want.unwrap_or_default(), "{:?} vs {:?}", pattern, path);
    }
}
