//! How fast `.dockerignore` matching is on a big context: 100,000 file paths
//! (plus their directories) against 50 realistic patterns.
//!
//! Run with `cargo bench -p kiln-parser --bench dockerignore`. It prints the
//! median and best of several rounds for each way of matching; it asserts
//! nothing about time (the machine is shared and noisy).

#![expect(
    clippy::print_stdout,
    reason = "a benchmark reports its numbers on stdout"
)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use kiln_parser::{MatchInfo, PatternMatcher};

const FILES: usize = 100_000;
const ROUNDS: usize = 7;

const PATTERNS: &[&str] = &[
    ".git",
    "**/.git",
    "node_modules",
    "**/node_modules",
    "*.log",
    "**/*.log",
    "*.tmp",
    "**/*.tmp",
    "**/*.pyc",
    "**/__pycache__",
    "build",
    "dist",
    "target",
    "coverage",
    ".env",
    ".env.*",
    "!.env.example",
    "*.md",
    "!README.md",
    "docs/**/*.png",
    "**/.DS_Store",
    "Thumbs.db",
    ".idea",
    ".vscode",
    "*.swp",
    "**/*.o",
    "**/*.a",
    "tmp/",
    "**/tmp",
    "vendor/**/test",
    "vendor/**/*_test.go",
    "assets/raw",
    "!assets/raw/keep",
    "**/secret*",
    "*.pem",
    "*.key",
    "Dockerfile*",
    ".dockerignore",
    "docker-compose*.yml",
    "**/.cache",
    ".npm",
    ".yarn",
    "**/*.bak",
    "**/*~",
    "src/**/generated/*.rs",
    "src/*/fixtures",
    "tests/**/snapshots/*.new",
    "**/[Bb]uild-log?.txt",
    "logs",
    "*.tar.gz",
];

/// A deterministic tree shaped like a real repository: about 10 files per
/// directory, up to 6 levels deep, with sources, a large `node_modules`, `.git`
/// objects, build output, docs and vendored code.
fn make_paths() -> Vec<String> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: usize| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((seed >> 33) as usize) % n
    };
    let names = [
        "core",
        "util",
        "net",
        "io",
        "api",
        "model",
        "view",
        "lib",
        "generated",
        "fixtures",
        "snapshots",
        "test",
        "raw",
        "keep",
        "__pycache__",
        "tmp",
        ".cache",
        "src",
        "dist",
        "pkg",
    ];
    let exts = [
        "rs", "js", "ts", "md", "log", "tmp", "pyc", "o", "json", "txt", "png", "go", "bak",
        "snap", "new", "js", "ts", "rs", "go", "json",
    ];
    let stems = [
        "file",
        "secret",
        "README",
        "Build-log1",
        "mod",
        ".env",
        "index",
        "main",
        "util",
    ];
    // Directories: the top level, then children of random existing ones.
    let mut dirs: Vec<String> = [
        "src",
        "node_modules",
        ".git/objects",
        "build",
        "docs",
        "tests",
        "vendor",
        "assets",
        "tmp",
    ]
    .iter()
    .map(|d| (*d).to_owned())
    .collect();
    let mut seen: BTreeSet<String> = dirs.iter().cloned().collect();
    while dirs.len() < FILES / 10 {
        let parent = dirs[rand(dirs.len())].clone();
        if parent.matches('/').count() >= 5 {
            continue;
        }
        let child = format!("{parent}/{}{}", names[rand(names.len())], rand(4));
        if seen.insert(child.clone()) {
            dirs.push(child);
        }
    }
    let mut paths = BTreeSet::new();
    while paths.len() < FILES {
        // One file in 50 sits at the top of the context.
        let dir = if rand(50) == 0 {
            ""
        } else {
            dirs[rand(dirs.len())].as_str()
        };
        let name = format!(
            "{}{}.{}",
            stems[rand(stems.len())],
            rand(100),
            exts[rand(exts.len())]
        );
        paths.insert(if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        });
    }
    paths.into_iter().collect()
}

/// CPU time this thread has run, from `/proc/thread-self/schedstat` (its
/// first field, in nanoseconds). The machine is shared, so wall time mostly
/// measures the neighbours; CPU time measures the work.
fn cpu_time() -> Option<Duration> {
    let text = fs_err::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn time<T>(label: &str, mut f: impl FnMut() -> T) -> T {
    let mut wall: Vec<Duration> = Vec::with_capacity(ROUNDS);
    let mut cpu: Vec<Duration> = Vec::with_capacity(ROUNDS);
    let mut out = None;
    for _ in 0..ROUNDS {
        let (start, start_cpu) = (Instant::now(), cpu_time());
        out = Some(black_box(f()));
        wall.push(start.elapsed());
        if let (Some(a), Some(b)) = (start_cpu, cpu_time()) {
            cpu.push(b.saturating_sub(a));
        }
    }
    wall.sort();
    cpu.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let cpu_text = match (cpu.first(), cpu.get(cpu.len() / 2)) {
        (Some(best), Some(median)) => format!(
            "cpu median {:>7.2} ms best {:>7.2} ms",
            ms(*median),
            ms(*best)
        ),
        _ => "cpu n/a".to_owned(),
    };
    println!(
        "{label:<56} wall median {:>7.2} ms best {:>7.2} ms | {cpu_text}",
        ms(wall[ROUNDS / 2]),
        ms(wall[0])
    );
    out.expect("at least one round")
}

/// A depth-first walk over the sorted paths that computes each directory's
/// [`MatchInfo`] once and hands it to its children, as a context walker does.
/// With `prune`, an excluded directory that [`PatternMatcher::can_skip_dir`]
/// allows is not descended into.
fn walk(m: &PatternMatcher, paths: &[String], prune: bool) -> (usize, usize) {
    // The directories entered so far, outermost first: (path, info, skipped).
    let mut stack: Vec<(&str, MatchInfo, bool)> = Vec::new();
    let none = MatchInfo::default();
    let (mut excluded, mut visited) = (0, 0);
    for path in paths {
        // Leave the directories this path is not inside.
        while let Some((dir, _, _)) = stack.last() {
            if path.len() > dir.len() && path.as_bytes()[dir.len()] == b'/' && path.starts_with(dir)
            {
                break;
            }
            stack.pop();
        }
        // Enter the directories between the innermost one and the file.
        let start = stack.last().map_or(0, |(dir, _, _)| dir.len() + 1);
        for (i, b) in path.bytes().enumerate().skip(start) {
            if b != b'/' {
                continue;
            }
            let dir = &path[..i];
            let entry = match stack.last() {
                Some((_, _, true)) => (dir, MatchInfo::default(), true),
                parent => {
                    let info = parent.map_or(&none, |p| &p.1);
                    let (hit, info) = m.matches_with_parent(dir, info);
                    visited += 1;
                    excluded += usize::from(hit);
                    (dir, info, prune && hit && m.can_skip_dir(dir))
                }
            };
            stack.push(entry);
        }
        match stack.last() {
            Some((_, _, true)) => {}
            parent => {
                visited += 1;
                let info = parent.map_or(&none, |p| &p.1);
                excluded += usize::from(m.matches_with_parent(path, info).0);
            }
        }
    }
    (excluded, visited)
}

fn main() {
    let paths = make_paths();
    let dirs: BTreeSet<&str> = paths
        .iter()
        .flat_map(|p| p.match_indices('/').map(|(i, _)| &p[..i]))
        .collect();
    println!(
        "dockerignore: {} files in {} directories, {} patterns, {} rounds",
        paths.len(),
        dirs.len(),
        PATTERNS.len(),
        ROUNDS
    );
    let empty = PatternMatcher::new([""; 0]).expect("no patterns");
    time("walk harness alone (no patterns), for reference", || {
        walk(&empty, &paths, false)
    });
    let matcher = time("compile 50 patterns", || {
        PatternMatcher::new(PATTERNS).expect("valid patterns")
    });
    let excluded = time(
        "matches(path) on every file (parents checked per call)",
        || paths.iter().filter(|p| matcher.matches(p)).count(),
    );
    println!("    {excluded} of {} files excluded", paths.len());
    let (walk_excluded, walk_visited) = time("walk: matches_with_parent, every entry", || {
        walk(&matcher, &paths, false)
    });
    println!("    {walk_visited} entries matched, {walk_excluded} excluded");
    let (_, pruned_visited) = time("walk: matches_with_parent + can_skip_dir pruning", || {
        walk(&matcher, &paths, true)
    });
    println!("    {pruned_visited} entries matched after pruning");
    let exact = time("matches_exact(path) on every file", || {
        paths.iter().filter(|p| matcher.matches_exact(p)).count()
    });
    println!("    {exact} files excluded by their own name");
    // Which patterns cost the most, each alone against every file.
    let mut costs: Vec<(Duration, &str)> = PATTERNS
        .iter()
        .map(|p| {
            let m = PatternMatcher::new([p]).expect("valid pattern");
            let start = Instant::now();
            black_box(paths.iter().filter(|path| m.matches_exact(path)).count());
            (start.elapsed(), *p)
        })
        .collect();
    costs.sort_by(|a, b| b.cmp(a));
    let top: Vec<String> = costs
        .iter()
        .take(6)
        .map(|(d, p)| format!("{p} {:.1} ms", d.as_secs_f64() * 1e3))
        .collect();
    println!("most expensive patterns alone (wall): {}", top.join(", "));
}
