//! Layer export throughput, side by side with `tar` and `tar | gzip` (and `pigz` when
//! installed) on the same tree: the numbers behind bench scenario s5.
//!
//! ```text
//! cargo bench -p kiln-cache --bench layer                       # 20,000 files + 100 MB file
//! KILN_BENCH_BIG_MB=500 cargo bench -p kiln-cache --bench layer # the s5 size
//! ```
//!
//! Env: `KILN_BENCH_FILES` (small files, default 20000), `KILN_BENCH_BIG_MB` (one big file,
//! default 100), `KILN_BENCH_DIR` (where to build the tree; default a temp dir),
//! `KILN_BENCH_THREADS` (gzip threads, default all cores). Each case runs 3 times; the median
//! is printed, with the peak RSS of this process (VmHWM) after the kiln cases, to show the
//! streaming keeps memory flat.
#![expect(clippy::print_stdout, reason = "a benchmark prints its results")]

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_cache::compress::{Compression, compress};
use kiln_cache::layer::{ApplyOptions, WriteOptions, apply_layer, write_layer};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Semi-compressible content (text-like runs and 6-bit noise), about 2:1 with gzip, like
/// a mix of binaries and text.
fn fill(buf: &mut [u8], seed: &mut u32) {
    let mut i = 0;
    while i < buf.len() {
        *seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        if seed.is_multiple_of(5) {
            let text = b"layer export benchmark text, repeated with variations ";
            let n = text.len().min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&text[..n]);
            i += n;
        } else {
            let b = (*seed >> 2 & 0x3f3f_3f3f).to_le_bytes();
            let n = 4.min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&b[..n]);
            i += n;
        }
    }
}

fn make_tree(root: &Path, files: usize, big_mb: usize) -> io::Result<u64> {
    let mut seed = 42u32;
    let mut total = 0u64;
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i % 200));
        if i < 200 {
            fs_err::create_dir_all(&dir)?;
        }
        let mut buf = vec![0u8; 200 + (i * 37) % 8000];
        fill(&mut buf, &mut seed);
        fs_err::write(dir.join(format!("f{i:05}.txt")), &buf)?;
        total += buf.len() as u64;
    }
    let mut big = fs_err::File::create(root.join("big.bin"))?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..big_mb {
        fill(&mut buf, &mut seed);
        big.write_all(&buf)?;
        total += buf.len() as u64;
    }
    Ok(total)
}

fn vm_hwm_kib() -> u64 {
    fs_err::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut() -> io::Result<u64>>(name: &str, input_bytes: u64, mut f: F) -> Duration {
    let mut runs = Vec::new();
    let mut out_bytes = 0;
    for _ in 0..3 {
        let t = Instant::now();
        match f() {
            Ok(n) => out_bytes = n,
            Err(e) => {
                println!("{name:<34} failed: {e}");
                return Duration::ZERO;
            }
        }
        runs.push(t.elapsed());
    }
    let m = median(runs);
    let mbps = input_bytes as f64 / 1e6 / m.as_secs_f64();
    println!(
        "{name:<34} {:>8.3} s  {mbps:>8.1} MB/s  output {:>6.1} MB",
        m.as_secs_f64(),
        out_bytes as f64 / 1e6
    );
    m
}

/// Run a shell pipeline, counting its stdout bytes.
fn shell(cmd: &str) -> io::Result<u64> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let n = io::copy(&mut out, &mut io::sink())?;
    let status = child.wait()?;
    if !status.success() {
        return Err(io::Error::other(format!("`{cmd}` failed: {status}")));
    }
    Ok(n)
}

/// write_layer on a thread, piped into compress on this one (how `kiln save` streams).
fn layer_compressed(dir: &Path, c: Compression, threads: usize) -> io::Result<u64> {
    let (reader, writer) = io::pipe()?;
    let dir = dir.to_path_buf();
    let producer = std::thread::spawn(move || write_layer(&dir, writer, &WriteOptions::default()));
    let n = compress(reader, io::sink(), c, threads).map_err(io::Error::other)?;
    producer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))?
        .map_err(io::Error::other)?;
    Ok(n)
}

fn main() -> io::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` probes with --list
    }
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) gets a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let files = env_usize("KILN_BENCH_FILES", if full { 20_000 } else { 300 });
    let big_mb = env_usize("KILN_BENCH_BIG_MB", if full { 100 } else { 1 });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = env_usize("KILN_BENCH_THREADS", cores);
    let holder = tempfile::tempdir_in(
        std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )?;
    let root = holder.path().join("tree");
    fs_err::create_dir(&root)?;
    let bytes = make_tree(&root, files, big_mb)?;
    println!(
        "tree: {files} small files + {big_mb} MB file = {:.1} MB, {cores} cores, gzip threads {threads}",
        bytes as f64 / 1e6
    );
    let dir = root.display().to_string();
    let have = |t: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t} >/dev/null"))
            .status()
            .is_ok_and(|s| s.success())
    };

    // Warm the page cache so every case reads from memory.
    shell(&format!("tar -cf - -C {dir} ."))?;
    let hwm_start = vm_hwm_kib();

    let kiln_tar = time("kiln write_layer (uncompressed)", bytes, || {
        write_layer(&root, io::sink(), &WriteOptions::default())
            .map(|s| s.bytes)
            .map_err(io::Error::other)
    });
    if std::env::var("KILN_BENCH_ONLY").as_deref() == Ok("write") {
        return Ok(());
    }
    let kiln_gz = time(
        &format!("kiln layer | gzip ({threads} threads)"),
        bytes,
        || layer_compressed(&root, Compression::Gzip, threads),
    );
    let kiln_gz1 = time("kiln layer | gzip (1 thread)", bytes, || {
        layer_compressed(&root, Compression::Gzip, 1)
    });
    time("kiln layer | zstd", bytes, || {
        layer_compressed(&root, Compression::Zstd, 1)
    });
    let hwm_end = vm_hwm_kib();

    let tar = time("tar -cf -", bytes, || {
        shell(&format!("tar -cf - -C {dir} ."))
    });
    let tar_gz = time("tar -cf - | gzip", bytes, || {
        shell(&format!("tar -cf - -C {dir} . | gzip -6"))
    });
    if have("pigz") {
        time("tar -cf - | pigz", bytes, || {
            shell(&format!("tar -cf - -C {dir} . | pigz -6"))
        });
    }
    time("tar -cf - | zstd -3", bytes, || {
        shell(&format!("tar -cf - -C {dir} . | zstd -3 -q -c"))
    });

    // Applying: the same tar unpacked by kiln and by GNU tar, each into a fresh directory.
    let layer_file = holder.path().join("layer.tar");
    write_layer(
        &root,
        fs_err::File::create(&layer_file)?,
        &WriteOptions::default(),
    )
    .map_err(io::Error::other)?;
    let mut run = 0;
    let mut fresh = || -> io::Result<std::path::PathBuf> {
        run += 1;
        let d = holder.path().join(format!("unpack{run}"));
        fs_err::create_dir(&d)?;
        Ok(d)
    };
    let kiln_apply = time("kiln apply_layer", bytes, || {
        let d = fresh()?;
        let f = fs_err::File::open(&layer_file)?;
        apply_layer(
            io::BufReader::with_capacity(1 << 20, f),
            &d,
            &ApplyOptions::default(),
        )
        .map(|s| s.bytes)
        .map_err(io::Error::other)
    });
    let tar_x = time("tar -xf", bytes, || {
        let d = fresh()?;
        shell(&format!(
            "tar -xf {} -C {}",
            layer_file.display(),
            d.display()
        ))
    });

    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64().max(1e-9);
    println!();
    println!(
        "uncompressed: kiln takes {:.2}x the time of tar (goal <= 2x)",
        1.0 / ratio(kiln_tar, tar)
    );
    println!(
        "gzip: kiln is {:.2}x faster than tar | gzip (goal >= 2x); 1-thread kiln {:.2}x",
        ratio(kiln_gz, tar_gz),
        ratio(kiln_gz1, tar_gz)
    );
    println!(
        "apply: kiln takes {:.2}x the time of tar -xf",
        1.0 / ratio(kiln_apply, tar_x)
    );
    println!(
        "peak RSS (VmHWM): {} KiB before the kiln cases, {} KiB after",
        hwm_start, hwm_end
    );
    Ok(())
}
