//! Writing a quantized [`LlavaModel`] as a GPTQ checkpoint in the
//! checkpoint's own LLaVA layout, and reading it back.
//!
//! Every linear that the pipeline quantized is stored packed under its
//! block's name (e.g. `language_model.model.layers.0.self_attn.q_proj.qweight`);
//! everything else (usually the whole vision tower and the projector, plus
//! embeddings, norms and biases) stays dense f32 under its original name.
//! `config.json` is the loaded one (vision and text configs included) with
//! `quantization_config` added.

use std::path::Path;

use candle_core::Tensor;
use vlmq::pipeline::PipelineOutput;
use vlmq::Result;

use crate::export::{ignore_writes, read_checkpoint, write_checkpoint, WriteTick};
use crate::models::clip::{LayerNorm, VISION_LINEAR_NAMES};
use crate::models::llava::model::LlavaModel;

impl LlavaModel {
    /// Every parameter under its name in the checkpoint's own spelling (the
    /// tied head is not repeated; encoder layers past the feature layer and
    /// the post-LayerNorm are included, unchanged).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let v = &self.naming.vision;
        let mut out = Vec::new();
        let ln = |out: &mut Vec<(String, Tensor)>, stem: String, n: &LayerNorm| {
            out.push((format!("{stem}.weight"), n.weight.clone()));
            out.push((format!("{stem}.bias"), n.bias.clone()));
        };
        let w = &self.vision;
        out.push((
            format!("{v}embeddings.patch_embedding.weight"),
            w.patch_embedding.clone(),
        ));
        out.push((
            format!("{v}embeddings.class_embedding"),
            w.class_embedding.clone(),
        ));
        out.push((
            format!("{v}embeddings.position_embedding.weight"),
            w.position_embedding.clone(),
        ));
        ln(&mut out, format!("{v}pre_layrnorm"), &w.pre_norm);
        for (i, l) in w.layers.iter().enumerate() {
            let p = format!("{v}encoder.layers.{i}.");
            ln(&mut out, format!("{p}layer_norm1"), &l.norm1);
            ln(&mut out, format!("{p}layer_norm2"), &l.norm2);
            for (n, lin) in VISION_LINEAR_NAMES.iter().zip(&l.linears) {
                out.push((format!("{p}{n}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}{n}.bias"), b.clone()));
                }
            }
        }
        ln(&mut out, format!("{v}post_layernorm"), &w.post_norm);
        let pp = &self.naming.projector;
        for (n, lin) in [
            ("linear_1", &self.projector.linear_1),
            ("linear_2", &self.projector.linear_2),
        ] {
            out.push((format!("{pp}{n}.weight"), lin.weight.clone()));
            if let Some(b) = &lin.bias {
                out.push((format!("{pp}{n}.bias"), b.clone()));
            }
        }
        for (n, t) in self.lm.weights().named_tensors() {
            let name = match n.strip_prefix("model.") {
                Some(rest) => format!("{}{rest}", self.naming.lm),
                None => self.naming.lm_head.clone(),
            };
            out.push((name, t));
        }
        out
    }
}

/// Writes `quantized` (a pipeline run on `model`) as a GPTQ checkpoint in
/// `dir`, in the model's own LLaVA layout. Linears absent from `quantized`
/// (e.g. the vision tower and projector with an LM-only selection) are
/// stored as dense f32. `tokenizer`, when given, is saved as `tokenizer.json`.
pub fn write_llava_gptq(
    model: &LlavaModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: impl AsRef<Path>,
) -> Result<()> {
    write_llava_gptq_counted(
        model,
        quantized,
        tokenizer,
        dir.as_ref(),
        &mut ignore_writes,
    )
}

/// [`write_llava_gptq`], counted by `tick`.
pub(crate) fn write_llava_gptq_counted(
    model: &LlavaModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
    tick: WriteTick<'_>,
) -> Result<()> {
    let mut cfg = model.raw_config().clone();
    cfg["torch_dtype"] = "float32".into();
    if cfg.get("dtype").is_some() {
        cfg["dtype"] = "float32".into();
    }
    let tensors = model.named_tensors();
    write_checkpoint(model, cfg, &tensors, quantized, tokenizer, dir, tick)
}

/// Reads a checkpoint written by [`write_llava_gptq`] back into `model`:
/// every packed linear (named `block_name.linear`) goes through
/// [`vlmq::PackedLinear`] (its weight is recovered by running the packed
/// kernel on the identity), so the model then computes with exactly what
/// the checkpoint stores. Returns how many linears were read.
pub fn load_llava_gptq_into(model: &mut LlavaModel, dir: impl AsRef<Path>) -> Result<usize> {
    read_checkpoint(model, dir.as_ref())
}
