//! A tiny deterministic random number generator for parameter initialization.

use ndarray::{Array1, Array2};
use vlmq::__private::SplitMix64;

/// Normal draws and random matrices on the core's SplitMix64 stream:
/// deterministic, seedable, good enough for initialization and tests.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.0.uniform_f32()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below_by_remainder(n)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// A `[rows, cols]` matrix of normal values times `std`.
    pub fn normal_matrix(&mut self, rows: usize, cols: usize, std: f32) -> Array2<f32> {
        Array2::from_shape_simple_fn((rows, cols), || self.normal() * std)
    }

    /// A vector of normal values times `std`.
    pub fn normal_vector(&mut self, n: usize, std: f32) -> Array1<f32> {
        Array1::from_shape_simple_fn(n, || self.normal() * std)
    }
}
