//! [`QuantizableModel`] for [`Qwen2VlModel`] (Qwen2-VL and Qwen2.5-VL; the
//! gradient half is in `qwen2_vl_grad.rs`), one [`QwenVlSample`] at a time.
//!
//! Blocks, in order: the vision blocks (`{visual}blocks.N`), the patch
//! merger (`{visual}merger`, linears `mlp.0`, `mlp.2`), then the decoder
//! layers (`{lm}layers.N`), named in the checkpoint's own spelling
//! ([`Qwen2VlModel::naming`]). The usual choice, quantizing the language
//! model only, is `cfg.with_blocks(model.lm_only())`.
//!
//! Hidden state: the vision stream `[1, S, d]` (all the sample's patches,
//! in the tower's run order: window order for Qwen2.5-VL; `None` without
//! images) up to the merger, which scatters its features into the token
//! embeddings; the text stream `[1, T, hidden]` after. Token rows: a vision
//! block shows its `S` patches, the merger its `S / merge^2` merged
//! patches (all [`Modality::Vision`]), a decoder layer the sample's tokens
//! (`<|image_pad|>` vision, the rest text). Decoder layers run with the
//! M-RoPE positions of `get_rope_index` for the sample's ids and grids.

use ndarray::{Array2, ArrayView2};
use vlmq::pipeline::BlockSelection;
use vlmq::{
    Error, GradientModel, LinearInfo, Modality, QuantizableModel, Result, RowSink, StageCarry,
    StageOutput, TokenInfo,
};

use crate::backend::llava::stream_error;
use crate::backend::text_stage::text_layer_stage;
use crate::error::CandleResultExt;
use crate::models::llama::forward::{Hooks, Positional};
use crate::models::llama::weights::Linear;
use crate::models::llava::sample::VlmHidden;
use crate::models::qwen2_vl::vision::{merger_forward, patch_embed};
use crate::models::qwen2_vl::vision_block::block_forward;
use crate::models::qwen2_vl::{Qwen2VlModel, QwenVlSample, MERGER_LINEARS};

/// What a block index names.
pub(crate) enum Kind {
    Vision(usize),
    Merger,
    Lm(usize),
}

impl Qwen2VlModel {
    pub(crate) fn kind(&self, block: usize) -> Result<Kind> {
        let nv = self.cfg.vision.depth;
        let nl = self.cfg.text.num_layers;
        match block {
            b if b < nv => Ok(Kind::Vision(b)),
            b if b == nv => Ok(Kind::Merger),
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

    /// Checks a sample: ids, targets, pixels against the grids, and one
    /// `<|image_pad|>` run per image.
    pub fn check_sample(&self, s: &QwenVlSample) -> Result<()> {
        self.lm.check_tokens(&[&s.tokens])?;
        if s.targets.len() != s.tokens.len() {
            return Err(Error::shape(
                "sample targets",
                &[s.tokens.len()],
                &[s.targets.len()],
            ));
        }
        match &s.pixels {
            Some(p) => self.check_pixels(p, &s.grids)?,
            None if !s.grids.is_empty() => {
                return Err(Error::shape("sample pixel_values", &[1], &[0]))
            }
            None => {}
        }
        self.rope_positions(&[&s.tokens], &s.grids)?;
        Ok(())
    }

    /// The decoder's M-RoPE tables for a sample.
    pub(crate) fn sample_positional(&self, s: &QwenVlSample) -> Result<Positional> {
        self.positional(&self.rope_positions(&[&s.tokens], &s.grids)?)
    }

    /// The vision stream of `h`, checked against the sample's patch count.
    pub(crate) fn vision_in<'a>(
        &self,
        block: usize,
        h: &'a VlmHidden,
        s: &QwenVlSample,
    ) -> Result<Option<&'a candle_core::Tensor>> {
        let VlmHidden::Vision(x) = h else {
            return Err(stream_error(block, "vision"));
        };
        let patches = s.grids.iter().map(|g| g.patches()).sum();
        let want = [1, patches, self.cfg.vision.width];
        match x {
            Some(x) if x.dims() != want => Err(Error::shape("vision block input", &want, x.dims())),
            None if patches > 0 => Err(Error::shape("vision block input", &want, &[0])),
            _ => Ok(x.as_ref()),
        }
    }

    /// The text stream of `h`, checked against the sample's length.
    pub(crate) fn text_in<'a>(
        &self,
        block: usize,
        h: &'a VlmHidden,
        s: &QwenVlSample,
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

    /// The merged features of the merger's input (un-permuted to occurrence
    /// order) scattered into the sample's token embeddings.
    pub(crate) fn merged_embeddings(
        &self,
        s: &QwenVlSample,
        features: Option<&candle_core::Tensor>,
    ) -> Result<candle_core::Tensor> {
        let feats = match (features, self.vision_plan(&s.grids)?.undo) {
            (Some(f), Some(undo)) => Some(f.index_select(&undo, 0).at_model()?),
            (f, _) => f.cloned(),
        };
        self.merge_embeddings(&[&s.tokens], feats.as_ref())
    }

    fn linear_ref(&self, block: usize, layer: &str) -> Result<&Linear> {
        let found = match self.kind(block)? {
            Kind::Vision(i) => self.visual.blocks[i].linear(layer),
            Kind::Merger => merger_index(layer).map(|i| &self.visual.merger.linears[i]),
            Kind::Lm(i) => self.lm.weights().layers[i].linear(layer),
        };
        found.ok_or_else(|| unknown(block, layer))
    }

    fn linear_mut(&mut self, block: usize, layer: &str) -> Result<&mut Linear> {
        let found = match self.kind(block)? {
            Kind::Vision(i) => self.visual.blocks[i].linear_mut(layer),
            Kind::Merger => merger_index(layer).map(|i| &mut self.visual.merger.linears[i]),
            Kind::Lm(i) => self.lm.weights_mut().layers[i].linear_mut(layer),
        };
        found.ok_or_else(|| unknown(block, layer))
    }
}

fn merger_index(layer: &str) -> Option<usize> {
    MERGER_LINEARS.iter().position(|n| *n == layer)
}

fn unknown(block: usize, layer: &str) -> Error {
    Error::Backend {
        block,
        layer: Some(layer.to_string()),
        reason: "unknown linear in this block".into(),
    }
}

impl QuantizableModel for Qwen2VlModel {
    type Sample = QwenVlSample;
    type Hidden = VlmHidden;

    fn num_blocks(&self) -> usize {
        self.cfg.vision.depth + 1 + self.cfg.text.num_layers
    }

    fn block_name(&self, block: usize) -> String {
        match self.kind(block) {
            Ok(Kind::Vision(i)) => format!("{}blocks.{i}", self.naming.visual),
            Ok(Kind::Merger) => format!("{}merger", self.naming.visual),
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
                let b = &self.visual.blocks[i];
                let names = b.linear_names();
                let one = |k: usize| info(names[k], &b.linears[k]);
                if b.linears.len() == 5 {
                    // SwiGLU: gate and up read the same input.
                    vec![
                        vec![one(0)],
                        vec![one(1)],
                        vec![one(2), one(3)],
                        vec![one(4)],
                    ]
                } else {
                    (0..b.linears.len()).map(|k| vec![one(k)]).collect()
                }
            }
            Ok(Kind::Merger) => {
                let l = &self.visual.merger.linears;
                vec![
                    vec![info(MERGER_LINEARS[0], &l[0])],
                    vec![info(MERGER_LINEARS[1], &l[1])],
                ]
            }
            Ok(Kind::Lm(i)) => self.lm.linear_groups(i),
            Err(_) => Vec::new(),
        }
    }

    fn token_info(&self, block: usize, s: &QwenVlSample) -> TokenInfo {
        let patches: usize = s.grids.iter().map(|g| g.patches()).sum();
        match self.kind(block) {
            Ok(Kind::Vision(_)) => TokenInfo::uniform(Modality::Vision, patches),
            Ok(Kind::Merger) => {
                TokenInfo::uniform(Modality::Vision, patches / self.cfg.vision.merge_unit())
            }
            _ => {
                let id = self.cfg.image_token_id;
                TokenInfo::new(
                    s.tokens
                        .iter()
                        .map(|&t| {
                            if t == id {
                                Modality::Vision
                            } else {
                                Modality::Text
                            }
                        })
                        .collect(),
                )
            }
        }
    }

    fn embed(&self, s: &QwenVlSample) -> Result<VlmHidden> {
        self.check_sample(s)?;
        let Some(p) = &s.pixels else {
            return Ok(VlmHidden::Vision(None));
        };
        let mut x = patch_embed(&self.visual, p).at_model()?;
        if let Some(order) = &self.vision_plan(&s.grids)?.patch_order {
            x = x.index_select(order, 1).at_model()?;
        }
        Ok(VlmHidden::Vision(Some(x)))
    }

    fn block_forward(
        &self,
        block: usize,
        input: &VlmHidden,
        s: &QwenVlSample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<VlmHidden> {
        let v = &self.cfg.vision;
        match self.kind(block)? {
            Kind::Vision(i) => match self.vision_in(block, input, s)? {
                Some(x) => {
                    let plan = self.vision_plan(&s.grids)?;
                    let b = &self.visual.blocks[i];
                    let y = block_forward(v, b, x, &plan.pos, v.windowed(i), sink, None)
                        .in_block(block)?;
                    Ok(VlmHidden::Vision(Some(y)))
                }
                None => {
                    self.show_empty(block, sink, false);
                    Ok(VlmHidden::Vision(None))
                }
            },
            Kind::Merger => {
                let feats = match self.vision_in(block, input, s)? {
                    Some(x) => Some(
                        merger_forward(v, &self.visual.merger, x, sink, None).in_block(block)?,
                    ),
                    None => {
                        self.show_empty(block, sink, false);
                        None
                    }
                };
                Ok(VlmHidden::Text(self.merged_embeddings(s, feats.as_ref())?))
            }
            Kind::Lm(i) => {
                let x = self.text_in(block, input, s)?;
                let pos = self.sample_positional(s)?;
                let mut hooks = Hooks {
                    capture: sink,
                    probes: None,
                };
                let y = self.lm.layer(i, x, &pos, &mut hooks).map_err(|e| match e {
                    Error::Backend { layer, reason, .. } => Error::Backend {
                        block,
                        layer,
                        reason,
                    },
                    other => other,
                })?;
                Ok(VlmHidden::Text(y))
            }
        }
    }

    /// A decoder layer runs its stages (each part once, M-RoPE tables
    /// shared); vision blocks and the merger run one whole forward per
    /// stage (the trait's default).
    fn block_stage(
        &self,
        block: usize,
        stage: usize,
        input: &VlmHidden,
        s: &QwenVlSample,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<VlmHidden>> {
        if let Kind::Lm(i) = self.kind(block)? {
            let x = self.text_in(block, input, s)?;
            let pos = self.sample_positional(s)?;
            let l = self.lm.layer_weights(i)?;
            return text_layer_stage(&self.cfg.text, &l, block, stage, x, &pos, carry, sink);
        }
        if stage < self.linear_groups(block).len() {
            self.block_forward(block, input, s, Some(sink))?;
            Ok(StageOutput::Carry(Box::new(())))
        } else {
            Ok(StageOutput::Output(
                self.block_forward(block, input, s, None)?,
            ))
        }
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = QwenVlSample, Hidden = VlmHidden>> {
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
