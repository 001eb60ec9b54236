//! Deterministic test data shared by the integration tests.
#![allow(dead_code)]

use ndarray::Array2;

pub mod tiny;

/// Test data draws on `vlmq::__private::SplitMix64`.
pub struct Rng(vlmq::__private::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(vlmq::__private::SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform_f64()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0.below_by_remainder(n)
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
