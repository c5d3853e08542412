//! Bridge networks: `kiln network create|ls|inspect|rm`, and attaching a container's
//! network namespace to one (`kiln run --network NAME -p ...`).
//!
//! A network is a Linux bridge with an address (the gateway) on a subnet. Attaching a
//! container makes a veth pair whose inner end becomes `eth0` in the container's
//! network namespace, with the next free address of the subnet and a default route
//! via the bridge. Outbound traffic leaves through an iptables MASQUERADE rule.
//!
//! Published ports are iptables DNAT rules, in PREROUTING (traffic from outside) and
//! OUTPUT (traffic from the host itself). kiln has no daemon to run docker's userland
//! proxy, so a connection to `127.0.0.1:HOST` works like docker's
//! `--userland-proxy=false`: the bridge gets `route_localnet=1` (so a packet from
//! 127.0.0.1 may be routed to it), a MASQUERADE rule rewrites the loopback source to
//! the bridge address, and an INPUT rule drops new connections from the bridge to
//! 127.0.0.0/8, which `route_localnet` would otherwise let containers make.
//!
//! A container reaching a published port through a host address (hairpin) is
//! masqueraded too, so the answer comes back through the host.
//!
//! How `kiln run` uses it: [`prepare`] before building the sandbox (it makes the
//! default network on first use and returns the hosts file to bind-mount on
//! `/etc/hosts`), the sandbox in a new network namespace, [`attach`] with the pid
//! of the container's PID 1 while the payload is held (or a [`NetnsHolder`]'s pid),
//! and [`detach`] when the container ends or is removed.
//!
//! Names: every container on a network bind-mounts the network's hosts file as
//! `/etc/hosts`; it lists each container's address with its name, aliases and short
//! id, and is rewritten in place on every attach and detach.
//!
//! State: one JSON file per network under `$KILN_ROOT/networks/`, replaced atomically.
//! Every change happens under one host-wide lock (the bridges, addresses and rules are
//! host-wide, shared by every store), and the state records an endpoint before its
//! veth and rules exist, so that a crash leaves something `detach` or `rm` cleans up.
//! An endpoint whose network namespace is gone (its container died without a detach)
//! is cleaned up the next time the network changes.

mod host;
mod hosts;
mod ipam;
mod netns;
mod port;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use host::Rule;
pub use ipam::{Subnet, SubnetError};
pub use netns::NetnsHolder;
pub use port::{PortSpec, PortSpecError, Proto};

/// The default network (`--network bridge`, or no `--network`): made on first use.
pub const DEFAULT_NETWORK: &str = "bridge";

/// Networks every store has: `bridge`, `host` (the host's namespace) and `none`
/// (only `lo`). They cannot be created or removed.
pub const PREDEFINED: [&str; 3] = ["bridge", "host", "none"];

/// Where a container ended up on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The container's address (on its `eth0`).
    pub ip: Ipv4Addr,
    /// The network's hosts file: bind-mount it as the container's `/etc/hosts`
    /// (read-only is best: it is shared by every container on the network).
    pub hosts_file: PathBuf,
    /// A `resolv.conf` to bind-mount, if the network has its own; `None` means the
    /// sandbox's usual one (the host's servers minus loopback ones) is right.
    pub resolv_conf: Option<PathBuf>,
    /// The published ports, with every host port chosen (no 0 left).
    pub ports: Vec<PortSpec>,
}

/// Options of `kiln network create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The subnet; by default a free /24 of 10.89.0.0/16.
    pub subnet: Option<Subnet>,
    /// The bridge's address; by default the subnet's first address.
    pub gateway: Option<Ipv4Addr>,
}

/// A network as `ls` and `inspect` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInfo {
    /// The name.
    pub name: String,
    /// The id (64 hex digits).
    pub id: String,
    /// When it was made (RFC 3339), empty for a predefined network not made yet.
    pub created: String,
    /// `bridge`, `host` or `null`, as docker names the drivers.
    pub driver: String,
    /// The subnet (bridge networks).
    pub subnet: Option<Subnet>,
    /// The bridge's address (bridge networks).
    pub gateway: Option<Ipv4Addr>,
    /// The Linux bridge's name (bridge networks).
    pub bridge: Option<String>,
    /// The containers attached.
    pub containers: Vec<EndpointInfo>,
}

/// One container on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointInfo {
    /// The container's id.
    pub container_id: String,
    /// The container's name.
    pub name: String,
    /// Its `--network-alias` names.
    pub aliases: Vec<String>,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The host end of its veth pair.
    pub veth: String,
    /// Its published ports.
    pub ports: Vec<PortSpec>,
}

/// What can go wrong with a network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No network of that name or id.
    #[error("network {0} not found")]
    NotFound(String),
    /// A network of that name exists.
    #[error("network with name {0} already exists")]
    Exists(String),
    /// An id prefix matches more than one network.
    #[error("network id prefix `{0}` is ambiguous")]
    Ambiguous(String),
    /// `bridge`, `host` and `none` cannot be made or removed.
    #[error("{0} is a pre-defined network and cannot be {1}")]
    Predefined(String, &'static str),
    /// Containers can only be attached to bridge networks.
    #[error("network {0} is not a bridge network: a container cannot be attached to it")]
    NotBridge(String),
    /// The network has containers attached.
    #[error("network {name} id {id} has active endpoints ({})", containers.join(", "))]
    InUse {
        /// The network's name.
        name: String,
        /// The network's id.
        id: String,
        /// The names of the containers on it.
        containers: Vec<String>,
    },
    /// A network name docker would refuse.
    #[error(
        "invalid network name `{0}`: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, up to 64 characters"
    )]
    InvalidName(String),
    /// A container id that cannot be used.
    #[error("invalid container id `{0}`")]
    InvalidContainerId(String),
    /// A container name or alias that cannot be a host name.
    #[error("invalid container name or network alias `{0}`: it must be a host name")]
    InvalidHostName(String),
    /// A subnet that does not parse.
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    /// The subnet overlaps another network or a host route.
    #[error("subnet {subnet} overlaps {other}")]
    SubnetOverlap {
        /// The subnet asked for.
        subnet: Subnet,
        /// What it overlaps.
        other: String,
    },
    /// Every candidate subnet is taken.
    #[error("no free subnet left for network {0}: give one with --subnet")]
    NoFreeSubnet(String),
    /// The gateway is not a host address of the subnet.
    #[error("gateway {gateway} is not a host address of subnet {subnet}")]
    BadGateway {
        /// The gateway asked for.
        gateway: Ipv4Addr,
        /// The subnet.
        subnet: Subnet,
    },
    /// The subnet has no address left.
    #[error("network {name}: no free address left in {subnet}")]
    AddressesExhausted {
        /// The network's name.
        name: String,
        /// Its subnet.
        subnet: Subnet,
    },
    /// A host port is published already, or a host process listens on it.
    #[error("cannot publish {port}: {reason}")]
    PortInUse {
        /// The port asked for.
        port: PortSpec,
        /// Who has it.
        reason: String,
    },
    /// The process whose network namespace was to be attached is gone.
    #[error("process {0} has no network namespace (has it exited?)")]
    NoNetns(u32),
    /// Bridges, veths and iptables rules need root.
    #[error("bridge networks need root (rootless networking is not supported)")]
    NotRoot,
    /// The process shares kiln's own network namespace.
    #[error("process {0} is in kiln's own network namespace, not a container's")]
    SharedNetns(u32),
    /// A tool (`ip`, `iptables`, `nsenter`) could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A network's state file does not parse.
    #[error("cannot read the network state `{path}`")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A file-system error (the message names the path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, NetworkError>;

/// A network's state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NetworkState {
    pub(crate) name: String,
    pub(crate) id: String,
    /// Seconds since the epoch.
    pub(crate) created: i64,
    pub(crate) subnet: Subnet,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) bridge: String,
    /// The network's own rules (NAT, forwarding), removed with the network.
    pub(crate) rules: Vec<Rule>,
    /// Container id -> endpoint.
    pub(crate) endpoints: BTreeMap<String, Endpoint>,
}

/// One container's attachment, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub(crate) name: String,
    pub(crate) aliases: Vec<String>,
    pub(crate) ip: Ipv4Addr,
    pub(crate) veth: String,
    pub(crate) netns_pid: u32,
    /// The inode of the namespace at attach time: when no process is in a namespace
    /// of that inode any more, the container is gone.
    pub(crate) netns_inode: u64,
    pub(crate) ports: Vec<PortSpec>,
    /// The published-port rules.
    pub(crate) rules: Vec<Rule>,
}

fn networks_dir(store_root: &Path) -> PathBuf {
    store_root.join("networks")
}

fn state_path(store_root: &Path, name: &str) -> PathBuf {
    networks_dir(store_root).join(format!("{name}.json"))
}

/// The hosts file of a network (it exists once a container has been attached).
pub fn hosts_file(store_root: &Path, network: &str) -> PathBuf {
    networks_dir(store_root).join(format!("{network}.hosts"))
}

fn sha256_hex(data: &str) -> String {
    Sha256::digest(data.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn predefined_id(name: &str) -> String {
    sha256_hex(&format!("kiln predefined network {name}"))
}

fn new_id(name: &str) -> String {
    let mut seed = [0u8; 32];
    if let Ok(mut f) = fs_err::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut seed);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    sha256_hex(&format!("{seed:?} {name} {} {now:?}", std::process::id()))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The host-wide lock every change takes: bridges, subnets and rules are shared by
/// every store on the machine. Only root may change networks.
fn lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    if !nix::unistd::geteuid().is_root() {
        return Err(NetworkError::NotRoot);
    }
    let dir = if Path::new("/run/lock").is_dir() {
        "/run/lock"
    } else {
        "/run"
    };
    let file = fs_err::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(dir).join("kiln-network.lock"))?;
    let (file, path) = file.into_parts();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        NetworkError::Io(std::io::Error::other(format!(
            "cannot lock `{}`: {errno}",
            path.display()
        )))
    })
}

fn load(store_root: &Path, name: &str) -> Result<Option<NetworkState>> {
    let path = state_path(store_root, name);
    let text = match fs_err::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| NetworkError::State { path, source })
}

fn load_all(store_root: &Path) -> Result<Vec<NetworkState>> {
    let dir = networks_dir(store_root);
    let entries = match fs_err::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for entry in entries {
        let file_name = entry?.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if let Some(state) = load(store_root, name)? {
            out.push(state);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes the state to a temporary file and renames it over the old one.
fn save(store_root: &Path, state: &NetworkState) -> Result<()> {
    let dir = networks_dir(store_root);
    fs_err::create_dir_all(&dir)?;
    let path = state_path(store_root, &state.name);
    let tmp = dir.join(format!(".{}.json.{}.tmp", state.name, std::process::id()));
    let text = serde_json::to_string_pretty(state).map_err(|source| NetworkError::State {
        path: path.clone(),
        source,
    })?;
    let mut f = fs_err::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs_err::rename(&tmp, &path)?;
    Ok(())
}

/// Finds a network by name, full id or unique id prefix.
fn resolve(store_root: &Path, name_or_id: &str) -> Result<Option<NetworkState>> {
    if valid_name(name_or_id)
        && let Some(state) = load(store_root, name_or_id)?
    {
        return Ok(Some(state));
    }
    let mut found: Vec<NetworkState> = load_all(store_root)?
        .into_iter()
        .filter(|s| !name_or_id.is_empty() && s.id.starts_with(name_or_id))
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(NetworkError::Ambiguous(name_or_id.to_owned())),
    }
}

/// The rules a network needs whatever is attached.
fn network_rules(bridge: &str, subnet: Subnet, tag: &str) -> Vec<Rule> {
    let subnet = subnet.to_string();
    vec![
        // Outbound NAT.
        Rule::new(
            "nat",
            "POSTROUTING",
            false,
            &["-s", &subnet, "!", "-o", bridge, "-j", "MASQUERADE"],
            tag,
        ),
        // Published ports reached from 127.0.0.1: the container must answer the bridge.
        Rule::new(
            "nat",
            "POSTROUTING",
            false,
            &["-s", "127.0.0.0/8", "-o", bridge, "-j", "MASQUERADE"],
            tag,
        ),
        // Hairpin: a container reaching a published port through a host address
        // (the gateway, say) is DNATed back onto the bridge; the answer must come
        // back through the host to be un-NATed, not straight from container to
        // container.
        Rule::new(
            "nat",
            "POSTROUTING",
            false,
            &[
                "-s",
                &subnet,
                "-d",
                &subnet,
                "-o",
                bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "DNAT",
                "-j",
                "MASQUERADE",
            ],
            tag,
        ),
        // Forwarding, when the FORWARD policy is DROP (as docker sets it).
        Rule::new(
            "filter",
            "FORWARD",
            true,
            &["-i", bridge, "-j", "ACCEPT"],
            tag,
        ),
        Rule::new(
            "filter",
            "FORWARD",
            true,
            &[
                "-o",
                bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
            tag,
        ),
        // route_localnet must not open the host's loopback services to containers.
        Rule::new(
            "filter",
            "INPUT",
            true,
            &[
                "-i",
                bridge,
                "-d",
                "127.0.0.0/8",
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "DROP",
            ],
            tag,
        ),
    ]
}

/// The rules that publish one container's ports.
fn port_rules(bridge: &str, ip: Ipv4Addr, ports: &[PortSpec], tag: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    for p in ports {
        let host_ip = p.host_ip.to_string();
        let dst: Vec<&str> = if p.host_ip.is_unspecified() {
            vec!["-m", "addrtype", "--dst-type", "LOCAL"]
        } else {
            vec!["-d", &host_ip]
        };
        let (hport, cport) = (p.host_port.to_string(), p.container_port.to_string());
        let to = format!("{ip}:{cport}");
        let mut dnat = dst.clone();
        dnat.extend([
            "-p",
            p.proto.as_str(),
            "--dport",
            &hport,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]);
        rules.push(Rule::new("nat", "PREROUTING", false, &dnat, tag));
        rules.push(Rule::new("nat", "OUTPUT", false, &dnat, tag));
        let ip = ip.to_string();
        rules.push(Rule::new(
            "filter",
            "FORWARD",
            true,
            &[
                "-d",
                &ip,
                "!",
                "-i",
                bridge,
                "-o",
                bridge,
                "-p",
                p.proto.as_str(),
                "--dport",
                &cport,
                "-j",
                "ACCEPT",
            ],
            tag,
        ));
    }
    rules
}

/// Makes the bridge, its address, its rules and the sysctls (idempotent).
fn setup_bridge(state: &NetworkState) -> Result<()> {
    host::sysctl("net/ipv4/ip_forward", "1")?;
    for rule in &state.rules {
        host::add_rule(rule)?;
    }
    let br = &state.bridge;
    let mut batch = Vec::new();
    if !host::link_exists(br) {
        batch.push(format!("link add {br} type bridge"));
    }
    batch.push(format!(
        "addr replace {}/{} dev {br}",
        state.gateway,
        state.subnet.prefix()
    ));
    batch.push(format!("link set {br} up"));
    host::ip_batch(&batch)?;
    host::sysctl(&format!("net/ipv4/conf/{br}/route_localnet"), "1")
}

/// Removes the bridge and the network's rules (idempotent).
fn teardown_bridge(state: &NetworkState) -> Result<()> {
    for rule in &state.rules {
        host::delete_rule(rule)?;
    }
    host::delete_link(&state.bridge)
}

/// Chooses a subnet that overlaps neither another network of the store nor a route.
fn pick_subnet(name: &str, wanted: Option<Subnet>, others: &[NetworkState]) -> Result<Subnet> {
    let routes = ipam::host_routes();
    let clash = |s: Subnet| -> Option<String> {
        if let Some(o) = others.iter().find(|o| o.subnet.overlaps(s)) {
            return Some(format!("network {} ({})", o.name, o.subnet));
        }
        routes
            .iter()
            .find(|r| r.overlaps(s))
            .map(|r| format!("the host route to {r}"))
    };
    if let Some(s) = wanted {
        return match clash(s) {
            Some(other) => Err(NetworkError::SubnetOverlap { subnet: s, other }),
            None => Ok(s),
        };
    }
    let defaults = (18..=30u8)
        .rev()
        .map(|b| Subnet::new(Ipv4Addr::new(172, b, 0, 0), 16));
    let pool = (0..=255u8).map(|c| Subnet::new(Ipv4Addr::new(10, 89, c, 0), 24));
    let candidates: Vec<_> = if name == DEFAULT_NETWORK {
        defaults.chain(pool).collect()
    } else {
        pool.collect()
    };
    candidates
        .into_iter()
        .flatten()
        .find(|s| clash(*s).is_none())
        .ok_or_else(|| NetworkError::NoFreeSubnet(name.to_owned()))
}

/// Makes a network's state and its bridge; the caller holds the lock.
fn create_locked(store_root: &Path, name: &str, opts: &CreateOptions) -> Result<NetworkState> {
    let others = load_all(store_root)?;
    let subnet = pick_subnet(name, opts.subnet, &others)?;
    let gateway = opts.gateway.unwrap_or_else(|| subnet.first_host());
    if !subnet.is_host(gateway) {
        return Err(NetworkError::BadGateway { gateway, subnet });
    }
    let id = if name == DEFAULT_NETWORK {
        predefined_id(name)
    } else {
        new_id(name)
    };
    let bridge = if name == DEFAULT_NETWORK {
        // kiln0, or the next free kilnN when another store has it.
        (0..1000)
            .map(|n| format!("kiln{n}"))
            .find(|b| !host::link_exists(b) && !others.iter().any(|o| &o.bridge == b))
            .ok_or_else(|| NetworkError::NoFreeSubnet(name.to_owned()))?
    } else {
        format!("kbr-{}", &id[..11])
    };
    let tag = format!("kiln network {name} {bridge}");
    let state = NetworkState {
        name: name.to_owned(),
        rules: network_rules(&bridge, subnet, &tag),
        id,
        created: now_secs(),
        subnet,
        gateway,
        bridge,
        endpoints: BTreeMap::new(),
    };
    // Recorded first, so that `rm` can clean up after a crash in the middle.
    save(store_root, &state)?;
    if let Err(e) = setup_bridge(&state) {
        let _ = teardown_bridge(&state);
        let _ = fs_err::remove_file(state_path(store_root, name));
        return Err(e);
    }
    Ok(state)
}

/// `kiln network create NAME`.
pub fn create(store_root: &Path, name: &str, opts: &CreateOptions) -> Result<NetworkInfo> {
    // (`default` is `kiln run`'s other name for the bridge, as docker's.)
    if PREDEFINED.contains(&name) || name == "default" {
        return Err(NetworkError::Predefined(name.to_owned(), "created"));
    }
    if !valid_name(name) {
        return Err(NetworkError::InvalidName(name.to_owned()));
    }
    let _lock = lock()?;
    if load(store_root, name)?.is_some() {
        return Err(NetworkError::Exists(name.to_owned()));
    }
    let state = create_locked(store_root, name, opts)?;
    Ok(info(&state))
}

fn info(state: &NetworkState) -> NetworkInfo {
    NetworkInfo {
        name: state.name.clone(),
        id: state.id.clone(),
        created: kiln_cache::format_rfc3339(state.created),
        driver: "bridge".to_owned(),
        subnet: Some(state.subnet),
        gateway: Some(state.gateway),
        bridge: Some(state.bridge.clone()),
        // Endpoints of containers that died without a detach are not shown (the next
        // change to the network drops them).
        containers: state
            .endpoints
            .iter()
            .filter(|(_, e)| endpoint_alive(e))
            .map(|(id, e)| EndpointInfo {
                container_id: id.clone(),
                name: e.name.clone(),
                aliases: e.aliases.clone(),
                ip: e.ip,
                prefix: state.subnet.prefix(),
                veth: e.veth.clone(),
                ports: e.ports.clone(),
            })
            .collect(),
    }
}

fn predefined_info(store_root: &Path, name: &str) -> Result<NetworkInfo> {
    if name == DEFAULT_NETWORK
        && let Some(state) = load(store_root, name)?
    {
        return Ok(info(&state));
    }
    Ok(NetworkInfo {
        name: name.to_owned(),
        id: predefined_id(name),
        created: String::new(),
        driver: match name {
            "none" => "null",
            other => other,
        }
        .to_owned(),
        subnet: None,
        gateway: None,
        bridge: None,
        containers: Vec::new(),
    })
}

/// `kiln network ls`: the predefined networks, then the store's, by name.
pub fn list(store_root: &Path) -> Result<Vec<NetworkInfo>> {
    let mut out = PREDEFINED
        .iter()
        .map(|n| predefined_info(store_root, n))
        .collect::<Result<Vec<_>>>()?;
    out.extend(
        load_all(store_root)?
            .iter()
            .filter(|s| !PREDEFINED.contains(&s.name.as_str()))
            .map(info),
    );
    Ok(out)
}

/// `kiln network inspect NAME|ID`.
pub fn inspect(store_root: &Path, name_or_id: &str) -> Result<NetworkInfo> {
    if PREDEFINED.contains(&name_or_id) {
        return predefined_info(store_root, name_or_id);
    }
    if let Some(n) = PREDEFINED
        .iter()
        .find(|n| name_or_id.len() >= 3 && predefined_id(n).starts_with(name_or_id))
    {
        return predefined_info(store_root, n);
    }
    resolve(store_root, name_or_id)?
        .map(|s| info(&s))
        .ok_or_else(|| NetworkError::NotFound(name_or_id.to_owned()))
}

/// `kiln network rm NAME|ID`: refuses a network with containers attached (after
/// dropping endpoints whose container is gone). Returns the removed network's name.
pub fn remove(store_root: &Path, name_or_id: &str) -> Result<String> {
    if PREDEFINED.contains(&name_or_id) {
        return Err(NetworkError::Predefined(name_or_id.to_owned(), "removed"));
    }
    let _lock = lock()?;
    let mut state = resolve(store_root, name_or_id)?
        .ok_or_else(|| NetworkError::NotFound(name_or_id.to_owned()))?;
    if state.name == DEFAULT_NETWORK {
        return Err(NetworkError::Predefined(state.name, "removed"));
    }
    remove_locked(store_root, &mut state)?;
    Ok(state.name)
}

fn remove_locked(store_root: &Path, state: &mut NetworkState) -> Result<()> {
    if drop_stale(state)? {
        save(store_root, state)?;
    }
    if !state.endpoints.is_empty() {
        return Err(NetworkError::InUse {
            name: state.name.clone(),
            id: state.id.clone(),
            containers: state.endpoints.values().map(|e| e.name.clone()).collect(),
        });
    }
    teardown_bridge(state)?;
    let hosts = hosts_file(store_root, &state.name);
    if hosts.exists() {
        fs_err::remove_file(&hosts)?;
    }
    fs_err::remove_file(state_path(store_root, &state.name))?;
    Ok(())
}

/// `kiln network prune`: removes every network (but the predefined ones) that has no
/// container attached; returns their names.
pub fn prune(store_root: &Path) -> Result<Vec<String>> {
    let _lock = lock()?;
    let mut removed = Vec::new();
    for mut state in load_all(store_root)? {
        if state.name == DEFAULT_NETWORK {
            continue;
        }
        match remove_locked(store_root, &mut state) {
            Ok(()) => removed.push(state.name),
            Err(NetworkError::InUse { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Removes every network of the store that has no live container, the default
/// `bridge` network included: what is left on the host when a store goes away.
pub fn teardown_store(store_root: &Path) -> Result<()> {
    let _lock = lock()?;
    let mut first_err = None;
    for mut state in load_all(store_root)? {
        if let Err(e) = remove_locked(store_root, &mut state) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Whether the endpoint's container is still there: its veth exists and a process is
/// in its namespace (the kernel deletes a veth when its namespace goes, but not at
/// once: the namespace's processes are what count).
fn endpoint_alive(e: &Endpoint) -> bool {
    host::link_exists(&e.veth) && host::netns_alive(e.netns_pid, e.netns_inode)
}

/// Removes the endpoints whose container is gone; true if any was.
fn drop_stale(state: &mut NetworkState) -> Result<bool> {
    let stale: Vec<String> = state
        .endpoints
        .iter()
        .filter(|(_, e)| !endpoint_alive(e))
        .map(|(id, _)| id.clone())
        .collect();
    for id in &stale {
        if let Some(e) = state.endpoints.remove(id) {
            remove_endpoint(&e)?;
        }
    }
    Ok(!stale.is_empty())
}

/// Deletes an endpoint's rules and veth (idempotent, fine with a dead namespace).
fn remove_endpoint(e: &Endpoint) -> Result<()> {
    host::delete_rules(&e.rules)?;
    host::delete_link(&e.veth)
}

fn veth_name(network_id: &str, container_id: &str) -> String {
    format!(
        "kv{}",
        &sha256_hex(&format!("{network_id}/{container_id}"))[..12]
    )
}

/// Whether two publications would take the same host port.
fn port_clash(a: &PortSpec, b: &PortSpec) -> bool {
    a.proto == b.proto
        && a.host_port == b.host_port
        && (a.host_ip == b.host_ip || a.host_ip.is_unspecified() || b.host_ip.is_unspecified())
}

/// Whether a host process has the port (binding it fails).
fn host_has_port(p: &PortSpec) -> bool {
    let addr = (p.host_ip, p.host_port);
    match p.proto {
        Proto::Tcp => TcpListener::bind(addr).is_err(),
        Proto::Udp => UdpSocket::bind(addr).is_err(),
    }
}

/// Chooses the free host ports and checks the others against the store's
/// publications and the host's listeners.
fn resolve_ports(publish: &[PortSpec], taken: &[(String, PortSpec)]) -> Result<Vec<PortSpec>> {
    let mut out: Vec<PortSpec> = Vec::new();
    for p in publish {
        let mut p = *p;
        if p.host_port == 0 {
            let mut found = None;
            for _ in 0..64 {
                let port = match p.proto {
                    Proto::Tcp => TcpListener::bind((p.host_ip, 0))
                        .and_then(|l| l.local_addr())
                        .map(|a| a.port()),
                    Proto::Udp => UdpSocket::bind((p.host_ip, 0))
                        .and_then(|s| s.local_addr())
                        .map(|a| a.port()),
                }?;
                let cand = PortSpec {
                    host_port: port,
                    ..p
                };
                if !taken.iter().any(|(_, t)| port_clash(t, &cand))
                    && !out.iter().any(|o| port_clash(o, &cand))
                {
                    found = Some(port);
                    break;
                }
            }
            p.host_port = found.ok_or_else(|| NetworkError::PortInUse {
                port: p,
                reason: "no free host port found".to_owned(),
            })?;
        } else {
            if let Some((who, _)) = taken.iter().find(|(_, t)| port_clash(t, &p)) {
                return Err(NetworkError::PortInUse {
                    port: p,
                    reason: format!("the port is already allocated to {who}"),
                });
            }
            if out.iter().any(|o| port_clash(o, &p)) {
                return Err(NetworkError::PortInUse {
                    port: p,
                    reason: "published twice".to_owned(),
                });
            }
            if host_has_port(&p) {
                return Err(NetworkError::PortInUse {
                    port: p,
                    reason: "address already in use on the host".to_owned(),
                });
            }
        }
        out.push(p);
    }
    Ok(out)
}

/// Gets `network` ready for a container (making the default `bridge` network on
/// first use) and returns its hosts file, which then exists: bind-mount it as the
/// container's `/etc/hosts` when building the sandbox, before [`attach`]. Being the
/// same inode for every container on the network, every container sees the entries
/// of containers that join later.
pub fn prepare(store_root: &Path, network: &str) -> Result<PathBuf> {
    if network == "host" || network == "none" {
        return Err(NetworkError::NotBridge(network.to_owned()));
    }
    let _lock = lock()?;
    let state = match resolve(store_root, network)? {
        Some(s) => s,
        None if network == DEFAULT_NETWORK => {
            create_locked(store_root, DEFAULT_NETWORK, &CreateOptions::default())?
        }
        None => return Err(NetworkError::NotFound(network.to_owned())),
    };
    let hosts = hosts_file(store_root, &state.name);
    if !hosts.exists() {
        hosts::write_in_place(&hosts, &hosts::render(&state))?;
    }
    Ok(hosts)
}

/// Attaches the network namespace of `netns_pid` to `network` (`bridge` is made on
/// first use): a veth pair whose inner end becomes `eth0` with the next free address
/// and a default route via the bridge, the published ports, and the container's
/// `name`, `aliases` and short id in the network's hosts file. Attaching a container
/// that is attached already replaces its old attachment.
pub fn attach(
    store_root: &Path,
    network: &str,
    container_id: &str,
    name: &str,
    aliases: &[String],
    netns_pid: u32,
    publish: &[PortSpec],
) -> Result<Attachment> {
    if network == "host" || network == "none" {
        return Err(NetworkError::NotBridge(network.to_owned()));
    }
    if container_id.is_empty()
        || container_id.len() > 128
        || !container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(NetworkError::InvalidContainerId(container_id.to_owned()));
    }
    if let Some(bad) = std::iter::once(name)
        .chain(aliases.iter().map(String::as_str))
        .find(|n| {
            n.is_empty() || n.len() > 253 || !n.chars().all(|c| c.is_ascii_graphic() && c != '#')
        })
    {
        return Err(NetworkError::InvalidHostName(bad.to_owned()));
    }
    let _lock = lock()?;
    let mut state = match resolve(store_root, network)? {
        Some(s) => s,
        None if network == DEFAULT_NETWORK => {
            create_locked(store_root, DEFAULT_NETWORK, &CreateOptions::default())?
        }
        None => return Err(NetworkError::NotFound(network.to_owned())),
    };
    if !host::link_exists(&state.bridge) {
        // After a reboot: the state outlives the bridge and its rules.
        setup_bridge(&state)?;
    }
    let mut changed = drop_stale(&mut state)?;
    if let Some(old) = state.endpoints.remove(container_id) {
        remove_endpoint(&old)?;
        changed = true;
    }
    let hosts = hosts_file(store_root, &state.name);
    if changed {
        // Saved now, so that an attach refused below still leaves the state right.
        save(store_root, &state)?;
        hosts::write_in_place(&hosts, &hosts::render(&state))?;
    }
    let netns_inode = host::netns_inode(netns_pid).ok_or(NetworkError::NoNetns(netns_pid))?;
    if Some(netns_inode) == host::netns_inode(std::process::id()) {
        // The veth's inner end would land in our own namespace (the host's), with a
        // default route through the bridge: never.
        return Err(NetworkError::SharedNetns(netns_pid));
    }

    let mut taken: Vec<(String, PortSpec)> = Vec::new();
    for other in load_all(store_root)? {
        let endpoints = if other.name == state.name {
            &state.endpoints
        } else {
            &other.endpoints
        };
        // (Endpoints of this network are live now; another network's dead ones
        // hold no port.)
        for e in endpoints
            .values()
            .filter(|e| !e.ports.is_empty() && endpoint_alive(e))
        {
            taken.extend(e.ports.iter().map(|p| (e.name.clone(), *p)));
        }
    }
    let ports = resolve_ports(publish, &taken)?;

    let used: BTreeSet<Ipv4Addr> = state.endpoints.values().map(|e| e.ip).collect();
    let ip = state.subnet.allocate(state.gateway, &used).ok_or_else(|| {
        NetworkError::AddressesExhausted {
            name: state.name.clone(),
            subnet: state.subnet,
        }
    })?;
    let veth = veth_name(&state.id, container_id);
    let tag = format!(
        "kiln network {} container {}",
        state.name,
        container_id.get(..12).unwrap_or(container_id)
    );
    let endpoint = Endpoint {
        name: name.to_owned(),
        aliases: aliases.to_vec(),
        ip,
        rules: port_rules(&state.bridge, ip, &ports, &tag),
        veth: veth.clone(),
        netns_pid,
        netns_inode,
        ports: ports.clone(),
    };
    state
        .endpoints
        .insert(container_id.to_owned(), endpoint.clone());
    // Recorded before anything exists on the host, so a crash leaves it to clean up.
    save(store_root, &state)?;

    let plumb = || -> Result<()> {
        host::delete_link(&veth)?;
        host::ip_batch(&[
            format!("link add {veth} type veth peer name eth0 netns {netns_pid}"),
            format!("link set {veth} master {} up", state.bridge),
        ])?;
        host::ip_batch_in(
            netns_pid,
            &[
                "link set lo up".to_owned(),
                format!("addr add {ip}/{} dev eth0", state.subnet.prefix()),
                "link set eth0 up".to_owned(),
                format!("route add default via {}", state.gateway),
            ],
        )?;
        // Fresh: a crash after adding them left a record whose rules were deleted above.
        host::add_fresh_rules(&endpoint.rules)
    };
    let done = plumb().and_then(|()| hosts::write_in_place(&hosts, &hosts::render(&state)));
    if let Err(e) = done {
        let _ = remove_endpoint(&endpoint);
        state.endpoints.remove(container_id);
        let _ = save(store_root, &state);
        let _ = hosts::write_in_place(&hosts, &hosts::render(&state));
        return Err(e);
    }
    Ok(Attachment {
        ip,
        hosts_file: hosts,
        resolv_conf: None,
        ports,
    })
}

/// Detaches a container from a network: its veth, its port rules, its hosts entries
/// and its address go. Idempotent; fine when the namespace is gone already.
pub fn detach(store_root: &Path, network: &str, container_id: &str) -> Result<()> {
    if network == "host" || network == "none" {
        return Ok(());
    }
    let _lock = lock()?;
    let Some(mut state) = resolve(store_root, network)? else {
        return Ok(());
    };
    match state.endpoints.remove(container_id) {
        Some(e) => remove_endpoint(&e)?,
        // A crash between making the veth and recording it cannot happen (the record
        // comes first), but a veth by this name must not survive a detach anyway.
        None => host::delete_link(&veth_name(&state.id, container_id))?,
    }
    drop_stale(&mut state)?;
    save(store_root, &state)?;
    let hosts = hosts_file(store_root, &state.name);
    if hosts.exists() {
        hosts::write_in_place(&hosts, &hosts::render(&state))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NetworkState {
        let subnet: Subnet = "10.89.7.0/24".parse().expect("subnet");
        NetworkState {
            name: "n".into(),
            id: "f".repeat(64),
            created: 0,
            subnet,
            gateway: subnet.first_host(),
            bridge: "kbr-fffffffffff".into(),
            rules: network_rules("kbr-fffffffffff", subnet, "t"),
            endpoints: BTreeMap::new(),
        }
    }

    fn endpoint(ip: u8, name: &str, aliases: &[&str]) -> Endpoint {
        Endpoint {
            name: name.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            ip: Ipv4Addr::new(10, 89, 7, ip),
            veth: "kv".into(),
            netns_pid: 1,
            netns_inode: 1,
            ports: Vec::new(),
            rules: Vec::new(),
        }
    }

    #[test]
    fn hosts_file_lists_names_aliases_and_short_ids_by_address() {
        let mut s = state();
        s.endpoints
            .insert("b".repeat(64), endpoint(3, "db", &["pg", "db"]));
        s.endpoints.insert("a".repeat(64), endpoint(2, "web", &[]));
        let text = hosts::render(&s);
        let web = text.find("10.89.7.2\tweb aaaaaaaaaaaa\n").expect(&text);
        let db = text.find("10.89.7.3\tdb pg bbbbbbbbbbbb\n").expect(&text);
        assert!(web < db, "{text}");
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"), "{text}");
    }

    #[test]
    fn hosts_file_is_rewritten_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        hosts::write_in_place(&path, "a long first version\n").expect("write");
        let ino = std::os::unix::fs::MetadataExt::ino(&fs_err::metadata(&path).expect("stat"));
        hosts::write_in_place(&path, "short\n").expect("rewrite");
        assert_eq!(fs_err::read_to_string(&path).expect("read"), "short\n");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs_err::metadata(&path).expect("stat")),
            ino
        );
    }

    #[test]
    fn ports_clash_on_the_same_proto_port_and_overlapping_address() {
        let p = |s: &str| s.parse::<PortSpec>().expect("spec");
        assert!(port_clash(&p("8080:80"), &p("127.0.0.1:8080:81")));
        assert!(!port_clash(&p("8080:80"), &p("8080:80/udp")));
        assert!(!port_clash(
            &p("127.0.0.1:8080:80"),
            &p("127.0.0.2:8080:80")
        ));
        let taken = vec![("web".to_owned(), p("127.0.0.1:18080:80"))];
        let err = resolve_ports(&[p("18080:80")], &taken).expect_err("taken");
        assert!(err.to_string().contains("web"), "{err}");
        let err = resolve_ports(&[p("127.0.0.1:18081:80"), p("18081:81")], &[]).expect_err("twice");
        assert!(err.to_string().contains("twice"), "{err}");
        let chosen =
            resolve_ports(&[p("127.0.0.1::80"), p("127.0.0.1::80/udp")], &[]).expect("free ports");
        assert!(chosen.iter().all(|c| c.host_port != 0), "{chosen:?}");
    }

    #[test]
    fn names_ids_and_rules() {
        assert!(valid_name("my-net_1.a"));
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        let v = veth_name(&"f".repeat(64), "c1");
        assert!(v.len() <= 15 && v.starts_with("kv"), "{v}");
        assert_ne!(v, veth_name(&"e".repeat(64), "c1"));
        let ip = Ipv4Addr::new(10, 89, 7, 2);
        let rules = port_rules(
            "br0",
            ip,
            &["127.0.0.1:8080:80/udp".parse().expect("spec")],
            "t",
        );
        let dnat = rules
            .iter()
            .find(|r| r.chain == "OUTPUT")
            .expect("OUTPUT rule");
        let line = dnat.args.join(" ");
        assert!(
            line.starts_with(
                "-d 127.0.0.1 -p udp --dport 8080 -j DNAT --to-destination 10.89.7.2:80"
            ),
            "{line}"
        );
        assert_eq!(state().rules.iter().filter(|r| r.table == "nat").count(), 3);
    }
}
