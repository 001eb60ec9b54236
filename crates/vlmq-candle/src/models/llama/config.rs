//! Shape and hyper-parameters of a Llama-family decoder (Llama, SmolLM2, Qwen2).

use std::path::Path;

use serde_json::Value;
use vlmq::{Error, Result};

use crate::models::sizes::first_too_large;

/// The architectures this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM2): no biases.
    Llama,
    /// `Qwen2ForCausalLM`: biases on q, k and v.
    Qwen2,
}

impl Architecture {
    /// The Hugging Face class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// The `model_type` field of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// Configuration of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Architecture.
    pub arch: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE frequency base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// LM head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// q, k and v projections carry biases (Qwen2).
    pub qkv_bias: bool,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| bad(path, format!("missing or non-integer field {key:?}")))
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` object (`path` is only used in errors).
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(bad(
                    path,
                    format!(
                        "unsupported architecture model_type = {other:?} (supported: llama, qwen2)"
                    ),
                ))
            }
        };
        let hidden_size = get_usize(v, "hidden_size", path)?;
        let num_heads = get_usize(v, "num_attention_heads", path)?;
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(num_heads, |x| x as usize);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        // transformers 5 stores the base under `rope_parameters`, 4.x at top level.
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        if let Some(kind) = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_type"))
            .or_else(|| v.get("rope_scaling").and_then(|r| r.get("rope_type")))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                return Err(bad(path, format!("unsupported rope_type {kind:?}")));
            }
        }
        let cfg = LlamaConfig {
            arch,
            vocab_size: get_usize(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", path)?,
            num_layers: get_usize(v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rms_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(arch == Architecture::Llama),
            qkv_bias: match arch {
                Architecture::Qwen2 => true,
                Architecture::Llama => v
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
        };
        cfg.validate().map_err(|r| bad(path, r))?;
        Ok(cfg)
    }

    /// Checks the relations between the sizes; the reason when they fail.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{k} must be positive"));
        }
        // Every weight matrix's shape, named as in config.json.
        let (q, kv) = (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
        );
        let (d, hd) = (
            ("hidden_size", self.hidden_size),
            ("head_dim", self.head_dim),
        );
        let matrices: [&[(&str, usize)]; 4] = [
            &[q, hd, d],
            &[kv, hd, d],
            &[("intermediate_size", self.intermediate_size), d],
            &[("vocab_size", self.vocab_size), d],
        ];
        if let Some(product) = first_too_large(&matrices) {
            return Err(format!("{product} is too large for one weight matrix"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_key_value_heads {} does not divide num_attention_heads {}",
                self.num_kv_heads, self.num_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(format!("rms_norm_eps {} must be >= 0", self.rms_eps));
        }
        Ok(())
    }

    /// A `config.json` object for this configuration (as transformers writes it).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }

    /// Query width `num_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Key/value width `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
