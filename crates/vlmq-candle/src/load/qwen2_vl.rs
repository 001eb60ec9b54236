//! Loading a Hugging Face Qwen2-VL / Qwen2.5-VL directory: `config.json`
//! and safetensors in either spelling transformers uses:
//! - the Hub (4.x) layout that `save_pretrained` still writes:
//!   `model.embed_tokens.weight`, `model.layers.N.*`, `model.norm.weight`,
//!   `visual.*`, `lm_head.weight`;
//! - the 5.x module names: `model.language_model.*`, `model.visual.*`,
//!   `lm_head.weight`.
//!
//! `lm_head.weight` is required unless `tie_word_embeddings` is set. A
//! tensor left over after assembly is an error (a different architecture
//! or a mixed spelling).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use crate::error::in_model_file;
use crate::load::hf::{read_json, NamedTensors};
use crate::load::progress::{ignore, LoadTick};
use crate::models::clip::LayerNorm;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::{check, required, Linear, ModelWeights, TensorSource};
use crate::models::qwen2_vl::{
    Merger, Qwen2VlConfig, Qwen2VlModel, QwenVisionWeights, QwenVlVariant, VisionBlock, VisionNorm,
    QWEN2_5_VL_BLOCK_LINEARS, QWEN2_VL_BLOCK_LINEARS,
};

/// Where the two halves of a Qwen2-VL checkpoint live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QwenVlNaming {
    /// Prefix replacing the decoder's `model.` (`model.` or `model.language_model.`).
    pub lm: String,
    /// Prefix of the tower (`visual.` or `model.visual.`).
    pub visual: String,
}

impl QwenVlNaming {
    /// The Hub layout (`model.*`, `visual.*`), as `save_pretrained` writes.
    pub fn hub() -> Self {
        QwenVlNaming {
            lm: "model.".into(),
            visual: "visual.".into(),
        }
    }
}

fn detect_naming(src: &NamedTensors) -> Result<QwenVlNaming> {
    let has = |n: &str| src.tensors.contains_key(n);
    let lm = ["model.language_model.", "model."]
        .into_iter()
        .find(|p| has(&format!("{p}embed_tokens.weight")))
        .ok_or_else(|| Error::MissingTensor {
            name: "model.embed_tokens.weight (or model.language_model.embed_tokens.weight)".into(),
        })?;
    let visual = ["model.visual.", "visual."]
        .into_iter()
        .find(|p| has(&format!("{p}patch_embed.proj.weight")))
        .ok_or_else(|| Error::MissingTensor {
            name: "visual.patch_embed.proj.weight (or model.visual.patch_embed.proj.weight)".into(),
        })?;
    Ok(QwenVlNaming {
        lm: lm.into(),
        visual: visual.into(),
    })
}

/// The decoder's names mapped onto the detected spelling.
struct LmView<'a> {
    inner: &'a mut NamedTensors,
    lm: &'a str,
}

impl TensorSource for LmView<'_> {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        match name.strip_prefix("model.") {
            Some(rest) => self.inner.get(&format!("{}{rest}", self.lm), dtype),
            None => self.inner.get(name, dtype),
        }
    }
}

fn get(src: &mut NamedTensors, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let t = required(src, name, dtype)?;
    check(name, &t, shape)?;
    Ok(t)
}

fn linear(
    src: &mut NamedTensors,
    stem: &str,
    out: usize,
    inp: usize,
    dtype: DType,
) -> Result<Linear> {
    Ok(Linear {
        weight: get(src, &format!("{stem}.weight"), &[out, inp], dtype)?,
        bias: Some(get(src, &format!("{stem}.bias"), &[out], dtype)?),
    })
}

fn norm(
    src: &mut NamedTensors,
    variant: QwenVlVariant,
    stem: &str,
    d: usize,
    dtype: DType,
) -> Result<VisionNorm> {
    let weight = get(src, &format!("{stem}.weight"), &[d], dtype)?;
    Ok(match variant {
        QwenVlVariant::Qwen2Vl => VisionNorm::Layer(LayerNorm {
            weight,
            bias: get(src, &format!("{stem}.bias"), &[d], dtype)?,
        }),
        QwenVlVariant::Qwen25Vl => VisionNorm::Rms(weight),
    })
}

fn vision_weights(
    cfg: &Qwen2VlConfig,
    src: &mut NamedTensors,
    p: &str,
    dtype: DType,
) -> Result<QwenVisionWeights> {
    let v = &cfg.vision;
    let (d, f) = (v.width, v.mlp_width);
    let pe = format!("{p}patch_embed.proj.weight");
    let kernel = [
        d,
        v.in_channels,
        v.temporal_patch_size,
        v.patch_size,
        v.patch_size,
    ];
    let patch_embed = get(src, &pe, &kernel, dtype)?
        .reshape((d, v.patch_values()))
        .map_err(|e| crate::error::file(Path::new(&pe), e))?;
    let mut blocks = Vec::new();
    for i in 0..v.depth {
        let b = format!("{p}blocks.{i}.");
        let names: &[&str] = match cfg.variant {
            QwenVlVariant::Qwen2Vl => &QWEN2_VL_BLOCK_LINEARS,
            QwenVlVariant::Qwen25Vl => &QWEN2_5_VL_BLOCK_LINEARS,
        };
        let mut linears = Vec::with_capacity(names.len());
        for n in names {
            let (o, inp) = match *n {
                "attn.qkv" => (3 * d, d),
                "attn.proj" => (d, d),
                "mlp.fc1" | "mlp.gate_proj" | "mlp.up_proj" => (f, d),
                _ => (d, f),
            };
            linears.push(linear(src, &format!("{b}{n}"), o, inp, dtype)?);
        }
        blocks.push(VisionBlock {
            norm1: norm(src, cfg.variant, &format!("{b}norm1"), d, dtype)?,
            norm2: norm(src, cfg.variant, &format!("{b}norm2"), d, dtype)?,
            linears,
        });
    }
    let m = format!("{p}merger.");
    let wide = d * v.merge_unit();
    let merger = Merger {
        ln_q: norm(src, cfg.variant, &format!("{m}ln_q"), d, dtype)?,
        linears: [
            linear(src, &format!("{m}mlp.0"), wide, wide, dtype)?,
            linear(src, &format!("{m}mlp.2"), v.out_width, wide, dtype)?,
        ],
    };
    Ok(QwenVisionWeights {
        patch_embed,
        blocks,
        merger,
    })
}

/// Loads a Qwen2-VL or Qwen2.5-VL model from an HF directory, computing in
/// `dtype`; also returns the spelling found (the exporter keeps it).
pub fn load_qwen2_vl_dir(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<(Qwen2VlModel, QwenVlNaming)> {
    let dir = dir.as_ref();
    // Tensor errors name the directory.
    read_qwen2_vl_dir(dir, dtype, device, &mut ignore).map_err(in_model_file(dir))
}

/// [`load_qwen2_vl_dir`], the bytes read reported to `tick`.
pub(crate) fn load_qwen2_vl_dir_counted(
    dir: &Path,
    dtype: DType,
    device: &Device,
    tick: LoadTick<'_>,
) -> Result<(Qwen2VlModel, QwenVlNaming)> {
    read_qwen2_vl_dir(dir, dtype, device, tick).map_err(in_model_file(dir))
}

fn read_qwen2_vl_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    tick: LoadTick<'_>,
) -> Result<(Qwen2VlModel, QwenVlNaming)> {
    let cfg_path = dir.join("config.json");
    let cfg = Qwen2VlConfig::from_hf_json(&read_json(&cfg_path)?, &cfg_path)?;
    let mut src = NamedTensors::read_dir(dir, device, tick)?;
    let naming = detect_naming(&src)?;
    let visual = vision_weights(&cfg, &mut src, &naming.visual, dtype)?;
    let weights = ModelWeights::assemble(
        &cfg.text,
        &mut LmView {
            inner: &mut src,
            lm: &naming.lm,
        },
        dtype,
    )?;
    if cfg.text.tie_embeddings {
        // Some checkpoints store the tied head anyway; it must equal the embedding's role.
        src.tensors.remove("lm_head.weight");
    }
    let mut left: Vec<&String> = src.tensors.keys().collect();
    if !left.is_empty() {
        left.sort();
        return Err(Error::CorruptCheckpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "{} tensors not part of a {} in the spelling {naming:?}, e.g. {:?}",
                left.len(),
                cfg.variant.hf_class(),
                &left[..left.len().min(4)]
            ),
        });
    }
    let lm = LlamaModel::new(cfg.text.clone(), weights)?;
    let model = Qwen2VlModel::new(cfg, visual, lm)?.with_naming(naming.clone());
    Ok((model, naming))
}
