//! The staged forward of a block (one stage per true-sequential group, see
//! [`QuantizableModel::block_stage`](vlmq::QuantizableModel::block_stage)):
//! every part of the block runs once, with the weights as they are when its
//! stage runs.

use ndarray::{Array2, ArrayView2};
use vlmq::backend::{RowSink, StageCarry, StageOutput};
use vlmq::error::{Error, Result};

use super::block::TransformerBlock;
use super::model::{Block, SequenceModel};
use super::sample::Sample;
use vlmq::QuantizableModel;

/// What a transformer block's stage leaves for the next one.
enum Carry {
    /// After stage 0: the attention's input `norm1(x)`.
    Normed(Array2<f32>),
    /// After stage 1: the attention context (the input of `attn.o`).
    Context(Array2<f32>),
    /// After stage 2: the residual `h = x + attn(x)` and the MLP's input `norm2(h)`.
    MlpInput { h: Array2<f32>, m_in: Array2<f32> },
    /// After stage 3: the residual and the MLP's hidden activations.
    MlpHidden { h: Array2<f32>, act: Array2<f32> },
}

/// Stage `k`'s carry of the expected kind, or an error naming the stage.
fn take(carry: Option<StageCarry>, stage: usize) -> Result<Carry> {
    carry
        .and_then(|c| c.downcast::<Carry>().ok())
        .map(|c| *c)
        .ok_or_else(|| Error::Backend {
            block: 0,
            layer: None,
            reason: format!("stage {stage} needs the carry stage {} returned", stage - 1),
        })
}

impl TransformerBlock {
    /// Runs stage `stage` of the block over `x` (the block's input): stages
    /// 0-3 show the inputs of `attn.q/k/v`, `attn.o`, `mlp.gate/up` and
    /// `mlp.down` to `sink`, stage 4 returns the output. Running the stages
    /// in order gives bit for bit what [`forward`](Self::forward) gives on
    /// the same weights; each stage uses the weights as they are when it runs.
    pub fn stage(
        &self,
        stage: usize,
        x: ArrayView2<'_, f32>,
        valid: Option<&[bool]>,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<Array2<f32>>> {
        let next = |c: Carry| Ok(StageOutput::Carry(Box::new(c)));
        match stage {
            0 => {
                let (a_in, _) = self.norm1.forward(x)?;
                for name in ["attn.q", "attn.k", "attn.v"] {
                    sink.rows(name, a_in.view());
                }
                next(Carry::Normed(a_in))
            }
            1 => {
                let Carry::Normed(a_in) = take(carry, stage)? else {
                    return Err(wrong(stage));
                };
                let ctx = self.attn.context(a_in.view(), valid, None)?;
                sink.rows("attn.o", ctx.view());
                next(Carry::Context(ctx))
            }
            2 => {
                let Carry::Context(ctx) = take(carry, stage)? else {
                    return Err(wrong(stage));
                };
                let a_out = self.attn.o.apply(ctx.view())?;
                let h = &a_out + &x;
                let (m_in, _) = self.norm2.forward(h.view())?;
                if self.mlp.gate.is_some() {
                    sink.rows("mlp.gate", m_in.view());
                }
                sink.rows("mlp.up", m_in.view());
                next(Carry::MlpInput { h, m_in })
            }
            3 => {
                let Carry::MlpInput { h, m_in } = take(carry, stage)? else {
                    return Err(wrong(stage));
                };
                let act = self.mlp.hidden(m_in.view(), None)?;
                sink.rows("mlp.down", act.view());
                next(Carry::MlpHidden { h, act })
            }
            4 => {
                let Carry::MlpHidden { h, act } = take(carry, stage)? else {
                    return Err(wrong(stage));
                };
                Ok(StageOutput::Output(self.mlp.project_down(act.view())? + &h))
            }
            _ => Err(Error::Backend {
                block: 0,
                layer: None,
                reason: format!("a transformer block has stages 0 to 4, not {stage}"),
            }),
        }
    }
}

/// A carry of another stage's kind.
fn wrong(stage: usize) -> Error {
    Error::Backend {
        block: 0,
        layer: None,
        reason: format!(
            "stage {stage} got a carry that stage {} does not return",
            stage - 1
        ),
    }
}

impl SequenceModel {
    /// [`QuantizableModel::block_stage`](vlmq::QuantizableModel::block_stage)
    /// for block `block`: a transformer block's five stages, or a projector's
    /// two (show the input, then project and append the text).
    pub(crate) fn run_stage(
        &self,
        block: usize,
        stage: usize,
        input: &Array2<f32>,
        sample: &Sample,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<Array2<f32>>> {
        let mask = self.mask(block, sample)?;
        match (self.block(block)?, stage) {
            (Block::Transformer(t), _) => {
                t.stage(stage, input.view(), mask.as_deref(), carry, sink)
            }
            (Block::Projector(_), 0) => {
                sink.rows("proj", input.view());
                Ok(StageOutput::Carry(Box::new(())))
            }
            (Block::Projector(_), 1) => Ok(StageOutput::Output(
                self.block_forward(block, input, sample, None)?,
            )),
            (Block::Projector(_), _) => Err(Error::Backend {
                block,
                layer: None,
                reason: format!("a projector has stages 0 and 1, not {stage}"),
            }),
        }
    }
}
