//! [`Qwen2VlModel`]: the vision tower, the merger and the Qwen2 language
//! model with M-RoPE, as transformers' `Qwen2VLForConditionalGeneration` /
//! `Qwen2_5_VLForConditionalGeneration` compute them:
//! 1. the tower runs on all images' patches at once (`pixel_values`
//!    `[patches, values]`, grids in occurrence order); Qwen2.5-VL permutes
//!    the merge blocks window by window before block 0 and undoes the
//!    permutation after the merger;
//! 2. the merged features replace the `<|image_pad|>` embeddings in order
//!    over the flattened batch (a count mismatch is an error);
//! 3. the decoder runs with M-RoPE positions from the token ids and grids.

use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use super::config::Qwen2VlConfig;
use super::grid::{
    expand_blocks, image_cu_seqlens, inverse, vision_position_ids, window_index, ImageGrid,
};
use super::mrope::{mrope_positional, rope_index, MropePositions};
use super::vision::{
    merger_forward, patch_embed, rotary_tables, QwenVisionWeights, VisionPositions,
};
use super::vision_block::block_forward;
use crate::error::CandleResultExt;
use crate::load::qwen2_vl::QwenVlNaming;
use crate::models::llama::forward::{Hooks, Positional};
use crate::models::llama::model::LlamaModel;

/// A Qwen2-VL-family model.
#[derive(Debug, Clone)]
pub struct Qwen2VlModel {
    pub(crate) cfg: Qwen2VlConfig,
    pub(crate) visual: QwenVisionWeights,
    pub(crate) lm: LlamaModel,
    pub(crate) naming: QwenVlNaming,
}

/// The tower's intermediates for one set of images.
#[derive(Debug, Clone)]
pub struct VisionTrace {
    /// The input of every block `[1, S, d]`, in run order (window order for Qwen2.5-VL).
    pub block_inputs: Vec<Tensor>,
    /// The last block's output `[1, S, d]` (run order, before the merger).
    pub last_hidden: Tensor,
    /// Merged features `[tokens, out]` in occurrence order.
    pub features: Tensor,
}

/// How the tower runs on one set of grids.
#[derive(Debug, Clone)]
pub(crate) struct VisionPlan {
    /// Rotary tables and segments, in run order.
    pub pos: VisionPositions,
    /// Patch order of the run (`None`: the input order).
    pub patch_order: Option<Tensor>,
    /// Merge-block order that undoes the permutation after the merger.
    pub undo: Option<Tensor>,
}

impl Qwen2VlModel {
    /// Assembles a model; the parts must agree with `cfg`. Its tensor names
    /// are the Hub spelling ([`QwenVlNaming::hub`]) until
    /// [`with_naming`](Self::with_naming).
    pub fn new(cfg: Qwen2VlConfig, visual: QwenVisionWeights, lm: LlamaModel) -> Result<Self> {
        if visual.blocks.len() != cfg.vision.depth {
            return Err(Error::InvalidConfig {
                field: "vision_config.depth",
                value: format!(
                    "{} blocks for depth {}",
                    visual.blocks.len(),
                    cfg.vision.depth
                ),
                reason: "the tower must hold one block per depth",
            });
        }
        if lm.config() != &cfg.text {
            return Err(Error::InvalidConfig {
                field: "text_config",
                value: format!("{:?}", lm.config()),
                reason: "the language model must follow the configuration's text part",
            });
        }
        Ok(Qwen2VlModel {
            cfg,
            visual,
            lm,
            naming: QwenVlNaming::hub(),
        })
    }

    /// The same model under another tensor spelling (block names and the
    /// exported checkpoint follow it).
    pub fn with_naming(mut self, naming: QwenVlNaming) -> Self {
        self.naming = naming;
        self
    }

    /// The tensor spelling of the checkpoint it came from.
    pub fn naming(&self) -> &QwenVlNaming {
        &self.naming
    }

    /// The configuration.
    pub fn config(&self) -> &Qwen2VlConfig {
        &self.cfg
    }

    /// The vision tower and merger.
    pub fn visual(&self) -> &QwenVisionWeights {
        &self.visual
    }

    /// The language model.
    pub fn lm(&self) -> &LlamaModel {
        &self.lm
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.lm.dtype()
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.lm.device()
    }

    /// Rotary tables, segments and permutation for `grids`.
    pub(crate) fn vision_plan(&self, grids: &[ImageGrid]) -> Result<VisionPlan> {
        let v = &self.cfg.vision;
        let m = v.spatial_merge_size;
        for g in grids {
            g.check(m)?;
        }
        let mut pos = vision_position_ids(grids, m);
        let images = image_cu_seqlens(grids);
        let (windows, patch_order, undo) = if v.window_size > 0 {
            let (idx, cu) = window_index(grids, m, v.window_size, v.patch_size);
            let order = expand_blocks(&idx, v.merge_unit());
            pos = order.iter().map(|&p| pos[p as usize]).collect();
            let undo: Vec<u32> = inverse(&idx).into_iter().map(|i| i as u32).collect();
            let n = order.len();
            let dev = self.device();
            (
                cu,
                Some(Tensor::from_vec(order, n, dev).at_model()?),
                Some(Tensor::from_vec(undo, idx.len(), dev).at_model()?),
            )
        } else {
            (images.clone(), None, None)
        };
        let (cos, sin) = rotary_tables(v, &pos, self.dtype(), self.device()).at_model()?;
        Ok(VisionPlan {
            pos: VisionPositions {
                cos,
                sin,
                images,
                windows,
            },
            patch_order,
            undo,
        })
    }

    /// Checks `pixel_values: [patches, values]` against the grids.
    pub(crate) fn check_pixels(&self, pixels: &Tensor, grids: &[ImageGrid]) -> Result<()> {
        let want = [
            grids.iter().map(ImageGrid::patches).sum(),
            self.cfg.vision.patch_values(),
        ];
        if pixels.dims() != want {
            return Err(Error::shape(
                "pixel_values against image_grid_thw",
                &want,
                pixels.dims(),
            ));
        }
        Ok(())
    }

    /// Runs the tower and merger on `pixels: [patches, values]` of images
    /// with `grids`, keeping every block's input.
    // Reached by the tests that compare the tower with transformers'.
    #[doc(hidden)]
    pub fn vision_trace(&self, pixels: &Tensor, grids: &[ImageGrid]) -> Result<VisionTrace> {
        self.check_pixels(pixels, grids)?;
        let plan = self.vision_plan(grids)?;
        let v = &self.cfg.vision;
        let mut x = patch_embed(&self.visual, pixels).at_model()?;
        if let Some(order) = &plan.patch_order {
            x = x.index_select(order, 1).at_model()?;
        }
        let mut block_inputs = Vec::with_capacity(v.depth);
        for (i, b) in self.visual.blocks.iter().enumerate() {
            block_inputs.push(x.clone());
            x = block_forward(v, b, &x, &plan.pos, v.windowed(i), None, None).in_block(i)?;
        }
        let mut features =
            merger_forward(v, &self.visual.merger, &x, None, None).in_block(v.depth)?;
        if let Some(undo) = &plan.undo {
            features = features.index_select(undo, 0).at_model()?;
        }
        Ok(VisionTrace {
            block_inputs,
            last_hidden: x,
            features,
        })
    }

    /// The merged image features `[tokens, out]` in occurrence order.
    pub fn image_features(&self, pixels: &Tensor, grids: &[ImageGrid]) -> Result<Tensor> {
        Ok(self.vision_trace(pixels, grids)?.features)
    }

    /// M-RoPE positions of every row; the grids are consumed in order over the batch.
    #[doc(hidden)]
    pub fn rope_positions(
        &self,
        batch: &[&[u32]],
        grids: &[ImageGrid],
    ) -> Result<Vec<MropePositions>> {
        let mut next = 0;
        let m = self.cfg.vision.spatial_merge_size;
        let rows = batch
            .iter()
            .map(|r| rope_index(r, self.cfg.image_token_id, grids, &mut next, m))
            .collect::<Result<Vec<_>>>()?;
        if next != grids.len() {
            return Err(Error::InvalidConfig {
                field: "image tokens",
                value: format!("{next} image token runs for {} images", grids.len()),
                reason: "every image needs its run of image tokens",
            });
        }
        Ok(rows)
    }

    /// The decoder's positional tables for M-RoPE positions.
    pub(crate) fn positional(&self, rows: &[MropePositions]) -> Result<Positional> {
        mrope_positional(
            &self.cfg.text,
            &self.cfg.mrope_section,
            rows,
            self.dtype(),
            self.device(),
        )
        .at_model()
    }

    /// Input embeddings `[B, T, hidden]` with `features` (one row per image
    /// token over the flattened batch, in order) in place of the image tokens.
    pub fn merge_embeddings(&self, batch: &[&[u32]], features: Option<&Tensor>) -> Result<Tensor> {
        let e = self.lm.embed_batch(batch)?;
        let (b, t, d) = e.dims3().at_model()?;
        let id = self.cfg.image_token_id;
        let slots: Vec<usize> = batch
            .iter()
            .flat_map(|r| r.iter())
            .enumerate()
            .filter(|(_, &tok)| tok == id)
            .map(|(p, _)| p)
            .collect();
        let have = features.map_or(Ok(0), |f| f.dim(0)).at_model()?;
        if have != slots.len() {
            return Err(Error::InvalidConfig {
                field: "image tokens",
                value: format!("{} image tokens for {have} image features", slots.len()),
                reason: "the ids must hold exactly one image token per merged feature",
            });
        }
        let Some(f) = features else {
            return Ok(e);
        };
        let mut index: Vec<u32> = (0..(b * t) as u32).collect();
        for (k, &p) in slots.iter().enumerate() {
            index[p] = (b * t + k) as u32;
        }
        let run = || -> candle_core::Result<Tensor> {
            let table = Tensor::cat(&[&e.reshape((b * t, d))?, &f.to_dtype(e.dtype())?], 0)?;
            let idx = Tensor::from_vec(index, b * t, e.device())?;
            table.index_select(&idx, 0)?.reshape((b, t, d))
        };
        run().at_model()
    }

    /// Hidden states: the merged embeddings, then every decoder layer's
    /// output (the last before the final norm).
    pub fn hidden_states(
        &self,
        batch: &[&[u32]],
        pixels: Option<&Tensor>,
        grids: &[ImageGrid],
    ) -> Result<Vec<Tensor>> {
        let feats = match pixels {
            Some(p) => Some(self.image_features(p, grids)?),
            None => None,
        };
        let mut h = self.merge_embeddings(batch, feats.as_ref())?;
        let pos = self.positional(&self.rope_positions(batch, grids)?)?;
        let mut out = vec![h.clone()];
        for i in 0..self.cfg.text.num_layers {
            h = self.lm.layer(i, &h, &pos, &mut Hooks::none())?;
            out.push(h.clone());
        }
        Ok(out)
    }

    /// Logits `[B, T, vocab]`.
    pub fn logits(
        &self,
        batch: &[&[u32]],
        pixels: Option<&Tensor>,
        grids: &[ImageGrid],
    ) -> Result<Tensor> {
        let hs = self.hidden_states(batch, pixels, grids)?;
        let last = hs.last().ok_or(Error::Empty {
            what: "decoder layers".into(),
        })?;
        self.lm.head_logits(last, false)
    }
}
