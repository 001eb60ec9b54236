//! A sequence model built from the ops of this module, implementing
//! [`QuantizableModel`].
//!
//! # Shape of the model
//!
//! A [`SequenceModel`] is a front end, a flat list of [`Block`]s and an LM
//! head. Blocks are either transformer blocks or (at most one) projector,
//! which splits the list into two stages:
//!
//! - **Without a projector** (a text decoder): the first block's input is
//!   `[vision rows; token embeddings]`, where the optional vision rows are
//!   the sample's precomputed embeddings or its patches run through the
//!   patch embedding.
//! - **With a projector** (a ViT-LLM): blocks before it form the vision
//!   encoder and run on the vision rows only (usually bidirectional); the
//!   projector maps them to the LM width and appends the sample's token
//!   embeddings; blocks after it form the language model over
//!   `[vision tokens; text tokens]` (usually causal).
//!
//! Either way, positions in [`Sample::targets`] and [`Sample::valid`] index
//! the language-model sequence `[vision tokens; text tokens]`.
//!
//! ```
//! use ndarray::Array2;
//! use vlmq_nn::*;
//! use vlmq::QuantizableModel;
//!
//! let mut rng = Rng::new(0);
//! let (d_vit, d_lm, vocab, patch_dim) = (16, 32, 50, 12);
//! let mut blocks = Vec::new();
//! for _ in 0..2 {
//!     // ViT encoder: bidirectional attention over the patch tokens.
//!     blocks.push(Block::Transformer(TransformerBlock::init(&mut rng, BlockConfig::encoder(d_vit, 2, 64))?));
//! }
//! blocks.push(Block::Projector(Projector { proj: Linear::init(&mut rng, d_vit, d_lm, true) }));
//! for _ in 0..2 {
//!     // Causal LM over [vision tokens; text tokens].
//!     blocks.push(Block::Transformer(TransformerBlock::init(&mut rng, BlockConfig::decoder(d_lm, 4, 86))?));
//! }
//! let model = SequenceModel::new(
//!     Some(PatchEmbedding::init(&mut rng, patch_dim, d_vit, 16)),
//!     Embedding::init(&mut rng, vocab, d_lm),
//!     blocks,
//!     Norm::new(NormKind::Rms, d_lm),
//!     LmHead::init(&mut rng, d_lm, vocab),
//! )?;
//! // 4 patches, then 3 text tokens; predict token 9 after the last text token.
//! let sample = Sample::text(vec![3, 7, 1])
//!     .with_vision(Vision::Patches(Array2::zeros((4, patch_dim))))
//!     .with_targets(vec![(6, 9)]);
//! assert_eq!(model.num_blocks(), 5);
//! assert!(model.loss(&sample)?.is_finite());
//! # Ok::<(), vlmq::Error>(())
//! ```

use ndarray::{concatenate, s, Array2, ArrayView2, ArrayViewD, ArrayViewMutD, Axis};

use super::block::{BlockCache, BlockConfig, TransformerBlock};
use super::embedding::{Embedding, PatchEmbedding};
use super::head::LmHead;
use super::linear::{Linear, LinearCache};
use super::norm::{Norm, NormCache};
use super::params::{join, Grads, Module};
use super::sample::{Sample, Vision};
use super::Rng;
use vlmq::__private::matmul;
use vlmq::backend::{GradientModel, LinearInfo, Modality, QuantizableModel, RowSink, TokenInfo};
use vlmq::error::{Error, Result};

/// A projector between the vision encoder and the language model: maps the
/// vision rows with its linear (`proj`) and appends the token embeddings.
#[derive(Debug, Clone)]
pub struct Projector {
    /// Vision width to LM width; its quantizable name is `"proj"`.
    pub proj: Linear,
}

/// One entry of a [`SequenceModel`]'s block list.
// A model holds a handful of blocks, each owning megabytes of weights on the
// heap: the inline size difference is irrelevant and boxing would only make
// matching on blocks noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Block {
    /// A pre-norm transformer block.
    Transformer(TransformerBlock),
    /// The vision-to-language projector (at most one per model).
    Projector(Projector),
}

/// Front end, blocks and LM head of a (vision-)language model.
/// Parameter names: `patch_embed.*`, `embed.weight`, `blocks.{i}.*`,
/// `final_norm.*`, `head.proj.weight`.
#[derive(Debug, Clone)]
pub struct SequenceModel {
    /// Embeds [`Vision::Patches`]; required for samples that carry patches.
    pub patch_embed: Option<PatchEmbedding>,
    /// Text token embeddings at the LM width.
    pub token_embed: Embedding,
    /// The blocks, in order.
    pub blocks: Vec<Block>,
    /// Norm applied before the head.
    pub final_norm: Norm,
    /// The LM head.
    pub head: LmHead,
}

/// A block's forward cache inside [`SequenceModel::loss_and_grads`].
enum StepCache {
    Transformer(Box<BlockCache>),
    Projector(LinearCache),
}

impl SequenceModel {
    /// Assembles a model, checking that there is at most one projector and
    /// that the widths of consecutive parts agree.
    pub fn new(
        patch_embed: Option<PatchEmbedding>,
        token_embed: Embedding,
        blocks: Vec<Block>,
        final_norm: Norm,
        head: LmHead,
    ) -> Result<Self> {
        let projectors = blocks
            .iter()
            .filter(|b| matches!(b, Block::Projector(_)))
            .count();
        if projectors > 1 {
            return Err(Error::InvalidConfig {
                field: "blocks",
                value: format!("{projectors} projectors"),
                reason: "a model has at most one projector",
            });
        }
        let mut width = patch_embed.as_ref().map(|p| p.proj.out_features());
        if projectors == 0 {
            width = Some(token_embed.dim());
        }
        for (i, b) in blocks.iter().enumerate() {
            let (inp, out) = match b {
                Block::Transformer(t) => (t.d_model(), t.d_model()),
                Block::Projector(p) => (p.proj.in_features(), p.proj.out_features()),
            };
            if let Some(w) = width {
                if w != inp {
                    return Err(Error::shape(
                        format!("input width of block {i}"),
                        &[w],
                        &[inp],
                    ));
                }
            }
            width = Some(out);
            if matches!(b, Block::Projector(_)) && out != token_embed.dim() {
                return Err(Error::shape(
                    "projector output width",
                    &[token_embed.dim()],
                    &[out],
                ));
            }
        }
        let d = token_embed.dim();
        if final_norm.dim() != d || head.proj.in_features() != d {
            return Err(Error::shape(
                "final norm / head width",
                &[d],
                &[final_norm.dim(), head.proj.in_features()],
            ));
        }
        Ok(SequenceModel {
            patch_embed,
            token_embed,
            blocks,
            final_norm,
            head,
        })
    }

    /// A text decoder: `n_blocks` blocks of `config`, a vocabulary of `vocab`.
    pub fn decoder(
        rng: &mut Rng,
        vocab: usize,
        n_blocks: usize,
        config: BlockConfig,
    ) -> Result<Self> {
        let d = config.d_model;
        let blocks = (0..n_blocks)
            .map(|_| TransformerBlock::init(rng, config).map(Block::Transformer))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::new(config.norm, d);
        SequenceModel::new(
            None,
            Embedding::init(rng, vocab, d),
            blocks,
            norm,
            LmHead::init(rng, d, vocab),
        )
    }

    /// Index of the projector block, if any.
    pub fn projector_index(&self) -> Option<usize> {
        self.blocks
            .iter()
            .position(|b| matches!(b, Block::Projector(_)))
    }

    /// Whether block `block` runs on the vision rows only.
    fn in_vision_stage(&self, block: usize) -> bool {
        self.projector_index().is_some_and(|p| block <= p)
    }

    pub(crate) fn block(&self, block: usize) -> Result<&Block> {
        self.blocks.get(block).ok_or_else(|| Error::Backend {
            block,
            layer: None,
            reason: format!("the model has {} blocks", self.blocks.len()),
        })
    }

    fn block_linear(&self, block: usize, layer: &str) -> Result<&Linear> {
        let lin = match self.block(block)? {
            Block::Transformer(t) => t.linear(layer),
            Block::Projector(p) => (layer == "proj").then_some(&p.proj),
        };
        lin.ok_or_else(|| Error::Backend {
            block,
            layer: Some(layer.to_string()),
            reason: "no such linear".into(),
        })
    }

    /// Runs linear `layer` of block `block` through `kernel` (e.g. a packed
    /// linear) instead of its dense weight; the bias is kept.
    pub fn set_linear_kernel(
        &mut self,
        block: usize,
        layer: &str,
        kernel: std::sync::Arc<dyn super::linear::LinearKernel>,
    ) -> Result<()> {
        self.block(block)?;
        match &mut self.blocks[block] {
            Block::Transformer(t) => t.set_linear_kernel(layer, kernel),
            Block::Projector(p) if layer == "proj" => p.proj.set_kernel(kernel),
            Block::Projector(_) => Err(Error::Backend {
                block,
                layer: Some(layer.to_string()),
                reason: "no such linear".into(),
            }),
        }
        .map_err(|e| match e {
            Error::Backend { layer, reason, .. } => Error::Backend {
                block,
                layer,
                reason,
            },
            other => other,
        })
    }

    /// The key padding mask at block `block`'s input, after checking the sample.
    pub(crate) fn mask(&self, block: usize, sample: &Sample) -> Result<Option<Vec<bool>>> {
        let Some(valid) = &sample.valid else {
            return Ok(None);
        };
        if valid.len() != sample.len() {
            return Err(Error::shape(
                "sample padding mask",
                &[sample.len()],
                &[valid.len()],
            ));
        }
        if self.in_vision_stage(block) {
            Ok(Some(valid[..sample.vision_len()].to_vec()))
        } else {
            Ok(Some(valid.clone()))
        }
    }

    /// The vision rows at the first block's input, with the patch cache.
    fn vision_input(&self, sample: &Sample) -> Result<Option<(Array2<f32>, Option<LinearCache>)>> {
        match &sample.vision {
            None => Ok(None),
            Some(Vision::Embeddings(e)) => Ok(Some((e.clone(), None))),
            Some(Vision::Patches(p)) => {
                let pe = self
                    .patch_embed
                    .as_ref()
                    .ok_or_else(|| Error::InvalidConfig {
                        field: "sample.vision",
                        value: "patches".into(),
                        reason: "the model has no patch embedding",
                    })?;
                let (y, c) = pe.forward(p.view())?;
                Ok(Some((y, Some(c))))
            }
        }
    }

    fn append_text(&self, vision: Option<Array2<f32>>, sample: &Sample) -> Result<Array2<f32>> {
        let text = self.token_embed.forward(&sample.tokens)?;
        match vision {
            None => Ok(text),
            Some(v) => concatenate(Axis(0), &[v.view(), text.view()])
                .map_err(|_| Error::shape("vision embedding width", &[text.ncols()], &[v.ncols()])),
        }
    }

    fn projector_forward(
        &self,
        p: &Projector,
        x: ArrayView2<'_, f32>,
        sample: &Sample,
    ) -> Result<(Array2<f32>, LinearCache)> {
        let (y, c) = p.proj.forward(x)?;
        Ok((self.append_text(Some(y), sample)?, c))
    }

    /// Final hidden state (before the final norm) of a sample.
    pub fn forward(&self, sample: &Sample) -> Result<Array2<f32>> {
        let mut h = self.embed(sample)?;
        for b in 0..self.blocks.len() {
            h = self.block_forward(b, &h, sample, None)?;
        }
        Ok(h)
    }

    /// Logits `[tokens, vocab]` of every position of a sample.
    pub fn logits(&self, sample: &Sample) -> Result<Array2<f32>> {
        let h = self.forward(sample)?;
        let (n, _) = self.final_norm.forward(h.view())?;
        self.head.logits(n.view())
    }

    /// Full forward and backward pass of one sample: returns the task loss
    /// and accumulates every parameter's gradient into `grads`.
    pub fn loss_and_grads(&self, sample: &Sample, grads: &mut Grads) -> Result<f32> {
        if sample.targets.is_empty() {
            return Err(Error::Empty {
                what: "sample targets".into(),
            });
        }
        let vision = self.vision_input(sample)?;
        let (mut h, patch_cache) = match (vision, self.projector_index()) {
            (Some((v, c)), Some(_)) => (v, c),
            (v, None) => {
                let (rows, c) = v.map_or((None, None), |(r, c)| (Some(r), c));
                (self.append_text(rows, sample)?, c)
            }
            (None, Some(_)) => {
                return Err(Error::Empty {
                    what: "vision input of a model with a projector".into(),
                })
            }
        };
        let mut caches = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let mask = self.mask(i, sample)?;
            let (y, c) = match b {
                Block::Transformer(t) => {
                    let (y, c) = t.forward(h.view(), mask.as_deref(), None)?;
                    (y, StepCache::Transformer(Box::new(c)))
                }
                Block::Projector(p) => {
                    let (y, c) = self.projector_forward(p, h.view(), sample)?;
                    (y, StepCache::Projector(c))
                }
            };
            caches.push(c);
            h = y;
        }
        let (loss, mut g) = self.head_loss(h.view(), sample, Some(grads))?;
        for (i, (b, c)) in self.blocks.iter().zip(&caches).enumerate().rev() {
            let prefix = format!("blocks.{i}.");
            g = match (b, c) {
                (Block::Transformer(t), StepCache::Transformer(c)) => {
                    t.backward(c, g.view(), Some(grads), &prefix, None)?
                }
                (Block::Projector(p), StepCache::Projector(c)) => {
                    let pv = c.input().nrows();
                    self.token_embed.backward(
                        &sample.tokens,
                        g.slice(s![pv.., ..]),
                        grads,
                        "embed.",
                    )?;
                    p.proj.backward(
                        c,
                        g.slice(s![..pv, ..]),
                        Some(&mut *grads),
                        &join(&prefix, "proj."),
                    )?
                }
                _ => unreachable!("caches follow the blocks"),
            };
        }
        let pv = sample.vision_len();
        if self.projector_index().is_none() {
            self.token_embed
                .backward(&sample.tokens, g.slice(s![pv.., ..]), grads, "embed.")?;
        }
        if let (Some(c), Some(pe)) = (patch_cache, &self.patch_embed) {
            pe.backward(&c, g.slice(s![..pv, ..]), grads, "patch_embed.")?;
        }
        Ok(loss)
    }

    /// Task loss of a sample (no gradients).
    pub fn loss(&self, sample: &Sample) -> Result<f32> {
        let h = self.forward(sample)?;
        Ok(self.head_loss(h.view(), sample, None)?.0)
    }

    fn head_loss(
        &self,
        h: ArrayView2<'_, f32>,
        sample: &Sample,
        mut grads: Option<&mut Grads>,
    ) -> Result<(f32, Array2<f32>)> {
        let (n, nc): (Array2<f32>, NormCache) = self.final_norm.forward(h)?;
        let (loss, dn) =
            self.head
                .loss_and_grad(n.view(), &sample.targets, grads.as_deref_mut(), "head.")?;
        let dh = self
            .final_norm
            .backward(&nc, dn.view(), grads, "final_norm.")?;
        Ok((loss, dh))
    }

    /// The block-local perturbed importance source for transformer block
    /// `block` (see [`TransformerBlock::perturbed_output_grads`]).
    pub fn block_perturbed_grads(
        &self,
        block: usize,
        input: &Array2<f32>,
        sample: &Sample,
        perturb: &dyn Fn(&str, ArrayView2<'_, f32>) -> Array2<f32>,
        sink: &mut dyn RowSink,
    ) -> Result<f32> {
        match self.block(block)? {
            Block::Transformer(t) => {
                let mask = self.mask(block, sample)?;
                t.perturbed_output_grads(input.view(), mask.as_deref(), perturb, sink)
            }
            Block::Projector(p) => {
                // One linear: L = 1/2 ||x (W~ - W)^T||^2 has output gradient x (W~ - W)^T.
                let w = p.proj.dense_weight()?;
                let delta = perturb("proj", w.view()) - &w;
                let g = matmul(input.view(), delta.t());
                let loss = 0.5 * g.iter().map(|v| v * v).sum::<f32>();
                sink.rows("proj", g.view());
                Ok(loss)
            }
        }
    }
}

impl QuantizableModel for SequenceModel {
    type Sample = Sample;
    type Hidden = Array2<f32>;

    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn block_name(&self, block: usize) -> String {
        format!("blocks.{block}")
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        match self.blocks.get(block) {
            Some(Block::Transformer(t)) => t.linear_groups(),
            Some(Block::Projector(p)) => vec![vec![LinearInfo::new(
                "proj",
                p.proj.in_features(),
                p.proj.out_features(),
            )]],
            None => Vec::new(),
        }
    }

    fn token_info(&self, block: usize, sample: &Sample) -> TokenInfo {
        let pv = sample.vision_len();
        let mut modality = vec![Modality::Vision; pv];
        if !self.in_vision_stage(block) {
            modality.extend(std::iter::repeat_n(Modality::Text, sample.tokens.len()));
        }
        let valid = match &sample.valid {
            Some(v) if v.len() == sample.len() => v[..modality.len()].to_vec(),
            _ => vec![true; modality.len()],
        };
        // One flag per token by construction (`valid` has `modality.len()` entries).
        TokenInfo::from_tokens(modality.into_iter().zip(valid))
    }

    fn embed(&self, sample: &Sample) -> Result<Array2<f32>> {
        let vision = self.vision_input(sample)?.map(|(v, _)| v);
        match (vision, self.projector_index()) {
            (Some(v), Some(_)) => Ok(v),
            (None, Some(_)) => Err(Error::Empty {
                what: "vision input of a model with a projector".into(),
            }),
            (v, None) => self.append_text(v, sample),
        }
    }

    fn block_forward(
        &self,
        block: usize,
        input: &Array2<f32>,
        sample: &Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        let mask = self.mask(block, sample)?;
        match self.block(block)? {
            Block::Transformer(t) => Ok(t.forward(input.view(), mask.as_deref(), sink)?.0),
            Block::Projector(p) => {
                if let Some(s) = sink {
                    s.rows("proj", input.view());
                }
                Ok(self.projector_forward(p, input.view(), sample)?.0)
            }
        }
    }

    fn block_stage(
        &self,
        block: usize,
        stage: usize,
        input: &Array2<f32>,
        sample: &Sample,
        carry: Option<vlmq::StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<vlmq::StageOutput<Array2<f32>>> {
        self.run_stage(block, stage, input, sample, carry, sink)
    }

    fn linear_weight(&self, block: usize, layer: &str) -> Result<Array2<f32>> {
        self.block_linear(block, layer)?.dense_weight()
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
    ) -> Result<()> {
        let expected = {
            let l = self.block_linear(block, layer)?;
            [l.out_features(), l.in_features()]
        };
        if weight.shape() != expected {
            return Err(Error::shape(
                format!("weight of blocks.{block}.{layer}"),
                &expected,
                weight.shape(),
            ));
        }
        match &mut self.blocks[block] {
            Block::Transformer(t) => t.set_linear_weight(layer, weight),
            Block::Projector(p) => p.proj.set_weight(weight),
        }
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = Sample, Hidden = Array2<f32>>> {
        Some(self)
    }
}

impl GradientModel for SequenceModel {
    fn block_backward(
        &self,
        block: usize,
        input: &Array2<f32>,
        sample: &Sample,
        grad_output: &Array2<f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        let mask = self.mask(block, sample)?;
        match self.block(block)? {
            Block::Transformer(t) => {
                let (_, cache) = t.forward(input.view(), mask.as_deref(), None)?;
                t.backward(&cache, grad_output.view(), None, "", sink)
            }
            Block::Projector(p) => {
                let pv = input.nrows();
                let expected = [pv + sample.tokens.len(), p.proj.out_features()];
                if grad_output.shape() != expected {
                    return Err(Error::shape(
                        "projector output gradient",
                        &expected,
                        grad_output.shape(),
                    ));
                }
                let g = grad_output.slice(s![..pv, ..]);
                if let Some(s) = sink {
                    s.rows("proj", g);
                }
                let (_, cache) = p.proj.forward(input.view())?;
                p.proj.backward(&cache, g, None, "")
            }
        }
    }

    fn hidden_rows(&self, hidden: &Array2<f32>) -> Result<Array2<f32>> {
        Ok(hidden.clone())
    }

    fn loss_and_grad(
        &self,
        output: &Array2<f32>,
        sample: &Sample,
    ) -> Result<Option<(f32, Array2<f32>)>> {
        if sample.targets.is_empty() {
            return Ok(None);
        }
        self.head_loss(output.view(), sample, None).map(Some)
    }

    fn block_local_backward(
        &self,
        block: usize,
        input: &Array2<f32>,
        sample: &Sample,
        perturb: &vlmq::backend::WeightPerturbation<'_>,
        sink: &mut dyn RowSink,
    ) -> Result<()> {
        let failure = std::sync::Mutex::new(None);
        let infallible = |name: &str, w: ArrayView2<'_, f32>| match perturb(name, w) {
            Ok(p) => p,
            Err(e) => {
                failure
                    .lock()
                    .expect("no panics while held")
                    .get_or_insert(e);
                w.to_owned()
            }
        };
        self.block_perturbed_grads(block, input, sample, &infallible, sink)?;
        match failure.into_inner().expect("no panics while held") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Module for SequenceModel {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        if let Some(p) = &self.patch_embed {
            p.visit_params(&join(prefix, "patch_embed."), f);
        }
        self.token_embed.visit_params(&join(prefix, "embed."), f);
        for (i, b) in self.blocks.iter().enumerate() {
            let pre = format!("{prefix}blocks.{i}.");
            match b {
                Block::Transformer(t) => t.visit_params(&pre, f),
                Block::Projector(p) => p.proj.visit_params(&join(&pre, "proj."), f),
            }
        }
        self.final_norm
            .visit_params(&join(prefix, "final_norm."), f);
        self.head.visit_params(&join(prefix, "head."), f);
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        if let Some(p) = &mut self.patch_embed {
            p.visit_params_mut(&join(prefix, "patch_embed."), f);
        }
        self.token_embed
            .visit_params_mut(&join(prefix, "embed."), f);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let pre = format!("{prefix}blocks.{i}.");
            match b {
                Block::Transformer(t) => t.visit_params_mut(&pre, f),
                Block::Projector(p) => p.proj.visit_params_mut(&join(&pre, "proj."), f),
            }
        }
        self.final_norm
            .visit_params_mut(&join(prefix, "final_norm."), f);
        self.head.visit_params_mut(&join(prefix, "head."), f);
    }
}
