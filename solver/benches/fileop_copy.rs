//! s4-shaped COPY benchmark: `COPY . /ctx` of many small files plus one big
//! file through `kiln_solver::fileop::copy`, side by side with `cp -a` of
//! the same tree in the same run. Prints medians and kiln's peak RSS.
//!
//! `cargo bench -p kiln-solver --bench fileop_copy`; scale with
//! `KILN_BENCH_FILES` (default 20000) and `KILN_BENCH_BIG_MB` (default 500),
//! and put the trees elsewhere with `KILN_BENCH_DIR` (default: the temp dir).
#![expect(clippy::print_stdout, reason = "a benchmark's report")]

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_solver::fileop::{self, CopyOp};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn max_rss_kb() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss())
        .unwrap_or(-1)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = env_num("KILN_BENCH_FILES", 20_000);
    let big_mb = env_num("KILN_BENCH_BIG_MB", 500);
    let base = std::env::var_os("KILN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("kiln-fileop-bench-")
        .tempdir_in(base)?;
    let ctx = tmp.path().join("ctx");
    fs_err::create_dir(&ctx)?;
    for i in 0..files {
        let dir = ctx.join(format!("d{:03}", i % 200));
        if i < 200 {
            fs_err::create_dir(&dir)?;
        }
        let body = format!("file {i} {}\n", "x".repeat((i % 97) as usize * 20));
        fs_err::write(dir.join(format!("f{i}.txt")), body)?;
    }
    let mut big = fs_err::File::create(ctx.join("big.bin"))?;
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    for _ in 0..big_mb {
        big.write_all(&chunk)?;
    }
    big.sync_all()?;
    drop(big);
    println!("tree: {files} small files + {big_mb} MB file");

    let rss_before = max_rss_kb();
    let (mut kiln, mut cp) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let out = tmp.path().join(format!("cp{round}"));
        let t = Instant::now();
        let st = Command::new("cp").arg("-a").arg(&ctx).arg(&out).status()?;
        assert!(st.success(), "cp -a failed");
        cp.push(t.elapsed());

        let root = tmp.path().join(format!("kiln{round}"));
        fs_err::create_dir(&root)?;
        let mut op = CopyOp::new(["."], "/ctx");
        op.apply_ownership = nix::unistd::geteuid().is_root();
        let t = Instant::now();
        let rep = fileop::copy(&ctx, &root, &op)?;
        kiln.push(t.elapsed());
        assert!(rep.written.len() as u64 > files);
        fs_err::remove_dir_all(&out)?;
        fs_err::remove_dir_all(&root)?;
    }
    let (k, c) = (median(kiln), median(cp));
    println!("cp -a        median {:>8.3} s", c.as_secs_f64());
    println!(
        "fileop::copy median {:>8.3} s  ({:.2}x cp -a)",
        k.as_secs_f64(),
        k.as_secs_f64() / c.as_secs_f64()
    );
    println!(
        "peak RSS {} MB (before the copies: {} MB)",
        max_rss_kb() / 1024,
        rss_before / 1024
    );
    Ok(())
}
