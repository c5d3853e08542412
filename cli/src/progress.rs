//! Rendering build progress events: plain lines (no tty, `CI`, or
//! `--progress plain`), JSON lines (`--progress json`), or indicatif
//! spinners, one per step, on a tty.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use kiln_solver::event::Event;

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProgressMode {
    /// tty when stderr is a terminal and `CI` is unset, else plain.
    Auto,
    /// Terminal output.
    Tty,
    /// One line per event.
    Plain,
    /// One JSON object per line.
    Json,
    /// Nothing (`-q`, as docker's; buildx's `--progress=quiet`): only the
    /// image ID on stdout, and warnings and errors.
    Quiet,
}

/// Renders events to stderr.
#[derive(Debug)]
pub(crate) struct Renderer {
    json: bool,
    quiet: bool,
    tty: Option<Tty>,
    /// Vertex index -> display number (`#N`), in order of first appearance.
    numbers: HashMap<usize, usize>,
    started: Instant,
}

impl Renderer {
    pub(crate) fn new(mode: ProgressMode) -> Self {
        use std::io::IsTerminal as _;
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        let terminal = std::io::stderr().is_terminal();
        let tty = match mode {
            // Asked for: drawn with ANSI codes even into a pipe, as docker.
            ProgressMode::Tty => Some(Tty::new(!terminal)),
            ProgressMode::Auto => (terminal && !ci).then(|| Tty::new(false)),
            ProgressMode::Plain | ProgressMode::Json | ProgressMode::Quiet => None,
        };
        Self {
            json: mode == ProgressMode::Json,
            quiet: mode == ProgressMode::Quiet,
            tty,
            numbers: HashMap::new(),
            started: Instant::now(),
        }
    }

    fn num(&mut self, id: usize) -> usize {
        let next = self.numbers.len() + 1;
        *self.numbers.entry(id).or_insert(next)
    }

    /// The text of one event (without newline), or `None` to print nothing.
    pub(crate) fn line(&mut self, e: &Event) -> Option<String> {
        if self.quiet {
            return None;
        }
        if self.json {
            return Some(e.to_json_line());
        }
        let n = self.num(e.id());
        Some(match e {
            Event::VertexStarted { name, .. } => format!("#{n} {name}"),
            Event::VertexCached { .. } => format!("#{n} CACHED"),
            Event::VertexMiss { causes, .. } => {
                let c: Vec<String> = causes.iter().map(ToString::to_string).collect();
                format!("#{n} MISS: {}", c.join("; "))
            }
            Event::Log { line, .. } => {
                format!("#{n} {:.3} {line}", self.started.elapsed().as_secs_f64())
            }
            Event::VertexFinished { duration_ms, .. } => {
                format!("#{n} DONE {:.1}s", *duration_ms as f64 / 1000.0)
            }
            Event::VertexFailed { error, .. } => format!("#{n} ERROR: {error}"),
        })
    }

    /// Print one event.
    pub(crate) fn render(&mut self, e: &Event) {
        if let Some(mut tty) = self.tty.take() {
            let n = self.num(e.id());
            tty.render(n, e);
            self.tty = Some(tty);
            return;
        }
        if let Some(mut l) = self.line(e) {
            // One write per line (stderr is not buffered).
            l.push('\n');
            let _ = std::io::stderr().lock().write_all(l.as_bytes());
        }
    }

    /// Prints `events` (a build memo's), in one write unless drawn on a
    /// terminal.
    pub(crate) fn render_all(&mut self, events: &[Event]) {
        if self.tty.is_some() {
            for e in events {
                self.render(e);
            }
            return;
        }
        let mut out = String::new();
        for e in events {
            if let Some(l) = self.line(e) {
                out.push_str(&l);
                out.push('\n');
            }
        }
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
    }
}

/// Spinners on a terminal: one line per step, its last output line shown
/// while it runs; when it ends the line says CACHED, DONE or ERROR.
#[derive(Debug)]
struct Tty {
    multi: indicatif::MultiProgress,
    bars: HashMap<usize, Bar>,
}

/// One step's spinner.
#[derive(Debug)]
struct Bar {
    bar: indicatif::ProgressBar,
    name: String,
    cached: bool,
    /// The miss causes, shown when the step is done.
    why: Option<String>,
}

impl Tty {
    /// `forced`: stderr is no terminal but tty output was asked for.
    fn new(forced: bool) -> Self {
        let target = if forced {
            indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(AnsiStderr), 10)
        } else {
            indicatif::ProgressDrawTarget::stderr()
        };
        Self {
            multi: indicatif::MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
        }
    }

    fn render(&mut self, n: usize, e: &Event) {
        let style = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        match e {
            Event::VertexStarted { id, name, .. } => {
                let bar = self.multi.add(indicatif::ProgressBar::new_spinner());
                bar.set_style(style);
                bar.set_message(format!("#{n} {name}"));
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                self.bars.insert(
                    *id,
                    Bar {
                        bar,
                        name: name.clone(),
                        cached: false,
                        why: None,
                    },
                );
            }
            Event::VertexCached { id } => {
                if let Some(b) = self.bars.get_mut(id) {
                    b.cached = true;
                }
            }
            Event::VertexMiss { id, causes } => {
                // Kept for the step's last line: why it was not cached.
                if let Some(b) = self.bars.get_mut(id) {
                    let c: Vec<String> = causes.iter().map(ToString::to_string).collect();
                    b.why = Some(c.join("; "));
                }
            }
            Event::Log { id, line, .. } => {
                if let Some(b) = self.bars.get(id) {
                    b.bar.set_message(format!("#{n} {} | {line}", b.name));
                }
            }
            Event::VertexFinished { id, duration_ms } => {
                if let Some(Bar {
                    bar,
                    name,
                    cached,
                    why,
                }) = self.bars.remove(id)
                {
                    let what = match (cached, why) {
                        (true, _) => "CACHED".to_owned(),
                        (false, None) => format!("DONE {:.1}s", *duration_ms as f64 / 1000.0),
                        (false, Some(why)) => {
                            format!("DONE {:.1}s ({why})", *duration_ms as f64 / 1000.0)
                        }
                    };
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("{msg}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                    );
                    bar.finish_with_message(format!("#{n} {name} {what}"));
                }
            }
            Event::VertexFailed { id, error } => {
                if let Some(b) = self.bars.remove(id) {
                    b.bar
                        .abandon_with_message(format!("#{n} {} ERROR: {error}", b.name));
                }
            }
        }
    }
}

/// Stderr as a terminal that understands ANSI cursor codes, for
/// `--progress tty` when stderr is a pipe or a file (indicatif draws
/// nothing to a non-terminal by itself).
#[derive(Debug)]
struct AnsiStderr;

impl AnsiStderr {
    fn put(s: &str) -> std::io::Result<()> {
        std::io::stderr().lock().write_all(s.as_bytes())
    }
}

impl indicatif::TermLike for AnsiStderr {
    fn width(&self) -> u16 {
        std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(100)
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            Self::put(&format!("\x1b[{n}A"))
        }
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            Self::put(&format!("\x1b[{n}B"))
        }
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            Self::put(&format!("\x1b[{n}C"))
        }
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            Self::put(&format!("\x1b[{n}D"))
        }
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        Self::put(&format!("{s}\n"))
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        Self::put(s)
    }

    fn clear_line(&self) -> std::io::Result<()> {
        Self::put("\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().lock().flush()
    }
}
