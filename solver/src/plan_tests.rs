//! Planner tests, modelled on BuildKit's `dockerfile_test.go` ARG/ENV cases.

use super::*;
use crate::graph::{Op, SourceOp};

fn opts(args: &[(&str, &str)]) -> BuildOptions {
    BuildOptions {
        build_args: args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        target: None,
        build_platform: Platform::parse("linux/amd64").unwrap_or_else(Platform::host),
        target_platform: Platform::parse("linux/arm64/v8").unwrap_or_else(Platform::host),
        network: None,
        extra_hosts: Vec::new(),
    }
}

fn try_plan(src: &str, o: &BuildOptions) -> Result<BuildGraph, PlanError> {
    let df = kiln_parser::parse(src).expect("test Dockerfile parses");
    plan(&df, o, &EmptyImages)
}

fn plan_ok(src: &str, o: &BuildOptions) -> BuildGraph {
    match try_plan(src, o) {
        Ok(g) => g,
        Err(e) => panic!("plan failed: {e}"),
    }
}

/// The final config env of the target as `K=V` strings.
fn target_env(g: &BuildGraph) -> Vec<String> {
    g.target_stage().expect("target").config.env.clone()
}

fn env_of(g: &BuildGraph, key: &str) -> Option<String> {
    g.target_stage()
        .expect("target")
        .config
        .env_get(key)
        .map(str::to_owned)
}

fn runs(g: &BuildGraph) -> Vec<&RunOp> {
    g.graph
        .node_weights()
        .filter_map(|v| match &v.op {
            Op::Exec(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn copies(g: &BuildGraph) -> Vec<&CopyOp> {
    g.graph
        .node_weights()
        .filter_map(|v| match &v.op {
            Op::File(FileOp::Copy(c)) => Some(c),
            _ => None,
        })
        .collect()
}

fn run_env<'a>(r: &'a RunOp, k: &str) -> Option<&'a str> {
    r.env
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

#[test]
fn global_arg_is_used_in_from() {
    let g = plan_ok(
        "ARG IMG=busybox\nARG TAG=1.36\nFROM $IMG:${TAG}\n",
        &opts(&[]),
    );
    assert_eq!(
        g.stages[0].base,
        StageBase::Image {
            reference: "busybox:1.36".into()
        }
    );
    let g = plan_ok("ARG IMG=busybox\nFROM $IMG\n", &opts(&[("IMG", "alpine")]));
    assert_eq!(
        g.stages[0].base,
        StageBase::Image {
            reference: "alpine".into()
        }
    );
}

#[test]
fn global_default_expands_earlier_globals() {
    let g = plan_ok(
        "ARG A=x\nARG B=${A}y\nFROM scratch\nARG B\nENV R=$B\n",
        &opts(&[]),
    );
    assert_eq!(env_of(&g, "R").as_deref(), Some("xy"));
    let g = plan_ok(
        "ARG A=x\nARG B=${A}y\nFROM scratch\nARG B\nENV R=$B\n",
        &opts(&[("A", "q")]),
    );
    assert_eq!(env_of(&g, "R").as_deref(), Some("qy"));
}

#[test]
fn global_arg_is_not_visible_in_a_stage_without_redeclaration() {
    let g = plan_ok("ARG V=1\nFROM scratch\nENV X=$V\n", &opts(&[]));
    assert_eq!(env_of(&g, "X").as_deref(), Some(""));
}

#[test]
fn arg_without_default_inherits_the_global_value() {
    let g = plan_ok("ARG V=1\nFROM scratch\nARG V\nENV X=$V\n", &opts(&[]));
    assert_eq!(env_of(&g, "X").as_deref(), Some("1"));
    // ... and the --build-arg value when one is given.
    let g = plan_ok(
        "ARG V=1\nFROM scratch\nARG V\nENV X=$V\n",
        &opts(&[("V", "2")]),
    );
    assert_eq!(env_of(&g, "X").as_deref(), Some("2"));
}

#[test]
fn stage_default_beats_global_and_build_arg_beats_both() {
    let src = "ARG V=1\nFROM scratch\nARG V=3\nENV X=$V\n";
    assert_eq!(env_of(&plan_ok(src, &opts(&[])), "X").as_deref(), Some("3"));
    assert_eq!(
        env_of(&plan_ok(src, &opts(&[("V", "9")])), "X").as_deref(),
        Some("9")
    );
}

#[test]
fn undeclared_arg_without_value_is_unset() {
    let g = plan_ok("FROM scratch\nARG V\nENV X=${V:-unset}\n", &opts(&[]));
    assert_eq!(env_of(&g, "X").as_deref(), Some("unset"));
}

#[test]
fn arg_default_expands_with_stage_env() {
    let g = plan_ok("FROM scratch\nENV A=x\nARG B=$A-y\nENV C=$B\n", &opts(&[]));
    assert_eq!(env_of(&g, "C").as_deref(), Some("x-y"));
}

#[test]
fn env_words_see_the_old_environment() {
    let g = plan_ok(
        "FROM scratch\nENV a=0\nENV a=1 b=$a\nENV c=$a\n",
        &opts(&[]),
    );
    assert_eq!(env_of(&g, "b").as_deref(), Some("0"));
    assert_eq!(env_of(&g, "c").as_deref(), Some("1"));
}

#[test]
fn env_keys_are_expanded() {
    let g = plan_ok("FROM scratch\nENV K=name\nENV $K=v\n", &opts(&[]));
    assert_eq!(env_of(&g, "name").as_deref(), Some("v"));
}

#[test]
fn args_are_run_env_but_not_image_env() {
    let g = plan_ok(
        "FROM scratch\nARG VERSION=1\nENV E=e\nRUN make\n",
        &opts(&[("VERSION", "2")]),
    );
    let r = runs(&g);
    assert_eq!(r.len(), 1);
    assert_eq!(run_env(r[0], "VERSION"), Some("2"));
    assert_eq!(run_env(r[0], "E"), Some("e"));
    assert!(!target_env(&g).iter().any(|e| e.starts_with("VERSION=")));
    assert_eq!(r[0].args, ["/bin/sh", "-c", "make"]);
    // RUN's words are never expanded.
    let g = plan_ok("FROM scratch\nARG X=1\nRUN echo $X\n", &opts(&[]));
    assert_eq!(runs(&g)[0].args[2], "echo $X");
}

#[test]
fn arg_overrides_env_in_the_build_state_only() {
    // dispatchArg adds the ARG to the state env after the ENV.
    let g = plan_ok(
        "FROM scratch\nENV V=env\nARG V=arg\nRUN x\nENV W=$V\n",
        &opts(&[]),
    );
    assert_eq!(run_env(runs(&g)[0], "V"), Some("arg"));
    assert_eq!(env_of(&g, "V").as_deref(), Some("env"));
    assert_eq!(env_of(&g, "W").as_deref(), Some("arg"));
}

#[test]
fn proxy_args_need_no_declaration_and_stay_out_of_env() {
    let g = plan_ok(
        "FROM scratch\nRUN x\n",
        &opts(&[("HTTP_PROXY", "http://p:3128"), ("OTHER", "1")]),
    );
    let r = runs(&g)[0];
    assert_eq!(r.proxy_env, [("HTTP_PROXY".into(), "http://p:3128".into())]);
    assert_eq!(run_env(r, "HTTP_PROXY"), None);
    assert_eq!(g.unused_build_args, ["OTHER"]);
    // Not in the key-relevant serialization either.
    let json = serde_json::to_string(&Op::Exec(r.clone())).unwrap_or_default();
    assert!(!json.contains("3128"), "{json}");
    // Declared: an ordinary ARG, in env and history.
    let g = plan_ok(
        "FROM scratch\nARG HTTP_PROXY\nRUN x\n",
        &opts(&[("HTTP_PROXY", "http://p:3128")]),
    );
    let r = runs(&g)[0];
    assert!(r.proxy_env.is_empty());
    assert_eq!(run_env(r, "HTTP_PROXY"), Some("http://p:3128"));
}

#[test]
fn platform_args_are_global_and_need_redeclaration() {
    let g = plan_ok(
        "FROM --platform=$BUILDPLATFORM scratch\nENV A=$TARGETARCH\n",
        &opts(&[]),
    );
    assert_eq!(env_of(&g, "A").as_deref(), Some(""));
    assert_eq!(g.stages[0].platform.to_string(), "linux/amd64");
    let g = plan_ok(
        "FROM scratch\nARG TARGETARCH\nARG TARGETPLATFORM\nARG BUILDOS\nARG TARGETVARIANT\nENV A=$TARGETARCH P=$TARGETPLATFORM O=$BUILDOS V=$TARGETVARIANT\n",
        &opts(&[]),
    );
    assert_eq!(env_of(&g, "A").as_deref(), Some("arm64"));
    assert_eq!(env_of(&g, "P").as_deref(), Some("linux/arm64/v8"));
    assert_eq!(env_of(&g, "O").as_deref(), Some("linux"));
    assert_eq!(env_of(&g, "V").as_deref(), Some("v8"));
    // Global ARGs may use them in their defaults and FROM lines.
    let g = plan_ok("ARG IMG=base-$TARGETARCH\nFROM $IMG\n", &opts(&[]));
    assert_eq!(
        g.stages[0].base,
        StageBase::Image {
            reference: "base-arm64".into()
        }
    );
}

#[test]
fn image_env_is_used_for_expansion_and_path_is_defaulted() {
    struct Img;
    impl ImageResolver for Img {
        fn resolve(&self, r: &str, _: &Platform) -> Result<ImageInfo, ResolveError> {
            let mut config = ImageConfig::default();
            config.env.push("HOME=/home/app".into());
            config.cmd = Some(vec!["sh".into()]);
            Ok(ImageInfo {
                digest: Some(format!("sha256:{r}")),
                config,
            })
        }
    }
    let df =
        kiln_parser::parse("FROM base\nWORKDIR $HOME/src\nENTRYPOINT [\"app\"]\n").expect("parses");
    let g = plan(&df, &opts(&[]), &Img).expect("plans");
    let st = g.target_stage().expect("target");
    assert_eq!(st.config.working_dir, "/home/app/src");
    assert_eq!(st.config.env_get("PATH"), Some(DEFAULT_PATH));
    // ENTRYPOINT resets the inherited CMD.
    assert_eq!(st.config.cmd, None);
    assert_eq!(st.config.entrypoint, Some(vec!["app".to_owned()]));
    let src = g.graph.node_weights().find_map(|v| match &v.op {
        Op::Source(SourceOp::Image { digest, .. }) => digest.clone(),
        _ => None,
    });
    assert_eq!(src.as_deref(), Some("sha256:base"));
}

#[test]
fn cmd_in_same_stage_survives_entrypoint() {
    let g = plan_ok(
        "FROM scratch\nCMD [\"a\"]\nENTRYPOINT [\"b\"]\n",
        &opts(&[]),
    );
    let c = &g.target_stage().expect("target").config;
    assert_eq!(c.cmd, Some(vec!["a".to_owned()]));
    let g = plan_ok(
        "FROM scratch AS a\nCMD [\"a\"]\nFROM a\nENTRYPOINT b c\n",
        &opts(&[]),
    );
    let c = &g.target_stage().expect("target").config;
    assert_eq!(c.cmd, None);
    assert_eq!(
        c.entrypoint,
        Some(vec!["/bin/sh".into(), "-c".into(), "b c".into()])
    );
}

#[test]
fn shell_changes_shell_form() {
    let g = plan_ok(
        "FROM scratch\nSHELL [\"/bin/bash\", \"-eo\", \"pipefail\", \"-c\"]\nRUN a | b\n",
        &opts(&[]),
    );
    assert_eq!(
        runs(&g)[0].args,
        ["/bin/bash", "-eo", "pipefail", "-c", "a | b"]
    );
}

#[test]
fn stage_inherits_env_and_args_from_its_base_stage() {
    let g = plan_ok(
        "FROM scratch AS base\nARG V=1\nENV E=2\nFROM base\nRUN x\nENV W=$V$E\n",
        &opts(&[]),
    );
    assert_eq!(env_of(&g, "W").as_deref(), Some("12"));
    assert_eq!(run_env(runs(&g)[0], "V"), Some("1"));
    assert_eq!(g.stages.len(), 2);
}

#[test]
fn workdir_is_relative_to_the_previous_one() {
    let g = plan_ok(
        "FROM scratch\nWORKDIR /a\nWORKDIR b/../c\nENV D=x\nWORKDIR $D\nRUN pwd\n",
        &opts(&[]),
    );
    assert_eq!(g.target_stage().expect("t").config.working_dir, "/a/c/x");
    assert_eq!(runs(&g)[0].workdir, "/a/c/x");
    let mkdirs: Vec<&str> = g
        .graph
        .node_weights()
        .filter_map(|v| match &v.op {
            Op::File(FileOp::Mkdir { path, .. }) => Some(path.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(mkdirs, ["/a", "/a/c", "/a/c/x"]);
}

#[test]
fn copy_expands_sources_dest_and_flags() {
    let g = plan_ok(
        "FROM scratch\nARG SRC=src DST=/app UID=10\nCOPY --chown=$UID:$UID --chmod=755 $SRC/*.rs ${DST}/\nCOPY <<EOF /x\nv=$SRC\nEOF\n",
        &opts(&[]),
    );
    let c = copies(&g);
    assert_eq!(
        c[0].sources,
        [CopySource::Path {
            path: "src/*.rs".into()
        }]
    );
    assert_eq!(c[0].dest, "/app/");
    assert_eq!(c[0].chown.as_deref(), Some("10:10"));
    assert_eq!(c[0].chmod.as_deref(), Some("755"));
    assert_eq!(c[0].from, InputRef::Context);
    match &c[1].sources[0] {
        CopySource::Heredoc { content, .. } => assert_eq!(content, "v=src\n"),
        other => panic!("not a heredoc: {other:?}"),
    }
    assert!(g.context.is_some());
}

#[test]
fn expose_expands_words_and_ranges() {
    let g = plan_ok(
        "FROM scratch\nENV P=\"80 443/udp\"\nEXPOSE $P 8000-8002\n",
        &opts(&[]),
    );
    let ports: Vec<&str> = g
        .target_stage()
        .expect("t")
        .config
        .exposed_ports
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ports,
        ["443/udp", "80/tcp", "8000/tcp", "8001/tcp", "8002/tcp"]
    );
    assert!(matches!(
        try_plan("FROM scratch\nENV P=80/xyz\nEXPOSE $P\n", &opts(&[])),
        Err(PlanError::Port { line: 3, .. })
    ));
}

#[test]
fn only_needed_stages_are_planned() {
    let src = "FROM scratch AS a\nRUN a\nFROM scratch AS b\nRUN b\nFROM scratch AS c\nCOPY --from=a / /\n";
    let g = plan_ok(src, &opts(&[]));
    let names: Vec<String> = g.stages.iter().map(StagePlan::display_name).collect();
    assert_eq!(names, ["a", "c"]);
    let mut o = opts(&[]);
    o.target = Some("B".into());
    let g = plan_ok(src, &o);
    let names: Vec<String> = g.stages.iter().map(StagePlan::display_name).collect();
    assert_eq!(names, ["b"]);
    assert_eq!(runs(&g)[0].args[2], "b");
}

#[test]
fn unknown_target_suggests_a_stage() {
    let mut o = opts(&[]);
    o.target = Some("buidler".into());
    let e = try_plan("FROM scratch AS builder\nFROM scratch AS final\n", &o)
        .expect_err("unknown target");
    assert!(
        matches!(&e, PlanError::UnknownTarget { suggestion: Some(s), .. } if s == "builder"),
        "{e:?}"
    );
    assert!(e.to_string().contains("did you mean `builder`"), "{e}");
    o.target = Some("zzzzzz".into());
    let e = try_plan("FROM scratch AS builder\n", &o).expect_err("unknown target");
    assert!(matches!(
        e,
        PlanError::UnknownTarget {
            suggestion: None,
            ..
        }
    ));
}

#[test]
fn cycles_are_rejected_with_their_location() {
    let src = "FROM scratch AS a\nCOPY --from=b / /\nFROM scratch AS b\nCOPY --from=a / /\n";
    let e = try_plan(src, &opts(&[])).expect_err("cycle");
    match e {
        PlanError::Cycle { line, cycle, .. } => {
            assert_eq!(line, 2);
            assert_eq!(cycle, ["b", "a", "b"]);
        }
        other => panic!("{other:?}"),
    }
    // A stage reading itself.
    let e = try_plan(
        "FROM scratch AS a\nRUN --mount=from=a,target=/m x\n",
        &opts(&[]),
    )
    .expect_err("self cycle");
    assert!(matches!(e, PlanError::Cycle { line: 2, .. }), "{e:?}");
}

#[test]
fn a_stage_must_be_defined_before_use() {
    let src = "FROM scratch AS a\nCOPY --from=b / /\nFROM scratch AS b\n";
    let mut o = opts(&[]);
    o.target = Some("a".into());
    let e = try_plan(src, &o).expect_err("forward");
    assert!(
        matches!(&e, PlanError::UsedBeforeDefined { line: 2, from, .. } if from == "b"),
        "{e:?}"
    );
}

#[test]
fn copy_from_index_name_and_image() {
    let src = "FROM scratch\nRUN a\nFROM scratch AS two\nCOPY --from=0 /a /a\nCOPY --from=busybox:1 /bin/sh /sh\n";
    let g = plan_ok(src, &opts(&[]));
    let c = copies(&g);
    assert_eq!(c[0].from, InputRef::Stage { index: 0 });
    assert_eq!(
        c[1].from,
        InputRef::Image {
            reference: "busybox:1".into()
        }
    );
    assert!(matches!(
        try_plan("FROM scratch\nCOPY --from=3 / /\n", &opts(&[])),
        Err(PlanError::StageIndex {
            index: 3,
            line: 2,
            ..
        })
    ));
    // COPY --from=<stage> gets an edge from that stage's last vertex.
    let last0 = g.stages[0].last;
    let copy_v = g
        .graph
        .node_indices()
        .find(|&v| matches!(g.graph[v].op, Op::File(FileOp::Copy(_))))
        .expect("copy vertex");
    assert!(
        g.inputs(copy_v)
            .iter()
            .any(|(v, e)| *v == last0 && *e == Edge::Source)
    );
}

#[test]
fn from_a_later_stage_name_is_an_image() {
    // BuildKit: FROM only names stages defined above it.
    let g = plan_ok("FROM b AS a\nFROM scratch AS b\n", &{
        let mut o = opts(&[]);
        o.target = Some("a".into());
        o
    });
    assert_eq!(
        g.stages[0].base,
        StageBase::Image {
            reference: "b".into()
        }
    );
}

#[test]
fn duplicate_and_invalid_stage_names() {
    assert!(matches!(
        try_plan("FROM scratch AS a\nFROM scratch AS a\n", &opts(&[])),
        Err(PlanError::DuplicateStage {
            line: 2,
            first_line: 1,
            ..
        })
    ));
    assert!(valid_stage_name("a-b_c.1"));
    assert!(!valid_stage_name("1a"));
    assert!(!valid_stage_name("A"));
}

#[test]
fn blank_base_name_names_the_unset_arg() {
    let e = try_plan("ARG IMG\nFROM $IMG\n", &opts(&[])).expect_err("blank");
    assert!(e.to_string().contains("`IMG`"), "{e}");
    assert!(matches!(e, PlanError::BlankBaseName { line: 2, .. }));
}

#[test]
fn expansion_errors_carry_the_line() {
    let e = try_plan("FROM scratch\n\nENV A=${B:?needB}\n", &opts(&[])).expect_err("required");
    assert!(matches!(e, PlanError::Expand { line: 3, .. }), "{e:?}");
}

#[test]
fn onbuild_triggers_of_a_base_stage_run_first() {
    let g = plan_ok(
        "FROM scratch AS base\nONBUILD ENV T=triggered\nONBUILD RUN echo hi\nFROM base\nENV U=$T\n",
        &opts(&[]),
    );
    assert_eq!(env_of(&g, "U").as_deref(), Some("triggered"));
    let st = g.target_stage().expect("t");
    assert!(st.config.on_build.is_empty());
    assert_eq!(runs(&g).len(), 1);
    assert_eq!(runs(&g)[0].args[2], "echo hi");
}

#[test]
fn onbuild_from_is_refused() {
    struct Img;
    impl ImageResolver for Img {
        fn resolve(&self, _: &str, _: &Platform) -> Result<ImageInfo, ResolveError> {
            let mut config = ImageConfig::default();
            config.on_build.push("FROM x".into());
            Ok(ImageInfo {
                digest: None,
                config,
            })
        }
    }
    let df = kiln_parser::parse("FROM base\n").expect("parses");
    assert!(matches!(
        plan(&df, &opts(&[]), &Img),
        Err(PlanError::TriggerKeyword { .. })
    ));
}

#[test]
fn resolver_errors_suggest_a_stage() {
    struct NoImages;
    impl ImageResolver for NoImages {
        fn resolve(&self, r: &str, _: &Platform) -> Result<ImageInfo, ResolveError> {
            Err(format!("image `{r}` not found").into())
        }
    }
    let df = kiln_parser::parse("FROM scratch AS builder\nFROM buildr\n").expect("parses");
    let e = plan(&df, &opts(&[]), &NoImages).expect_err("no image");
    assert!(e.to_string().contains("did you mean `builder`"), "{e}");
    // COPY --from a misspelt stage: not an image either.
    let df =
        kiln_parser::parse("FROM scratch AS builder\nFROM scratch\n\nCOPY --from=buidler /a /a\n")
            .expect("parses");
    let e = plan(&df, &opts(&[]), &NoImages).expect_err("no image");
    assert!(
        matches!(&e, PlanError::ResolveImage { line: 4, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("did you mean `builder`"), "{e}");
}

#[test]
fn mounts_are_expanded_and_connected() {
    let g = plan_ok(
        "FROM scratch AS deps\nFROM scratch\nARG C=/root/.cache\nRUN --mount=type=cache,target=$C,id=go --mount=type=bind,from=deps,target=/d --mount=type=bind,target=/src x\n",
        &opts(&[]),
    );
    let r = runs(&g)[0];
    assert_eq!(r.mounts[0].target, "/root/.cache");
    assert_eq!(r.mounts[0].id.as_deref(), Some("go"));
    assert_eq!(r.mounts[1].from, Some(InputRef::Stage { index: 0 }));
    assert_eq!(r.mounts[2].from, Some(InputRef::Context));
    let run_v = g
        .graph
        .node_indices()
        .find(|&v| matches!(g.graph[v].op, Op::Exec(_)))
        .expect("run");
    let inputs = g.inputs(run_v);
    assert_eq!(inputs.len(), 3, "{inputs:?}");
    assert_eq!(inputs[0].1, Edge::Parent);
    // Relative and empty targets are relative to the working directory.
    let g = plan_ok(
        "FROM scratch\nWORKDIR /w\nRUN --mount=type=bind,src=a --mount=type=cache,target=c x\n",
        &opts(&[]),
    );
    let r = runs(&g)[0];
    assert_eq!(r.mounts[0].target, "/w");
    assert_eq!(r.mounts[1].target, "/w/c");
}

#[test]
fn used_vars_name_the_args_a_step_depends_on() {
    let g = plan_ok(
        "FROM scratch\nARG VERSION=1\nARG OTHER=2\nCOPY app-$VERSION /app\nRUN build\n",
        &opts(&[]),
    );
    let copy = g
        .graph
        .node_weights()
        .find(|v| matches!(v.op, Op::File(FileOp::Copy(_))))
        .expect("copy");
    assert_eq!(copy.used_vars.get("VERSION").map(String::as_str), Some("1"));
    assert!(!copy.used_vars.contains_key("OTHER"));
    let run = g
        .graph
        .node_weights()
        .find(|v| matches!(v.op, Op::Exec(_)))
        .expect("run");
    assert!(run.used_vars.contains_key("OTHER") && run.used_vars.contains_key("VERSION"));
    assert_eq!(
        run.history.as_ref().map(|h| h.created_by.as_str()),
        Some("RUN |2 VERSION=1 OTHER=2 /bin/sh -c build # buildkit")
    );
}

#[test]
fn identical_sources_are_one_vertex_and_dot_lists_everything() {
    let g = plan_ok(
        "FROM busybox AS a\nRUN a\nFROM busybox AS b\nCOPY --from=a /x /x\nCOPY y /y\n",
        &opts(&[]),
    );
    let images = g
        .graph
        .node_weights()
        .filter(|v| matches!(v.op, Op::Source(SourceOp::Image { .. })))
        .count();
    assert_eq!(images, 1);
    let dot = g.to_dot();
    assert!(dot.starts_with("digraph kiln {"));
    assert_eq!(dot.matches(" -> ").count(), g.graph.edge_count(), "{dot}");
    assert!(dot.contains("[b 3/3] COPY y /y"), "{dot}");
    assert!(dot.contains("[internal] load build context"), "{dot}");
    // Topological order: every edge goes forward.
    let order = g.topo_order();
    let pos: HashMap<_, _> = order.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    for e in g.graph.edge_indices() {
        let (a, b) = g.graph.edge_endpoints(e).expect("edge");
        assert!(pos[&a] < pos[&b]);
    }
}

#[test]
fn suggest_picks_the_closest_name() {
    assert_eq!(
        suggest("biuld", ["build", "test"]).as_deref(),
        Some("build")
    );
    assert_eq!(suggest("x", ["build", "test"]), None);
    assert_eq!(levenshtein("kitten", "sitting"), 3);
}

/// Every real-world Dockerfile plans; failures only for reasons we
/// understand (an ARG needed by FROM and not given).
#[test]
#[expect(clippy::print_stderr, reason = "the skip message outside CI")]
fn real_world_corpus_plans() {
    let dir = shared_dir().join("conformance/real-world");
    let Ok(entries) = fs_err::read_dir(&dir) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "conformance corpus missing at {}",
            dir.display()
        );
        eprintln!("skip: no corpus at {}", dir.display());
        return;
    };
    let mut planned = 0;
    let mut failed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.to_string_lossy().ends_with("Dockerfile") {
            continue;
        }
        let Ok(df) = kiln_parser::parse_file(&path) else {
            continue;
        };
        match plan(&df, &BuildOptions::default(), &EmptyImages) {
            Ok(g) => {
                assert!(!g.stages.is_empty());
                let _ = g.to_dot();
                planned += 1;
            }
            Err(e @ (PlanError::BlankBaseName { .. } | PlanError::Expand { .. })) => {
                failed.push(format!("{}: {e}", path.display()));
            }
            Err(e) => panic!("{}: unexpected plan error: {e}", path.display()),
        }
    }
    assert!(planned > 200, "planned only {planned}; failed: {failed:#?}");
}

fn shared_dir() -> std::path::PathBuf {
    match std::env::var_os("KILN_SHARED") {
        Some(p) => p.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

#[test]
fn history_entries_follow_buildkit() {
    let g = plan_ok(
        "FROM scratch\nWORKDIR /\nWORKDIR /app\nEXPOSE 443 80/udp\nENV A=1\nCOPY x /y\n",
        &opts(&[]),
    );
    let h: Vec<(String, bool)> = g
        .target_stage()
        .expect("t")
        .history
        .iter()
        .map(|h| (h.created_by.clone(), h.empty_layer))
        .collect();
    assert_eq!(
        h,
        [
            ("WORKDIR / # buildkit".to_owned(), true),
            ("WORKDIR /app # buildkit".to_owned(), false),
            (
                "EXPOSE map[443/tcp:{} 80/udp:{}] # buildkit".to_owned(),
                true
            ),
            ("ENV A=1 # buildkit".to_owned(), true),
            ("COPY x /y # buildkit".to_owned(), false),
        ]
    );
}

mod generated {
    use proptest::prelude::*;

    use super::*;

    /// Instruction lines built from a small vocabulary, so that names,
    /// stage references and variables collide often.
    fn line() -> impl Strategy<Value = String> {
        let name = prop::sample::select(vec!["a", "b", "c", "0", "1", "7", "busybox", "A"]);
        let var = prop::sample::select(vec!["V", "W", "TARGETARCH", "HTTP_PROXY", "PATH"]);
        let word = prop::sample::select(vec![
            "x",
            "$V",
            "${W:-d}",
            "${V:+y}",
            "'$V'",
            "\"$W\"",
            "${V#x}",
            "$TARGETARCH",
            "${V:?e}",
            "/p/$V",
            "8080",
            "80-82/udp",
            "",
        ]);
        (0..17u8, name, var, word.clone(), word).prop_map(|(k, n, v, w1, w2)| match k {
            0 => format!("FROM {n} AS s{n}"),
            1 => format!("FROM {w1}"),
            2 => format!("FROM --platform={w1} {n}"),
            3 => format!("ARG {v}={w1}"),
            4 => format!("ARG {v}"),
            5 => format!("ENV {v}={w1} X={w2}"),
            6 => format!("COPY --from={n} {w1} /d{w2}"),
            7 => format!("COPY --from=s{n} /x /y"),
            8 => format!("RUN --mount=from=s{n},target={w1} echo {w2}"),
            9 => format!("WORKDIR {w1}"),
            10 => format!("EXPOSE {w1}"),
            11 => format!("USER {w1}"),
            12 => format!("LABEL {v}={w1}"),
            13 => format!("ONBUILD RUN {w1}"),
            14 => format!("CMD {w1}"),
            15 => format!("ENTRYPOINT [\"{n}\"]"),
            _ => format!("ADD {w1} {w2}"),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any Dockerfile the parser accepts plans or fails with an
        /// error; never a panic, and a plan's graph is a DAG whose DOT
        /// has every edge.
        #[test]
        fn plan_never_panics(lines in prop::collection::vec(line(), 1..14), target in prop::option::of(0..3u8)) {
            let src = format!("FROM busybox AS s0\n{}\n", lines.join("\n"));
            let Ok(df) = kiln_parser::parse(&src) else { return Ok(()) };
            let mut o = opts(&[("V", "v1")]);
            o.target = target.map(|t| format!("s{t}"));
            if let Ok(g) = plan(&df, &o, &EmptyImages) {
                prop_assert!(!petgraph::algo::is_cyclic_directed(&g.graph));
                prop_assert_eq!(g.to_dot().matches(" -> ").count(), g.graph.edge_count());
                let keys = crate::key::compute_keys(&g, None);
                prop_assert!(keys.is_ok());
            }
        }
    }
}

#[test]
fn the_build_network_is_in_the_run_op() {
    let src = "FROM busybox\nRUN a\nRUN --network=default b\nRUN --network=host c\n";
    let nets = |o: &BuildOptions| -> Vec<Option<kiln_parser::Network>> {
        let g = try_plan(src, o).expect("plans");
        g.graph
            .node_weights()
            .filter_map(|v| match &v.op {
                Op::Exec(r) => Some(r.network),
                _ => None,
            })
            .collect()
    };
    use kiln_parser::Network as N;
    let mut o = opts(&[]);
    assert_eq!(nets(&o), [None, None, Some(N::Host)]);
    o.network = Some(N::Default);
    assert_eq!(nets(&o), [None, None, Some(N::Host)]);
    o.network = Some(N::None);
    assert_eq!(nets(&o), [Some(N::None), Some(N::None), Some(N::Host)]);
}
