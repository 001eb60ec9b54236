//! [`GradientModel`] for [`LlavaModel`]: the task loss on the LM's output and
//! a real backward pass through every block (vision layers, projector, LM
//! layers): the LM layers through the hand-written decoder backward, the
//! vision layers through the hand-written encoder layer backward, the
//! projector with candle's autograd and zero-valued probes at each linear
//! output.

use candle_core::{Tensor, Var};
use ndarray::Array2;
use vlmq::{Error, GradientModel, QuantizableModel, Result, RowSink};

use crate::backend::llava::{stream_error, Kind};
use crate::backend::vit_backward::encoder_layer_backward;
use crate::error::CandleResultExt;
use crate::models::clip::VISION_LINEAR_NAMES;
use crate::models::llama::forward::rows;
use crate::models::llava::model::{LlavaModel, PROJECTOR_LINEAR_NAMES};
use crate::models::llava::sample::{VlmHidden, VlmSample};

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

impl GradientModel for LlavaModel {
    fn loss_and_grad(&self, output: &VlmHidden, s: &VlmSample) -> Result<Option<(f32, VlmHidden)>> {
        self.check_sample(s)?;
        let last = self.num_blocks() - 1;
        let h = self.text_in(last, output, s)?;
        let ts = Self::text_sample(s);
        Ok(self
            .lm
            .loss_and_grad_at(h, &ts.tokens, &ts.targets)?
            .map(|(l, g)| (l, VlmHidden::Text(g))))
    }

    fn block_backward(
        &self,
        block: usize,
        input: &VlmHidden,
        s: &VlmSample,
        grad_output: &VlmHidden,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<VlmHidden> {
        match self.kind(block)? {
            Kind::Lm(i) => {
                let x = self.text_in(block, input, s)?;
                let g = self.text_in(block, grad_output, s)?;
                let gx = self
                    .lm
                    .layer_backward(i, x, &Self::text_sample(s), g, sink)?;
                Ok(VlmHidden::Text(gx))
            }
            Kind::Vision(i) => {
                let Some(x) = self.vision_in(block, input, s)? else {
                    self.show_empty(block, sink, true);
                    return Ok(VlmHidden::Vision(None));
                };
                let Some(g) = self.vision_in(block, grad_output, s)? else {
                    return Err(stream_error(block, "vision gradient"));
                };
                let l = &self.vision.layers[i];
                let grads =
                    encoder_layer_backward(&self.cfg.vision.shape(), l, x, g).in_block(block)?;
                grads.show(block, &VISION_LINEAR_NAMES, sink)?;
                Ok(VlmHidden::Vision(Some(grads.input)))
            }
            Kind::Projector => {
                let g = self.text_in(block, grad_output, s)?;
                let Some(x) = self.vision_in(block, input, s)? else {
                    self.show_empty(block, sink, true);
                    return Ok(VlmHidden::Vision(None));
                };
                let n = x.dim(0).in_block(block)?;
                let tpi = self.cfg.tokens_per_image();
                let outs = [
                    self.projector.linear_1.weight.dims()[0],
                    self.projector.linear_2.weight.dims()[0],
                ];
                let xv = Var::from_tensor(&x.detach()).in_block(block)?;
                let pv = self.probes(&outs, (n, tpi)).in_block(block)?;
                let pt: Vec<Tensor> = pv.iter().map(|p| p.as_tensor().clone()).collect();
                let feats = self.project(&xv, None, Some(&pt)).in_block(block)?;
                let emb = self.merge_embeddings(&[&s.tokens], Some(&feats))?;
                let grads = (emb * g.to_dtype(self.dtype()).in_block(block)?)
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.backward())
                    .in_block(block)?;
                show_grads(block, &PROJECTOR_LINEAR_NAMES, &pt, &grads, sink)?;
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
            VlmHidden::Vision(None) => Ok(Array2::zeros((0, self.cfg.vision.hidden_size))),
            VlmHidden::Vision(Some(t)) | VlmHidden::Text(t) => rows(t).at_model(),
        }
    }
}
