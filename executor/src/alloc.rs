//! Allocator settings for short-lived kiln processes.

/// Tunes glibc's malloc for a process that lives for one command: two
/// arenas for all threads (a build's worker threads would otherwise each
/// grow their own), no returning of freed memory to the kernel, and big
/// blocks from the heap rather than their own mappings (freed and mapped
/// again, they are fresh pages each time).
///
/// Each page a process touches for the first time costs a page fault,
/// and on a virtual machine a fault can cost 2-20 us: an edit-one-file
/// rebuild of 5,000 files took about 4,500 of them; with these settings
/// about 3,300. Two arenas, not one: the context checksum's two walker
/// threads both allocate for every file, and on one arena's lock that
/// rebuild made 3,400 futex calls (167 with two) and took 4 ms more CPU;
/// the second arena costs about 80 page faults. Call it first thing in
/// `main`, before any thread starts.
/// Does nothing on other C libraries.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        const ARENAS: libc::c_int = 2;
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 64 << 20;
        // SAFETY: mallopt only changes malloc's parameters; it is called
        // before any other thread exists, and a refused setting (return 0)
        // leaves the default, which is still correct.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Puts the calling thread under `SCHED_IDLE`: it runs only on a CPU that
/// nothing else wants. For a build's background work (cloning a COPY's
/// result for the next run, writing a memo, tearing down a scratch
/// directory), which must not take a core from the steps on the build's
/// critical path (on two cores, a RUN's process and the solver). A thread
/// that later blocks its caller (a join at the end of a build) still runs:
/// the waiting caller leaves its CPU free. Returns false if the kernel
/// refused (the thread keeps its normal policy; nothing else changes).
pub fn idle_priority() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param` (a valid, live struct) and
    // changes only the scheduling policy of the calling thread (pid 0).
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}
