//! The Qwen2-VL / Qwen2.5-VL vision block's backward pass, written out by
//! hand as the decoder's is ([`crate::backend::llama_backward`]): the
//! forward keeps a [`VisionBlockTape`] and the chain rule runs one tensor op
//! per term ([`crate::backend::chain_rule`]): the norms, attention within
//! each segment, the 2-D rotation of queries and keys (the same half-split
//! rotation as the decoder's RoPE, other tables), the fused `qkv`'s output
//! as the three gradients side by side, and the MLP (quick-GELU, or SwiGLU
//! `a = silu(g) * u`: `du = da * silu(g)`,
//! `dg = da * u * s * (1 + g * (1 - s))` with `s = sigmoid(g)`).

use candle_core::Tensor;

use crate::backend::activation::activation_backward;
use crate::backend::chain_rule::{
    input_grad, norm_backward, pieced_attention_backward, rotary_backward, BlockGradients,
};
use crate::models::qwen2_vl::vision::{VisionBlock, VisionPositions};
use crate::models::qwen2_vl::vision_block::{block_tape, MlpTape, VisionBlockTape};
use crate::models::qwen2_vl::QwenVisionConfig;
use crate::models::vision_ops::MlpAct;

/// Runs block `b` forward on `x: [1, S, d]` keeping its tape, then back
/// from `grad_output`: the gradient at the input and at each linear's
/// output in [`VisionBlock::linear_names`] order.
pub(crate) fn vision_block_backward(
    cfg: &QwenVisionConfig,
    b: &VisionBlock,
    x: &Tensor,
    pos: &VisionPositions,
    windowed: bool,
    grad_output: &Tensor,
) -> candle_core::Result<BlockGradients> {
    let t = block_tape(cfg, b, x, pos, windowed)?;
    let w = |i: usize| &b.linears[i].weight;
    let dy = grad_output.to_dtype(x.dtype())?;

    // MLP: out = mid + last(mlp(norm2(mid))).
    let last = b.linears.len() - 1;
    let d_last = dy.clone();
    let d_a = input_grad(&d_last, w(last))?;
    let (mut linear_outputs, d_h) = match &t.mlp {
        MlpTape::QuickGelu { fc1 } => {
            let d_fc1 = activation_backward(MlpAct::QuickGelu, fc1, &d_a)?;
            let d_h = input_grad(&d_fc1, w(2))?;
            (vec![d_fc1], d_h)
        }
        MlpTape::SwiGlu { gate, up } => {
            let s = candle_nn::ops::sigmoid(gate)?;
            let d_up = (&d_a * (gate * &s)?)?;
            let dsilu = (&s * ((gate * (1.0 - &s)?)? + 1.0)?)?;
            let d_gate = ((&d_a * up)? * dsilu)?;
            let d_h = (input_grad(&d_gate, w(2))? + input_grad(&d_up, w(3))?)?;
            (vec![d_gate, d_up], d_h)
        }
    };
    linear_outputs.push(d_last);
    let d_mid = (&dy + norm_backward(&t.norm2, b.norm2.weight(), &d_h)?)?;

    // Attention: mid = x + proj(att).
    let d_proj = d_mid.clone();
    let (d_qkv, d_h) = attention_input_grads(cfg, b, &t, pos, &d_proj)?;
    let d_x = (&d_mid + norm_backward(&t.norm1, b.norm1.weight(), &d_h)?)?;
    let mut outputs = vec![d_qkv, d_proj];
    outputs.append(&mut linear_outputs);
    Ok(BlockGradients {
        input: d_x,
        linear_outputs: outputs,
    })
}

/// From the gradient at `proj`'s output: the gradient at `qkv`'s output
/// `[1, S, 3d]` and at `norm1`'s output.
fn attention_input_grads(
    cfg: &QwenVisionConfig,
    b: &VisionBlock,
    t: &VisionBlockTape,
    pos: &VisionPositions,
    d_proj: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, s, d) = d_proj.dims3()?;
    let (nh, hd) = (cfg.num_heads, cfg.head_dim());
    let d_att = input_grad(d_proj, &b.linears[1].weight)?
        .reshape((s, nh, hd))?
        .transpose(0, 1)?
        .contiguous()?;
    let (d_q, d_k, d_v) = pieced_attention_backward(&t.attention, &d_att)?;
    let d_q = rotary_backward(&d_q, &pos.cos, &pos.sin)?;
    let d_k = rotary_backward(&d_k, &pos.cos, &pos.sin)?;
    // [3, heads, S, hd] -> [S, 3, heads, hd]: qkv's output layout.
    let d_qkv = Tensor::stack(&[d_q, d_k, d_v], 0)?
        .permute((2, 0, 1, 3))?
        .reshape((1, s, 3 * d))?;
    let d_h = input_grad(&d_qkv, &b.linears[0].weight)?;
    Ok((d_qkv, d_h))
}
