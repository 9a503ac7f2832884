//! glibc's allocator, held to a few arenas.
//!
//! glibc gives each thread that allocates while another holds an arena one of its
//! own, up to eight per core, and what a thread frees stays in its arena for reuse.
//! A restore decodes chunks (up to the chunker's maximum, 2 MiB) on tokio's blocking
//! pool, dozens of threads at once, so snapctl's resident memory grew with the
//! node's core count (bench/RESULTS.md, "snapctl's memory and the core count").
//! A handful of arenas bounds that; small allocations still go through each
//! thread's own cache first, so the shared arenas see little contention.
//!
//! `MALLOC_ARENA_MAX` in the environment, when set, is left to glibc.

/// Arenas for the whole process.
const ARENAS: i32 = 4;

/// Caps glibc's arenas at [`ARENAS`] unless `MALLOC_ARENA_MAX` says otherwise. Call
/// before any thread starts.
pub fn cap_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets one of glibc's allocator tunables; it is called from
    // main before any other thread exists, and M_ARENA_MAX takes a plain count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}
