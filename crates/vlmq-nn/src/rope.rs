//! Rotary position embeddings (half-split convention) applied per head.

use ndarray::{s, Array2};

/// Rotary embedding: in every head, feature pairs `(i, i + hd/2)` at token
/// position `p` are rotated by the angle `p * base^(-2i/hd)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// The frequency base (10000 in most models).
    pub base: f32,
}

impl Rope {
    /// Rotary embedding with the given base.
    pub fn new(base: f32) -> Self {
        Rope { base }
    }

    /// Rotates every head of `x: [tokens, heads * head_dim]` in place (token
    /// `t` at position `t`). With `inverse`, applies the transposed rotation,
    /// which is the vector-Jacobian product of the forward rotation.
    /// `head_dim` must be even (checked by the attention config).
    pub fn rotate(&self, x: &mut Array2<f32>, head_dim: usize, inverse: bool) {
        let half = head_dim / 2;
        let heads = x.ncols() / head_dim;
        let freqs: Vec<f32> = (0..half)
            .map(|i| self.base.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut angles = vec![(0.0f32, 0.0f32); half];
        for (t, mut row) in x.rows_mut().into_iter().enumerate() {
            // One (sin, cos) per frequency and position, shared by every head.
            for (slot, &f) in angles.iter_mut().zip(&freqs) {
                let (sin, cos) = (t as f32 * f).sin_cos();
                *slot = (sign * sin, cos);
            }
            for h in 0..heads {
                let mut head = row.slice_mut(s![h * head_dim..(h + 1) * head_dim]);
                for (i, &(sin, cos)) in angles.iter().enumerate() {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos - b * sin;
                    head[i + half] = a * sin + b * cos;
                }
            }
        }
    }
}
