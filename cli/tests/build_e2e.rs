//! End-to-end tests of `kiln build` through the real binary: a busybox base
//! image made at test time (`testdata/make-busybox.sh`), the Dockerfiles
//! under `testdata/build/`, real namespaces and overlayfs, real skopeo and
//! umoci. They need root and busybox-static: without them they print a skip
//! message and return, except under `CI=true`, where they fail.

#![expect(clippy::print_stderr, reason = "tests report skips on stderr")]

mod common;

use common::{ci, have_tool, text, workspace};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether these tests can run here (root, busybox-static); panics in CI.
fn can_build() -> bool {
    common::root_and_busybox("the build tests")
}

/// A temp dir holding a store with `busybox:local` and copies of contexts.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().expect("tmp");
        let env = Env { tmp };
        common::make_busybox(&env.store());
        env
    }

    fn store(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// A copy of `testdata/build/<name>` to edit.
    fn context(&self, name: &str) -> PathBuf {
        let dest = self.tmp.path().join(format!("ctx-{name}"));
        let o = Command::new("cp")
            .arg("-a")
            .arg(workspace().join("testdata/build").join(name))
            .arg(&dest)
            .output()
            .expect("cp");
        assert!(o.status.success(), "cp: {}", text(&o.stderr));
        dest
    }

    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(self.store())
            .args(args)
            .env_remove("KILN_ROOT")
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .expect("run kiln")
    }

    /// `kiln build --progress=plain --network=none [extra] CTX`; returns the
    /// progress output (stderr), asserting success.
    fn build(&self, ctx: &Path, extra: &[&str]) -> String {
        let o = self.build_raw(ctx, extra);
        assert!(
            o.status.success(),
            "kiln build {extra:?} failed: {}\n{}",
            o.status,
            text(&o.stderr)
        );
        text(&o.stderr)
    }

    fn build_raw(&self, ctx: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["build", "--progress=plain", "--network=none"];
        args.extend_from_slice(extra);
        let c = ctx.to_str().expect("utf8");
        args.push(c);
        self.kiln(&args)
    }

    /// The stored config of `name`, as JSON.
    fn config(&self, name: &str) -> serde_json::Value {
        let store = kiln_cache::Store::open(self.store()).expect("open store");
        let img = store.resolve(name).expect("resolve");
        serde_json::from_slice(&img.config_bytes).expect("config json")
    }

    /// The final rootfs of `name`'s last build, via `--output type=local`.
    fn rootfs(&self, ctx: &Path, extra: &[&str], dir: &str) -> PathBuf {
        let dest = self.path(dir);
        let out = format!("type=local,dest={}", dest.display());
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--output", &out]);
        self.build(ctx, &args);
        dest
    }

    /// Nothing of this store is mounted, and its tmp dir is empty.
    fn assert_clean(&self) {
        let mounts = fs_err::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = self.tmp.path().to_string_lossy().into_owned();
        let ours: Vec<&str> = mounts.lines().filter(|l| l.contains(&root)).collect();
        assert!(ours.is_empty(), "left mounted:\n{}", ours.join("\n"));
        // The scratch lanes and their counter stay, empty (see
        // `kiln_cache::Store::scratch_parent`).
        let mut left = Vec::new();
        for e in fs_err::read_dir(self.store().join("tmp")).expect("tmp") {
            let e = e.expect("entry");
            if !kiln_cache::is_lane(&e.file_name()) {
                left.push(e.path());
            } else if e.file_type().expect("type").is_dir() {
                for inner in fs_err::read_dir(e.path()).expect("lane") {
                    left.push(inner.expect("entry").path());
                }
            }
        }
        assert!(left.is_empty(), "left in the store's tmp: {left:?}");
    }
}

fn read(p: &Path) -> String {
    fs_err::read_to_string(p).unwrap_or_else(|e| panic!("{e}"))
}

/// Plain-progress lines of the step whose name contains `what`: its `#N`.
fn step_number(progress: &str, what: &str) -> String {
    progress
        .lines()
        .find(|l| l.contains(what) && l.contains(" ["))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no step `{what}` in:\n{progress}"))
        .to_owned()
}

fn step_lines<'a>(progress: &'a str, num: &str) -> Vec<&'a str> {
    let prefix = format!("{num} ");
    progress
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .collect()
}

#[test]
fn every_instruction_kind() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("all");
    let src = env.path("archive-src/archive-content");
    fs_err::create_dir_all(&src).expect("mkdir");
    fs_err::write(src.join("x"), "from-tar\n").expect("write");
    let o = Command::new("tar")
        .arg("-cf")
        .arg(ctx.join("archive.tar"))
        .arg("-C")
        .arg(env.path("archive-src"))
        .arg("archive-content")
        .output()
        .expect("tar");
    assert!(o.status.success());
    let fs = env.rootfs(&ctx, &["-t", "all:1", "--label", "extra=yes"], "out");
    let f = |p: &str| read(&fs.join(p));
    assert_eq!(f("app/greeting"), "hi there 1.0\n");
    assert_eq!(f("app/from-archive"), "from-tar\n");
    assert_eq!(f("app/files/one.txt"), "file one\n");
    assert_eq!(f("app/exec"), "exec-form\n");
    assert_eq!(f("app/heredoc"), "heredoc-shell\n");
    assert_eq!(f("app/shebang"), "shebang\n");
    assert_eq!(f("app/shell"), "shell-changed\n");
    assert_eq!(f("tmp/uid"), "65534\n", "USER nobody ran the RUN");

    let c = env.config("all:1");
    let cfg = &c["config"];
    let envs: Vec<&str> = cfg["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(envs.contains(&"APP_HOME=/app"), "{envs:?}");
    assert!(envs.contains(&"GREETING=hi there"), "{envs:?}");
    assert!(envs.iter().any(|e| e.starts_with("PATH=")), "{envs:?}");
    assert!(
        !envs.iter().any(|e| e.starts_with("VERSION=")),
        "ARG is not ENV"
    );
    assert_eq!(cfg["WorkingDir"], "/app");
    assert_eq!(cfg["User"], "root");
    assert_eq!(cfg["Labels"]["org.example.title"], "all");
    assert_eq!(cfg["Labels"]["extra"], "yes");
    assert!(cfg["ExposedPorts"]["8080/tcp"].is_object());
    assert!(cfg["ExposedPorts"]["53/udp"].is_object());
    assert!(cfg["Volumes"]["/data"].is_object());
    assert_eq!(cfg["StopSignal"], "SIGTERM");
    assert_eq!(cfg["Healthcheck"]["Test"][0], "CMD");
    assert_eq!(cfg["Healthcheck"]["Interval"], 30_000_000_000u64);
    assert_eq!(cfg["Healthcheck"]["Retries"], 3);
    assert_eq!(cfg["Shell"], serde_json::json!(["/bin/sh", "-ec"]));
    assert_eq!(cfg["OnBuild"], serde_json::json!(["RUN echo onbuild"]));
    assert_eq!(cfg["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(cfg["Cmd"], serde_json::json!(["cat /app/greeting"]));
    // History: one entry per layer that is not empty, in order.
    let history = c["history"].as_array().expect("history");
    let layers = c["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let non_empty = history
        .iter()
        .filter(|h| h["empty_layer"] != serde_json::Value::Bool(true))
        .count();
    assert_eq!(non_empty, layers.len(), "{history:#?}");
    assert!(history.iter().any(|h| {
        h["created_by"]
            .as_str()
            .is_some_and(|s| s.contains("exec-form"))
    }));
    env.assert_clean();
}

#[test]
fn multi_stage_target_and_unneeded_stages() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("multi");
    let fs = env.rootfs(&ctx, &["-t", "multi:1"], "final");
    assert_eq!(read(&fs.join("ab.txt")), "a\na\nb\n");
    assert!(read(&fs.join("group-from-image")).starts_with("root:x:0:"));
    // A stage built FROM another stage keeps that stage's layers and history.
    let fs = env.rootfs(&ctx, &["-t", "multi:a2", "--target", "a2"], "a2");
    assert_eq!(read(&fs.join("a.txt")), "a\n");
    assert_eq!(read(&fs.join("a2.txt")), "a\na\n");
    let c = env.config("multi:a2");
    let history: Vec<String> = c["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["created_by"].as_str().map(str::to_owned))
        .collect();
    assert!(
        history.iter().any(|h| h.contains("echo a > /a.txt")),
        "{history:?}"
    );
    assert!(
        history.iter().any(|h| h.contains("cat /a.txt /a.txt")),
        "{history:?}"
    );
    assert_eq!(c["rootfs"]["diff_ids"].as_array().map(Vec::len), Some(3));
    // --print-graph prints DOT and builds nothing.
    let o = env.build_raw(&ctx, &["--print-graph"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let dot = text(&o.stdout);
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(!dot.contains("this stage is not needed"), "{dot}");
    // `kiln graph` needs no store image, and --target picks the stages.
    let o = env.kiln(&["graph", "--target", "b", ctx.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let dot = text(&o.stdout);
    assert!(dot.contains("echo b > /b.txt"), "{dot}");
    assert!(!dot.contains("echo a > /a.txt"), "{dot}");
    let fs = env.rootfs(&ctx, &["-t", "multi:b", "--target", "b"], "b");
    assert_eq!(read(&fs.join("b.txt")), "b\n");
    assert!(!fs.join("a.txt").exists(), "stage a is not in target b");
    let o = env.build_raw(&ctx, &["--target", "nope"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("nope"), "{}", text(&o.stderr));
    env.assert_clean();
}

#[test]
fn independent_stages_run_in_parallel() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("parallel");
    // Each RUN waits for the other's marker: sequential steps would fail.
    env.build(&ctx, &["--jobs", "2", "-t", "par:1"]);
    env.assert_clean();
}

#[test]
fn rebuild_is_cached_and_an_edit_misses_naming_the_file() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    let first = env.build(&ctx, &["-t", "edit:1"]);
    let run = step_number(&first, "RUN cat a.txt b.txt");
    assert!(
        step_lines(&first, &run).iter().any(|l| l.contains("MISS")),
        "{first}"
    );
    let second = env.build(&ctx, &["-t", "edit:1"]);
    for what in ["WORKDIR /src", "COPY src/ ./", "RUN cat a.txt b.txt"] {
        let n = step_number(&second, what);
        let lines = step_lines(&second, &n);
        assert!(
            lines.iter().any(|l| l.ends_with(" CACHED")),
            "{what}:\n{second}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("MISS")),
            "{what}:\n{second}"
        );
    }
    assert!(second.contains("0 steps run"), "{second}");
    // A fully cached rebuild is the same image: same config, same id.
    let id = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("built "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
    };
    assert!(id(&first).is_some(), "{first}");
    assert_eq!(id(&first), id(&second), "{first}\n{second}");
    fs_err::write(ctx.join("src/b.txt"), "b2\n").expect("edit");
    let third = env.build(&ctx, &["-t", "edit:1"]);
    let copy = step_number(&third, "COPY src/ ./");
    let lines = step_lines(&third, &copy);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("MISS") && l.contains("file `src/b.txt` changed")),
        "{third}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("a.txt")),
        "only the edited file is named:\n{third}"
    );
    let wd = step_number(&third, "WORKDIR /src");
    assert!(
        step_lines(&third, &wd)
            .iter()
            .any(|l| l.ends_with(" CACHED"))
    );
    let fs = env.rootfs(&ctx, &["-t", "edit:1"], "out");
    assert_eq!(read(&fs.join("joined")), "a\nb2\n");
    env.assert_clean();
}

#[test]
fn dockerignore_is_respected() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("ignore");
    let fs = env.rootfs(&ctx, &["-t", "ign:1"], "out");
    assert!(fs.join("ctx/kept.txt").is_file());
    assert!(
        fs.join("ctx/keep.log").is_file(),
        "!keep.log re-includes it"
    );
    assert!(!fs.join("ctx/ignored.txt").exists());
    assert!(!fs.join("ctx/debug.log").exists());
    // A bind mount of the context shows what COPY sees.
    for list in ["bind-ls", "bind-rw-ls"] {
        let names: Vec<String> = read(&fs.join(list)).lines().map(str::to_owned).collect();
        assert!(names.contains(&"kept.txt".to_owned()), "{list}: {names:?}");
        assert!(names.contains(&"keep.log".to_owned()), "{list}: {names:?}");
        assert!(
            !names.contains(&"ignored.txt".to_owned()),
            "{list}: {names:?}"
        );
        assert!(
            !names.contains(&"debug.log".to_owned()),
            "{list}: {names:?}"
        );
    }
    // Editing an ignored file changes nothing.
    fs_err::write(ctx.join("ignored.txt"), "changed\n").expect("edit");
    let again = env.build(&ctx, &["-t", "ign:1"]);
    assert!(again.contains("0 steps run"), "{again}");
    env.assert_clean();
}

#[test]
fn secrets_never_reach_a_layer() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("secret");
    let secret = env.path("token.txt");
    fs_err::write(&secret, "TOPSECRET-4711").expect("write");
    let spec = format!("id=token,src={}", secret.display());
    let fs = env.rootfs(&ctx, &["-t", "sec:1", "--secret", &spec], "out");
    let o = Command::new("sha256sum")
        .arg(&secret)
        .output()
        .expect("sha256sum");
    let want = text(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(want.len(), 64);
    assert!(
        read(&fs.join("secret-sum")).starts_with(&want),
        "the file mount has the secret"
    );
    assert_eq!(read(&fs.join("secret-size")).trim(), "14");
    assert!(
        read(&fs.join("secret-env-sum")).starts_with(&want),
        "env= has the secret"
    );
    assert!(!fs.join("run/secrets/token").exists());
    assert!(
        !fs.join("etc/token").exists(),
        "the mount point stub is gone"
    );
    // Not in any layer, config or history: save the image and grep it.
    let archive = env.path("sec.tar");
    let o = env.kiln(&["save", "-o", archive.to_str().expect("utf8"), "sec:1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let bytes = fs_err::read(&archive).expect("read");
    assert!(
        !bytes.windows(14).any(|w| w == b"TOPSECRET-4711"),
        "the secret is in the saved image"
    );
    // A missing secret is an error naming it.
    let ctx2 = env.context("secret");
    fs_err::write(
        ctx2.join("Dockerfile"),
        "FROM busybox:local\nRUN --mount=type=secret,id=absent,required=true true\n",
    )
    .expect("write");
    let o = env.build_raw(&ctx2, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("secret `absent`"),
        "{}",
        text(&o.stderr)
    );
    env.assert_clean();
}

#[test]
fn cache_mount_persists_across_builds() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("cachemount");
    let fs = env.rootfs(&ctx, &["--no-cache"], "one");
    assert_eq!(read(&fs.join("runs")).trim(), "1");
    assert!(
        !fs.join("var/cache/app/runs").exists(),
        "cache content is not in the layer"
    );
    let fs = env.rootfs(&ctx, &["--no-cache"], "two");
    assert_eq!(read(&fs.join("runs")).trim(), "2");
    assert_eq!(read(&fs.join("owned-stat")).trim(), "65534:65534:700");
    env.assert_clean();
}

#[test]
fn failing_run_reports_code_output_and_line() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("fail");
    let o = env.build_raw(&ctx, &["-t", "fail:1"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("exit code 7"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("boom-on-stderr"), "{err}");
    assert!(err.contains("some-output"), "{err}");
    assert!(!err.contains("RUN echo never"), "the build stopped:\n{err}");
    // No image under the tag, nothing mounted, and the store is consistent.
    let o = env.kiln(&["images"]);
    assert!(!text(&o.stdout).contains("fail "), "{}", text(&o.stdout));
    env.assert_clean();
    let o = env.kiln(&["system", "check"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
}

#[test]
fn missing_copy_source_names_path_and_line() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("missing");
    let o = env.build_raw(&ctx, &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("nothere.txt"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("   3 | >>> COPY nothere.txt /"), "{err}");
    env.assert_clean();
}

/// A `COPY --from` of a path the stage lacks fails in the copy (its key
/// needs no such file), with the RUN after it waiting for it: the build
/// leaves no process behind, not even the sandbox helper started for that
/// RUN meanwhile, and nothing mounted.
#[test]
fn a_failed_copy_leaves_no_sandbox_helper() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("missingfrom");
    // Processes of this build carry the token in their environment.
    let token = format!("KILN_TEST_TOKEN=missingfrom-{}", std::process::id());
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(env.store())
        .args(["build", "--progress=plain", "--network=none"])
        .arg(&ctx)
        .env_remove("KILN_ROOT")
        .env(
            "KILN_TEST_TOKEN",
            token.trim_start_matches("KILN_TEST_TOKEN="),
        )
        .output()
        .expect("run kiln");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("/nothere"), "{err}");
    assert!(err.contains("line 5"), "{err}");
    let left: Vec<String> = fs_err::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| {
            fs_err::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == token.as_bytes()))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "processes of the failed build left: {left:?}"
    );
    env.assert_clean();
}

#[test]
fn missing_base_image_is_a_clear_error() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("missing");
    fs_err::write(ctx.join("Dockerfile"), "FROM nosuch:image\nRUN true\n").expect("write");
    let o = env.build_raw(&ctx, &["--pull=never"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("nosuch:image"), "{err}");
    assert!(err.contains("line 1") || err.contains(":1:"), "{err}");
}

#[test]
fn saved_result_is_accepted_by_skopeo_and_umoci_and_reproducible() {
    if !can_build() {
        return;
    }
    if !(have_tool("skopeo") && have_tool("umoci")) {
        assert!(!ci(), "CI=true but this test needs skopeo and umoci");
        eprintln!("skipping: needs skopeo and umoci");
        return;
    }
    let env = Env::new();
    let hello = workspace().join("testdata/hello");
    let iid = env.path("iid");
    let meta = env.path("meta.json");
    let oci = env.path("hello-oci.tar");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("--root")
        .arg(env.store())
        .args([
            "build",
            "--progress=plain",
            "--network=none",
            "-t",
            "hello:1",
        ])
        .arg("--iidfile")
        .arg(&iid)
        .arg("--metadata-file")
        .arg(&meta)
        .arg("--output")
        .arg(format!("type=oci,dest={}", oci.display()))
        .arg(&hello)
        .env("SOURCE_DATE_EPOCH", "1700000000");
    let o = cmd.output().expect("build");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let id = read(&iid);
    assert!(id.starts_with("sha256:"), "{id}");
    let m: serde_json::Value = serde_json::from_str(&read(&meta)).expect("metadata");
    assert!(
        m["containerimage.digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );

    let docker = env.path("hello-docker.tar");
    let o = env.kiln(&["save", "-o", docker.to_str().expect("utf8"), "hello:1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", docker.display()))
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "skopeo: {}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("skopeo json");
    assert_eq!(v["Created"], "2023-11-14T22:13:20Z");
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3));

    let layout = env.path("layout");
    fs_err::create_dir_all(&layout).expect("mkdir");
    let o = Command::new("tar")
        .arg("-xf")
        .arg(&oci)
        .arg("-C")
        .arg(&layout)
        .output()
        .expect("tar");
    assert!(o.status.success());
    let bundle = env.path("bundle");
    let o = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:1", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci");
    assert!(o.status.success(), "umoci: {}", text(&o.stderr));
    assert_eq!(read(&bundle.join("rootfs/greeting")), "hello from kiln\n");
    assert_eq!(read(&bundle.join("rootfs/etc/motd")), "built by kiln\n");

    // The same build into another store gives the same image id.
    let other = Env::new();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(other.store())
        .args([
            "build",
            "--progress=plain",
            "--network=none",
            "-t",
            "hello:1",
        ])
        .arg(&hello)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("build");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), id.trim(), "reproducible image id");
    env.assert_clean();
}

#[test]
fn sixty_layers_copy_link_from_and_bind_from_a_stage() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("layers");
    let fs = env.rootfs(&ctx, &["-t", "layers:1"], "out");
    assert_eq!(read(&fs.join("out/f0")), "0\n");
    assert_eq!(read(&fs.join("out/f59")), "59\n");
    assert_eq!(read(&fs.join("out/f30")), "30\n");
    assert_eq!(read(&fs.join("out/bound")), "10\n");
    assert!(!fs.join("f1").exists(), "only the copied files come over");
    // The 60-layer stage is not in the result: 1 base layer + 3.
    let c = env.config("layers:1");
    assert_eq!(c["rootfs"]["diff_ids"].as_array().map(Vec::len), Some(4));
    env.assert_clean();
}

#[test]
fn json_progress_is_one_event_per_line() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    let o = env.kiln(&[
        "build",
        "--progress=json",
        "--network=none",
        ctx.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(events.iter().any(|e| {
        e["event"] == "vertex_started"
            && e["name"]
                .as_str()
                .is_some_and(|n| n.contains("RUN cat a.txt b.txt"))
    }));
    assert!(events.iter().any(|e| e["event"] == "vertex_miss"));
    assert!(events.iter().any(|e| e["event"] == "vertex_finished"));
}

#[test]
fn quiet_prints_only_the_image_id_or_the_error() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    let c = ctx.to_str().expect("utf8");
    // A build that runs its steps, then one the memo answers, then
    // `--progress=quiet`: stdout is the image ID, stderr is empty.
    let mut ids = Vec::new();
    for args in [
        ["build", "-q", "--network=none", "-t", "quiet:1", c],
        ["build", "--quiet", "--network=none", "-t", "quiet:1", c],
        [
            "build",
            "--progress=quiet",
            "--network=none",
            "-t",
            "quiet:1",
            c,
        ],
    ] {
        let o = env.kiln(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        assert_eq!(text(&o.stderr), "", "{args:?}");
        let out = text(&o.stdout);
        let id = out.strip_suffix('\n').unwrap_or_default().to_owned();
        assert!(
            id.starts_with("sha256:") && !id.contains('\n'),
            "{args:?}: {out:?}"
        );
        ids.push(id);
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(env.config("quiet:1")["rootfs"]["type"], "layers");
    // A failing RUN still says what failed, with the tail of its output.
    let fail = env.context("fail");
    let o = env.kiln(&[
        "build",
        "-q",
        "--network=none",
        fail.to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    assert_eq!(text(&o.stdout), "");
    let err = text(&o.stderr);
    assert!(err.contains("exit code 7"), "{err}");
    assert!(err.contains("boom-on-stderr"), "{err}");
    assert!(!err.contains("#1 "), "progress printed:\n{err}");
}

#[test]
fn platform_flag_as_in_buildkit() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("platform");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let host = format!("linux/{arch}");
    // This machine's platform: the automatic args say so, and so does the
    // config.
    let out = env.rootfs(&ctx, &["--platform", &host, "-t", "p:host"], "host-root");
    assert_eq!(
        read(&out.join("platform")),
        format!("{host} {host} {arch}\n")
    );
    assert_eq!(env.config("p:host")["architecture"], arch);
    // Another platform: the base image in the store is for this one, so it
    // is no base (offline, the pull fails), and the error says why.
    let foreign = if arch == "s390x" {
        "linux/arm64"
    } else {
        "linux/s390x"
    };
    for pull in ["--pull=never", "--pull=missing"] {
        let o = env.build_raw(&ctx, &["--platform", foreign, pull, "-t", "p:foreign"]);
        assert!(!o.status.success(), "{pull}");
        let err = text(&o.stderr);
        assert!(
            err.contains(&format!("for {host}")) && err.contains(foreign),
            "{pull}: {err}"
        );
    }
    assert!(!text(&env.kiln(&["images"]).stdout).contains("p:foreign"));
    env.assert_clean();
    // Cross-building: the tools stage runs here (FROM
    // --platform=$BUILDPLATFORM); the result is for the target.
    let cross = ctx.join("Dockerfile.cross");
    let df = cross.to_str().expect("utf8");
    let out = env.rootfs(
        &ctx,
        &["-f", df, "--platform", foreign, "-t", "p:cross"],
        "cross-root",
    );
    assert_eq!(
        read(&out.join("built-for")),
        format!("{host} -> {foreign}\n")
    );
    let config = env.config("p:cross");
    assert_eq!(config["architecture"], foreign.trim_start_matches("linux/"));
    assert_eq!(config["os"], "linux");
    // One platform at a time; and a platform has to parse.
    assert_each_refused(
        &env,
        &ctx,
        "--platform",
        &["linux/amd64,linux/arm64", "linux//v7"],
    );
}

/// `kiln build FLAG VALUE CTX` fails for each of `values`, naming it.
fn assert_each_refused(env: &Env, ctx: &Path, flag: &str, values: &[&str]) {
    for bad in values {
        let o = env.build_raw(ctx, &[flag, bad]);
        assert!(!o.status.success(), "{flag} {bad}");
        assert!(
            text(&o.stderr).contains(bad),
            "{flag} {bad}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn add_host_reaches_the_runs_hosts_file_and_the_key() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("addhost");
    let hosts = [
        "--add-host",
        "db.internal:10.1.2.3",
        "--add-host=v6.internal=::1",
    ];
    let out = env.rootfs(&ctx, &hosts, "with-hosts");
    assert_eq!(
        read(&out.join("hosts-seen")),
        "10.1.2.3\tdb.internal\n::1\tv6.internal\n"
    );
    // The sandbox's /etc/hosts is no part of the layer.
    let etc_hosts = out.join("etc/hosts");
    assert!(
        !etc_hosts.exists() || !read(&etc_hosts).contains("internal"),
        "{}",
        read(&etc_hosts)
    );
    // The same hosts: cached. Without them: the RUN runs again.
    let again = env.build(&ctx, &hosts);
    let run = step_number(&again, "RUN grep");
    assert!(
        step_lines(&again, &run).contains(&format!("{run} CACHED").as_str()),
        "{again}"
    );
    let out = env.rootfs(&ctx, &[], "without");
    assert_eq!(read(&out.join("hosts-seen")), "");
    assert_each_refused(
        &env,
        &ctx,
        "--add-host",
        &[
            "nohost",
            "h:not-an-ip",
            "h:host-gateway",
            "bad/name:10.0.0.1",
        ],
    );
}

#[test]
fn ssh_mounts_forward_the_agent_as_buildkit_does() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("ssh");
    // An agent's socket (what the RUN sends through it is the relay's
    // unit test: busybox has no client).
    let agent = env.path("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&agent).expect("agent socket");
    let default = format!("default={}", agent.display());
    let other = format!("other={}", agent.display());
    let out = env.rootfs(&ctx, &["--ssh", &default, "--ssh", &other], "ssh-root");
    // The default: at /run/buildkit/ssh_agent.0, root's, 0600.
    assert_eq!(
        read(&out.join("default-seen")),
        "600 0 0 /run/buildkit/ssh_agent.0\n"
    );
    // Placed and owned as the mount says.
    assert_eq!(
        read(&out.join("other-seen")),
        "660 1000 1001 /tmp/agent.sock\nSSH_AUTH_SOCK=/tmp/agent.sock\n"
    );
    // An agent not given: no socket (the mount is optional), the variable
    // still names where it would be.
    assert_eq!(
        read(&out.join("absent-seen")),
        "SSH_AUTH_SOCK=/run/buildkit/ssh_agent.0\nno-socket\n"
    );
    // Nothing of the mounts is left in a layer.
    assert!(!out.join("run/buildkit").exists());
    assert!(!out.join("tmp/agent.sock").exists());
    // Required and not given: the line and the id.
    let required = ctx.join("Dockerfile.required");
    let o = env.build_raw(&ctx, &["-f", required.to_str().expect("utf8")]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("line 2") && err.contains("ssh agent `needed`"),
        "{err}"
    );
    env.assert_clean();
    // `--ssh` needs an agent socket: not a key file, and `default` alone
    // needs SSH_AUTH_SOCK (unset here).
    let o = env.build_raw(&ctx, &["--ssh", "default=/etc/passwd"]);
    assert!(
        text(&o.stderr).contains("no agent socket"),
        "{}",
        text(&o.stderr)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(env.store())
        .args(["build", "--no-cache", "--network=none", "--ssh", "default"])
        .arg(&ctx)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run kiln");
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("SSH_AUTH_SOCK is not set"),
        "{}",
        text(&o.stderr)
    );
}

/// Starts `kiln build -t TAG CTX` and returns once a line of its progress
/// ends with ` started` (a RUN's output): the build, and the thread that
/// collects its progress output (stderr) until it exits.
fn build_until_started(
    env: &Env,
    ctx: &Path,
    tag: &str,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(env.store())
        .args(["build", "--progress=plain", "--network=none", "-t", tag])
        .arg(ctx)
        .env_remove("KILN_ROOT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.ends_with(" started") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("the RUN started");
    (child, reader)
}

#[test]
fn sigint_cancels_and_leaves_nothing_mounted() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    // The RUN starts on the COPY's upper while the 32 MB layer is still
    // being hashed (see `runner::pending`): it holds that upper when
    // cancelled, and the commit waits for it.
    let ctx = env.path("ctx-cancel-big");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(
        ctx.join("Dockerfile"),
        read(&env.context("cancel").join("Dockerfile")).replace("COPY Dockerfile /", "COPY big /"),
    )
    .expect("dockerfile");
    fs_err::write(ctx.join("big"), vec![7u8; 32 << 20]).expect("big");
    // Wait for the RUN's first line of output, then Ctrl-C.
    let (mut child, reader) = build_until_started(&env, &ctx, "cancel:1");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("kill");
    let t = std::time::Instant::now();
    let status = child.wait().expect("wait");
    let out = reader.join().expect("reader");
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "cancel did not stop the 60 s sleep"
    );
    assert!(out.contains("cancelled"), "{out}");
    env.assert_clean();
    let o = env.kiln(&["system", "check"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let o = env.kiln(&["images"]);
    assert!(!text(&o.stdout).contains("cancel"), "{}", text(&o.stdout));
}

/// `kiln prune -a` while a build runs waits for the build to end (it holds
/// the store lock shared) instead of removing the scratch tree of its
/// running RUN and the layers it has committed but not yet recorded: the
/// build succeeds, and the store checks clean.
#[test]
fn prune_waits_for_a_running_build() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-prune");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(ctx.join("f.txt"), "kept\n").expect("f.txt");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY f.txt /f.txt\n\
         RUN echo started && sleep 2 && cat /f.txt > /out.txt\nRUN cat /out.txt\n",
    )
    .expect("dockerfile");
    let (mut child, reader) = build_until_started(&env, &ctx, "pruned:1");
    let pruned = env.kiln(&["prune", "-a", "-f"]);
    let status = child.wait().expect("wait");
    let out = reader.join().expect("reader");
    assert!(pruned.status.success(), "{}", text(&pruned.stderr));
    assert!(
        text(&pruned.stderr).contains("waiting for the builds using the store to finish"),
        "{}",
        text(&pruned.stderr)
    );
    assert!(status.success(), "{out}");
    assert!(out.contains("built sha256:"), "{out}");
    let o = env.kiln(&["system", "check"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let o = env.kiln(&[
        "run",
        "--rm",
        "--network",
        "none",
        "pruned:1",
        "cat",
        "/out.txt",
    ]);
    assert_eq!(text(&o.stdout).trim(), "kept", "{}", text(&o.stderr));
    env.assert_clean();
}

/// Over `KILN_GC_KEEP_STORAGE`, a build that made layers collects the
/// least recently used build cache (as BuildKit's GC keeps `keepBytes`):
/// the replaced image's layers go, so building it again runs its RUN anew;
/// the image just built stays whole. `kiln prune --keep-storage 0` then
/// drops every record that holds a layer no image has.
#[test]
fn builds_keep_the_build_cache_under_its_limit() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-gc");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    let dockerfile = |n: u32| {
        fs_err::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM busybox:local\nRUN head -c 200000 /dev/urandom > /blob && echo {n} > /n\n"
            ),
        )
        .expect("dockerfile");
    };
    // `kiln build -t TAG CTX` under the limit `limit`: its progress.
    let build_as = |tag: &str, limit: &str, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(env.store())
            .args(["build", "--progress=plain", "--network=none", "-t", tag])
            .args(extra)
            .arg(&ctx)
            .env_remove("KILN_ROOT")
            .env("KILN_GC_KEEP_STORAGE", limit)
            .output()
            .expect("build");
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    let build = |limit: &str| build_as("gc:1", limit, &[]);
    dockerfile(1);
    let first = build("100KB");
    assert!(!first.contains("pruned"), "{first}");
    dockerfile(2);
    // The first image lost its name: its 200 KB layer is only build cache.
    let second = build("100KB");
    assert!(
        second.contains("cache records, 20") && second.contains("kB of layers"),
        "{second}"
    );
    let o = env.kiln(&["run", "--rm", "--network", "none", "gc:1", "cat", "/n"]);
    assert_eq!(text(&o.stdout).trim(), "2", "{}", text(&o.stderr));
    dockerfile(1);
    let again = build("off");
    assert!(
        step_lines(&again, &step_number(&again, "RUN head"))
            .iter()
            .all(|l| !l.ends_with("CACHED")),
        "{again}"
    );
    // Without a limit reached, nothing goes: the second image's RUN is
    // still cached.
    dockerfile(2);
    let cached = build("100MB");
    assert!(cached.contains(" CACHED"), "{cached}");
    assert!(!cached.contains("pruned"), "{cached}");
    // A limit that is no size says so (and collects nothing).
    let warned = build_as("gc:2", "lots", &["--no-cache"]);
    assert!(
        warned.contains("warning: KILN_GC_KEEP_STORAGE: "),
        "{warned}"
    );
    let o = env.kiln(&["prune", "--keep-storage", "0", "-f"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    dockerfile(1);
    let after = build("off");
    assert!(
        step_lines(&after, &step_number(&after, "RUN head"))
            .iter()
            .all(|l| !l.ends_with("CACHED")),
        "{after}"
    );
    let o = env.kiln(&["system", "check"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    env.assert_clean();
}

#[test]
fn sigkill_leftovers_are_swept_by_the_next_build() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(env.store())
        .args(["build", "--progress=plain", "--network=none"])
        .arg(&ctx)
        .env_remove("KILN_ROOT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.ends_with(" started") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("the RUN started");
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let _ = reader.join();
    // The runner's bind mount of the other stage is still there.
    let mounts = fs_err::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root = env.store().join("tmp").to_string_lossy().into_owned();
    assert!(
        mounts.lines().any(|l| l.contains(&root)),
        "expected a leftover mount under {root}"
    );
    // The sandbox's helper saw its lifeline close; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Any build sweeps what the dead one left.
    let other = env.context("edit");
    env.build(&other, &[]);
    env.assert_clean();
}

#[test]
fn deletions_are_whiteouts_across_layers() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("delete");
    let fs = env.rootfs(&ctx, &["-t", "del:1"], "out");
    assert!(!fs.join("etc/group").exists());
    assert!(fs.join("etc/passwd").is_file());
    let mut d: Vec<String> = fs_err::read_dir(fs.join("d"))
        .expect("read_dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    d.sort();
    assert_eq!(d, ["c", "keep.txt"]);
    assert_eq!(read(&fs.join("checked")), "checked\n");
    env.assert_clean();
}

#[test]
fn user_workdir_and_chown_ownership() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("owner");
    let fs = env.rootfs(&ctx, &["-t", "own:1"], "out");
    assert_eq!(
        read(&fs.join("tmp/owners")),
        "nobody:nogroup /home/nobody/work\nnobody:nogroup mine.txt\nroot:root root-owned.txt\n"
    );
    assert_eq!(read(&fs.join("tmp/whoami")), "nobody\n");
    assert_eq!(env.config("own:1")["config"]["User"], "nobody");
}

/// `kiln` with `stdin` as its standard input; returns the output.
fn kiln_with_stdin(env: &Env, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(env.store())
        .args(args)
        .env_remove("KILN_ROOT")
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = writer.join();
    out
}

#[test]
fn config_steps_are_not_cached_on_a_first_build() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    let first = env.build(&ctx, &["-t", "cfg:1"]);
    for what in ["ENV MODE=release", "CMD [\"cat\", \"/joined\"]"] {
        let n = step_number(&first, what);
        let lines = step_lines(&first, &n);
        assert!(
            !lines.iter().any(|l| l.ends_with(" CACHED")),
            "{what} CACHED on a first build:\n{first}"
        );
        assert!(
            lines.iter().any(|l| l.contains(" DONE ")),
            "{what}:\n{first}"
        );
    }
    let second = env.build(&ctx, &["-t", "cfg:1", "--build-arg", "NOT_DECLARED=1"]);
    assert!(
        second.contains("build-args [NOT_DECLARED] were not consumed"),
        "{second}"
    );
    for what in ["ENV MODE=release", "CMD [\"cat\", \"/joined\"]"] {
        let n = step_number(&second, what);
        assert!(
            step_lines(&second, &n)
                .iter()
                .any(|l| l.ends_with(" CACHED")),
            "{what} not CACHED on a rebuild:\n{second}"
        );
    }
    // An edited ENV after cached steps: done, with its cause.
    let df = read(&ctx.join("Dockerfile")).replace("MODE=release", "MODE=debug");
    fs_err::write(ctx.join("Dockerfile"), df).expect("write");
    let third = env.build(&ctx, &["-t", "cfg:1"]);
    let n = step_number(&third, "ENV MODE=debug");
    let lines = step_lines(&third, &n);
    assert!(!lines.iter().any(|l| l.ends_with(" CACHED")), "{third}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("MISS: instruction changed")),
        "{third}"
    );
    assert_eq!(env.config("cfg:1")["config"]["Env"][1], "MODE=debug");
    env.assert_clean();
}

#[test]
fn context_and_dockerfile_from_stdin() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    // A tar of the context on stdin (gzip-compressed).
    let tar = env.path("ctx.tar.gz");
    let o = Command::new("tar")
        .arg("-czf")
        .arg(&tar)
        .arg("-C")
        .arg(&ctx)
        .arg(".")
        .output()
        .expect("tar");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let bytes = fs_err::read(&tar).expect("read tar");
    let dest = env.path("out-tar");
    let out = format!("type=local,dest={}", dest.display());
    let o = kiln_with_stdin(
        &env,
        &[
            "build",
            "--progress=plain",
            "--network=none",
            "-t",
            "stdin:1",
            "--output",
            &out,
            "-",
        ],
        &bytes,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(read(&dest.join("joined")), "a\nb\n");
    // The same tar again: every step is a hit.
    let o = kiln_with_stdin(
        &env,
        &[
            "build",
            "--progress=plain",
            "--network=none",
            "-t",
            "stdin:1",
            "-",
        ],
        &bytes,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("0 steps run"),
        "{}",
        text(&o.stderr)
    );
    // A Dockerfile on stdin, with no context (and docker's `-o DIR`).
    let dest = env.path("out-df");
    let out = dest.display().to_string();
    let o = kiln_with_stdin(
        &env,
        &[
            "build",
            "--progress=plain",
            "--network=none",
            "--output",
            &out,
            "-",
        ],
        b"FROM busybox:local\nRUN echo from-stdin > /hi\n",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(read(&dest.join("hi")), "from-stdin\n");
    // Errors name the Dockerfile `-`, not a scratch path.
    let o = kiln_with_stdin(
        &env,
        &["build", "--progress=plain", "--network=none", "-"],
        b"FROM busybox:local\nRUN exit 5\nRUN [unclosed\n",
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(!err.contains("/tmp/stdin-"), "{err}");
    let o = kiln_with_stdin(
        &env,
        &["build", "--progress=plain", "--network=none", "-"],
        b"FROM nosuch:image\n",
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("planning `-`"), "{err}");
    // `-f -` with a context directory.
    let dest = env.path("out-f");
    let out = format!("type=local,dest={}", dest.display());
    let c = ctx.to_str().expect("utf8");
    let o = kiln_with_stdin(
        &env,
        &[
            "build",
            "--progress=plain",
            "--network=none",
            "-f",
            "-",
            "--output",
            &out,
            c,
        ],
        b"FROM busybox:local\nCOPY src/a.txt /a\n",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(read(&dest.join("a")), "a\n");
    env.assert_clean();
}

/// Processes whose command line is exactly `argv`.
fn processes_with_cmdline(argv: &[&str]) -> Vec<String> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    fs_err::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| fs_err::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn failing_run_leaves_no_process_and_no_mount() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("failbg");
    let token = (900_000 + std::process::id() % 90_000).to_string();
    let arg = format!("TOKEN={token}");
    let o = env.build_raw(&ctx, &["--build-arg", &arg]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("exit code 3"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    // The Dockerfile excerpt, as docker shows it.
    assert!(err.contains("Dockerfile:4"), "{err}");
    assert!(
        err.contains("   4 | >>> RUN sleep $TOKEN >/dev/null 2>&1 & echo started-background"),
        "{err}"
    );
    assert!(err.contains("   3 |     ARG TOKEN"), "{err}");
    assert!(err.contains("started-background"), "{err}");
    let left = processes_with_cmdline(&["sleep", &token]);
    // Clean up before asserting, so a failure leaves nothing behind.
    for pid in &left {
        if let Ok(p) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    assert!(
        left.is_empty(),
        "the RUN's background process survived: pids {left:?}"
    );
    env.assert_clean();
    // A missing COPY source: nothing mounted either.
    let ctx = env.context("missing");
    let o = env.build_raw(&ctx, &[]);
    assert!(!o.status.success());
    env.assert_clean();
}

#[test]
fn bind_mount_rw_writes_are_discarded() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("bindrw");
    let fs = env.rootfs(&ctx, &["-t", "bindrw:1"], "out");
    let f = |p: &str| read(&fs.join(p));
    assert_eq!(f("seen-ctx"), "changed\n", "the RUN could write");
    assert_eq!(f("seen-file"), "original\nmore\n");
    assert_eq!(f("seen-stage"), "s.txt\nw.txt\n");
    // Gone afterwards: from the context, the stage, the next RUNs and the layers.
    assert_eq!(read(&ctx.join("input.txt")), "original\n");
    assert!(!ctx.join("new.txt").exists());
    assert!(ctx.join("sub/s.txt").exists());
    assert_eq!(f("stage-after"), "s.txt\n");
    assert_eq!(f("seen-after"), "original\nin sub\n");
    assert!(!f("ls-after").contains("new.txt"));
    assert!(!fs.join("ctx/new.txt").exists());
    assert!(!fs.join("d/w.txt").exists());
    // Without rw the bind is read-only.
    assert_ne!(f("ro-status").trim(), "0");
    env.assert_clean();
}

#[test]
fn cache_mount_sharing_private_and_locked() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("cacheshare");
    let fs = env.rootfs(&ctx, &["--jobs", "4"], "out");
    let f = |p: &str| read(&fs.join(p));
    // Two private users at once: each its own directory, made with uid/mode.
    assert_eq!(f("a-ls"), "a\n");
    assert_eq!(f("b-ls"), "b\n");
    assert_eq!(f("a-stat").trim(), "65534:700");
    assert_eq!(f("b-stat").trim(), "65534:700");
    // Locked: the second saw the first one's work finished.
    assert_eq!(f("c-ls"), "");
    assert_eq!(f("d-ls"), "");
    env.assert_clean();
}

fn interfaces(list: &str) -> Vec<String> {
    let mut v: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn network_default_is_the_host_network() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("network");
    let dest = env.path("out");
    let out = format!("type=local,dest={}", dest.display());
    let c = ctx.to_str().expect("utf8");
    let o = env.kiln(&[
        "build",
        "--progress=plain",
        "--network",
        "default",
        "--output",
        &out,
        c,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let host: Vec<String> = interfaces(
        &read(Path::new("/proc/net/dev"))
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let f = |p: &str| interfaces(&read(&dest.join(p)));
    assert_eq!(f("net-flag"), host, "--network default");
    assert_eq!(f("net-default"), host, "RUN --network=default");
    assert_eq!(f("net-host"), host);
    assert_eq!(f("net-none"), ["lo"]);
    // --network none makes `default` RUNs network-less too; the network
    // is in their keys (a RUN built with the host network is no hit).
    let dest2 = env.path("out2");
    let out2 = format!("type=local,dest={}", dest2.display());
    let o = env.kiln(&[
        "build",
        "--progress=plain",
        "--network=none",
        "--output",
        &out2,
        c,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(interfaces(&read(&dest2.join("net-flag"))), ["lo"]);
    assert_eq!(interfaces(&read(&dest2.join("net-default"))), ["lo"]);
    assert_eq!(interfaces(&read(&dest2.join("net-host"))), host);
    env.assert_clean();
}

#[test]
fn onbuild_of_a_base_image_and_cmd_reset_by_entrypoint() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("onbuild");
    let base = ctx.join("base.Dockerfile");
    env.build(
        &ctx,
        &["-f", base.to_str().expect("utf8"), "-t", "onbase:1"],
    );
    assert_eq!(
        env.config("onbase:1")["config"]["OnBuild"],
        serde_json::json!(["RUN echo triggered > /onbuild-ran"])
    );
    let fs = env.rootfs(&ctx, &["-t", "onchild:1"], "out");
    assert_eq!(read(&fs.join("onbuild-ran")), "triggered\n");
    let cfg = &env.config("onchild:1")["config"];
    assert_eq!(cfg["Entrypoint"], serde_json::json!(["/bin/echo"]));
    assert!(cfg["Cmd"].is_null(), "inherited CMD reset: {cfg}");
    assert!(
        cfg["OnBuild"].is_null(),
        "triggers are not inherited: {cfg}"
    );
    let keep = ctx.join("keepcmd.Dockerfile");
    env.build(
        &ctx,
        &["-f", keep.to_str().expect("utf8"), "-t", "onkeep:1"],
    );
    let cfg = &env.config("onkeep:1")["config"];
    assert_eq!(cfg["Cmd"], serde_json::json!(["own-cmd"]));
    env.assert_clean();
}

/// The MISS line of the step named `what`.
fn miss_line(progress: &str, what: &str) -> String {
    let n = step_number(progress, what);
    step_lines(progress, &n)
        .iter()
        .find(|l| l.contains("MISS"))
        .map(|l| (*l).to_owned())
        .unwrap_or_else(|| panic!("no MISS for `{what}`:\n{progress}"))
}

/// A cache record whose layer left the store (a snapshot removed by hand)
/// is no hit: the step runs again, and so does a later step whose cached
/// chain holds that layer; the image is whole.
#[test]
fn a_cached_result_whose_layer_is_gone_runs_again() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-gone");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nRUN cat /proc/sys/kernel/random/uuid > /one\nRUN echo two > /two\n",
    )
    .expect("write");
    env.build(&ctx, &["-t", "gone:1"]);
    let layer = layer_of(&env, "gone:1", 1);
    let hex = layer.strip_prefix("sha256:").expect("sha256");
    let snap = env.store().join("snapshots").join(format!("v1-{hex}"));
    assert!(snap.is_dir(), "{}", snap.display());
    fs_err::remove_dir_all(&snap).expect("rm snapshot");
    let p = env.build(&ctx, &["-t", "gone:1"]);
    // The second step's cached chain holds the lost layer, which the new
    // run of the first (another time in `/one`) does not bring back.
    for what in ["RUN cat", "RUN echo two"] {
        let n = step_number(&p, what);
        let lines = step_lines(&p, &n);
        assert!(
            !lines.iter().any(|l| l.ends_with(" CACHED"))
                && lines.iter().any(|l| l.contains("MISS")),
            "{what}:\n{p}"
        );
    }
    assert!(
        miss_line(&p, "RUN cat").contains("its layers are gone"),
        "{p}"
    );
    assert!(p.contains("2 steps run"), "{p}");
    let o = env.kiln(&[
        "run",
        "--rm",
        "--network=none",
        "gone:1",
        "cat",
        "/one",
        "/two",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].len() == 36 && lines[1] == "two",
        "{out}"
    );
    env.assert_clean();
}

#[test]
fn miss_causes_name_instruction_arg_and_base_image() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("onbuild");
    let base = ctx.join("base.Dockerfile");
    let base = base.to_str().expect("utf8");
    env.build(&ctx, &["-f", base, "-t", "onbase:1"]);
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM onbase:1\nARG V=1\nRUN echo $V > /v\nRUN echo one > /one\n",
    )
    .expect("write");
    env.build(&ctx, &[]);
    // An ARG value.
    let p = env.build(&ctx, &["--build-arg", "V=2"]);
    let l = miss_line(&p, "RUN echo $V");
    assert!(l.contains("ARG `V` changed (`1` -> `2`)"), "{p}");
    // The instruction text.
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM onbase:1\nARG V=1\nRUN echo $V > /v\nRUN echo two > /one\n",
    )
    .expect("write");
    let p = env.build(&ctx, &[]);
    let l = miss_line(&p, "RUN echo two");
    assert!(l.contains("instruction changed"), "{p}");
    assert!(l.contains("echo one"), "{p}");
    // The base image: the tag now names another image.
    fs_err::write(base, "FROM busybox:local\nRUN echo new > /new-base\n").expect("write");
    env.build(&ctx, &["-f", base, "-t", "onbase:1"]);
    let p = env.build(&ctx, &[]);
    let l = miss_line(&p, "FROM onbase:1");
    assert!(l.contains("base image `onbase:1` changed"), "{p}");
    env.assert_clean();
}

#[test]
fn copy_and_bind_from_a_stage_are_keyed_by_content() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("fromcontent");
    env.build(&ctx, &["-t", "fc:1"]);
    // The stage runs again (its ARG changed) but the copied file is the same.
    let p = env.build(&ctx, &["-t", "fc:1", "--build-arg", "NOISE=2"]);
    let generator = step_number(&p, "RUN echo \"$NOISE\"");
    assert!(
        step_lines(&p, &generator)
            .iter()
            .any(|l| l.contains("MISS")),
        "{p}"
    );
    for what in [
        "COPY --from=gen /stable /stable",
        "RUN cat /stable",
        "RUN --mount=type=bind,from=gen",
    ] {
        let n = step_number(&p, what);
        assert!(
            step_lines(&p, &n).iter().any(|l| l.ends_with(" CACHED")),
            "{what}:\n{p}"
        );
    }
    assert!(p.contains("1 steps run"), "{p}");
    // The copied file changes: the copy and the RUN after it run, and the
    // copy says why.
    let p = env.build(&ctx, &["-t", "fc:1", "--build-arg", "STABLE=s2"]);
    let l = miss_line(&p, "COPY --from=gen /stable /stable");
    assert!(l.contains("the files it reads from [gen "), "{p}");
    let fs = env.rootfs(&ctx, &["-t", "fc:1", "--build-arg", "STABLE=s2"], "out");
    assert_eq!(read(&fs.join("copied")), "s2\n");
    assert_eq!(read(&fs.join("mounted")), "s2\n");
    // What --no-cache builds is found by the next build.
    env.build(&ctx, &["--no-cache", "--build-arg", "STABLE=s3"]);
    let p = env.build(&ctx, &["--build-arg", "STABLE=s3"]);
    assert!(p.contains("0 steps run"), "{p}");
    env.assert_clean();
}

#[test]
fn progress_tty_draws_into_a_pipe() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    let o = env.kiln(&[
        "build",
        "--progress",
        "tty",
        "--network=none",
        "--pull=never",
        ctx.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("\u{1b}["), "ANSI codes: {err}");
    assert!(err.contains("RUN cat a.txt b.txt > /joined DONE"), "{err}");
    let o = env.kiln(&[
        "build",
        "--progress=tty",
        "--network=none",
        "--pull=missing",
        ctx.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("RUN cat a.txt b.txt > /joined CACHED"),
        "{}",
        text(&o.stderr)
    );
    // docker's bare `--pull` (before the context) means `always`: the
    // local-only base cannot be pulled, and the error says so.
    let o = env.kiln(&[
        "build",
        "--progress=plain",
        "--network=none",
        "--pull",
        ctx.to_str().expect("utf8"),
    ]);
    assert!(!o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("pulling base image `busybox:local`"),
        "{}",
        text(&o.stderr)
    );
    // A miss says why on the step's line.
    fs_err::write(ctx.join("src/b.txt"), "b2\n").expect("edit");
    let o = env.kiln(&[
        "build",
        "--progress=tty",
        "--network=none",
        ctx.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("COPY src/ ./ DONE"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        text(&o.stderr).contains("(file `src/b.txt` changed)"),
        "{}",
        text(&o.stderr)
    );
}

/// A tiny HTTP server on 127.0.0.1: `GET /NAME` serves `files[NAME]` with
/// an `ETag` of its content and answers `If-None-Match` with 304. Stops
/// when dropped.
struct HttpServer {
    base: String,
    files: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    fn start() -> HttpServer {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let files: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>> =
            std::sync::Arc::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, st) = (std::sync::Arc::clone(&files), std::sync::Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(mut s) = conn else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                let path = req
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_owned();
                let if_none = req
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("if-none-match:"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned());
                let body = f.lock().ok().and_then(|m| m.get(&path).cloned());
                let resp = match body {
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                    Some(body) => {
                        let etag = format!(
                            "\"{}-{}\"",
                            body.len(),
                            body.iter().map(|b| u64::from(*b)).sum::<u64>()
                        );
                        if if_none.as_deref() == Some(etag.as_str()) {
                            format!("HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .into_bytes()
                        } else {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&body);
                            r
                        }
                    }
                };
                let _ = s.write_all(&resp);
            }
        });
        HttpServer {
            base,
            files,
            stop,
            thread: Some(thread),
        }
    }

    fn put(&self, name: &str, body: &[u8]) {
        if let Ok(mut m) = self.files.lock() {
            m.insert(name.to_owned(), body.to_vec());
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(self.base.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha256_of(data: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().expect("tmp");
    fs_err::write(file.path(), data).expect("write");
    let o = Command::new("sha256sum")
        .arg(file.path())
        .output()
        .expect("sha256sum");
    text(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn add_url_keyed_by_content_and_checked_by_checksum() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let server = HttpServer::start();
    server.put("data.txt", b"data v1\n");
    server.put("pinned.txt", b"pinned\n");
    let ctx = env.context("addurl");
    // (Old enough for a build memo: see the server change below.)
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let base = format!("BASE={}", server.base);
    let sum = format!("SUM=sha256:{}", sha256_of(b"pinned\n"));
    let args = ["--build-arg", base.as_str(), "--build-arg", sum.as_str()];
    let fs = env.rootfs(&ctx, &args, "one");
    assert_eq!(read(&fs.join("both")), "data v1\npinned\n");
    let mode = fs_err::metadata(fs.join("fetched/data.txt")).expect("stat");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // Same content: cached.
    let p = env.build(&ctx, &args);
    let n = step_number(&p, "ADD $BASE/data.txt");
    assert!(
        step_lines(&p, &n).iter().any(|l| l.ends_with(" CACHED")),
        "{p}"
    );
    assert!(p.contains("0 steps run"), "{p}");
    // The server's file changed: the ADD and the RUN run again (a build
    // memo never answers for an unpinned URL).
    env.build(&ctx, &args);
    server.put("data.txt", b"data v2\n");
    let p = env.build(&ctx, &args);
    assert!(!p.contains("0 steps run"), "{p}");
    let fs = env.rootfs(&ctx, &args, "two");
    assert_eq!(read(&fs.join("both")), "data v2\npinned\n");
    // A pinned file is keyed by its checksum (a hit without fetching, as
    // BuildKit); fetched again, a wrong checksum fails naming both digests.
    server.put("pinned.txt", b"tampered\n");
    let p = env.build(&ctx, &args);
    assert!(p.contains("0 steps run"), "{p}");
    let mut no_cache = args.to_vec();
    no_cache.push("--no-cache");
    let o = env.build_raw(&ctx, &no_cache);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains(&sha256_of(b"tampered\n")), "{err}");
    assert!(err.contains("line 7"), "{err}");
    env.assert_clean();
}

#[test]
fn tmpfs_mount_and_docker_archive_output() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("tmpfs");
    let archive = env.path("img-docker.tar");
    let out = format!("type=docker,dest={}", archive.display());
    let fs = env.rootfs(
        &ctx,
        &["-t", "tmpfs:1", "-t", "other/name:2", "--output", &out],
        "out",
    );
    // Several -t: one image under each name.
    assert_eq!(env.config("tmpfs:1"), env.config("other/name:2"));
    assert_eq!(read(&fs.join("seen")), "in-tmpfs\n");
    assert_eq!(read(&fs.join("fstype")), "tmpfs\n");
    assert!(
        !fs.join("scratch/f").exists(),
        "tmpfs content is not in the layer"
    );
    assert!(read(&fs.join("after")).trim().is_empty() || read(&fs.join("after")) == "absent\n");
    // The docker-archive output has a manifest.json naming the tag.
    let o = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("manifest.json")
        .output()
        .expect("tar");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).expect("manifest.json");
    assert!(
        manifest[0]["RepoTags"].as_array().is_some_and(|t| t
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("tmpfs:1")))),
        "{manifest}"
    );
    env.assert_clean();
}

#[test]
fn add_extracts_local_archives_by_content() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("addtar");
    let src = env.path("tar-src");
    fs_err::create_dir_all(src.join("d")).expect("mkdir");
    fs_err::write(src.join("d/f.txt"), "in the archive\n").expect("write");
    // `xz.bin`: an xz tar under a name that says nothing.
    for (flag, name) in [
        ("-cf", "plain.tar"),
        ("-czf", "gz.tgz"),
        ("-cjf", "bz.tar.bz2"),
        ("-cJf", "xz.bin"),
    ] {
        let o = Command::new("tar")
            .arg(flag)
            .arg(ctx.join(name))
            .arg("-C")
            .arg(&src)
            .arg("d")
            .output()
            .expect("tar");
        assert!(o.status.success(), "tar {flag}: {}", text(&o.stderr));
    }
    let fs = env.rootfs(&ctx, &[], "out");
    for dir in ["plain", "gz", "bz", "xz"] {
        assert_eq!(
            read(&fs.join(dir).join("d/f.txt")),
            "in the archive\n",
            "{dir}"
        );
    }
    // COPY never extracts.
    assert!(fs.join("copied/gz.tgz").is_file());
    env.assert_clean();
}

/// The diffID of layer `index` of image `name` in `env`'s store.
fn layer_of(env: &Env, name: &str, index: usize) -> String {
    let store = kiln_cache::Store::open(env.store()).expect("open store");
    let img = store.resolve(name).expect("resolve");
    img.layers[index].diff_id.to_string()
}

/// `dirs` x `files` small files under `ctx/tree/d<i>/f<j>.txt`.
fn write_tree(ctx: &Path, dirs: usize, files: usize) {
    for d in 0..dirs {
        for f in 0..files {
            let p = ctx.join(format!("tree/d{d}/f{f}.txt"));
            fs_err::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs_err::write(&p, format!("{d}/{f}\n")).expect("write");
        }
    }
}

/// Edits a [`write_tree`] tree: one file edited (to `edited`), one made
/// mode 600, one added, one deleted.
fn edit_tree(ctx: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs_err::write(ctx.join("tree/d1/f1.txt"), "edited\n").expect("edit");
    fs_err::set_permissions(
        ctx.join("tree/d2/f2.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    fs_err::write(ctx.join("tree/d0/new.txt"), "new\n").expect("add");
    fs_err::remove_file(ctx.join("tree/d0/f4.txt")).expect("rm");
}

/// `kiln build` of `ctx` into `env`'s store with a fixed
/// `SOURCE_DATE_EPOCH` (so two stores give the same layers) and timing
/// marks, with `extra` arguments; a COPY's result is cloned for its next
/// run, never taken over (see [`clone_build`]).
fn epoch_build(env: &Env, ctx: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root")
        .arg(env.store())
        .args(["build", "--progress=plain", "--network=none"])
        .args(extra)
        .arg(ctx)
        .env_remove("KILN_ROOT")
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("KILN_TIMINGS", "1")
        // (Its users test the clones made for a COPY's next run.)
        .env("KILN_TAKE_BELOW", "0");
    c
}

/// [`epoch_build`], asserting success; the progress (stderr).
fn epoch_build_ok(env: &Env, ctx: &Path, extra: &[&str]) -> String {
    let o = epoch_build(env, ctx, extra).output().expect("build");
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stderr)
}

#[test]
fn incremental_copy_links_unchanged_files_and_equals_a_clean_build() {
    use std::os::unix::fs::MetadataExt as _;
    if !can_build() {
        return;
    }
    let a = Env::new();
    let ctx = a.path("ctx-incr");
    write_tree(&ctx, 3, 5);
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY tree/ /app/\nRUN cat /app/d1/f1.txt; true\n",
    )
    .expect("dockerfile");
    // Sources changed within a clock tick of a copy are never remembered.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let build = |env: &Env| epoch_build_ok(env, &ctx, &["-t", "incr"]);
    // Whether the COPY started from the clone the previous build made.
    let prepared = |progress: &str| {
        progress
            .lines()
            .any(|l| l.starts_with("[timing]") && l.ends_with("upper prepared by the last run"))
    };
    build(&a);
    let first_top = layer_of(&a, "incr", 1);
    edit_tree(&ctx);
    let second = build(&a);
    let copy = step_number(&second, "COPY tree/ /app/");
    assert!(
        step_lines(&second, &copy)
            .iter()
            .any(|l| l.contains("MISS")),
        "{second}"
    );
    assert!(second.contains("edited"), "the RUN saw the edit:\n{second}");
    let top = layer_of(&a, "incr", 1);
    assert_ne!(top, first_top);
    let hex = top.trim_start_matches("sha256:");
    let snap = a.store().join("snapshots").join(format!("v1-{hex}"));
    let first_snap = a
        .store()
        .join("snapshots")
        .join(format!("v1-{}", first_top.trim_start_matches("sha256:")));
    let meta = |p: &Path| fs_err::symlink_metadata(p).expect("stat");
    // Unchanged files are the previous build's inodes; changed ones are new.
    let same = meta(&snap.join("app/d0/f0.txt"));
    assert_eq!(same.ino(), meta(&first_snap.join("app/d0/f0.txt")).ino());
    for changed in ["app/d1/f1.txt", "app/d2/f2.txt"] {
        assert_ne!(
            meta(&snap.join(changed)).ino(),
            meta(&first_snap.join(changed)).ino(),
            "{changed}"
        );
    }
    assert!(
        !prepared(&second),
        "the first build had no memo to prepare for:\n{second}"
    );
    assert_eq!(meta(&snap.join("app/d2/f2.txt")).mode() & 0o777, 0o600);
    assert_eq!(read(&snap.join("app/d1/f1.txt")), "edited\n");
    assert!(!snap.join("app/d0/f4.txt").exists());
    // The previous snapshot is untouched.
    assert_eq!(read(&first_snap.join("app/d1/f1.txt")), "1/1\n");
    assert!(first_snap.join("app/d0/f4.txt").exists());
    // And the layer is exactly what a clean store builds.
    let b = Env::new();
    build(&b);
    assert_eq!(layer_of(&b, "incr", 1), top);
    // A third build hashes the files it links with the contents the second
    // one recorded (some of them carried over from the first): still the
    // clean store's layer.
    std::thread::sleep(std::time::Duration::from_millis(200));
    fs_err::write(
        ctx.join("tree/d2/f0.txt"),
        "edited again
",
    )
    .expect("edit");
    let third = build(&a);
    assert!(third.contains("MISS"), "{third}");
    assert!(
        prepared(&third),
        "the second build prepared the third's upper:\n{third}"
    );
    let c = Env::new();
    build(&c);
    assert_eq!(layer_of(&a, "incr", 1), layer_of(&c, "incr", 1));
    assert_ne!(layer_of(&a, "incr", 1), top);
    // From a prepared upper: a directory and a file gone, a directory
    // added, a file edited: still the clean store's layer.
    std::thread::sleep(std::time::Duration::from_millis(200));
    fs_err::remove_dir_all(ctx.join("tree/d1")).expect("rm dir");
    fs_err::remove_file(ctx.join("tree/d0/f0.txt")).expect("rm");
    fs_err::create_dir_all(ctx.join("tree/d3/deep")).expect("mkdir");
    fs_err::write(ctx.join("tree/d3/deep/x.txt"), "x\n").expect("write");
    fs_err::write(ctx.join("tree/d2/f1.txt"), "edited too\n").expect("edit");
    let fourth = build(&a);
    assert!(prepared(&fourth), "{fourth}");
    assert!(!fourth.contains("conflicts"), "{fourth}");
    let clean = |tag: &str| {
        let e = Env::new();
        build(&e);
        let l = layer_of(&e, "incr", 1);
        assert_eq!(layer_of(&a, "incr", 1), l, "{tag}");
    };
    clean("deletions and additions");
    let snap = a.store().join("snapshots").join(format!(
        "v1-{}",
        layer_of(&a, "incr", 1).trim_start_matches("sha256:")
    ));
    assert!(!snap.join("app/d1").exists() && !snap.join("app/d0/f0.txt").exists());
    assert_eq!(read(&snap.join("app/d3/deep/x.txt")), "x\n");
    // A file that became a directory, and a directory that became a file:
    // the clone is no start, the copy starts afresh, same layer.
    std::thread::sleep(std::time::Duration::from_millis(200));
    fs_err::remove_file(ctx.join("tree/d2/f3.txt")).expect("rm");
    fs_err::create_dir_all(ctx.join("tree/d2/f3.txt")).expect("mkdir");
    fs_err::write(ctx.join("tree/d2/f3.txt/inner"), "in\n").expect("write");
    fs_err::remove_dir_all(ctx.join("tree/d3/deep")).expect("rm");
    fs_err::write(ctx.join("tree/d3/deep"), "now a file\n").expect("write");
    let fifth = build(&a);
    assert!(prepared(&fifth), "{fifth}");
    assert!(
        fifth
            .lines()
            .any(|l| l.ends_with("the prepared upper conflicts")),
        "{fifth}"
    );
    clean("type changes");
    // `prune` drops the clones (they hold the snapshots' inodes).
    let o = a.kiln(&["prune", "--force"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!a.store().join("copy-memo/prepared").exists());
    a.assert_clean();
}

/// A COPY keeps its layer's tar (for a later take-over) only when the
/// layer is small, counting the files it links from a stage as well as
/// those it writes: a `COPY --from` of a stage's big file (linked, not
/// written) does not start a tar it would drop at the limit, after
/// compressing that much for nothing (s1's 50 MB: 20 ms).
#[test]
fn a_copy_keeps_its_tar_only_below_the_limit_linked_files_included() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-keep");
    fs_err::create_dir_all(&ctx).expect("ctx");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local AS a\n\
         RUN mkdir /out && head -c 300000 /dev/zero > /out/big && echo s > /out/small\n\
         FROM busybox:local\n\
         COPY --from=a /out/small /s\n\
         COPY --from=a /out /a\n",
    )
    .expect("dockerfile");
    // A first run keeps a tar below a quarter of the limit: 100,000 bytes.
    let o = epoch_build(&env, &ctx, &["-t", "keep"])
        .env("KILN_TAKE_BELOW", "400000")
        .output()
        .expect("build");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let progress = text(&o.stderr);
    let kept: Vec<&str> = progress
        .lines()
        .filter(|l| l.starts_with("[timing]") && l.ends_with("the layer's tar is kept"))
        .collect();
    assert_eq!(
        kept.len(),
        1,
        "only the small COPY keeps its tar:\n{progress}"
    );
    let store = kiln_cache::Store::open(env.store()).expect("open store");
    let small: kiln_cache::Digest = layer_of(&env, "keep", 1).parse().expect("digest");
    let big: kiln_cache::Digest = layer_of(&env, "keep", 2).parse().expect("digest");
    assert!(
        store.has_layer_tar(&small).expect("small"),
        "the small layer's tar is kept"
    );
    assert!(
        !store.has_layer_tar(&big).expect("big"),
        "the big layer's is not"
    );
    drop(store);
    env.assert_clean();
}

/// An edited COPY of a small tree takes its last result's snapshot over
/// (that layer kept its tar, packed): no clone is made, the layer is the
/// one a clean store builds, and the image the last build made still reads
/// back whole (its layer unpacked again from the packed blob when run).
#[test]
fn an_edited_small_copy_takes_its_last_snapshot_over() {
    if !can_build() {
        return;
    }
    let a = Env::new();
    let ctx = a.path("ctx-take");
    write_tree(&ctx, 3, 5);
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY tree/ /app/\nRUN cat /app/d1/f1.txt\n",
    )
    .expect("dockerfile");
    // Sources changed within a clock tick of a copy are never remembered.
    std::thread::sleep(std::time::Duration::from_millis(200));
    // (With a fixed SOURCE_DATE_EPOCH: two stores make the same layers.)
    let build = |env: &Env| {
        let o = epoch_build(env, &ctx, &["-t", "take"])
            .env_remove("KILN_TAKE_BELOW")
            .output()
            .expect("build");
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    let taken = |progress: &str| {
        progress
            .lines()
            .any(|l| l.starts_with("[timing]") && l.ends_with("upper taken from the last run"))
    };
    let snapshot = |env: &Env, layer: &str| {
        env.store()
            .join("snapshots")
            .join(format!("v1-{}", layer.trim_start_matches("sha256:")))
    };
    let clones = |env: &Env| {
        fs_err::read_dir(env.store().join("copy-memo/prepared")).map_or(0, Iterator::count)
    };
    // The first build has no memo; its small layer keeps its tar all the
    // same (a first run keeps one below a quarter of the limit).
    let cold = build(&a);
    assert!(!taken(&cold), "{cold}");
    let cold_top = layer_of(&a, "take", 1);
    {
        let store = kiln_cache::Store::open(a.store()).expect("open store");
        let d = cold_top.parse().expect("digest");
        assert!(
            store.has_layer_tar(&d).expect("layer tar"),
            "the cold build kept its small layer's tar"
        );
        // Packed, not as a plain tar blob.
        assert!(!store.has_blob(&d), "kept packed, not plain");
        let packed = store
            .packed_layer(&d)
            .expect("packed")
            .expect("packed blob");
        let packed_len = fs_err::metadata(store.blob_path(&packed))
            .expect("blob")
            .len();
        let tar_len = store.layer_size(&d).expect("size").expect("recorded size");
        assert!(
            packed_len * 4 < tar_len,
            "packed {packed_len} bytes against {tar_len} of tar"
        );
    }
    // So the second (the first rebuild) takes the first's snapshot over,
    // and keeps its own layer's tar in turn.
    fs_err::write(ctx.join("tree/d0/f0.txt"), "edited first\n").expect("edit");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = build(&a);
    assert!(taken(&first), "{first}");
    assert!(
        !snapshot(&a, &cold_top).exists(),
        "the cold snapshot became the first rebuild's"
    );
    let first_top = layer_of(&a, "take", 1);
    let digest: kiln_cache::Digest = first_top.parse().expect("digest");
    {
        let store = kiln_cache::Store::open(a.store()).expect("open store");
        assert!(
            store.has_layer_tar(&digest).expect("layer tar"),
            "the small layer kept its tar"
        );
    }
    assert_eq!(clones(&a), 0, "no clone is made for a small layer");
    let o = a.kiln(&["tag", "take", "take:first"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    edit_tree(&ctx);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let second = build(&a);
    assert!(taken(&second), "{second}");
    assert!(second.contains("edited"), "the RUN saw the edit:\n{second}");
    let top = layer_of(&a, "take", 1);
    assert_ne!(top, first_top);
    assert!(
        !snapshot(&a, &first_top).exists(),
        "the first snapshot became the second's"
    );
    assert_eq!(clones(&a), 0);
    let b = Env::new();
    build(&b);
    assert_eq!(layer_of(&b, "take", 1), top, "a clean store's layer");
    // The first image is whole: its layer reads back from the packed blob,
    // and running it unpacks the layer again.
    {
        let store = kiln_cache::Store::open(a.store()).expect("open store");
        store.verify_layer(&digest).expect("the first layer");
        assert!(store.fsck(true).expect("fsck").is_empty());
    }
    let o = a.kiln(&[
        "run",
        "--rm",
        "--network=none",
        "take:first",
        "cat",
        "/app/d1/f1.txt",
        "/app/d0/f4.txt",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "1/1\n0/4\n");
    assert!(snapshot(&a, &first_top).is_dir(), "unpacked again");
    // Again: the second result is taken over in turn.
    fs_err::write(ctx.join("tree/d2/f0.txt"), "edited again\n").expect("edit");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let third = build(&a);
    assert!(taken(&third), "{third}");
    assert!(!snapshot(&a, &top).exists());
    let c = Env::new();
    build(&c);
    assert_eq!(layer_of(&a, "take", 1), layer_of(&c, "take", 1));
    // A file that became a directory: the taken upper is no start (and is
    // gone with it), the copy starts afresh; still a clean store's layer,
    // and the store checks clean.
    fs_err::remove_file(ctx.join("tree/d2/f3.txt")).expect("rm");
    fs_err::create_dir_all(ctx.join("tree/d2/f3.txt")).expect("mkdir");
    fs_err::write(ctx.join("tree/d2/f3.txt/inner"), "in\n").expect("write");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fourth = build(&a);
    assert!(taken(&fourth), "{fourth}");
    assert!(
        fourth
            .lines()
            .any(|l| l.ends_with("the prepared upper conflicts")),
        "{fourth}"
    );
    let d = Env::new();
    build(&d);
    assert_eq!(layer_of(&a, "take", 1), layer_of(&d, "take", 1));
    let o = a.kiln(&["system", "check", "--verify"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    a.assert_clean();
}

/// Two builds of one COPY at once, when the last build left a clone for
/// the next: one of them takes it, the other copies as usual; both make
/// the layer a clean store makes, and the store checks clean.
#[test]
fn two_builds_at_once_share_one_prepared_clone_safely() {
    two_builds_at_once(false);
}

/// [`two_builds_at_once_share_one_prepared_clone_safely`] for a small
/// COPY, whose next run takes the last snapshot over: one build takes it,
/// the other (finding it gone) copies as usual.
#[test]
fn two_builds_at_once_take_one_snapshot_over_safely() {
    two_builds_at_once(true);
}

fn two_builds_at_once(take_over: bool) {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-race");
    write_tree(&ctx, 4, 40);
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY tree/ /app/\nRUN ls -R /app | wc -l\n",
    )
    .expect("dockerfile");
    let build = |env: &Env| {
        let mut c = epoch_build(env, &ctx, &[]);
        if take_over {
            c.env_remove("KILN_TAKE_BELOW");
        }
        c
    };
    let run = |env: &Env| {
        let o = build(env).output().expect("build");
        assert!(o.status.success(), "{}", text(&o.stderr));
        (text(&o.stderr), text(&o.stdout).trim().to_owned())
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    run(&env);
    fs_err::write(ctx.join("tree/d1/f1.txt"), "edited\n").expect("edit");
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The second run of the COPY leaves a clone for the third, or (small)
    // keeps a blob so that the third can take its snapshot over.
    run(&env);
    let clones = env
        .store()
        .join("copy-memo/prepared")
        .read_dir()
        .map_or(0, Iterator::count);
    assert_eq!(clones, usize::from(!take_over));
    fs_err::write(ctx.join("tree/d2/f2.txt"), "edited too\n").expect("edit");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let children: Vec<_> = (0..2)
        .map(|_| {
            build(&env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    // (The second may find a clone the first made meanwhile: at least one.)
    let mark = if take_over {
        "upper taken from the last run"
    } else {
        "upper prepared by the last run"
    };
    assert!(
        outs.iter().any(|o| text(&o.stderr).contains(mark)),
        "{}",
        text(&outs[0].stderr)
    );
    let ids: Vec<String> = outs
        .iter()
        .map(|o| text(&o.stdout).trim().to_owned())
        .collect();
    let clean = Env::new();
    let (_, clean_id) = run(&clean);
    assert_eq!(
        ids,
        vec![clean_id.clone(), clean_id],
        "the same image as a clean store's"
    );
    let o = env.kiln(&["system", "check", "--verify"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    env.assert_clean();
}

/// Every regular file under `root` (relative path, contents), sorted.
fn tree_files(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs_err::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                out.push((rel.to_string_lossy().into_owned(), read(&p)));
            }
        }
    }
    out.sort();
    out
}

/// A COPY whose only consumer is a RUN on top of it hands the RUN its
/// upper while its layer is hashed and committed on a thread of its own,
/// and clones that upper for its next run meanwhile (no
/// SOURCE_DATE_EPOCH: the early clone). The RUN sees the new files, each
/// build's COPY layer is exactly the context, every layer re-hashes to its
/// diffID, and a failing RUN on a layer being committed leaves nothing.
#[test]
fn a_copy_commits_beside_the_run_on_it_and_clones_its_upper_early() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-beside");
    write_tree(&ctx, 4, 30);
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY tree/ /app/\n\
         RUN cat /app/d1/f1.txt > /seen && find /app -type f | wc -l > /count\n",
    )
    .expect("dockerfile");
    let build = || clone_build(&env, &ctx, &["-t", "beside"]).0;
    let snapshot = |index: usize| {
        let layer = layer_of(&env, "beside", index);
        env.store()
            .join("snapshots")
            .join(format!("v1-{}", layer.trim_start_matches("sha256:")))
    };
    let mark = |progress: &str, what: &str| {
        progress
            .lines()
            .any(|l| l.starts_with("[timing]") && l.ends_with(what))
    };
    let check = |progress: &str, f1: &str, files: usize| {
        // The COPY layer is the context's tree, the RUN saw it.
        assert_eq!(
            tree_files(&snapshot(1).join("app")),
            tree_files(&ctx.join("tree")),
            "{progress}"
        );
        assert_eq!(read(&snapshot(2).join("seen")), f1, "{progress}");
        assert_eq!(
            read(&snapshot(2).join("count")).trim(),
            files.to_string(),
            "{progress}"
        );
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = build();
    assert!(mark(&first, "copy: layer committed beside"), "{first}");
    check(&first, "1/1\n", 120);
    // The second run has a memo: its upper is cloned for the third.
    fs_err::write(ctx.join("tree/d1/f1.txt"), "edited\n").expect("edit");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let second = build();
    assert!(mark(&second, "copy: layer committed beside"), "{second}");
    assert!(mark(&second, "copy: next run prepared"), "{second}");
    check(&second, "edited\n", 120);
    let clones: Vec<_> = fs_err::read_dir(env.store().join("copy-memo/prepared"))
        .expect("clones")
        .collect();
    assert_eq!(clones.len(), 1);
    // `system df` counts it; its files are all the snapshot's (nothing
    // only the clone holds).
    let df = text(&env.kiln(&["system", "df"]).stdout);
    let row = df
        .lines()
        .find(|l| l.starts_with("Copy clones"))
        .unwrap_or_else(|| panic!("{df}"));
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["Copy", "clones", "1", "0B"],
        "{df}"
    );
    // The third starts from that clone: an edit, a file gone, one added.
    fs_err::write(ctx.join("tree/d1/f1.txt"), "edited again\n").expect("edit");
    fs_err::remove_file(ctx.join("tree/d3/f7.txt")).expect("rm");
    fs_err::write(ctx.join("tree/d0/new.txt"), "new\n").expect("add");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let third = build();
    assert!(mark(&third, "upper prepared by the last run"), "{third}");
    check(&third, "edited again\n", 120);
    let o = env.kiln(&["system", "check", "--verify"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    env.assert_clean();
    // A RUN that fails on a layer still being committed.
    fs_err::write(ctx.join("tree/d2/f2.txt"), "edited\n").expect("edit");
    fs_err::write(
        ctx.join("Dockerfile.fail"),
        "FROM busybox:local\nCOPY tree/ /app/\nRUN ls /app/d2 && exit 3\n",
    )
    .expect("dockerfile");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(env.store())
        .args(["build", "--progress=plain", "--network=none", "-f"])
        .arg(ctx.join("Dockerfile.fail"))
        .arg(&ctx)
        .env_remove("KILN_ROOT")
        .output()
        .expect("build");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("exit code 3"), "{err}");
    assert!(
        err.contains("f2.txt"),
        "the RUN listed the copied files:\n{err}"
    );
    env.assert_clean();
    let o = env.kiln(&["system", "check", "--verify"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
}

/// A COPY whose layer the store already has (run again with `--no-cache`
/// and nothing changed, from the clone of its last result): its commit
/// drops the upper instead of moving it, so the clone made from that upper
/// for the next run is not kept (the removal may have taken files from
/// under it), and the next run copies afresh into the right layer.
#[test]
fn a_copy_whose_layer_exists_keeps_no_clone_of_the_dropped_upper() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-again");
    write_tree(&ctx, 3, 20);
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY tree/ /app/\nRUN cat /app/d1/f1.txt\n",
    )
    .expect("dockerfile");
    let edit = |content: &str| {
        fs_err::write(ctx.join("tree/d1/f1.txt"), content).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let build = |extra: &[&str]| {
        let mut args = vec!["-t", "again"];
        args.extend_from_slice(extra);
        clone_build(&env, &ctx, &args).0
    };
    let clones = || {
        fs_err::read_dir(env.store().join("copy-memo/prepared"))
            .map(Iterator::count)
            .unwrap_or(0)
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    build(&[]);
    edit("edited\n");
    build(&[]);
    let second = layer_of(&env, "again", 1);
    assert_eq!(clones(), 1, "the second run leaves a clone");
    // Nothing changed: the clone is the second run's layer exactly.
    let third = build(&["--no-cache"]);
    assert!(third.contains("upper prepared by the last run"), "{third}");
    assert_eq!(layer_of(&env, "again", 1), second, "{third}");
    assert_eq!(clones(), 0, "no clone of the dropped upper:\n{third}");
    // The next run copies afresh, and gives the context's tree.
    edit("edited again\n");
    let fourth = build(&[]);
    assert!(
        !fourth.contains("upper prepared by the last run"),
        "{fourth}"
    );
    let top = layer_of(&env, "again", 1);
    let snap = env
        .store()
        .join("snapshots")
        .join(format!("v1-{}", top.trim_start_matches("sha256:")));
    assert_eq!(tree_files(&snap.join("app")), tree_files(&ctx.join("tree")));
    let o = env.kiln(&["system", "check", "--verify"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    env.assert_clean();
}

/// A RUN whose only consumer is a RUN on top of it is committed beside
/// that RUN too (at most one pending layer in a chain: each RUN waits for
/// its parent's commit before its own); the last RUN, read by nothing, is
/// committed in place. Each RUN sees the one before.
#[test]
fn runs_commit_beside_the_runs_on_them() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-runs");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nRUN echo one > /one\nRUN cat /one > /two && echo two >> /two\n\
         RUN cat /two > /three && echo three >> /three\n",
    )
    .expect("dockerfile");
    let (progress, _, _) = timed_build(&env, &ctx, &["-t", "runs"]);
    let beside = progress
        .lines()
        .filter(|l| l.starts_with("[timing]") && l.ends_with("run: layer committed beside"))
        .count();
    assert_eq!(beside, 2, "{progress}");
    let o = env.kiln(&["run", "--rm", "--network=none", "runs", "cat", "/three"]);
    assert_eq!(text(&o.stdout), "one\ntwo\nthree\n", "{}", text(&o.stderr));
    let o = env.kiln(&["system", "check", "--verify"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    env.assert_clean();
    // A rebuild is all cached, from the records the commits left (not
    // the build memo, which an `--iidfile` turns off).
    let iid = env.path("runs.iid");
    let (again, id, memo) = timed_build(
        &env,
        &ctx,
        &["-t", "runs", "--iidfile", iid.to_str().expect("utf8")],
    );
    assert!(!memo);
    assert_eq!(read(&iid), id);
    assert!(again.contains("0 steps run"), "{again}");
}

/// A COPY whose one pattern matches two sources that write one path: a
/// prepared clone is no start (the later source's file would be kept over
/// the earlier one's copy), so the copy starts afresh and gives a clean
/// store's layer. (A COPY of two patterns gets no clone at all.)
#[test]
fn a_copy_of_several_sources_does_not_start_from_a_clone() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-two");
    for (d, body) in [("a", "from a\n"), ("b", "from b\n")] {
        fs_err::create_dir_all(ctx.join(d)).expect("mkdir");
        fs_err::write(ctx.join(d).join("same.txt"), body).expect("write");
        fs_err::write(ctx.join(d).join(format!("only-{d}.txt")), body).expect("write");
    }
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY [ab] /app/\nRUN cat /app/same.txt\n",
    )
    .expect("dockerfile");
    let build = |env: &Env| epoch_build_ok(env, &ctx, &["-t", "two"]);
    for i in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        fs_err::write(ctx.join("a/only-a.txt"), format!("edit {i}\n")).expect("edit");
        let p = build(&env);
        if i == 2 {
            assert!(p.contains("upper prepared by the last run"), "{p}");
            assert!(p.contains("the prepared upper conflicts"), "{p}");
        }
    }
    let clean = Env::new();
    build(&clean);
    assert_eq!(layer_of(&env, "two", 1), layer_of(&clean, "two", 1));
    let o = env.kiln(&[
        "run",
        "--rm",
        "--network=none",
        "two",
        "cat",
        "/app/same.txt",
    ]);
    assert_eq!(text(&o.stdout), "from b\n");
    // Two patterns: no clone is made for the next run.
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY a/ b/ /app/\nRUN cat /app/same.txt\n",
    )
    .expect("dockerfile");
    for i in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        fs_err::write(ctx.join("a/only-a.txt"), format!("again {i}\n")).expect("edit");
        let p = build(&env);
        assert!(!p.contains("upper prepared by the last run"), "{p}");
    }
    env.assert_clean();
}

#[test]
fn copy_from_a_stage_links_its_files_and_later_writes_copy_up() {
    use std::os::unix::fs::MetadataExt as _;
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-link");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local AS a\n\
         RUN mkdir -p /out/sub && echo one > /out/one && echo two > /out/sub/two \
             && chmod 640 /out/one && chown 7:8 /out/sub/two && ln /out/one /out/hard \
             && echo 'x:x:9:9::/:/bin/sh' >> /etc/passwd\n\
         FROM busybox:local\n\
         COPY --from=a /out /a\n\
         COPY --from=a --chmod=600 /out/sub/two /m/two\n\
         RUN echo changed >> /a/one\n\
         COPY --from=a /etc/passwd /p/passwd\n",
    )
    .expect("dockerfile");
    env.build(&ctx, &["-t", "linked"]);
    let store = kiln_cache::Store::open(env.store()).expect("open store");
    let img = store.resolve("linked").expect("resolve");
    let snap = |i: usize| {
        env.store().join("snapshots").join(format!(
            "v1-{}",
            img.layers[i]
                .diff_id
                .to_string()
                .trim_start_matches("sha256:")
        ))
    };
    let (copy, chmod, run, copied_up) = (snap(1), snap(2), snap(3), snap(4));
    let meta = |p: PathBuf| fs_err::symlink_metadata(p).expect("stat");
    // The stage's files are its snapshot's inodes, metadata kept.
    let two = meta(copy.join("a/sub/two"));
    assert!(two.nlink() >= 2, "linked from the stage: {}", two.nlink());
    assert_eq!((two.uid(), two.gid()), (7, 8));
    let one = meta(copy.join("a/one"));
    assert_eq!(one.mode() & 0o777, 0o640);
    // Hard links within the copy stay hard links of one inode.
    assert_eq!(one.ino(), meta(copy.join("a/hard")).ino());
    // --chmod changes metadata: a copy, not a link.
    let m = meta(chmod.join("m/two"));
    assert_eq!((m.nlink(), m.mode() & 0o777), (1, 0o600));
    assert_ne!(m.ino(), two.ino());
    // A later RUN that appends copies the file up: the linked inode (and so
    // the stage's snapshot) is unchanged.
    assert_eq!(read(&copy.join("a/one")), "one\n");
    assert_eq!(read(&run.join("a/one")), "one\nchanged\n");
    let fs = env.rootfs(&ctx, &["-t", "linked"], "out");
    assert_eq!(read(&fs.join("a/one")), "one\nchanged\n");
    assert_eq!(read(&fs.join("a/sub/two")), "two\n");
    assert_eq!(read(&fs.join("m/two")), "two\n");
    // A stage file its RUN copied up carries overlayfs' own xattrs: it is
    // copied, not linked, and none of them reaches the copy's layer (the
    // stage's fresh files above were seen without any and linked).
    let p = meta(copied_up.join("p/passwd"));
    assert_eq!(p.nlink(), 1, "copied, not linked");
    let private: Vec<_> = xattr::list(copied_up.join("p/passwd"))
        .expect("xattrs")
        .filter(|n| n.to_string_lossy().contains("overlay."))
        .collect();
    assert!(private.is_empty(), "{private:?}");
    assert!(read(&fs.join("p/passwd")).ends_with("x:x:9:9::/:/bin/sh\n"));
    env.assert_clean();
}

#[test]
fn a_relative_store_path_works() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.path("ctx-rel");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(ctx.join("a.txt"), "a\n").expect("write");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt\n",
    )
    .expect("dockerfile");
    // `--root store` from the temp dir: the overlays it mounts must still
    // find their layers.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(env.path(""))
        .args([
            "--root",
            "store",
            "build",
            "--progress=plain",
            "--network=none",
            "-t",
            "rel",
            "ctx-rel",
        ])
        .env_remove("KILN_ROOT")
        .output()
        .expect("build");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let fs = env.rootfs(&ctx, &["-t", "rel"], "out");
    assert_eq!(read(&fs.join("b.txt")), "a\n");
}

/// Whether a build's `KILN_TIMINGS` output shows the quick memo answered.
fn quick(err: &str) -> bool {
    err.lines()
        .any(|l| l.starts_with("[timing]") && l.ends_with(" quick memo hit"))
}

/// `kiln build` with `KILN_TIMINGS=1`: (progress, image id, whether the
/// build memo answered it).
fn timed_build(env: &Env, ctx: &Path, extra: &[&str]) -> (String, String, bool) {
    timed_build_with(env, ctx, extra, &[])
}

/// [`timed_build`] with a COPY's result never taken over by its next run:
/// a clone is made for that run instead (as for a big layer).
fn clone_build(env: &Env, ctx: &Path, extra: &[&str]) -> (String, String, bool) {
    timed_build_with(env, ctx, extra, &[("KILN_TAKE_BELOW", "0")])
}

/// [`timed_build`] with more environment variables.
fn timed_build_with(
    env: &Env,
    ctx: &Path,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> (String, String, bool) {
    let store = env.store();
    let mut args = vec!["--root", store.to_str().expect("utf8")];
    args.extend_from_slice(&["build", "--progress=plain", "--network=none"]);
    args.extend_from_slice(extra);
    args.push(ctx.to_str().expect("utf8"));
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .env_remove("KILN_ROOT")
        .env_remove("SOURCE_DATE_EPOCH")
        .env("KILN_TIMINGS", "1")
        .envs(vars.iter().copied())
        .output()
        .expect("run kiln");
    let err = text(&o.stderr);
    assert!(o.status.success(), "kiln build {extra:?}: {err}");
    let memo = err
        .lines()
        .any(|l| l.starts_with("[timing]") && l.ends_with(" memo hit"));
    (err, text(&o.stdout).trim().to_owned(), memo)
}

/// The build memo answers a rebuild whose inputs are all unchanged, with
/// the same output and image, and nothing else: a context file edited or
/// added, a build arg, the base image retagged, or the cache pruned each
/// send the build down its full path (which runs what changed).
#[test]
fn the_build_memo_answers_only_an_unchanged_rebuild() {
    if !can_build() {
        return;
    }
    let env = Env::new();
    let ctx = env.context("edit");
    let tag = ["-t", "memo:1"];
    // Context paths changed in the last two seconds make no memo.
    let settle = || std::thread::sleep(std::time::Duration::from_millis(2100));
    settle();
    let (first, id1, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo && !first.contains("0 steps run"), "{first}");
    // A fully cached rebuild leaves the memo; the next one is answered by it.
    let (second, id2, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo && second.contains("0 steps run"), "{second}");
    assert_eq!(id1, id2);
    // (Past the file-time granularity: the memo hit leaves a quick memo
    // only when the database's last commit is that old.)
    let past_a_tick = || std::thread::sleep(std::time::Duration::from_millis(30));
    past_a_tick();
    let (third, id3, memo) = timed_build(&env, &ctx, &tag);
    assert!(memo && !quick(&third), "{third}");
    assert_eq!(id3, id2);
    // The hit left a quick memo: the next build answers from it without
    // opening the database, with the same progress and image.
    assert_eq!(
        fs_err::read_dir(env.store().join("memo"))
            .expect("memo/")
            .count(),
        1
    );
    let (fourth, id4, memo) = timed_build(&env, &ctx, &tag);
    assert!(memo && quick(&fourth), "{fourth}");
    assert_eq!(id4, id2);
    let progress_of = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with('#') || l.starts_with("built "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(progress_of(&fourth), progress_of(&second));
    // A fully cached build with settled inputs leaves a memo; the next
    // build is answered by it.
    let memo_ready = || {
        settle();
        timed_build(&env, &ctx, &tag);
        let (out, id, memo) = timed_build(&env, &ctx, &tag);
        assert!(memo, "{out}");
        id
    };
    let progress = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with('#') || l.starts_with("built "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(progress(&third), progress(&second), "the same progress");
    // The tag is put back on the image when it moved (the quick memo does
    // not answer: the database changed since).
    let o = env.kiln(&["tag", "busybox:local", "memo:1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (out, id, memo) = timed_build(&env, &ctx, &tag);
    assert!(memo && !quick(&out), "{out}");
    assert_eq!(id, id2);
    let store = kiln_cache::Store::open(env.store()).expect("store");
    assert_eq!(store.image_id("memo:1").expect("tag").to_string(), id2);
    drop(store);

    // A quick memo again, then an edited file (same size): both memos miss,
    // and the build names the file.
    past_a_tick();
    timed_build(&env, &ctx, &tag);
    let (out, _, _) = timed_build(&env, &ctx, &tag);
    assert!(quick(&out), "{out}");
    fs_err::write(ctx.join("src/a.txt"), "A\n").expect("edit");
    let (out, id_edit, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo, "{out}");
    assert!(out.contains("file `src/a.txt` changed"), "{out}");
    assert_ne!(id_edit, id2);
    // A file added to a copied directory misses too.
    settle();
    let (_, _, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo, "the run after a build that ran steps has no memo");
    let (_, _, memo) = timed_build(&env, &ctx, &tag);
    assert!(memo);
    fs_err::write(ctx.join("src/new.txt"), "new\n").expect("add");
    let (out, _, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo, "{out}");
    assert!(out.contains("src/new.txt"), "{out}");
    // Another build arg value is another build.
    memo_ready();
    let (_, _, memo) = timed_build(&env, &ctx, &["-t", "memo:1", "--build-arg", "X=1"]);
    assert!(!memo);
    // The base image retagged: not answered (the full build starts from
    // the new base).
    let id_before = memo_ready();
    let o = env.kiln(&["tag", "memo:1", "busybox:local"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (out, id_new_base, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo, "{out}");
    assert_ne!(id_new_base, id_before);
    // The cache pruned: the steps run again.
    memo_ready();
    let o = env.kiln(&["prune", "--all", "--force"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !env.store().join("memo").exists(),
        "quick memos after a prune"
    );
    let (out, _, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo, "{out}");
    assert!(!out.contains("0 steps run"), "{out}");
    // A new ignore file (even one that ignores nothing copied).
    memo_ready();
    fs_err::write(ctx.join(".dockerignore"), "nothing-matches\n").expect("ignore file");
    let (out, _, memo) = timed_build(&env, &ctx, &tag);
    assert!(!memo, "{out}");
    env.assert_clean();
}
