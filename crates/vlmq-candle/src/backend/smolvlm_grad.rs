//! [`GradientModel`] for [`SmolVlmModel`]: the task loss on the LM's output
//! and a real backward pass through every block: the LM layers through the
//! hand-written decoder backward, the SigLIP layers through the hand-written
//! encoder layer backward, the connector with candle's autograd and
//! zero-valued probes at each linear output.

use candle_core::{Tensor, Var};
use ndarray::Array2;
use vlmq::{Error, GradientModel, QuantizableModel, Result, RowSink};

use crate::backend::llava::stream_error;
use crate::backend::smolvlm::Part;
use crate::backend::vit_backward::encoder_layer_backward;
use crate::error::CandleResultExt;
use crate::models::clip::VISION_LINEAR_NAMES;
use crate::models::idefics3::{connector_forward, CONNECTOR_LINEAR_NAMES};
use crate::models::llama::forward::rows;
use crate::models::llava::sample::{VlmHidden, VlmSample};
use crate::models::siglip::siglip_post_norm;
use crate::models::smolvlm::SmolVlmModel;

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

impl SmolVlmModel {
    /// Zero probes `[lead.0, lead.1, out]`, one per linear output.
    fn zero_probes(&self, outs: &[usize], lead: (usize, usize)) -> candle_core::Result<Vec<Var>> {
        outs.iter()
            .map(|&o| Var::zeros((lead.0, lead.1, o), self.dtype(), self.device()))
            .collect()
    }
}

impl GradientModel for SmolVlmModel {
    fn loss_and_grad(&self, output: &VlmHidden, s: &VlmSample) -> Result<Option<(f32, VlmHidden)>> {
        self.check_sample(s)?;
        let last = self.num_blocks() - 1;
        let h = self.tokens_in(last, output, s)?;
        let targets: Vec<bool> = s
            .targets
            .iter()
            .enumerate()
            .map(|(t, &b)| b && t < s.valid_len)
            .collect();
        Ok(self
            .lm
            .loss_and_grad_at(h, &s.tokens, &targets)?
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
        match self.part(block)? {
            Part::Lm(i) => {
                let x = self.tokens_in(block, input, s)?;
                let g = self.tokens_in(block, grad_output, s)?;
                let ts = crate::models::llava::model::LlavaModel::text_sample(s);
                let gx = self.lm.layer_backward(i, x, &ts, g, sink)?;
                Ok(VlmHidden::Text(gx))
            }
            Part::Vision(i) => {
                let Some(x) = self.frames_in(block, input, s)? else {
                    self.show_nothing(block, sink, true);
                    return Ok(VlmHidden::Vision(None));
                };
                let Some(g) = self.frames_in(block, grad_output, s)? else {
                    return Err(stream_error(block, "vision gradient"));
                };
                let l = &self.vision.layers[i];
                let grads =
                    encoder_layer_backward(&self.cfg.vision.shape(), l, x, g).in_block(block)?;
                grads.show(block, &VISION_LINEAR_NAMES, sink)?;
                Ok(VlmHidden::Vision(Some(grads.input)))
            }
            Part::Connector => {
                let g = self.tokens_in(block, grad_output, s)?;
                let Some(x) = self.frames_in(block, input, s)? else {
                    self.show_nothing(block, sink, true);
                    return Ok(VlmHidden::Vision(None));
                };
                let n = x.dim(0).in_block(block)?;
                let outs = [self.connector.proj.weight.dims()[0]];
                let run = || -> candle_core::Result<_> {
                    let xv = Var::from_tensor(&x.detach())?;
                    let pv = self.zero_probes(&outs, (n, self.cfg.tokens_per_frame()))?;
                    let pt: Vec<Tensor> = pv.iter().map(|p| p.as_tensor().clone()).collect();
                    let h = siglip_post_norm(&self.cfg.vision, &self.vision, &xv)?;
                    let f = connector_forward(
                        &self.connector,
                        &h,
                        self.cfg.scale_factor,
                        None,
                        Some(&pt),
                    )?
                    .flatten_to(1)?;
                    Ok((xv, pt, f))
                };
                let (xv, pt, feats) = run().in_block(block)?;
                let emb = self.merge_embeddings(&[&s.tokens], Some(&feats))?;
                let grads = (emb * g.to_dtype(self.dtype()).in_block(block)?)
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.backward())
                    .in_block(block)?;
                show_grads(block, &CONNECTOR_LINEAR_NAMES, &pt, &grads, sink)?;
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
