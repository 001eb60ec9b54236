//! The synthetic "redundant vision tokens" layer shared by
//! tests/vlmq_synthetic.rs and examples/redundant_vision.rs.
//!
//! Vision tokens are near-duplicates of a few prototypes (background patches)
//! with large norms; text tokens are few, diverse and small. Under GPTQ the
//! Hessian is almost all vision, so the solver spends its error feedback on
//! directions only the vision tokens use. The task gradient says otherwise:
//! text tokens carry the loss, vision tokens barely matter.

use ndarray::{Array1, Array2};
use vlmq::importance::{grad_sq_norms, GradientSaliency, SampleSignals, TokenImportance};
use vlmq::{Modality, TokenInfo};

use crate::common::Rng;

/// One calibration set of the synthetic layer.
pub struct RedundantLayer {
    /// Weight `[out, in]`.
    pub w: Array2<f32>,
    /// Calibration inputs `[tokens, in]`, vision rows first.
    pub x: Array2<f32>,
    /// Modality of each row.
    pub tokens: TokenInfo,
    /// Per-token output gradients `[tokens, out]` (text large, vision small).
    pub grads: Array2<f32>,
    /// Held-out text tokens `[tokens, in]` drawn like the calibration text.
    pub text_eval: Array2<f32>,
}

/// Builds the layer: `vision` tokens around `prototypes` centres, `text`
/// informative tokens, `n` input and `m` output features.
pub fn redundant_layer(
    seed: u64,
    n: usize,
    m: usize,
    vision: usize,
    text: usize,
) -> RedundantLayer {
    let mut rng = Rng::new(seed);
    let w = Array2::from_shape_fn((m, n), |_| rng.normal());
    let prototypes = 4;
    let protos = Array2::from_shape_fn((prototypes, n), |_| 3.0 * rng.normal());
    // Text lives mostly in its own random subspace, with per-feature scales.
    let rank = n / 8;
    let basis = Array2::from_shape_fn((rank, n), |_| rng.normal() / (rank as f32).sqrt());
    let text_row = |rng: &mut Rng| -> Array1<f32> {
        let c = Array1::from_shape_fn(rank, |_| rng.normal());
        c.dot(&basis) + &Array1::from_shape_fn(n, |_| 0.1 * rng.normal())
    };
    let mut x = Array2::<f32>::zeros((vision + text, n));
    for t in 0..vision {
        let p = protos.row(rng.below(prototypes)).to_owned();
        let noise = Array1::from_shape_fn(n, |_| 0.05 * rng.normal());
        x.row_mut(t).assign(&(p + noise));
    }
    for t in 0..text {
        let r = text_row(&mut rng);
        x.row_mut(vision + t).assign(&r);
    }
    let mut text_eval = Array2::<f32>::zeros((256, n));
    for t in 0..256 {
        let r = text_row(&mut rng);
        text_eval.row_mut(t).assign(&r);
    }
    let mut modality = vec![Modality::Vision; vision];
    modality.extend(vec![Modality::Text; text]);
    let grads = Array2::from_shape_fn((vision + text, m), |(t, _)| {
        let scale = if t < vision { 0.02 } else { 1.0 };
        scale * rng.normal()
    });
    RedundantLayer {
        w,
        x,
        tokens: TokenInfo::new(modality),
        grads,
        text_eval,
    }
}

impl RedundantLayer {
    /// VLMQ factors from the synthetic gradients with the default scorer.
    pub fn informative_factors(&self) -> Array1<f32> {
        let norms = grad_sq_norms(&[self.grads.view()]).expect("synthetic gradients are finite");
        GradientSaliency::default()
            .factors(&SampleSignals::new(&self.tokens, 0).with_grad_sq_norms(norms.view()))
            .expect("synthetic gradients are finite")
    }

    /// Relative output error on held-out text tokens:
    /// `sum_t ||(W - Q) x_t||^2 / sum_t ||W x_t||^2`.
    pub fn text_error(&self, q: &Array2<f32>) -> f64 {
        let d = &self.w - q;
        let err = self
            .text_eval
            .dot(&d.t())
            .mapv(|v| f64::from(v).powi(2))
            .sum();
        let base = self
            .text_eval
            .dot(&self.w.t())
            .mapv(|v| f64::from(v).powi(2))
            .sum();
        err / base
    }
}
