//! [`QuantizableModel`] for [`SmolVlmModel`] (the gradient half is in
//! `smolvlm_grad.rs`), one [`VlmSample`] at a time: `pixels` holds the
//! sample's real frames `[N, C, S, S]` in `<image>` order and the ids hold
//! `tokens_per_frame` `<image>` tokens per frame.
//!
//! Blocks, in order, named in the checkpoint's own spelling: the SigLIP
//! encoder layers (`model.vision_model.encoder.layers.N`), the connector
//! (`model.connector`: `post_layernorm`, pixel shuffle, linear
//! `modality_projection.proj`; its output is the LM's input embeddings),
//! then the Llama decoder layers (`model.text_model.layers.N`, the same
//! blocks as the Llama backend). Quantizing the LM only, the usual choice,
//! is `cfg.with_blocks(model.lm_only())`.
//!
//! Token rows: a vision block shows `frames x patches` rows (all
//! [`Modality::Vision`]); the connector one row per image feature (vision);
//! an LM block the sample's tokens (`<image>` positions vision, others
//! text, padding invalid).

use ndarray::{Array2, ArrayView2};
use vlmq::pipeline::BlockSelection;
use vlmq::{
    Error, GradientModel, LinearInfo, Modality, QuantizableModel, Result, RowSink, StageCarry,
    StageOutput, TokenInfo,
};

use crate::backend::llava::stream_error;
use crate::backend::text_stage::text_layer_stage;
use crate::error::CandleResultExt;
use crate::models::clip::VISION_LINEAR_NAMES;
use crate::models::idefics3::{connector_forward, CONNECTOR_LINEAR_NAMES};
use crate::models::llama::forward::Hooks;
use crate::models::llama::weights::Linear;
use crate::models::llava::sample::{VlmHidden, VlmSample};
use crate::models::siglip::{siglip_embed, siglip_layer_forward, siglip_post_norm};
use crate::models::smolvlm::SmolVlmModel;

/// What a block index of a SmolVLM model is.
pub(crate) enum Part {
    Vision(usize),
    Connector,
    Lm(usize),
}

impl SmolVlmModel {
    pub(crate) fn part(&self, block: usize) -> Result<Part> {
        let nv = self.cfg.vision.num_layers;
        let nl = self.cfg.text.num_layers;
        match block {
            b if b < nv => Ok(Part::Vision(b)),
            b if b == nv => Ok(Part::Connector),
            b if b <= nv + nl => Ok(Part::Lm(b - nv - 1)),
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

    /// Checks a sample against the model: ids, targets, padding, frames and
    /// the count of `<image>` tokens.
    pub fn check_sample(&self, s: &VlmSample) -> Result<()> {
        self.lm.check_tokens(&[&s.tokens])?;
        s.check_lengths()?;
        if let Some(p) = &s.pixels {
            self.check_frames(p)?;
        }
        let want = s.image_count() * self.cfg.tokens_per_frame();
        let have = self.image_positions(&[&s.tokens]).len();
        if have != want {
            return Err(Error::InvalidConfig {
                field: "<image> tokens",
                value: format!(
                    "{have} <image> tokens for {} frames x {}",
                    s.image_count(),
                    self.cfg.tokens_per_frame()
                ),
                reason: "the ids must hold exactly one <image> token per image feature",
            });
        }
        Ok(())
    }

    /// The vision stream of `h` for block `block`, checked against the sample.
    pub(crate) fn frames_in<'a>(
        &self,
        block: usize,
        h: &'a VlmHidden,
        s: &VlmSample,
    ) -> Result<Option<&'a candle_core::Tensor>> {
        let VlmHidden::Vision(x) = h else {
            return Err(stream_error(block, "vision"));
        };
        let v = &self.cfg.vision;
        let want = [s.image_count(), v.num_patches(), v.hidden_size];
        match x {
            Some(x) if x.dims() != want => Err(Error::shape("vision block input", &want, x.dims())),
            None if s.image_count() > 0 => Err(Error::shape("vision block input", &want, &[0])),
            _ => Ok(x.as_ref()),
        }
    }

    /// The text stream of `h` for block `block`, checked against the sample.
    pub(crate) fn tokens_in<'a>(
        &self,
        block: usize,
        h: &'a VlmHidden,
        s: &VlmSample,
    ) -> Result<&'a candle_core::Tensor> {
        let VlmHidden::Text(x) = h else {
            return Err(stream_error(block, "text"));
        };
        let want = [1, s.tokens.len(), self.cfg.text.hidden_size];
        if x.dims() != want {
            return Err(Error::shape("LM block input", &want, x.dims()));
        }
        Ok(x)
    }

    /// Shows zero rows for every linear of a block (a sample without images).
    pub(crate) fn show_nothing(&self, block: usize, sink: Option<&mut dyn RowSink>, outputs: bool) {
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

    /// The connector block: `post_layernorm`, pixel shuffle, projection,
    /// then the features merged into the sample's embeddings.
    pub(crate) fn connector_block(
        &self,
        block: usize,
        x: Option<&candle_core::Tensor>,
        s: &VlmSample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<VlmHidden> {
        let feats = match x {
            Some(x) => {
                let run = || -> candle_core::Result<_> {
                    let h = siglip_post_norm(&self.cfg.vision, &self.vision, x)?;
                    connector_forward(&self.connector, &h, self.cfg.scale_factor, sink, None)?
                        .flatten_to(1)
                };
                Some(run().in_block(block)?)
            }
            None => {
                self.show_nothing(block, sink, false);
                None
            }
        };
        Ok(VlmHidden::Text(
            self.merge_embeddings(&[&s.tokens], feats.as_ref())?,
        ))
    }

    fn linear_at(&self, block: usize, layer: &str) -> Result<&Linear> {
        let found = match self.part(block)? {
            Part::Vision(i) => self.vision.layers[i].linear(layer),
            Part::Connector => (layer == CONNECTOR_LINEAR_NAMES[0]).then_some(&self.connector.proj),
            Part::Lm(i) => self.lm.weights().layers[i].linear(layer),
        };
        found.ok_or_else(|| unknown(block, layer))
    }

    fn linear_at_mut(&mut self, block: usize, layer: &str) -> Result<&mut Linear> {
        let found = match self.part(block)? {
            Part::Vision(i) => self.vision.layers[i].linear_mut(layer),
            Part::Connector => {
                (layer == CONNECTOR_LINEAR_NAMES[0]).then_some(&mut self.connector.proj)
            }
            Part::Lm(i) => self.lm.weights_mut().layers[i].linear_mut(layer),
        };
        found.ok_or_else(|| unknown(block, layer))
    }
}

fn unknown(block: usize, layer: &str) -> Error {
    Error::Backend {
        block,
        layer: Some(layer.to_string()),
        reason: "unknown linear in this block".into(),
    }
}

fn lm_error(block: usize, e: Error) -> Error {
    match e {
        Error::Backend { layer, reason, .. } => Error::Backend {
            block,
            layer,
            reason,
        },
        other => other,
    }
}

impl QuantizableModel for SmolVlmModel {
    type Sample = VlmSample;
    type Hidden = VlmHidden;

    fn num_blocks(&self) -> usize {
        self.cfg.vision.num_layers + 1 + self.cfg.text.num_layers
    }

    fn block_name(&self, block: usize) -> String {
        match self.part(block) {
            Ok(Part::Vision(i)) => format!("{}encoder.layers.{i}", self.naming.vision),
            Ok(Part::Connector) => self.naming.connector.trim_end_matches('.').to_string(),
            Ok(Part::Lm(i)) => format!("{}layers.{i}", self.naming.lm),
            Err(_) => format!("block.{block}"),
        }
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        let info = |name: &str, l: &Linear| {
            let d = l.weight.dims();
            LinearInfo::new(name, d[1], d[0])
        };
        match self.part(block) {
            Ok(Part::Vision(i)) => {
                let l = &self.vision.layers[i].linears;
                let n = VISION_LINEAR_NAMES;
                vec![
                    vec![info(n[0], &l[0]), info(n[1], &l[1]), info(n[2], &l[2])],
                    vec![info(n[3], &l[3])],
                    vec![info(n[4], &l[4])],
                    vec![info(n[5], &l[5])],
                ]
            }
            Ok(Part::Connector) => {
                vec![vec![info(CONNECTOR_LINEAR_NAMES[0], &self.connector.proj)]]
            }
            Ok(Part::Lm(i)) => self.lm.linear_groups(i),
            Err(_) => Vec::new(),
        }
    }

    fn token_info(&self, block: usize, s: &VlmSample) -> TokenInfo {
        let n = s.image_count();
        match self.part(block) {
            Ok(Part::Vision(_)) => {
                TokenInfo::new(vec![Modality::Vision; n * self.cfg.vision.num_patches()])
            }
            Ok(Part::Connector) => {
                TokenInfo::new(vec![Modality::Vision; n * self.cfg.tokens_per_frame()])
            }
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
        let x = match &s.pixels {
            Some(p) => Some(
                p.to_dtype(self.dtype())
                    .and_then(|p| siglip_embed(&self.cfg.vision, &self.vision, &p))
                    .at_model()?,
            ),
            None => None,
        };
        Ok(VlmHidden::Vision(x))
    }

    fn block_forward(
        &self,
        block: usize,
        input: &VlmHidden,
        s: &VlmSample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<VlmHidden> {
        match self.part(block)? {
            Part::Vision(i) => match self.frames_in(block, input, s)? {
                Some(x) => {
                    let l = &self.vision.layers[i];
                    let y =
                        siglip_layer_forward(&self.cfg.vision, l, x, sink, None).in_block(block)?;
                    Ok(VlmHidden::Vision(Some(y)))
                }
                None => {
                    self.show_nothing(block, sink, false);
                    Ok(VlmHidden::Vision(None))
                }
            },
            Part::Connector => {
                let x = self.frames_in(block, input, s)?;
                self.connector_block(block, x, s, sink)
            }
            Part::Lm(i) => {
                let x = self.tokens_in(block, input, s)?;
                let pos = self.lm.positional(s.tokens.len())?;
                let mut hooks = Hooks {
                    capture: sink,
                    probes: None,
                };
                let y = self
                    .lm
                    .layer(i, x, &pos, &mut hooks)
                    .map_err(|e| lm_error(block, e))?;
                Ok(VlmHidden::Text(y))
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
        match self.part(block)? {
            Part::Lm(i) => {
                // A decoder layer runs each part once, as the Llama backend does.
                let x = self.tokens_in(block, input, s)?;
                let pos = self.lm.positional(s.tokens.len())?;
                let l = self.lm.layer_weights(i)?;
                text_layer_stage(&self.cfg.text, &l, block, stage, x, &pos, carry, sink)
            }
            Part::Vision(_) | Part::Connector => {
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

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = VlmSample, Hidden = VlmHidden>> {
        Some(self)
    }

    fn linear_weight(&self, block: usize, layer: &str) -> Result<Array2<f32>> {
        self.linear_at(block, layer)?.weight_rows(block)
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
    ) -> Result<()> {
        let (dtype, dev) = (self.dtype(), self.device().clone());
        let lin = self.linear_at_mut(block, layer)?;
        lin.replace_weight(block, layer, weight, dtype, &dev)
    }
}
