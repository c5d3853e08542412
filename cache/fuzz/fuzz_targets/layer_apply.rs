//! Any bytes as a layer tar: `apply_layer` must not panic, and nothing may appear or change
//! outside the destination directory.
#![no_main]

use kiln_cache::layer::{ApplyOptions, Limits, WhiteoutMode, apply_layer};
use libfuzzer_sys::fuzz_target;

fn outside_listing(base: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs_err::read_dir(base)
        .expect("read base")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name() != "root")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs_err::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, tar)) = data.split_first() else {
        return;
    };
    let base = tempfile::tempdir().expect("tempdir");
    let root = base.path().join("root");
    fs_err::create_dir(&root).expect("mkdir root");
    fs_err::write(base.path().join("sentinel"), b"untouched").expect("sentinel");
    let before = outside_listing(base.path());
    let opts = ApplyOptions {
        preserve_ownership: mode & 1 != 0,
        create_devices: false,
        whiteouts: if mode & 2 != 0 {
            WhiteoutMode::Remove
        } else {
            WhiteoutMode::Overlay
        },
        limits: Limits {
            max_total_bytes: 1 << 20,
            max_entries: 1000,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let _ = apply_layer(tar, &root, &opts);
    assert_eq!(
        before,
        outside_listing(base.path()),
        "something outside the root changed"
    );
});
