//! Deterministic test data shared by the integration tests.
#![allow(dead_code)]

use ndarray::Array2;

/// SplitMix64: a tiny, well-mixed deterministic generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A weight `[m, n]` with standard normal entries.
pub fn weight(rng: &mut Rng, m: usize, n: usize) -> Array2<f32> {
    Array2::from_shape_fn((m, n), |_| rng.normal())
}

/// Correlated layer inputs `[tokens, n]`: a low-rank shared part plus
/// per-feature noise, with per-feature scales spread over a decade, the
/// kind of structure that makes GPTQ's error feedback matter.
pub fn inputs(rng: &mut Rng, tokens: usize, n: usize) -> Array2<f32> {
    let rank = (n / 4).max(1);
    let basis = Array2::from_shape_fn((rank, n), |_| rng.normal());
    let scale: Vec<f32> = (0..n)
        .map(|_| 10f32.powf(rng.uniform() as f32 - 0.5))
        .collect();
    let mut x = Array2::<f32>::zeros((tokens, n));
    for t in 0..tokens {
        let coef: Vec<f32> = (0..rank).map(|_| rng.normal()).collect();
        for j in 0..n {
            let mut v = 0.3 * rng.normal();
            for (r, c) in coef.iter().enumerate() {
                v += c * basis[[r, j]];
            }
            x[[t, j]] = v * scale[j];
        }
    }
    x
}
