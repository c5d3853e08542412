//! What the end-to-end test binaries share: CI detection, tool lookup, the
//! workspace root, and the "root and busybox-static, or skip (never in CI)"
//! gate. Each binary uses a part of it.

#![allow(dead_code, reason = "each test binary uses a part of these helpers")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether we are in CI, where a missing prerequisite fails a test.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `name` is on PATH.
pub fn have_tool(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Makes `busybox:local` in the store at `store` (`testdata/make-busybox.sh`
/// with this build's kiln).
pub fn make_busybox(store: &Path) {
    let o = Command::new(workspace().join("testdata/make-busybox.sh"))
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_ROOT", store)
        .output()
        .expect("make-busybox.sh");
    assert!(o.status.success(), "make-busybox.sh: {}", text(&o.stderr));
}

/// Whether `what` (e.g. "the build tests") can run here: root and
/// `/bin/busybox` from busybox-static. Prints a skip reason and returns
/// false, or panics under `CI=true`.
#[expect(clippy::print_stderr, reason = "tests report skips on stderr")]
pub fn root_and_busybox(what: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let busybox = Path::new("/bin/busybox").is_file();
    if root && busybox {
        return true;
    }
    assert!(
        !ci(),
        "CI=true but {what} need root ({root}) and /bin/busybox from busybox-static ({busybox})"
    );
    eprintln!("skipping: needs root and /bin/busybox (busybox-static)");
    false
}
