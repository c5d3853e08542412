//! `kiln parse` end to end: both output formats and a bad file.

use std::path::PathBuf;
use std::process::{Command, Output};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/parse")
        .join(name)
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

#[test]
fn dump_format_prints_buildkits_ast_dump() {
    let file = testdata("Dockerfile");
    let out = kiln(&["parse", "-f", file.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = concat!(
        "(arg \"GO_VERSION=1.23\")\n",
        "(from \"golang:${GO_VERSION}\" \"AS\" \"build\")\n",
        "(workdir \"/src\")\n",
        "(run [\"--mount=type=cache,target=/root/.cache/go-build\" \"--mount=type=bind,source=go.mod,target=go.mod\"] ",
        "\"go build -o /out/app ./cmd/app\")\n",
        "(copy [\"--chmod=0755\"] \"<<-EOF\" \"/usr/local/bin/start\")\n",
        "(from \"busybox:local\")\n",
        "(copy [\"--from=build\"] \"/out/app\" \"/app\")\n",
        "(healthcheck [\"--interval=30s\"] \"CMD\" \"/app\" \"health\")\n",
        "(entrypoint \"/usr/local/bin/start\")\n",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn json_format_prints_the_typed_ast_with_spans() {
    let file = testdata("Dockerfile");
    let out = kiln(&[
        "parse",
        "--format",
        "json",
        "-f",
        file.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["directives"][0]["name"], "syntax");
    let ins = v["instructions"].as_array().expect("instructions");
    assert_eq!(ins.len(), 9);
    // RUN spans its three physical lines and has two typed mounts.
    assert_eq!(ins[3]["span"]["start"]["line"], 5);
    assert_eq!(ins[3]["span"]["end"]["line"], 7);
    assert_eq!(ins[3]["command"]["kind"], "run");
    assert_eq!(ins[3]["command"]["mounts"][0]["kind"], "cache");
    assert_eq!(ins[3]["command"]["mounts"][1]["source"], "go.mod");
    // The heredoc source is chomped (<<-) and not expanded... nor quoted.
    let copy = &ins[4]["command"];
    assert_eq!(copy["chmod"]["value"], 0o755);
    assert_eq!(copy["sources"][0]["type"], "heredoc");
    assert_eq!(
        copy["sources"][0]["content"],
        "#!/bin/sh\nexec /app \"$@\"\n"
    );
    assert_eq!(ins[4]["span"]["end"]["line"], 11);
    assert_eq!(ins[8]["command"]["command"]["form"], "exec");
}

#[test]
fn bad_file_exits_1_with_a_located_error() {
    let file = testdata("bad.Dockerfile");
    let out = kiln(&["parse", "-f", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: unknown flag `--netwrok` for `RUN`\n"),
        "{stderr}"
    );
    assert!(stderr.contains("bad.Dockerfile:3:5\n"), "{stderr}");
    assert!(stderr.contains("3 |     --netwrok=none make\n"), "{stderr}");
    assert!(stderr.contains("  |     ^^^^^^^^^^^^^^\n"), "{stderr}");
    assert!(
        stderr.contains("hint: did you mean `--network`?"),
        "{stderr}"
    );
}

#[test]
fn missing_file_exits_1_naming_the_path() {
    let out = kiln(&["parse", "-f", "/nonexistent/Dockerfile"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/Dockerfile"));
}
