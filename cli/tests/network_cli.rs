//! `kiln network create|ls|inspect|rm|prune` through the real binary, as root, in a
//! temp store. (The data path, namespaces talking over a network, is tested in
//! `runtime/tests/network.rs`.)
#![expect(clippy::print_stderr, reason = "tests print skip notices")]

use std::process::{Command, Output};

struct Store(tempfile::TempDir);

impl Drop for Store {
    fn drop(&mut self) {
        // Whatever a failed test left: bridges and rules are host-wide.
        if let Err(e) = kiln_runtime::network::teardown_store(self.0.path()) {
            eprintln!("teardown: {e}");
        }
    }
}

fn kiln(store: &Store, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(store.0.path())
        .args(args)
        .env_remove("KILN_ROOT")
        .output()
        .expect("run kiln")
}

fn show(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn network_commands_create_list_inspect_and_remove() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but this test needs root"
        );
        eprintln!("skipped: needs root (bridges, iptables)");
        return;
    }
    let store = Store(tempfile::tempdir().expect("tempdir"));
    let pid = std::process::id();
    let name = format!("kc{pid}");
    // 10.64.0.0/10 by pid: apart from the runtime tests' 10.128.0.0/9.
    let subnet = format!("10.{}.{}.0/24", 64 + (pid >> 8) % 64, pid & 0xff);

    let o = kiln(&store, &["network", "create", "--subnet", &subnet, &name]);
    assert!(o.status.success(), "{}", show(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(id.len(), 64, "create prints the id: {id}");

    let o = kiln(&store, &["network", "create", &name]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        show(&o)
    );

    let o = kiln(&store, &["network", "ls"]);
    let ls = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", show(&o));
    assert!(ls.starts_with("NETWORK ID"), "{ls}");
    for n in ["bridge", "host", "none", name.as_str()] {
        assert!(
            ls.lines().any(|l| l.contains(&format!(" {n} "))),
            "{n}: {ls}"
        );
    }
    assert!(ls.contains(&id[..12]), "{ls}");
    let o = kiln(&store, &["network", "ls", "-q", "--no-trunc"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).lines().any(|l| l == id),
        "{}",
        show(&o)
    );

    let o = kiln(&store, &["network", "inspect", &id[..12]]);
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect JSON");
    assert_eq!(v[0]["Name"], name.as_str());
    assert_eq!(v[0]["Driver"], "bridge");
    assert_eq!(v[0]["IPAM"]["Config"][0]["Subnet"], subnet.as_str());
    let bridge = v[0]["Options"]["com.docker.network.bridge.name"]
        .as_str()
        .expect("bridge name")
        .to_owned();
    assert!(
        std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "{bridge} exists"
    );

    let o = kiln(&store, &["network", "inspect", "nope-nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));

    let o = kiln(&store, &["network", "rm", "bridge"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pre-defined"));

    let o = kiln(&store, &["network", "rm", &name]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), name);
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists()
    );

    // prune removes unused networks only.
    let o = kiln(&store, &["network", "create", "--subnet", &subnet, &name]);
    assert!(o.status.success(), "{}", show(&o));
    let o = kiln(&store, &["network", "prune", "-f"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("Deleted Networks:\n{name}\n")
    );
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists()
    );
}
