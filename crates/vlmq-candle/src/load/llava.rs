//! Loading a Hugging Face LLaVA directory (`config.json` with
//! `vision_config` / `text_config`, safetensors, `tokenizer.json`).
//!
//! transformers has spelled the tensors three ways; all are accepted and the
//! spelling found is kept in [`LlavaNaming`] (block names and the exporter use it):
//! - 4.x (llava-hf Hub checkpoints): `language_model.model.*`,
//!   `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
//!   `multi_modal_projector.*`;
//! - 5.x `save_pretrained`: the same but `vision_tower.*` without `vision_model.`;
//! - 5.x module names: `model.language_model.*`, `model.vision_tower.*`
//!   (with or without `vision_model.`), `model.multi_modal_projector.*`, `lm_head.weight`.
//!
//! A tensor left over after assembly (other than a `position_ids` buffer)
//! is an error: it means a different architecture or a mixed spelling.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use crate::error::in_model_file;
use crate::load::hf::{read_json, NamedTensors};
use crate::load::progress::{ignore, LoadTick};
use crate::models::clip::{ClipLayerWeights, LayerNorm, VisionWeights, VISION_LINEAR_NAMES};
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::{check, required, Linear, ModelWeights, TensorSource};
use crate::models::llava::model::{LlavaConfig, LlavaModel, LlavaNaming, Projector};

/// The decoder's names (`model.*`, `lm_head.weight`) mapped onto a LLaVA spelling.
struct LmView<'a> {
    inner: &'a mut NamedTensors,
    naming: &'a LlavaNaming,
}

impl TensorSource for LmView<'_> {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let mapped = match name.strip_prefix("model.") {
            Some(rest) => format!("{}{rest}", self.naming.lm),
            None if name == "lm_head.weight" => self.naming.lm_head.clone(),
            None => name.to_string(),
        };
        self.inner.get(&mapped, dtype)
    }
}

fn pick(src: &NamedTensors, candidates: &[&str], probe: &str) -> Option<String> {
    candidates
        .iter()
        .find(|p| src.tensors.contains_key(&format!("{p}{probe}")))
        .map(|p| p.to_string())
}

/// Finds which spelling the checkpoint uses.
fn detect_naming(src: &NamedTensors) -> Result<LlavaNaming> {
    let missing = |what: &str| Error::MissingTensor {
        name: format!("{what} (no known LLaVA spelling matched)"),
    };
    let vision = pick(
        src,
        &[
            "vision_tower.vision_model.",
            "vision_tower.",
            "model.vision_tower.vision_model.",
            "model.vision_tower.",
        ],
        "embeddings.patch_embedding.weight",
    )
    .ok_or_else(|| missing("vision_tower...embeddings.patch_embedding.weight"))?;
    let lm = pick(
        src,
        &["language_model.model.", "model.language_model."],
        "embed_tokens.weight",
    )
    .ok_or_else(|| missing("language_model...embed_tokens.weight"))?;
    let projector = pick(
        src,
        &["multi_modal_projector.", "model.multi_modal_projector."],
        "linear_1.weight",
    )
    .ok_or_else(|| missing("multi_modal_projector.linear_1.weight"))?;
    let lm_head = ["language_model.lm_head.weight", "lm_head.weight"]
        .into_iter()
        .find(|n| src.tensors.contains_key(*n))
        .unwrap_or(if lm.starts_with("model.") {
            "lm_head.weight"
        } else {
            "language_model.lm_head.weight"
        })
        .to_string();
    Ok(LlavaNaming {
        vision,
        projector,
        lm,
        lm_head,
    })
}

pub(crate) fn get_checked(
    src: &mut NamedTensors,
    name: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let t = required(src, name, dtype)?;
    check(name, &t, shape)?;
    Ok(t)
}

pub(crate) fn layer_norm(
    src: &mut NamedTensors,
    stem: &str,
    d: usize,
    dtype: DType,
) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: get_checked(src, &format!("{stem}.weight"), &[d], dtype)?,
        bias: get_checked(src, &format!("{stem}.bias"), &[d], dtype)?,
    })
}

pub(crate) fn linear(
    src: &mut NamedTensors,
    stem: &str,
    out: usize,
    inp: usize,
    bias: bool,
    dtype: DType,
) -> Result<Linear> {
    Ok(Linear {
        weight: get_checked(src, &format!("{stem}.weight"), &[out, inp], dtype)?,
        bias: if bias {
            Some(get_checked(src, &format!("{stem}.bias"), &[out], dtype)?)
        } else {
            None
        },
    })
}

fn vision_weights(
    cfg: &LlavaConfig,
    src: &mut NamedTensors,
    p: &str,
    dtype: DType,
) -> Result<VisionWeights> {
    let v = &cfg.vision;
    let (d, f) = (v.hidden_size, v.intermediate_size);
    let e = format!("{p}embeddings.");
    let patch_embedding = get_checked(
        src,
        &format!("{e}patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
        dtype,
    )?;
    let class_embedding = get_checked(src, &format!("{e}class_embedding"), &[d], dtype)?;
    let position_embedding = get_checked(
        src,
        &format!("{e}position_embedding.weight"),
        &[v.num_patches() + 1, d],
        dtype,
    )?;
    let pre_norm = layer_norm(src, &format!("{p}pre_layrnorm"), d, dtype)?;
    let mut layers = Vec::new();
    for i in 0..v.num_layers {
        let l = format!("{p}encoder.layers.{i}.");
        let mut lins = Vec::with_capacity(6);
        for n in VISION_LINEAR_NAMES {
            let (o, inp) = match n {
                "mlp.fc1" => (f, d),
                "mlp.fc2" => (d, f),
                _ => (d, d),
            };
            lins.push(linear(src, &format!("{l}{n}"), o, inp, true, dtype)?);
        }
        layers.push(ClipLayerWeights {
            norm1: layer_norm(src, &format!("{l}layer_norm1"), d, dtype)?,
            norm2: layer_norm(src, &format!("{l}layer_norm2"), d, dtype)?,
            linears: lins.try_into().expect("six linears"),
        });
    }
    let post_norm = layer_norm(src, &format!("{p}post_layernorm"), d, dtype)?;
    Ok(VisionWeights {
        patch_embedding,
        class_embedding,
        position_embedding,
        pre_norm,
        layers,
        post_norm,
    })
}

/// Loads a LLaVA model from an HF directory, computing in `dtype`.
pub fn load_llava_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<LlavaModel> {
    let dir = dir.as_ref();
    // Tensor errors name the directory.
    read_llava_dir(dir, dtype, device, &mut ignore).map_err(in_model_file(dir))
}

/// [`load_llava_dir`], the bytes read reported to `tick`.
pub(crate) fn load_llava_dir_counted(
    dir: &Path,
    dtype: DType,
    device: &Device,
    tick: LoadTick<'_>,
) -> Result<LlavaModel> {
    read_llava_dir(dir, dtype, device, tick).map_err(in_model_file(dir))
}

fn read_llava_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    tick: LoadTick<'_>,
) -> Result<LlavaModel> {
    let cfg_path = dir.join("config.json");
    let raw = read_json(&cfg_path)?;
    let cfg = LlavaConfig::from_hf_json(&raw, &cfg_path)?;
    let text = raw.get("text_config").ok_or_else(|| Error::Json {
        path: cfg_path.clone(),
        reason: "no text_config object".into(),
    })?;
    let mut text_cfg = LlamaConfig::from_hf_json(text, &cfg_path)?;
    if let Some(tie) = raw
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
    {
        text_cfg.tie_embeddings = tie;
    }
    let mut src = NamedTensors::read_dir(dir, device, tick)?;
    let naming = detect_naming(&src)?;
    let vision = vision_weights(&cfg, &mut src, &naming.vision, dtype)?;
    let (dv, dt) = (cfg.vision.hidden_size, text_cfg.hidden_size);
    let pp = &naming.projector;
    let projector = Projector {
        linear_1: linear(
            &mut src,
            &format!("{pp}linear_1"),
            dt,
            dv,
            cfg.projector_bias,
            dtype,
        )?,
        linear_2: linear(
            &mut src,
            &format!("{pp}linear_2"),
            dt,
            dt,
            cfg.projector_bias,
            dtype,
        )?,
    };
    let weights = ModelWeights::assemble(
        &text_cfg,
        &mut LmView {
            inner: &mut src,
            naming: &naming,
        },
        dtype,
    )?;
    let mut left: Vec<&String> = src
        .tensors
        .keys()
        .filter(|k| !k.ends_with("position_ids"))
        .collect();
    if !left.is_empty() {
        left.sort();
        return Err(Error::CorruptCheckpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "{} tensors not part of a LLaVA model in the detected spelling {naming:?}, e.g. {:?}",
                left.len(),
                &left[..left.len().min(4)]
            ),
        });
    }
    let lm = LlamaModel::new(text_cfg, weights)?;
    LlavaModel::new(cfg, vision, projector, lm, naming, raw)
}
