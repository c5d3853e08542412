//! Property tests: no panic on any input; line continuations, CRLF line
//! endings and re-parsing do not change what a well-formed Dockerfile means.

use kiln_parser::{parse, parse_nodes};
use proptest::prelude::*;

fn word() -> impl Strategy<Value = String> {
    // Never starting with `-`: `--` would end the flags.
    "[a-zA-Z0-9_./:][a-zA-Z0-9_./:-]{0,7}"
}

fn stage() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,5}"
}

/// One well-formed instruction line (no continuation, no heredoc).
fn instruction() -> impl Strategy<Value = String> {
    prop_oneof![
        (word(), stage()).prop_map(|(i, s)| format!("FROM {i} AS {s}")),
        prop::collection::vec(word(), 1..6).prop_map(|w| format!("RUN {}", w.join(" "))),
        (word(), word()).prop_map(|(a, b)| format!("RUN [\"{a}\", \"{b}\"]")),
        (stage(), word(), stage(), word())
            .prop_map(|(k, v, k2, v2)| format!("ENV {k}={v} {k2}=\"{v2} x\"")),
        (stage(), word()).prop_map(|(k, v)| format!("LABEL {k}=\"{v} {v}\"")),
        (stage(), prop::option::of(word())).prop_map(|(k, v)| match v {
            Some(v) => format!("ARG {k}={v}"),
            None => format!("ARG {k}"),
        }),
        (stage(), word(), word()).prop_map(|(s, a, b)| format!("COPY --from={s} {a} /{b}")),
        (word(), word()).prop_map(|(a, b)| format!("COPY --chmod=0755 --link {a} /{b}")),
        (word(), word())
            .prop_map(|(a, b)| format!("ADD --checksum=sha256:{} {a} /{b}", "a".repeat(64))),
        word().prop_map(|w| format!("WORKDIR /{w}")),
        word().prop_map(|w| format!("USER {w}")),
        (1u16..65535).prop_map(|p| format!("EXPOSE {p}/tcp")),
        word().prop_map(|w| format!("CMD [\"{w}\"]")),
        (word(), word()).prop_map(|(a, b)| format!("ENTRYPOINT {a} {b}")),
        word().prop_map(|w| format!("VOLUME /{w}")),
        Just("STOPSIGNAL SIGTERM".to_string()),
        word().prop_map(|w| format!("HEALTHCHECK --interval=5s --retries=3 CMD {w}")),
        word().prop_map(|w| format!("ONBUILD RUN {w}")),
        Just("SHELL [\"/bin/sh\", \"-c\"]".to_string()),
        (word(), stage())
            .prop_map(|(w, s)| format!("RUN --mount=type=cache,target=/{s} --network=none {w}")),
    ]
}

fn dockerfile() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(instruction(), 0..12).prop_map(|mut v| {
        v.insert(0, "FROM base".to_string());
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_panics_on_any_text(s in any::<String>()) {
        let nodes = parse_nodes(&s);
        if let Err(e) = parse(&s) {
            prop_assert!(e.line >= 1 && e.line <= s.split('\n').count().max(1));
            let _ = e.to_string();
        }
        if let Ok(n) = nodes {
            let _ = n.dump();
        }
    }

    #[test]
    fn never_panics_on_dockerfile_like_text(s in "[A-Za-z \\\\`\"'\\[\\],#<>=\n\t$:{}-]{0,300}") {
        let _ = parse_nodes(&s);
        if let Ok(df) = parse(&s) {
            prop_assert_eq!(df.dump(), parse_nodes(&s).expect("node layer").dump());
        }
    }

    #[test]
    fn well_formed_files_parse_with_one_instruction_per_line(lines in dockerfile()) {
        let src = lines.join("\n") + "\n";
        let df = parse(&src).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        prop_assert_eq!(df.instructions.len(), lines.len());
        for (i, ins) in df.instructions.iter().enumerate() {
            prop_assert_eq!(ins.span.start.line, i + 1);
            prop_assert_eq!(ins.span.end.line, i + 1);
            prop_assert_eq!(ins.span.end.column, lines[i].chars().count() + 1);
        }
        // JSON is stable under re-parse.
        let again = parse(&src).expect("parses again");
        prop_assert_eq!(serde_json::to_string(&df).expect("json"), serde_json::to_string(&again).expect("json"));
    }

    #[test]
    fn continuations_and_crlf_do_not_change_the_meaning(
        lines in dockerfile(),
        splits in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let src = lines.join("\n") + "\n";
        let expected = parse(&src).expect("well-formed").dump();

        // Replace some single spaces by ` \` + newline (never before `#`,
        // which would make the next physical line a comment).
        let spaces: Vec<usize> = src
            .char_indices()
            .filter(|(i, c)| *c == ' ' && !src[i + 1..].starts_with(['#', ' ', '\n']))
            .map(|(i, _)| i)
            .collect();
        let mut chosen: Vec<usize> = splits.iter().filter(|_| !spaces.is_empty()).map(|ix| spaces[ix.index(spaces.len())]).collect();
        chosen.sort_unstable();
        chosen.dedup();
        let mut continued = src.clone();
        for at in chosen.iter().rev() {
            continued.replace_range(*at..*at + 1, " \\\n");
        }
        let df = parse(&continued).map_err(|e| TestCaseError::fail(format!("{e}\n{continued}")))?;
        prop_assert_eq!(df.dump(), expected.clone());
        prop_assert_eq!(df.instructions.last().map(|i| i.span.end.line), Some(lines.len() + chosen.len()));

        let crlf = src.replace('\n', "\r\n");
        prop_assert_eq!(parse(&crlf).expect("CRLF parses").dump(), expected);
    }
}
