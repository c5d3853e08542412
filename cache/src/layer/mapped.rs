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

/// A read-only view of the first `len` bytes of a file.
#[derive(Debug)]
pub struct Mapped {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

impl Mapped {
    /// Maps `len` (> 0) bytes of `file`; `None` when the system refuses
    /// (the caller then reads the file).
    ///
    /// The file must not shrink while mapped (reading a page past its end
    /// raises SIGBUS): kiln maps only the files of finished steps' upper
    /// directories and of snapshots, which nothing writes any more.
    pub fn new(file: &File, len: u64) -> Option<Mapped> {
        let len = usize::try_from(len).ok()?;
        let n = NonZeroUsize::new(len)?;
        // SAFETY: a private read-only mapping of a file we hold open; the
        // pointer is only read through `bytes` while `self` lives.
        let ptr = unsafe {
            mmap(
                None,
                n,
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                file,
                0,
            )
        }
        .ok()?;
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

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no slice outlives
        // `self` (`bytes` borrows it).
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
