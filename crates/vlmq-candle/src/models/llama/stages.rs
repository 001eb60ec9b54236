//! The staged forward of one decoder layer (true-sequential capture): each
//! stage runs one part of the layer once, with the weights as they are when
//! it runs, and the stages in order compute exactly
//! [`layer_forward`](super::forward::layer_forward) (the same functions on
//! the same tensors).

use candle_core::{DType, Tensor};
use vlmq::{RowSink, StageCarry, StageOutput};

use super::config::LlamaConfig;
use super::forward::{
    attend, attention_residual, mlp_residual, rms_norm, swiglu, Hooks, Positional,
};
use super::weights::LayerWeights;

/// What a stage of a decoder layer leaves for the next one.
enum Carry {
    /// After stage 0: `input_norm(x)`.
    Normed(Tensor),
    /// After stage 1: the attention context (the input of `o_proj`).
    Attention(Tensor),
    /// After stage 2: the residual after attention and `post_norm` of it.
    MlpInput { mid: Tensor, h: Tensor },
    /// After stage 3: the residual after attention and the SwiGLU activation.
    MlpActivation { mid: Tensor, a: Tensor },
    /// After stage 3 with [`MlpCarry::Recompute`]: the residual after
    /// attention only.
    Residual { mid: Tensor },
}

/// What stage 3 of a decoder layer leaves for stage 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MlpCarry {
    /// The SwiGLU product, `intermediate_size` values a token: stage 4
    /// applies only `down_proj`.
    Activation,
    /// Only the residual, `hidden_size` values a token: stage 4 computes
    /// the norm and the product again (the gate and up projections once
    /// more), with the same bits. For a 7B layer and 16 x 512 tokens the
    /// carries held through down_proj's solve are 134 MB instead of 494 MB.
    Recompute,
}

/// Stage `stage` of layer `l` on its input `x: [1, T, hidden]`: stages 0-3
/// show the inputs of q/k/v, o, gate/up and down to `sink`, stage 4 returns
/// the layer output; `mlp` says what stage 3 carries.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_stage(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    stage: usize,
    x: &Tensor,
    pos: &Positional,
    carry: Option<StageCarry>,
    sink: &mut dyn RowSink,
    mlp: MlpCarry,
) -> candle_core::Result<StageOutput<Tensor>> {
    let f64_maths = x.dtype() == DType::F64;
    let mut hooks = Hooks {
        capture: Some(sink),
        probes: None,
    };
    let carry = match (stage, carry) {
        (0, _) => None,
        (_, Some(c)) => Some(*c.downcast::<Carry>().map_err(|_| mismatch(stage))?),
        (_, None) => return Err(mismatch(stage)),
    };
    let next = |c: Carry| Ok(StageOutput::Carry(Box::new(c)));
    match (stage, carry) {
        (0, _) => {
            let h = rms_norm(x, &l.input_norm, cfg.rms_eps, f64_maths)?;
            hooks.show(&[0, 1, 2], &h)?;
            next(Carry::Normed(h))
        }
        (1, Some(Carry::Normed(h))) => {
            let att = attend(cfg, l, &h, pos, &hooks)?.att;
            hooks.show(&[3], &att)?;
            next(Carry::Attention(att))
        }
        (2, Some(Carry::Attention(att))) => {
            let mid = attention_residual(l, x, &att, &hooks)?;
            let h = rms_norm(&mid, &l.post_norm, cfg.rms_eps, f64_maths)?;
            hooks.show(&[4, 5], &h)?;
            next(Carry::MlpInput { mid, h })
        }
        (3, Some(Carry::MlpInput { mid, h })) => {
            let (_, _, a) = swiglu(l, &h, &hooks)?;
            hooks.show(&[6], &a)?;
            match mlp {
                MlpCarry::Activation => next(Carry::MlpActivation { mid, a }),
                MlpCarry::Recompute => next(Carry::Residual { mid }),
            }
        }
        (4, Some(Carry::MlpActivation { mid, a })) => {
            Ok(StageOutput::Output(mlp_residual(l, &mid, &a, &hooks)?))
        }
        (4, Some(Carry::Residual { mid })) => {
            // Stage 2's norm and stage 3's product, the same operations on
            // the same tensors; nothing is shown again.
            let quiet = Hooks {
                capture: None,
                probes: None,
            };
            let h = rms_norm(&mid, &l.post_norm, cfg.rms_eps, f64_maths)?;
            let (_, _, a) = swiglu(l, &h, &quiet)?;
            Ok(StageOutput::Output(mlp_residual(l, &mid, &a, &hooks)?))
        }
        _ => Err(mismatch(stage)),
    }
}

/// A stage out of range, or a carry another stage did not return.
fn mismatch(stage: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "decoder layer stage {stage}: a layer has stages 0 to 4, each reading the carry \
         of the stage before"
    ))
}
