//! LayerNorm and RMSNorm over the feature axis of `[tokens, d]` rows.

use ndarray::{Array1, Array2, ArrayView2, ArrayViewD, ArrayViewMutD, Axis, Zip};

use super::params::{join, Grads, Module};
use vlmq::error::{Error, Result};

/// Which normalization a block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// LayerNorm with scale and shift.
    Layer,
    /// RMSNorm with scale only.
    Rms,
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * weight + bias`, per row.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale, length `d`.
    pub weight: Array1<f32>,
    /// Shift, length `d`.
    pub bias: Array1<f32>,
    /// Variance floor.
    pub eps: f32,
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`, per row.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale, length `d`.
    pub weight: Array1<f32>,
    /// Mean-square floor.
    pub eps: f32,
}

/// A normalization layer of either kind.
#[derive(Debug, Clone)]
pub enum Norm {
    /// LayerNorm.
    Layer(LayerNorm),
    /// RMSNorm.
    Rms(RmsNorm),
}

/// What a norm's backward needs: the normalized rows and each row's inverse scale.
#[derive(Debug, Clone)]
pub struct NormCache {
    xhat: Array2<f32>,
    rstd: Array1<f32>,
}

impl Norm {
    /// A norm of `kind` over `d` features with unit scale, zero shift and `eps = 1e-5`.
    pub fn new(kind: NormKind, d: usize) -> Self {
        match kind {
            NormKind::Layer => Norm::Layer(LayerNorm {
                weight: Array1::ones(d),
                bias: Array1::zeros(d),
                eps: 1e-5,
            }),
            NormKind::Rms => Norm::Rms(RmsNorm {
                weight: Array1::ones(d),
                eps: 1e-5,
            }),
        }
    }

    /// Number of features.
    pub fn dim(&self) -> usize {
        match self {
            Norm::Layer(n) => n.weight.len(),
            Norm::Rms(n) => n.weight.len(),
        }
    }

    fn weight(&self) -> &Array1<f32> {
        match self {
            Norm::Layer(n) => &n.weight,
            Norm::Rms(n) => &n.weight,
        }
    }

    /// Forward pass over `x: [tokens, d]`.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<(Array2<f32>, NormCache)> {
        let d = self.dim();
        if x.ncols() != d {
            return Err(Error::shape("norm input columns", &[d], &[x.ncols()]));
        }
        let centered = matches!(self, Norm::Layer(_));
        let eps = match self {
            Norm::Layer(n) => n.eps,
            Norm::Rms(n) => n.eps,
        };
        let mut xhat = x.to_owned();
        let mut rstd = Array1::<f32>::zeros(x.nrows());
        Zip::from(xhat.rows_mut())
            .and(&mut rstd)
            .for_each(|mut row, r| {
                if centered {
                    let mean = row.sum() / d as f32;
                    row.mapv_inplace(|v| v - mean);
                }
                let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = 1.0 / (ms + eps).sqrt();
                let s = *r;
                row.mapv_inplace(|v| v * s);
            });
        let mut y = &xhat * self.weight();
        if let Norm::Layer(n) = self {
            y += &n.bias;
        }
        Ok((y, NormCache { xhat, rstd }))
    }

    /// Backward pass: returns `dL/dx`; accumulates `prefix + "weight"` (and
    /// `prefix + "bias"` for LayerNorm) when `grads` is given.
    pub fn backward(
        &self,
        cache: &NormCache,
        g: ArrayView2<'_, f32>,
        grads: Option<&mut Grads>,
        prefix: &str,
    ) -> Result<Array2<f32>> {
        if g.dim() != cache.xhat.dim() {
            return Err(Error::shape(
                "norm output gradient",
                cache.xhat.shape(),
                g.shape(),
            ));
        }
        let d = self.dim() as f32;
        let centered = matches!(self, Norm::Layer(_));
        if let Some(grads) = grads {
            let gw = (&g * &cache.xhat).sum_axis(Axis(0));
            grads.accumulate(&join(prefix, "weight"), gw.view());
            if centered {
                grads.accumulate(&join(prefix, "bias"), g.sum_axis(Axis(0)).view());
            }
        }
        let mut dx = &g * self.weight();
        Zip::from(dx.rows_mut())
            .and(cache.xhat.rows())
            .and(&cache.rstd)
            .for_each(|mut dxh, xh, &r| {
                let mean_g = if centered { dxh.sum() / d } else { 0.0 };
                let mean_gx = dxh.iter().zip(xh.iter()).map(|(a, b)| a * b).sum::<f32>() / d;
                Zip::from(&mut dxh)
                    .and(&xh)
                    .for_each(|v, &xv| *v = r * (*v - mean_g - xv * mean_gx));
            });
        Ok(dx)
    }
}

impl Module for Norm {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        match self {
            Norm::Layer(n) => {
                f(&join(prefix, "weight"), n.weight.view().into_dyn());
                f(&join(prefix, "bias"), n.bias.view().into_dyn());
            }
            Norm::Rms(n) => f(&join(prefix, "weight"), n.weight.view().into_dyn()),
        }
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        match self {
            Norm::Layer(n) => {
                f(&join(prefix, "weight"), n.weight.view_mut().into_dyn());
                f(&join(prefix, "bias"), n.bias.view_mut().into_dyn());
            }
            Norm::Rms(n) => f(&join(prefix, "weight"), n.weight.view_mut().into_dyn()),
        }
    }
}
