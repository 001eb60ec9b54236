//! [`QuantizableModel`] for [`LlavaModel`] (the gradient half is in `llava_grad.rs`), one
//! [`VlmSample`] (token ids, targets, images) at a time.
//!
//! Blocks, in order: the vision encoder layers that the selected feature
//! layer depends on (`{vision}encoder.layers.N`; later layers never affect
//! LLaVA's output and are not blocks), the projector
//! (`multi_modal_projector`, linears `linear_1`, `linear_2`), then the LM's
//! decoder layers (`language_model.model.layers.N`), all named in the
//! checkpoint's own spelling. The usual choice, quantizing the LM only, is
//! `cfg.with_blocks(model.lm_only())` (a prefix selection on the LM's layer names).
//!
//! Token rows: a vision block shows `images x (1 + patches)` rows (class
//! token tagged [`Modality::Other`], patches [`Modality::Vision`]); the
//! projector shows one row per image feature (vision); an LM block shows
//! the sample's tokens (`<image>` positions vision, others text, padding
//! invalid). Gradients are real in every block (candle autograd), since the
//! task-loss importance walks back through all blocks.
//!
//! Per-block importance factors (`per_block`) score a block's tokens by the
//! gradient at its output; the projector's output has one row per LM token,
//! not per feature, so per-block factors on the projector are a shape error
//! (per-group factors, the default, work everywhere).

use candle_core::{Tensor, Var};
use ndarray::{Array2, ArrayView2};
use vlmq::{
    Error, GradientModel, LinearInfo, Modality, QuantizableModel, Result, RowSink, StageCarry,
    StageOutput, TokenInfo,
};

use crate::backend::llama::TextSample;
use crate::error::CandleResultExt;
use crate::models::clip::{clip_layer_forward, VISION_LINEAR_NAMES};
use crate::models::llama::forward::Hooks;
use crate::models::llama::weights::Linear;
use crate::models::llava::model::{LlavaModel, PROJECTOR_LINEAR_NAMES};
use crate::models::llava::sample::{VlmHidden, VlmSample};
use vlmq::pipeline::BlockSelection;

pub(crate) enum Kind {
    Vision(usize),
    Projector,
    Lm(usize),
}

pub(crate) fn stream_error(block: usize, want: &str) -> Error {
    Error::Backend {
        block,
        layer: None,
        reason: format!("this block takes the {want} stream"),
    }
}

impl LlavaModel {
    pub(crate) fn kind(&self, block: usize) -> Result<Kind> {
        let nv = self.cfg.feature_layers;
        let nl = self.lm.config().num_layers;
        match block {
            b if b < nv => Ok(Kind::Vision(b)),
            b if b == nv => Ok(Kind::Projector),
            b if b <= nv + nl => Ok(Kind::Lm(b - nv - 1)),
            _ => Err(Error::Backend {
                block,
                layer: None,
                reason: format!("the model has {} blocks", nv + 1 + nl),
            }),
        }
    }

    /// The block selection that quantizes the language model only.
    pub fn lm_only(&self) -> BlockSelection {
        BlockSelection::NamePrefix(format!("{}layers.", self.naming.lm))
    }

    /// Checks a sample against the model: ids, targets, padding, images and
    /// the count of `<image>` tokens.
    pub fn check_sample(&self, s: &VlmSample) -> Result<()> {
        self.lm.check_tokens(&[&s.tokens])?;
        s.check_lengths()?;
        if let Some(p) = &s.pixels {
            self.check_pixels(p)?;
        }
        let want = s.image_count() * self.cfg.tokens_per_image();
        let have = self.image_positions(&[&s.tokens]).len();
        if have != want {
            return Err(Error::InvalidConfig {
                field: "<image> tokens",
                value: format!(
                    "{have} <image> tokens for {} images x {}",
                    s.image_count(),
                    self.cfg.tokens_per_image()
                ),
                reason: "the ids must hold exactly one <image> token per image feature",
            });
        }
        Ok(())
    }

    pub(crate) fn text_sample(s: &VlmSample) -> TextSample {
        let targets = s
            .targets
            .iter()
            .enumerate()
            .map(|(t, &b)| b && t < s.valid_len)
            .collect();
        TextSample {
            tokens: s.tokens.clone(),
            targets,
            modality: None,
        }
    }

    pub(crate) fn vision_in<'a>(
        &self,
        block: usize,
        h: &'a VlmHidden,
        s: &VlmSample,
    ) -> Result<Option<&'a Tensor>> {
        let VlmHidden::Vision(x) = h else {
            return Err(stream_error(block, "vision"));
        };
        let want = [
            s.image_count(),
            1 + self.cfg.vision.num_patches(),
            self.cfg.vision.hidden_size,
        ];
        match x {
            Some(x) if x.dims() != want => Err(Error::shape("vision block input", &want, x.dims())),
            None if s.image_count() > 0 => Err(Error::shape("vision block input", &want, &[0])),
            _ => Ok(x.as_ref()),
        }
    }

    pub(crate) fn text_in<'a>(
        &self,
        block: usize,
        h: &'a VlmHidden,
        s: &VlmSample,
    ) -> Result<&'a Tensor> {
        let VlmHidden::Text(x) = h else {
            return Err(stream_error(block, "text"));
        };
        let want = [1, s.tokens.len(), self.lm.config().hidden_size];
        if x.dims() != want {
            return Err(Error::shape("LM block input", &want, x.dims()));
        }
        Ok(x)
    }

    /// Shows zero rows for every linear of a block (a sample without images).
    pub(crate) fn show_empty(&self, block: usize, sink: Option<&mut dyn RowSink>, outputs: bool) {
        if let Some(sink) = sink {
            for l in self.linear_groups(block).into_iter().flatten() {
                let f = if outputs {
                    l.out_features
                } else {
                    l.in_features
                };
                sink.rows(&l.name, Array2::<f32>::zeros((0, f)).view());
            }
        }
    }

    fn linear_ref(&self, block: usize, layer: &str) -> Result<&Linear> {
        let found = match self.kind(block)? {
            Kind::Vision(i) => self.vision.layers[i].linear(layer),
            Kind::Projector => match layer {
                "linear_1" => Some(&self.projector.linear_1),
                "linear_2" => Some(&self.projector.linear_2),
                _ => None,
            },
            Kind::Lm(i) => self.lm.weights().layers[i].linear(layer),
        };
        found.ok_or_else(|| unknown(block, layer))
    }

    fn linear_mut(&mut self, block: usize, layer: &str) -> Result<&mut Linear> {
        let found = match self.kind(block)? {
            Kind::Vision(i) => self.vision.layers[i].linear_mut(layer),
            Kind::Projector => match layer {
                "linear_1" => Some(&mut self.projector.linear_1),
                "linear_2" => Some(&mut self.projector.linear_2),
                _ => None,
            },
            Kind::Lm(i) => self.lm.weights_mut().layers[i].linear_mut(layer),
        };
        found.ok_or_else(|| unknown(block, layer))
    }

    /// Zero probes, one per linear output, for `n` rows-batches of `s` tokens.
    pub(crate) fn probes(
        &self,
        outs: &[usize],
        lead: (usize, usize),
    ) -> candle_core::Result<Vec<Var>> {
        outs.iter()
            .map(|&o| Var::zeros((lead.0, lead.1, o), self.dtype(), self.device()))
            .collect()
    }
}

fn unknown(block: usize, layer: &str) -> Error {
    Error::Backend {
        block,
        layer: Some(layer.to_string()),
        reason: "unknown linear in this block".into(),
    }
}

impl QuantizableModel for LlavaModel {
    type Sample = VlmSample;
    type Hidden = VlmHidden;

    fn num_blocks(&self) -> usize {
        self.cfg.feature_layers + 1 + self.lm.config().num_layers
    }

    fn block_name(&self, block: usize) -> String {
        match self.kind(block) {
            Ok(Kind::Vision(i)) => format!("{}encoder.layers.{i}", self.naming.vision),
            Ok(Kind::Projector) => self.naming.projector.trim_end_matches('.').to_string(),
            Ok(Kind::Lm(i)) => format!("{}layers.{i}", self.naming.lm),
            Err(_) => format!("block.{block}"),
        }
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        let info = |name: &str, l: &Linear| {
            let d = l.weight.dims();
            LinearInfo::new(name, d[1], d[0])
        };
        match self.kind(block) {
            Ok(Kind::Vision(i)) => {
                let l = &self.vision.layers[i].linears;
                let n = VISION_LINEAR_NAMES;
                vec![
                    vec![info(n[0], &l[0]), info(n[1], &l[1]), info(n[2], &l[2])],
                    vec![info(n[3], &l[3])],
                    vec![info(n[4], &l[4])],
                    vec![info(n[5], &l[5])],
                ]
            }
            Ok(Kind::Projector) => vec![
                vec![info(PROJECTOR_LINEAR_NAMES[0], &self.projector.linear_1)],
                vec![info(PROJECTOR_LINEAR_NAMES[1], &self.projector.linear_2)],
            ],
            Ok(Kind::Lm(i)) => self.lm.linear_groups(i),
            Err(_) => Vec::new(),
        }
    }

    fn token_info(&self, block: usize, s: &VlmSample) -> TokenInfo {
        let n = s.image_count();
        let p = self.cfg.vision.num_patches();
        let image = |cls: bool| -> Vec<Modality> {
            let mut one = vec![Modality::Vision; p];
            if cls {
                one.insert(0, Modality::Other);
            }
            one.repeat(n)
        };
        match self.kind(block) {
            Ok(Kind::Vision(_)) => TokenInfo::new(image(true)),
            Ok(Kind::Projector) => TokenInfo::new(image(self.cfg.keep_class_token)),
            _ => {
                let id = self.cfg.image_token_id;
                TokenInfo::from_tokens(s.tokens.iter().enumerate().map(|(t, &token)| {
                    let m = if token == id {
                        Modality::Vision
                    } else {
                        Modality::Text
                    };
                    (m, t < s.valid_len)
                }))
            }
        }
    }

    fn embed(&self, s: &VlmSample) -> Result<VlmHidden> {
        self.check_sample(s)?;
        Ok(VlmHidden::Vision(
            s.pixels
                .as_ref()
                .map(|p| self.vision_embed(p))
                .transpose()?,
        ))
    }

    fn block_forward(
        &self,
        block: usize,
        input: &VlmHidden,
        s: &VlmSample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<VlmHidden> {
        match self.kind(block)? {
            Kind::Vision(i) => match self.vision_in(block, input, s)? {
                Some(x) => {
                    let l = &self.vision.layers[i];
                    let y =
                        clip_layer_forward(&self.cfg.vision, l, x, sink, None).in_block(block)?;
                    Ok(VlmHidden::Vision(Some(y)))
                }
                None => {
                    self.show_empty(block, sink, false);
                    Ok(VlmHidden::Vision(None))
                }
            },
            Kind::Projector => {
                let feats = match self.vision_in(block, input, s)? {
                    Some(x) => Some(self.project(x, sink, None).in_block(block)?),
                    None => {
                        self.show_empty(block, sink, false);
                        None
                    }
                };
                Ok(VlmHidden::Text(
                    self.merge_embeddings(&[&s.tokens], feats.as_ref())?,
                ))
            }
            Kind::Lm(i) => {
                let x = self.text_in(block, input, s)?;
                let pos = self.lm.positional(s.tokens.len())?;
                let mut hooks = Hooks {
                    capture: sink,
                    probes: None,
                };
                Ok(VlmHidden::Text(
                    self.lm.layer(i, x, &pos, &mut hooks).map_err(|e| match e {
                        Error::Backend { layer, reason, .. } => Error::Backend {
                            block,
                            layer,
                            reason,
                        },
                        other => other,
                    })?,
                ))
            }
        }
    }

    fn block_stage(
        &self,
        block: usize,
        stage: usize,
        input: &VlmHidden,
        s: &VlmSample,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<VlmHidden>> {
        self.run_stage(block, stage, input, s, carry, sink)
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = VlmSample, Hidden = VlmHidden>> {
        Some(self)
    }

    fn linear_weight(&self, block: usize, layer: &str) -> Result<Array2<f32>> {
        self.linear_ref(block, layer)?.weight_rows(block)
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
    ) -> Result<()> {
        let (dtype, dev) = (self.dtype(), self.device().clone());
        let lin = self.linear_mut(block, layer)?;
        lin.replace_weight(block, layer, weight, dtype, &dev)
    }
}
