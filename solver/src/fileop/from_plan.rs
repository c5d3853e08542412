//! The bridge from the planner's expanded `COPY`/`ADD` ([`crate::graph::CopyOp`])
//! to a runnable [`CopyOp`].

use super::{CopyOp, Source, SourceKind};
use crate::graph::{self, CopySource, InputRef};

impl CopyOp {
    /// The op for a planned COPY/ADD. The caller still sets what the plan
    /// does not know: `ignore` (the context's `.dockerignore`, for context
    /// sources) and `created_time` (`SOURCE_DATE_EPOCH`).
    pub fn from_plan(op: &graph::CopyOp) -> CopyOp {
        CopyOp {
            is_add: op.add,
            sources: op
                .sources
                .iter()
                .map(|s| match s {
                    CopySource::Path { path } => Source::Path(path.clone()),
                    // Classify again: an `https://….git` URL is a git source.
                    CopySource::Url { url } => Source::classify(url),
                    CopySource::Heredoc { name, content } => Source::Heredoc {
                        name: name.clone(),
                        content: content.clone().into_bytes(),
                    },
                })
                .collect(),
            dest: op.dest.clone(),
            workdir: op.workdir.clone(),
            source_kind: match op.from {
                InputRef::Context => SourceKind::Context,
                InputRef::Stage { .. } | InputRef::Image { .. } => SourceKind::Stage,
            },
            chown: op.chown.clone(),
            chmod: op.chmod.clone(),
            parents: op.parents,
            exclude: op.exclude.clone(),
            unpack: op.unpack,
            checksum: op.checksum.clone(),
            keep_git_dir: op.keep_git_dir,
            created_time: None,
            apply_ownership: true,
            ignore: None,
            reuse: None,
            record_contents: false,
        }
    }
}
