//! [`GradientModel`] for [`Qwen2VlModel`]: the task loss on the decoder's
//! output and a real backward pass through every block: decoder layers
//! through the hand-written decoder backward under the sample's M-RoPE
//! tables, vision blocks through the hand-written vision block backward,
//! and the merger with candle's autograd and zero-valued probes at each
//! linear output.
//!
//! Per-block importance factors (`per_block`) on the merger are a shape
//! error, as for LLaVA's projector: its output has one row per token, not
//! per merged patch (per-group factors, the default, work everywhere).

use candle_core::{Tensor, Var};
use ndarray::Array2;
use vlmq::{Error, GradientModel, QuantizableModel, Result, RowSink};

use crate::backend::llama_backward::layer_backward;
use crate::backend::llava::stream_error;
use crate::backend::qwen2_vl::Kind;
use crate::backend::qwen_vision_backward::vision_block_backward;
use crate::error::CandleResultExt;
use crate::models::llama::forward::rows;
use crate::models::llama::weights::LINEAR_NAMES;
use crate::models::llava::sample::VlmHidden;
use crate::models::qwen2_vl::vision::merger_forward;
use crate::models::qwen2_vl::{Qwen2VlModel, QwenVlSample, MERGER_LINEARS};

/// Shows the gradient that reached each probe.
fn show_grads(
    block: usize,
    names: &[&str],
    probes: &[Tensor],
    grads: &candle_core::backprop::GradStore,
    sink: Option<&mut dyn RowSink>,
) -> Result<()> {
    let Some(sink) = sink else { return Ok(()) };
    for (name, p) in names.iter().zip(probes) {
        let g = grads.get(p).ok_or_else(|| Error::Backend {
            block,
            layer: Some(name.to_string()),
            reason: "no gradient reached this linear's output".into(),
        })?;
        sink.rows(name, rows(g).in_block(block)?.view());
    }
    Ok(())
}

impl Qwen2VlModel {
    /// Zero probes `[1, rows, out]`, one per output width.
    fn probes(&self, outs: &[usize], rows: usize) -> candle_core::Result<Vec<Tensor>> {
        outs.iter()
            .map(|&o| {
                Var::zeros((1, rows, o), self.dtype(), self.device()).map(|v| v.as_tensor().clone())
            })
            .collect()
    }
}

impl GradientModel for Qwen2VlModel {
    fn loss_and_grad(
        &self,
        output: &VlmHidden,
        s: &QwenVlSample,
    ) -> Result<Option<(f32, VlmHidden)>> {
        self.check_sample(s)?;
        let h = self.text_in(self.num_blocks() - 1, output, s)?;
        Ok(self
            .lm
            .loss_and_grad_at(h, &s.tokens, &s.targets)?
            .map(|(l, g)| (l, VlmHidden::Text(g))))
    }

    fn block_backward(
        &self,
        block: usize,
        input: &VlmHidden,
        s: &QwenVlSample,
        grad_output: &VlmHidden,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<VlmHidden> {
        let v = &self.cfg.vision;
        match self.kind(block)? {
            Kind::Lm(i) => {
                let x = self.text_in(block, input, s)?;
                let g = self.text_in(block, grad_output, s)?;
                let pos = self.sample_positional(s)?;
                let l = self.lm.layer_weights(i)?;
                let grads = layer_backward(&self.cfg.text, &l, x, &pos, g).in_block(block)?;
                grads.show(block, &LINEAR_NAMES, sink)?;
                Ok(VlmHidden::Text(grads.input))
            }
            Kind::Vision(i) => {
                let Some(x) = self.vision_in(block, input, s)? else {
                    self.show_empty(block, sink, true);
                    return Ok(VlmHidden::Vision(None));
                };
                let Some(g) = self.vision_in(block, grad_output, s)? else {
                    return Err(stream_error(block, "vision gradient"));
                };
                let plan = self.vision_plan(&s.grids)?;
                let b = &self.visual.blocks[i];
                let grads =
                    vision_block_backward(v, b, x, &plan.pos, v.windowed(i), g).in_block(block)?;
                grads.show(block, b.linear_names(), sink)?;
                Ok(VlmHidden::Vision(Some(grads.input)))
            }
            Kind::Merger => {
                let g = self.text_in(block, grad_output, s)?;
                let Some(x) = self.vision_in(block, input, s)? else {
                    self.show_empty(block, sink, true);
                    return Ok(VlmHidden::Vision(None));
                };
                let m = &self.visual.merger;
                let outs = m.linears.each_ref().map(|l| l.weight.dims()[0]);
                let merged = x.dim(1).in_block(block)? / v.merge_unit();
                let xv = Var::from_tensor(&x.detach()).in_block(block)?;
                let pt = self.probes(&outs, merged).in_block(block)?;
                let feats = merger_forward(v, m, &xv, None, Some(&pt)).in_block(block)?;
                let emb = self.merged_embeddings(s, Some(&feats))?;
                let grads = (emb * g.to_dtype(self.dtype()).in_block(block)?)
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.backward())
                    .in_block(block)?;
                show_grads(block, &MERGER_LINEARS, &pt, &grads, sink)?;
                let gx = grads
                    .get(xv.as_tensor())
                    .cloned()
                    .ok_or_else(|| stream_error(block, "a gradient-carrying"))?;
                Ok(VlmHidden::Vision(Some(gx)))
            }
        }
    }

    fn hidden_rows(&self, hidden: &VlmHidden) -> Result<Array2<f32>> {
        match hidden {
            VlmHidden::Vision(None) => Ok(Array2::zeros((0, self.cfg.vision.width))),
            VlmHidden::Vision(Some(t)) | VlmHidden::Text(t) => rows(t).at_model(),
        }
    }
}
