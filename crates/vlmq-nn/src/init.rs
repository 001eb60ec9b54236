//! A tiny deterministic random number generator for parameter initialization.

use ndarray::{Array1, Array2};

/// SplitMix64: deterministic, seedable, good enough for initialization and tests.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
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
