//! Deterministic weight rows for the block-fit tests: values in [-1, 1]
//! from a multiplicative hash of the index and a seed, every seventh one
//! shifted up, so blocks are neither symmetric nor uniform.

/// `n` values for `seed`.
pub(crate) fn row(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8;
            (h % 2001) as f32 / 1000.0 - 1.0 + if i % 7 == 0 { 0.3 } else { 0.0 }
        })
        .collect()
}
