//! `kiln network create|ls|inspect|rm`: bridge networks, as `docker network` shows them.

use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_runtime::network::{self, CreateOptions, NetworkInfo, Subnet};
use serde_json::{Value, json};

use super::Global;
use super::format::table;

/// `kiln network ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum NetworkCommand {
    /// Create a bridge network.
    Create(CreateArgs),
    /// List networks.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show networks as JSON.
    Inspect {
        /// Networks (names or ids).
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while containers are attached).
    #[command(alias = "remove")]
    Rm {
        /// Networks (names or ids).
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove every network that has no container attached.
    Prune {
        /// Don't ask for confirmation.
        #[arg(short, long)]
        force: bool,
    },
}

/// `kiln network create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The driver: only `bridge`.
    #[arg(short, long, default_value = "bridge")]
    driver: String,
    /// The subnet in CIDR form (default: a free /24 of 10.89.0.0/16).
    #[arg(long, value_name = "CIDR")]
    subnet: Option<Subnet>,
    /// The bridge's address (default: the subnet's first address).
    #[arg(long, value_name = "IP", requires = "subnet")]
    gateway: Option<Ipv4Addr>,
    /// The network's name.
    name: String,
}

/// `kiln network ls`.
#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// Only print ids.
    #[arg(short, long)]
    quiet: bool,
    /// Do not truncate ids.
    #[arg(long)]
    no_trunc: bool,
}

fn root(global: &Global) -> PathBuf {
    global.root.clone().unwrap_or_else(kiln_cache::default_root)
}

/// Docker's `network inspect` shape.
fn inspect_json(n: &NetworkInfo) -> Value {
    let config: Vec<Value> = match (n.subnet, n.gateway) {
        (Some(s), Some(g)) => vec![json!({"Subnet": s.to_string(), "Gateway": g.to_string()})],
        _ => Vec::new(),
    };
    let containers: serde_json::Map<String, Value> = n
        .containers
        .iter()
        .map(|c| {
            (
                c.container_id.clone(),
                json!({
                    "Name": c.name,
                    "Aliases": c.aliases,
                    "IPv4Address": format!("{}/{}", c.ip, c.prefix),
                    "Veth": c.veth,
                    "Ports": c.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    let mut options = serde_json::Map::new();
    if let Some(b) = &n.bridge {
        options.insert("com.docker.network.bridge.name".into(), json!(b));
    }
    json!({
        "Name": n.name,
        "Id": n.id,
        "Created": n.created,
        "Scope": "local",
        "Driver": n.driver,
        "EnableIPv6": false,
        "IPAM": {"Driver": "default", "Config": config},
        "Internal": false,
        "Containers": containers,
        "Options": options,
    })
}

pub(crate) fn network(command: NetworkCommand, global: &Global) -> anyhow::Result<ExitCode> {
    let root = root(global);
    match command {
        NetworkCommand::Create(a) => {
            anyhow::ensure!(
                a.driver == "bridge",
                "network driver `{}` is not supported (only bridge)",
                a.driver
            );
            let opts = CreateOptions {
                subnet: a.subnet,
                gateway: a.gateway,
            };
            let info = network::create(&root, &a.name, &opts)
                .with_context(|| format!("cannot create network {}", a.name))?;
            println!("{}", info.id);
        }
        NetworkCommand::Ls(a) => {
            let nets = network::list(&root)?;
            let id = |n: &NetworkInfo| {
                if a.no_trunc {
                    n.id.clone()
                } else {
                    n.id.chars().take(12).collect()
                }
            };
            if a.quiet {
                for n in &nets {
                    println!("{}", id(n));
                }
            } else {
                let mut rows = vec![
                    ["NETWORK ID", "NAME", "DRIVER", "SCOPE"]
                        .map(str::to_owned)
                        .to_vec(),
                ];
                rows.extend(
                    nets.iter()
                        .map(|n| vec![id(n), n.name.clone(), n.driver.clone(), "local".into()]),
                );
                print!("{}", table(&rows));
            }
        }
        NetworkCommand::Inspect { networks } => {
            let mut out = Vec::new();
            let mut failed = None;
            for name in &networks {
                match network::inspect(&root, name) {
                    Ok(n) => out.push(inspect_json(&n)),
                    Err(e) => failed = Some(e),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        NetworkCommand::Rm { networks } => {
            let mut failed = false;
            for name in &networks {
                match network::remove(&root, name) {
                    Ok(_) => println!("{name}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
        NetworkCommand::Prune { force } => {
            if !force {
                eprint!(
                    "WARNING! This will remove all custom networks not used by at least one container.\n\
                     Are you sure you want to continue? [y/N] "
                );
                std::io::stderr().flush()?;
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if !matches!(line.trim(), "y" | "Y" | "yes") {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let removed = network::prune(&root)?;
            if !removed.is_empty() {
                println!("Deleted Networks:");
                for name in removed {
                    println!("{name}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::Cli;

    #[test]
    fn parses_docker_network_flags() {
        let ok = |args: &[&str]| {
            let mut v = vec!["kiln", "network"];
            v.extend(args);
            Cli::try_parse_from(v).is_ok()
        };
        assert!(ok(&[
            "create",
            "--subnet",
            "10.89.1.0/24",
            "--gateway",
            "10.89.1.254",
            "n"
        ]));
        assert!(ok(&["create", "-d", "bridge", "n"]));
        assert!(
            !ok(&["create", "--subnet", "10.89.1.1/24", "n"]),
            "host bits set"
        );
        assert!(
            !ok(&["create", "--gateway", "10.89.1.1", "n"]),
            "gateway needs subnet"
        );
        assert!(ok(&["ls", "-q", "--no-trunc"]));
        assert!(ok(&["inspect", "a", "b"]));
        assert!(!ok(&["inspect"]));
        assert!(ok(&["rm", "a", "b"]));
        assert!(ok(&["prune", "-f"]));
    }
}
