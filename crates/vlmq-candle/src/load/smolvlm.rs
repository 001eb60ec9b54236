//! Loading a Hugging Face SmolVLM / Idefics3 directory: `config.json`
//! (`vision_config`, `text_config`, `scale_factor`, `image_token_id`) and
//! safetensors named `model.vision_model.*`, `model.connector.*`,
//! `model.text_model.*` and, when the head is untied, `lm_head.weight`
//! (the Hub layout, also transformers 5's module names). The same names
//! without the leading `model.` are accepted too.
//!
//! A tensor left over after assembly (other than a `position_ids` buffer)
//! is an error: it means a different architecture or a mixed spelling.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use crate::error::in_model_file;
use crate::load::hf::{read_json, NamedTensors};
use crate::load::llava::{get_checked, layer_norm, linear};
use crate::load::progress::{ignore, LoadTick};
use crate::models::clip::{ClipLayerWeights, VISION_LINEAR_NAMES};
use crate::models::idefics3::Connector;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::{ModelWeights, TensorSource};
use crate::models::siglip::SiglipWeights;
use crate::models::smolvlm::{SmolVlmConfig, SmolVlmModel, SmolVlmNaming};

/// The decoder's names (`model.*`, `lm_head.weight`) mapped onto the spelling.
struct LmView<'a> {
    inner: &'a mut NamedTensors,
    naming: &'a SmolVlmNaming,
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

fn detect_naming(src: &NamedTensors) -> Result<SmolVlmNaming> {
    let root = ["model.", ""]
        .into_iter()
        .find(|p| {
            src.tensors
                .contains_key(&format!("{p}text_model.embed_tokens.weight"))
        })
        .ok_or_else(|| Error::MissingTensor {
            name: "model.text_model.embed_tokens.weight".into(),
        })?;
    Ok(SmolVlmNaming {
        vision: format!("{root}vision_model."),
        connector: format!("{root}connector."),
        lm: format!("{root}text_model."),
        lm_head: "lm_head.weight".into(),
    })
}

fn vision_weights(
    cfg: &SmolVlmConfig,
    src: &mut NamedTensors,
    p: &str,
    dtype: DType,
) -> Result<SiglipWeights> {
    let v = &cfg.vision;
    let (d, f) = (v.hidden_size, v.intermediate_size);
    let e = format!("{p}embeddings.");
    let patch_embedding = get_checked(
        src,
        &format!("{e}patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
        dtype,
    )?;
    let patch_bias = get_checked(src, &format!("{e}patch_embedding.bias"), &[d], dtype)?;
    let position_embedding = get_checked(
        src,
        &format!("{e}position_embedding.weight"),
        &[v.num_patches(), d],
        dtype,
    )?;
    let mut layers = Vec::new();
    for i in 0..v.num_layers {
        let l = format!("{p}encoder.layers.{i}.");
        let mut lins = Vec::with_capacity(VISION_LINEAR_NAMES.len());
        for n in VISION_LINEAR_NAMES {
            let (o, inp) = match n {
                "mlp.fc1" => (f, d),
                "mlp.fc2" => (d, f),
                _ => (d, d),
            };
            lins.push(linear(src, &format!("{l}{n}"), o, inp, true, dtype)?);
        }
        let linears: [_; 6] = lins.try_into().map_err(|_| Error::MissingTensor {
            name: format!("{l}: six linears"),
        })?;
        layers.push(ClipLayerWeights {
            norm1: layer_norm(src, &format!("{l}layer_norm1"), d, dtype)?,
            norm2: layer_norm(src, &format!("{l}layer_norm2"), d, dtype)?,
            linears,
        });
    }
    let post_norm = layer_norm(src, &format!("{p}post_layernorm"), d, dtype)?;
    Ok(SiglipWeights {
        patch_embedding,
        patch_bias,
        position_embedding,
        layers,
        post_norm,
    })
}

/// Loads a SmolVLM model from an HF directory, computing in `dtype`.
pub fn load_smolvlm_dir(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<SmolVlmModel> {
    let dir = dir.as_ref();
    // Tensor errors name the directory.
    read_smolvlm_dir(dir, dtype, device, &mut ignore).map_err(in_model_file(dir))
}

/// [`load_smolvlm_dir`], the bytes read reported to `tick`.
pub(crate) fn load_smolvlm_dir_counted(
    dir: &Path,
    dtype: DType,
    device: &Device,
    tick: LoadTick<'_>,
) -> Result<SmolVlmModel> {
    read_smolvlm_dir(dir, dtype, device, tick).map_err(in_model_file(dir))
}

fn read_smolvlm_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    tick: LoadTick<'_>,
) -> Result<SmolVlmModel> {
    let cfg_path = dir.join("config.json");
    let raw = read_json(&cfg_path)?;
    let cfg = SmolVlmConfig::from_hf_json(&raw, &cfg_path)?;
    let mut src = NamedTensors::read_dir(dir, device, tick)?;
    let naming = detect_naming(&src)?;
    let vision = vision_weights(&cfg, &mut src, &naming.vision, dtype)?;
    let connector = Connector {
        proj: linear(
            &mut src,
            &format!("{}modality_projection.proj", naming.connector),
            cfg.text.hidden_size,
            cfg.connector_in(),
            false,
            dtype,
        )?,
    };
    let weights = ModelWeights::assemble(
        &cfg.text,
        &mut LmView {
            inner: &mut src,
            naming: &naming,
        },
        dtype,
    )?;
    if cfg.text.tie_embeddings {
        // Some checkpoints store the tied head anyway.
        src.tensors.remove(&naming.lm_head);
    }
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
                "{} tensors not part of a SmolVLM model in the spelling {naming:?}, e.g. {:?}",
                left.len(),
                &left[..left.len().min(4)]
            ),
        });
    }
    let lm = LlamaModel::new(cfg.text.clone(), weights)?;
    SmolVlmModel::new(cfg, vision, connector, lm, naming, raw)
}
