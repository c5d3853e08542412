//! Archive layouts other tools write: docker < 25 (`<id>/layer.tar`, a
//! symlink for a shared layer), and an OCI multi-platform index.

use std::io::Write;

use kiln_cache::{Digest, Store, archive};
use serde_json::json;

fn layer(name: &str, body: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, body).expect("append");
    b.into_inner().expect("tar")
}

fn config(diff_ids: &[&Digest], arch: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(ToString::to_string).collect::<Vec<_>>()},
    }))
    .expect("json")
}

fn add(b: &mut tar::Builder<impl Write>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).expect("append");
}

#[test]
fn old_docker_archive_with_a_symlinked_shared_layer_loads() {
    let t = tempfile::tempdir().expect("tmp");
    let base = layer("base.txt", b"base");
    let top = layer("top.txt", b"top");
    let (db, dt) = (Digest::of_bytes(&base), Digest::of_bytes(&top));
    let c1 = config(&[&db], "amd64");
    let c2 = config(&[&db, &dt], "amd64");
    let (h1, h2) = (Digest::of_bytes(&c1), Digest::of_bytes(&c2));
    let path = t.path().join("old.tar");
    let mut b = tar::Builder::new(fs_err::File::create(&path).expect("create"));
    add(&mut b, &format!("{}.json", h1.hex()), &c1);
    add(&mut b, &format!("{}.json", h2.hex()), &c2);
    add(&mut b, "aaaa/layer.tar", &base);
    add(&mut b, "cccc/layer.tar", &top);
    // docker < 25 writes a shared layer once and links the second copy;
    // the first image reads its layer through the link.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "bbbb/layer.tar", "../aaaa/layer.tar")
        .expect("symlink");
    let manifest = json!([
        {"Config": format!("{}.json", h1.hex()), "RepoTags": ["old/one:1"], "Layers": ["bbbb/layer.tar"]},
        {"Config": format!("{}.json", h2.hex()), "RepoTags": ["old/two:1", "old/two:latest"], "Layers": ["aaaa/layer.tar", "cccc/layer.tar"]},
    ]);
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    add(&mut b, "repositories", b"{}");
    b.into_inner().expect("finish").flush().expect("flush");

    let store = Store::open(t.path().join("root")).expect("open");
    let loaded = archive::load(&store, &path).expect("load");
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0].id, h1);
    assert_eq!(loaded[1].names.len(), 2);
    let two = store.resolve("old/two").expect("resolve");
    assert_eq!(
        two.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
        vec![db, dt]
    );
    assert!(store.fsck(true).expect("fsck").is_empty());
}

#[test]
fn oci_index_picks_this_hosts_platform() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("layout");
    let blobs = dir.join("blobs/sha256");
    fs_err::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| {
        let d = Digest::of_bytes(data);
        fs_err::write(blobs.join(d.hex()), data).expect("blob");
        d
    };
    let host = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let mut manifests = Vec::new();
    let mut host_config = None;
    for arch in ["s390x", host, "riscv64"] {
        let l = layer("arch", arch.as_bytes());
        let ld = put(&l);
        let c = config(&[&ld], arch);
        let cd = put(&c);
        if arch == host {
            host_config = Some(cd.clone());
        }
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": c.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": l.len()}],
        }))
        .expect("json");
        let md = put(&m);
        manifests.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(),
            "size": m.len(), "platform": {"architecture": arch, "os": "linux"}}));
    }
    let nested = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}))
        .expect("json");
    let nd = put(&nested);
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": nd.to_string(), "size": nested.len(),
        "annotations": {"io.containerd.image.name": "docker.io/library/multi:1"}}]});
    fs_err::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index");
    fs_err::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");

    let store = Store::open(t.path().join("root")).expect("open");
    let loaded = archive::load(&store, &dir).expect("load");
    assert_eq!(loaded.len(), 1);
    assert_eq!(Some(loaded[0].id.clone()), host_config);
    assert_eq!(
        store
            .resolve("multi:1")
            .expect("name")
            .config
            .architecture()
            .to_string(),
        host
    );
}
