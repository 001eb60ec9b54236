//! The toy ViT-LLM: a ViT encoder over the image patches, a projector, and a
//! small causal language model over `[vision tokens; question tokens]` whose
//! prediction at the question mark is the answer.

use std::path::Path;

use rayon::prelude::*;
use safetensors::SafeTensors;

use super::scores::AnswerScores;
use super::task::{vocab, VqaExample, PATCH_DIM, VISION_TOKENS};
use vlmq::error::{Error, Result};
use vlmq_nn::{
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

/// The sizes of the committed main model (`assets/toy_vit_llm.safetensors`):
/// width 32, two ViT and two language-model blocks. Narrow enough that 2-bit
/// weights hurt it (docs/RESULTS.md); the wider model kept for comparison,
/// `assets/toy_vit_llm_wide.safetensors`, is [`ToyConfig::wide`].
impl Default for ToyConfig {
    fn default() -> Self {
        ToyConfig::with_width(32, 2, 2)
    }
}

impl ToyConfig {
    /// The sizes of the wider comparison model
    /// (`assets/toy_vit_llm_wide.safetensors`): width 64, MLP 128, 4 heads.
    pub fn wide() -> ToyConfig {
        ToyConfig::with_width(64, 2, 2)
    }

    /// The toy's sizing rule: both stages `width` wide, `width / HEAD_DIM`
    /// heads, MLP hidden `2 width`.
    pub fn with_width(width: usize, vit_blocks: usize, lm_blocks: usize) -> ToyConfig {
        ToyConfig {
            d_vit: width,
            d_lm: width,
            vit_blocks,
            lm_blocks,
            heads: width / Self::HEAD_DIM,
            hidden: 2 * width,
        }
    }

    /// Head width of every attention head: the toy uses `width / 16` heads.
    pub const HEAD_DIM: usize = 16;

    /// Reads the sizes of a toy model saved by [`vlmq_nn::save_safetensors`]
    /// from the tensor names and shapes of the file's header, so models of
    /// other sizes load without flags. Heads follow [`Self::HEAD_DIM`]. A
    /// [`Error::Safetensors`] when the file is not a toy ViT-LLM.
    ///
    /// ```
    /// use vlmq_toy::ToyConfig;
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/toy_vit_llm.safetensors");
    /// let cfg = ToyConfig::from_safetensors(path)?;
    /// assert_eq!(cfg, ToyConfig::default());
    /// # Ok::<(), vlmq::Error>(())
    /// ```
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<ToyConfig> {
        let path = path.as_ref();
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let shape = |name: &str| {
            st.tensor(name)
                .map(|t| t.shape().to_vec())
                .map_err(|_| bad(format!("not a toy ViT-LLM: no tensor {name}")))
        };
        let projector = (0..st.len())
            .find(|i| st.tensor(&format!("blocks.{i}.proj.weight")).is_ok())
            .ok_or_else(|| bad("not a toy ViT-LLM: no projector block".into()))?;
        let lm_blocks = (projector + 1..)
            .take_while(|i| st.tensor(&format!("blocks.{i}.attn.q.weight")).is_ok())
            .count();
        let d_vit = shape("patch_embed.proj.weight")?[0];
        let d_lm = shape("embed.weight")?[1];
        let hidden = shape("blocks.0.mlp.up.weight")?[0];
        if d_lm % Self::HEAD_DIM != 0 {
            return Err(bad(format!(
                "width {d_lm} is not a multiple of the head width {}",
                Self::HEAD_DIM
            )));
        }
        Ok(ToyConfig {
            d_vit,
            d_lm,
            vit_blocks: projector,
            lm_blocks,
            heads: d_lm / Self::HEAD_DIM,
            hidden,
        })
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

/// Loads a toy model saved by [`vlmq_nn::save_safetensors`], with its sizes
/// read from the file by [`ToyConfig::from_safetensors`].
pub fn load_toy_model(path: impl AsRef<Path>) -> Result<SequenceModel> {
    let path = path.as_ref();
    let mut model = build_model(ToyConfig::from_safetensors(path)?, 0)?;
    vlmq_nn::load_safetensors(&mut model, path)?;
    Ok(model)
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

#[cfg(test)]
mod tests {
    use super::*;
    use vlmq::backend::QuantizableModel;
    use vlmq_nn::{save_safetensors, StoreDtype};

    fn temp_file(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vlmq-toy-{tag}-{}.safetensors", std::process::id()))
    }

    #[test]
    fn sizes_are_read_back_from_a_saved_model() {
        let cfg = ToyConfig {
            d_vit: 48,
            d_lm: 32,
            vit_blocks: 1,
            lm_blocks: 3,
            heads: 2,
            hidden: 80,
        };
        let path = temp_file("sizes");
        save_safetensors(&build_model(cfg, 3).unwrap(), &path, StoreDtype::F32).unwrap();
        let read = ToyConfig::from_safetensors(&path);
        let loaded = load_toy_model(&path).map(|m| m.num_blocks());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read.unwrap(), cfg);
        assert_eq!(loaded.unwrap(), 1 + 1 + 3);
    }

    #[test]
    fn a_file_without_a_projector_is_a_typed_error() {
        let path = temp_file("noproj");
        let linear = Linear::init(&mut Rng::new(1), 4, 4, false);
        save_safetensors(&linear, &path, StoreDtype::F32).unwrap();
        let read = ToyConfig::from_safetensors(&path);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(read, Err(Error::Safetensors { .. })));
    }
}
