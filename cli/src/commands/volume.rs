//! `kiln volume create|ls|inspect|rm|prune`.

use std::process::ExitCode;

use clap::Subcommand;
use kiln_cache::format_rfc3339;

use super::Global;
use super::format::table;

/// `kiln volume ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCommand {
    /// Create a volume (a random name when none is given).
    Create {
        /// The name.
        name: Option<String>,
    },
    /// List volumes.
    #[command(visible_alias = "list")]
    Ls {
        /// Print only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show volumes as JSON.
    Inspect {
        /// The volumes.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes no container uses.
    #[command(visible_alias = "remove")]
    Rm {
        /// The volumes.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove unused anonymous volumes (`--all`: unused named ones too).
    Prune {
        /// Named volumes too.
        #[arg(short, long)]
        all: bool,
        /// Don't ask (kept for docker compatibility; kiln never asks here).
        #[arg(short, long)]
        force: bool,
    },
}

fn inspect_json(store: &kiln_cache::Store, v: &kiln_cache::VolumeRecord) -> serde_json::Value {
    serde_json::json!({
        "CreatedAt": format_rfc3339(v.created),
        "Driver": "local",
        "Labels": {},
        "Mountpoint": kiln_runtime::volume::data_dir(store, &v.name),
        "Name": v.name,
        "Options": {},
        "Scope": "local",
        "Anonymous": v.anonymous,
    })
}

pub(crate) fn volume(command: VolumeCommand, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let mut failed = false;
    match command {
        VolumeCommand::Create { name } => {
            let name = match name {
                Some(n) => n,
                None => {
                    let mut bytes = [0u8; 32];
                    use std::io::Read;
                    fs_err::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
                    bytes.iter().map(|b| format!("{b:02x}")).collect()
                }
            };
            let v = kiln_runtime::volume::create(&store, &name, false)?;
            println!("{}", v.name);
        }
        VolumeCommand::Ls { quiet } => {
            let list = kiln_runtime::volume::list(&store)?;
            if quiet {
                for v in &list {
                    println!("{}", v.name);
                }
            } else {
                let mut rows = vec![vec!["DRIVER".to_owned(), "VOLUME NAME".to_owned()]];
                rows.extend(
                    list.iter()
                        .map(|v| vec!["local".to_owned(), v.name.clone()]),
                );
                print!("{}", table(&rows));
            }
        }
        VolumeCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in &names {
                match store.volume(n) {
                    Ok(v) => out.push(inspect_json(&store, &v)),
                    Err(e) => {
                        eprintln!("kiln: error: {e:#}");
                        failed = true;
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        VolumeCommand::Rm { names } => {
            for n in &names {
                match kiln_runtime::volume::remove(&store, n) {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("kiln: error: {e:#}");
                        failed = true;
                    }
                }
            }
        }
        VolumeCommand::Prune { all, force: _ } => {
            let removed = kiln_runtime::volume::prune(&store, all)?;
            if !removed.is_empty() {
                println!("Deleted Volumes:");
                for n in &removed {
                    println!("{n}");
                }
                println!();
            }
            println!("Total reclaimed volumes: {}", removed.len());
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
