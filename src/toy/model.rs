//! The toy ViT-LLM: a ViT encoder over the image patches, a projector, and a
//! small causal language model over `[vision tokens; question tokens]` whose
//! prediction at the question mark is the answer.

use rayon::prelude::*;

use super::scores::AnswerScores;
use super::task::{vocab, VqaExample, PATCH_DIM, VISION_TOKENS};
use crate::error::Result;
use crate::nn::{
    Adam, Block, BlockConfig, Embedding, Grads, Linear, LmHead, Norm, NormKind, PatchEmbedding,
    Projector, Rng, Sample, SequenceModel, TransformerBlock, Vision,
};

/// Sizes of the toy model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToyConfig {
    /// ViT width.
    pub d_vit: usize,
    /// Language-model width.
    pub d_lm: usize,
    /// ViT blocks.
    pub vit_blocks: usize,
    /// Language-model blocks.
    pub lm_blocks: usize,
    /// Attention heads (both stages).
    pub heads: usize,
    /// MLP hidden width (both stages).
    pub hidden: usize,
}

impl Default for ToyConfig {
    fn default() -> Self {
        ToyConfig {
            d_vit: 64,
            d_lm: 64,
            vit_blocks: 2,
            lm_blocks: 2,
            heads: 4,
            hidden: 128,
        }
    }
}

/// A randomly initialized toy ViT-LLM; blocks are named `blocks.{i}`: the ViT
/// blocks first, then the projector, then the language model.
pub fn build_model(cfg: ToyConfig, seed: u64) -> Result<SequenceModel> {
    let mut rng = Rng::new(seed);
    let mut blocks = Vec::new();
    for _ in 0..cfg.vit_blocks {
        let bc = BlockConfig::encoder(cfg.d_vit, cfg.heads, cfg.hidden);
        blocks.push(Block::Transformer(TransformerBlock::init(&mut rng, bc)?));
    }
    blocks.push(Block::Projector(Projector {
        proj: Linear::init(&mut rng, cfg.d_vit, cfg.d_lm, true),
    }));
    for _ in 0..cfg.lm_blocks {
        let bc = BlockConfig::decoder(cfg.d_lm, cfg.heads, cfg.hidden);
        blocks.push(Block::Transformer(TransformerBlock::init(&mut rng, bc)?));
    }
    SequenceModel::new(
        Some(PatchEmbedding::init(
            &mut rng,
            PATCH_DIM,
            cfg.d_vit,
            VISION_TOKENS,
        )),
        Embedding::init(&mut rng, vocab::SIZE, cfg.d_lm),
        blocks,
        Norm::new(NormKind::Rms, cfg.d_lm),
        LmHead::init(&mut rng, cfg.d_lm, vocab::SIZE),
    )
}

/// The model input of an example: patches, question tokens, and the answer
/// as the target at the question mark.
pub fn to_sample(ex: &VqaExample) -> Sample {
    let ask = VISION_TOKENS + ex.question.len() - 1;
    Sample::text(ex.question.clone())
        .with_vision(Vision::Patches(ex.patches.clone()))
        .with_targets(vec![(ask, ex.answer)])
}

/// Fraction of examples whose most likely token at the question mark is the
/// answer; see [`AnswerScores`] for the log-likelihood and the divergence from
/// a reference model.
pub fn accuracy(model: &SequenceModel, examples: &[VqaExample]) -> Result<f64> {
    Ok(AnswerScores::compute(model, examples)?.accuracy())
}

/// Training schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up over 5% of the steps, cosine decay).
    pub lr: f32,
    /// AdamW weight decay.
    pub weight_decay: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1500,
            batch: 32,
            lr: 5e-3,
            weight_decay: 0.01,
        }
    }
}

/// Trains `model` on batches drawn by `batch_of(step)`; `on_step(step, loss,
/// model)` sees the mean batch loss and the updated model (e.g. to save snapshots). Per-example gradients are computed in parallel
/// and summed in example order, so training does not depend on the thread count.
pub fn train(
    model: &mut SequenceModel,
    cfg: TrainConfig,
    batch_of: impl Fn(usize) -> Vec<VqaExample>,
    on_step: &mut dyn FnMut(usize, f32, &SequenceModel),
) -> Result<()> {
    let mut adam = Adam::new(cfg.lr).with_weight_decay(cfg.weight_decay);
    let warmup = (cfg.steps / 20).max(1);
    for step in 0..cfg.steps {
        let batch = batch_of(step);
        let per: Vec<(f32, Grads)> = batch
            .par_iter()
            .map(|ex| {
                let mut g = Grads::new();
                let loss = model.loss_and_grads(&to_sample(ex), &mut g)?;
                Ok((loss, g))
            })
            .collect::<Result<_>>()?;
        let mut grads = Grads::new();
        let mut loss = 0.0;
        for (l, g) in &per {
            loss += l;
            for (name, v) in g.iter() {
                grads.accumulate(name, v.view());
            }
        }
        let n = per.len().max(1) as f32;
        grads.scale(1.0 / n);
        let progress = step as f32 / cfg.steps as f32;
        adam.lr = if step < warmup {
            cfg.lr * (step + 1) as f32 / warmup as f32
        } else {
            cfg.lr * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
        };
        adam.step(model, &grads);
        on_step(step, loss / n, model);
    }
    Ok(())
}
