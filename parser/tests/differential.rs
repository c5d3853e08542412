//! Differential test against BuildKit's own Go parser.
//!
//! The PyPI package `dockerfile` (3.4.0) wraps moby/buildkit's
//! `frontend/dockerfile/parser`. `buildkit_parse.py` runs it ONCE over a
//! batch of files: the 257 real-world Dockerfiles, the conformance cases,
//! and a few thousand Dockerfiles generated and mutated here with a seeded
//! RNG. For every file the outcome (error or not) must agree, and for every
//! instruction: keyword, flags, arguments, JSON form, start/end line and
//! heredocs (name, fd, body).
//!
//! Documented differences between the binding and BuildKit 1.26 (the
//! comparison adjusts for each; kiln follows 1.26):
//! 1. ENV/LABEL: 1.26 stores (key, value, separator) triples, the binding's
//!    older parser stores (key, value) pairs: kiln's separators are dropped
//!    before comparing.
//! 2. ONBUILD: the binding reports the trigger's keyword as `sub_cmd` and its
//!    arguments as `value`, but not the trigger's flags nor the heredocs:
//!    those two are not compared for ONBUILD.
//! 3. The binding truncates strings at NUL: inputs with a NUL (raw or as
//!    the JSON escape `\u0000`) are left out.
//! 4. Where Go's byte-wise flag splitting cuts a UTF-8 character, Go holds a
//!    string that is not UTF-8; the binding cannot return it and kiln (whose
//!    strings are UTF-8) shows U+FFFD instead: such inputs are skipped.
//! 5. The binding's shell lexer predates `${v#p}`, `${v%p}` and `${v/p/r}`
//!    and fails on them, so on a line holding one it finds no heredoc at all;
//!    BuildKit 1.26 (and kiln) lex them. Inputs with `<<` and such a pattern
//!    are skipped.
//! 6. The binding predates the `# check=` directive (a comment to it, which
//!    also ends the directive block): inputs where kiln sees a `check`
//!    directive are skipped.
//!
//! Without the Python module the test prints a skip message, except under
//! `CI=true`, where a missing module is a failure.

#![expect(
    clippy::print_stderr,
    reason = "the test reports what it compared and skipped"
)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use kiln_parser::{ErrorKind, Node, parse_nodes};
use serde_json::Value;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const KEYWORDS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "ENTRYPOINT",
    "SHELL",
    "ENV",
    "ARG",
    "LABEL",
    "EXPOSE",
    "VOLUME",
    "USER",
    "WORKDIR",
    "COPY",
    "ADD",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "MAINTAINER",
    "from",
    "run",
    "Copy",
    "COPPY",
    "FORM",
];

const FLAGS: &[&str] = &[
    "--from=build",
    "--chown=1000:1000",
    "--chmod=0755",
    "--link",
    "--link=false",
    "--platform=$BUILDPLATFORM",
    "--mount=type=cache,target=/root/.cache",
    "--mount=type=secret,id=tok,required",
    "--network=none",
    "--chown=\"a b\"",
    "--a='x y'",
    "--x\\ y=z",
    "--",
    "--interval=5s",
    "--exclude=*.md",
    "--=",
    "-- ",
];

const ARGS: &[&str] = &[
    "alpine:3.20",
    "golang AS build",
    "echo hello world",
    "echo \"a  b\" 'c d' \\$HOME",
    "[\"/bin/sh\", \"-c\", \"echo hi\"]",
    "[\"a\", 1]",
    "['single']",
    "[\"unterminated",
    "[ ]",
    "[\"a\"] trailing",
    "a=b c=\"d e\" f=g\\ h",
    "name value with spaces",
    "KEY",
    "x=1 y",
    "80/tcp 443",
    "/data /logs",
    "src/ /dst/",
    "<<EOF /dst",
    "<<-'EOT' /dst",
    "cat <<EOF > /x",
    "3<<\"END\" python3",
    "cat<<EOF",
    "<<EOF <<EOF2 bash",
    "CMD curl -f http://localhost/",
    "NONE",
    "CMD [\"true\"]",
    "RUN echo onbuild",
    "ONBUILD RUN x",
    "COPY <<EOF /x",
    "\"quoted \\\" text\"",
    "a`b c",
    "\u{e0} \u{2603} \u{a0}x",
    "<<'E O' /x",
    "<<E\\OF /x",
    "<<\"\" /x",
    "<<'' /x",
    "${a:-b c} <<EOF",
    "$1 <<EOF x",
    "\"$(cat)\" <<EOF",
    "${} <<EOF",
    "\"a\\b\" <<-EOF",
    "",
];

fn generate(rng: &mut Rng) -> String {
    let nl = if rng.chance(10) { "\r\n" } else { "\n" };
    let mut escape = '\\';
    let mut out = String::new();
    if rng.chance(30) {
        let d = rng.pick(&[
            "# syntax=docker/dockerfile:1",
            "# escape=`",
            "# escape=\\",
            "#check=skip=all",
            "# ESCAPE = `",
            "# foo=bar",
            "# syntax=a",
        ]);
        if d.to_ascii_lowercase().contains("escape") && d.ends_with('`') {
            escape = '`';
        }
        out.push_str(d);
        out.push_str(nl);
        if rng.chance(20) {
            out.push_str("# syntax=b");
            out.push_str(nl);
        }
    }
    let count = 1 + rng.below(8);
    for _ in 0..count {
        if rng.chance(15) {
            out.push_str(rng.pick(&["# a comment", "", "   ", "\t# indented comment"]));
            out.push_str(nl);
        }
        if rng.chance(15) {
            out.push_str(rng.pick(&["  ", "\t"]));
        }
        let kw = rng.pick(KEYWORDS);
        let mut words: Vec<String> = vec![kw.to_string()];
        for _ in 0..rng.below(3) {
            words.push(rng.pick(FLAGS).to_string());
        }
        words.push(rng.pick(ARGS).to_string());
        if rng.chance(30) {
            words.push(rng.pick(ARGS).to_string());
        }
        for (i, w) in words.iter().enumerate() {
            if i > 0 {
                if rng.chance(12) {
                    out.push(' ');
                    out.push(escape);
                    if rng.chance(20) {
                        out.push_str("  ");
                    }
                    out.push_str(nl);
                    if rng.chance(20) {
                        out.push_str(rng.pick(&["# inside", "", "  "]));
                        out.push_str(nl);
                    }
                    if rng.chance(50) {
                        out.push_str("    ");
                    }
                } else {
                    out.push(' ');
                }
            }
            out.push_str(w);
        }
        let line = words.join(" ");
        out.push_str(nl);
        if line.contains("<<") {
            for name in ["EOF", "EOT", "END", "EOF2", "E O", "E\\OF", "EOF\"", ""] {
                if line.contains(name) && rng.chance(85) {
                    out.push_str("body line $x");
                    out.push_str(nl);
                    if rng.chance(30) {
                        out.push_str("\tindented");
                        out.push_str(nl);
                    }
                    if rng.chance(20) {
                        out.push('\t');
                    }
                    out.push_str(name);
                    out.push_str(nl);
                }
            }
        }
    }
    if rng.chance(15) {
        out.truncate(out.trim_end_matches(['\r', '\n']).len());
    }
    out
}

const SNIPPETS: &[&str] = &[
    "\\\n", "\\", "`", "\"", "'", "[", "]", " ", "\n", "# ", "<<EOF\n", "=", "--", "\t", "\r\n",
    "\n\n", "EOF\n", "{", ",", "ONBUILD ", "<<-", "\\ \n",
];

fn mutate(rng: &mut Rng, src: &str) -> String {
    let mut s = src.to_string();
    for _ in 0..1 + rng.below(3) {
        let lines: Vec<&str> = s.split_inclusive('\n').collect();
        if lines.is_empty() {
            break;
        }
        let i = rng.below(lines.len());
        s = match rng.below(5) {
            0 => lines
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != i)
                .map(|(_, l)| *l)
                .collect(),
            1 => {
                let mut v = lines.clone();
                v.insert(i, lines[i]);
                v.concat()
            }
            2 if i + 1 < lines.len() => {
                let mut v = lines.clone();
                v.swap(i, i + 1);
                v.concat()
            }
            3 => {
                let mut at = rng.below(s.len() + 1);
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                let mut t = s.clone();
                t.insert_str(at, rng.pick(SNIPPETS));
                t
            }
            _ => {
                let mut at = rng.below(s.len() + 1);
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                s[..at].to_string()
            }
        };
    }
    s
}

/// Whether the text holds `${name#...`, `${name%...` or `${name/...`
/// (exception 5).
fn has_pattern_modifier(text: &str) -> bool {
    text.match_indices("${").any(|(i, _)| {
        let rest = &text[i + 2..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        name_len > 0 && rest[name_len..].starts_with(['#', '%', '/'])
    })
}

fn python_has_binding() -> bool {
    Command::new("python3")
        .args(["-c", "import dockerfile"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Compares one instruction; returns a description of the first difference.
fn compare_node(n: &Node, b: &Value) -> Option<String> {
    let kw = b["cmd"].as_str().unwrap_or("");
    if n.keyword != kw {
        return Some(format!("keyword {:?} vs {kw:?}", n.keyword));
    }
    let (start, end) = (b["start_line"].as_u64()?, b["end_line"].as_u64()?);
    if (n.span.start.line as u64, n.span.end.line as u64) != (start, end) {
        return Some(format!(
            "lines {}-{} vs {start}-{end}",
            n.span.start.line, n.span.end.line
        ));
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    if n.flags != strings(&b["flags"]) {
        return Some(format!("flags {:?} vs {:?}", n.flags, b["flags"]));
    }
    let (args, json) = match &n.sub {
        Some(sub) => {
            let sub_cmd = b["sub_cmd"].as_str().unwrap_or("");
            if !sub.keyword.eq_ignore_ascii_case(sub_cmd) {
                return Some(format!("onbuild trigger {:?} vs {sub_cmd:?}", sub.keyword));
            }
            if sub.sub.is_some() {
                // Exception 2: for `ONBUILD ONBUILD ...` the binding shows
                // one empty value; only the trigger keyword is comparable.
                return None;
            }
            (sub.args.clone(), sub.json)
        }
        None => (n.args.clone(), n.json),
    };
    let args: Vec<String> = if n.keyword_is("env") || n.keyword_is("label") {
        // Exception 1: drop the separators of the (key, value, sep) triples.
        args.chunks(3)
            .flat_map(|t| t.iter().take(2).cloned())
            .collect()
    } else {
        args
    };
    if args != strings(&b["value"]) {
        return Some(format!("args {args:?} vs {:?}", b["value"]));
    }
    if json != b["json"].as_bool().unwrap_or(false) {
        return Some(format!("json {json} vs {}", b["json"]));
    }
    if n.sub.is_none() {
        let theirs: Vec<(String, u64, String)> = b["heredocs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|h| {
                        (
                            h["name"].as_str().unwrap_or("").to_string(),
                            h["fd"].as_u64().unwrap_or(0),
                            h["content"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ours: Vec<(String, u64, String)> = n
            .heredocs
            .iter()
            .map(|h| (h.name.clone(), h.file_descriptor, h.content.clone()))
            .collect();
        if ours != theirs {
            return Some(format!("heredocs {ours:?} vs {theirs:?}"));
        }
    }
    None
}

#[test]
fn kiln_agrees_with_buildkits_go_parser() {
    if !python_has_binding() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but python3 cannot import `dockerfile`: run `bash .ci/setup`"
        );
        eprintln!("skipping: python3 module `dockerfile` missing (bash .ci/setup installs it)");
        return;
    }
    let mut inputs: Vec<(String, String)> = Vec::new();
    let mut seeds: Vec<String> = Vec::new();
    for path in common::real_world() {
        let text = common::read(&path);
        seeds.push(text.clone());
        inputs.push((path.display().to_string(), text));
    }
    for set in ["buildkit-parser", "buildkit-parser-negative"] {
        for case in common::case_dirs(set) {
            let text = common::read(&case.join("Dockerfile"));
            if !text.contains('\0') {
                seeds.push(text.clone());
                inputs.push((case.display().to_string(), text));
            }
        }
    }
    let mut rng = Rng(0x6b69_6c6e_2d70_6172);
    for i in 0..1500 {
        inputs.push((format!("generated #{i}"), generate(&mut rng)));
    }
    for i in 0..1500 {
        let seed = &seeds[rng.below(seeds.len())];
        inputs.push((format!("mutated #{i}"), mutate(&mut rng, seed)));
    }
    // BuildKit's scanner refuses a physical line over 64 KiB (65536 bytes
    // with its newline, 65535 without).
    for n in [65_535, 65_536, 65_537] {
        let body = "x".repeat(n - 5);
        inputs.push((
            format!("long line {n}"),
            format!("FROM a\nRUN {body}\nUSER b\n"),
        ));
        inputs.push((
            format!("long last line {n}"),
            format!("FROM a\nRUN {body}x"),
        ));
    }
    // Extra inputs (e.g. a fuzz corpus) from `$KILN_DIFF_EXTRA`, a directory.
    if let Some(dir) = std::env::var_os("KILN_DIFF_EXTRA") {
        for entry in fs_err::read_dir(&dir).expect("KILN_DIFF_EXTRA is a directory") {
            let path = entry.expect("dir entry").path();
            if let Ok(text) = String::from_utf8(fs_err::read(&path).expect("read extra input")) {
                inputs.push((path.display().to_string(), text));
            }
        }
    }
    // Exception 3: the binding truncates at NUL.
    inputs.retain(|(_, t)| !t.contains('\0') && !t.contains("\\u0000"));

    let dir = tempfile::tempdir().expect("temp dir");
    let mut list = String::new();
    for (i, (_, text)) in inputs.iter().enumerate() {
        let p: PathBuf = dir.path().join(format!("{i}.Dockerfile"));
        fs_err::write(&p, text).expect("write input");
        list.push_str(&format!("{}\n", p.display()));
    }
    let list_path = dir.path().join("list.txt");
    fs_err::write(&list_path, list).expect("write list");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/buildkit_parse.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&list_path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "buildkit_parse.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(results.len(), inputs.len());

    let mut mismatches = Vec::new();
    let (mut both_ok, mut both_err) = (0, 0);
    let mut undecodable = 0;
    let mut pattern_lines = 0;
    let mut check_skipped = 0;
    for ((name, text), theirs) in inputs.iter().zip(&results) {
        if theirs["ok"].is_null() {
            undecodable += 1;
            continue;
        }
        if text.contains("<<") && has_pattern_modifier(text) {
            pattern_lines += 1;
            continue;
        }
        let ours = parse_nodes(text);
        let check_directive = match &ours {
            Ok(f) => f.directives.iter().any(|d| d.name == "check"),
            Err(e) => *e.kind == ErrorKind::DuplicateDirective("check".into()),
        };
        if check_directive {
            check_skipped += 1;
            continue;
        }
        let problem = match (&ours, theirs["ok"].as_bool().unwrap_or(false)) {
            (Ok(file), true) => {
                both_ok += 1;
                let nodes = theirs["nodes"].as_array().cloned().unwrap_or_default();
                if nodes.len() != file.nodes.len() {
                    Some(format!(
                        "{} instructions vs {}",
                        file.nodes.len(),
                        nodes.len()
                    ))
                } else {
                    file.nodes
                        .iter()
                        .zip(&nodes)
                        .enumerate()
                        .find_map(|(k, (n, b))| {
                            compare_node(n, b)
                                .map(|d| format!("instruction {k} ({}): {d}", n.keyword))
                        })
                }
            }
            (Err(_), false) => {
                both_err += 1;
                None
            }
            (Ok(_), false) => Some(format!("kiln accepts, BuildKit says: {}", theirs["error"])),
            (Err(e), true) => Some(format!("kiln refuses ({}), BuildKit accepts", e.message())),
        };
        if let Some(p) = problem {
            mismatches.push(format!(
                "{name}: {p}\n--- input ---\n{text:?}\n-------------"
            ));
        }
    }
    eprintln!(
        "differential: {} inputs, {both_ok} parsed by both, {both_err} refused by both, {undecodable} skipped (exception 4), {pattern_lines} skipped (exception 5), {check_skipped} skipped (exception 6)",
        inputs.len()
    );
    assert!(
        undecodable + pattern_lines < inputs.len() / 10,
        "too many skipped inputs"
    );
    assert!(inputs.len() > 3000);
    assert!(
        both_ok > 1000 && both_err > 50,
        "the generator lost its variety: {both_ok} ok, {both_err} errors"
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} inputs differ from BuildKit:\n{}",
        mismatches.len(),
        inputs.len(),
        mismatches
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
