//! Linear layer `y = x W^T + b`, with a weight that is dense or held by a
//! pluggable kernel (e.g. a packed quantized weight).

use std::fmt;
use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayView2, ArrayViewD, ArrayViewMutD, Axis};

use super::params::{join, Grads, Module};
use vlmq::__private::{matmul, matmul_into};
use vlmq::error::{Error, Result};

/// A weight representation that can run a linear layer's forward pass
/// without a dense `[out, in]` matrix, e.g. a packed quantized weight.
///
/// To run a linear from packed weights, implement this trait for the packed
/// type (a few lines that forward to its own matmul and dequantizer) and
/// install it with [`Linear::set_kernel`] (or
/// [`TransformerBlock::set_linear_kernel`](super::TransformerBlock::set_linear_kernel)).
/// For the crate's packed linear that is, in outline:
///
/// ```ignore
/// impl LinearKernel for PackedLinear {
///     fn in_features(&self) -> usize { self.in_features() }
///     fn out_features(&self) -> usize { self.out_features() }
///     fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> { PackedLinear::forward(self, x) }
///     fn dense_weight(&self) -> Result<Array2<f32>> { Ok(self.dequantize()) }
/// }
/// block.set_linear_kernel("mlp.down", Arc::new(packed))?;
/// ```
///
/// A kernel linear is frozen: it gets no parameter gradients and is skipped
/// by [`Module`] visits (so by Adam and the safetensors io); its bias, if
/// any, is still added by the [`Linear`].
pub trait LinearKernel: Send + Sync {
    /// Input features.
    fn in_features(&self) -> usize;
    /// Output features.
    fn out_features(&self) -> usize;
    /// `x W^T` for `x: [tokens, in]` (no bias: the [`Linear`] adds it).
    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>>;
    /// The dense weight `[out, in]` it represents (used by backward passes).
    fn dense_weight(&self) -> Result<Array2<f32>>;
}

/// How a [`Linear`] holds its weight.
#[derive(Clone)]
pub enum LinearWeight {
    /// A dense trainable `[out, in]` matrix.
    Dense(Array2<f32>),
    /// A frozen kernel (not trained, not saved by the dense parameter io).
    Kernel(Arc<dyn LinearKernel>),
}

impl fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinearWeight::Dense(w) => write!(f, "Dense({:?})", w.dim()),
            LinearWeight::Kernel(k) => {
                write!(f, "Kernel({}x{})", k.out_features(), k.in_features())
            }
        }
    }
}

/// A linear layer with an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, `[out, in]`.
    pub weight: LinearWeight,
    /// Optional bias of length `out`.
    pub bias: Option<Array1<f32>>,
}

/// What [`Linear::backward`] needs: the layer input.
#[derive(Debug, Clone)]
pub struct LinearCache {
    input: Array2<f32>,
}

impl LinearCache {
    /// The layer input the cache holds (`tokens x in`).
    pub fn input(&self) -> ArrayView2<'_, f32> {
        self.input.view()
    }
}

impl Linear {
    /// A linear from a dense weight `[out, in]` and optional bias.
    pub fn new(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(Error::shape("linear bias", &[weight.nrows()], &[b.len()]));
            }
        }
        Ok(Linear {
            weight: LinearWeight::Dense(weight),
            bias,
        })
    }

    /// A randomly initialized linear (normal weights with std `1/sqrt(in)`, zero bias).
    pub fn init(rng: &mut super::Rng, in_features: usize, out_features: usize, bias: bool) -> Self {
        let std = 1.0 / (in_features.max(1) as f32).sqrt();
        Linear {
            weight: LinearWeight::Dense(rng.normal_matrix(out_features, in_features, std)),
            bias: bias.then(|| Array1::zeros(out_features)),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.ncols(),
            LinearWeight::Kernel(k) => k.in_features(),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.nrows(),
            LinearWeight::Kernel(k) => k.out_features(),
        }
    }

    /// The dense weight `[out, in]` (materialized from a kernel when needed).
    pub fn dense_weight(&self) -> Result<Array2<f32>> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Kernel(k) => k.dense_weight(),
        }
    }

    /// Replaces the weight with a dense one of the same shape.
    pub fn set_weight(&mut self, w: ArrayView2<'_, f32>) -> Result<()> {
        let expected = [self.out_features(), self.in_features()];
        if w.shape() != expected {
            return Err(Error::shape("linear weight", &expected, w.shape()));
        }
        self.weight = LinearWeight::Dense(w.to_owned());
        Ok(())
    }

    /// Runs this linear through `kernel` from now on (same shape required).
    pub fn set_kernel(&mut self, kernel: Arc<dyn LinearKernel>) -> Result<()> {
        let expected = [self.out_features(), self.in_features()];
        let actual = [kernel.out_features(), kernel.in_features()];
        if actual != expected {
            return Err(Error::shape("linear kernel", &expected, &actual));
        }
        self.weight = LinearWeight::Kernel(kernel);
        Ok(())
    }

    /// `x W^T + b` without a cache.
    pub fn apply(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        if x.ncols() != self.in_features() {
            return Err(Error::shape(
                "linear input columns",
                &[self.in_features()],
                &[x.ncols()],
            ));
        }
        let mut y = match &self.weight {
            LinearWeight::Dense(w) => matmul(x, w.t()),
            LinearWeight::Kernel(k) => {
                let y = k.forward(x)?;
                if y.dim() != (x.nrows(), self.out_features()) {
                    return Err(Error::shape(
                        "linear kernel output",
                        &[x.nrows(), self.out_features()],
                        y.shape(),
                    ));
                }
                y
            }
        };
        if let Some(b) = &self.bias {
            y += b;
        }
        Ok(y)
    }

    /// Forward pass: output `[tokens, out]` and the cache for backward.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<(Array2<f32>, LinearCache)> {
        let y = self.apply(x)?;
        Ok((
            y,
            LinearCache {
                input: x.to_owned(),
            },
        ))
    }

    /// Backward pass: returns `dL/dx = g W`; accumulates `dL/dW = g^T x` into
    /// `prefix + "weight"` and `dL/db` into `prefix + "bias"` when `grads` is given.
    pub fn backward(
        &self,
        cache: &LinearCache,
        g: ArrayView2<'_, f32>,
        grads: Option<&mut Grads>,
        prefix: &str,
    ) -> Result<Array2<f32>> {
        let expected = [cache.input.nrows(), self.out_features()];
        if g.shape() != expected {
            return Err(Error::shape("linear output gradient", &expected, g.shape()));
        }
        let dx = match &self.weight {
            LinearWeight::Dense(w) => matmul(g, w.view()),
            LinearWeight::Kernel(k) => matmul(g, k.dense_weight()?.view()),
        };
        if let Some(grads) = grads {
            if let LinearWeight::Dense(_) = self.weight {
                let mut dw = Array2::<f32>::zeros((self.out_features(), self.in_features()));
                matmul_into(dw.view_mut(), g.t(), cache.input.view(), 1.0, false);
                grads.accumulate(&join(prefix, "weight"), dw.view());
                if self.bias.is_some() {
                    grads.accumulate(&join(prefix, "bias"), g.sum_axis(Axis(0)).view());
                }
            }
        }
        Ok(dx)
    }
}

impl Module for Linear {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        if let LinearWeight::Dense(w) = &self.weight {
            f(&join(prefix, "weight"), w.view().into_dyn());
            if let Some(b) = &self.bias {
                f(&join(prefix, "bias"), b.view().into_dyn());
            }
        }
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        if let LinearWeight::Dense(w) = &mut self.weight {
            f(&join(prefix, "weight"), w.view_mut().into_dyn());
            if let Some(b) = &mut self.bias {
                f(&join(prefix, "bias"), b.view_mut().into_dyn());
            }
        }
    }
}
