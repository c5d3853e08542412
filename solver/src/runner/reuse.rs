//! Where a context COPY finds its previous result to link unchanged files
//! from ([`crate::fileop::Reuse`]), and where it leaves its own for the next
//! build: a memo per COPY under `<store>/copy-memo/`, named by a digest of
//! everything but the context's content (the instruction, the parent
//! layers, `SOURCE_DATE_EPOCH`). A memo only points at a snapshot; a memo
//! whose snapshot is gone links nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cache::{Digest, KnownFiles, Store};
use sha2::{Digest as _, Sha256};

use super::Chain;
use crate::fileop::{CopyMemo, Reuse};
use crate::graph::CopyOp;

/// Forgets every COPY memo of the store (`kiln prune --all`): the next run
/// of each COPY copies everything again.
pub fn clear_memos(store: &Store) -> std::io::Result<()> {
    match fs_err::remove_dir_all(store.root().join("copy-memo")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The memo file of `op` on `parent`.
pub(super) fn memo_path(
    store: &Store,
    op: &CopyOp,
    parent: &Chain,
    epoch: Option<i64>,
) -> Option<PathBuf> {
    let def = serde_json::to_vec(op).ok()?;
    let mut h = Sha256::new();
    h.update(b"kiln-copy-reuse-v2\0");
    h.update(&def);
    for l in &parent.layers {
        h.update(b"\0");
        h.update(l.diff_id.to_string().as_bytes());
    }
    h.update(format!("\0{epoch:?}").as_bytes());
    Some(
        store
            .root()
            .join("copy-memo")
            .join(crate::context::hex(&h.finalize())),
    )
}

/// What a context COPY found in its memo: where to link unchanged files
/// from, and the contents of that snapshot's small files.
pub(super) struct Loaded {
    pub reuse: Arc<Reuse>,
    pub known: Option<KnownFiles>,
}

/// The reuse for a copy writing into `upper`, from the memo at `memo`.
pub(super) fn load(store: &Store, memo: &Path, upper: &Path) -> Loaded {
    let (prev_root, prev, known) = match CopyMemo::load(memo) {
        Some(m) => {
            let root = m
                .diff_id
                .parse::<Digest>()
                .ok()
                .and_then(|d| store.snapshot_dir(&d));
            let known = root.is_some().then_some(m.known);
            (root, m.files, known)
        }
        None => (None, Vec::new(), None),
    };
    Loaded {
        reuse: Arc::new(Reuse::new(prev_root, prev, upper.to_owned())),
        known,
    }
}

/// The contents the layer writer may take from the memo: those of the
/// files the copy linked from the previous result (the same inodes, so the
/// same bytes at the same path), and no others.
pub(super) fn known_for(mut known: KnownFiles, report: &crate::fileop::Report) -> KnownFiles {
    known.retain(|p| {
        std::str::from_utf8(p).is_ok_and(|p| {
            report
                .linked
                .binary_search_by(|l| l.as_str().cmp(p))
                .is_ok()
        })
    });
    known
}

/// Leaves the memo for the next build: the files of `report` went into the
/// top layer of `chain` (when the copy added a layer at all), whose small
/// files' contents are `known`.
pub(super) fn save(
    memo: &Path,
    temp_dir: &Path,
    parent: &Chain,
    chain: &Chain,
    report: crate::fileop::Report,
    known: KnownFiles,
) {
    if chain.layers.len() <= parent.layers.len() {
        return;
    }
    let Some(top) = chain.layers.last() else {
        return;
    };
    let files = report.remembered();
    let memo_data = CopyMemo {
        diff_id: top.diff_id.to_string(),
        files,
        known,
    };
    // Only a speed-up: a memo that cannot be written costs the next build
    // a full copy.
    let _ = memo_data.save(memo, temp_dir);
}
