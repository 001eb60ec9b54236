//! Writing a quantized [`SmolVlmModel`] as a GPTQ checkpoint in the
//! checkpoint's own SmolVLM layout (`model.vision_model.*`,
//! `model.connector.*`, `model.text_model.*`), and reading it back.
//!
//! - Every linear that the pipeline quantized is stored packed under its
//!   block's name (e.g. `model.text_model.layers.0.self_attn.q_proj.qweight`,
//!   with `qzeros`, `scales`, `g_idx` and its bias);
//! - everything else (usually the whole vision tower and the connector,
//!   plus embeddings, norms and biases) keeps its name and is stored in the
//!   source dtype (`torch_dtype` / `dtype` of `config.json`, f32 when
//!   absent), so a dense tensor's bytes are the source's;
//! - `config.json` is the loaded one, unchanged but for
//!   `quantization_config`, which lists what stays dense as Qwen2-VL's
//!   export does: `block_name_to_quantize` (`model.text_model.layers` for
//!   the LM only), `modules_in_block_to_quantize`, and GPTQModel `dynamic`
//!   negative rules (`-:^model\.vision_model\.` and
//!   `-:^model\.connector\.` when those parts stay dense as a whole, else
//!   one rule per dense linear).

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};
use vlmq::pipeline::PipelineOutput;
use vlmq::Result;

use crate::export::dense_parts::{quantization_extras, source_dtype, DensePart};
use crate::export::{
    ignore_writes, read_checkpoint, write_checkpoint_styled, DenseStyle, WriteTick,
};
use crate::models::clip::{LayerNorm, VISION_LINEAR_NAMES};
use crate::models::smolvlm::SmolVlmModel;

impl SmolVlmModel {
    /// Every parameter under its name in the checkpoint's own spelling (the
    /// tied head is not repeated).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let v = &self.naming.vision;
        let mut out = Vec::new();
        let ln = |out: &mut Vec<(String, Tensor)>, stem: String, n: &LayerNorm| {
            out.push((format!("{stem}.weight"), n.weight.clone()));
            out.push((format!("{stem}.bias"), n.bias.clone()));
        };
        let w = &self.vision;
        let e = format!("{v}embeddings.");
        out.push((
            format!("{e}patch_embedding.weight"),
            w.patch_embedding.clone(),
        ));
        out.push((format!("{e}patch_embedding.bias"), w.patch_bias.clone()));
        out.push((
            format!("{e}position_embedding.weight"),
            w.position_embedding.clone(),
        ));
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
        out.push((
            format!("{}modality_projection.proj.weight", self.naming.connector),
            self.connector.proj.weight.clone(),
        ));
        for (n, t) in self.lm.weights().named_tensors() {
            let name = match n.strip_prefix("model.") {
                Some(rest) => format!("{}{rest}", self.naming.lm),
                None => self.naming.lm_head.clone(),
            };
            out.push((name, t));
        }
        out
    }

    /// The dtype the checkpoint was stored in: `config.json`'s `torch_dtype`
    /// or `dtype` (top level, else `text_config`), f32 when absent.
    pub fn source_dtype(&self) -> DType {
        source_dtype(&self.raw_config)
    }

    /// The `quantization_config` keys that tell loaders which modules are
    /// packed and which stay dense (see the module doc).
    pub fn quantization_extras(&self, quantized: &PipelineOutput) -> Map<String, Value> {
        let nv = self.cfg.vision.num_layers;
        let parts = [
            DensePart {
                prefix: &self.naming.vision,
                blocks: 0..nv,
            },
            DensePart {
                prefix: &self.naming.connector,
                blocks: nv..nv + 1,
            },
        ];
        quantization_extras(self, quantized, &parts)
    }
}

/// Writes `quantized` (a pipeline run on `model`) as a GPTQ checkpoint in
/// `dir`, in the model's own SmolVLM layout (see the module doc). Linears
/// absent from `quantized` (e.g. the vision tower and connector with an
/// LM-only selection) stay dense in the source dtype. `tokenizer`, when
/// given, is saved as `tokenizer.json`.
pub fn write_smolvlm_gptq(
    model: &SmolVlmModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: impl AsRef<Path>,
) -> Result<()> {
    write_smolvlm_gptq_counted(
        model,
        quantized,
        tokenizer,
        dir.as_ref(),
        &mut ignore_writes,
    )
}

/// [`write_smolvlm_gptq`], counted by `tick`.
pub(crate) fn write_smolvlm_gptq_counted(
    model: &SmolVlmModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
    tick: WriteTick<'_>,
) -> Result<()> {
    let style = DenseStyle {
        dtype: model.source_dtype(),
        extras: model.quantization_extras(quantized),
    };
    let tensors = model.named_tensors();
    write_checkpoint_styled(
        model,
        model.raw_config().clone(),
        &tensors,
        quantized,
        tokenizer,
        dir,
        &style,
        tick,
    )
}

/// Reads a checkpoint written by [`write_smolvlm_gptq`] back into `model`:
/// every packed linear goes through [`vlmq::PackedLinear`], so the model
/// then computes with exactly what the checkpoint stores. Returns how many
/// linears were read.
pub fn load_smolvlm_gptq_into(model: &mut SmolVlmModel, dir: impl AsRef<Path>) -> Result<usize> {
    read_checkpoint(model, dir.as_ref())
}
