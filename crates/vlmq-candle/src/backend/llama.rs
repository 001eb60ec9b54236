//! [`QuantizableModel`] for [`LlamaModel`]: one text sample at a time.
//!
//! Blocks are the decoder layers (`model.layers.N`); their linears carry
//! the HF names (`self_attn.q_proj`, ...) in the true-sequential groups
//! q/k/v, o, gate/up, down. A hidden state is a `[1, T, hidden]` tensor.
//! The gradient methods (`loss_and_grad`, `block_backward`, `hidden_rows`)
//! implement [`GradientModel`], which VLMQ's task-loss importance needs.

use candle_core::Tensor;
use ndarray::{Array2, ArrayView2};
use vlmq::{
    Error, GradientModel, LinearInfo, Modality, QuantizableModel, Result, RowSink, StageCarry,
    StageOutput, TokenInfo,
};

use crate::backend::llama_backward::layer_backward;
use crate::error::CandleResultExt;
use crate::models::llama::forward::{rows, Hooks};
use crate::models::llama::model::LlamaModel;
use crate::models::llama::stages::{layer_stage, MlpCarry};
use crate::models::llama::weights::{expected_linear, LINEAR_NAMES};

/// One calibration sample: token ids and which tokens are prediction
/// targets (`targets[t]`: the prediction of token `t` from tokens `< t`
/// counts in the loss; `targets[0]` is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSample {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Per token: counts as a target.
    pub targets: Vec<bool>,
    /// Per token modality for the pipeline's diagnostics (`None`: all
    /// [`Modality::Text`]); e.g. a long context tagged [`Modality::Other`]
    /// so the trace shares show how much of each Hessian it carries.
    pub modality: Option<Vec<Modality>>,
}

impl TextSample {
    /// A sample whose every token (after the first) is a target, as in
    /// causal-LM training with `labels = input_ids`.
    pub fn causal(tokens: Vec<u32>) -> Self {
        let targets = vec![true; tokens.len()];
        TextSample {
            tokens,
            targets,
            modality: None,
        }
    }
}

impl LlamaModel {
    /// What stage 3 of a block carries: a streamed model, run to bound
    /// memory, recomputes the MLP's product in stage 4 instead of holding
    /// it for every sample through down_proj's solve; a resident one keeps
    /// it (no extra work).
    fn mlp_carry(&self) -> MlpCarry {
        if self.is_streamed() {
            MlpCarry::Recompute
        } else {
            MlpCarry::Activation
        }
    }

    fn check_sample(&self, s: &TextSample) -> Result<()> {
        self.check_tokens(&[&s.tokens])?;
        if s.targets.len() != s.tokens.len() {
            return Err(Error::shape(
                "sample targets",
                &[s.tokens.len()],
                &[s.targets.len()],
            ));
        }
        if let Some(m) = &s.modality {
            if m.len() != s.tokens.len() {
                return Err(Error::shape(
                    "sample modalities",
                    &[s.tokens.len()],
                    &[m.len()],
                ));
            }
        }
        Ok(())
    }

    fn check_hidden(&self, what: &str, h: &Tensor, s: &TextSample) -> Result<()> {
        let want = [1, s.tokens.len(), self.config().hidden_size];
        if h.dims() != want {
            return Err(Error::shape(what, &want, h.dims()));
        }
        Ok(())
    }

    /// Gradient pass of layer `block`: returns dL/d input for
    /// `L = sum(output * grad_output)` and shows dL/d every linear output.
    pub(crate) fn layer_backward(
        &self,
        block: usize,
        input: &Tensor,
        sample: &TextSample,
        grad_output: &Tensor,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Tensor> {
        self.check_sample(sample)?;
        self.check_hidden("block input", input, sample)?;
        self.check_hidden("block output gradient", grad_output, sample)?;
        let l = self.layer_weights(block)?;
        let pos = self.positional(sample.tokens.len())?;
        let grads = layer_backward(self.config(), &l, input, &pos, grad_output).in_block(block)?;
        if let Some(sink) = sink {
            for (name, g) in LINEAR_NAMES.iter().zip(&grads.linear_outputs) {
                let r = rows(g).in_block(block)?;
                sink.rows(name, r.view());
            }
        }
        Ok(grads.input)
    }
}

impl QuantizableModel for LlamaModel {
    type Sample = TextSample;
    type Hidden = Tensor;

    fn num_blocks(&self) -> usize {
        self.config().num_layers
    }

    fn block_name(&self, block: usize) -> String {
        format!("model.layers.{block}")
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        if block >= self.config().num_layers {
            return Vec::new();
        }
        // The shapes the loader checked every layer against.
        let info = |i: usize| {
            let [o, n] = expected_linear(self.config(), LINEAR_NAMES[i]);
            LinearInfo::new(LINEAR_NAMES[i], n, o)
        };
        vec![
            vec![info(0), info(1), info(2)],
            vec![info(3)],
            vec![info(4), info(5)],
            vec![info(6)],
        ]
    }

    fn token_info(&self, _block: usize, sample: &TextSample) -> TokenInfo {
        match &sample.modality {
            Some(m) if m.len() == sample.tokens.len() => TokenInfo::new(m.clone()),
            _ => TokenInfo::uniform(Modality::Text, sample.tokens.len()),
        }
    }

    fn embed(&self, sample: &TextSample) -> Result<Tensor> {
        self.check_sample(sample)?;
        self.embed_batch(&[&sample.tokens])
    }

    fn block_forward(
        &self,
        block: usize,
        input: &Tensor,
        sample: &TextSample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Tensor> {
        self.check_hidden("block input", input, sample)?;
        let pos = self.positional(sample.tokens.len())?;
        let mut hooks = Hooks {
            capture: sink,
            probes: None,
        };
        self.layer(block, input, &pos, &mut hooks)
    }

    fn block_stage(
        &self,
        block: usize,
        stage: usize,
        input: &Tensor,
        sample: &TextSample,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<Tensor>> {
        self.check_hidden("block input", input, sample)?;
        let pos = self.positional(sample.tokens.len())?;
        let l = self.layer_weights(block)?;
        layer_stage(
            self.config(),
            &l,
            stage,
            input,
            &pos,
            carry,
            sink,
            self.mlp_carry(),
        )
        .in_block(block)
    }

    /// A model loaded with [`Residency::Disk`](crate::Residency::Disk) drops
    /// its copy of the block: a quantized block cannot be run again (its
    /// weights went to the pipeline's output), an untouched one is read
    /// again from disk when asked for.
    fn release_block(&mut self, block: usize) -> Result<()> {
        self.release_layer(block);
        Ok(())
    }

    /// A streamed block hands over its copy: the 180 MB of a 7B down
    /// projection are not held twice while it is solved.
    fn take_linear_weight(&mut self, block: usize, layer: &str) -> Result<Array2<f32>> {
        let w = self.linear_weight(block, layer)?;
        self.drop_streamed_linears(block, &[layer])?;
        Ok(w)
    }

    /// Stage `k` reads only group `k - 1`'s projections (the norms and the
    /// carry do the rest), so once it ran the group's weights can go;
    /// except gate and up when stage 4 computes the MLP's product again
    /// (`MlpCarry::Recompute`).
    fn stage_finished(&mut self, block: usize, stage: usize) -> Result<()> {
        if stage == 3 && self.mlp_carry() == MlpCarry::Recompute {
            return Ok(());
        }
        let Some(group) = stage
            .checked_sub(1)
            .and_then(|g| self.linear_groups(block).get(g).cloned())
        else {
            return Ok(());
        };
        let names: Vec<&str> = group.iter().map(|l| l.name.as_str()).collect();
        self.drop_streamed_linears(block, &names)
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = TextSample, Hidden = Tensor>> {
        Some(self)
    }

    fn linear_weight(&self, block: usize, layer: &str) -> Result<Array2<f32>> {
        let l = self.layer_weights(block)?;
        l.linear(layer)
            .ok_or_else(|| unknown(block, layer))?
            .weight_rows(block)
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
    ) -> Result<()> {
        let dtype = self.dtype();
        let dev = self.device().clone();
        // The configuration's shape, not the held tensor's: a streamed
        // block's solved layers hold an empty `[0, in]` until replaced.
        let want = expected_linear(self.config(), layer);
        let l = self.layer_weights_mut(block)?;
        let lin = l.linear_mut(layer).ok_or_else(|| unknown(block, layer))?;
        if weight.shape() != want {
            return Err(Error::shape(
                format!("new weight of {layer} in block {block}"),
                &want,
                weight.shape(),
            ));
        }
        lin.replace_weight(block, layer, weight, dtype, &dev)
    }
}

/// The gradient extension: task loss (candle's autograd over the head), the
/// hand-written block backward, and the rows of a hidden-state gradient.
impl GradientModel for LlamaModel {
    fn block_backward(
        &self,
        block: usize,
        input: &Tensor,
        sample: &TextSample,
        grad_output: &Tensor,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Tensor> {
        self.layer_backward(block, input, sample, grad_output, sink)
    }

    fn hidden_rows(&self, hidden: &Tensor) -> Result<Array2<f32>> {
        rows(hidden).at_model()
    }

    fn loss_and_grad(&self, output: &Tensor, sample: &TextSample) -> Result<Option<(f32, Tensor)>> {
        self.check_sample(sample)?;
        self.check_hidden("last block output", output, sample)?;
        self.loss_and_grad_at(output, &sample.tokens, &sample.targets)
    }
}

fn unknown(block: usize, layer: &str) -> Error {
    Error::Backend {
        block,
        layer: Some(layer.to_string()),
        reason: format!("unknown linear (known: {})", LINEAR_NAMES.join(", ")),
    }
}
