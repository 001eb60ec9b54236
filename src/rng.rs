//! SplitMix64: the one deterministic random stream of `vlmq` and its
//! companion crates (randomized scorers, initialization, synthetic data).
//!
//! Not for cryptography. The stream is part of the reproducibility
//! contract: the same seed gives the same numbers on every platform and
//! thread count.

/// The SplitMix64 increment (the golden ratio in 64-bit fixed point).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A SplitMix64 generator (Steele, Lea and Flood 2014): 64 bits of state,
/// good mixing, no dependency.
///
/// ```
/// use vlmq::__private::SplitMix64;
/// let mut a = SplitMix64::new(7);
/// let mut b = SplitMix64::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// assert!((0.0..1.0).contains(&a.uniform_f32()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator for `seed` (the state is `seed` mixed with the increment,
    /// so seed 0 is as good as any other).
    pub fn new(seed: u64) -> Self {
        SplitMix64::from_state(seed ^ GOLDEN)
    }

    /// A generator whose raw state is `state`.
    pub const fn from_state(state: u64) -> Self {
        SplitMix64 { state }
    }

    /// A stream for one `(seed, index)` pair (e.g. a calibration sample);
    /// different indices give unrelated streams, so work split over threads
    /// draws the same numbers in any order.
    pub fn for_stream(seed: u64, index: u64) -> Self {
        let mut base = SplitMix64::from_state(seed);
        let mixed = base.next_u64() ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut s = SplitMix64::from_state(mixed);
        s.next_u64();
        s
    }

    /// The raw state (e.g. to derive a second, independent stream).
    pub const fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`) by Lemire's multiply-shift; the bias is
    /// below `n / 2^64`.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `0..n` (`n > 0`) by the remainder of the next draw (bias
    /// below `n / 2^64`); kept because the synthetic data and initializations
    /// of the companion crates were drawn this way.
    pub fn below_by_remainder(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `min(want, n)` distinct indices of `0..n`, drawn by a Fisher-Yates shuffle
/// seeded with `seed`, in increasing order: how the `vlmq` command, the
/// one-call API and the examples pick calibration samples, so that one seed
/// picks the same samples in every tool.
///
/// ```
/// let picked = vlmq::sample_indices(10, 4, 0);
/// assert_eq!(picked.len(), 4);
/// assert!(picked.windows(2).all(|p| p[0] < p[1]) && picked[3] < 10);
/// assert_eq!(picked, vlmq::sample_indices(10, 4, 0));
/// assert_eq!(vlmq::sample_indices(3, 8, 1), vec![0, 1, 2]);
/// ```
pub fn sample_indices(n: usize, want: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::from_state(seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v.truncate(want);
    v.sort_unstable();
    v
}
