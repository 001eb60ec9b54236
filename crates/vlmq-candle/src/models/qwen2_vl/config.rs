//! Configuration of a Qwen2-VL / Qwen2.5-VL checkpoint: the vision tower,
//! the multimodal RoPE sections and the special tokens, read from
//! `config.json` in both the transformers 4.x layout (text fields at the top
//! level, `rope_scaling.mrope_section`) and the 5.x one (`text_config`,
//! `rope_parameters.mrope_section`).

use std::path::Path;

use serde_json::{Map, Value};
use vlmq::{Error, Result};

use crate::models::llama::config::LlamaConfig;
use crate::models::sizes::addressable;

/// Which of the two families a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QwenVlVariant {
    /// `Qwen2VLForConditionalGeneration`: LayerNorm, quick-GELU MLP, full attention per image.
    Qwen2Vl,
    /// `Qwen2_5_VLForConditionalGeneration`: RMSNorm, SwiGLU MLP with biases,
    /// windowed attention outside `fullatt_block_indexes`.
    Qwen25Vl,
}

impl QwenVlVariant {
    /// The HF class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            QwenVlVariant::Qwen2Vl => "Qwen2VLForConditionalGeneration",
            QwenVlVariant::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
        }
    }
}

/// The vision tower's sizes (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVisionConfig {
    /// Width of the tower (`embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL).
    pub width: usize,
    /// Hidden width of the block MLP.
    pub mlp_width: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Output width of the merger (the language model's width).
    pub out_width: usize,
    /// Square patch side in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one token.
    pub spatial_merge_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Vision rotary base.
    pub rope_theta: f64,
    /// Attention window side in pixels (Qwen2.5-VL; 0 = no windows).
    pub window_size: usize,
    /// Blocks that attend over whole images (Qwen2.5-VL; every block in Qwen2-VL).
    pub full_attention_blocks: Vec<usize>,
}

impl QwenVisionConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.width / self.num_heads
    }

    /// Values in one flattened patch: channels x frames x patch x patch.
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one output token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Whether block `i` attends within windows (else within whole images).
    pub fn windowed(&self, i: usize) -> bool {
        self.window_size > 0 && !self.full_attention_blocks.contains(&i)
    }
}

/// Everything a Qwen2-VL-family model needs besides its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    /// Which family.
    pub variant: QwenVlVariant,
    /// The Qwen2 language model.
    pub text: LlamaConfig,
    /// How the rotary half-dimensions split into temporal, height and width
    /// sections (sums to `head_dim / 2`).
    pub mrope_section: [usize; 3],
    /// The vision tower.
    pub vision: QwenVisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|video_pad|>` (videos are not supported; kept for the checkpoint).
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// The parsed `config.json`, written back (with additions) on export.
    pub raw: Value,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn int(v: &Value, key: &str, what: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            bad(
                path,
                format!("{what}: missing or non-integer field {key:?}"),
            )
        })
}

fn token(v: &Value, key: &str, path: &Path) -> Result<u32> {
    let id = int(v, key, "config", path)?;
    u32::try_from(id).map_err(|_| bad(path, format!("{key} {id} does not fit a token id")))
}

/// The `mrope_section` of a text config in either layout.
fn mrope_section(text: &Value, path: &Path) -> Result<[usize; 3]> {
    let s = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| text.get(*k).and_then(|r| r.get("mrope_section")))
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "text config: no rope mrope_section list"))?;
    let v: Vec<usize> = s
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad(path, "mrope_section must hold integers"))?;
    v.try_into().map_err(|v: Vec<usize>| {
        bad(
            path,
            format!("mrope_section has {} entries, not 3", v.len()),
        )
    })
}

/// The text config as the plain Qwen2 decoder reads it: multimodal rope
/// fields removed, `model_type` qwen2.
fn text_as_qwen2(text: &Value, top: &Value) -> Value {
    let mut m: Map<String, Value> = text.as_object().cloned().unwrap_or_default();
    let theta = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| m.get(*k).and_then(|r| r.get("rope_theta")).cloned())
        .or_else(|| m.get("rope_theta").cloned());
    m.remove("rope_parameters");
    m.remove("rope_scaling");
    if let Some(t) = theta {
        m.insert("rope_theta".into(), t);
    }
    m.insert("model_type".into(), Value::from("qwen2"));
    if let Some(tie) = top.get("tie_word_embeddings") {
        m.insert("tie_word_embeddings".into(), tie.clone());
    }
    Value::Object(m)
}

fn vision_config(
    variant: QwenVlVariant,
    v: &Value,
    text_width: usize,
    path: &Path,
) -> Result<QwenVisionConfig> {
    let w = "vision_config";
    let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("");
    let (width, mlp_width, out_width, want_act) = match variant {
        QwenVlVariant::Qwen2Vl => {
            let width = int(v, "embed_dim", w, path)?;
            let ratio = v.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
            let out = v
                .get("hidden_size")
                .and_then(Value::as_u64)
                .map_or(text_width, |x| x as usize);
            (width, (width as f64 * ratio) as usize, out, "quick_gelu")
        }
        QwenVlVariant::Qwen25Vl => (
            int(v, "hidden_size", w, path)?,
            int(v, "intermediate_size", w, path)?,
            v.get("out_hidden_size")
                .and_then(Value::as_u64)
                .map_or(text_width, |x| x as usize),
            "silu",
        ),
    };
    if act != want_act {
        return Err(bad(
            path,
            format!("vision_config.hidden_act {act:?} is not supported (expected {want_act:?})"),
        ));
    }
    let full = match v.get("fullatt_block_indexes") {
        None => Vec::new(),
        Some(list) => list
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                bad(
                    path,
                    "vision_config.fullatt_block_indexes must list integers",
                )
            })?,
    };
    let cfg = QwenVisionConfig {
        width,
        mlp_width,
        depth: int(v, "depth", w, path)?,
        num_heads: int(v, "num_heads", w, path)?,
        out_width,
        patch_size: v.get("patch_size").and_then(Value::as_u64).unwrap_or(14) as usize,
        temporal_patch_size: v
            .get("temporal_patch_size")
            .and_then(Value::as_u64)
            .unwrap_or(2) as usize,
        spatial_merge_size: v
            .get("spatial_merge_size")
            .and_then(Value::as_u64)
            .unwrap_or(2) as usize,
        in_channels: ["in_channels", "in_chans"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_u64))
            .unwrap_or(3) as usize,
        rope_theta: v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0),
        window_size: match variant {
            QwenVlVariant::Qwen2Vl => 0,
            QwenVlVariant::Qwen25Vl => int(v, "window_size", w, path)?,
        },
        full_attention_blocks: full,
    };
    let ok = cfg.width > 0
        && cfg.num_heads > 0
        && cfg.width.is_multiple_of(cfg.num_heads)
        && cfg.head_dim().is_multiple_of(4)
        && cfg.mlp_width > 0
        && cfg.out_width == text_width
        && cfg.patch_size > 0
        && cfg.temporal_patch_size > 0
        && cfg.spatial_merge_size > 0
        && cfg.in_channels > 0
        && cfg.rope_theta > 0.0
        && (cfg.window_size == 0
            || cfg
                .spatial_merge_size
                .checked_mul(cfg.patch_size)
                .is_some_and(|w| cfg.window_size.is_multiple_of(w)))
        && weights_addressable(&cfg);
    if !ok {
        return Err(bad(path, format!("inconsistent vision_config {cfg:?}")));
    }
    Ok(cfg)
}

/// The tower's weight matrices fit in memory's address range (the loader
/// and the forward multiply these sizes): the patch kernel, qkv, the MLP
/// and the merger's two matrices.
fn weights_addressable(c: &QwenVisionConfig) -> bool {
    let (d, m) = (c.width, c.spatial_merge_size);
    let (p, t) = (c.patch_size, c.temporal_patch_size);
    addressable(&[d, c.in_channels, t, p, p])
        && addressable(&[3, d, d])
        && addressable(&[c.mlp_width, d])
        && addressable(&[d, m, m, d, m, m])
        && addressable(&[c.out_width, d, m, m])
}

impl Qwen2VlConfig {
    /// Reads a `config.json` object (`path` is only used in errors).
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let variant = match v.get("model_type").and_then(Value::as_str) {
            Some("qwen2_vl") => QwenVlVariant::Qwen2Vl,
            Some("qwen2_5_vl") => QwenVlVariant::Qwen25Vl,
            other => {
                return Err(bad(
                    path,
                    format!("model_type {other:?} is not qwen2_vl or qwen2_5_vl"),
                ))
            }
        };
        // 5.x nests the decoder under text_config; 4.x keeps it at the top.
        let text_raw = v.get("text_config").unwrap_or(v);
        let text = LlamaConfig::from_hf_json(&text_as_qwen2(text_raw, v), path)?;
        let mrope_section = mrope_section(text_raw, path)?;
        let halves = mrope_section
            .iter()
            .try_fold(0usize, |a, &b| a.checked_add(b))
            .and_then(|s| s.checked_mul(2));
        if halves != Some(text.head_dim) {
            return Err(bad(
                path,
                format!(
                    "mrope_section {mrope_section:?} does not sum to head_dim / 2 = {}",
                    text.head_dim / 2
                ),
            ));
        }
        let vc = v
            .get("vision_config")
            .ok_or_else(|| bad(path, "no vision_config object"))?;
        let vision = vision_config(variant, vc, text.hidden_size, path)?;
        if let Some(&b) = vision
            .full_attention_blocks
            .iter()
            .find(|&&b| b >= vision.depth)
        {
            return Err(bad(
                path,
                format!("fullatt_block_indexes names block {b} of {}", vision.depth),
            ));
        }
        let image_token_id = token(v, "image_token_id", path)?;
        let video_token_id = token(v, "video_token_id", path)?;
        let vision_start_token_id = token(v, "vision_start_token_id", path)?;
        let vocab = text.vocab_size as u32;
        if [image_token_id, video_token_id, vision_start_token_id]
            .iter()
            .any(|&t| t >= vocab)
        {
            return Err(bad(path, "a vision token id is outside the vocabulary"));
        }
        Ok(Qwen2VlConfig {
            variant,
            text,
            mrope_section,
            vision,
            image_token_id,
            video_token_id,
            vision_start_token_id,
            raw: v.clone(),
        })
    }
}
