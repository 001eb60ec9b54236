//! Pieces every vision tower's block shares: the hooks a block run shows
//! (input capture, output probes), norms that keep what their hand-written
//! backward reads, and the MLP activations.

use candle_core::{Tensor, D};
use vlmq::RowSink;

use crate::models::clip::LayerNorm;
use crate::models::llama::forward::{linear, linear_plus, show_rows};
use crate::models::llama::weights::Linear;

/// What one block run shows, for a block whose linears are named `names`.
pub(crate) struct BlockHooks<'a, 'p> {
    /// Receives every linear's input rows (forward capture).
    pub capture: Option<&'a mut dyn RowSink>,
    /// Tensors added to each linear's output, in `names` order (the
    /// finite-difference tests perturb linear outputs through them).
    pub probes: Option<&'p [Tensor]>,
    /// The block's linear names, in forward order.
    pub names: &'static [&'static str],
}

impl<'a, 'p> BlockHooks<'a, 'p> {
    /// Capture and probes as given, for linears named `names`.
    pub(crate) fn new(
        names: &'static [&'static str],
        capture: Option<&'a mut dyn RowSink>,
        probes: Option<&'p [Tensor]>,
    ) -> Self {
        BlockHooks {
            capture,
            probes,
            names,
        }
    }

    /// Shows `x` to the capture as the input of the linears `idx`.
    pub(crate) fn show(&mut self, idx: &[usize], x: &Tensor) -> candle_core::Result<()> {
        let names = self.names;
        match self.capture.as_deref_mut() {
            Some(sink) => show_rows(sink, idx.iter().map(|&i| names[i]), x),
            None => Ok(()),
        }
    }

    /// Linear `i` (`l`) on `x`, plus its probe when given.
    pub(crate) fn lin(&self, i: usize, x: &Tensor, l: &Linear) -> candle_core::Result<Tensor> {
        let y = linear(x, l)?;
        match self.probes.and_then(|p| p.get(i)) {
            Some(p) => y + p,
            None => Ok(y),
        }
    }

    /// `r + lin(i, x, l)`: the residual stream `r` plus linear `i` on `x`,
    /// added in the product's memory when no probe is given.
    pub(crate) fn lin_plus(
        &self,
        i: usize,
        x: &Tensor,
        l: &Linear,
        r: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.probes.and_then(|p| p.get(i)) {
            Some(_) => r + self.lin(i, x, l)?,
            None => linear_plus(x, l, Some(r)),
        }
    }
}

/// What a norm's backward reads: the normalized input `xhat` and the
/// reciprocal scale `r` (`[.., 1]`), for LayerNorm (`centered`:
/// `xhat = (x - mean(x)) r`, `r = (var(x) + eps)^(-1/2)`) or RMSNorm
/// (`xhat = x r`, `r = (mean(x^2) + eps)^(-1/2)`).
pub(crate) struct NormTape {
    pub xhat: Tensor,
    pub r: Tensor,
    pub centered: bool,
}

/// LayerNorm `xhat * w + b` over the last dimension, with its [`NormTape`].
pub(crate) fn layer_norm_keep(
    x: &Tensor,
    n: &LayerNorm,
    eps: f64,
) -> candle_core::Result<(Tensor, NormTape)> {
    let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let r = (c.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = c.broadcast_mul(&r)?;
    let h = xhat.broadcast_mul(&n.weight)?.broadcast_add(&n.bias)?;
    let tape = NormTape {
        xhat,
        r,
        centered: true,
    };
    Ok((h, tape))
}

/// RMSNorm `xhat * w` over the last dimension, with its [`NormTape`].
pub(crate) fn rms_norm_keep(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, NormTape)> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = x.broadcast_mul(&r)?;
    let h = xhat.broadcast_mul(w)?;
    let tape = NormTape {
        xhat,
        r,
        centered: false,
    };
    Ok((h, tape))
}

/// The MLP activation of a vision block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MlpAct {
    /// CLIP's and Qwen2-VL's `z * sigmoid(1.702 z)`.
    QuickGelu,
    /// The tanh approximation of GELU (SigLIP's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl MlpAct {
    /// The activation of `z`.
    pub(crate) fn apply(self, z: &Tensor) -> candle_core::Result<Tensor> {
        crate::backend::activation::activation(self, z)
    }
}
