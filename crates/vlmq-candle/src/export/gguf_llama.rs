//! A Llama-family model whose layers the pipeline solved onto a GGUF block
//! type, written as one GGUF v3 file llama.cpp and candle read: metadata
//! derived from the model's configuration (and its Hugging Face directory:
//! context length, tokenizer), llama.cpp's tensor names, q/k rows in
//! llama.cpp's converter order, solved layers as packed blocks and every
//! other tensor dense.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use vlmq::solver::GgufSolution;
use vlmq::{Error, Result};

use super::gguf::{permute_packed_rows, write_gguf, GgufTensor};
use super::gguf_tokenizer::tokenizer_metadata;
use super::llama::refuse_streamed;
use crate::error::file;
use crate::load::gguf::permute_qk;
use crate::models::llama::config::{Architecture, LlamaConfig};
use crate::models::llama::model::LlamaModel;

/// llama.cpp's name of an HF tensor name of a Llama-family decoder
/// (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`);
/// the inverse of the GGUF loader's `hf_name`.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{g}.{kind}"))
}

/// Where the solved layers of a decoder live: `(block, linear name)` of an
/// HF tensor name (`model.layers.3.self_attn.q_proj.weight` -> `(3,
/// "self_attn.q_proj")`).
fn block_linear(hf: &str) -> Option<(usize, &str)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest.strip_suffix(".weight")?))
}

/// The `{arch}.*` metadata llama.cpp's Llama and Qwen2 graphs read, from
/// the model's configuration; `context_length` from the HF config when
/// known (else 4096).
fn model_metadata(cfg: &LlamaConfig, name: &str, context: Option<u64>) -> Vec<(String, Value)> {
    let a = match cfg.arch {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        ("general.name".into(), Value::String(name.into())),
        (
            "general.quantized_by".into(),
            Value::String(format!("vlmq {}", env!("CARGO_PKG_VERSION"))),
        ),
        (
            format!("{a}.context_length"),
            Value::U32(context.unwrap_or(4096) as u32),
        ),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.block_count"), u(cfg.num_layers)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.attention.head_count"), u(cfg.num_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_eps as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim)),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
    ];
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        m.push((format!("{a}.attention.key_length"), u(cfg.head_dim)));
        m.push((format!("{a}.attention.value_length"), u(cfg.head_dim)));
    }
    m
}

/// A dense tensor in `ty` (1-D tensors, such as norms and biases, always
/// in f32, as llama.cpp keeps them), rounded by candle's own quantizer.
fn dense(name: &str, t: &Tensor, ty: GgmlDType, dst: &Path) -> Result<GgufTensor> {
    let t = t.to_dtype(DType::F32).map_err(|e| file(dst, e))?;
    let ty = if t.rank() < 2 { GgmlDType::F32 } else { ty };
    let q = QTensor::quantize(&t, ty).map_err(|e| file(dst, format!("{name}: {e}")))?;
    Ok(GgufTensor {
        name: name.to_string(),
        dims: t.dims().to_vec(),
        ggml_type: super::gguf::ggml_id(ty),
        data: q.data().map_err(|e| file(dst, e))?.into_owned(),
    })
}

/// Writes `model` to the GGUF file `dst`: every linear in `solved` (by
/// `(block, linear name)`, as [`PipelineOutput::gguf`](vlmq::PipelineOutput::gguf)
/// keys them) as its packed blocks, every other 2-D tensor in `dense_type`
/// (f32 keeps them exact; f16, q8_0, ... round them with candle's
/// quantizer, as llama.cpp does), norms and biases in f32. `hf_dir`, when
/// given, is the model's Hugging Face directory: its `config.json` gives
/// the context length and its `tokenizer.json` / `tokenizer_config.json`
/// the `tokenizer.ggml.*` keys and the chat template. For the `llama`
/// architecture q/k rows (and biases) are written in llama.cpp's
/// converter order. Nothing is written when anything fails.
pub fn write_gguf_llama(
    model: &LlamaModel,
    solved: &BTreeMap<(usize, String), GgufSolution>,
    hf_dir: Option<&Path>,
    dense_type: GgmlDType,
    dst: &Path,
) -> Result<()> {
    refuse_streamed(model)?;
    let cfg = model.config();
    let name = hf_dir
        .and_then(|d| d.file_name())
        .map_or("model".to_string(), |n| n.to_string_lossy().into_owned());
    let context = match hf_dir {
        Some(d) => max_positions(d)?,
        None => None,
    };
    let mut metadata = model_metadata(cfg, &name, context);
    if let Some(d) = hf_dir {
        metadata.extend(tokenizer_metadata(d)?);
    }
    let permute_heads = |hf: &str| -> Option<usize> {
        if cfg.arch != Architecture::Llama {
            return None;
        }
        if hf.contains("self_attn.q_proj.") {
            Some(cfg.num_heads)
        } else if hf.contains("self_attn.k_proj.") {
            Some(cfg.num_kv_heads)
        } else {
            None
        }
    };
    let mut tensors = Vec::new();
    let mut used = 0;
    for (hf, t) in model.weights().named_tensors() {
        let Some(g) = gguf_name(&hf) else {
            return Err(file(dst, format!("no GGUF name for tensor {hf:?}")));
        };
        let sol = block_linear(&hf).and_then(|(b, l)| solved.get(&(b, l.to_string())));
        let tensor = match (sol, permute_heads(&hf)) {
            (Some(sol), heads) => {
                used += 1;
                let mut packed = GgufTensor::solved(&g, sol)?;
                if let Some(h) = heads {
                    packed.data = permute_packed_rows(&packed.data, sol.codes.nrows(), h)?;
                }
                packed
            }
            (None, Some(h)) => {
                let p = permute_qk(&t, h, false).map_err(|e| file(dst, e))?;
                dense(&g, &p, dense_type, dst)?
            }
            (None, None) => dense(&g, &t, dense_type, dst)?,
        };
        tensors.push(tensor);
    }
    if used != solved.len() {
        return Err(Error::InvalidConfig {
            field: "solved layers",
            value: format!("{} given, {used} found in the model", solved.len()),
            reason: "every solved layer must be a linear of this model",
        });
    }
    write_gguf(dst, &metadata, &tensors)
}

/// `max_position_embeddings` of `dir/config.json`, when present.
fn max_positions(dir: &Path) -> Result<Option<u64>> {
    let p = dir.join("config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| file(&p, e))?;
    Ok(v.get("max_position_embeddings").and_then(|x| x.as_u64()))
}
