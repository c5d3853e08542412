//! Rendering build progress events: plain lines (no tty, `CI`, or
//! `--progress plain`), JSON lines (`--progress json`), or plain lines on
//! a tty for now.

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
}

/// Renders events to stderr.
#[derive(Debug)]
pub(crate) struct Renderer {
    json: bool,
    /// Vertex index -> display number (`#N`), in order of first appearance.
    numbers: HashMap<usize, usize>,
    started: Instant,
}

impl Renderer {
    pub(crate) fn new(mode: ProgressMode) -> Self {
        Self {
            json: mode == ProgressMode::Json,
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
        if let Some(l) = self.line(e) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{l}");
        }
    }
}
