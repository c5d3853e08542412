//! Helpers: run kiln, make a busybox rootfs, compare trees.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../common/mod.rs"]
mod common;

pub use common::{ci, have_tool};

/// Returns false (after printing why) when the test cannot run here; in CI
/// panics instead.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(!ci(), "CI=true but this test needs {what}");
    eprintln!("skipping: needs {what}");
    false
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A store in a temp dir and the kiln binary pointed at it.
pub struct Kiln {
    pub root: PathBuf,
}

impl Kiln {
    pub fn new(root: impl Into<PathBuf>) -> Kiln {
        Kiln { root: root.into() }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root").arg(&self.root);
        c.env_remove("KILN_ROOT");
        c
    }

    /// Runs kiln; returns its output whatever the status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run kiln")
    }

    /// Runs kiln and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "kiln {args:?} failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `kiln system check --verify` must find nothing.
    pub fn assert_consistent(&self) {
        let o = self.run(&["system", "check", "--verify"]);
        assert!(
            o.status.success(),
            "store inconsistent:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

pub fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A busybox rootfs: `/bin/busybox` from busybox-static plus the absolute
/// symlinks `busybox --install -s` makes, and a few files with unusual
/// modes, a hardlink and a relative symlink.
pub fn busybox_rootfs(dir: &Path) {
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "root",
        "var/empty",
    ] {
        fs_err::create_dir_all(dir.join(d)).expect("mkdir");
    }
    fs_err::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy busybox");
    fs_err::set_permissions(
        dir.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let list = run(Command::new("/bin/busybox").arg("--list-full"));
    for applet in list
        .lines()
        .filter(|l| !l.is_empty() && *l != "bin/busybox")
    {
        let link = dir.join(applet);
        if let Some(parent) = link.parent() {
            fs_err::create_dir_all(parent).expect("mkdir");
        }
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link).expect("symlink");
        }
    }
    fs_err::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("write");
    fs_err::write(dir.join("etc/secret"), "s3cr3t\n").expect("write");
    fs_err::set_permissions(
        dir.join("etc/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    fs_err::write(dir.join("usr/bin/hello"), "#!/bin/sh\necho hello\n").expect("write");
    fs_err::set_permissions(
        dir.join("usr/bin/hello"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .expect("chmod");
    fs_err::hard_link(dir.join("etc/passwd"), dir.join("etc/passwd.hard")).expect("hardlink");
    std::os::unix::fs::symlink("../etc/passwd", dir.join("root/passwd-link")).expect("symlink");
    fs_err::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    fs_err::set_permissions(
        dir.join("var/empty"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("chmod");
}

#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, content: Vec<u8> },
    Link { target: PathBuf },
    Other { mode: u32 },
}

/// Every entry under `dir`: type, permission bits, link target, content.
pub fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs_err::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let p = e.path();
            let rel = p.strip_prefix(dir).expect("under").to_owned();
            let md = fs_err::symlink_metadata(&p).expect("stat");
            let mode = md.mode() & 0o7777;
            let node = if md.is_dir() {
                stack.push(p.clone());
                Node::Dir { mode }
            } else if md.file_type().is_symlink() {
                Node::Link {
                    target: fs_err::read_link(&p).expect("readlink"),
                }
            } else if md.is_file() {
                Node::File {
                    mode,
                    content: fs_err::read(&p).expect("read"),
                }
            } else {
                Node::Other { mode }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// Asserts two trees are identical, listing the first differences.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = snapshot_tree(expected);
    let b = snapshot_tree(actual);
    let mut diffs = Vec::new();
    for (k, v) in &a {
        match b.get(k) {
            None => diffs.push(format!("missing: {}", k.display())),
            Some(w) if w != v => {
                diffs.push(format!("differs: {} ({})", k.display(), describe(v, w)))
            }
            Some(_) => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("extra: {}", k.display()));
    }
    assert!(
        diffs.is_empty(),
        "{} differences between {} and {}:\n{}",
        diffs.len(),
        expected.display(),
        actual.display(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        a.len() > 200,
        "the busybox tree has its applet links ({} entries)",
        a.len()
    );
}

fn describe(a: &Node, b: &Node) -> String {
    let short = |n: &Node| match n {
        Node::Dir { mode } => format!("dir {mode:o}"),
        Node::File { mode, content } => format!("file {mode:o} {} bytes", content.len()),
        Node::Link { target } => format!("link -> {}", target.display()),
        Node::Other { mode } => format!("other {mode:o}"),
    };
    format!("{} vs {}", short(a), short(b))
}

/// A small deterministic PRNG (xorshift64*), seeded from the clock.
pub struct Rng(u64);

impl Rng {
    pub fn from_clock() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Writes `len` bytes of incompressible data.
pub fn noise(path: &Path, len: usize, rng: &mut Rng) {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        buf.extend_from_slice(&rng.below(u64::MAX).to_le_bytes());
    }
    buf.truncate(len);
    fs_err::write(path, buf).expect("write noise");
}
