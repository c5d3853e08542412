//! A COPY's layer committed beside the RUN that follows it.
//!
//! Hashing a COPY's upper (the layer's diffID) takes as long as the copy
//! itself; a RUN on top needs only the upper's files to start, and the
//! diffID only when it records its own result. So when every consumer of
//! a COPY is a RUN on top of it, the COPY hands on a [`Chain`] whose top
//! layer is *pending*: its files are the COPY's upper, still in the
//! scratch directory, and a thread of its own hashes and commits them.
//!
//! - A RUN mounts the upper by its path: it holds the pending's gate
//!   (shared) from reading that path until its process has exited (the
//!   sandbox's overlay lives in the process's mount namespace). The commit
//!   takes the gate exclusively to move the upper into `snapshots/`; a RUN
//!   that comes after that finds the committed chain.
//! - Everything else waits for the commit ([`Chain::settled`]) before it
//!   reads the chain: other steps, content digests, the export.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};

use super::{Chain, RunnerError};

/// A top layer being committed.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The step that made it (for errors).
    step: String,
    /// The upper directory (the layer's files) until it is committed.
    upper: PathBuf,
    /// Shared by a RUN while it may read `upper` by its path; taken
    /// exclusively to move it.
    gate: RwLock<()>,
    /// The committed chain, once the commit is over.
    done: Mutex<Option<Result<Chain, Arc<RunnerError>>>>,
    ended: Condvar,
}

/// What a RUN mounts from a chain whose top may be pending.
#[derive(Debug)]
pub(crate) struct Lowers<'a> {
    /// Snapshot directories, lowest first.
    pub dirs: Vec<PathBuf>,
    /// Held while `dirs` names the pending upper.
    pub gate: Option<RwLockReadGuard<'a, ()>>,
}

impl Pending {
    pub(crate) fn new(step: String, upper: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            step,
            upper,
            gate: RwLock::new(()),
            done: Mutex::new(None),
            ended: Condvar::new(),
        })
    }

    /// Held while the upper is moved into the store.
    pub(crate) fn close_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, result: Result<Chain, Arc<RunnerError>>) {
        let mut d = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.is_none() {
            *d = Some(result);
        }
        self.ended.notify_all();
    }

    pub(crate) fn wait(&self) -> Result<Chain, RunnerError> {
        let mut d = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(r) = d.as_ref() {
                return r.clone().map_err(|source| RunnerError::Committing {
                    step: self.step.clone(),
                    source,
                });
            }
            d = self
                .ended
                .wait(d)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Sets a pending's result; dropped unset (the commit's thread did not
/// start, or panicked), it sets an error, so that no one waits forever.
#[derive(Debug)]
pub(crate) struct Setter(pub Arc<Pending>);

impl Setter {
    pub(crate) fn set(self, result: Result<Chain, RunnerError>) {
        self.0.set(result.map_err(Arc::new));
    }
}

impl Drop for Setter {
    fn drop(&mut self) {
        self.0.set(Err(Arc::new(RunnerError::Cancelled {
            step: self.0.step.clone(),
        })));
    }
}

/// A [`Chain`]'s pending top (compared by identity).
#[derive(Debug, Clone)]
pub struct PendingTop(pub(crate) Arc<Pending>);

impl PartialEq for PendingTop {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PendingTop {}

impl Chain {
    /// `parent` with a pending layer on top (its diffID is a placeholder
    /// until [`Chain::settled`]).
    pub(crate) fn with_pending(parent: &Chain, pending: Arc<Pending>) -> Chain {
        let mut c = parent.clone();
        c.layers.push(super::ChainLayer {
            diff_id: kiln_cache::Digest::of_bytes(b"kiln: a layer being committed"),
            size: 0,
        });
        c.pending = Some(PendingTop(pending));
        c
    }

    /// Whether the top layer is still being committed.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The chain with its top layer committed: waits for a pending one.
    pub fn settled(&self) -> Result<Chain, RunnerError> {
        match &self.pending {
            None => Ok(self.clone()),
            Some(p) => p.0.wait(),
        }
    }

    /// For a RUN: the directories to mount, the pending upper among them
    /// (with the gate held) if it is not committed yet. `snapshots` maps a
    /// settled chain to its directories.
    pub(crate) fn lowers<'a>(
        &'a self,
        snapshots: impl Fn(&Chain) -> Result<Vec<PathBuf>, RunnerError>,
    ) -> Result<Lowers<'a>, RunnerError> {
        let Some(p) = &self.pending else {
            return Ok(Lowers {
                dirs: snapshots(self)?,
                gate: None,
            });
        };
        let gate =
            p.0.gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Moved (or removed) under the gate: gone, it is committed, or
        // about to be.
        if !p.0.upper.is_dir() {
            drop(gate);
            return Ok(Lowers {
                dirs: snapshots(&self.settled()?)?,
                gate: None,
            });
        }
        let mut below = self.clone();
        below.pending = None;
        below.layers.pop();
        let mut dirs = snapshots(&below)?;
        dirs.push(p.0.upper.clone());
        Ok(Lowers {
            dirs,
            gate: Some(gate),
        })
    }
}
