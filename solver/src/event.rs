//! Progress events. The solver never prints: it sends [`Event`]s on a tokio
//! channel and the CLI renders them (tty bars, plain lines, or JSON lines
//! for `--progress json`, one [`Event::to_json_line`] per event).

use std::time::{Duration, Instant};

use kiln_parser::Span;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::key::MissCause;

/// A Dockerfile location, for events (serializable both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// 1-based start line.
    pub line: usize,
    /// 1-based start column.
    pub column: usize,
    /// End line.
    pub end_line: usize,
    /// Column just past the end.
    pub end_column: usize,
}

impl From<Span> for Location {
    fn from(s: Span) -> Self {
        Self {
            line: s.start.line,
            column: s.start.column,
            end_line: s.end.line,
            end_column: s.end.column,
        }
    }
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One progress event. `id` is the vertex index in the build graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step begins (checking the cache, then maybe running).
    VertexStarted {
        /// The vertex.
        id: usize,
        /// Its display name (`[build 2/4] RUN make`).
        name: String,
        /// Its Dockerfile location.
        location: Option<Location>,
    },
    /// The step's result was in the cache.
    VertexCached {
        /// The vertex.
        id: usize,
    },
    /// The step was not in the cache, and why.
    VertexMiss {
        /// The vertex.
        id: usize,
        /// The causes.
        causes: Vec<MissCause>,
    },
    /// A line of the step's output.
    Log {
        /// The vertex.
        id: usize,
        /// stdout or stderr.
        stream: LogStream,
        /// The line, without its line ending (invalid UTF-8 replaced).
        line: String,
    },
    /// The step is done.
    VertexFinished {
        /// The vertex.
        id: usize,
        /// How long it took, in milliseconds.
        duration_ms: u64,
    },
    /// The step failed; the build stops.
    VertexFailed {
        /// The vertex.
        id: usize,
        /// The error, rendered with its causes.
        error: String,
    },
}

impl Event {
    /// The vertex the event is about.
    pub fn id(&self) -> usize {
        match self {
            Event::VertexStarted { id, .. }
            | Event::VertexCached { id }
            | Event::VertexMiss { id, .. }
            | Event::Log { id, .. }
            | Event::VertexFinished { id, .. }
            | Event::VertexFailed { id, .. } => *id,
        }
    }

    /// One line of JSON (no newline), for `--progress json`.
    pub fn to_json_line(&self) -> String {
        // Serializing these plain data types cannot fail; fall back to a
        // minimal object rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"id\":{}}}", self.id()))
    }
}

/// The sending side the solver uses. Sends never block and never fail: a
/// renderer that went away (the CLI is exiting) just stops receiving.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Progress {
    /// A channel: the solver keeps the [`Progress`], the CLI reads the
    /// receiver.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx: Some(tx) }, rx)
    }

    /// Progress that goes nowhere (tests, `kiln graph`).
    pub fn discard() -> Self {
        Self { tx: None }
    }

    /// Send an event.
    pub fn send(&self, e: Event) {
        if let Some(tx) = &self.tx {
            // An error means the receiver is gone: nothing to report to.
            let _ = tx.send(e);
        }
    }

    /// A step began: returns a timer for [`Progress::finished`].
    pub fn started(&self, id: usize, name: &str, span: Option<Span>) -> Instant {
        self.send(Event::VertexStarted {
            id,
            name: name.to_owned(),
            location: span.map(Location::from),
        });
        Instant::now()
    }

    /// A cache hit.
    pub fn cached(&self, id: usize) {
        self.send(Event::VertexCached { id });
    }

    /// A cache miss and its causes.
    pub fn miss(&self, id: usize, causes: Vec<MissCause>) {
        self.send(Event::VertexMiss { id, causes });
    }

    /// A step finished; `since` is what [`Progress::started`] returned.
    pub fn finished(&self, id: usize, since: Instant) {
        self.send(Event::VertexFinished {
            id,
            duration_ms: duration_ms(since.elapsed()),
        });
    }

    /// A step failed.
    pub fn failed(&self, id: usize, error: &dyn std::error::Error) {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.send(Event::VertexFailed { id, error: text });
    }

    /// A [`LineSplitter`] that sends `Log` events for vertex `id`.
    pub fn log_sink(&self, id: usize, stream: LogStream) -> LogSink {
        LogSink {
            progress: self.clone(),
            id,
            stream,
            splitter: LineSplitter::default(),
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Splits a byte stream (a RUN's output, in arbitrary chunks) into lines:
/// `\n` ends a line, `\r\n` too; a lone `\r` (progress bars) replaces the
/// line so far; very long lines are cut at [`LineSplitter::MAX_LINE`].
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// The longest line kept in one piece.
    pub const MAX_LINE: usize = 64 * 1024;

    /// Feed a chunk; returns the lines it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in chunk {
            match b {
                b'\n' => {
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    lines.push(String::from_utf8_lossy(&self.buf).into_owned());
                    self.buf.clear();
                }
                _ => {
                    // A `\r` not followed by `\n` starts the line over.
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.clear();
                    }
                    self.buf.push(b);
                    if self.buf.len() >= Self::MAX_LINE {
                        lines.push(String::from_utf8_lossy(&self.buf).into_owned());
                        self.buf.clear();
                    }
                }
            }
        }
        lines
    }

    /// The unterminated rest, if any (at end of stream).
    pub fn finish(&mut self) -> Option<String> {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.buf.is_empty() {
            None
        } else {
            let s = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            Some(s)
        }
    }
}

/// Turns output chunks of one step into `Log` events.
#[derive(Debug)]
pub struct LogSink {
    progress: Progress,
    id: usize,
    stream: LogStream,
    splitter: LineSplitter,
}

impl LogSink {
    /// Feed output bytes.
    pub fn write(&mut self, chunk: &[u8]) {
        for line in self.splitter.push(chunk) {
            self.progress.send(Event::Log {
                id: self.id,
                stream: self.stream,
                line,
            });
        }
    }

    /// Flush the last, unterminated line.
    pub fn finish(&mut self) {
        if let Some(line) = self.splitter.finish() {
            self.progress.send(Event::Log {
                id: self.id,
                stream: self.stream,
                line,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_parser::Position;

    use super::*;

    #[test]
    fn events_round_trip_as_json_lines() {
        let events = vec![
            Event::VertexStarted {
                id: 3,
                name: "[build 2/4] RUN make".into(),
                location: Some(Location::from(Span::new(
                    Position::new(4, 1),
                    Position::new(4, 9),
                ))),
            },
            Event::VertexMiss {
                id: 3,
                causes: vec![MissCause::FileChanged {
                    path: "src/main.rs".into(),
                }],
            },
            Event::Log {
                id: 3,
                stream: LogStream::Stderr,
                line: "warning: \"x\"".into(),
            },
            Event::VertexFinished {
                id: 3,
                duration_ms: 1200,
            },
            Event::VertexCached { id: 4 },
            Event::VertexFailed {
                id: 5,
                error: "exit code 2".into(),
            },
        ];
        for e in &events {
            let line = e.to_json_line();
            assert!(!line.contains('\n'));
            let back: Event = serde_json::from_str(&line).expect("parses back");
            assert_eq!(&back, e);
        }
        assert_eq!(
            events[1].to_json_line(),
            r#"{"event":"vertex_miss","id":3,"causes":[{"cause":"file_changed","path":"src/main.rs"}]}"#
        );
    }

    #[test]
    fn line_splitter_handles_chunks_crlf_and_cr() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"hel").is_empty());
        assert_eq!(s.push(b"lo\nwor"), ["hello"]);
        assert_eq!(s.push(b"ld\r\n10%\r50%\r100%\n"), ["world", "100%"]);
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
        assert_eq!(s.finish(), None);
        assert_eq!(s.push(&[0xff, b'\n']), ["\u{fffd}"]);
        let long = vec![b'a'; LineSplitter::MAX_LINE + 10];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(s.finish().map(|l| l.len()), Some(10));
    }

    #[tokio::test]
    async fn progress_sends_in_order_and_survives_a_closed_receiver() {
        let (p, mut rx) = Progress::channel();
        let t = p.started(1, "[a 1/2] RUN x", None);
        let mut sink = p.log_sink(1, LogStream::Stdout);
        sink.write(b"one\ntw");
        sink.write(b"o");
        sink.finish();
        p.miss(1, vec![MissCause::FirstBuild]);
        p.finished(1, t);
        let err = std::io::Error::other("disk full");
        p.failed(2, &err);
        drop(p.clone());
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        let kinds: Vec<&str> = got
            .iter()
            .map(|e| match e {
                Event::VertexStarted { .. } => "started",
                Event::Log { .. } => "log",
                Event::VertexMiss { .. } => "miss",
                Event::VertexFinished { .. } => "finished",
                Event::VertexFailed { .. } => "failed",
                Event::VertexCached { .. } => "cached",
            })
            .collect();
        assert_eq!(
            kinds,
            ["started", "log", "log", "miss", "finished", "failed"]
        );
        assert!(matches!(&got[2], Event::Log { line, .. } if line == "two"));
        assert!(matches!(&got[5], Event::VertexFailed { error, .. } if error == "disk full"));
        drop(rx);
        p.cached(9); // no receiver: no panic, no error
        Progress::discard().cached(1);
    }
}
