//! Store-wide commands: prune, system df, system check.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kiln_cache::GcOptions;

use super::Global;
use super::format::{human_size, table};

/// `kiln prune`.
#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// Also remove every build cache record (named images are kept; `kiln rmi` removes those).
    #[arg(short, long)]
    all: bool,
    /// Don't ask for confirmation.
    #[arg(short, long)]
    force: bool,
    /// Build cache to keep (e.g. `10GB`, `512MB`): the least recently used
    /// cache records go until the rest fits.
    #[arg(long, value_name = "SIZE", value_parser = parse_keep_storage)]
    keep_storage: Option<u64>,
}

/// A `--keep-storage` size, as docker reads it: bytes, or a number with a
/// unit (`k`, `m`, `g`, `t`; `b`, `kb`, `kib` alike: powers of 1024).
fn parse_keep_storage(s: &str) -> Result<u64, String> {
    kiln_runtime::parse_bytes(s).map_err(|e| e.to_string())
}

/// `kiln system ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum SystemCommand {
    /// Show the store's disk usage.
    Df,
    /// Check the store's consistency (names, images, blobs, snapshots).
    Check {
        /// Also re-hash every blob.
        #[arg(long)]
        verify: bool,
    },
    /// Remove what no image name or cache record needs.
    Prune(PruneArgs),
}

pub(crate) fn prune(args: &PruneArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    if !args.force {
        let what = if args.all {
            "unnamed images, all build cache records, unused blobs and snapshots"
        } else {
            "unnamed images, unused blobs and snapshots"
        };
        eprint!("WARNING! This will remove {what}.\nAre you sure you want to continue? [y/N] ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            return Ok(ExitCode::SUCCESS);
        }
    }
    if store.in_use()? {
        eprintln!("waiting for the builds using the store to finish...");
    }
    let report = store.gc(GcOptions {
        all: args.all,
        dry_run: false,
        keep_bytes: args.keep_storage,
    })?;
    // The clones made for the next run of each COPY hold the inodes of
    // the snapshots they came from: they go with any prune.
    kiln_solver::runner::clear_prepared_copies(&store)
        .map_err(|e| anyhow::anyhow!("removing the prepared COPY results of the store: {e}"))?;
    if args.all {
        kiln_solver::runner::clear_copy_memos(&store)
            .map_err(|e| anyhow::anyhow!("removing the COPY memos of the store: {e}"))?;
    }
    // Quick build memos: none holds after a prune (the database changed).
    super::build_memo::clear_quick(&store)
        .map_err(|e| anyhow::anyhow!("removing the quick build memos of the store: {e}"))?;
    if !report.images.is_empty() {
        println!("Deleted Images:");
        for id in &report.images {
            println!("deleted: {id}");
        }
        println!();
    }
    println!("Total reclaimed space: {}", human_size(report.bytes));
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn system(command: SystemCommand, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        SystemCommand::Df => {
            let store = global.store()?;
            let du = store.disk_usage()?;
            let (clones, clones_only) = kiln_solver::runner::prepared_copies_usage(&store);
            let rows = vec![
                ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
                    .map(str::to_owned)
                    .to_vec(),
                vec![
                    "Images".into(),
                    du.images.to_string(),
                    du.images_named.to_string(),
                    human_size(du.images_bytes),
                    String::new(),
                ],
                vec![
                    "Build Cache".into(),
                    du.cache_records.to_string(),
                    du.cache_records.to_string(),
                    String::new(),
                    String::new(),
                ],
                vec![
                    "Blobs".into(),
                    du.blobs.to_string(),
                    String::new(),
                    human_size(du.blobs_bytes),
                    human_size(du.reclaimable_bytes),
                ],
                vec![
                    "Snapshots".into(),
                    du.snapshots.to_string(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
                // Clones of COPY results for their next run: links to
                // snapshot files, but they keep a removed snapshot's files.
                vec![
                    "Copy clones".into(),
                    clones.to_string(),
                    String::new(),
                    String::new(),
                    human_size(clones_only),
                ],
            ];
            print!("{}", table(&rows));
            Ok(ExitCode::SUCCESS)
        }
        SystemCommand::Check { verify } => {
            let store = global.store()?;
            let problems = store.fsck(verify)?;
            for p in &problems {
                println!("{}", p.message);
            }
            if problems.is_empty() {
                println!("store `{}` is consistent", store.root().display());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: {} problems found", problems.len());
                Ok(ExitCode::from(1))
            }
        }
        SystemCommand::Prune(a) => prune(&a, global),
    }
}
