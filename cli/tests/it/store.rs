//! load, save, images, tag, rmi, prune, import and the store's robustness.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{
    Kiln, Rng, assert_same_tree, busybox_rootfs, have_tool, is_root, noise, require, run,
};

fn busybox_ok() -> bool {
    require(
        std::path::Path::new("/bin/busybox").is_file(),
        "/bin/busybox (busybox-static)",
    )
}

/// rootfs → `kiln import` → `kiln save` → skopeo and umoci accept it and
/// unpack the same tree, for docker-archive and OCI+gzip output.
#[test]
fn busybox_round_trip_through_skopeo_and_umoci() {
    if !busybox_ok()
        || !require(
            have_tool("skopeo") && have_tool("umoci"),
            "skopeo and umoci",
        )
        || !require(
            is_root(),
            "root (umoci unpack keeps owners and set-id bits)",
        )
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let rootfs = t.join("rootfs");
    busybox_rootfs(&rootfs);
    let kiln = Kiln::new(t.join("store"));
    let id = kiln.ok(&[
        "import",
        "-c",
        r#"CMD ["/bin/sh"]"#,
        "-c",
        "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        rootfs.to_str().expect("utf8"),
        "bb:1",
    ]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    let images = kiln.ok(&["images"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with("bb ") && l.contains(" 1 ")),
        "{images}"
    );

    // docker-archive (the default).
    let docker = t.join("bb-docker.tar");
    kiln.ok(&["save", "-o", docker.to_str().expect("utf8"), "bb:1"]);
    let inspect = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", docker.display())));
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("skopeo json");
    assert_eq!(v["Os"], "linux");
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["Env"][0], "PATH=/usr/sbin:/usr/bin:/sbin:/bin");
    let layout = t.join("layout");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", docker.display()))
        .arg(format!("oci:{}:fromdocker", layout.display())));
    let bundle = t.join("bundle-docker");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:fromdocker", layout.display()))
        .arg(&bundle));
    assert_same_tree(&rootfs, &bundle.join("rootfs"));

    // OCI archive, gzip layers: umoci reads the layout directly.
    let oci = t.join("bb-oci.tar");
    kiln.ok(&[
        "save",
        "--format",
        "oci",
        "--compress",
        "gzip",
        "-o",
        oci.to_str().expect("utf8"),
        "bb:1",
    ]);
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", oci.display())));
    let v: serde_json::Value = serde_json::from_str(&raw).expect("skopeo json");
    assert_eq!(
        v["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", oci.display())));
    let extracted = t.join("oci-dir");
    fs_err::create_dir_all(&extracted).expect("mkdir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&oci)
        .arg("-C")
        .arg(&extracted));
    let bundle = t.join("bundle-oci");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:1", extracted.display()))
        .arg(&bundle));
    assert_same_tree(&rootfs, &bundle.join("rootfs"));

    // And zstd: skopeo can still read the manifest and config.
    let zst = t.join("bb-zstd.tar");
    kiln.ok(&[
        "save",
        "--format",
        "oci",
        "--compress",
        "zstd",
        "-o",
        zst.to_str().expect("utf8"),
        "bb:1",
    ]);
    run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", zst.display())));
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", zst.display())));
    assert!(raw.contains("tar+zstd"), "{raw}");
}

/// Archives written by skopeo (docker-archive and oci-archive) load into
/// kiln with their names, and the loaded image saves back identically.
#[test]
fn skopeo_made_archives_load() {
    if !busybox_ok() || !require(have_tool("skopeo"), "skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let rootfs = t.join("rootfs");
    busybox_rootfs(&rootfs);
    let a = Kiln::new(t.join("a"));
    a.ok(&["import", rootfs.to_str().expect("utf8"), "src:1"]);
    let layout = t.join("layout");
    fs_err::create_dir_all(&layout).expect("mkdir");
    let ours = t.join("ours.tar");
    a.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        ours.to_str().expect("utf8"),
        "src:1",
    ]);
    run(Command::new("tar")
        .arg("-xf")
        .arg(&ours)
        .arg("-C")
        .arg(&layout));

    let darc = t.join("skopeo-docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!(
            "docker-archive:{}:example.com/sk/docker:v1",
            darc.display()
        )));
    let oarc = t.join("skopeo-oci.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("oci-archive:{}:busybox:oci", oarc.display())));

    let sklayout = t.join("skopeo-layout");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("oci:{}:latest", sklayout.display())));

    let b = Kiln::new(t.join("b"));
    let out = b.ok(&["load", "-i", darc.to_str().expect("utf8")]);
    assert_eq!(out.trim(), "Loaded image: example.com/sk/docker:v1");
    let out = b.ok(&["load", "-i", oarc.to_str().expect("utf8")]);
    assert_eq!(out.trim(), "Loaded image: busybox:oci");
    // An OCI layout directory whose ref is a bare tag: untagged, as docker.
    let out = b.ok(&["load", "-i", sklayout.to_str().expect("utf8")]);
    assert!(out.starts_with("Loaded image ID: sha256:"), "{out}");
    let images = b.ok(&["images"]);
    assert!(images.contains("example.com/sk/docker   v1"), "{images}");
    assert!(images.contains("busybox"), "{images}");
    b.assert_consistent();

    // The loaded image unpacks to the same tree (snapshot of the layer).
    let inspect: serde_json::Value =
        serde_json::from_str(&b.ok(&["image", "inspect", "busybox:oci"])).expect("json");
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(inspect[0]["RepoTags"][0], "busybox:oci");
}

/// Removing, tagging and pruning through the CLI; errors name the image.
#[test]
fn tag_rmi_history_prune() {
    if !busybox_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let rootfs = t.join("rootfs");
    busybox_rootfs(&rootfs);
    let k = Kiln::new(t.join("s"));
    k.ok(&[
        "import",
        "-m",
        "first",
        rootfs.to_str().expect("utf8"),
        "one",
    ]);
    k.ok(&["tag", "one", "registry.example:5000/two:x"]);
    let images = k.ok(&["images"]);
    assert!(images.contains("registry.example:5000/two   x"), "{images}");
    let history = k.ok(&["history", "one"]);
    assert!(
        history.contains("first") && history.contains("kiln import"),
        "{history}"
    );
    let o = k.run(&["rmi", "nope"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such image: `nope`"));
    let id = k.ok(&["images", "-q"]);
    let o = k.run(&["rmi", id.trim()]);
    assert!(!o.status.success(), "two names: needs -f");
    let out = k.ok(&["rmi", "-f", id.trim()]);
    assert!(
        out.contains("Untagged: one:latest") && out.contains("Deleted: sha256:"),
        "{out}"
    );
    let out = k.ok(&["prune", "--force"]);
    assert!(out.contains("Total reclaimed space: 2."), "{out}");
    assert_eq!(
        fs_err::read_dir(t.join("s/blobs/sha256"))
            .expect("dir")
            .count(),
        0,
        "prune removed the unreferenced blobs"
    );
    k.assert_consistent();
}

/// A corrupted layer blob: `kiln save` fails naming it, the check reports
/// it, nothing exports the bad bytes.
#[test]
fn corrupted_blob_is_reported_by_save_and_check() {
    if !busybox_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let rootfs = t.join("rootfs");
    busybox_rootfs(&rootfs);
    let k = Kiln::new(t.join("s"));
    k.ok(&["import", rootfs.to_str().expect("utf8"), "c:1"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&k.ok(&["image", "inspect", "c:1"])).expect("json");
    let layer = inspect[0]["RootFS"]["Layers"][0]
        .as_str()
        .expect("layer")
        .to_owned();
    let path = t
        .join("s/blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = fs_err::read(&path).expect("blob");
    bytes[1000] ^= 1;
    fs_err::write(&path, bytes).expect("corrupt");
    let out = t.join("out.tar");
    let o = k.run(&["save", "-o", out.to_str().expect("utf8"), "c:1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&layer) && err.contains("corrupt"), "{err}");
    assert!(!out.exists(), "no partial archive left");
    let o = k.run(&["system", "check", "--verify"]);
    assert!(
        !o.status.success(),
        "check must report the missing (quarantined) blob"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains(&layer));
}

fn make_archives(t: &std::path::Path, n: usize, extra: usize) -> Vec<std::path::PathBuf> {
    let rootfs = t.join("rootfs");
    busybox_rootfs(&rootfs);
    let src = Kiln::new(t.join("src"));
    let mut rng = Rng::from_clock();
    let mut out = Vec::new();
    for i in 0..n {
        noise(&rootfs.join("etc/noise"), extra + i, &mut rng);
        let name = format!("img{i}:v");
        src.ok(&["import", rootfs.to_str().expect("utf8"), &name]);
        let file = t.join(format!("img{i}.tar"));
        src.ok(&["save", "-o", file.to_str().expect("utf8"), &name]);
        out.push(file);
    }
    out
}

/// 4 kiln processes loading, tagging and removing images on one store at
/// once leave it consistent.
#[test]
fn four_processes_share_one_store() {
    if !busybox_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let archives = make_archives(t, 4, 100_000);
    let store = t.join("shared");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let children: Vec<_> = (0..4)
        .map(|p| {
            let mut script = String::from("set -e\n");
            for round in 0..5 {
                let a = archives[(p + round) % 4].display();
                let img = format!("img{}:v", (p + round) % 4);
                script += &format!(
                    "\"$K\" load -q -i {a}\n\"$K\" tag {img} p{p}/r{round}:t\n\"$K\" images >/dev/null\n\"$K\" rmi p{p}/r{round}:t >/dev/null\n"
                );
            }
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .env("K", kiln)
                .env("KILN_ROOT", &store)
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "a worker failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let k = Kiln::new(&store);
    k.assert_consistent();
    let images = k.ok(&["images"]);
    for i in 0..4 {
        assert!(images.contains(&format!("img{i} ")), "{images}");
    }
    assert!(
        !images.contains("p0/"),
        "every temporary tag was removed: {images}"
    );
    // GC while nothing else runs keeps all named images whole.
    k.ok(&["prune", "--force"]);
    k.assert_consistent();
}

/// `kiln load` killed with SIGKILL at 20 random points leaves a consistent
/// store, and a retried load succeeds.
#[test]
fn load_killed_at_random_points() {
    if !busybox_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    // Big enough that the load takes a while: most kills land mid-copy.
    let archives = make_archives(t, 1, 24 << 20);
    let archive = archives[0].to_str().expect("utf8").to_owned();
    let k = Kiln::new(t.join("victim"));
    // Calibrate on this machine: kill points are spread over the time one full
    // load takes here, so they land mid-load on a fast machine and a slow one.
    let started = std::time::Instant::now();
    k.ok(&["load", "-q", "-i", &archive]);
    let full_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let window_ms = (full_ms * 9 / 10).max(1);
    eprintln!("a full load takes {full_ms} ms; killing within {window_ms} ms");
    k.ok(&["rmi", "img0:v"]);
    k.ok(&["prune", "--force"]);
    let mut rng = Rng::from_clock();
    let mut killed = 0;
    for _ in 0..20 {
        // Collect the blobs of the previous round, so this load copies
        // everything again instead of finding the blobs present (the last
        // round's leftovers stay for the retry below).
        k.ok(&["prune", "--force"]);
        let mut child = k
            .cmd()
            .args(["load", "-q", "-i", &archive])
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(rng.below(window_ms)));
        if child.try_wait().expect("poll").is_none() {
            killed += 1;
        }
        let _ = child.kill(); // SIGKILL
        child.wait().expect("reap");
        // Whatever happened, the store is consistent and usable.
        k.assert_consistent();
        k.ok(&["images"]);
        // Undo a completed load so the next round starts over.
        let _ = k.run(&["rmi", "img0:v"]);
    }
    eprintln!("{killed} of 20 loads were killed while running");
    assert!(
        killed >= 5,
        "most kills should land while the load runs ({killed})"
    );
    let out = k.ok(&["load", "-i", &archive]);
    assert_eq!(out.trim(), "Loaded image: img0:v");
    k.assert_consistent();
    // GC removes what the killed loads left in tmp/.
    k.ok(&["prune", "--force"]);
    assert_eq!(
        fs_err::read_dir(t.join("victim/tmp")).expect("tmp").count(),
        0
    );
    k.assert_consistent();
}

/// A store on a full file system: a clear error, a consistent store, no
/// temp files left.
#[test]
fn full_disk_gives_a_clear_error() {
    if !busybox_ok() || !require(is_root(), "root (mounts a small tmpfs)") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let archives = make_archives(t, 1, 12 << 20);
    let mnt = t.join("small");
    fs_err::create_dir_all(&mnt).expect("mkdir");
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mnt));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let k = Kiln::new(mnt.join("root"));
    let o = k.run(&["load", "-i", archives[0].to_str().expect("utf8")]);
    assert!(!o.status.success(), "a 12 MB layer cannot fit in 6 MB");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no space left"), "{err}");
    assert!(err.contains("hint:"), "{err}");
    k.assert_consistent();
    let images = k.ok(&["images"]);
    assert_eq!(images.lines().count(), 1, "only the header: {images}");
    assert_eq!(
        fs_err::read_dir(mnt.join("root/tmp")).expect("tmp").count(),
        0,
        "temp file removed"
    );
}
