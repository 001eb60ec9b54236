//! SplitMix64: the deterministic stream behind the randomized scorers.

/// A SplitMix64 generator (Steele, Lea and Flood 2014): 64 bits of state,
/// good mixing, no dependency.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream for one `(seed, index)` pair; different indices give
    /// unrelated streams.
    pub(crate) fn for_sample(seed: u64, index: u64) -> Self {
        let mut base = SplitMix64(seed);
        let mixed = base.next_u64() ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut s = SplitMix64(mixed);
        s.next_u64();
        s
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`) by Lemire's multiply-shift; the bias is
    /// below `n / 2^64`, irrelevant for token counts.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}
