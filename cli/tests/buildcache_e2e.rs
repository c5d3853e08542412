//! End-to-end tests of `kiln build --cache-to/--cache-from` (issue 7):
//! two stores stand for two CI machines sharing one cache directory (an
//! OCI layout in BuildKit's cache format). Real builds (root, namespaces,
//! overlayfs, busybox-static); without them the tests print a skip message
//! and return, except under `CI=true`, where they fail.

#![expect(clippy::print_stderr, reason = "tests report skips on stderr")]

mod common;

use common::{ci, have_tool, text, workspace};
use std::collections::{BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../cache/tests/registry_support.rs"]
mod registry_support;

/// Whether these tests can run here (root, busybox-static); panics in CI.
fn can_build() -> bool {
    common::root_and_busybox("the build cache tests")
}

/// A temp dir with two stores ("machines" A and B), each holding only
/// `busybox:local`, a shared cache directory and a copy of the context.
struct Machines {
    tmp: tempfile::TempDir,
}

impl Machines {
    fn new() -> Machines {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("kiln-buildcache-{}-", std::process::id()))
            .tempdir()
            .expect("tmp");
        let m = Machines { tmp };
        for store in ["A", "B"] {
            common::make_busybox(&m.store(store));
        }
        let o = Command::new("cp")
            .arg("-a")
            .arg(workspace().join("testdata/buildcache/multistage"))
            .arg(m.path("ctx"))
            .output()
            .expect("cp");
        assert!(o.status.success(), "cp: {}", text(&o.stderr));
        m
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn store(&self, name: &str) -> PathBuf {
        self.path(name)
    }

    fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    /// `kiln build` on store `on` with `extra` flags; the blobs the build
    /// read from a local cache are logged to `read-log-<on>`.
    fn build_raw(&self, on: &str, extra: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(self.store(on))
            .args(["build", "--progress=plain", "--network=none", "-t", "app:1"])
            .args(extra)
            .arg(self.path("ctx"))
            .env_remove("KILN_ROOT")
            .env_remove("SOURCE_DATE_EPOCH")
            .env("KILN_CACHE_READ_LOG", self.path(&format!("read-log-{on}")))
            .output()
            .expect("run kiln")
    }

    fn build(&self, on: &str, extra: &[&str]) -> String {
        let o = self.build_raw(on, extra);
        assert!(
            o.status.success(),
            "kiln build {extra:?} on {on} failed: {}\n{}",
            o.status,
            text(&o.stderr)
        );
        text(&o.stderr)
    }

    /// The blobs store `on` read from the cache, in order.
    fn reads(&self, on: &str) -> Vec<String> {
        fs_err::read_to_string(self.path(&format!("read-log-{on}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn to(&self, mode: &str) -> String {
        format!("type=local,dest={},mode={mode}", self.cache().display())
    }

    fn from(&self) -> String {
        format!("type=local,src={}", self.cache().display())
    }
}

/// The cache's manifest, config, and each layer blob's diffID.
struct CacheDoc {
    manifest: String,
    config_digest: String,
    config: serde_json::Value,
    diff_of_blob: HashMap<String, String>,
}

fn read_cache(dir: &Path) -> CacheDoc {
    let blob = |d: &str| -> Vec<u8> {
        let hex = d.strip_prefix("sha256:").expect("sha256 digest");
        fs_err::read(dir.join("blobs/sha256").join(hex)).expect("blob")
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs_err::read(dir.join("index.json")).expect("index.json"))
            .expect("index json");
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"], "latest",
        "{index}"
    );
    let manifest_digest = entry["digest"].as_str().expect("digest").to_owned();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&manifest_digest)).expect("manifest json");
    assert_eq!(
        manifest["config"]["mediaType"], "application/vnd.buildkit.cacheconfig.v0",
        "{manifest}"
    );
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config")
        .to_owned();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&config_digest)).expect("config json");
    let mut diff_of_blob = HashMap::new();
    for l in manifest["layers"].as_array().expect("layers") {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        diff_of_blob.insert(
            l["digest"].as_str().expect("digest").to_owned(),
            l["annotations"]["containerd.io/uncompressed"]
                .as_str()
                .expect("diffID annotation")
                .to_owned(),
        );
    }
    CacheDoc {
        manifest: manifest_digest,
        config_digest,
        config,
        diff_of_blob,
    }
}

/// The diffIDs of image `name` in store `root`.
fn image_layers(root: &Path, name: &str) -> Vec<String> {
    let store = kiln_cache::Store::open(root).expect("open store");
    let img = store.resolve(name).expect("resolve");
    img.layers.iter().map(|l| l.diff_id.to_string()).collect()
}

/// `#N` of every step header, and of every step reported CACHED.
fn steps_and_cached(progress: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut steps = BTreeSet::new();
    let mut cached = BTreeSet::new();
    for l in progress.lines() {
        let mut w = l.split_whitespace();
        let (Some(n), Some(rest)) = (w.next(), w.next()) else {
            continue;
        };
        if !n.starts_with('#') {
            continue;
        }
        if rest.starts_with('[') && rest != "[internal]" {
            steps.insert(n.to_owned());
        }
        if rest == "CACHED" {
            cached.insert(n.to_owned());
        }
    }
    (steps, cached)
}

#[test]
fn a_second_machine_builds_from_the_cache_and_reads_only_the_image_layers() {
    if !can_build() {
        return;
    }
    let m = Machines::new();
    // Machine A: a cold build, exporting every step (mode=max).
    let a = m.build("A", &["--cache-to", &m.to("max")]);
    assert!(
        a.contains("exported build cache to type=local,dest="),
        "{a}"
    );
    let doc = read_cache(&m.cache());
    let records = doc.config["records"].as_array().expect("records");
    assert!(records.len() >= 6, "{}", doc.config);
    assert!(
        doc.config["kiln.contentDigests"].is_object(),
        "{}",
        doc.config
    );

    // Machine B has only busybox:local.
    let out = m.path("out-B");
    let output = format!("type=local,dest={}", out.display());
    let b = m.build("B", &["--cache-from", &m.from(), "--output", &output]);
    let (steps, cached) = steps_and_cached(&b);
    assert!(!steps.is_empty(), "{b}");
    assert!(
        steps.is_subset(&cached),
        "every step should be CACHED, not {:?}:\n{b}",
        steps.difference(&cached).collect::<Vec<_>>()
    );
    assert!(b.contains("(0 steps run,"), "{b}");
    assert!(
        b.contains("CACHED: from the imported cache type=local,src="),
        "{b}"
    );

    // What B read: the manifest, the config, and the blobs of the image's
    // layers that B did not have (not busybox's, not the build stage's).
    let busybox: BTreeSet<String> = image_layers(&m.store("B"), "busybox:local")
        .into_iter()
        .collect();
    let image = image_layers(&m.store("B"), "app:1");
    assert_eq!(image, image_layers(&m.store("A"), "app:1"));
    let needed: BTreeSet<String> = doc
        .diff_of_blob
        .iter()
        .filter(|(_, d)| image.contains(d) && !busybox.contains(*d))
        .map(|(b, _)| b.clone())
        .collect();
    assert_eq!(needed.len(), 3, "three layers on top of busybox");
    let mut want: BTreeSet<String> = needed.clone();
    want.insert(doc.manifest.clone());
    want.insert(doc.config_digest.clone());
    let reads = m.reads("B");
    let read: BTreeSet<String> = reads.iter().cloned().collect();
    assert_eq!(read, want, "blobs read by B");
    assert_eq!(reads.len(), want.len(), "a blob was read twice: {reads:?}");
    // The build stage's layers are in the cache but were not fetched.
    let store_b = kiln_cache::Store::open(m.store("B")).expect("store");
    let skipped: Vec<&String> = doc
        .diff_of_blob
        .values()
        .filter(|d| !image.contains(d))
        .collect();
    assert_eq!(
        skipped.len(),
        3,
        "the build stage's three layers are cached"
    );
    for d in skipped {
        assert!(
            !store_b.has_layer(&d.parse().expect("digest")),
            "B fetched the build stage layer {d}"
        );
    }
    // The image B made is whole: its filesystem has what the steps made.
    assert_eq!(
        fs_err::read_to_string(out.join("listing")).expect("listing"),
        "a\nb\nhello.txt\n"
    );
    assert_eq!(
        fs_err::read_to_string(out.join("app/b")).expect("app/b"),
        "hi\none\n"
    );
    // The hits whose layers B fetched are B's own now: a rebuild without
    // the cache runs nothing of the final stage.
    let again = m.build("B", &[]);
    for step in ["RUN echo final-base", "COPY --from=build", "RUN ls /app"] {
        let n = again
            .lines()
            .find(|l| l.contains(step) && l.contains(" ["))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no step `{step}`:\n{again}"));
        assert!(
            again.lines().any(|l| l == format!("{n} CACHED")),
            "{step} should be CACHED:\n{again}"
        );
    }
    store_b
        .verify_layer(&image[image.len() - 1].parse().expect("digest"))
        .expect("verified");
}

#[test]
fn the_cache_is_a_valid_oci_layout() {
    if !can_build() {
        return;
    }
    if !have_tool("skopeo") {
        assert!(!ci(), "CI=true but skopeo is missing");
        eprintln!("skipping: needs skopeo");
        return;
    }
    let m = Machines::new();
    m.build("A", &["--cache-to", &m.to("min")]);
    let layout = format!("oci:{}:latest", m.cache().display());
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", &layout])
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "skopeo inspect: {}", text(&o.stderr));
    let raw: serde_json::Value = serde_json::from_slice(&o.stdout).expect("manifest json");
    assert_eq!(
        raw["config"]["mediaType"],
        "application/vnd.buildkit.cacheconfig.v0"
    );
    // skopeo copies it (checking every blob's digest and size).
    let copy = format!("oci:{}:latest", m.path("copy").display());
    let o = Command::new("skopeo")
        .args(["copy", &layout, &copy])
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "skopeo copy: {}", text(&o.stderr));
}

#[test]
fn mode_min_exports_only_the_image_stages() {
    if !can_build() {
        return;
    }
    let m = Machines::new();
    m.build("A", &["--cache-to", &m.to("min")]);
    let doc = read_cache(&m.cache());
    let image: BTreeSet<String> = image_layers(&m.store("A"), "app:1").into_iter().collect();
    let exported: BTreeSet<String> = doc.diff_of_blob.values().cloned().collect();
    assert_eq!(exported, image, "mode=min: only the image's layers");
    // The build stage's records are not there, but nothing needs them:
    // the final stage's steps are cached (the COPY --from keyed by the
    // content digest the cache remembers), and B does not build `build`.
    let b = m.build("B", &["--cache-from", &m.from()]);
    assert!(b.contains("(0 steps run,"), "{b}");
    assert!(b.contains(", 3 not needed)"), "{b}");
    assert!(!b.contains("[build 2/4]"), "the build stage ran:\n{b}");
    for step in ["RUN echo final-base", "COPY --from=build", "RUN ls /app"] {
        let n = b
            .lines()
            .find(|l| l.contains(step) && l.contains(" ["))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no step `{step}`:\n{b}"));
        assert!(
            b.lines().any(|l| l == format!("{n} CACHED")),
            "{step} should be CACHED:\n{b}"
        );
    }
}

#[test]
fn flags_and_missing_caches() {
    if !can_build() {
        return;
    }
    let m = Machines::new();
    // A cache that is not there: a warning, and the build runs.
    let missing = format!("type=local,src={}", m.path("nowhere").display());
    let b = m.build("B", &["--cache-from", &missing]);
    assert!(b.contains("warning: --cache-from type=local,src="), "{b}");
    assert!(b.contains("no cache found there"), "{b}");
    // Bad specs name the flag and the attribute.
    for (flag, spec, want) in [
        (
            "--cache-to",
            "type=local,dest=/x,mode=fast",
            "attribute `mode`",
        ),
        ("--cache-to", "type=local", "`dest=DIR`"),
        (
            "--cache-from",
            "type=local,src=/x,color=red",
            "unknown attribute `color`",
        ),
    ] {
        let o = m.build_raw("B", &[flag, spec]);
        assert!(!o.status.success(), "{flag} {spec} was accepted");
        let e = text(&o.stderr);
        assert!(
            e.contains(&format!("invalid {flag}")) && e.contains(want),
            "{flag} {spec}: {e}"
        );
    }
}

#[test]
fn a_corrupt_cache_blob_fails_the_build_naming_it() {
    if !can_build() {
        return;
    }
    let m = Machines::new();
    m.build("A", &["--cache-to", &m.to("max")]);
    let doc = read_cache(&m.cache());
    let image = image_layers(&m.store("A"), "app:1");
    let top = image.last().expect("a layer");
    let (blob, _) = doc
        .diff_of_blob
        .iter()
        .find(|(_, d)| *d == top)
        .expect("the top layer is in the cache");
    let path = m
        .cache()
        .join("blobs/sha256")
        .join(blob.strip_prefix("sha256:").expect("sha256"));
    let mut bytes = fs_err::read(&path).expect("blob");
    let last = bytes.len() - 12;
    bytes[last] ^= 0xff;
    fs_err::write(&path, bytes).expect("write");
    let o = m.build_raw("B", &["--cache-from", &m.from()]);
    let e = text(&o.stderr);
    assert!(!o.status.success(), "a corrupt layer was accepted:\n{e}");
    assert!(
        e.contains(blob.as_str()),
        "the error should name {blob}:\n{e}"
    );
    let store_b = kiln_cache::Store::open(m.store("B")).expect("store");
    assert!(
        !store_b.has_layer(&top.parse().expect("digest")),
        "half-stored layer"
    );
}

/// A plain HTTP/1.0 GET to the test registry: the body.
fn http_get(port: u16, path: &str, accept: &str) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n"
    )
    .expect("request");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("response");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = text(&all[..split]);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{path}: {head}"
    );
    all[split + 4..].to_vec()
}

#[test]
fn two_machines_share_a_cache_in_a_registry() {
    if !can_build() || !registry_support::available() {
        return;
    }
    let reg = registry_support::Registry::start(None);
    let m = Machines::new();
    let repo = format!("kiln-buildcache-{}/app", std::process::id());
    let cache_ref = format!("{}/{repo}:cache", reg.host());
    let a = m.build(
        "A",
        &[
            "--cache-to",
            &format!("type=registry,ref={cache_ref},mode=max"),
        ],
    );
    assert!(
        a.contains("exported build cache to type=registry,ref="),
        "{a}"
    );

    // The cache manifest, as the registry serves it.
    let manifest: serde_json::Value = serde_json::from_slice(&http_get(
        reg.port,
        &format!("/v2/{repo}/manifests/cache"),
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .expect("manifest json");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.buildkit.cacheconfig.v0"
    );
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config")
        .to_owned();
    let diff_of_blob: HashMap<String, String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_owned(),
                l["annotations"]["containerd.io/uncompressed"]
                    .as_str()
                    .expect("diffID")
                    .to_owned(),
            )
        })
        .collect();

    // Machine B: every step CACHED; the blobs it GETs from the registry
    // (its access log) are the config and the image's layers B lacked.
    let log = reg.dir.path().join("log");
    let before = fs_err::read(&log).map(|b| b.len()).unwrap_or(0);
    let b = m.build(
        "B",
        &["--cache-from", &format!("type=registry,ref={cache_ref}")],
    );
    let (steps, cached) = steps_and_cached(&b);
    assert!(
        steps.is_subset(&cached),
        "every step should be CACHED, not {:?}:\n{b}",
        steps.difference(&cached).collect::<Vec<_>>()
    );
    let access = text(&fs_err::read(&log).expect("registry log")[before..]);
    let prefix = format!("\"GET /v2/{repo}/blobs/");
    let gets: Vec<String> = access
        .lines()
        .filter_map(|l| {
            let i = l.find(&prefix)?;
            let rest = &l[i + prefix.len()..];
            Some(rest.split([' ', '?']).next().unwrap_or("").to_owned())
        })
        .collect();
    let busybox: BTreeSet<String> = image_layers(&m.store("B"), "busybox:local")
        .into_iter()
        .collect();
    let image = image_layers(&m.store("B"), "app:1");
    let mut want: BTreeSet<String> = diff_of_blob
        .iter()
        .filter(|(_, d)| image.contains(d) && !busybox.contains(*d))
        .map(|(b, _)| b.clone())
        .collect();
    assert_eq!(want.len(), 3, "three layers on top of busybox");
    want.insert(config_digest);
    let got: BTreeSet<String> = gets.iter().cloned().collect();
    assert_eq!(got, want, "blobs B fetched from the registry:\n{access}");
    assert_eq!(gets.len(), want.len(), "a blob was fetched twice: {gets:?}");
    // A cache ref with nothing there is a warning, as a missing directory.
    let none = format!("type=registry,ref={}/{repo}:nothing-here", reg.host());
    let c = m.build("B", &["--cache-from", &none]);
    assert!(
        c.contains("warning: --cache-from type=registry,ref="),
        "{c}"
    );
    assert!(c.contains("no cache found there"), "{c}");
}

#[test]
fn reexporting_to_the_same_cache_fetches_no_more_layers() {
    if !can_build() {
        return;
    }
    let m = Machines::new();
    m.build("A", &["--cache-to", &m.to("max")]);
    let first = read_cache(&m.cache());
    // The usual CI line: import from and export to the same place.
    let b = m.build(
        "B",
        &["--cache-from", &m.from(), "--cache-to", &m.to("max")],
    );
    assert!(b.contains("(0 steps run,"), "{b}");
    let second = read_cache(&m.cache());
    assert_eq!(
        second.diff_of_blob, first.diff_of_blob,
        "the same layers, as the same blobs"
    );
    // B fetched only the image's layers it lacked: the build stage's
    // layers went into the new cache without being downloaded.
    let image = image_layers(&m.store("B"), "app:1");
    let store_b = kiln_cache::Store::open(m.store("B")).expect("store");
    for d in first.diff_of_blob.values().filter(|d| !image.contains(d)) {
        assert!(
            !store_b.has_layer(&d.parse().expect("digest")),
            "B fetched {d} to export it"
        );
    }
    let fetched: Vec<String> = m
        .reads("B")
        .into_iter()
        .filter(|r| first.diff_of_blob.contains_key(r))
        .collect();
    assert_eq!(fetched.len(), 3, "{fetched:?}");
    // And the rewritten cache serves a third machine.
    common::make_busybox(&m.store("C"));
    let c = m.build("C", &["--cache-from", &m.from()]);
    assert!(c.contains("(0 steps run,"), "{c}");
}

#[test]
fn a_step_after_imported_hits_runs_on_the_fetched_layers() {
    if !can_build() {
        return;
    }
    let m = Machines::new();
    m.build("A", &["--cache-to", &m.to("max")]);
    // B's Dockerfile has one more step: it runs on the imported layers,
    // which are fetched for it (once each).
    let df = m.path("ctx/Dockerfile");
    let mut text_df = fs_err::read_to_string(&df).expect("Dockerfile");
    text_df.push_str("RUN cat /base /app/b > /combined\n");
    fs_err::write(&df, text_df).expect("write");
    let out = m.path("out-B");
    let output = format!("type=local,dest={}", out.display());
    let b = m.build("B", &["--cache-from", &m.from(), "--output", &output]);
    assert!(b.contains("(1 steps run,"), "{b}");
    assert_eq!(
        fs_err::read_to_string(out.join("combined")).expect("combined"),
        "final-base\nhi\none\n"
    );
    let doc = read_cache(&m.cache());
    let fetched: Vec<String> = m
        .reads("B")
        .into_iter()
        .filter(|r| doc.diff_of_blob.contains_key(r))
        .collect();
    assert_eq!(
        fetched.len(),
        3,
        "the final stage's three layers: {fetched:?}"
    );
    let unique: BTreeSet<&String> = fetched.iter().collect();
    assert_eq!(unique.len(), 3, "{fetched:?}");
}
