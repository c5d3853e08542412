//! BuildKit's own parser test data (../shared/conformance): the 33 dump
//! cases byte for byte, the 4 negative cases, the line-number case, and the
//! 257 real-world Dockerfiles.

mod common;

use kiln_parser::{Command, parse, parse_nodes};

#[test]
fn buildkit_parser_cases_dump_byte_exact() {
    let cases = common::case_dirs("buildkit-parser");
    assert_eq!(cases.len(), 33, "expected all 33 upstream cases");
    let mut failures = Vec::new();
    for case in &cases {
        let src = common::read(&case.join("Dockerfile"));
        let expected = common::read(&case.join("result"));
        match parse_nodes(&src) {
            Ok(file) => {
                if file.dump() != expected {
                    failures.push(format!(
                        "{}:\n--- expected\n{expected}--- got\n{}",
                        case.display(),
                        file.dump()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 33 cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Where the typed layer accepts a case, its dump is the same text.
#[test]
fn typed_dump_matches_node_dump_where_valid() {
    let mut typed_ok = 0;
    for case in common::case_dirs("buildkit-parser") {
        let src = common::read(&case.join("Dockerfile"));
        if let Ok(df) = parse(&src) {
            typed_ok += 1;
            assert_eq!(
                df.dump(),
                common::read(&case.join("result")),
                "{}",
                case.display()
            );
        }
    }
    assert!(typed_ok >= 15, "only {typed_ok} cases pass the typed layer");
}

#[test]
fn buildkit_negative_cases_fail_with_a_location() {
    let cases = common::case_dirs("buildkit-parser-negative");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let src = common::read(&case.join("Dockerfile"));
        let err = match parse_nodes(&src) {
            Ok(f) => panic!("{} parsed: {}", case.display(), f.dump()),
            Err(e) => e.with_file("Dockerfile"),
        };
        assert!(
            err.line >= 1 && err.column >= 1,
            "{}: {err:?}",
            case.display()
        );
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("Dockerfile:{}:{}", err.line, err.column)),
            "{shown}"
        );
        assert!(shown.contains('^'), "{shown}");
        assert!(parse(&src).is_err());
    }
}

#[test]
fn buildkit_line_numbers() {
    let dir = common::conformance().join("buildkit-parser-lines");
    let src = common::read(&dir.join("Dockerfile"));
    let file = parse_nodes(&src).expect("parses");
    let expected = common::read(&dir.join("expected-lines.txt"));
    let mut checked = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[0] {
            "root" => {
                let start = file.nodes.first().expect("a node").span.start.line;
                let end = file.nodes.last().expect("a node").span.end.line;
                assert_eq!(
                    (start, end),
                    (f[1].parse().unwrap(), f[2].parse().unwrap()),
                    "root"
                );
            }
            "child" => {
                let n = &file.nodes[f[1].parse::<usize>().unwrap()];
                assert_eq!(
                    (n.span.start.line, n.span.end.line),
                    (f[2].parse().unwrap(), f[3].parse().unwrap()),
                    "{line}"
                );
            }
            other => panic!("unknown record {other}"),
        }
        checked += 1;
    }
    assert_eq!(file.nodes.len(), 3);
    assert_eq!(checked, 4);
}

#[test]
fn real_world_dockerfiles_parse_and_json_is_stable() {
    let files = common::real_world();
    assert_eq!(files.len(), 257, "expected the 257 real-world files");
    let mut failures = Vec::new();
    for path in &files {
        let src = common::read(path);
        match parse(&src) {
            Ok(df) => {
                assert!(!df.instructions.is_empty(), "{}", path.display());
                assert!(
                    df.stages()
                        .iter()
                        .all(|s| matches!(s.from.command, Command::From(_)))
                );
                let json = serde_json::to_string(&df).expect("serializes");
                let again =
                    serde_json::to_string(&parse(&src).expect("re-parses")).expect("serializes");
                assert_eq!(json, again, "{}", path.display());
                // The dump re-parses to the same dump (print -> parse stable).
                let dump = df.dump();
                assert_eq!(
                    parse_nodes(&src).expect("node layer").dump(),
                    dump,
                    "{}",
                    path.display()
                );
            }
            Err(e) => failures.push(format!("{}:\n{}", path.display(), e.with_file(path))),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 257 failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
