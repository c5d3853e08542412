//! Real clients read kiln's layers: an OCI layout holding one kiln-written, kiln-gzipped layer
//! is unpacked by `umoci` (the tree must be identical) and inspected by `skopeo`.

mod layer_common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use kiln_cache::compress::{Compression, compress};
use kiln_cache::layer::{WriteOptions, write_layer};
use layer_common::{require_root, require_tool, snapshot};
use sha2::Digest as _;

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn put_blob(layout: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    fs_err::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

fn tree(root: &Path) {
    fs_err::create_dir_all(root.join("bin")).unwrap();
    fs_err::create_dir_all(root.join("etc/deep/er")).unwrap();
    fs_err::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    fs_err::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    fs_err::write(root.join("etc/deep/er/conf"), vec![b'c'; 5000]).unwrap();
    fs_err::hard_link(root.join("bin/tool"), root.join("bin/tool-link")).unwrap();
    symlink("../bin/tool", root.join("etc/tool")).unwrap();
    symlink("/bin/tool", root.join("abs")).unwrap();
    fs_err::write(root.join("l".repeat(120)), b"long name").unwrap();
    nix::unistd::chown(
        &root.join("etc/deep/er/conf"),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
}

#[test]
fn umoci_unpacks_a_kiln_layer_identically_and_skopeo_reads_the_layout() {
    let name = "umoci_unpacks_a_kiln_layer_identically_and_skopeo_reads_the_layout";
    if !require_root(name) || !require_tool(name, "umoci") || !require_tool(name, "skopeo") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs_err::create_dir(&src).unwrap();
    tree(&src);

    let mut tar = Vec::new();
    write_layer(&src, &mut tar, &WriteOptions::default()).unwrap();
    let mut gz = Vec::new();
    compress(&tar[..], &mut gz, Compression::Gzip, 2).unwrap();

    let layout = t.path().join("layout");
    fs_err::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs_err::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let layer_digest = put_blob(&layout, &gz);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]},
    })
    .to_string();
    let config_digest = put_blob(&layout, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": Compression::Gzip.oci_layer_media_type(), "digest": layer_digest, "size": gz.len()}],
    })
    .to_string();
    let manifest_digest = put_blob(&layout, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    })
    .to_string();
    fs_err::write(layout.join("index.json"), index).unwrap();

    let bundle = t.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = snapshot(&src);
    let mut got = snapshot(&bundle.join("rootfs"));
    for n in want.values_mut().chain(got.values_mut()) {
        n.xattrs.clear();
    }
    assert_eq!(want, got);

    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:latest", layout.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Layers"][0].as_str(), Some(layer_digest.as_str()));
}
