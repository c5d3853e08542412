//! Phase timings for profiling builds: with `KILN_TIMINGS=1` in the
//! environment, [`mark`] prints the milliseconds since the process started
//! and since the previous mark to stderr. Off, a mark costs one load.
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static START: OnceLock<Option<Instant>> = OnceLock::new();
static LAST: AtomicU64 = AtomicU64::new(0);

fn start() -> Option<Instant> {
    *START.get_or_init(|| std::env::var_os("KILN_TIMINGS").map(|_| Instant::now()))
}

/// Prints `what` with the time since start and since the previous mark,
/// when `KILN_TIMINGS` is set.
pub fn mark(what: &str) {
    if let Some(t0) = start() {
        let now = t0.elapsed().as_micros() as u64;
        let prev = LAST.swap(now, Ordering::Relaxed);
        let line = format!(
            "[timing] {:8.2} ms (+{:7.2}) {what}\n",
            now as f64 / 1000.0,
            now.saturating_sub(prev) as f64 / 1000.0
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
}
