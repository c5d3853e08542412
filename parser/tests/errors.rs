//! Snapshots of the rendered parse errors: message, `file:line:column`, the
//! source line with a caret, and the hint. One snapshot per distinct error.

use kiln_parser::{ErrorKind, parse};

/// Parses `src` (which must fail) and renders the error as `kiln parse`
/// shows it.
fn render(src: &str) -> String {
    match parse(src) {
        Ok(df) => panic!("expected an error, parsed:\n{}", df.dump()),
        Err(e) => {
            let e = e.with_file("Dockerfile");
            // The error exposes its location for tools.
            assert!(e.line >= 1 && e.column >= 1);
            let shown = e.to_string();
            assert!(
                shown.contains(&format!("Dockerfile:{}:{}", e.line, e.column)),
                "{shown}"
            );
            shown
        }
    }
}

macro_rules! error_snapshot {
    ($name:ident, $src:expr) => {
        #[test]
        fn $name() {
            insta::assert_snapshot!(stringify!($name), render($src));
        }
    };
}

error_snapshot!(unknown_instruction, "FROM alpine\nCOPPY . /app\n");
error_snapshot!(
    unknown_flag_with_suggestion,
    "FROM alpine\nCOPY --chwon=1000 a /b\n"
);
error_snapshot!(
    unknown_flag_lists_the_allowed_ones,
    "FROM alpine\nRUN --privileged make\n"
);
error_snapshot!(
    flag_on_instruction_without_flags,
    "FROM alpine\nWORKDIR --mode=0700 /app\n"
);
error_snapshot!(duplicate_flag, "FROM alpine\nCOPY --from=a --from=b x /y\n");
error_snapshot!(
    flag_without_value,
    "FROM alpine\nCOPY --from build /out /out\n"
);
error_snapshot!(bad_boolean_flag, "FROM alpine\nCOPY --link=yes a /b\n");
error_snapshot!(bad_chmod, "FROM alpine\nCOPY --chmod=0999 a /b\n");
error_snapshot!(
    bad_mount_type,
    "FROM alpine\nRUN --mount=type=nfs,target=/x true\n"
);
error_snapshot!(
    cache_mount_without_target,
    "FROM alpine\nRUN --mount=type=cache,id=go true\n"
);
error_snapshot!(
    mount_unknown_key,
    "FROM alpine\nRUN --mount=type=cache,target=/x,colour=red true\n"
);
error_snapshot!(bad_network, "FROM alpine\nRUN --network=bridge true\n");
error_snapshot!(
    bad_flag_on_continuation_line,
    "FROM alpine\nRUN --mount=type=cache,target=/x \\\n    --network=bogus true\n"
);
error_snapshot!(
    unterminated_heredoc,
    "FROM alpine\nRUN <<EOF\necho hi\nEOFF\n"
);
error_snapshot!(onbuild_without_trigger, "FROM alpine\nONBUILD\n");
error_snapshot!(
    secret_mount_with_from,
    "FROM alpine\nRUN --mount=type=secret,id=t,from=x true\n"
);
error_snapshot!(json_with_non_string, "FROM alpine\nCMD [\"echo\", 1]\n");
error_snapshot!(unterminated_json, "FROM alpine\nCMD [\"echo\", \"hi\"\n");
error_snapshot!(
    unterminated_json_string,
    "FROM alpine\nENTRYPOINT [\"/app]\n"
);
error_snapshot!(shell_not_json, "FROM alpine\nSHELL /bin/bash -c\n");
error_snapshot!(empty_file, "");
error_snapshot!(only_comments, "# just a comment\n\n");
error_snapshot!(
    instruction_before_from,
    "ARG V=1\nRUN echo $V\nFROM alpine\n"
);
error_snapshot!(from_with_two_arguments, "FROM alpine build\n");
error_snapshot!(from_with_bad_as, "FROM alpine TO build\n");
error_snapshot!(bad_stage_name, "FROM alpine AS 1st\n");
error_snapshot!(env_without_value, "FROM alpine\nENV PATH\n");
error_snapshot!(label_without_equals, "FROM alpine\nLABEL a=b c\n");
error_snapshot!(onbuild_onbuild, "FROM alpine\nONBUILD ONBUILD RUN true\n");
error_snapshot!(onbuild_from, "FROM alpine\nONBUILD FROM busybox\n");
error_snapshot!(
    duplicate_directive,
    "# syntax=docker/dockerfile:1\n# syntax=docker/dockerfile:1.7\nFROM alpine\n"
);
error_snapshot!(bad_escape_directive, "# escape=|\nFROM alpine\n");
error_snapshot!(
    healthcheck_bad_interval,
    "FROM alpine\nHEALTHCHECK --interval=5 CMD true\n"
);
error_snapshot!(
    healthcheck_unknown_type,
    "FROM alpine\nHEALTHCHECK TCP 80\n"
);
error_snapshot!(copy_without_destination, "FROM alpine\nCOPY app\n");
error_snapshot!(
    copy_heredoc_destination,
    "FROM alpine\nCOPY a <<EOF\nx\nEOF\n"
);
error_snapshot!(expose_bad_port, "FROM alpine\nEXPOSE http\n");
error_snapshot!(
    add_bad_checksum,
    "FROM alpine\nADD --checksum=md5:abc https://example.com/x /x\n"
);
error_snapshot!(user_without_argument, "FROM alpine\nUSER\n");
error_snapshot!(
    unknown_instruction_in_onbuild,
    "FROM alpine\nONBUILD RUNN make\n"
);

#[test]
fn line_too_long() {
    let src = format!("FROM alpine\nRUN echo {}\n", "x".repeat(70_000));
    let err = parse(&src).expect_err("too long");
    assert_eq!(*err.kind, ErrorKind::LineTooLong);
    assert_eq!((err.line, err.column), (2, 1));
}

#[test]
fn error_columns_count_characters() {
    let err = parse("FROM alpine\n  RUN --nétwork=none true\n").expect_err("unknown flag");
    assert_eq!((err.line, err.column), (2, 7));
    let err = parse("FROM alpine\n\u{2603} COPPY\n").expect_err("unknown instruction");
    assert_eq!((err.line, err.column), (2, 1));
}
