//! The pre-LN ViT encoder layer's backward pass (CLIP, SigLIP), written out
//! by hand as the decoder's is ([`crate::backend::llama_backward`]): the
//! forward keeps an [`EncoderTape`](crate::models::vit_encoder::EncoderTape)
//! and the chain rule runs one tensor op per term
//! ([`crate::backend::chain_rule`]), with no weight gradients.

use candle_core::Tensor;

use crate::backend::activation::activation_backward;
use crate::backend::chain_rule::{
    input_grad, norm_backward, pieced_attention_backward, BlockGradients,
};
use crate::models::clip::ClipLayerWeights;
use crate::models::vit_encoder::{encoder_tape, EncoderShape};

/// Runs layer `l` forward on `x: [N, S, d]` keeping its tape, then back from
/// `grad_output`: the gradient at the input and at each linear's output in
/// [`crate::models::clip::VISION_LINEAR_NAMES`] order.
pub(crate) fn encoder_layer_backward(
    shape: &EncoderShape,
    l: &ClipLayerWeights,
    x: &Tensor,
    grad_output: &Tensor,
) -> candle_core::Result<BlockGradients> {
    let t = encoder_tape(shape, l, x)?;
    let (n, s, d) = x.dims3()?;
    let nh = shape.num_heads;
    let hd = d / nh;
    let w = |i: usize| &l.linears[i].weight;
    let dy = grad_output.to_dtype(x.dtype())?;

    // MLP: out = mid + fc2(act(fc1(norm2(mid)))).
    let d_fc2 = dy.clone();
    let d_a = input_grad(&d_fc2, w(5))?;
    let d_fc1 = activation_backward(shape.act, &t.fc1, &d_a)?;
    let d_h = input_grad(&d_fc1, w(4))?;
    let d_mid = (&dy + norm_backward(&t.norm2, &l.norm2.weight, &d_h)?)?;

    // Attention: mid = x + out_proj(att).
    let d_out = d_mid.clone();
    let d_att = input_grad(&d_out, w(3))?
        .reshape((n, s, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * nh, s, hd))?;
    let (d_q, d_k, d_v) = pieced_attention_backward(&t.attention, &d_att)?;
    let heads_to_rows = |z: Tensor| {
        z.reshape((n, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((n, s, d))
    };
    let d_q = heads_to_rows(d_q)?;
    let d_k = heads_to_rows(d_k)?;
    let d_v = heads_to_rows(d_v)?;
    let d_h = ((input_grad(&d_q, w(0))? + input_grad(&d_k, w(1))?)? + input_grad(&d_v, w(2))?)?;
    let d_x = (&d_mid + norm_backward(&t.norm1, &l.norm1.weight, &d_h)?)?;

    Ok(BlockGradients {
        input: d_x,
        linear_outputs: vec![d_q, d_k, d_v, d_out, d_fc1, d_fc2],
    })
}
