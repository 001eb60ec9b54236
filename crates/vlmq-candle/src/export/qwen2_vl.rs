//! Writing a quantized [`Qwen2VlModel`] as a GPTQ checkpoint in the
//! checkpoint's own layout, and reading it back.
//!
//! - Tensor names are the loaded checkpoint's spelling
//!   ([`Qwen2VlModel::naming`]: the Hub's `model.*` / `visual.*` or 5.x's
//!   `model.language_model.*` / `model.visual.*`); the patch embedding goes
//!   back to its Conv3d shape.
//! - Every linear the pipeline quantized is stored packed (`qweight`,
//!   `qzeros`, `scales`, `g_idx`, its bias); everything else keeps its name
//!   and is stored in the source dtype (`torch_dtype` / `dtype` of
//!   `config.json`, f32 when absent).
//! - `config.json` is the loaded one with `quantization_config`, which
//!   carries, besides the GPTQ settings, what the loaders need to leave the
//!   dense modules alone: `block_name_to_quantize` and
//!   `modules_in_block_to_quantize` (read by transformers' GPTQ
//!   integration: only those linears of those blocks are converted) and
//!   `dynamic` with one negative rule (`-:` + a regex on the module name)
//!   per dense part, GPTQModel's way of skipping modules: the whole tower
//!   (`-:^visual\.`) when none of it was quantized, else each dense linear.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};
use vlmq::pipeline::PipelineOutput;
use vlmq::Result;

use crate::error::file;
use crate::export::dense_parts::{quantization_extras, source_dtype, DensePart};
use crate::export::{
    ignore_writes, read_checkpoint, write_checkpoint_styled, DenseStyle, WriteTick,
};
use crate::models::llama::weights::Linear;
use crate::models::qwen2_vl::{Qwen2VlModel, VisionNorm, MERGER_LINEARS};

fn push_linear(out: &mut Vec<(String, Tensor)>, stem: String, l: &Linear) {
    if let Some(b) = &l.bias {
        out.push((format!("{stem}.bias"), b.clone()));
    }
    out.push((format!("{stem}.weight"), l.weight.clone()));
}

fn push_norm(out: &mut Vec<(String, Tensor)>, stem: String, n: &VisionNorm) {
    match n {
        VisionNorm::Layer(ln) => {
            out.push((format!("{stem}.weight"), ln.weight.clone()));
            out.push((format!("{stem}.bias"), ln.bias.clone()));
        }
        VisionNorm::Rms(w) => out.push((format!("{stem}.weight"), w.clone())),
    }
}

impl Qwen2VlModel {
    /// Every parameter under its name in the checkpoint's own spelling
    /// (the tied head is not repeated); the patch embedding in its Conv3d
    /// shape `[d, channels, frames, patch, patch]`.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let (v, p) = (&self.cfg.vision, &self.naming.visual);
        let kernel = (
            v.width,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        );
        let name = format!("{p}patch_embed.proj.weight");
        let conv = self
            .visual
            .patch_embed
            .reshape(kernel)
            .map_err(|e| file(Path::new(&name), e))?;
        let mut out = vec![(name, conv)];
        for (i, b) in self.visual.blocks.iter().enumerate() {
            let s = format!("{p}blocks.{i}.");
            push_norm(&mut out, format!("{s}norm1"), &b.norm1);
            push_norm(&mut out, format!("{s}norm2"), &b.norm2);
            for (n, l) in b.linear_names().iter().zip(&b.linears) {
                push_linear(&mut out, format!("{s}{n}"), l);
            }
        }
        let m = &self.visual.merger;
        push_norm(&mut out, format!("{p}merger.ln_q"), &m.ln_q);
        for (n, l) in MERGER_LINEARS.iter().zip(&m.linears) {
            push_linear(&mut out, format!("{p}merger.{n}"), l);
        }
        for (n, t) in self.lm.weights().named_tensors() {
            let name = match n.strip_prefix("model.") {
                Some(rest) => format!("{}{rest}", self.naming.lm),
                None => n,
            };
            out.push((name, t));
        }
        Ok(out)
    }

    /// The dtype the checkpoint was stored in: `config.json`'s `torch_dtype`
    /// or `dtype` (top level, else `text_config`), f32 when absent.
    pub fn source_dtype(&self) -> DType {
        source_dtype(&self.cfg.raw)
    }

    /// The `quantization_config` keys that tell loaders which modules are
    /// packed and which stay dense (see the module doc).
    pub fn quantization_extras(&self, quantized: &PipelineOutput) -> Map<String, Value> {
        let tower = DensePart {
            prefix: &self.naming.visual,
            blocks: 0..self.cfg.vision.depth + 1,
        };
        quantization_extras(self, quantized, &[tower])
    }
}

/// Writes `quantized` (a pipeline run on `model`) as a GPTQ checkpoint in
/// `dir`, in the model's own layout (see the module doc). `tokenizer`, when
/// given, is saved as `tokenizer.json`.
pub fn write_qwen2_vl_gptq(
    model: &Qwen2VlModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: impl AsRef<Path>,
) -> Result<()> {
    write_qwen2_vl_gptq_counted(
        model,
        quantized,
        tokenizer,
        dir.as_ref(),
        &mut ignore_writes,
    )
}

/// [`write_qwen2_vl_gptq`], counted by `tick`.
pub(crate) fn write_qwen2_vl_gptq_counted(
    model: &Qwen2VlModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
    tick: WriteTick<'_>,
) -> Result<()> {
    let style = DenseStyle {
        dtype: model.source_dtype(),
        extras: model.quantization_extras(quantized),
    };
    let tensors = model.named_tensors()?;
    let cfg = model.cfg.raw.clone();
    write_checkpoint_styled(
        model, cfg, &tensors, quantized, tokenizer, dir, &style, tick,
    )
}

/// Reads a checkpoint written by [`write_qwen2_vl_gptq`] back into `model`:
/// every packed linear goes through [`vlmq::PackedLinear`] (its weight is
/// recovered by running the packed kernel on the identity), so the model
/// then computes with exactly what the checkpoint stores. Returns how many
/// linears were read.
pub fn load_qwen2_vl_gptq_into(model: &mut Qwen2VlModel, dir: impl AsRef<Path>) -> Result<usize> {
    read_checkpoint(model, dir.as_ref())
}
