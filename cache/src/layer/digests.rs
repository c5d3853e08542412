//! The content digests of a layer's regular files, taken while its tar is
//! written (see [`WriteOptions::content_digests`](super::WriteOptions)).
//!
//! A `COPY --from=<stage>` is keyed by the digests of the files it copies
//! (as BuildKit's content-based keys are), so right after a stage's last
//! RUN the same files were read twice: once for the layer's diffID, once
//! for the copy's key. Taking both digests in one pass saves the second
//! read; big files are hashed on a thread beside the writer (the tar's
//! hash is sequential, the file's own can run on the other core).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::thread::JoinHandle;

use crate::ContentHasher;

/// The content digest (see [`crate::content_digest`]) of a layer's regular files, with their sizes,
/// by path in the layer (as in its tar: relative, no leading `./`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContentDigests {
    /// By path: size, digest, and whether the file had no xattrs at all.
    files: HashMap<Vec<u8>, (u64, [u8; 32], bool)>,
}

impl ContentDigests {
    /// The digest of the file at `path`, if it was taken and the file had
    /// `size` bytes.
    pub fn get(&self, path: &[u8], size: u64) -> Option<[u8; 32]> {
        self.entry(path, size).map(|(d, _)| d)
    }

    /// Whether the file at `path`, of `size` bytes, was seen to have no
    /// xattrs at all (not even overlayfs' own) when its digest was taken;
    /// false when that is not known.
    pub fn without_xattrs(&self, path: &[u8], size: u64) -> bool {
        self.entry(path, size).is_some_and(|(_, bare)| bare)
    }

    /// [`ContentDigests::get`] and [`ContentDigests::without_xattrs`] in
    /// one lookup.
    pub fn entry(&self, path: &[u8], size: u64) -> Option<([u8; 32], bool)> {
        self.files
            .get(path)
            .filter(|(s, _, _)| *s == size)
            .map(|(_, d, bare)| (*d, *bare))
    }

    /// Records the digest of the `size` bytes of the file at `path`.
    pub fn insert(&mut self, path: Vec<u8>, size: u64, digest: [u8; 32]) {
        self.files.insert(path, (size, digest, false));
    }

    /// How many files have a digest.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no file has one.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Big files hashed at once, at most (a third waits for the first).
const MAX_PENDING: usize = 2;

type Pending = JoinHandle<Option<(Vec<u8>, u64, [u8; 32], bool)>>;

/// Digests being taken while a layer is written: small files by the
/// writer, big ones on threads beside it.
#[derive(Debug, Default)]
pub(super) struct Digesting {
    done: ContentDigests,
    pending: VecDeque<Pending>,
}

impl Digesting {
    /// Records a digest; `bare`: the file has no xattrs at all.
    pub(super) fn add(&mut self, path: Vec<u8>, size: u64, digest: [u8; 32], bare: bool) {
        self.done.files.insert(path, (size, digest, bare));
    }

    /// Hashes the `size` bytes of `file` (which nothing writes any more)
    /// through mappings, on another thread; false if no thread was started.
    /// A file that cannot be hashed so gets no digest: its reader reads it.
    pub(super) fn spawn_mapped(
        &mut self,
        path: Vec<u8>,
        file: &File,
        size: u64,
        bare: bool,
    ) -> bool {
        let Ok(file) = file.try_clone() else {
            return false;
        };
        if self.pending.len() >= MAX_PENDING {
            self.join_one();
        }
        let spawned = std::thread::Builder::new()
            .name("layer-digest".to_owned())
            .spawn(move || {
                let mut h = ContentHasher::new();
                let mapped = super::mapped::for_each_window(&file, size, |bytes| {
                    h.update(bytes);
                    Ok(())
                });
                matches!(mapped, Ok(true)).then(|| (path, size, h.finalize(), bare))
            });
        match spawned {
            Ok(handle) => {
                self.pending.push_back(handle);
                true
            }
            Err(_) => false,
        }
    }

    fn join_one(&mut self) {
        if let Some(handle) = self.pending.pop_front()
            && let Ok(Some((path, size, digest, bare))) = handle.join()
        {
            self.add(path, size, digest, bare);
        }
    }

    /// Every digest, once the threads are done.
    pub(super) fn finish(mut self) -> ContentDigests {
        while !self.pending.is_empty() {
            self.join_one();
        }
        self.done
    }
}
