//! Loading a llama.cpp GGUF file: metadata to [`LlamaConfig`], every tensor
//! dequantized to the compute dtype, renamed to HF names, and the q/k row
//! permutation of llama.cpp's converter undone for the `llama` architecture.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use crate::error::{file, in_model_file};
use crate::load::gguf_check::{check_metadata, check_tensors};
use crate::load::gguf_source::{CountedGguf, GgufSource};
use crate::load::options::{LoadOptions, Residency};
use crate::load::progress::{ignore, total_bytes, LoadTick};
use crate::models::llama::config::{Architecture, LlamaConfig};
use crate::models::llama::model::LlamaModel;
use crate::models::llama::store::{LayerSource, StreamedLayers};
use crate::models::llama::weights::{check_directory, ModelWeights};

/// HF name of a GGUF tensor name (`None` for tensors the decoder does not use).
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{hf}.{kind}"))
}

/// llama.cpp's converter order of q/k rows: within each head, HF's
/// `[2, hd/2]` (halves) becomes `[hd/2, 2]` (pairs). `inverse` maps back.
/// Works on `[out, in]` and on `[out]` (biases).
pub(crate) fn permute_qk(w: &Tensor, heads: usize, inverse: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let inn = if dims.len() == 2 { dims[1] } else { 1 };
    let hd = out / heads;
    let shape = if inverse {
        (heads, hd / 2, 2, inn)
    } else {
        (heads, 2, hd / 2, inn)
    };
    w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// A metadata value by key.
pub(crate) fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| Error::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason: format!("GGUF metadata key {key:?} is missing"),
    })
}

fn meta_usize(c: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    let n = v
        .to_u64()
        .map(i128::from)
        .or_else(|_| v.to_u32().map(i128::from))
        .or_else(|_| v.to_i32().map(i128::from))
        .map_err(|e| Error::field(path, key, e))?;
    // A negative i32 is a corrupt size, not a huge one.
    usize::try_from(n).map_err(|_| Error::field(path, key, format!("{n} is not a size")))
}

fn meta_f64(c: &Content, key: &str, path: &Path) -> Result<Option<f64>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map(Some)
            .map_err(|e| file(path, e)),
    }
}

/// The decoder configuration stored in a GGUF file's metadata.
pub fn config_from_gguf(c: &Content, path: &Path) -> Result<LlamaConfig> {
    let arch_name = meta(c, "general.architecture", path)?
        .to_string()
        .map_err(|e| file(path, e))?
        .clone();
    let arch = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::CorruptCheckpoint {
                path: path.to_path_buf(),
                reason: format!("unsupported architecture {other:?} (supported: llama, qwen2)"),
            })
        }
    };
    let a = arch_name.as_str();
    let hidden = meta_usize(c, &format!("{a}.embedding_length"), path)?;
    let heads = meta_usize(c, &format!("{a}.attention.head_count"), path)?;
    let kv = match c
        .metadata
        .contains_key(&format!("{a}.attention.head_count_kv"))
    {
        true => meta_usize(c, &format!("{a}.attention.head_count_kv"), path)?,
        false => heads,
    };
    let head_dim = match c
        .metadata
        .contains_key(&format!("{a}.attention.key_length"))
    {
        true => meta_usize(c, &format!("{a}.attention.key_length"), path)?,
        false => hidden / heads.max(1),
    };
    let vocab_size = c
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| {
            Error::field(
                path,
                "token_embd.weight",
                "is missing or has no dimensions (the vocabulary size is its first)",
            )
        })?;
    let cfg = LlamaConfig {
        arch,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, &format!("{a}.feed_forward_length"), path)?,
        num_layers: meta_usize(c, &format!("{a}.block_count"), path)?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rope_theta: meta_f64(c, &format!("{a}.rope.freq_base"), path)?.unwrap_or(10000.0),
        rms_eps: meta_f64(c, &format!("{a}.attention.layer_norm_rms_epsilon"), path)?
            .unwrap_or(1e-5),
        tie_embeddings: !c.tensor_infos.contains_key("output.weight"),
        qkv_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    cfg.validate().map_err(|r| file(path, r))?;
    Ok(cfg)
}

/// Reads a GGUF file's header (metadata and tensor directory).
pub fn read_gguf_content(path: &Path) -> Result<Content> {
    check_metadata(path)?;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let content = Content::read(&mut BufReader::new(f)).map_err(|e| file(path, e))?;
    check_tensors(&content, path, size)?;
    Ok(content)
}

/// Loads a Llama-family model from a GGUF file, every tensor dequantized to `dtype`.
pub fn load_gguf(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<LlamaModel> {
    let opts = LoadOptions::default()
        .with_dtype(dtype)
        .with_device(device.clone());
    load_gguf_with(path, &opts)
}

/// Loads a Llama-family model from a GGUF file with `opts`: with
/// [`Residency::Disk`] the decoder layers stay quantized in the file and
/// are dequantized one block at a time when the model runs it.
pub fn load_gguf_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<LlamaModel> {
    load_gguf_counted(path.as_ref(), opts, &mut ignore)
}

/// [`load_gguf_with`], the bytes of each tensor read reported to `tick`
/// out of the file's size; it ends at `done == total` (the header and the
/// tensors the decoder does not use count at the end).
pub(crate) fn load_gguf_counted(
    path: &Path,
    opts: &LoadOptions,
    tick: LoadTick<'_>,
) -> Result<LlamaModel> {
    let total = total_bytes([path])?;
    let content = read_gguf_content(path)?;
    let cfg = config_from_gguf(&content, path)?;
    let by_hf = content
        .tensor_infos
        .keys()
        .filter_map(|g| hf_name(g).map(|h| (h, g.clone())))
        .collect();
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut src = GgufSource {
        content,
        reader: BufReader::new(f),
        by_hf,
        path: path.to_path_buf(),
        device: opts.device.clone(),
        cfg: cfg.clone(),
    };
    match opts.residency {
        Residency::Memory => {
            tick(0, total)?;
            let mut counted = CountedGguf {
                src: &mut src,
                tick,
                done: 0,
                total,
            };
            let weights = ModelWeights::assemble(&cfg, &mut counted, opts.dtype)
                .map_err(in_model_file(path))?;
            tick(total, total)?;
            LlamaModel::new(cfg, weights)
        }
        Residency::Disk => {
            let stored = |n: &str| {
                let g = src.by_hf.get(n)?;
                Some(src.content.tensor_infos.get(g)?.shape.dims().to_vec())
            };
            check_directory(&cfg, stored).map_err(in_model_file(path))?;
            let outer = ModelWeights::final_norm_only(&cfg, &mut src, opts.dtype)
                .map_err(in_model_file(path))?;
            let layers =
                StreamedLayers::new(LayerSource::new(cfg.clone(), opts.dtype, Box::new(src)));
            tick(total, total)?;
            LlamaModel::streamed(cfg, outer, layers)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_inverted_and_not_trivial() {
        let w = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 8))
            .unwrap();
        let p = permute_qk(&w, 2, false).unwrap();
        let back: Vec<Vec<f32>> = permute_qk(&p, 2, true).unwrap().to_vec2().unwrap();
        assert_eq!(back, w.to_vec2::<f32>().unwrap());
        // Head 0 has rows 0..4 = halves [0,1 | 2,3]; interleaved order is 0,2,1,3.
        let rows: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&rows[..4], &[0.0, 16.0, 8.0, 24.0]);
    }

    #[test]
    fn decoder_tensors_get_their_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_k.bias").as_deref(),
            Some("model.layers.3.self_attn.k_proj.bias")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
