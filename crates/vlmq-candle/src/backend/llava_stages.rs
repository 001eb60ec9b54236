//! The staged forward of a LLaVA block (see
//! [`QuantizableModel::block_stage`]): a language-model layer runs the
//! decoder's stages (each part once); the vision layers and the projector
//! run one whole forward per stage.

use candle_core::Tensor;
use vlmq::{QuantizableModel, Result, RowSink, StageCarry, StageOutput};

use crate::backend::llava::Kind;
use crate::backend::text_stage::text_layer_stage;
use crate::models::llava::model::LlavaModel;
use crate::models::llava::sample::{VlmHidden, VlmSample};

impl LlavaModel {
    /// Stage `stage` of block `block` on one sample.
    pub(crate) fn run_stage(
        &self,
        block: usize,
        stage: usize,
        input: &VlmHidden,
        s: &VlmSample,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<VlmHidden>> {
        match self.kind(block)? {
            Kind::Lm(i) => {
                let x: &Tensor = self.text_in(block, input, s)?;
                let pos = self.lm.positional(s.tokens.len())?;
                let l = self.lm.layer_weights(i)?;
                text_layer_stage(self.lm.config(), &l, block, stage, x, &pos, carry, sink)
            }
            Kind::Vision(_) | Kind::Projector => {
                if stage < self.linear_groups(block).len() {
                    self.block_forward(block, input, s, Some(sink))?;
                    Ok(StageOutput::Carry(Box::new(())))
                } else {
                    Ok(StageOutput::Output(
                        self.block_forward(block, input, s, None)?,
                    ))
                }
            }
        }
    }
}
