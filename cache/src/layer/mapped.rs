//! Read-only mappings of big files, so that hashing them needs no copy
//! into a buffer (on a virtual machine the copy out of the page cache is
//! a good part of the cost of hashing a layer).
#![allow(
    unsafe_code,
    reason = "mmap is an FFI call; the mapping is read-only, private to this module and unmapped on drop"
)]

use std::fs::File;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap};

/// How much of a file is mapped at once: the pages of a mapping count in
/// the process's resident memory while it is mapped.
pub const WINDOW: u64 = 16 << 20;

/// Feeds the `len` bytes of `file` to `f` through mappings of at most
/// [`WINDOW`] bytes. False (having fed nothing) when the first mapping is
/// refused, so that the caller can read the file instead; a later refusal
/// is an error.
///
/// The file must not shrink meanwhile (reading a mapped page past its end
/// raises SIGBUS): kiln maps only the files of finished steps' upper
/// directories, of snapshots and of a stage's mount, which nothing writes
/// any more.
pub fn for_each_window(
    file: &File,
    len: u64,
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<bool> {
    for_each_mapping(file, len, |m| f(m.bytes()))
}

/// [`for_each_window`], giving `f` the mappings themselves (to hand them
/// on to another thread).
pub fn for_each_mapping(
    file: &File,
    len: u64,
    mut f: impl FnMut(Mapped) -> std::io::Result<()>,
) -> std::io::Result<bool> {
    let mut off = 0;
    while off < len {
        let n = WINDOW.min(len - off);
        let Some(m) = Mapped::window(file, off, n) else {
            if off == 0 {
                return Ok(false);
            }
            return Err(std::io::Error::other("mapping the file failed"));
        };
        f(m)?;
        off += n;
    }
    Ok(true)
}

/// A read-only view of some bytes of a file.
#[derive(Debug)]
pub struct Mapped {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

impl Mapped {
    /// Maps the `len` (> 0) bytes of `file` from `offset` (a multiple of
    /// the page size); `None` when the system refuses.
    pub fn window(file: &File, offset: u64, len: u64) -> Option<Mapped> {
        let len = usize::try_from(len).ok()?;
        let n = NonZeroUsize::new(len)?;
        let offset = i64::try_from(offset).ok()?;
        let (prot, flags) = (ProtFlags::PROT_READ, MapFlags::MAP_PRIVATE);
        // SAFETY: a private read-only mapping of a file we hold open; the
        // pointer is only read through `bytes` while `self` lives.
        let ptr = unsafe { mmap(None, n, prot, flags, file, offset) }.ok()?;
        // SAFETY: advice on the range just mapped; failure is harmless.
        let _ = unsafe { madvise(ptr, len, MmapAdvise::MADV_SEQUENTIAL) };
        Some(Mapped { ptr, len })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

// SAFETY: the mapping is read-only and only read through `bytes`; the
// pointer is not tied to the thread that mapped it (munmap may be called
// from any thread).
unsafe impl Send for Mapped {}
// SAFETY: as above; shared access is reads only.
unsafe impl Sync for Mapped {}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `window` mapped; no slice outlives
        // `self` (`bytes` borrows it).
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
