//! The decoder layer's backward pass, written out by hand.
//!
//! The importance pass needs, for `L = sum(layer(x) * grad_output)`, the
//! gradient at the layer input and at every linear's output, never the
//! gradient of a weight. Going through candle's autograd for that builds a
//! graph of every elementwise op, zero-fills and adds a gradient buffer per
//! node, and composes the fused softmax and RMSNorm from primitives so they
//! can be differentiated. Here the forward pass keeps a [`Tape`](crate::models::llama::forward::Tape) of the
//! intermediates (with the fused softmax) and the chain rule is applied
//! directly, one tensor op per term:
//!
//! - a linear, attention and RoPE: [`crate::backend::chain_rule`];
//! - SwiGLU `a = silu(g) * u`: `du = da * silu(g)`,
//!   `dg = da * u * s * (1 + g * (1 - s))` with `s = sigmoid(g)`;
//! - RMSNorm `h = x * r * w`, `r = (mean(x^2) + eps)^(-1/2)` over `n`
//!   features: `dx = r * z - x * r^3 * sum(z * x) / n` with `z = dh * w`;
//! - a KV head shared by several query heads sums their gradients;
//! - the head's mean cross-entropy over `n` target rows, logits `z = h W^T`:
//!   `dz = (softmax(z) - onehot(next)) / n`, so `dh = (softmax(z) W - W[next]) / n`
//!   (the one-hot term is a row gather, never a `[rows, vocab]` tensor).
//!
//! The finite-difference checks in f64 (`grad_tests`) cover every term.

use candle_core::{Tensor, D};

use crate::backend::chain_rule::{attention_backward, input_grad, rotary_backward, BlockGradients};
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::forward::{layer_tape, rms_norm_keep, Positional};
use crate::models::llama::head::Head;
use crate::models::llama::weights::LayerWeights;

/// Runs layer `l` forward on `x` keeping its tape, then back from
/// `grad_output`: the gradient at the layer input `[B, T, hidden]` and at
/// each linear's output `[B, T, out]` in
/// [`crate::models::llama::weights::LINEAR_NAMES`] order.
pub(crate) fn layer_backward(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    x: &Tensor,
    pos: &Positional,
    grad_output: &Tensor,
) -> candle_core::Result<BlockGradients> {
    let tape = layer_tape(cfg, l, x, pos)?;
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let w = |i: usize| &l.linears[i].weight;
    let dy = grad_output.to_dtype(x.dtype())?;

    // MLP: out = mid + down(silu(gate) * up).
    let d_down = dy.clone();
    let d_act = input_grad(&d_down, w(6))?;
    let s = sigmoid(&tape.gate)?;
    let silu = (&tape.gate * &s)?;
    let d_up = (&d_act * &silu)?;
    let dsilu = (&s * ((&tape.gate * (1.0 - &s)?)? + 1.0)?)?;
    let d_gate = ((&d_act * &tape.up)? * dsilu)?;
    let d_h = (input_grad(&d_gate, w(4))? + input_grad(&d_up, w(5))?)?;
    let d_mid = (&dy + rms_norm_backward(&tape.mid, &tape.r_mid, &l.post_norm, &d_h)?)?;

    // Attention: mid = x + o_proj(att).
    let d_o = d_mid.clone();
    let d_att = input_grad(&d_o, w(3))?
        .reshape((b, t, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let c = 1.0 / (hd as f64).sqrt();
    let (d_q, d_k, d_v) =
        attention_backward(&tape.q, &tape.k, &tape.v, &tape.probs, &d_att, c, false)?;
    let (d_k, d_v) = if nh == nkv {
        (d_k, d_v)
    } else {
        let fold = |z: &Tensor| z.reshape((b, nkv, nh / nkv, t, hd))?.sum(2);
        (fold(&d_k)?, fold(&d_v)?)
    };
    let d_q = rotary_backward(&d_q, &pos.cos, &pos.sin)?;
    let d_k = rotary_backward(&d_k, &pos.cos, &pos.sin)?;
    let heads_to_rows = |z: Tensor, heads: usize| z.transpose(1, 2)?.reshape((b, t, heads * hd));
    let d_q = heads_to_rows(d_q, nh)?;
    let d_k = heads_to_rows(d_k, nkv)?;
    let d_v = heads_to_rows(d_v, nkv)?;
    let d_h = ((input_grad(&d_q, w(0))? + input_grad(&d_k, w(1))?)? + input_grad(&d_v, w(2))?)?;
    let d_x = (&d_mid + rms_norm_backward(x, &tape.r_in, &l.input_norm, &d_h)?)?;

    Ok(BlockGradients {
        input: d_x,
        linear_outputs: vec![d_q, d_k, d_v, d_o, d_gate, d_up, d_down],
    })
}

/// Cross-entropy of the head on some rows of the last layer's output.
pub(crate) struct HeadLoss {
    /// Sum over the rows of `-log softmax(z)[next]` (not yet divided by `n`).
    pub loss_sum: f64,
    /// Gradient of the mean loss over `n` rows at the rows `x`: `[rows, hidden]`.
    pub grad: Tensor,
}

/// Final RMSNorm (`norm`, `eps`) and head `head: [vocab, hidden]` on the rows
/// `x: [rows, hidden]` predicting `next`, with the gradient of the loss
/// averaged over `n` rows in all. One fused softmax and two products over the
/// `[rows, vocab]` logits, each a slice of the head at a time; the
/// log-sum-exp comes from the largest probability (`lse = max z - ln max p`,
/// with `max p >= 1 / vocab`), so no probability is taken the log of where
/// it could underflow.
pub(crate) fn head_loss_backward(
    x: &Tensor,
    norm: &Tensor,
    eps: f64,
    head: &Head,
    next: &[u32],
    n: usize,
) -> candle_core::Result<HeadLoss> {
    let (normed, r) = rms_norm_keep(x, norm, eps)?;
    let logits = head.logits(&normed)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?;
    let idx = Tensor::from_vec(next.to_vec(), next.len(), x.device())?;
    let picked = logits.gather(&idx.unsqueeze(1)?, 1)?.squeeze(1)?;
    let lse = (logits.max(D::Minus1)? - probs.max(D::Minus1)?.log()?)?;
    let loss_sum = (lse - picked)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let d_normed = ((head.times(&probs)? - head.rows(&idx)?)? / n as f64)?;
    let grad = rms_norm_backward(x, &r, norm, &d_normed)?;
    Ok(HeadLoss { loss_sum, grad })
}

/// `1 / (1 + exp(-z))`.
fn sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

/// The RMSNorm backward of the module docs, given the kept reciprocal `r`.
fn rms_norm_backward(
    x: &Tensor,
    r: &Tensor,
    weight: &Tensor,
    dh: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let z = dh.broadcast_mul(weight)?;
    let zx = (&z * x)?.sum_keepdim(D::Minus1)?;
    let coef = ((r.powf(3.0)? * zx)? / n)?;
    z.broadcast_mul(r)? - x.broadcast_mul(&coef)?
}
