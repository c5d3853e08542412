//! Context checksum throughput and the stat cache's effect, on s3/s4-shaped
//! trees: cold (no stat cache), first build (cache being filled), no-op
//! rebuild (all cached) and edit-one-file rebuild.
//!
//! `cargo bench -p kiln-solver --bench context_checksum`; sizes from env:
//! `FILES` (default 20000), `BIG_MB` (one big file, default 100),
//! `ROUNDS` (default 3, the median is printed).
#![expect(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_solver::context::{BuildContext, StatCache};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn make_tree(root: &Path, files: usize, big_mb: usize) -> std::io::Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i % 200));
        if i < 200 {
            fs_err::create_dir_all(&dir)?;
        }
        fs_err::write(
            dir.join(format!("f{i}.txt")),
            format!("file {i} {}\n", "x".repeat(i % 700)),
        )?;
    }
    if big_mb > 0 {
        let chunk = vec![0x5au8; 1024 * 1024];
        let mut data = Vec::with_capacity(big_mb * chunk.len());
        for _ in 0..big_mb {
            data.extend_from_slice(&chunk);
        }
        fs_err::write(root.join("big.bin"), data)?;
    }
    // Files changed in the last 2 s are "racy" and never stat-cached:
    // let the new tree age, as a real context has.
    std::thread::sleep(Duration::from_millis(2100));
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = env_num("FILES", 20_000);
    let big_mb = env_num("BIG_MB", 100);
    let rounds = env_num("ROUNDS", 3).max(1);
    let ctx_dir = tempfile::tempdir()?;
    make_tree(ctx_dir.path(), files, big_mb)?;
    let all = vec![".".to_owned()];

    let mut cold = Vec::new();
    let mut fill = Vec::new();
    let mut warm = Vec::new();
    let mut edit = Vec::new();
    let mut stats = None;
    for round in 0..rounds {
        // Cold, no stat cache: every byte read.
        let t = Instant::now();
        let mut c = BuildContext::new(ctx_dir.path(), None);
        let base = c.checksum(&all, &[], false)?;
        cold.push(t.elapsed());

        // First build with a fresh store: read everything, fill the cache.
        let store = tempfile::tempdir()?;
        let t = Instant::now();
        let mut c = BuildContext::new(ctx_dir.path(), None)
            .with_stat_cache(StatCache::open(store.path())?)?;
        c.checksum(&all, &[], false)?;
        c.flush()?;
        fill.push(t.elapsed());

        // No-op rebuild: a new process would open the cache and stat only.
        let t = Instant::now();
        let mut c = BuildContext::new(ctx_dir.path(), None)
            .with_stat_cache(StatCache::open(store.path())?)?;
        let again = c.checksum(&all, &[], false)?;
        c.flush()?;
        warm.push(t.elapsed());
        assert_eq!(again.digest, base.digest);
        stats = Some(c.stats());

        // Edit one file, rebuild.
        let f = ctx_dir.path().join("d007/f7.txt");
        fs_err::write(&f, format!("edited in round {round}\n"))?;
        filetime::set_file_mtime(
            &f,
            filetime::FileTime::from_unix_time(1_600_000_100 + round as i64, 0),
        )?;
        let t = Instant::now();
        let mut c = BuildContext::new(ctx_dir.path(), None)
            .with_stat_cache(StatCache::open(store.path())?)?;
        let edited = c.checksum(&all, &[], false)?;
        c.flush()?;
        edit.push(t.elapsed());
        assert_ne!(edited.digest, base.digest);
        assert_eq!(c.stats().hashed, 1);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("context: {files} files + {big_mb} MB file, median of {rounds}");
    println!("| case | ms |");
    println!("|---|---|");
    println!("| cold, no stat cache | {:.1} |", ms(median(cold)));
    println!(
        "| first build, filling stat cache | {:.1} |",
        ms(median(fill))
    );
    println!("| no-op rebuild (stat cache) | {:.1} |", ms(median(warm)));
    println!("| edit one file (stat cache) | {:.1} |", ms(median(edit)));
    if let Some(s) = stats {
        println!(
            "no-op rebuild: {} hashed, {} from stat cache",
            s.hashed, s.cached
        );
    }
    Ok(())
}
