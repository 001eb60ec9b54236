//! A VLM's language-model layer through the decoder's staged forward (the
//! LLaVA, Qwen2-VL and SmolVLM backends): the Llama stages, carrying the
//! MLP product as a resident model does, with the output as the text
//! hidden state.

use candle_core::Tensor;
use vlmq::{Result, RowSink, StageCarry, StageOutput};

use crate::error::CandleResultExt;
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::forward::Positional;
use crate::models::llama::stages::{layer_stage, MlpCarry};
use crate::models::llama::weights::LayerWeights;
use crate::models::llava::sample::VlmHidden;

/// Stage `stage` of decoder layer `l` (pipeline block `block`, for errors)
/// on the text hidden state `x`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn text_layer_stage(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    block: usize,
    stage: usize,
    x: &Tensor,
    pos: &Positional,
    carry: Option<StageCarry>,
    sink: &mut dyn RowSink,
) -> Result<StageOutput<VlmHidden>> {
    let out =
        layer_stage(cfg, l, stage, x, pos, carry, sink, MlpCarry::Activation).in_block(block)?;
    Ok(match out {
        StageOutput::Carry(c) => StageOutput::Carry(c),
        StageOutput::Output(y) => StageOutput::Output(VlmHidden::Text(y)),
    })
}
