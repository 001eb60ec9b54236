//! Handing the allocator's free pages back to the system between layers,
//! and between the steps of the task-loss importance pass.
//!
//! glibc keeps memory freed by a layer's solve or by a block's forward or
//! backward over a chunk of samples (anything below its mmap threshold,
//! which grows up to 32 MB as large blocks are freed: a 7B model's 8 MB
//! hidden states and 22 MB MLP activations) for later allocations, so the
//! resident set after a step stays near the step's peak and the next
//! step's allocations may land on top of it.

/// Asks the allocator to return the free pages it keeps to the system
/// (glibc's `malloc_trim`); a no-op on other platforms.
pub(crate) fn return_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free pages of glibc's own heaps
    // (under their locks); it touches no memory that Rust code owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss_mb() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmRSS value");
        kb / 1024.0
    }

    /// 256 MB freed in 64 KiB pieces below a live one stays resident
    /// (glibc keeps it for reuse); returning the free pages drops the
    /// resident set by most of it. Other tests of this binary may allocate
    /// meanwhile, so only half is required.
    #[test]
    fn returning_free_pages_lowers_the_resident_set() {
        let pieces: Vec<Vec<u8>> = (0..4096)
            .map(|i| vec![(i % 251) as u8 + 1; 64 << 10])
            .collect();
        let keep = vec![7u8; 64 << 10];
        drop(pieces);
        let before = rss_mb();
        return_free_pages();
        let after = rss_mb();
        assert_eq!(keep[0], 7);
        assert!(
            before - after > 128.0,
            "resident {before:.0} MB -> {after:.0} MB"
        );
    }
}
