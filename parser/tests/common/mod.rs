//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::path::PathBuf;

/// `<workspace>/../shared`, or `$KILN_SHARED`.
pub fn shared_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_SHARED") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("shared")
}

pub fn conformance() -> PathBuf {
    shared_dir().join("conformance")
}

/// The case directories (sorted) of a conformance set.
pub fn case_dirs(set: &str) -> Vec<PathBuf> {
    let dir = conformance().join(set);
    let mut out: Vec<PathBuf> = fs_err::read_dir(&dir)
        .unwrap_or_else(|e| panic!("conformance data missing: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// The real-world Dockerfiles (sorted).
pub fn real_world() -> Vec<PathBuf> {
    let dir = conformance().join("real-world");
    let mut out: Vec<PathBuf> = fs_err::read_dir(&dir)
        .unwrap_or_else(|e| panic!("conformance data missing: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "Dockerfile"))
        .collect();
    out.sort();
    out
}

pub fn read(path: &std::path::Path) -> String {
    String::from_utf8(fs_err::read(path).expect("read")).expect("utf-8")
}
