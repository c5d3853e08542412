//! End-to-end tests of the runtime through the real `kiln` binary: `kiln run`
//! (foreground, `-d`, `-it`), `ps`, `logs`, `stop`, `kill`, `start`, `rm`,
//! `exec`, `inspect`, volumes and limits, on a `busybox:local` image made at test
//! time (`testdata/make-busybox.sh`), in a temp store.
//!
//! They need root (namespaces, overlayfs, cgroups) and busybox-static: without
//! them they print a skip message, except under `CI=true`, where they fail.
#![expect(clippy::print_stderr, reason = "tests report skips on stderr")]

mod common;

use common::{ci, have_tool, text};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether these tests can run here (root, busybox-static); panics in CI.
fn can_run() -> bool {
    common::root_and_busybox("the runtime tests")
}

/// A temp store with `busybox:local`. Dropping it force-removes every container
/// left (a failed test must not leave processes or mounts behind).
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

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root").arg(self.store()).env_remove("KILN_ROOT");
        c
    }

    fn kiln(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }

    /// Runs kiln, requires success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.kiln(args);
        assert!(
            o.status.success(),
            "kiln {args:?} failed: {}\nstdout: {}\nstderr: {}",
            o.status,
            text(&o.stdout),
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    fn inspect(&self, name: &str) -> serde_json::Value {
        let out = self.ok(&["inspect", name]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("inspect json");
        v[0].clone()
    }

    /// Waits (bounded) until `name` is no longer running.
    fn wait_exited(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.inspect(name)["State"]["Running"] == true {
            assert!(Instant::now() < deadline, "{name} still running after 30s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Nothing of this store is mounted, no container directory or process is
    /// left, and the cgroups given (a container's, seen while it ran) are gone.
    fn assert_nothing_left(&self, ids: &[&str], cgroups: &[PathBuf]) {
        let mounts = fs_err::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = self.tmp.path().to_string_lossy().into_owned();
        let ours: Vec<&str> = mounts.lines().filter(|l| l.contains(&root)).collect();
        assert!(ours.is_empty(), "left mounted:\n{}", ours.join("\n"));
        let containers = self.store().join("containers");
        if containers.exists() {
            let left: Vec<_> = fs_err::read_dir(&containers)
                .expect("containers")
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "container directories left: {left:?}");
        }
        for cg in cgroups {
            assert!(!cg.exists(), "cgroup left: {}", cg.display());
        }
        // A `--rm` container's writable layer lives on tmpfs.
        for id in ids {
            let scratch = Path::new("/dev/shm").join(format!("kiln-ctr-{id}"));
            assert!(!scratch.exists(), "left: {}", scratch.display());
        }
        // No process (supervisor, helper, payload) mentions the containers.
        for entry in fs_err::read_dir("/proc")
            .expect("/proc")
            .filter_map(Result::ok)
        {
            let Ok(cmdline) = fs_err::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = text(&cmdline);
            for id in ids {
                assert!(
                    !cmdline.contains(id),
                    "process {:?} of container {id} left: {cmdline:?}",
                    entry.file_name()
                );
            }
        }
        assert_eq!(self.ok(&["ps", "-aq"]).trim(), "", "containers left");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd().args(["ps", "-aq", "--no-trunc"]).output() {
            for id in text(&o.stdout).split_whitespace() {
                let _gone = self.cmd().args(["rm", "-f", id]).output();
            }
        }
        // The store's bridges (the default one included) and their rules.
        let _gone = kiln_runtime::network::teardown_store(&self.store());
    }
}

/// The cgroup directories of a running process (kiln's own ones only).
fn cgroups_of(pid: u64) -> Vec<PathBuf> {
    let text = fs_err::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            if !path.contains("/kiln/") {
                return None;
            }
            let rel = path.trim_start_matches('/');
            let base = Path::new("/sys/fs/cgroup");
            Some(if ctrls.is_empty() {
                if base.join("cgroup.controllers").exists() {
                    base.join(rel)
                } else {
                    base.join("unified").join(rel)
                }
            } else {
                base.join(ctrls).join(rel)
            })
        })
        .collect()
}

#[test]
fn image_config_and_flags_apply_as_in_docker() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let ctx = env.tmp.path().join("ctx");
    fs_err::create_dir_all(&ctx).expect("ctx");
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nENV GREETING=hello WHO=image\nWORKDIR /work\nUSER nobody\n\
         ENTRYPOINT [\"sh\", \"-c\", \"echo $GREETING $WHO $(pwd) $(id -u) \\\"$@\\\"\", \"ep\"]\n\
         CMD [\"default-cmd\"]\nSTOPSIGNAL SIGUSR1\n",
    )
    .expect("Dockerfile");
    let ctx_s = ctx.to_str().expect("utf8");
    env.ok(&[
        "build",
        "--progress=plain",
        "--network=none",
        "-t",
        "app",
        ctx_s,
    ]);

    assert_eq!(
        env.ok(&["run", "--rm", "app"]),
        "hello image /work 65534 default-cmd\n"
    );
    // A command replaces Cmd, not the entrypoint.
    assert_eq!(
        env.ok(&["run", "--rm", "app", "x", "y"]),
        "hello image /work 65534 x y\n"
    );
    // -e, -w, -u override Env, WorkingDir, User.
    assert_eq!(
        env.ok(&[
            "run", "--rm", "-e", "WHO=flag", "-w", "/tmp", "-u", "0", "app"
        ]),
        "hello flag /tmp 0 default-cmd\n"
    );
    // --entrypoint replaces the entrypoint and drops the image's Cmd.
    assert_eq!(
        env.ok(&["run", "--rm", "--entrypoint", "id", "app", "-u"]),
        "65534\n"
    );
    // --env-file, and -e K taking kiln's value.
    let envfile = env.tmp.path().join("env");
    fs_err::write(&envfile, "# comment\nFROMFILE=yes\n").expect("env file");
    let out = env
        .cmd()
        .args(["run", "--rm", "--env-file", envfile.to_str().expect("utf8")])
        .args([
            "-e",
            "PASSED",
            "--entrypoint",
            "sh",
            "app",
            "-c",
            "echo $FROMFILE $PASSED",
        ])
        .env("PASSED", "through")
        .output()
        .expect("kiln");
    assert_eq!(text(&out.stdout), "yes through\n", "{}", text(&out.stderr));
    // StopSignal and Cmd show in inspect.
    // An attached run prints the output and, kept, logs it too.
    assert_eq!(
        env.ok(&["run", "--name", "kept", "app"]),
        "hello image /work 65534 default-cmd\n"
    );
    assert_eq!(
        env.ok(&["logs", "kept"]),
        "hello image /work 65534 default-cmd\n"
    );
    let v = env.inspect("kept");
    assert_eq!(v["Config"]["StopSignal"], "SIGUSR1");
    assert_eq!(v["Config"]["Cmd"], serde_json::json!(["default-cmd"]));
    assert_eq!(v["State"]["Status"], "exited");
    assert_eq!(v["State"]["ExitCode"], 0);
    env.ok(&["rm", "kept"]);
    // As docker, inspect falls back to images.
    let img: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "app"])).expect("json");
    assert_eq!(img[0]["RepoTags"], serde_json::json!(["app:latest"]));
}

#[test]
fn exit_codes_are_the_containers_or_dockers() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let code = |args: &[&str]| env.kiln(args).status.code();
    assert_eq!(
        code(&["run", "--rm", "busybox:local", "sh", "-c", "exit 3"]),
        Some(3)
    );
    assert_eq!(
        code(&["run", "--rm", "busybox:local", "no-such-cmd"]),
        Some(127)
    );
    assert_eq!(
        code(&["run", "--rm", "busybox:local", "/etc/passwd"]),
        Some(126)
    );
    assert_eq!(code(&["run", "--rm", "no-such-image"]), Some(125));
    assert_eq!(
        code(&["run", "--rm", "--memory", "1k", "busybox:local", "true"]),
        Some(125)
    );
    let o = env.kiln(&[
        "run",
        "--rm",
        "--network",
        "no-such-net",
        "busybox:local",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("network `no-such-net`"),
        "{}",
        text(&o.stderr)
    );
    env.assert_nothing_left(&[], &[]);
}

#[test]
fn skopeo_docker_archive_image_runs() {
    if !can_run() {
        return;
    }
    if !have_tool("skopeo") {
        assert!(!ci(), "CI=true but this test needs skopeo");
        eprintln!("skipping: needs skopeo");
        return;
    }
    let env = Env::new();
    let oci = env.tmp.path().join("oci.tar");
    env.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        oci.to_str().expect("utf8"),
        "busybox:local",
    ]);
    let archive = env.tmp.path().join("docker.tar");
    let o = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci-archive:{}", oci.display()))
        .arg(format!(
            "docker-archive:{}:skopeo/busybox:1",
            archive.display()
        ))
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "skopeo: {}", text(&o.stderr));
    env.ok(&["load", "-i", archive.to_str().expect("utf8")]);
    assert_eq!(
        env.ok(&[
            "run",
            "--rm",
            "skopeo/busybox:1",
            "sh",
            "-c",
            "echo from-skopeo"
        ]),
        "from-skopeo\n"
    );
}

#[test]
fn detached_logs_stop_then_sigkill_and_rm_leave_nothing() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    // Handles TERM: `stop` ends it with the stop signal.
    let polite = env.ok(&[
        "run",
        "-d",
        "--name",
        "polite",
        "--memory",
        "64m",
        "busybox:local",
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo out; echo err >&2; while true; do sleep 0.1; done",
    ]);
    let polite = polite.trim().to_owned();
    assert_eq!(polite.len(), 64, "{polite}");
    let v = env.inspect("polite");
    assert_eq!(v["State"]["Running"], true);
    let pid = v["State"]["Pid"].as_u64().expect("pid");
    let cgroups = cgroups_of(pid);
    assert!(!cgroups.is_empty(), "a memory limit makes a cgroup");
    assert!(env.ok(&["ps"]).contains("polite"));
    // The output arrives in the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = env.kiln(&["logs", "polite"]);
        if text(&o.stdout) == "out\n" && text(&o.stderr) == "err\n" {
            break;
        }
        assert!(Instant::now() < deadline, "logs: {o:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ok(&["stop", "polite"]);
    let v = env.inspect("polite");
    assert_eq!(v["State"]["Status"], "exited");
    assert_eq!(v["State"]["ExitCode"], 7);
    assert_eq!(env.ok(&["logs", "polite"]), "out\ngot-term\n");
    assert!(!env.ok(&["ps"]).contains("polite"));
    assert!(env.ok(&["ps", "-a"]).contains("polite"));

    // Ignores TERM (PID 1 without a handler): SIGKILL after the timeout.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "stubborn",
        "busybox:local",
        "sleep",
        "1000",
    ]);
    env.ok(&["stop", "-t", "1", "stubborn"]);
    assert_eq!(env.inspect("stubborn")["State"]["ExitCode"], 137);

    // start brings it back; rm refuses a running container without -f.
    env.ok(&["start", "stubborn"]);
    assert_eq!(env.inspect("stubborn")["State"]["Running"], true);
    let o = env.kiln(&["rm", "stubborn"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("is running"),
        "{}",
        text(&o.stderr)
    );
    let stubborn = env.inspect("stubborn")["Id"]
        .as_str()
        .expect("id")
        .to_owned();
    env.ok(&["rm", "-f", "stubborn"]);
    env.ok(&["rm", "polite"]);
    env.assert_nothing_left(&[&polite, &stubborn], &cgroups);
}

#[test]
fn kill_sends_the_signal_and_restart_policy_restarts() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "k",
        "busybox:local",
        "sh",
        "-c",
        "trap 'exit 9' USR1; echo trapped; while true; do sleep 0.1; done",
    ]);
    // PID 1 ignores signals it has no handler for: wait until the trap is set.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.ok(&["logs", "k"]) != "trapped\n" {
        assert!(Instant::now() < deadline, "no trap");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ok(&["kill", "-s", "USR1", "k"]);
    env.wait_exited("k");
    assert_eq!(env.inspect("k")["State"]["ExitCode"], 9);
    let o = env.kiln(&["kill", "k"]);
    assert!(!o.status.success(), "kill of a stopped container fails");

    env.ok(&[
        "run",
        "-d",
        "--name",
        "r",
        "--restart",
        "on-failure:2",
        "busybox:local",
        "sh",
        "-c",
        "echo run; exit 1",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    // The first run and two restarts, then it stays exited.
    while env.ok(&["logs", "r"]) != "run\nrun\nrun\n" {
        assert!(Instant::now() < deadline, "{}", env.inspect("r"));
        std::thread::sleep(Duration::from_millis(50));
    }
    env.wait_exited("r");
    let v = env.inspect("r");
    assert_eq!(v["RestartCount"], 2);
    assert_eq!(v["State"]["ExitCode"], 1);

    // `always` restarts until `stop`, which ends it for good.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "a",
        "--restart",
        "always",
        "busybox:local",
        "sh",
        "-c",
        "echo x; sleep 0.2; exit 3",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.inspect("a")["RestartCount"].as_u64().unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "{}", env.inspect("a"));
        std::thread::sleep(Duration::from_millis(50));
    }
    env.ok(&["stop", "-t", "1", "a"]);
    let v = env.inspect("a");
    assert_eq!(v["State"]["Status"], "exited", "{v}");
    let runs = env.ok(&["logs", "a"]);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(env.ok(&["logs", "a"]), runs, "no restart after stop");
    assert!(!env.ok(&["ps"]).contains(" a\n"));
    env.ok(&["rm", "a"]);
    env.ok(&["rm", "k", "r"]);
}

#[test]
fn rm_flag_leaves_no_mount_process_cgroup_or_directory() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    // Foreground, with a cgroup, a tmpfs, a named and an anonymous volume.
    let out = env.ok(&[
        "run",
        "--rm",
        "--memory",
        "32m",
        "--pids-limit",
        "50",
        "--tmpfs",
        "/scratch",
        "-v",
        "keep:/keep",
        "-v",
        "/anon",
        "busybox:local",
        "sh",
        "-c",
        "cat /proc/self/cgroup | grep -c kiln/sandbox; touch /scratch/x /keep/x /anon/x",
    ]);
    assert_ne!(out.trim(), "0", "the payload runs in kiln's cgroup: {out}");
    // The anonymous volume went with the container; the named one stays.
    assert_eq!(env.ok(&["volume", "ls", "-q"]).trim(), "keep");
    // Detached with --rm: gone once it exits.
    let id = env.ok(&[
        "run",
        "-d",
        "--rm",
        "--memory",
        "32m",
        "busybox:local",
        "sleep",
        "1000",
    ]);
    let id = id.trim().to_owned();
    let pid = env.inspect(&id)["State"]["Pid"].as_u64().expect("pid");
    let cgroups = cgroups_of(pid);
    assert!(!cgroups.is_empty());
    env.ok(&["stop", "-t", "0", &id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.ok(&["ps", "-aq"]).trim().is_empty() {
        assert!(Instant::now() < deadline, "--rm container still listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.assert_nothing_left(&[&id], &cgroups);
    env.ok(&["volume", "rm", "keep"]);
}

#[test]
fn named_volume_keeps_data_and_is_filled_from_the_image() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    env.ok(&[
        "run",
        "--rm",
        "-v",
        "data:/data",
        "busybox:local",
        "sh",
        "-c",
        "echo kept > /data/f",
    ]);
    assert_eq!(
        env.ok(&[
            "run",
            "--rm",
            "-v",
            "data:/data:ro",
            "busybox:local",
            "cat",
            "/data/f"
        ]),
        "kept\n"
    );
    let o = env.kiln(&[
        "run",
        "--rm",
        "-v",
        "data:/data:ro",
        "busybox:local",
        "touch",
        "/data/g",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a read-only volume refuses writes"
    );
    // A new volume over an image directory starts with the image's content.
    assert_eq!(
        env.ok(&[
            "run",
            "--rm",
            "-v",
            "bin:/usr/sbin",
            "busybox:local",
            "sh",
            "-c",
            "test -e /usr/sbin/chroot && echo filled"
        ]),
        "filled\n"
    );
    // A bind mount, read-write, and --read-only for the rest.
    let host = env.tmp.path().join("host");
    fs_err::create_dir_all(&host).expect("host dir");
    let bind = format!("{}:/h", host.display());
    env.ok(&[
        "run",
        "--rm",
        "--read-only",
        "-v",
        &bind,
        "busybox:local",
        "sh",
        "-c",
        "echo b > /h/b",
    ]);
    assert_eq!(fs_err::read_to_string(host.join("b")).expect("b"), "b\n");
    let o = env.kiln(&["run", "--rm", "--read-only", "busybox:local", "touch", "/x"]);
    assert_eq!(o.status.code(), Some(1));
    // In use: not removable; unused: removable.
    env.ok(&[
        "run",
        "--name",
        "user",
        "-v",
        "data:/data",
        "busybox:local",
        "true",
    ]);
    assert!(!env.kiln(&["volume", "rm", "data"]).status.success());
    env.ok(&["rm", "user"]);
    env.ok(&["volume", "rm", "data", "bin"]);
    assert_eq!(env.ok(&["volume", "ls", "-q"]).trim(), "");
    // create / inspect / prune: prune takes unused anonymous volumes (named ones
    // with --all), never one a container uses.
    assert_eq!(env.ok(&["volume", "create", "made"]), "made\n");
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "inspect", "made"])).expect("json");
    let mountpoint = v[0]["Mountpoint"].as_str().expect("mountpoint").to_owned();
    assert!(Path::new(&mountpoint).is_dir(), "{mountpoint}");
    env.ok(&[
        "run",
        "--name",
        "anon",
        "-v",
        "/anon",
        "busybox:local",
        "true",
    ]);
    env.ok(&["volume", "prune", "-f"]);
    assert_eq!(
        env.ok(&["volume", "ls", "-q"]).lines().count(),
        2,
        "in use / named"
    );
    env.ok(&["rm", "anon"]);
    env.ok(&["volume", "prune", "-f"]);
    assert_eq!(env.ok(&["volume", "ls", "-q"]), "made\n");
    env.ok(&["volume", "prune", "--all", "-f"]);
    assert_eq!(env.ok(&["volume", "ls", "-q"]), "");
    assert!(!Path::new(&mountpoint).exists());
    assert!(!env.kiln(&["volume", "create", "bad/name"]).status.success());
}

#[test]
fn memory_limit_oom_kill_is_reported_and_pids_limit_stops_a_fork_loop() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let o = env.kiln(&[
        "run",
        "--name",
        "hungry",
        "--memory",
        "16m",
        "busybox:local",
        "sh",
        "-c",
        "x=aaaaaaaa; while true; do x=$x$x; done",
    ]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o.stderr));
    let v = env.inspect("hungry");
    assert_eq!(v["State"]["OOMKilled"], true);
    assert_eq!(v["State"]["ExitCode"], 137);
    assert_eq!(v["HostConfig"]["Memory"], 16 << 20);
    env.ok(&["rm", "hungry"]);

    let o = env.kiln(&[
        "run",
        "--rm",
        "--pids-limit",
        "8",
        "busybox:local",
        "sh",
        "-c",
        "i=0; while [ $i -lt 50 ]; do sleep 10 & i=$((i+1)); done; echo all-forked",
    ]);
    assert!(
        !text(&o.stdout).contains("all-forked"),
        "the fork loop was stopped"
    );
    assert!(
        text(&o.stderr).contains("can't fork"),
        "{}",
        text(&o.stderr)
    );
    let out = env.ok(&[
        "run",
        "--rm",
        "--cpus",
        "0.5",
        "busybox:local",
        "sh",
        "-c",
        "echo ok",
    ]);
    assert_eq!(out, "ok\n");
}

#[test]
fn exec_runs_in_the_running_container() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "box",
        "--hostname",
        "boxhost",
        "-e",
        "FROM_RUN=1",
        "busybox:local",
        "sleep",
        "1000",
    ]);
    let out = env.ok(&[
        "exec",
        "box",
        "sh",
        "-c",
        "echo $(hostname) $FROM_RUN $(cat /proc/1/cmdline | tr '\\0' ' ')",
    ]);
    assert_eq!(out, "boxhost 1 sleep 1000\n");
    // Same file system: a file written by exec is seen by the next exec.
    env.ok(&["exec", "-w", "/tmp", "box", "sh", "-c", "echo x > here"]);
    assert_eq!(env.ok(&["exec", "box", "cat", "/tmp/here"]), "x\n");
    assert_eq!(
        env.kiln(&["exec", "box", "sh", "-c", "exit 5"])
            .status
            .code(),
        Some(5)
    );
    assert_eq!(
        env.kiln(&["exec", "box", "no-such-cmd"]).status.code(),
        Some(127)
    );
    assert_eq!(
        env.ok(&["exec", "-u", "nobody", "box", "id", "-u"]),
        "65534\n"
    );
    let mut child = env
        .cmd()
        .args(["exec", "-i", "box", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec -i");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"piped in\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(text(&out.stdout), "piped in\n");
    env.ok(&["rm", "-f", "box"]);
    let o = env.kiln(&["exec", "box", "true"]);
    assert!(!o.status.success());
}

/// Reads from the pty master until `needle` shows up (or the deadline passes).
fn read_until(master: &mut std::fs::File, needle: &str, seen: &mut String) -> bool {
    read_until_for(master, needle, seen, Duration::from_secs(20))
}

fn read_until_for(
    master: &mut std::fs::File,
    needle: &str,
    seen: &mut String,
    wait: Duration,
) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if seen.contains(needle) {
            return true;
        }
        let mut fds = [nix::poll::PollFd::new(
            master.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    seen.contains(needle)
}

#[test]
fn interactive_tty_through_a_pty() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let size = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    // kiln in its own session with the pty as its controlling terminal (as in a
    // terminal emulator), so that resizing the pty sends it SIGWINCH.
    let mut child = Command::new("setsid")
        .args(["--ctty", "--wait", env!("CARGO_BIN_EXE_kiln"), "--root"])
        .arg(env.store())
        .args(["run", "--rm", "-it", "busybox:local", "sh"])
        .env_remove("KILN_ROOT")
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("kiln run -it");
    let mut master = std::fs::File::from(pty.master);
    let mut seen = String::new();
    assert!(
        read_until(&mut master, "# ", &mut seen),
        "no prompt: {seen:?}"
    );
    // The container's terminal has kiln's size; raw mode passes the keys through.
    master.write_all(b"stty size; echo $TERM\r").expect("write");
    assert!(read_until(&mut master, "30 100", &mut seen), "{seen:?}");
    assert!(read_until(&mut master, "xterm", &mut seen), "{seen:?}");
    // A window-size change reaches the container's terminal.
    let bigger = kiln_executor::WinSize {
        rows: 40,
        cols: 120,
    };
    kiln_executor::set_winsize(master.as_fd(), bigger).expect("resize");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        seen.clear();
        master.write_all(b"stty size\r").expect("write");
        if read_until_for(&mut master, "40 120", &mut seen, Duration::from_millis(300)) {
            break;
        }
        assert!(Instant::now() < deadline, "size not forwarded: {seen:?}");
    }
    // Ctrl-C interrupts the foreground job inside, not kiln.
    seen.clear();
    master
        .write_all(b"sleep 100; echo after-$((1+1))\r")
        .expect("write");
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"\x03").expect("ctrl-c");
    master.write_all(b"echo still-$((40+2))\r").expect("write");
    assert!(read_until(&mut master, "still-42", &mut seen), "{seen:?}");
    assert!(!seen.contains("after-2"), "{seen:?}");
    // The exit code comes through.
    master.write_all(b"exit 5\r").expect("write");
    let mut rest = String::new();
    let _drained = read_until(&mut master, "never", &mut rest);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(5), "{rest:?}");
    env.assert_nothing_left(&[], &[]);

    // Ctrl-D at the prompt ends the shell with 0.
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let mut child = env
        .cmd()
        .args(["run", "--rm", "-it", "busybox:local", "sh"])
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("kiln run -it");
    let mut master = std::fs::File::from(pty.master);
    let mut seen = String::new();
    assert!(
        read_until(&mut master, "# ", &mut seen),
        "no prompt: {seen:?}"
    );
    master.write_all(b"\x04").expect("ctrl-d");
    let _drained = read_until(&mut master, "never", &mut seen);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

#[test]
fn prune_and_rmi_keep_what_a_container_uses() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    env.ok(&[
        "run",
        "--name",
        "user",
        "busybox:local",
        "sh",
        "-c",
        "echo first",
    ]);
    env.ok(&["rmi", "busybox:local"]);
    env.ok(&["prune", "--all", "--force"]);
    let snapshots = fs_err::read_dir(env.store().join("snapshots"))
        .expect("snapshots")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(snapshots, 1, "the container's layer snapshot stays");
    // The stopped container still starts.
    env.ok(&["start", "user"]);
    env.wait_exited("user");
    assert_eq!(
        env.ok(&["logs", "user"]),
        "first\nfirst\n",
        "both runs logged"
    );
    assert_eq!(env.inspect("user")["State"]["ExitCode"], 0);
    // Once it is gone, prune collects the layer.
    env.ok(&["rm", "user"]);
    env.ok(&["prune", "--all", "--force"]);
    let snapshots = fs_err::read_dir(env.store().join("snapshots"))
        .expect("snapshots")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(snapshots, 0);
}

/// Removes a test network when the test ends, passing or not (its containers
/// first: a network in use cannot be removed).
struct NetGuard<'a> {
    env: &'a Env,
    net: String,
}

impl Drop for NetGuard<'_> {
    fn drop(&mut self) {
        if let Ok(o) = self.env.cmd().args(["ps", "-aq", "--no-trunc"]).output() {
            for id in text(&o.stdout).split_whitespace() {
                let _gone = self.env.cmd().args(["rm", "-f", id]).output();
            }
        }
        let _gone = self.env.cmd().args(["network", "rm", &self.net]).output();
    }
}

/// `GET /` on 127.0.0.1:`port` from the host, retried while the server starts.
fn http_get_local(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            if s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").is_ok() {
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && out.contains("200") {
                    return out;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port} did not answer in 20s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn network_default_is_the_bridge_as_in_docker() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let addr = |network: &str| {
        let o = env.kiln(&[
            "run",
            "--rm",
            "--network",
            network,
            "busybox:local",
            "ip",
            "-4",
            "-o",
            "addr",
        ]);
        assert!(o.status.success(), "{network}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    // The bridge gives the container an eth0 with an address of its subnet;
    // `none` gives only lo.
    let subnet = |out: &str| {
        out.lines()
            .find(|l| l.contains("eth0"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|a| a.rsplit_once('.'))
            .map(|(net, _)| net.to_owned())
    };
    let default = addr("default");
    assert!(subnet(&default).is_some(), "{default}");
    assert_eq!(subnet(&default), subnet(&addr("bridge")));
    assert_eq!(subnet(&addr("none")), None);
    // Nor can a network of that name be made.
    let o = env.kiln(&["network", "create", "default"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("default"), "{}", text(&o.stderr));
    env.assert_nothing_left(&[], &[]);
}

#[test]
fn containers_on_a_bridge_network_talk_by_name_and_a_published_port_answers() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let pid = std::process::id();
    let net = format!("kt{pid}");
    env.ok(&["network", "create", &net]);
    let guard = NetGuard {
        env: &env,
        net: net.clone(),
    };
    let www = env.tmp.path().join("www");
    fs_err::create_dir_all(&www).expect("www");
    fs_err::write(www.join("index.html"), "hello from web\n").expect("index");
    let port = u16::try_from(20_000 + pid % 20_000).expect("port");
    let web = format!("web{pid}");
    let publish = format!("127.0.0.1:{port}:8080");
    let bind = format!("{}:/www:ro", www.display());
    env.ok(&[
        "run",
        "-d",
        "--name",
        &web,
        "--network",
        &net,
        "--network-alias",
        "site",
        "-p",
        &publish,
        "-v",
        &bind,
        "busybox:local",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let web_id = env.inspect(&web)["Id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let info = kiln_runtime::network::inspect(&env.store(), &net).expect("network inspect");
    let bridge = info.bridge.clone().expect("a bridge network has a bridge");
    let veths: Vec<String> = info.containers.iter().map(|c| c.veth.clone()).collect();
    assert_eq!(veths.len(), 1, "{info:?}");
    let link_exists = |name: &str| {
        Command::new("ip")
            .args(["link", "show", name])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(link_exists(&veths[0]) && link_exists(&bridge));
    // From another container on the network, by name and by alias (busybox
    // wget; retried while httpd starts).
    for host in [web.as_str(), "site"] {
        let url = format!("http://{host}:8080/");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = env.kiln(&[
                "run",
                "--rm",
                "--network",
                &net,
                "busybox:local",
                "timeout",
                "5",
                "wget",
                "-q",
                "-O",
                "-",
                &url,
            ]);
            if o.status.success() {
                assert_eq!(text(&o.stdout), "hello from web\n", "{host}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{url} unreachable: {}",
                text(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // A container on another network (none) cannot resolve it.
    let o = env.kiln(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox:local",
        "timeout",
        "5",
        "wget",
        "-q",
        "-O",
        "-",
        "http://site:8080/",
    ]);
    assert!(!o.status.success(), "reached from the none network");
    // The published port, from the host.
    let page = http_get_local(port);
    assert!(page.contains("hello from web"), "{page}");
    // Removing the container and the network leaves no veth, bridge or rule.
    env.ok(&["rm", "-f", &web]);
    assert!(!link_exists(&veths[0]), "veth {} left after rm", veths[0]);
    let rules = Command::new("iptables-save")
        .output()
        .expect("iptables-save");
    assert!(
        !text(&rules.stdout).contains(&format!("--dport {port}")),
        "a rule for port {port} is left"
    );
    env.ok(&["network", "rm", &net]);
    drop(guard);
    assert!(
        !link_exists(&bridge),
        "bridge {bridge} left after network rm"
    );
    let ls = env.ok(&["network", "ls"]);
    assert!(!ls.contains(&net), "{ls}");
    env.assert_nothing_left(&[&web_id], &[]);
}

#[test]
fn a_new_volume_is_filled_from_every_layer_of_the_image() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let ctx = env.tmp.path().join("ctx");
    fs_err::create_dir_all(&ctx).expect("ctx");
    // /data spread over three layers, one file deleted by a later layer.
    fs_err::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\n\
         RUN mkdir -p /data/sub && echo lower > /data/a && echo gone > /data/b\n\
         RUN echo upper > /data/c && rm /data/b && echo deep > /data/sub/d\n\
         RUN echo top > /data/a\n",
    )
    .expect("Dockerfile");
    let ctx_s = ctx.to_str().expect("utf8");
    env.ok(&[
        "build",
        "--progress=plain",
        "--network=none",
        "-t",
        "layers",
        ctx_s,
    ]);
    let listing = env.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        "merged:/data",
        "layers",
        "sh",
        "-c",
        "cd /data && find . -type f | sort && cat a c sub/d",
    ]);
    assert_eq!(listing, "./a\n./c\n./sub/d\ntop\nupper\ndeep\n");
    // The copy is the volume's own: it outlives the container.
    let again = env.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        "merged:/v",
        "busybox:local",
        "cat",
        "/v/c",
    ]);
    assert_eq!(again, "upper\n");
    env.ok(&["volume", "rm", "merged"]);
    env.assert_nothing_left(&[], &[]);
}
