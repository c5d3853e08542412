//! End-to-end tests of `kiln pull/push/login/logout` and `build --pull/--push`
//! against a real registry (Debian's `docker-registry` on 127.0.0.1, a free
//! port, temp storage, killed on drop), with skopeo as the other client.
//!
//! They need root (to run containers), busybox-static, docker-registry,
//! skopeo, htpasswd and curl: without them they print a skip message,
//! except under `CI=true`, where they fail.
#![expect(clippy::print_stderr, reason = "tests report skips on stderr")]

#[path = "../../cache/tests/registry_support.rs"]
mod registry_support;

mod common;

use common::{ci, text};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use registry_support::Registry;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether these tests can run here; panics in CI when they cannot.
fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let missing: Vec<&str> = ["/bin/busybox", registry_support::REGISTRY_BIN]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .chain(
            ["skopeo", "htpasswd", "curl"]
                .into_iter()
                .filter(|t| !have(t)),
        )
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    assert!(
        !ci(),
        "CI=true but the registry tests need root ({root}) and {missing:?} (see .ci/setup)"
    );
    eprintln!("skipping: needs root and {missing:?}");
    false
}

/// A temp dir with a store (and a docker config dir) for kiln.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    /// An empty store.
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().expect("tmp"),
        }
    }

    /// A store with `busybox:local`.
    fn with_busybox() -> Env {
        let env = Env::new();
        common::make_busybox(&env.store());
        env
    }

    fn store(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root")
            .arg(self.store())
            .args(args)
            .env_remove("KILN_ROOT")
            .env("DOCKER_CONFIG", self.path("docker"))
            .stdin(Stdio::null());
        c
    }

    fn kiln(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run kiln")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.kiln(args);
        assert!(
            o.status.success(),
            "kiln {args:?} failed: {}\n{}{}",
            o.status,
            text(&o.stdout),
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    fn fails(&self, args: &[&str]) -> String {
        let o = self.kiln(args);
        assert!(
            !o.status.success(),
            "kiln {args:?} should fail\n{}",
            text(&o.stdout)
        );
        text(&o.stderr)
    }

    fn image_id(&self, name: &str) -> String {
        let out = self.ok(&["image", "inspect", name]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("inspect json");
        v[0]["Id"].as_str().expect("Id").to_owned()
    }

    fn images(&self) -> String {
        self.ok(&["images", "--no-trunc"])
    }

    fn assert_consistent(&self) {
        let o = self.kiln(&["system", "check", "--verify"]);
        assert!(
            o.status.success(),
            "store inconsistent:\n{}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}

fn skopeo(args: &[&str]) -> String {
    let o = Command::new("skopeo").args(args).output().expect("skopeo");
    assert!(o.status.success(), "skopeo {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[test]
fn push_then_pull_round_trips_with_skopeo_both_ways() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(None);
    let env = Env::with_busybox();
    let name = format!("{}/kiln/{}:v1", reg.host(), unique("roundtrip"));
    env.ok(&["tag", "busybox:local", &name]);
    let out = env.ok(&["push", &name]);
    assert!(out.contains("The push refers to repository"), "{out}");
    assert!(out.contains(": Pushed"), "{out}");
    let digest = out
        .lines()
        .find_map(|l| l.split("digest: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .expect("digest line")
        .to_owned();
    // A second push finds every blob there.
    let again = env.ok(&["push", &name]);
    assert!(again.contains("Layer already exists"), "{again}");
    assert!(!again.contains(": Pushed"), "{again}");
    assert!(again.contains(&digest), "same manifest: {again}");
    // Another repository of the same registry: the layer is mounted, not uploaded.
    let sibling = format!("{}/kiln/{}:v1", reg.host(), unique("sibling"));
    env.ok(&["tag", "busybox:local", &sibling]);
    let out = env.ok(&["push", &sibling]);
    assert!(
        out.contains(&format!("Mounted from kiln/{}", unique("roundtrip"))),
        "{out}"
    );
    assert!(!out.contains(": Pushed"), "{out}");

    // skopeo reads what kiln pushed.
    let inspect = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{name}")]);
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    assert_eq!(v["Digest"].as_str(), Some(digest.as_str()));
    let layout = env.path("oci");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:v1", layout.display()),
    ]);
    let config = skopeo(&[
        "inspect",
        "--config",
        &format!("oci:{}:v1", layout.display()),
    ]);
    let cfg: serde_json::Value = serde_json::from_str(&config).expect("json");
    assert_eq!(cfg["config"]["Cmd"][0].as_str(), Some("sh"));

    // kiln pulls it into another store: same image id and config.
    let other = Env::new();
    let pulled = other.ok(&["pull", &name]);
    assert!(pulled.contains("Pull complete"), "{pulled}");
    assert!(pulled.contains(&format!("Digest: {digest}")), "{pulled}");
    assert_eq!(other.image_id(&name), env.image_id("busybox:local"));
    let a: serde_json::Value =
        serde_json::from_str(&env.ok(&["image", "inspect", "busybox:local"])).expect("json");
    let b: serde_json::Value =
        serde_json::from_str(&other.ok(&["image", "inspect", &name])).expect("json");
    assert_eq!(a[0]["Config"], b[0]["Config"]);
    assert_eq!(a[0]["RootFS"], b[0]["RootFS"]);
    let run = other.ok(&["run", "--rm", "--network=none", &name, "echo", "pulled-ok"]);
    assert_eq!(run.trim(), "pulled-ok");
    // Pulling again is a no-op that says so.
    let again = other.ok(&["pull", &name]);
    assert!(again.contains("Image is up to date"), "{again}");
    other.assert_consistent();

    // skopeo pushes (from the OCI layout) into the registry; kiln pulls and runs it.
    let name2 = format!("{}/kiln/{}:from-skopeo", reg.host(), unique("skopeo"));
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format=zstd",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{name2}"),
    ]);
    let third = Env::new();
    third.ok(&["pull", &name2]);
    assert_eq!(third.image_id(&name2), env.image_id("busybox:local"));
    let run = third.ok(&[
        "run",
        "--rm",
        "--network=none",
        &name2,
        "cat",
        "/etc/passwd",
    ]);
    assert!(run.starts_with("root:x:0:0"), "{run}");
    // kiln remembers the registry's (zstd) layer: pushing the pulled image to
    // another repository mounts that blob instead of compressing and uploading.
    let name3 = format!("{}/kiln/{}:again", reg.host(), unique("again"));
    third.ok(&["tag", &name2, &name3]);
    let out = third.ok(&["push", &name3]);
    assert!(out.contains("Mounted from"), "{out}");
    let layers = |n: &str| {
        let raw = skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{n}"),
        ]);
        serde_json::from_str::<serde_json::Value>(&raw).expect("json")["layers"].clone()
    };
    assert_eq!(layers(&name3), layers(&name2), "the same layer blobs");
    // And by digest: no name is recorded, the image is there.
    let by_digest = format!(
        "{}@{}",
        name2.rsplit_once(':').expect("tag").0,
        skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
            &format!("docker://{name2}")
        ])
        .trim()
    );
    let fourth = Env::new();
    fourth.ok(&["pull", &by_digest]);
    assert!(fourth.images().contains(&env.image_id("busybox:local")));
    third.assert_consistent();

    // A Docker v2 schema 2 manifest (docker's own format) pulls too.
    let name4 = format!("{}/kiln/{}:v2s2", reg.host(), unique("v2s2"));
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{name4}"),
    ]);
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name4}"),
    ]);
    assert!(
        raw.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{raw}"
    );
    let fifth = Env::new();
    fifth.ok(&["pull", &name4]);
    assert_eq!(fifth.image_id(&name4), env.image_id("busybox:local"));
}

#[test]
fn login_logout_and_auth_errors() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(Some(("kiln", "s3cret")));
    let env = Env::with_busybox();
    let host = reg.host();
    let name = format!("{host}/kiln/{}:1", unique("auth"));
    env.ok(&["tag", "busybox:local", &name]);
    // No credentials: push is refused with a clear message.
    let err = env.fails(&["push", &name]);
    assert!(err.contains("unauthorized"), "{err}");
    assert!(err.contains(&host), "{err}");
    // A wrong password is refused and not saved.
    let err = env.fails(&["login", "-u", "kiln", "-p", "wrong", &host]);
    assert!(err.contains("unauthorized"), "{err}");
    assert!(err.contains(&format!("login to `{host}` failed")), "{err}");
    assert!(!env.path("docker/config.json").exists());
    // The right one (on stdin) is checked and saved as docker does.
    let mut child = env
        .cmd(&["login", "-u", "kiln", "--password-stdin", &host])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"s3cret\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Login Succeeded"));
    let config: serde_json::Value = serde_json::from_str(
        &fs_err::read_to_string(env.path("docker/config.json")).expect("read"),
    )
    .expect("json");
    // base64("kiln:s3cret")
    assert_eq!(
        config["auths"][&host]["auth"].as_str(),
        Some("a2lsbjpzM2NyZXQ=")
    );
    // Push and pull with the saved credentials.
    env.ok(&["push", &name]);
    let other = Env::new();
    fs_err::create_dir_all(other.path("docker")).expect("mkdir");
    fs_err::copy(
        env.path("docker/config.json"),
        other.path("docker/config.json"),
    )
    .expect("copy");
    other.ok(&["pull", &name]);
    assert_eq!(other.image_id(&name), env.image_id(&name));
    // Logout removes them; pulling is then refused.
    let out = other.ok(&["logout", &host]);
    assert!(
        out.contains(&format!("Removing login credentials for {host}")),
        "{out}"
    );
    let out = other.ok(&["logout", &host]);
    assert!(out.contains("Not logged in"), "{out}");
    other.ok(&["rmi", &name]);
    let err = other.fails(&["pull", &name]);
    assert!(err.contains("unauthorized"), "{err}");
    assert!(
        !other
            .images()
            .contains(&name.rsplit_once(':').expect("tag").0.to_owned())
    );

    // A credential helper (`credsStore`) is asked, as docker does.
    let bin = other.path("bin");
    fs_err::create_dir_all(&bin).expect("mkdir");
    let helper = bin.join("docker-credential-kilntest");
    fs_err::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = \"{host}\" ] || exit 1\necho '{{\"ServerURL\":\"{host}\",\"Username\":\"kiln\",\"Secret\":\"s3cret\"}}'\n"
        ),
    )
    .expect("write helper");
    use std::os::unix::fs::PermissionsExt as _;
    fs_err::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    fs_err::write(
        other.path("docker/config.json"),
        r#"{"credsStore":"kilntest"}"#,
    )
    .expect("write");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = other
        .cmd(&["pull", &name])
        .env("PATH", path)
        .output()
        .expect("run");
    assert!(
        o.status.success(),
        "pull with the helper's credentials: {}",
        text(&o.stderr)
    );
}

/// What the proxy does to the response for one blob.
#[derive(Clone)]
enum Mischief {
    /// Flip one byte of the body.
    Flip,
    /// Flip a byte of the gzip header's mtime: the stream still
    /// decompresses to the right layer, only its digest is wrong.
    FlipMtime,
    /// Announce the full length, send half, close.
    Cut,
    /// Send only the first half (with a matching Content-Length).
    Truncate,
    /// Send these bytes instead.
    Replace(Vec<u8>),
    /// Answer 503 the first time, then pass through.
    Fail503Once,
}

/// A one-request-per-connection HTTP proxy in front of a registry that
/// misbehaves on `GET .../blobs/<target>`.
struct Proxy {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(upstream: u16, target: String, mischief: Mischief) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let failed_once = Arc::new(Mutex::new(false));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (target, mischief, h, failed_once) = (
                    target.clone(),
                    mischief.clone(),
                    Arc::clone(&h),
                    Arc::clone(&failed_once),
                );
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &target, &mischief, &h, &failed_once);
                });
            }
        });
        Proxy { port, hits }
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // A TLS ClientHello (kiln tries https first): not for this proxy.
        if head.is_empty() && b[0] == 0x16 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.push(b[0]);
    }
    Ok(head)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn serve(
    mut client: TcpStream,
    upstream: u16,
    target: &str,
    mischief: &Mischief,
    hits: &AtomicUsize,
    failed_once: &Mutex<bool>,
) -> std::io::Result<()> {
    let head = text(&read_head(&mut client)?);
    let mut body = vec![0u8; content_length(&head)];
    client.read_exact(&mut body)?;
    let request_line = head.lines().next().unwrap_or("").to_owned();
    let is_target =
        request_line.starts_with("GET ") && request_line.contains(&format!("/blobs/{target}"));
    if is_target {
        hits.fetch_add(1, Ordering::SeqCst);
        if let Mischief::Fail503Once = mischief {
            let mut f = failed_once.lock().expect("lock");
            if !*f {
                *f = true;
                client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
        }
    }
    // Forward with `Connection: close` so one connection carries one request.
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut fwd = String::new();
    for l in head.lines().filter(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            fwd.push_str(l);
            fwd.push_str("\r\n");
        }
    }
    fwd.push_str("Connection: close\r\n\r\n");
    up.write_all(fwd.as_bytes())?;
    up.write_all(&body)?;
    let resp_head = text(&read_head(&mut up)?);
    let mut resp_body = Vec::new();
    up.read_to_end(&mut resp_body)?;
    if is_target && resp_head.starts_with("HTTP/1.1 200") {
        match mischief {
            Mischief::Flip => {
                let i = resp_body.len() / 2;
                resp_body[i] ^= 0x40;
            }
            Mischief::FlipMtime => resp_body[5] ^= 0x01,
            Mischief::Cut => {
                let full = resp_body.len();
                resp_body.truncate(full / 2);
                let mut out = resp_head.clone();
                out.truncate(out.trim_end().len());
                let out: String = out
                    .lines()
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                    .map(|l| format!("{l}\r\n"))
                    .collect();
                client.write_all(out.as_bytes())?;
                client.write_all(b"Connection: close\r\n\r\n")?;
                client.write_all(&resp_body)?;
                return client.flush();
            }
            Mischief::Truncate => resp_body.truncate(resp_body.len() / 2),
            Mischief::Replace(b) => resp_body = b.clone(),
            Mischief::Fail503Once => {}
        }
    }
    let mut out = String::new();
    for l in resp_head.lines().filter(|l| !l.is_empty()) {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("content-length:") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    if !request_line.starts_with("HEAD ") {
        out.push_str(&format!("Content-Length: {}\r\n", resp_body.len()));
    } else {
        out.push_str(&format!(
            "Content-Length: {}\r\n",
            content_length(&resp_head)
        ));
    }
    out.push_str("Connection: close\r\n\r\n");
    client.write_all(out.as_bytes())?;
    client.write_all(&resp_body)?;
    client.flush()
}

#[test]
fn bad_blobs_are_caught_and_nothing_is_stored() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(None);
    let env = Env::with_busybox();
    let repo = format!("kiln/{}", unique("corrupt"));
    let name = format!("{}/{repo}:1", reg.host());
    env.ok(&["tag", "busybox:local", &name]);
    env.ok(&["push", &name]);
    // The layer's blob digest, from the registry.
    let manifest = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]);
    let m: serde_json::Value = serde_json::from_str(&manifest).expect("json");
    let layer = m["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let config = m["config"]["digest"].as_str().expect("config").to_owned();

    let cases = [
        ("flip", Mischief::Flip),
        ("flip-mtime", Mischief::FlipMtime),
        ("cut", Mischief::Cut),
        ("truncate", Mischief::Truncate),
        // Another valid gzip stream: the wrong blob.
        (
            "wrong",
            Mischief::Replace(gzip(b"not the layer you asked for")),
        ),
    ];
    for (what, mischief) in cases {
        let proxy = Proxy::start(reg.port, layer.clone(), mischief);
        let via = format!("localhost:{}/{repo}:1", proxy.port);
        let fresh = Env::new();
        let before = fresh.images();
        let err = fresh.fails(&["pull", &via]);
        eprintln!("{what}: {err}");
        assert!(
            err.contains(&layer),
            "{what}: the error names the blob: {err}"
        );
        assert!(
            err.contains(&format!("localhost:{}/{repo}", proxy.port)),
            "{what}: the error names the image: {err}"
        );
        let hits = proxy.hits.load(Ordering::SeqCst);
        assert!(hits >= 1, "{what}: the proxy saw the blob request");
        if what == "cut" {
            assert!(hits > 1, "a cut download is retried");
        }
        assert_eq!(fresh.images(), before, "{what}: nothing named");
        fresh.assert_consistent();
        assert!(
            !fresh
                .store()
                .join("blobs/sha256")
                .join(layer.trim_start_matches("sha256:"))
                .exists()
        );
    }
    // A corrupt config is caught too.
    let proxy = Proxy::start(reg.port, config.clone(), Mischief::Flip);
    let fresh = Env::new();
    let err = fresh.fails(&["pull", &format!("localhost:{}/{repo}:1", proxy.port)]);
    assert!(err.contains(&config), "{err}");

    // A 503 once in the middle of the pull: the retry gets it.
    let proxy = Proxy::start(reg.port, layer.clone(), Mischief::Fail503Once);
    let via = format!("localhost:{}/{repo}:1", proxy.port);
    let fresh = Env::new();
    fresh.ok(&["pull", &via]);
    assert_eq!(proxy.hits.load(Ordering::SeqCst), 2, "one 503, one retry");
    assert_eq!(fresh.image_id(&via), env.image_id("busybox:local"));
    fresh.assert_consistent();
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    kiln_cache::compress(data, &mut out, kiln_cache::Compression::Gzip, 1).expect("gzip");
    out
}

/// An index with two platforms, put together by hand over two pushed images.
#[test]
fn platform_is_selected_from_an_index() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(None);
    let env = Env::with_busybox();
    let repo = format!("{}/kiln/{}", reg.host(), unique("multi"));
    // A second, different image.
    let rootfs = env.path("rootfs");
    fs_err::create_dir_all(rootfs.join("etc")).expect("mkdir");
    fs_err::write(rootfs.join("etc/arm"), "arm64\n").expect("write");
    env.ok(&["import", rootfs.to_str().expect("utf8"), "other:1"]);
    env.ok(&["tag", "busybox:local", &format!("{repo}:amd")]);
    env.ok(&["tag", "other:1", &format!("{repo}:arm")]);
    let mut descs = Vec::new();
    for (tag, arch, variant) in [("amd", "amd64", None), ("arm", "arm64", Some("v8"))] {
        env.ok(&["push", &format!("{repo}:{tag}")]);
        let raw = skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{repo}:{tag}"),
        ]);
        let digest = kiln_cache::Digest::of_bytes(raw.as_bytes());
        let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest.to_string(),
            "size": raw.len(),
            "platform": platform,
        }));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs,
    });
    let index_path = env.path("index.json");
    fs_err::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("write");
    let (_, path) = repo.split_once('/').expect("host/path");
    let o = Command::new("curl")
        .args([
            "-fsS",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", index_path.display()))
        .arg(format!("http://{}/v2/{path}/manifests/multi", reg.host()))
        .output()
        .expect("curl");
    assert!(o.status.success(), "PUT index: {}", text(&o.stderr));

    let multi = format!("{repo}:multi");
    let arm = Env::new();
    arm.ok(&["pull", "--platform", "linux/arm64", &multi]);
    assert_eq!(arm.image_id(&multi), env.image_id("other:1"));
    let amd = Env::new();
    amd.ok(&["pull", "--platform=linux/amd64", &multi]);
    assert_eq!(amd.image_id(&multi), env.image_id("busybox:local"));
    let err = Env::new().fails(&["pull", "--platform", "linux/s390x", &multi]);
    assert!(err.contains("linux/s390x"), "{err}");
    assert!(err.contains("linux/arm64/v8"), "lists what there is: {err}");
    // A single-platform image of another platform is refused too.
    let err = Env::new().fails(&["pull", "--platform", "linux/s390x", &format!("{repo}:amd")]);
    let arch =
        serde_json::from_str::<serde_json::Value>(&env.ok(&["image", "inspect", "busybox:local"]))
            .expect("json")[0]["Architecture"]
            .as_str()
            .expect("arch")
            .to_owned();
    assert!(
        err.contains("linux/s390x") && err.contains(&format!("linux/{arch}")),
        "{err}"
    );
}

#[test]
fn build_pulls_missing_bases_and_pushes_tags() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(None);
    let source = Env::with_busybox();
    let base = format!("{}/kiln/{}:base", reg.host(), unique("base"));
    source.ok(&["tag", "busybox:local", &base]);
    source.ok(&["push", &base]);

    let env = Env::new();
    let ctx = env.path("ctx");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN echo built > /built\n"),
    )
    .expect("write");
    let c = ctx.to_str().expect("utf8");
    // --pull=never does not reach the registry.
    let o = env.kiln(&[
        "build",
        "--progress=plain",
        "--network=none",
        "--pull=never",
        c,
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("no such image") && err.contains(&base),
        "{err}"
    );
    // The default (missing) pulls the base, and --push pushes the result.
    let out_name = format!("{}/kiln/{}:1", reg.host(), unique("built"));
    let o = env.kiln(&[
        "build",
        "--progress=plain",
        "--network=none",
        "--push",
        "-t",
        &out_name,
        c,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        env.images().contains(&source.image_id("busybox:local")),
        "base pulled"
    );
    let inspect = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{out_name}"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(2), "{inspect}");
    // The pushed image runs after a pull elsewhere.
    let other = Env::new();
    other.ok(&["pull", &out_name]);
    let run = other.ok(&["run", "--rm", "--network=none", &out_name, "cat", "/built"]);
    assert_eq!(run.trim(), "built");

    // Two layers, the second corrupted on the way: the pull fails, the
    // first layer may be stored (complete and verified), no image is named
    // and the store checks clean.
    let top = v["Layers"][1].as_str().expect("layer").to_owned();
    let proxy = Proxy::start(reg.port, top.clone(), Mischief::Flip);
    let (_, path) = out_name.split_once('/').expect("host/path");
    let via = format!("localhost:{}/{path}", proxy.port);
    let fresh = Env::new();
    let before = fresh.images();
    let err = fresh.fails(&["pull", &via]);
    assert!(err.contains(&top) && err.contains("localhost:"), "{err}");
    assert_eq!(fresh.images(), before);
    fresh.assert_consistent();
}

/// `FROM name@sha256:..` pins the base: it is pulled by digest when the
/// store lacks it, found by digest afterwards (a moved tag does not
/// change it), kept by `prune`, and a digest the registry lacks fails the
/// build naming it.
#[test]
fn build_from_a_digest_pulls_and_pins_that_manifest() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(None);
    let source = Env::with_busybox();
    let repo = format!("{}/kiln/{}", reg.host(), unique("pinned"));
    let base = format!("{repo}:1");
    source.ok(&["tag", "busybox:local", &base]);
    source.ok(&["push", &base]);
    let inspect = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{base}")]);
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    let digest = v["Digest"].as_str().expect("Digest").to_owned();
    let pinned = format!("{repo}@{digest}");

    let env = Env::new();
    let ctx = env.path("ctx");
    fs_err::create_dir_all(&ctx).expect("mkdir");
    fs_err::write(
        ctx.join("Dockerfile"),
        format!("FROM {pinned}\nRUN echo pinned > /p\n"),
    )
    .expect("write");
    let c = ctx.to_str().expect("utf8");
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--progress=plain", "--network=none"];
        args.extend_from_slice(extra);
        args.push(c);
        env.kiln(&args)
    };
    let o = build(&["--pull=never"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("no such image") && err.contains(&digest),
        "{err}"
    );
    let o = build(&["-t", "app:1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("pulling base image"),
        "{}",
        text(&o.stderr)
    );
    // The base is stored by its digest, with no tag.
    let base_json = env.ok(&["image", "inspect", &pinned]);
    let b: serde_json::Value = serde_json::from_str(&base_json).expect("json");
    assert_eq!(
        b[0]["Id"].as_str(),
        Some(source.image_id("busybox:local").as_str())
    );
    assert_eq!(
        b[0]["RepoTags"].as_array().map(Vec::len),
        Some(0),
        "{base_json}"
    );
    assert_eq!(
        b[0]["RepoDigests"][0].as_str(),
        Some(pinned.as_str()),
        "{base_json}"
    );
    let run = env.ok(&["run", "--rm", "--network=none", "app:1", "cat", "/p"]);
    assert_eq!(run.trim(), "pinned");

    // The tag moves in the registry; the pinned build does not follow it
    // and does not reach the registry again.
    let other_ctx = source.path("other");
    fs_err::create_dir_all(&other_ctx).expect("mkdir");
    fs_err::write(
        other_ctx.join("Dockerfile"),
        "FROM busybox:local\nRUN echo moved > /m\n",
    )
    .expect("write");
    source.ok(&[
        "build",
        "--progress=plain",
        "--network=none",
        "-t",
        &base,
        other_ctx.to_str().expect("utf8"),
    ]);
    source.ok(&["push", &base]);
    // Not dangling: prune keeps it.
    env.ok(&["prune", "--force"]);
    let o = build(&["--no-cache", "-t", "app:2"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !text(&o.stderr).contains("pulling base image"),
        "{}",
        text(&o.stderr)
    );
    let run = env.ok(&[
        "run",
        "--rm",
        "--network=none",
        "app:2",
        "sh",
        "-c",
        "cat /p; test -e /m || echo no-m",
    ]);
    assert_eq!(
        run.split_whitespace().collect::<Vec<_>>(),
        ["pinned", "no-m"],
        "{run}"
    );

    // A digest the registry does not have fails, naming it.
    let absent = format!("sha256:{}", "0".repeat(64));
    fs_err::write(ctx.join("Dockerfile"), format!("FROM {repo}@{absent}\n")).expect("write");
    let o = build(&[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains(&absent), "{err}");
    // `rmi` by digest removes the base.
    let out = env.ok(&["rmi", &pinned]);
    assert!(out.contains(&format!("Untagged: {pinned}")), "{out}");
    env.assert_consistent();
}

/// https is verified against the system's roots (`SSL_CERT_FILE` here);
/// `--tls-verify=false` accepts any certificate and plain http; a
/// registry elsewhere than this machine never gets plain http otherwise.
#[test]
fn tls_is_verified_and_plain_http_needs_consent() {
    if !can_run() {
        return;
    }
    if !have("openssl") || !have("hostname") {
        assert!(!ci(), "CI=true but this test needs openssl and hostname");
        eprintln!("skipping: needs openssl");
        return;
    }
    let Some(ip) = registry_support::outside_ip() else {
        assert!(
            !ci(),
            "CI=true but this machine has no non-loopback IPv4 address"
        );
        eprintln!("skipping: no non-loopback address to serve a non-local registry on");
        return;
    };
    let env = Env::with_busybox();

    let tls = Registry::start_on(&ip, None, true);
    let name = format!("{}/kiln/{}:1", tls.host(), unique("tls"));
    env.ok(&["tag", "busybox:local", &name]);
    let err = env.fails(&["push", &name]);
    eprintln!("unknown CA: {err}");
    assert!(
        err.to_lowercase().contains("certificate"),
        "an unknown CA is refused: {err}"
    );
    env.ok(&["push", "--tls-verify=false", &name]);
    let o = env
        .cmd(&["pull", &name])
        .env("SSL_CERT_FILE", tls.cert())
        .output()
        .expect("run");
    assert!(
        o.status.success(),
        "a CA in SSL_CERT_FILE is trusted: {}",
        text(&o.stderr)
    );

    let plain = Registry::start_on(&ip, None, false);
    let name = format!("{}/kiln/{}:1", plain.host(), unique("plain"));
    env.ok(&["tag", "busybox:local", &name]);
    let err = env.fails(&["push", &name]);
    eprintln!("plain http: {err}");
    assert!(err.contains(&plain.host()), "{err}");
    env.ok(&["push", "--tls-verify=false", &name]);
    let other = Env::new();
    other.fails(&["pull", &name]);
    other.ok(&["pull", "--tls-verify=false", &name]);
    assert_eq!(other.image_id(&name), env.image_id("busybox:local"));
}
