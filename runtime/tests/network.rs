//! Bridge networks for real: network namespaces made by the test (processes started
//! with `unshare -n`) stand for containers; busybox `httpd` serves in one and `wget`
//! fetches by name from another, and from the host through a published port on
//! 127.0.0.1. Afterwards no link, rule or address of the test may be left.
//!
//! Needs root. Without it the tests print why and pass, except under `CI=true`.
//! Every test uses its own store, network name and subnet (from the pid), so they run
//! in parallel with each other and with other test binaries.
#![expect(
    clippy::print_stderr,
    reason = "tests print skip notices and command output on failure"
)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kiln_runtime::network::{self, CreateOptions, NetworkError, PortSpec, Subnet};

fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but this test needs root"
    );
    eprintln!("skipped: needs root (network namespaces, bridges, iptables)");
    false
}

/// A subnet no other test of this run uses: 10.128.0.0/9 split by pid and test.
fn test_subnet(n: u32) -> Subnet {
    let x = (std::process::id() % 4096) * 8 + n;
    let a = u8::try_from(128 + (x >> 8)).expect("fits");
    let b = u8::try_from(x & 0xff).expect("fits");
    Subnet::new(Ipv4Addr::new(10, a, b, 0), 24).expect("valid")
}

/// A process in a fresh network namespace: the "container". Killed on drop.
struct Ns {
    child: Child,
}

impl Ns {
    fn new() -> Ns {
        let child = Command::new("unshare")
            .args(["-n", "--", "/bin/busybox", "sleep", "1000"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare -n");
        let ns = Ns { child };
        // unshare execs the command in place: wait until the namespace differs.
        let own = fs_err::metadata("/proc/self/ns/net")
            .expect("own netns")
            .ino();
        for _ in 0..500 {
            if fs_err::metadata(format!("/proc/{}/ns/net", ns.pid())).is_ok_and(|m| m.ino() != own)
                && fs_err::read_to_string(format!("/proc/{}/comm", ns.pid()))
                    .is_ok_and(|c| c.trim() != "unshare")
            {
                return ns;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the unshare -n process never got its own network namespace");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a command in the namespace; with `hosts`, in a private mount namespace
    /// where that file is bind-mounted on /etc/hosts (as a container has it).
    fn cmd(&self, hosts: Option<&Path>, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.pid()));
        match hosts {
            Some(h) => c.args([
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &format!("mount --bind '{}' /etc/hosts && {script}", h.display()),
            ]),
            None => c.args(["sh", "-c", script]),
        };
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, hosts: Option<&Path>, script: &str) -> Output {
        self.cmd(hosts, script).output().expect("run in netns")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A background process killed on drop (the httpd).
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tears down whatever the test's store still has, even when the test fails. Fields
/// drop in order, so the namespaces go first.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new() -> Store {
        Store {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = network::teardown_store(self.dir.path()) {
            eprintln!("teardown: {e}");
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The host's iptables rules (`-A` lines) that mention any of `markers`.
fn rules_mentioning(markers: &[String]) -> BTreeSet<String> {
    let out = Command::new("iptables-save")
        .output()
        .expect("iptables-save");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A ") && markers.iter().any(|m| l.contains(m.as_str())))
        .map(str::to_owned)
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Retries `f` while the server comes up (no timing is asserted).
fn retry<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let mut last = String::new();
    for _ in 0..100 {
        match f() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: {last}");
}

fn http_get(addr: (Ipv4Addr, u16)) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

fn start_httpd(ns: &Ns, dir: &Path, marker: &str) -> Bg {
    fs_err::write(dir.join("index.html"), format!("{marker}\n")).expect("index.html");
    let child = ns
        .cmd(
            None,
            &format!("exec /bin/busybox httpd -f -p 8080 -h '{}'", dir.display()),
        )
        .spawn()
        .expect("spawn httpd");
    Bg(child)
}

#[test]
fn two_containers_talk_by_name_and_alias_and_a_port_is_published_on_loopback() {
    if !can_run() {
        return;
    }
    let store = Store::new();
    let root = store.root();
    let pid = std::process::id();
    let net = format!("kt{pid}-talk");
    let subnet = test_subnet(0);
    let prefix = subnet.addr().to_string();
    let prefix = prefix.trim_end_matches(".0").to_owned() + ".";
    let info = network::create(
        root,
        &net,
        &CreateOptions {
            subnet: Some(subnet),
            gateway: None,
        },
    )
    .expect("create the network");
    let bridge = info.bridge.clone().expect("a bridge network has a bridge");
    assert!(
        link_exists(&bridge),
        "the bridge {bridge} exists after create"
    );
    let markers = vec![
        bridge.clone(),
        prefix.clone(),
        format!("kiln network {net} "),
    ];
    assert_eq!(
        network::inspect(root, &net).expect("inspect").id,
        info.id,
        "inspect by name"
    );
    assert_eq!(
        network::inspect(root, &info.id[..12])
            .expect("inspect")
            .name,
        net,
        "inspect by id prefix"
    );
    assert!(
        network::list(root)
            .expect("ls")
            .iter()
            .any(|n| n.name == net),
        "ls shows it"
    );

    let mut web = Ns::new();
    let mut client = Ns::new();
    let web_name = format!("web{pid}");
    let alias = format!("www{pid}");
    let web_id = format!("{:0<64}", format!("a{pid}"));
    let client_id = format!("{:0<64}", format!("b{pid}"));
    // One port on 127.0.0.1 only, one on every address (docker's `-p 8080`).
    let publish: Vec<PortSpec> = ["127.0.0.1::8080", "8080"]
        .iter()
        .map(|s| s.parse().expect("port spec"))
        .collect();
    let a = network::attach(
        root,
        &net,
        &web_id,
        &web_name,
        std::slice::from_ref(&alias),
        web.pid(),
        &publish,
    )
    .expect("attach web");
    let b = network::attach(root, &net, &client_id, "client", &[], client.pid(), &[])
        .expect("attach client");
    assert!(subnet.is_host(a.ip) && subnet.is_host(b.ip), "{a:?} {b:?}");
    assert_ne!(a.ip, b.ip);
    assert_eq!(a.hosts_file, b.hosts_file, "one hosts file per network");
    let host_ports: Vec<u16> = a.ports.iter().map(|p| p.host_port).collect();
    assert_eq!(host_ports.len(), 2);
    assert!(
        !host_ports.contains(&0),
        "free host ports were chosen: {host_ports:?}"
    );
    let hosts_inode = fs_err::metadata(&a.hosts_file).expect("hosts").ino();
    let hosts = fs_err::read_to_string(&a.hosts_file).expect("hosts");
    assert!(
        hosts.contains(&format!("{}\t{web_name} {alias}", a.ip)),
        "{hosts}"
    );
    assert!(hosts.contains(&format!("{}\tclient", b.ip)), "{hosts}");
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");

    // Inside: eth0 with the address, a default route via the bridge.
    let out = web.run(None, "ip -4 -o addr show dev eth0; ip route show default");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(&format!("inet {}/24", a.ip)), "{shown}");
    assert!(
        shown.contains(&format!("default via {}", subnet.first_host())),
        "{shown}"
    );

    let www = tempfile::tempdir().expect("tempdir");
    let marker = format!("served-by-web-{pid}");
    let _httpd = start_httpd(&web, www.path(), &marker);

    // By name and by alias, from the other namespace.
    for host in [&web_name, &alias] {
        let body = retry(&format!("wget http://{host}:8080/"), || {
            let out = client.run(
                Some(&a.hosts_file),
                &format!("exec timeout 10 /bin/busybox wget -q -O- http://{host}:8080/"),
            );
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(text(&out))
            }
        });
        assert_eq!(body.trim(), marker, "wget {host}");
    }
    let out = client.run(
        Some(&a.hosts_file),
        &format!("exec /bin/busybox ping -c 1 -W 5 {web_name}"),
    );
    assert!(out.status.success(), "ping by name: {}", text(&out));

    // Hairpin: from the other container, through the gateway and the port
    // published on every address.
    let gateway = info.gateway.expect("gateway");
    let url = format!("http://{gateway}:{}/", host_ports[1]);
    let body = retry(&format!("wget {url}"), || {
        let out = client.run(
            None,
            &format!("exec timeout 10 /bin/busybox wget -q -O- {url}"),
        );
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(text(&out))
        }
    });
    assert_eq!(body.trim(), marker, "hairpin");

    // From the host, on 127.0.0.1 and the published port.
    for &port in &host_ports {
        let body = retry(&format!("GET 127.0.0.1:{port}"), || {
            http_get((Ipv4Addr::LOCALHOST, port))
        });
        assert!(body.contains(&marker), "{body}");
    }
    assert!(
        !rules_mentioning(&markers).is_empty(),
        "the network has rules while in use"
    );

    // rm refuses a network in use; prune leaves it.
    assert_eq!(network::prune(root).expect("prune"), Vec::<String>::new());
    let err = network::remove(root, &net).expect_err("rm of a network in use");
    assert!(matches!(err, NetworkError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("active endpoints"), "{err}");

    let inspected = network::inspect(root, &net).expect("inspect");
    assert_eq!(inspected.containers.len(), 2, "{inspected:?}");
    let web_veth = inspected
        .containers
        .iter()
        .find(|c| c.name == web_name)
        .expect("web endpoint")
        .veth
        .clone();
    let client_veth = inspected
        .containers
        .iter()
        .find(|c| c.name == "client")
        .expect("client endpoint")
        .veth
        .clone();
    assert!(link_exists(&web_veth) && link_exists(&client_veth));

    // Detach is idempotent and rewrites the hosts file in place.
    network::detach(root, &net, &web_id).expect("detach web");
    network::detach(root, &net, &web_id).expect("detach web again");
    assert!(!link_exists(&web_veth), "the veth is gone");
    let hosts = fs_err::read_to_string(&a.hosts_file).expect("hosts");
    assert!(!hosts.contains(&web_name), "{hosts}");
    assert!(hosts.contains("client"), "{hosts}");
    assert_eq!(
        fs_err::metadata(&a.hosts_file).expect("hosts").ino(),
        hosts_inode,
        "the hosts file keeps its inode"
    );
    assert!(
        host_ports
            .iter()
            .all(|&p| http_get((Ipv4Addr::LOCALHOST, p)).is_err()),
        "the port is no longer published"
    );

    // The client dies before its detach: detach copes with the dead namespace.
    client.kill();
    web.kill();
    network::detach(root, &net, &client_id).expect("detach a dead container");
    assert!(!link_exists(&client_veth));

    assert_eq!(network::remove(root, &net).expect("rm"), net);
    assert!(!link_exists(&bridge), "the bridge is gone");
    assert!(
        rules_mentioning(&markers).is_empty(),
        "rules left: {:?}",
        rules_mentioning(&markers)
    );
    assert!(
        !root.join("networks").join(format!("{net}.json")).exists(),
        "the state is gone"
    );
    assert!(matches!(
        network::inspect(root, &net),
        Err(NetworkError::NotFound(_))
    ));
}

#[test]
fn the_default_bridge_network_is_made_on_first_attach() {
    if !can_run() {
        return;
    }
    let store = Store::new();
    let root = store.root();
    let pid = std::process::id();
    let ns = Ns::new();
    let cid = format!("{:0<64}", format!("c{pid}"));
    let before = network::inspect(root, "bridge").expect("inspect bridge");
    assert!(before.subnet.is_none(), "not made before first use");
    let att = network::attach(root, "bridge", &cid, "solo", &[], ns.pid(), &[])
        .expect("attach to the default network");
    let info = network::inspect(root, "bridge").expect("inspect bridge");
    let bridge = info.bridge.clone().expect("bridge");
    let subnet = info.subnet.expect("subnet");
    assert!(bridge.starts_with("kiln"), "{bridge}");
    assert!(subnet.is_host(att.ip), "{subnet} {att:?}");
    assert_eq!(info.containers.len(), 1);
    let masq = rules_mentioning(&[format!("-s {subnet} ! -o {bridge}")]);
    assert_eq!(masq.len(), 1, "outbound NAT: {masq:?}");
    let out = ns.run(
        None,
        &format!(
            "exec /bin/busybox ping -c 1 -W 5 {}",
            info.gateway.expect("gw")
        ),
    );
    assert!(out.status.success(), "ping the gateway: {}", text(&out));

    let err = network::remove(root, "bridge").expect_err("bridge is predefined");
    assert!(err.to_string().contains("pre-defined"), "{err}");
    network::detach(root, "bridge", &cid).expect("detach");
    drop(ns);
    network::teardown_store(root).expect("teardown");
    assert!(!link_exists(&bridge));
    assert!(rules_mentioning(std::slice::from_ref(&bridge)).is_empty());
}

#[test]
fn conflicts_and_bad_requests_are_refused_and_a_dead_container_is_cleaned_up() {
    if !can_run() {
        return;
    }
    let store = Store::new();
    let root = store.root();
    let pid = std::process::id();
    let net = format!("kt{pid}-conf");
    let subnet = test_subnet(1);
    let opts = CreateOptions {
        subnet: Some(subnet),
        gateway: None,
    };
    let info = network::create(root, &net, &opts).expect("create");
    let bridge = info.bridge.clone().expect("bridge");
    assert!(matches!(
        network::create(root, &net, &CreateOptions::default()),
        Err(NetworkError::Exists(_))
    ));
    let err = network::create(root, &format!("{net}-2"), &opts).expect_err("same subnet");
    assert!(matches!(err, NetworkError::SubnetOverlap { .. }), "{err}");
    assert!(matches!(
        network::create(root, "bad/name", &CreateOptions::default()),
        Err(NetworkError::InvalidName(_))
    ));
    assert!(matches!(
        network::create(root, "host", &CreateOptions::default()),
        Err(NetworkError::Predefined(..))
    ));
    let err = network::create(
        root,
        &format!("{net}-gw"),
        &CreateOptions {
            subnet: Some(test_subnet(2)),
            gateway: Some(Ipv4Addr::new(192, 0, 2, 77)),
        },
    )
    .expect_err("gateway outside the subnet");
    assert!(matches!(err, NetworkError::BadGateway { .. }), "{err}");
    assert!(matches!(
        network::attach(root, &format!("{net}-nope"), "x", "x", &[], 1, &[]),
        Err(NetworkError::NotFound(_))
    ));
    assert!(matches!(
        network::attach(root, &net, "a\"b", "x", &[], 1, &[]),
        Err(NetworkError::InvalidContainerId(_))
    ));
    assert!(matches!(
        network::attach(
            root,
            &net,
            "x",
            "x",
            &["a b\n1.2.3.4 evil".to_owned()],
            1,
            &[]
        ),
        Err(NetworkError::InvalidHostName(_))
    ));

    let one = Ns::new();
    let mut two = Ns::new();
    let port: PortSpec = "127.0.0.1::80".parse().expect("spec");
    let a = network::attach(root, &net, "one", "one", &[], one.pid(), &[port]).expect("attach");
    let taken = a.ports[0];
    let err = network::attach(root, &net, "two", "two", &[], two.pid(), &[taken])
        .expect_err("the same host port twice");
    assert!(matches!(err, NetworkError::PortInUse { .. }), "{err}");
    assert!(err.to_string().contains("one"), "names who has it: {err}");
    // The refused attach left nothing behind.
    assert_eq!(
        network::inspect(root, &net)
            .expect("inspect")
            .containers
            .len(),
        1
    );

    // A dead process has no namespace to attach.
    let b = network::attach(root, &net, "two", "two", &[], two.pid(), &[]).expect("attach two");
    assert_ne!(a.ip, b.ip);
    let veth_two = network::inspect(root, &net)
        .expect("inspect")
        .containers
        .iter()
        .find(|c| c.name == "two")
        .expect("two")
        .veth
        .clone();
    two.kill();
    let dead = two.pid();
    let err =
        network::attach(root, &net, "three", "three", &[], dead, &[]).expect_err("a dead pid");
    assert!(matches!(err, NetworkError::NoNetns(_)), "{err}");
    assert!(!link_exists(&veth_two), "the veth died with its namespace");

    // Re-attaching `one` replaces its endpoint (same address: it is freed first).
    let again =
        network::attach(root, &net, "one", "one", &[], one.pid(), &[port]).expect("re-attach");
    assert_eq!(again.ip, a.ip);
    drop(one);
    // Both containers are gone without a detach: rm cleans up after them.
    network::remove(root, &net).expect("rm after the containers died");
    assert!(!link_exists(&bridge));
    let prefix = subnet.addr().to_string();
    let prefix = prefix.trim_end_matches(".0").to_owned() + ".";
    assert!(
        rules_mentioning(&[bridge.clone(), prefix]).is_empty(),
        "rules left"
    );
}

#[test]
fn parallel_attaches_get_distinct_addresses_and_a_failed_attach_leaves_nothing() {
    if !can_run() {
        return;
    }
    let store = Store::new();
    let root = store.root().to_owned();
    let pid = std::process::id();
    let net = format!("kt{pid}-par");
    let subnet = test_subnet(3);
    let info = network::create(
        &root,
        &net,
        &CreateOptions {
            subnet: Some(subnet),
            gateway: None,
        },
    )
    .expect("create");
    let bridge = info.bridge.clone().expect("bridge");
    let namespaces: Vec<Ns> = (0..4).map(|_| Ns::new()).collect();
    let ips: Vec<Ipv4Addr> = std::thread::scope(|scope| {
        let handles: Vec<_> = namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (root, net) = (&root, &net);
                scope.spawn(move || {
                    network::attach(
                        root,
                        net,
                        &format!("p{i}"),
                        &format!("p{i}"),
                        &[],
                        ns.pid(),
                        &[],
                    )
                    .expect("parallel attach")
                    .ip
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let distinct: BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 4, "{ips:?}");
    let hosts = fs_err::read_to_string(network::hosts_file(&root, &net)).expect("hosts");
    for (i, ip) in ips.iter().enumerate() {
        assert!(hosts.contains(&format!("{ip}\tp{i}")), "{hosts}");
    }

    // A namespace that has an eth0 already: the veth cannot be made, and the attach
    // is rolled back (no endpoint, no rule, no veth).
    let busy = Ns::new();
    let out = busy.run(None, "ip link add eth0 type bridge");
    assert!(out.status.success(), "{}", text(&out));
    let port: PortSpec = "127.0.0.1::80".parse().expect("spec");
    let before = rules_mentioning(std::slice::from_ref(&bridge));
    let err = network::attach(&root, &net, "busy", "busy", &[], busy.pid(), &[port])
        .expect_err("eth0 exists");
    assert!(matches!(err, NetworkError::Command { .. }), "{err}");
    assert!(err.to_string().contains("eth0"), "{err}");
    let after = network::inspect(&root, &net).expect("inspect");
    assert_eq!(
        after.containers.len(),
        4,
        "the failed endpoint is not recorded"
    );
    assert_eq!(rules_mentioning(std::slice::from_ref(&bridge)), before);
    let hosts = fs_err::read_to_string(network::hosts_file(&root, &net)).expect("hosts");
    assert!(!hosts.contains("busy"), "{hosts}");

    // kiln's own namespace is refused.
    let err = network::attach(&root, &net, "me", "me", &[], pid, &[]).expect_err("own netns");
    assert!(matches!(err, NetworkError::SharedNetns(_)), "{err}");

    for i in 0..4 {
        network::detach(&root, &net, &format!("p{i}")).expect("detach");
    }
    assert!(
        fs_err::read_to_string(network::hosts_file(&root, &net))
            .expect("hosts")
            .lines()
            .all(|l| !l.contains("\tp")),
        "hosts entries removed"
    );
    network::remove(&root, &net).expect("rm");
    assert!(!link_exists(&bridge));
    assert!(rules_mentioning(std::slice::from_ref(&bridge)).is_empty());
}

#[test]
fn an_attachment_made_through_a_holder_lives_as_long_as_the_container() {
    if !can_run() {
        return;
    }
    let store = Store::new();
    let root = store.root();
    let pid = std::process::id();
    let net = format!("kt{pid}-hold");
    let subnet = test_subnet(4);
    let info = network::create(
        root,
        &net,
        &CreateOptions {
            subnet: Some(subnet),
            gateway: None,
        },
    )
    .expect("create");
    let bridge = info.bridge.clone().expect("bridge");

    // As `kiln run` does it: a holder's namespace is attached, then the container
    // joins it, then the holder goes.
    let holder = network::NetnsHolder::spawn().expect("holder");
    let name = format!("held{pid}");
    let att = network::attach(root, &net, "held", &name, &[], holder.pid(), &[])
        .expect("attach the holder");
    let www = tempfile::tempdir().expect("tempdir");
    let marker = format!("held-{pid}");
    fs_err::write(www.path().join("index.html"), format!("{marker}\n")).expect("index");
    let container = Bg(Command::new("nsenter")
        .arg(format!("--net={}", holder.path().display()))
        .args(["/bin/busybox", "httpd", "-f", "-p", "8080", "-h"])
        .arg(www.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the container"));
    // The container is in the namespace before the holder goes.
    retry("the container joins the namespace", || {
        let theirs = fs_err::metadata(format!("/proc/{}/ns/net", container.0.id()))
            .map_err(|e| e.to_string())?
            .ino();
        let held = fs_err::metadata(holder.path())
            .map_err(|e| e.to_string())?
            .ino();
        if theirs == held {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    });
    drop(holder);

    // Another attach drops stale endpoints: this one is not stale.
    let client = Ns::new();
    network::attach(root, &net, "client", "client", &[], client.pid(), &[]).expect("attach");
    assert_eq!(
        network::inspect(root, &net)
            .expect("inspect")
            .containers
            .len(),
        2,
        "the held endpoint survives its holder"
    );
    let body = retry(&format!("wget http://{name}:8080/"), || {
        let out = client.run(
            Some(&att.hosts_file),
            &format!("exec timeout 10 /bin/busybox wget -q -O- http://{name}:8080/"),
        );
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(text(&out))
        }
    });
    assert_eq!(body.trim(), marker);

    // The container ends: its endpoint is stale, and rm (once the client is gone
    // too) cleans up after both.
    drop(container);
    drop(client);
    assert_eq!(network::prune(root).expect("prune"), vec![net.clone()]);
    assert!(!link_exists(&bridge));
    assert!(rules_mentioning(std::slice::from_ref(&bridge)).is_empty());
}

#[test]
fn a_hosts_file_mounted_before_others_join_shows_them() {
    if !can_run() {
        return;
    }
    let store = Store::new();
    let root = store.root();
    let pid = std::process::id();
    let net = format!("kt{pid}-live");
    network::create(
        root,
        &net,
        &CreateOptions {
            subnet: Some(test_subnet(5)),
            gateway: None,
        },
    )
    .expect("create");
    // As `kiln run` builds the sandbox: the hosts file exists before any attach.
    let hosts = network::prepare(root, &net).expect("prepare");
    assert!(hosts.is_file());
    assert!(matches!(
        network::prepare(root, "none"),
        Err(NetworkError::NotBridge(_))
    ));
    assert!(matches!(
        network::prepare(root, &format!("{net}-nope")),
        Err(NetworkError::NotFound(_))
    ));

    // The first container mounts it, then attaches.
    let first = Ns::new();
    let mounted = Bg(first
        .cmd(
            None,
            &format!(
                "exec unshare -m --propagation private sh -c \"mount --bind '{}' /etc/hosts && exec sleep 1000\"",
                hosts.display()
            ),
        )
        .spawn()
        .expect("spawn"));
    let seen = || {
        fs_err::read_to_string(format!("/proc/{}/root/etc/hosts", mounted.0.id()))
            .unwrap_or_default()
    };
    retry("the hosts file is mounted", || {
        if seen().contains("# kiln network") {
            Ok(())
        } else {
            Err(seen())
        }
    });
    let a = network::attach(root, &net, "first", "first", &[], first.pid(), &[]).expect("attach");
    assert_eq!(a.hosts_file, hosts);

    // A later container joins: the first one sees it through its mount.
    let second = Ns::new();
    let b = network::attach(
        root,
        &net,
        "second",
        "second",
        &["db".to_owned()],
        second.pid(),
        &[],
    )
    .expect("attach");
    let text = seen();
    assert!(text.contains(&format!("{}\tsecond db", b.ip)), "{text}");
    assert!(text.contains(&format!("{}\tfirst", a.ip)), "{text}");
    network::detach(root, &net, "second").expect("detach");
    assert!(!seen().contains("second"), "{}", seen());
}
