//! The typed AST: what each instruction turns into, heredocs, directives,
//! spans, stages.

use kiln_parser::{
    Chmod, Command, Healthcheck, MountType, Network, Position, Security, Sharing, ShellOrExec,
    Source, parse, parse_nodes,
};

fn commands(src: &str) -> Vec<Command> {
    parse(src)
        .unwrap_or_else(|e| panic!("{e}"))
        .instructions
        .into_iter()
        .map(|i| i.command)
        .collect()
}

#[test]
fn run_heredocs_keep_bodies_and_flags() {
    let src = "FROM a\nRUN <<EOF 3<<-'END' python3\necho $HOME\nEOF\n\tprint(1)\n\tEND\n";
    let df = parse(src).unwrap_or_else(|e| panic!("{e}"));
    let run = &df.instructions[1];
    assert_eq!(run.span.start, Position::new(2, 1));
    assert_eq!(run.span.end.line, 6);
    let Command::Run(r) = &run.command else {
        panic!("not RUN")
    };
    assert_eq!(
        r.command,
        ShellOrExec::Shell("<<EOF 3<<-'END' python3".into())
    );
    assert_eq!(r.heredocs.len(), 2);
    let (a, b) = (&r.heredocs[0], &r.heredocs[1]);
    assert_eq!(
        (a.name.as_str(), a.expand, a.chomp, a.file_descriptor),
        ("EOF", true, false, 0)
    );
    assert_eq!(a.content, "echo $HOME\n");
    // Bodies are read in marker order, each up to its own terminator.
    assert_eq!(
        (b.name.as_str(), b.expand, b.chomp, b.file_descriptor),
        ("END", false, true, 3)
    );
    assert_eq!(b.content, "\tprint(1)\n");
    // A terminator of a later heredoc does not end an earlier one.
    let err = parse("FROM a\nRUN <<A <<B\nB\nA\n").expect_err("B never terminated");
    assert_eq!(err.line, 2);
    let src = "FROM a\nRUN <<EOF\necho $HOME\n\tEOF\nEOF\n";
    let Command::Run(r) = &commands(src)[1] else {
        panic!("not RUN")
    };
    assert_eq!(r.heredocs[0].content, "echo $HOME\n\tEOF\n");
}

#[test]
fn heredoc_bodies_in_order_and_chomped() {
    let src = "FROM a\nCOPY <<A <<-\"B\" /dst/\nline $x\nA\n\tfirst\n\t\tsecond\n\tB\n";
    let Command::Copy(c) = &commands(src)[1] else {
        panic!("not COPY")
    };
    assert_eq!(c.dest, "/dst/");
    assert_eq!(
        c.sources,
        vec![
            Source::Heredoc {
                name: "A".into(),
                content: "line $x\n".into(),
                expand: true
            },
            Source::Heredoc {
                name: "B".into(),
                content: "first\nsecond\n".into(),
                expand: false
            },
        ]
    );
    // The raw body keeps its tabs; chomped_content() removes them.
    assert_eq!(c.heredocs[1].content, "\tfirst\n\t\tsecond\n");
    assert_eq!(c.heredocs[1].chomped_content(), "first\nsecond\n");
}

#[test]
fn heredoc_rules_follow_buildkit() {
    // Not a heredoc: JSON form, glued to a word, quoted, or not RUN/COPY/ADD.
    for src in [
        "FROM a\nRUN [\"cat\", \"<<EOF\"]\n",
        "FROM a\nRUN cat<<EOF\n",
        "FROM a\nRUN echo '<<EOF'\n",
        "FROM a\nCMD <<EOF\n",
    ] {
        let df = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        assert!(df.instructions[1].heredocs().is_empty(), "{src}");
        assert_eq!(df.instructions.len(), 2, "{src}");
    }
    // ONBUILD RUN <<EOF reads the body and hands it to the trigger.
    let df = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\nUSER x\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.instructions.len(), 3);
    assert_eq!(df.instructions[1].heredocs()[0].content, "echo hi\n");
    assert_eq!(df.instructions[1].dump(), "onbuild (run \"<<EOF\")");
}

#[test]
fn env_label_arg_forms() {
    let cmds = commands(
        "FROM a\nENV A=1 B=\"two words\" C=x\\ y\nENV LEGACY some value\nLABEL a.b=c\nARG X Y=2 Z=\n",
    );
    let Command::Env(e) = &cmds[1] else {
        panic!("ENV")
    };
    let pairs: Vec<(&str, &str, bool)> = e
        .pairs
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str(), p.legacy))
        .collect();
    assert_eq!(
        pairs,
        [
            ("A", "1", false),
            ("B", "\"two words\"", false),
            ("C", "x\\ y", false)
        ]
    );
    let Command::Env(e) = &cmds[2] else {
        panic!("ENV")
    };
    assert_eq!(
        (
            e.pairs[0].key.as_str(),
            e.pairs[0].value.as_str(),
            e.pairs[0].legacy
        ),
        ("LEGACY", "some value", true)
    );
    let Command::Label(l) = &cmds[3] else {
        panic!("LABEL")
    };
    assert_eq!(l.pairs[0].key, "a.b");
    let Command::Arg(a) = &cmds[4] else {
        panic!("ARG")
    };
    let args: Vec<(&str, Option<&str>)> = a
        .args
        .iter()
        .map(|d| (d.name.as_str(), d.default.as_deref()))
        .collect();
    assert_eq!(args, [("X", None), ("Y", Some("2")), ("Z", Some(""))]);
}

#[test]
fn from_stages_and_global_args() {
    let df = parse("ARG V=1\nARG W\nFROM --platform=$BUILDPLATFORM golang:$V AS Build\nRUN x\nfrom scratch\nCOPY --from=build /a /b\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.global_args().len(), 2);
    let stages = df.stages();
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].base.name.as_deref(), Some("build"));
    assert_eq!(stages[0].base.platform.as_deref(), Some("$BUILDPLATFORM"));
    assert_eq!(stages[0].base.image, "golang:$V");
    assert_eq!(stages[0].instructions.len(), 1);
    assert_eq!(stages[1].from.keyword, "from");
    assert_eq!(stages[1].base.name, None);
    let Command::Copy(c) = &stages[1].instructions[0].command else {
        panic!("COPY")
    };
    assert_eq!(c.from.as_deref(), Some("build"));
}

#[test]
fn run_flags() {
    let src = "FROM a\nRUN --mount=type=cache,target=/root/.cache,sharing=private,id=pip \\\n    --mount=type=secret,id=tok,target=/run/t,required=true \\\n    --mount=type=ssh \\\n    --mount=type=tmpfs,target=/tmp,size=64m \\\n    --network=host --security=insecure pip install .\n";
    let Command::Run(r) = &commands(src)[1] else {
        panic!("RUN")
    };
    let kinds: Vec<MountType> = r.mounts.iter().map(|m| m.kind).collect();
    assert_eq!(
        kinds,
        [
            MountType::Cache,
            MountType::Secret,
            MountType::Ssh,
            MountType::Tmpfs
        ]
    );
    assert_eq!(r.mounts[0].sharing, Some(Sharing::Private));
    assert_eq!(r.mounts[0].id.as_deref(), Some("pip"));
    assert_eq!(r.mounts[1].required, Some(true));
    assert_eq!(r.mounts[3].size.as_deref(), Some("64m"));
    assert_eq!(
        (r.network, r.security),
        (Some(Network::Host), Some(Security::Insecure))
    );
    assert_eq!(r.command, ShellOrExec::Shell("pip install .".into()));
}

#[test]
fn copy_and_add_flags() {
    let cmds = commands(
        "FROM a\nCOPY --parents --exclude=*.md --exclude=docs/ --chown=1:2 --chmod=u+rwx,go-w --link=false a b /c/\nADD --keep-git-dir --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 --unpack=false --chmod=644 https://x/y.tar /z\nCOPY [\"a b\", \"/c d/\"]\n",
    );
    let Command::Copy(c) = &cmds[1] else {
        panic!("COPY")
    };
    assert!(c.parents && !c.link);
    assert_eq!(c.exclude, ["*.md", "docs/"]);
    assert_eq!(c.chown.as_deref(), Some("1:2"));
    assert_eq!(c.chmod, Some(Chmod::Symbolic("u+rwx,go-w".into())));
    assert_eq!(c.sources.len(), 2);
    let Command::Add(a) = &cmds[2] else {
        panic!("ADD")
    };
    assert!(a.keep_git_dir);
    assert_eq!(a.unpack, Some(false));
    assert_eq!(a.chmod, Some(Chmod::Octal(0o644)));
    assert!(
        a.checksum
            .as_deref()
            .is_some_and(|c| c.starts_with("sha256:"))
    );
    let Command::Copy(c) = &cmds[3] else {
        panic!("COPY")
    };
    assert_eq!(c.sources, vec![Source::Path { path: "a b".into() }]);
    assert_eq!(c.dest, "/c d/");
}

#[test]
fn healthcheck_forms() {
    let cmds = commands(
        "FROM a\nHEALTHCHECK NONE\nHEALTHCHECK --interval=1m30s --timeout=3s --start-period=0 --retries=3 CMD curl -f http://x/\nhealthcheck cmd [\"true\"]\n",
    );
    assert_eq!(cmds[1], Command::Healthcheck(Healthcheck::None));
    let Command::Healthcheck(Healthcheck::Cmd {
        interval_ns,
        timeout_ns,
        start_period_ns,
        retries,
        command,
        ..
    }) = &cmds[2]
    else {
        panic!("HEALTHCHECK CMD")
    };
    assert_eq!(
        (*interval_ns, *timeout_ns, *start_period_ns, *retries),
        (90_000_000_000, 3_000_000_000, 0, 3)
    );
    assert_eq!(command, &ShellOrExec::Shell("curl -f http://x/".into()));
    let Command::Healthcheck(Healthcheck::Cmd { command, .. }) = &cmds[3] else {
        panic!("HEALTHCHECK")
    };
    assert_eq!(command, &ShellOrExec::Exec(vec!["true".into()]));
}

#[test]
fn other_instructions() {
    let cmds = commands(
        "FROM a\nCMD []\nENTRYPOINT [\"/bin/app\", \"--flag\"]\nSHELL [\"pwsh\", \"-c\"]\nEXPOSE 80 443/udp 8000-8010/tcp $PORT\nVOLUME [\"/a\", \"/b\"]\nVOLUME /c /d\nUSER app:app\nWORKDIR /srv\nSTOPSIGNAL SIGINT\nMAINTAINER me <me@x>\n",
    );
    let Command::Cmd(c) = &cmds[1] else {
        panic!("CMD")
    };
    assert_eq!(c.command, ShellOrExec::Exec(vec![]));
    let Command::Entrypoint(e) = &cmds[2] else {
        panic!("ENTRYPOINT")
    };
    assert_eq!(
        e.command,
        ShellOrExec::Exec(vec!["/bin/app".into(), "--flag".into()])
    );
    let Command::Shell(s) = &cmds[3] else {
        panic!("SHELL")
    };
    assert_eq!(s.shell, ["pwsh", "-c"]);
    let Command::Expose(x) = &cmds[4] else {
        panic!("EXPOSE")
    };
    assert_eq!(x.ports.len(), 4);
    let (Command::Volume(v1), Command::Volume(v2)) = (&cmds[5], &cmds[6]) else {
        panic!("VOLUME")
    };
    assert_eq!((v1.paths.len(), v2.paths.len()), (2, 2));
    let Command::Maintainer(m) = &cmds[10] else {
        panic!("MAINTAINER")
    };
    assert_eq!(m.value, "me <me@x>");
}

#[test]
fn directives_only_at_the_top() {
    let df = parse("# syntax=docker/dockerfile:1.7\n# CHECK=skip=all\n#escape=`\nFROM a\nRUN echo `\n  hi\n# escape=\\\n").unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<(&str, &str)> = df
        .directives
        .iter()
        .map(|d| (d.name.as_str(), d.value.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("syntax", "docker/dockerfile:1.7"),
            ("check", "skip=all"),
            ("escape", "`")
        ]
    );
    assert_eq!(df.escape, '`');
    assert_eq!(df.dump(), "(from \"a\")\n(run \"echo   hi\")\n");
    // After a blank line or any other comment, directives are comments.
    let df = parse("\n# escape=`\nFROM a\nRUN a \\\n b\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(df.directives.is_empty());
    assert_eq!(df.escape, '\\');
    let df = parse("# hello\n# syntax=x\nFROM a\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(df.directives.is_empty());
}

#[test]
fn bom_crlf_and_continuation_at_eof() {
    let df = parse("\u{feff}FROM a\r\nRUN a \\\r\n  b \\").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.dump(), "(from \"a\")\n(run \"a   b\")\n");
    assert_eq!(df.instructions[1].span.end, Position::new(3, 6));
}

#[test]
fn comments_and_empty_lines_inside_continuations() {
    let df = parse("FROM a\nRUN a \\\n# comment\n\n  b\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.dump(), "(from \"a\")\n(run \"a   b\")\n");
    assert_eq!(df.warnings.len(), 1, "an empty continuation line warns");
    assert_eq!(df.instructions[1].span.end.line, 5);
}

#[test]
fn spans_name_the_keyword_and_keep_the_original() {
    let df =
        parse("FROM a\n\n    run  --network=none   echo hi   \n").unwrap_or_else(|e| panic!("{e}"));
    let run = &df.instructions[1];
    assert_eq!(run.span.start, Position::new(3, 5));
    assert_eq!(run.keyword, "run");
    assert_eq!(run.flags[0].name, "network");
    assert_eq!(run.flags[0].position, Position::new(3, 10));
    assert_eq!(run.original, "run  --network=none   echo hi   ");
}

#[test]
fn nodes_keep_what_the_typed_layer_refuses() {
    // BuildKit's parser accepts unknown instructions and flags; the typed
    // layer does not.
    let src = "FROM a\nFOO bar\nCOPY --bogus x y\n";
    let nodes = parse_nodes(src).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        nodes.dump(),
        "(from \"a\")\n(foo \"\")\n(copy [\"--bogus\"] \"x\" \"y\")\n"
    );
    assert!(parse(src).is_err());
}

#[test]
fn comments_above_an_instruction_are_kept() {
    let src = "# syntax=docker/dockerfile:1\n# Base image\n# with tools\nFROM a AS base\n\n#\n# The version\n  # indented\nARG V=1\nRUN x \\\n# inside\n  y\nUSER u\n";
    let df = parse(src).unwrap_or_else(|e| panic!("{e}"));
    let comments: Vec<Vec<String>> = df.instructions.iter().map(|i| i.comments.clone()).collect();
    assert_eq!(comments[0], ["Base image", "with tools"]);
    // An empty `#` restarts the list; BuildKit cuts one byte off an
    // indented comment, keeping its `#`.
    assert_eq!(comments[1], ["The version", "# indented"]);
    assert!(
        comments[2].is_empty(),
        "comments inside a continuation are not collected"
    );
    assert!(comments[3].is_empty());
}

/// Regression: an instruction whose first lines are only the escape
/// character starts (for BuildKit's line numbers) on its first line, while
/// errors still point at the keyword.
#[test]
fn regression_leading_continuation_lines() {
    let df = parse("FROM a\n\\\n\\\n  USER x\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.instructions[1].span.start.line, 2);
    assert_eq!(df.instructions[1].span.end.line, 4);
    let err = parse("FROM a\n\\\n  USR x\n").expect_err("unknown instruction");
    assert_eq!((err.line, err.column), (3, 3));
}

/// Regression: BuildKit 1.26's lexer handles `${v#p}`, `${v%p}`, `${v/p/r}`,
/// so a heredoc marker after one is still a heredoc (older parsers, such as
/// the PyPI binding's, fail to lex the line and find none).
#[test]
fn regression_heredoc_after_pattern_expansion() {
    for src in [
        "FROM a\nRUN echo ${v#x} <<EOF\nbody\nEOF\n",
        "FROM a\nRUN echo ${v%%.*} ${v//a/b} <<EOF\nbody\nEOF\n",
    ] {
        let df = parse(src).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(df.instructions.len(), 2, "{src}");
        assert_eq!(df.instructions[1].heredocs()[0].content, "body\n", "{src}");
    }
    // Spaces inside `${...}` split words as in BuildKit (`addString`).
    let df = parse("FROM a\nRUN ${x:-a <<EOF}\nbody\nEOF}\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.instructions[1].heredocs()[0].name, "EOF}");
}
