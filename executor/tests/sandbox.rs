#![expect(
    clippy::print_stderr,
    reason = "tests print skip notices and payload output on failure"
)]
//! Real sandboxes: namespaces, overlayfs, cgroups, as root.
//!
//! Every test here needs root and namespaces. Without them it prints a skip message
//! and returns, except under `CI=true`, where it fails. The tests share global
//! state (the process's children, mount table, cgroups), so they take one lock.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_executor::{
    Error, ExitStatus, Limits, Mount, MountKind, Network, Output, ProcessSpec, RootfsSpec, Sandbox,
    SandboxSpec, Stdio, User, UserError,
};

static LOCK: Mutex<()> = Mutex::new(());

const HELPER: &str = env!("CARGO_BIN_EXE_kiln-sandbox-run");

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Returns false (after printing why) when the test cannot run here; panics in CI.
fn can_run() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    if !Path::new("/proc/self/ns/pid").exists() || !Path::new("/proc/self/ns/user").exists() {
        missing.push("namespaces");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("/bin/busybox (package busybox-static)");
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        !in_ci(),
        "this test needs {} and CI=true: it must not be skipped",
        missing.join(", ")
    );
    eprintln!("skipped: needs {}", missing.join(", "));
    false
}

struct Fixture {
    dir: tempfile::TempDir,
    lower: PathBuf,
}

impl Fixture {
    /// A busybox rootfs with every applet linked, and a small /etc.
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-exec-test.")
            .tempdir()
            .unwrap();
        let lower = dir.path().join("lower");
        make_busybox_root(&lower);
        Self { dir, lower }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh upper and work dir named after `tag`.
    fn overlay(&self, tag: &str) -> RootfsSpec {
        self.overlay_with(vec![self.lower.clone()], tag)
    }

    fn overlay_with(&self, lowers: Vec<PathBuf>, tag: &str) -> RootfsSpec {
        let (upper, work) = (
            self.path(&format!("{tag}.upper")),
            self.path(&format!("{tag}.work")),
        );
        fs_err::create_dir_all(&upper).unwrap();
        fs_err::create_dir_all(&work).unwrap();
        RootfsSpec::Overlay {
            lowers,
            upper,
            work,
        }
    }

    fn sh(&self, tag: &str, script: &str) -> SandboxSpec {
        SandboxSpec::new(
            self.overlay(tag),
            ProcessSpec::new(["/bin/sh", "-c", script]),
        )
    }
}

fn make_busybox_root(root: &Path) {
    for d in ["bin", "etc", "tmp", "root", "home/app", "mnt"] {
        fs_err::create_dir_all(root.join(d)).unwrap();
    }
    fs_err::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    fs_err::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs_err::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
    )
    .unwrap();
}

fn run(spec: &SandboxSpec) -> Output {
    let out = Sandbox::new()
        .with_helper(HELPER)
        .output(spec)
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    eprintln!(
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s = format!("{s}: {e}");
        cur = e.source();
    }
    s
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `key=value` lines of the payload's output.
fn field(out: &Output, key: &str) -> String {
    let prefix = format!("{key}=");
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        .unwrap_or_else(|| panic!("no `{key}=` line in:\n{}", text(&out.stdout)))
}

fn cap_line(out: &Output, name: &str) -> u64 {
    let v = field(out, name);
    u64::from_str_radix(v.trim(), 16).unwrap()
}

#[test]
fn isolation_pid_rootfs_mounts_caps_network() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let sentinel = fx.path("host-sentinel");
    fs_err::write(&sentinel, "host").unwrap();
    let script = format!(
        r#"
echo pid=$$
echo pid1=$(tr '\0' ' ' < /proc/1/cmdline | head -c 11)
echo procs=$(ls /proc | grep -c '^[0-9]')
echo root=$(ls / | tr '\n' ' ')
if [ -e {sentinel} ]; then echo sentinel=visible; else echo sentinel=absent; fi
echo hostmounts=$(grep -v ' / / ' /proc/self/mountinfo | grep -c -e /work -e kiln-exec-test)
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status | tr -d ' \t' | tr ':' '='
grep NoNewPrivs /proc/self/status | tr -d ' \t' | tr ':' '='
mount -t tmpfs none /mnt 2>/dev/null; echo mount_rc=$?
echo netdevs=$(ls /sys/class/net | tr '\n' ' ')
echo loflags=$(cat /sys/class/net/lo/flags)
echo hostname=$(hostname)
echo etc_hostname=$(cat /etc/hostname)
echo hosts_lo=$(grep -c localhost /etc/hosts)
echo devs=$(ls /dev | tr '\n' ' ')
echo null=$(echo x > /dev/null && echo ok)
echo sys_ro=$(touch /sys/x 2>/dev/null && echo writable || echo readonly)
"#,
        sentinel = sentinel.display()
    );
    let spec = fx.sh("iso", &script);
    assert!(!spec.init, "the payload is PID 1 by default");
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    // Without init (the default, as a Docker RUN step) the payload itself is PID 1.
    assert_eq!(field(&out, "pid"), "1");
    assert_eq!(field(&out, "pid1").trim_end(), "/bin/sh -c");
    // sh, the subshell of `$(...)` and its ls and grep: nothing from the host.
    let procs: u32 = field(&out, "procs").parse().unwrap();
    assert!(procs <= 4, "{procs} processes visible");
    assert_eq!(
        field(&out, "root").trim(),
        "bin dev etc home mnt proc root sys tmp"
    );
    assert_eq!(field(&out, "sentinel"), "absent");
    assert_eq!(field(&out, "hostmounts"), "0");
    let docker = kiln_executor::docker_default_mask();
    assert_eq!(cap_line(&out, "CapBnd"), docker);
    assert_eq!(cap_line(&out, "CapEff"), docker);
    assert_eq!(cap_line(&out, "CapPrm"), docker);
    assert_eq!(cap_line(&out, "CapInh"), 0);
    assert_eq!(cap_line(&out, "CapAmb"), 0);
    assert_eq!(field(&out, "NoNewPrivs"), "1");
    assert_ne!(field(&out, "mount_rc"), "0", "the payload could mount");
    assert_eq!(field(&out, "netdevs").trim(), "lo");
    assert_eq!(field(&out, "loflags"), "0x9", "lo must be up");
    assert_eq!(field(&out, "hostname"), "kiln");
    assert_eq!(field(&out, "etc_hostname"), "kiln");
    assert_eq!(field(&out, "hosts_lo"), "2");
    let devs = field(&out, "devs");
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd", "stdin",
        "stdout", "stderr",
    ] {
        assert!(
            devs.split(' ').any(|d| d == node),
            "/dev/{node} missing: {devs}"
        );
    }
    assert_eq!(field(&out, "null"), "ok");
    assert_eq!(field(&out, "sys_ro"), "readonly");
}

#[test]
fn host_network_sees_host_interfaces() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.sh("hostnet", "echo netdevs=$(ls /sys/class/net | wc -l)");
    spec.network = Network::Host;
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    let host = fs_err::read_dir("/sys/class/net").unwrap().count();
    assert_eq!(field(&out, "netdevs"), host.to_string());
}

#[test]
fn non_root_user_has_no_effective_caps_and_its_groups() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.sh(
        "user",
        "echo id=$(id -u):$(id -g):$(id -G | tr ' ' ,); echo home=$HOME; \
         grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status | tr -d ' \t' | tr ':' '='",
    );
    spec.process.user = User::Spec("app".to_owned());
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(field(&out, "id"), "1000:1000:1000,10");
    assert_eq!(field(&out, "home"), "/home/app");
    assert_eq!(cap_line(&out, "CapEff"), 0);
    assert_eq!(cap_line(&out, "CapPrm"), 0);
    assert_eq!(
        cap_line(&out, "CapBnd"),
        kiln_executor::docker_default_mask()
    );

    spec.process.user = User::Spec("4242:app".to_owned());
    spec.rootfs = fx.overlay("user2");
    let out = run(&spec);
    assert_eq!(field(&out, "id"), "4242:1000:1000");
}

#[test]
fn unknown_user_is_a_clear_error() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.sh("nouser", "true");
    spec.process.user = User::Spec("nobody-such".to_owned());
    let err = Sandbox::new()
        .with_helper(HELPER)
        .output(&spec)
        .unwrap_err();
    match &err {
        Error::User(UserError::UnknownUser { name }) => assert_eq!(name, "nobody-such"),
        other => panic!("wrong error: {}", chain(other)),
    }
    assert!(
        chain(&err).contains("unable to find user `nobody-such`"),
        "{}",
        chain(&err)
    );
}

#[test]
fn writes_land_in_upper_deletes_become_whiteouts_lower_untouched() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    fs_err::write(fx.lower.join("etc/doomed"), "old").unwrap();
    fs_err::write(fx.lower.join("etc/changed"), "old\n").unwrap();
    let before = tree(&fx.lower);
    let out = run(&fx.sh(
        "ov",
        "echo new > /etc/created; rm /etc/doomed; echo more >> /etc/changed; mkdir -p /var/x; cat /etc/changed",
    ));
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(text(&out.stdout), "old\nmore\n");
    let upper = fx.path("ov.upper");
    assert_eq!(
        fs_err::read_to_string(upper.join("etc/created")).unwrap(),
        "new\n"
    );
    assert_eq!(
        fs_err::read_to_string(upper.join("etc/changed")).unwrap(),
        "old\nmore\n"
    );
    assert!(upper.join("var/x").is_dir());
    let wh = fs_err::symlink_metadata(upper.join("etc/doomed")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "not a whiteout: {wh:?}"
    );
    assert_eq!(tree(&fx.lower), before, "the lower changed");
    // The sandbox's own mount points (/proc, /dev, /sys, /etc/hosts, ... absent from
    // this lower) are removed from the upper after the run: only the payload's
    // changes remain.
    let mut top: Vec<String> = fs_err::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["etc", "var"]);
    let mut etc: Vec<String> = fs_err::read_dir(upper.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    etc.sort();
    assert_eq!(etc, ["changed", "created", "doomed"]);
}

/// Every path under `root` with its size and content hash stand-in (mode, len, mtime).
fn tree(root: &Path) -> Vec<(PathBuf, u32, u64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs_err::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = fs_err::symlink_metadata(e.path()).unwrap();
            out.push((e.path(), m.mode(), m.len(), m.mtime()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn overlay_with_150_lowers() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    // Long lower paths: 150 of them are ~20 KB of options, far past one page.
    let store = fx.path("snapshots-with-a-long-directory-name-to-push-the-option-string");
    let mut lowers = Vec::new();
    for i in 0..150 {
        let l = store.join(format!("snapshot-{i:04}-of-the-store"));
        fs_err::create_dir_all(l.join("layers")).unwrap();
        fs_err::write(l.join("layers").join(format!("{i:04}")), format!("{i}\n")).unwrap();
        lowers.push(l);
    }
    lowers.push(fx.lower.clone());
    let spec = SandboxSpec::new(
        fx.overlay_with(lowers, "many"),
        ProcessSpec::new([
            "/bin/sh",
            "-c",
            "echo n=$(ls /layers | wc -l); cat /layers/0000 /layers/0149",
        ]),
    );
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(field(&out, "n"), "150");
    assert!(text(&out.stdout).ends_with("0\n149\n"));
}

#[test]
fn exit_codes_signals_and_errors_are_reported_without_init() {
    exit_codes_signals_and_errors_are_reported(false);
}

#[test]
fn exit_codes_signals_and_errors_are_reported_with_init() {
    exit_codes_signals_and_errors_are_reported(true);
}

fn exit_codes_signals_and_errors_are_reported(init: bool) {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let sh = |tag: &str, script: &str| {
        let mut spec = fx.sh(tag, script);
        spec.init = init;
        spec
    };
    assert_eq!(run(&sh("e1", "exit 3")).status, ExitStatus::Code(3));
    assert_eq!(run(&sh("e0", "true")).status, ExitStatus::Code(0));
    let out = run(&sh("e2", "kill -TERM $$; echo survived"));
    if init {
        assert_eq!(out.status, ExitStatus::Signal(15));
    } else {
        // PID 1 of a pid namespace gets no signal it has no handler for (the
        // kernel's rule, and Docker's `RUN kill $$` behaves alike).
        assert_eq!(out.status, ExitStatus::Code(0));
        assert_eq!(text(&out.stdout), "survived\n");
    }
    // The exit code of a payload that is PID 1 (or PID 2) exactly as it exited,
    // including codes a setup failure would use.
    assert_eq!(run(&sh("e5", "exit 1")).status, ExitStatus::Code(1));
    assert_eq!(run(&sh("e6", "exit 127")).status, ExitStatus::Code(127));

    let mut missing = SandboxSpec::new(fx.overlay("e3"), ProcessSpec::new(["no-such-program"]));
    missing.init = init;
    match Sandbox::new().with_helper(HELPER).output(&missing) {
        Err(Error::Exec { program, source }) => {
            assert_eq!(program, "no-such-program");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected an exec error, got {other:?}"),
    }

    let bad_lower = fx.path("does-not-exist");
    let mut spec = SandboxSpec::new(
        fx.overlay_with(vec![bad_lower.clone()], "e4"),
        ProcessSpec::new(["true"]),
    );
    spec.init = init;
    match Sandbox::new().with_helper(HELPER).output(&spec) {
        Err(err @ Error::Setup { .. }) => {
            let msg = chain(&err);
            assert!(msg.contains(&bad_lower.display().to_string()), "{msg}");
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
    let mut spec = sh("e7", "true");
    spec.process.user = User::Spec("nobody-here".to_owned());
    assert!(
        matches!(
            Sandbox::new().with_helper(HELPER).output(&spec),
            Err(Error::User(UserError::UnknownUser { .. }))
        ),
        "an unknown user must be an error, init={init}"
    );
}

/// Reusing a work directory after a volatile mount (a crash, or a killed caller
/// that did not clean up) is refused by the kernel with a bare EINVAL; the error
/// names the marker.
#[test]
fn a_stale_volatile_work_dir_is_a_clear_error() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let rootfs = fx.overlay("stale");
    let RootfsSpec::Overlay { work, .. } = &rootfs else {
        unreachable!()
    };
    fs_err::create_dir_all(work.join("work/incompat/volatile")).unwrap();
    let spec = SandboxSpec::new(rootfs.clone(), ProcessSpec::new(["true"]));
    match Sandbox::new().with_helper(HELPER).output(&spec) {
        Err(err @ Error::Setup { .. }) => {
            let msg = chain(&err);
            assert!(msg.contains("incompat/volatile` exists"), "{msg}");
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
}

/// The payload as PID 1 ignores signals it has no handler for, so cancelling must
/// (and does) use SIGKILL from outside the namespace. A SIGKILL from elsewhere is
/// the payload's own status, not a cancel.
/// A helper started before its spec (`Sandbox::prepare`, as the builder
/// starts one for the RUN after a COPY) runs the sandbox it is handed later
/// as a spawned one does. One never handed a spec is gone once dropped (no
/// process, no zombie); a spec with other streams than it was started with
/// is spawned anew, and the prepared helper goes.
#[test]
fn a_prepared_helper_runs_the_spec_it_is_handed_later() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let sandbox = Sandbox::new().with_helper(HELPER);
    let prepared = sandbox.prepare(Stdio::Piped).unwrap();
    let pid = prepared.helper_pid().unwrap();
    // It waits for the spec meanwhile.
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(pid), "the prepared helper did not wait for its spec");
    let spec = fx.sh(
        "prepared",
        "echo made here > /made; echo out; echo err >&2; exit 4",
    );
    let running = sandbox.spawn_prepared(prepared, &spec).unwrap();
    assert_eq!(running.helper_pid(), pid);
    let out = running.wait_with_output().unwrap();
    assert_eq!(out.status, ExitStatus::Code(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(
        fs_err::read_to_string(fx.path("prepared.upper/made")).unwrap(),
        "made here\n"
    );
    assert!(!alive(pid));

    let unused = sandbox.prepare(Stdio::Piped).unwrap();
    let pid = unused.helper_pid().unwrap();
    assert!(alive(pid));
    drop(unused);
    assert!(
        !alive(pid),
        "a prepared helper dropped unused is left behind"
    );

    let prepared = sandbox.prepare(Stdio::Piped).unwrap();
    let pid = prepared.helper_pid().unwrap();
    let mut spec = fx.sh("prepared2", "exit 3");
    spec.stdio = Stdio::Null;
    let mut running = sandbox.spawn_prepared(prepared, &spec).unwrap();
    assert_ne!(running.helper_pid(), pid);
    assert_eq!(running.wait().unwrap(), ExitStatus::Code(3));
    assert!(!alive(pid));
}

#[test]
fn kill_ends_a_pid_1_payload_without_signal_handlers() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let spec = SandboxSpec::new(fx.overlay("pid1kill"), ProcessSpec::new(["sleep", "31343"]));
    assert!(!spec.init);
    let mut running = Sandbox::new().with_helper(HELPER).spawn(&spec).unwrap();
    wait_until(|| processes_with_arg("31343") == 1, "the sleep to start");
    let started = Instant::now();
    running.kill();
    assert_eq!(running.wait().unwrap(), ExitStatus::Cancelled);
    assert_eq!(processes_with_arg("31343"), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "kill waited for the sleep"
    );

    let mut running = Sandbox::new()
        .with_helper(HELPER)
        .spawn(&SandboxSpec::new(
            fx.overlay("pid1kill2"),
            ProcessSpec::new(["sleep", "31344"]),
        ))
        .unwrap();
    wait_until(|| processes_with_arg("31344") == 1, "the sleep to start");
    let pids = pids_where(|argv| argv == [b"sleep".as_slice(), b"31344".as_slice()]);
    assert_eq!(pids.len(), 1);
    // From the host: SIGTERM is dropped (no handler), SIGKILL is forced.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pids[0]).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        alive(pids[0]),
        "PID 1 died of a signal it has no handler for"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(running.wait().unwrap(), ExitStatus::Signal(9));
}

/// Without init, the payload changes its uid (which clears the parent-death
/// signal) and execs itself: it must still die with a SIGKILLed helper.
#[test]
fn sigkill_of_the_helper_kills_a_pid_1_payload_running_as_non_root() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let temps = sandbox_temp_dir_names();
    let mut spec = SandboxSpec::new(fx.overlay("hkill"), ProcessSpec::new(["sleep", "31345"]));
    spec.process.user = User::Spec("app".to_owned());
    let mut running = Sandbox::new().with_helper(HELPER).spawn(&spec).unwrap();
    wait_until(|| processes_with_arg("31345") == 1, "the sleep to start");
    let helper = nix::unistd::Pid::from_raw(i32::try_from(running.helper_pid()).unwrap());
    nix::sys::signal::kill(helper, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(|| processes_with_arg("31345") == 0, "the payload to die");
    assert!(matches!(running.wait(), Err(Error::HelperDied { .. })));
    // A SIGKILLed helper cannot remove its temp directory: do it for the next tests.
    for name in sandbox_temp_dir_names() {
        if !temps.contains(&name) {
            fs_err::remove_dir_all(kiln_executor::state_root().join(name)).unwrap();
        }
    }
}

#[test]
fn stdout_streams_and_drop_cancels_everything() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let spec = fx.sh(
        "stream",
        "echo first; sleep 31337 & sleep 31337; echo never",
    );
    let mut running = Sandbox::new().with_helper(HELPER).spawn(&spec).unwrap();
    let mut lines = BufReader::new(running.take_stdout().unwrap()).lines();
    // The first line arrives while the payload is still running (it sleeps for hours).
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    wait_until(|| processes_with_arg("31337") == 2, "the sleeps to start");
    drop(running);
    assert_eq!(processes_with_arg("31337"), 0, "processes left after drop");
    // The pipe closes: every writer is gone.
    assert!(lines.next().is_none());
}

#[test]
fn kill_reports_cancelled() {
    for init in [false, true] {
        kill_reports_cancelled_in(init);
    }
}

fn kill_reports_cancelled_in(init: bool) {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.sh("kill", "sleep 31338; echo never");
    spec.init = init;
    let mut running = Sandbox::new().with_helper(HELPER).spawn(&spec).unwrap();
    wait_until(|| processes_with_arg("31338") == 1, "the sleep to start");
    running.kill();
    assert_eq!(running.wait().unwrap(), ExitStatus::Cancelled);
    assert_eq!(processes_with_arg("31338"), 0);
}

#[test]
fn init_reaps_orphaned_zombies() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    // The inner sh exits at once, orphaning its background sleep to PID 1; when the
    // sleep ends it must be reaped, not left as a zombie.
    let mut spec = fx.sh(
        "zombie",
        "echo pid=$$; echo init=$(cat /proc/1/comm); sh -c 'sleep 0.1 &'; sleep 0.6; echo zombies=$(cat /proc/[0-9]*/stat | awk '$3 == \"Z\"' | wc -l)",
    );
    spec.init = true;
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    // With init, kiln-init is PID 1 and the payload PID 2.
    assert_eq!(field(&out, "pid"), "2");
    assert_eq!(field(&out, "init"), "kiln-init");
    assert_eq!(field(&out, "zombies"), "0");
}

#[test]
fn hostile_rootfs_links_cannot_write_outside() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let host = fx.path("host");
    fs_err::create_dir_all(host.join("procdir")).unwrap();
    fs_err::create_dir_all(host.join("devdir")).unwrap();
    fs_err::create_dir_all(host.join("sysdir")).unwrap();
    fs_err::write(host.join("hosts"), "HOST HOSTS").unwrap();
    fs_err::write(host.join("resolv"), "HOST RESOLV").unwrap();
    let lower = fx.path("hostile");
    make_busybox_root(&lower);
    let link = |at: &str, to: String| std::os::unix::fs::symlink(to, lower.join(at)).unwrap();
    link("proc", host.join("procdir").display().to_string());
    link("dev", host.join("devdir").display().to_string());
    link(
        "sys",
        format!("../../../../../../..{}", host.join("sysdir").display()),
    );
    link(
        "etc/hosts",
        format!("/../../../..{}", host.join("hosts").display()),
    );
    link(
        "etc/resolv.conf",
        format!("../../../../../../../..{}", host.join("resolv").display()),
    );
    let before = tree(&host);
    let mounts_before = fs_err::read_to_string("/proc/self/mountinfo").unwrap();

    let spec = SandboxSpec::new(
        fx.overlay_with(vec![lower.clone()], "hostile"),
        ProcessSpec::new([
            "/bin/sh",
            "-c",
            "cat /etc/hosts; echo procs=$(ls /proc | grep -c '^[0-9]'); ls /dev/null",
        ]),
    );
    let out = run(&spec);
    // Whatever the links say, the mounts went inside the rootfs (the links were
    // followed inside it, creating their targets in the upper).
    assert_eq!(out.status, ExitStatus::Code(0));
    assert!(
        text(&out.stdout).contains("localhost"),
        "kiln's /etc/hosts is not visible"
    );
    assert_eq!(tree(&host), before, "a host file changed");
    assert_eq!(
        fs_err::read_to_string(host.join("hosts")).unwrap(),
        "HOST HOSTS"
    );
    assert_eq!(
        fs_err::read_to_string(host.join("resolv")).unwrap(),
        "HOST RESOLV"
    );
    assert_eq!(
        fs_err::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts_before
    );
    // The link targets were created inside the rootfs as mount-point stubs, and
    // removed from the upper again after the run.
    let upper = fx.path("hostile.upper");
    let inside = upper.join(host.strip_prefix("/").unwrap());
    assert!(!inside.join("hosts").exists(), "stub left in the upper");
    assert!(!inside.join("procdir").exists(), "stub left in the upper");
}

/// Mounts in this (the host's) mount namespace that a sandbox of this test
/// could leave: anything naming the test's fixture directory or a sandbox
/// state directory. (Counting every mount would count other programs'.)
fn our_mounts(fx: &Fixture) -> usize {
    let root = fx.dir.path().to_string_lossy().into_owned();
    fs_err::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root) || l.contains("kiln-sandbox."))
        .count()
}

fn own_children() -> usize {
    let me = std::process::id();
    fs_err::read_dir(format!("/proc/{me}/task"))
        .unwrap()
        .map(|t| {
            let t = t.unwrap().path();
            fs_err::read_to_string(t.join("children"))
                .map(|c| c.split_whitespace().count())
                .unwrap_or(0)
        })
        .sum()
}

fn sandbox_temp_dir_names() -> Vec<std::ffi::OsString> {
    fs_err::read_dir(kiln_executor::state_root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("kiln-sandbox."))
        .collect()
}

fn sandbox_temp_dirs() -> usize {
    fs_err::read_dir(kiln_executor::state_root())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("kiln-sandbox.")
        })
        .count()
}

/// Sandbox cgroups anywhere under the v1 controllers or the v2 tree.
fn sandbox_cgroups() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs_err::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) && !e.file_type().unwrap().is_symlink() {
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("sandbox-"))
                {
                    found.push(p.clone());
                }
                stack.push(p);
            }
        }
    }
    found
}

/// Processes running `sleep <arg>` (the payloads of these tests).
fn processes_with_arg(arg: &str) -> usize {
    processes_where(|argv| argv.len() == 2 && argv[0] == b"sleep" && argv[1] == arg.as_bytes())
}

fn children_of(pid: u32) -> Vec<u32> {
    fs_err::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .flat_map(|t| {
            fs_err::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Running or sleeping, not a zombie.
fn alive(pid: u32) -> bool {
    fs_err::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|c| c != 'Z' && c != 'X')
}

fn processes_where(pred: impl Fn(&[&[u8]]) -> bool) -> usize {
    pids_where(pred).len()
}

fn pids_where(pred: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
    fs_err::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            fs_err::read(e.path().join("cmdline"))
                .map(|c| {
                    let argv: Vec<&[u8]> = c.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
                    pred(&argv)
                })
                .unwrap_or(false)
        })
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn nothing_leaks_after_many_runs_and_failures() {
    nothing_leaks(false, 200, 30);
}

/// The same with init, shorter: the setup and teardown paths are shared, only the
/// last stage differs.
#[test]
fn nothing_leaks_after_many_runs_and_failures_with_init() {
    nothing_leaks(true, 50, 10);
}

fn nothing_leaks(init: bool, runs: usize, failures: usize) {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let sandbox = Sandbox::new().with_helper(HELPER);
    let (mounts, children, temps, cgroups) = (
        our_mounts(&fx),
        own_children(),
        sandbox_temp_dirs(),
        sandbox_cgroups(),
    );
    let lowers = vec![fx.lower.clone()];
    let mut spec = SandboxSpec::new(
        fx.overlay_with(lowers.clone(), "leak"),
        ProcessSpec::new(["true"]),
    );
    // A pids limit makes every run create and remove a cgroup too.
    spec.limits = Limits {
        pids: Some(1000),
        ..Limits::default()
    };
    spec.init = init;
    for i in 0..runs {
        // A fresh upper each time, as RUN steps have.
        spec.rootfs = fx.overlay_with(lowers.clone(), &format!("leak{i}"));
        if i % 2 == 0 {
            assert_eq!(sandbox.output(&spec).unwrap().status, ExitStatus::Code(0));
        } else {
            // Half of them as a build's RUN waits: the helper unmounts and
            // removes the cgroup after the status is in.
            let mut running = sandbox.spawn(&spec).unwrap();
            assert_eq!(running.wait_detached().unwrap(), ExitStatus::Code(0));
        }
    }
    kiln_executor::wait_detached();
    assert_eq!(kiln_executor::detached_count(), 0);
    spec.process.args = vec!["false".to_owned()];
    for i in 0..failures {
        spec.rootfs = fx.overlay_with(lowers.clone(), &format!("leakf{i}"));
        assert_eq!(sandbox.output(&spec).unwrap().status, ExitStatus::Code(1));
    }
    spec.process.args = vec!["/no/such/binary".to_owned()];
    for i in 0..failures {
        spec.rootfs = fx.overlay_with(lowers.clone(), &format!("leake{i}"));
        assert!(matches!(sandbox.output(&spec), Err(Error::Exec { .. })));
    }
    spec.rootfs = fx.overlay_with(vec![fx.path("missing-lower")], "leaks");
    for _ in 0..failures {
        assert!(matches!(sandbox.output(&spec), Err(Error::Setup { .. })));
    }
    assert_eq!(our_mounts(&fx), mounts, "mounts leaked");
    assert_eq!(own_children(), children, "processes leaked");
    assert_eq!(sandbox_temp_dirs(), temps, "temp dirs leaked");
    assert_eq!(sandbox_cgroups(), cgroups, "cgroups leaked");
}

/// A released helper (`release_detached`, for a process about to exit) is
/// recorded instead of waited for; a later mount of its upper (here in the
/// same process, as one in another process would) finds the record, waits
/// for the helper to finish unmounting, and removes the record.
#[test]
fn a_released_helper_is_waited_for_by_the_next_mount_of_its_upper() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let sandbox = Sandbox::new().with_helper(HELPER);
    // Many files make the overlay's unmount take a while (tens of ms).
    let spec = fx.sh(
        "rel",
        "mkdir /many && cd /many && i=0; while [ $i -lt 8000 ]; do : > f$i; i=$((i+1)); done",
    );
    let mut first = sandbox.spawn(&spec).unwrap();
    let helper = first.helper_pid();
    assert_eq!(first.wait_detached().unwrap(), ExitStatus::Code(0));
    kiln_executor::release_detached();
    assert_eq!(kiln_executor::detached_count(), 0, "released, not kept");
    let euid = nix::unistd::geteuid().as_raw();
    let record = kiln_executor::state_root()
        .join(format!("kiln-teardown-{euid}"))
        .join(helper.to_string());
    assert!(
        record.is_file(),
        "a helper still unmounting is recorded ({})",
        record.display()
    );
    let upper = fx.path("rel.upper");
    let mut spec2 = SandboxSpec::new(
        fx.overlay_with(vec![upper.clone(), fx.lower.clone()], "rel2"),
        ProcessSpec::new(["/bin/sh", "-c", "ls /many | wc -l"]),
    );
    spec2.stdio = kiln_executor::Stdio::Piped;
    let mut second = sandbox.spawn(&spec2).unwrap();
    assert!(
        !alive(helper),
        "the released helper still runs after the next spawn"
    );
    assert!(!record.exists(), "the record is removed once waited for");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut second.take_stdout().unwrap(), &mut out).unwrap();
    assert_eq!(out.trim(), "8000");
    assert_eq!(second.wait().unwrap(), ExitStatus::Code(0));
    // (Released, the helper is this process's zombie until reaped here; a
    // CLI exits and its heir reaps it.)
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(helper as i32), None);
}

/// `wait_detached` gives the status (and the output) while the helper still
/// has the sandbox's namespace to release; a sandbox whose lower is that upper
/// waits for the helper first, and nothing is left once all are waited for.
#[test]
fn wait_detached_reports_first_and_the_next_mount_of_its_upper_waits() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let sandbox = Sandbox::new().with_helper(HELPER);
    let (children, temps, cgroups) = (own_children(), sandbox_temp_dirs(), sandbox_cgroups());
    // Many files make the overlay's unmount take a while.
    let mut spec = fx.sh(
        "first",
        "mkdir /many && cd /many && i=0; while [ $i -lt 4000 ]; do : > f$i; i=$((i+1)); done; \
         echo made; exit 3",
    );
    spec.stdio = kiln_executor::Stdio::Piped;
    spec.limits = Limits {
        pids: Some(100),
        ..Limits::default()
    };
    let mut first = sandbox.spawn(&spec).unwrap();
    let helper = first.helper_pid();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut first.take_stdout().unwrap(), &mut out).unwrap();
    assert_eq!(out, "made\n");
    assert_eq!(first.wait_detached().unwrap(), ExitStatus::Code(3));
    // Waiting again gives the same status.
    assert_eq!(first.wait().unwrap(), ExitStatus::Code(3));
    assert_eq!(kiln_executor::detached_count(), 1);
    let upper = fx.path("first.upper");
    assert_eq!(fs_err::read_dir(upper.join("many")).unwrap().count(), 4000);

    // The next sandbox stacks the first one's upper over the base, as a RUN
    // after a RUN does: it waits for the first helper, which is then gone.
    let mut spec2 = SandboxSpec::new(
        fx.overlay_with(vec![upper.clone(), fx.lower.clone()], "second"),
        ProcessSpec::new(["/bin/sh", "-c", "ls /many | wc -l"]),
    );
    spec2.stdio = kiln_executor::Stdio::Piped;
    let mut second = sandbox.spawn(&spec2).unwrap();
    assert!(
        !alive(helper),
        "the first helper still runs after the next spawn"
    );
    assert_eq!(kiln_executor::detached_count(), 0);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut second.take_stdout().unwrap(), &mut out).unwrap();
    assert_eq!(out.trim(), "4000");
    assert_eq!(second.wait_detached().unwrap(), ExitStatus::Code(0));

    // Setup failures come back the same way.
    let mut spec3 = spec2.clone();
    spec3.rootfs = fx.overlay_with(vec![fx.path("no-such-lower")], "third");
    let mut third = sandbox.spawn(&spec3).unwrap();
    assert!(matches!(third.wait_detached(), Err(Error::Setup { .. })));

    kiln_executor::wait_detached();
    assert_eq!(kiln_executor::detached_count(), 0);
    assert_eq!(own_children(), children, "processes leaked");
    assert_eq!(sandbox_temp_dirs(), temps, "temp dirs leaked");
    assert_eq!(sandbox_cgroups(), cgroups, "cgroups leaked");
}

#[test]
fn sigkill_of_the_parent_leaves_nothing() {
    sigkill_of_the_parent_leaves_nothing_in(false);
}

#[test]
fn sigkill_of_the_parent_leaves_nothing_with_init() {
    sigkill_of_the_parent_leaves_nothing_in(true);
}

fn sigkill_of_the_parent_leaves_nothing_in(init: bool) {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let (mounts, temps, cgroups) = (our_mounts(&fx), sandbox_temp_dirs(), sandbox_cgroups());
    // The helper binary doubles as a "kiln" process that starts a sandbox and waits.
    let mut parent = std::process::Command::new(HELPER)
        .args(["--lower", &fx.lower.display().to_string(), "--pids", "100"])
        .args(init.then_some("--init"))
        .args(["--", "sleep", "31339"])
        .spawn()
        .unwrap();
    wait_until(|| processes_with_arg("31339") == 1, "the sandbox to start");
    assert_eq!(
        sandbox_cgroups().len(),
        cgroups.len() + 1,
        "the run has a cgroup"
    );
    let helpers = children_of(parent.id());
    assert_eq!(helpers.len(), 1, "one helper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _reaped = parent.wait();
    wait_until(|| processes_with_arg("31339") == 0, "the payload to die");
    wait_until(
        || helpers.iter().all(|&pid| !alive(pid)),
        "the helper to exit",
    );
    // The killed parent (kiln-sandbox-run, not the library) could not remove its
    // fresh upper and work directories.
    let scratch = std::env::temp_dir().join(format!("kiln-sandbox-run.{}", parent.id()));
    fs_err::remove_dir_all(scratch).unwrap();
    assert_eq!(our_mounts(&fx), mounts, "mounts leaked");
    let now = sandbox_cgroups();
    assert_eq!(now, cgroups, "cgroups leaked");
    assert_eq!(sandbox_temp_dirs(), temps, "temp dirs leaked");
}

#[test]
fn memory_limit_is_reported_as_oom_and_pids_limit_stops_forks() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let cgroups = sandbox_cgroups();
    for init in [false, true] {
        let mut spec = fx.sh(
            &format!("oom-{init}"),
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
        );
        spec.limits = Limits {
            memory: Some(32 << 20),
            ..Limits::default()
        };
        spec.init = init;
        let out = run(&spec);
        assert_eq!(out.status, ExitStatus::OomKilled, "init={init}");
    }

    let mut spec = fx.sh(
        "pids",
        "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo done",
    );
    spec.limits = Limits {
        pids: Some(10),
        ..Limits::default()
    };
    let out = run(&spec);
    assert!(
        text(&out.stderr).contains("can't fork"),
        "forks were not limited"
    );
    assert_eq!(sandbox_cgroups(), cgroups, "cgroups left behind");
}

#[test]
fn mounts_tmpfs_bind_ro_cache_secret() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let (ro, cache, secret) = (fx.path("ro"), fx.path("cache"), fx.path("secret"));
    fs_err::create_dir_all(&ro).unwrap();
    fs_err::write(ro.join("f"), "ro-file").unwrap();
    fs_err::create_dir_all(&cache).unwrap();
    fs_err::write(&secret, "s3cret").unwrap();
    let mut spec = fx.sh(
        "mounts",
        "echo ro=$(cat /ro/f); touch /ro/g 2>/dev/null && echo ro_write=yes || echo ro_write=no; \
         echo cached > /cache/c; echo secret=$(cat /run/secrets/s); \
         echo tmp=$(grep ' /scratch ' /proc/self/mounts | cut -d' ' -f3)",
    );
    spec.mounts = vec![
        Mount {
            target: "/ro".into(),
            kind: MountKind::Bind {
                source: ro.clone(),
                readonly: true,
            },
        },
        Mount {
            target: "/cache".into(),
            kind: MountKind::Cache {
                source: cache.clone(),
            },
        },
        Mount {
            target: "/run/secrets/s".into(),
            kind: MountKind::Secret { source: secret },
        },
        Mount {
            target: "/scratch".into(),
            kind: MountKind::Tmpfs {
                size: Some(1 << 20),
            },
        },
    ];
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(field(&out, "ro"), "ro-file");
    assert_eq!(field(&out, "ro_write"), "no");
    assert_eq!(field(&out, "secret"), "s3cret");
    assert_eq!(field(&out, "tmp"), "tmpfs");
    assert_eq!(fs_err::read_to_string(cache.join("c")).unwrap(), "cached\n");
    assert!(!ro.join("g").exists());
}

const ROOTLESS_USER: &str = "kiln-test-rootless";

/// Makes `dirs` reachable and owned by `uid:gid`, and a copy of the busybox lower
/// owned by them (a rootless store unpacks layers as the user).
fn rootless_fixture(uid: u32, gid: u32) -> (Fixture, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    fs_err::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let st = std::process::Command::new("chown")
        .args(["-R", "-h", &format!("{uid}:{gid}")])
        .arg(&fx.lower)
        .status()
        .unwrap();
    assert!(st.success());
    let (upper, work) = (fx.path("rl.upper"), fx.path("rl.work"));
    for d in [&upper, &work] {
        fs_err::create_dir_all(d).unwrap();
        nix::unistd::chown(
            d,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap();
    }
    (fx, upper, work)
}

/// Runs the helper binary as `uid:gid` (no supplementary groups) on the fixture.
fn run_as(
    uid: u32,
    gid: u32,
    fx: &Fixture,
    upper: &Path,
    work: &Path,
    extra: &[&str],
    script: &str,
) -> std::process::Output {
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "--"])
        .arg(HELPER)
        .args(["--lower", &fx.lower.display().to_string()])
        .args([
            "--upper",
            &upper.display().to_string(),
            "--work",
            &work.display().to_string(),
        ])
        .args(extra)
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .unwrap();
    eprintln!(
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

#[test]
fn rootless_as_an_unprivileged_user_with_a_single_id_map() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    // A bare uid with no passwd entry and no subordinate ids: the helper maps just
    // itself to 0 (no newuidmap involved).
    let (uid, gid) = (64124, 64124);
    let (fx, upper, work) = rootless_fixture(uid, gid);
    let out = run_as(
        uid,
        gid,
        &fx,
        &upper,
        &work,
        &[],
        "echo id=$(id -u):$(id -g); echo pid=$$; echo hi > /root/written; echo maps=$(wc -l < /proc/self/uid_map)",
    );
    assert!(
        out.status.success(),
        "rootless run failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("id=0:0"), "{stdout}");
    assert!(stdout.contains("pid=1\n"), "{stdout}");
    assert!(stdout.contains("maps=1"), "{stdout}");
    // The payload's root is the unprivileged user on the host.
    let written = fs_err::metadata(upper.join("root/written")).unwrap();
    assert_eq!(written.uid(), uid);

    // With init, rootless too.
    for d in [&upper, &work] {
        fs_err::remove_dir_all(d).unwrap();
        fs_err::create_dir_all(d).unwrap();
        nix::unistd::chown(
            d.as_path(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap();
    }
    let out = run_as(
        uid,
        gid,
        &fx,
        &upper,
        &work,
        &["--init"],
        "echo pid=$$; echo init=$(cat /proc/1/comm)",
    );
    assert!(
        out.status.success(),
        "rootless run with init failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("pid=2\n"), "{stdout}");
    assert!(stdout.contains("init=kiln-init\n"), "{stdout}");
}

#[test]
fn rootless_with_subordinate_ids_maps_a_range_and_runs_a_non_root_user() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    // newuidmap needs a named user with /etc/subuid and /etc/subgid entries;
    // useradd makes both on Debian.
    let missing_tool = !Path::new("/usr/bin/newuidmap").exists();
    let user = match nix::unistd::User::from_name(ROOTLESS_USER) {
        Ok(Some(user)) => Some(user),
        _ => {
            let made = std::process::Command::new("useradd")
                .args([
                    "--no-create-home",
                    "--no-user-group",
                    "--gid",
                    "65534",
                    ROOTLESS_USER,
                ])
                .output();
            if let Ok(out) = &made {
                eprintln!("useradd: {}", text(&out.stderr));
            }
            nix::unistd::User::from_name(ROOTLESS_USER).ok().flatten()
        }
    };
    let subuid = fs_err::read_to_string("/etc/subuid").unwrap_or_default();
    let has_range = subuid
        .lines()
        .any(|l| l.starts_with(&format!("{ROOTLESS_USER}:")));
    let (Some(user), false, true) = (user, missing_tool, has_range) else {
        let why = format!(
            "needs the user `{ROOTLESS_USER}` (useradd; a readable /etc/passwd), its /etc/subuid range \
             and newuidmap (package uidmap)"
        );
        assert!(!in_ci(), "{why}, with CI=true");
        eprintln!("skipped: {why}");
        return;
    };
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let (fx, upper, work) = rootless_fixture(uid, gid);
    let out = run_as(
        uid,
        gid,
        &fx,
        &upper,
        &work,
        &[],
        "echo id=$(id -u); cat /proc/self/uid_map",
    );
    assert!(
        out.status.success(),
        "rootless run failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("id=0"), "{stdout}");
    let maps = stdout
        .lines()
        .filter(|l| l.split_whitespace().count() == 3)
        .count();
    assert_eq!(maps, 2, "expected a full map: {stdout}");

    for d in [&upper, &work] {
        fs_err::remove_dir_all(d).unwrap();
        fs_err::create_dir_all(d).unwrap();
        nix::unistd::chown(d.as_path(), Some(user.uid), Some(user.gid)).unwrap();
    }
    let out = run_as(
        uid,
        gid,
        &fx,
        &upper,
        &work,
        &["--user", "app"],
        "echo id=$(id -u):$(id -g):$(id -G | tr ' ' ,)",
    );
    assert!(
        out.status.success(),
        "rootless non-root USER failed: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "id=1000:1000:1000,10");
}

#[test]
fn env_cwd_umask_rlimits_readonly_rootfs_and_dir_rootfs() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.sh(
        "proc",
        "echo cwd=$(pwd); echo foo=$FOO; echo home=$HOME; echo umask=$(umask); echo nofile=$(ulimit -n); \
         touch /rootfile 2>/dev/null && echo ro=no || echo ro=yes; echo tmp=$(touch /scratch/x && echo ok)",
    );
    spec.process.env.push("FOO=bar baz".to_owned());
    spec.process.cwd = "/work/dir".to_owned();
    spec.process.umask = 0o027;
    spec.process.rlimits = vec![kiln_executor::Rlimit {
        resource: kiln_executor::RlimitResource::Nofile,
        soft: 123,
        hard: 456,
    }];
    spec.readonly_rootfs = true;
    spec.mounts = vec![Mount {
        target: "/scratch".into(),
        kind: MountKind::Tmpfs { size: None },
    }];
    // A read-only rootfs cannot take new mount points: they must exist already.
    for d in ["work/dir", "scratch", "proc", "dev", "sys"] {
        fs_err::create_dir_all(fx.lower.join(d)).unwrap();
    }
    for f in ["etc/hosts", "etc/resolv.conf", "etc/hostname"] {
        fs_err::write(fx.lower.join(f), "").unwrap();
    }
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(field(&out, "cwd"), "/work/dir");
    assert_eq!(field(&out, "foo"), "bar baz");
    assert_eq!(field(&out, "home"), "/root");
    assert_eq!(field(&out, "umask"), "0027");
    assert_eq!(field(&out, "nofile"), "123");
    assert_eq!(field(&out, "ro"), "yes");
    assert_eq!(field(&out, "tmp"), "ok");

    // The same rootfs as a plain directory (bind-mounted, no overlay).
    let spec = SandboxSpec::new(
        RootfsSpec::Dir(fx.lower.clone()),
        ProcessSpec::new(["/bin/sh", "-c", "echo dir=$(ls /work)"]),
    );
    let out = run(&spec);
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(field(&out, "dir"), "dir");
}

fn ip_ok(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn joins_a_named_network_namespace() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let name = format!("kiln-test-{}", std::process::id());
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip").args(args).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "ip {args:?} failed (package iproute2)"
        );
    };
    ip(&["netns", "add", &name]);
    // A mark only this namespace has (no dummy/veth modules needed).
    let marked = ip_ok(&["-n", &name, "link", "set", "lo", "mtu", "1234"]);
    let fx = Fixture::new();
    let mut spec = fx.sh("netns", "echo mtu=$(cat /sys/class/net/lo/mtu)");
    spec.network = Network::Netns(PathBuf::from(format!("/run/netns/{name}")));
    let out = Sandbox::new().with_helper(HELPER).output(&spec);
    ip(&["netns", "del", &name]);
    assert!(marked, "ip link set lo mtu failed");
    let out = out.unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(field(&out, "mtu"), "1234");
}

#[test]
fn sigint_to_the_helper_cancels_like_ctrl_c() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut running = Sandbox::new()
        .with_helper(HELPER)
        .spawn(&fx.sh("sigint", "sleep 31340"))
        .unwrap();
    wait_until(|| processes_with_arg("31340") == 1, "the sleep to start");
    let helper = nix::unistd::Pid::from_raw(i32::try_from(running.helper_pid()).unwrap());
    nix::sys::signal::kill(helper, nix::sys::signal::Signal::SIGINT).unwrap();
    assert_eq!(running.wait().unwrap(), ExitStatus::Cancelled);
    assert_eq!(processes_with_arg("31340"), 0);
}

#[test]
fn many_threads_spawn_at_once() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let children = own_children();
    std::thread::scope(|s| {
        for t in 0..6 {
            let fx = &fx;
            s.spawn(move || {
                for i in 0..5 {
                    let spec = fx.sh(&format!("mt{t}-{i}"), &format!("echo thread={t}.{i}"));
                    let out = Sandbox::new().with_helper(HELPER).output(&spec).unwrap();
                    assert_eq!(out.status, ExitStatus::Code(0));
                    assert_eq!(text(&out.stdout), format!("thread={t}.{i}\n"));
                }
            });
        }
    });
    assert_eq!(own_children(), children, "processes leaked");
}

#[test]
fn classic_overlay_mount_with_many_long_lowers_uses_short_names() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let store = fx.path("snapshots-with-a-long-directory-name-to-push-the-option-string");
    let mut cmd = std::process::Command::new(HELPER);
    cmd.env("KILN_SANDBOX_CLASSIC_OVERLAY", "1");
    for i in 0..150 {
        // Digest-long names: too long even relative to the store, so the helper
        // falls back to index-named links.
        let l = store.join(format!("{i:064x}"));
        fs_err::create_dir_all(l.join("layers")).unwrap();
        fs_err::write(l.join("layers").join(format!("{i:04}")), format!("{i}\n")).unwrap();
        cmd.arg("--lower").arg(&l);
    }
    let base = store.join("base");
    make_busybox_root(&base);
    cmd.arg("--lower").arg(&base);
    let out = cmd
        .args([
            "--",
            "/bin/sh",
            "-c",
            "echo n=$(ls /layers | wc -l); grep -c lowerdir= /proc/self/mountinfo",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("n=150\n"), "{stdout}");
    assert!(stdout.ends_with("\n1\n"), "not the classic mount: {stdout}");
}

#[test]
fn hostile_links_through_proc_fd_cannot_reach_host_sources() {
    let _g = LOCK.lock();
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    // A host directory bind-mounted read-only: init holds a clone of it open while
    // it sets up mounts, so `/proc/self/fd/N` would name it if procfs were reachable.
    let rodir = fx.path("host-ro");
    fs_err::create_dir_all(&rodir).unwrap();
    fs_err::write(rodir.join("keep"), "host").unwrap();
    let lower = fx.path("hostile-proc");
    make_busybox_root(&lower);
    let mut mounts = vec![Mount {
        target: "/ro".into(),
        kind: MountKind::Bind {
            source: rodir.clone(),
            readonly: true,
        },
    }];
    for n in 3..40 {
        std::os::unix::fs::symlink(format!("/proc/self/fd/{n}"), lower.join(format!("m{n}")))
            .unwrap();
        mounts.push(Mount {
            target: format!("/m{n}/x"),
            kind: MountKind::Tmpfs { size: Some(4096) },
        });
    }
    fs_err::remove_dir_all(lower.join("etc")).unwrap();
    std::os::unix::fs::symlink("/proc/self/fd/7", lower.join("etc")).unwrap();
    let before = tree(&rodir);
    let mut spec = SandboxSpec::new(
        fx.overlay_with(vec![lower], "procfd"),
        ProcessSpec::new(["true"]),
    );
    spec.mounts = mounts;
    let result = Sandbox::new().with_helper(HELPER).output(&spec);
    eprintln!("result: {result:?}");
    assert_eq!(tree(&rodir), before, "a file appeared in a host directory");
    // Every stub went into the rootfs's own (not yet mounted-over) /proc directory.
    assert_eq!(result.unwrap().status, ExitStatus::Code(0));
}

#[test]
fn exec_joins_a_running_sandbox_and_stdin_is_passed_through() {
    if !can_run() {
        return;
    }
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fx = Fixture::new();
    let (stdin_r, stdin_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut spec = fx.sh(
        "exec",
        "echo inside > /tmp/marker; read line; echo got $line",
    );
    spec.hostname = "execbox".into();
    let io = kiln_executor::Io {
        stdin: Some(stdin_r),
        ..Default::default()
    };
    let sandbox = Sandbox::new().with_helper(HELPER);
    let mut running = sandbox.spawn_with_io(&spec, io).unwrap();
    let pid = running.wait_ready().unwrap();
    assert!(alive(pid), "wait_ready returns the live PID 1");
    // The marker is written by the payload after `ready`: wait for it via exec.
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let exec = kiln_executor::ExecSpec {
        pid,
        process: ProcessSpec::new([
            "/bin/sh",
            "-c",
            "while [ ! -e /tmp/marker ]; do sleep 0.05; done; echo $(hostname) $(cat /tmp/marker) $(cat /proc/1/cmdline | tr '\\0' ' ')",
        ]),
        tty: false,
    };
    let mut execd = sandbox
        .exec(
            &exec,
            kiln_executor::Io {
                stdout: Some(out_w),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(execd.wait().unwrap(), ExitStatus::Code(0));
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(out_r), &mut seen).unwrap();
    assert_eq!(
        seen,
        "execbox inside /bin/sh -c echo inside > /tmp/marker; read line; echo got $line\n"
    );
    // A missing program is an exec error, as for the sandbox's payload.
    let missing = kiln_executor::ExecSpec {
        pid,
        process: ProcessSpec::new(["no-such-program"]),
        tty: false,
    };
    let err = sandbox
        .exec(&missing, kiln_executor::Io::default())
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(matches!(err, Error::Exec { .. }), "{err}");
    // The payload reads what the caller writes to its stdin.
    nix::unistd::write(&stdin_w, b"hello\n").unwrap();
    drop(stdin_w);
    let out = running.wait_with_output().unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(text(&out.stdout), "got hello\n");
}

#[test]
fn a_gated_sandbox_waits_for_release_and_unreleased_it_never_runs() {
    if !can_run() {
        return;
    }
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fx = Fixture::new();
    let mut spec = fx.sh("gated", "grep peer /etc/hosts; touch /tmp/ran");
    spec.gated = true;
    let sandbox = Sandbox::new().with_helper(HELPER);
    let mut running = sandbox.spawn(&spec).unwrap();
    let pid = running.wait_ready().unwrap();
    // Before the release the payload has not run: the caller can edit the
    // sandbox (here its /etc/hosts) and its network namespace.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !fx.path("gated.upper/tmp/ran").exists(),
        "ran before release"
    );
    let hosts = format!("/proc/{pid}/root/etc/hosts");
    let mut text = fs_err::read_to_string(&hosts).unwrap();
    text.push_str("10.0.0.9\tpeer\n");
    fs_err::write(&hosts, text).unwrap();
    running.release();
    let out = running.wait_with_output().unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(text_of(&out.stdout), "10.0.0.9\tpeer\n");

    // Dropped unreleased: the payload never runs.
    let spec = {
        let mut s = fx.sh("unreleased", "touch /tmp/ran");
        s.gated = true;
        s
    };
    let mut running = sandbox.spawn(&spec).unwrap();
    running.wait_ready().unwrap();
    drop(running);
    assert!(!fx.path("unreleased.upper/tmp/ran").exists());
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
