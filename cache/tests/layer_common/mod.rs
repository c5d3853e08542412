//! Helpers shared by the layer tests: a full description of a directory tree to compare two
//! trees with, and the root / CI gate.
#![allow(dead_code)]
#![expect(clippy::print_stderr, reason = "tests print their skip messages")]

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Everything kiln promises to carry through a layer, for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds; `None` for symlinks (their times are not compared).
    pub mtime: Option<i64>,
    pub content: Vec<u8>,
    pub link: Vec<u8>,
    pub rdev: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Index of the inode among hardlinked files (first path wins), so links compare equal.
    pub link_group: Option<String>,
}

/// Describe every path under `root` (not `root` itself), keyed by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, Node>,
    inodes: &mut BTreeMap<(u64, u64), String>,
) {
    let mut names: Vec<_> = fs_err::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let md = fs_err::symlink_metadata(&path).expect("lstat");
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&path)
            .map(|names| {
                names
                    .filter(|n| n.as_bytes() != b"security.selinux")
                    .filter_map(|n| {
                        let v = xattr::get(&path, &n).ok().flatten()?;
                        Some((n.to_string_lossy().into_owned(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let link_group = if !ft.is_dir() && md.nlink() > 1 {
            Some(
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| rel.clone())
                    .clone(),
            )
        } else {
            None
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: if ft.is_symlink() {
                    None
                } else {
                    Some(md.mtime())
                },
                content: if ft.is_file() {
                    fs_err::read(&path).expect("read")
                } else {
                    Vec::new()
                },
                link: if ft.is_symlink() {
                    fs_err::read_link(&path)
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                } else {
                    Vec::new()
                },
                rdev: if ft.is_char_device() || ft.is_block_device() {
                    md.rdev()
                } else {
                    0
                },
                xattrs,
                link_group,
            },
        );
        if ft.is_dir() {
            walk(root, &path, out, inodes);
        }
    }
}

/// True when the test may use root-only features. Under `CI=true` a non-root run fails.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs root, and CI=true forbids skipping"
    );
    eprintln!("skipping {test}: needs root");
    false
}

/// True when `tool` is on PATH. Under `CI=true` a missing tool fails the test.
pub fn require_tool(test: &str, tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs `{tool}`, and CI=true forbids skipping"
    );
    eprintln!("skipping {test}: `{tool}` is not installed");
    false
}

/// Names of the entries of an uncompressed tar, in order (via the `tar` crate, an independent
/// reader).
pub fn tar_names(tar: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar);
    a.entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            String::from_utf8_lossy(&e.path_bytes()).into_owned()
        })
        .collect()
}
