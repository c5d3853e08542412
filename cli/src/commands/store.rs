//! Store-wide commands: prune, system df, system check.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kiln_cache::{GcOptions, GcReport};

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
    let report = collect(
        &store,
        GcOptions {
            all: args.all,
            keep_bytes: args.keep_storage,
            ..GcOptions::default()
        },
        false,
    )?;
    if !report.images.is_empty() {
        println!("Deleted Images:");
        for id in &report.images {
            println!("deleted: {id}");
        }
        println!();
    }
    println!(
        "Total reclaimed space: {}",
        human_size(report.bytes + report.snapshot_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

/// A GC of the store with `opts`, and what goes with any: the clones made
/// for the next run of each COPY (they hold the inodes of the snapshots
/// they came from; with `keep_clones` only those whose snapshot went), the
/// COPY memos with `all`, and the quick build memos (none holds once the
/// database changed).
pub(crate) fn collect(
    store: &kiln_cache::Store,
    opts: GcOptions,
    keep_clones: bool,
) -> anyhow::Result<GcReport> {
    let report = store.gc(opts)?;
    if report.busy {
        return Ok(report);
    }
    if keep_clones {
        kiln_solver::runner::clear_orphaned_copies(store)
    } else {
        kiln_solver::runner::clear_prepared_copies(store)
    }
    .map_err(|e| anyhow::anyhow!("removing the prepared COPY results of the store: {e}"))?;
    if opts.all {
        kiln_solver::runner::clear_copy_memos(store)
            .map_err(|e| anyhow::anyhow!("removing the COPY memos of the store: {e}"))?;
    }
    super::build_memo::clear_quick(store)
        .map_err(|e| anyhow::anyhow!("removing the quick build memos of the store: {e}"))?;
    Ok(report)
}

/// The build cache a store keeps before a build collects it (BuildKit's
/// default `keepBytes`): `KILN_GC_KEEP_STORAGE` (a size, or `off`), else
/// a tenth of the store's file system, else 2 GB. `None`: off.
fn auto_gc_limit(root: &std::path::Path) -> Option<u64> {
    match std::env::var("KILN_GC_KEEP_STORAGE") {
        Ok(v) if v.eq_ignore_ascii_case("off") => None,
        Ok(v) => match kiln_runtime::parse_bytes(&v) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("warning: KILN_GC_KEEP_STORAGE: {e}; the build cache is not collected");
                None
            }
        },
        Err(_) => Some(
            nix::sys::statvfs::statvfs(root)
                .ok()
                .map(|s| s.blocks().saturating_mul(s.fragment_size()) / 10)
                .filter(|&n| n > 0)
                .unwrap_or(2 << 30),
        ),
    }
}

/// Where the layers' size after the last automatic GC is kept: the next
/// one waits until the store has grown past it (by a tenth of the limit),
/// so that named images bigger than the limit do not make every build
/// collect in vain.
const GC_FLOOR_FILE: &str = "gc-floor";

/// After a build that made layers: when the store's layers exceed the
/// build cache limit ([`auto_gc_limit`]), the least recently used build
/// cache goes, as `kiln prune --keep-storage LIMIT` does, unless another
/// build or load is using the store. Best effort: a failure is reported,
/// never fails the build. `quiet`: only a failure is reported.
pub(crate) fn auto_gc(store: &kiln_cache::Store, quiet: bool) {
    let Some(limit) = auto_gc_limit(store.root()) else {
        return;
    };
    let Ok(total) = store.layers_size() else {
        return;
    };
    let floor_path = store.root().join(GC_FLOOR_FILE);
    let floor = fs_err::read_to_string(&floor_path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if total <= limit || total <= floor.saturating_add(limit / 10) {
        return;
    }
    let opts = GcOptions {
        keep_bytes: Some(limit),
        skip_if_busy: true,
        ..GcOptions::default()
    };
    // (The clones of the COPY results that stay are kept for their next
    // run: an edit loop goes on as fast.)
    match collect(store, opts, true) {
        Ok(r) if r.busy => {}
        Ok(r) => {
            let after = store.layers_size().unwrap_or(total);
            if r.cache_records > 0 && !quiet {
                eprintln!(
                    "build cache over {} (KILN_GC_KEEP_STORAGE): pruned {} cache records, {} of layers",
                    human_size(limit),
                    r.cache_records,
                    human_size(total.saturating_sub(after))
                );
            }
            let _ = fs_err::write(&floor_path, after.to_string());
        }
        Err(e) => eprintln!("warning: collecting the build cache failed: {e:#}"),
    }
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
