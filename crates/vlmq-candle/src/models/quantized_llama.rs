//! A Llama decoder run straight from a GGUF file the way candle's own
//! quantized Llama (`candle-transformers`' `quantized_llama`) runs it: every
//! linear and the head through candle-core's `QMatMul` on the file's packed
//! blocks, q/k rows in llama.cpp's order with interleaved rotary pairs, the
//! embedding dequantized. vlmq uses it to measure a GGUF file it wrote with
//! the kernels a GGUF runtime uses, not with vlmq's own f32 decoder.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;
use vlmq::{Error, Result};

use crate::error::{file, CandleResultExt};
use crate::load::gguf::config_from_gguf;
use crate::models::llama::config::{Architecture, LlamaConfig};

/// How the packed linears are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufKernel {
    /// candle's quantized matmul on the packed blocks (activations are
    /// rounded to 8-bit blocks first, as llama.cpp and candle-transformers
    /// do): what a GGUF runtime computes.
    Quantized,
    /// Each block type dequantized by candle to f32 once, then an f32
    /// matmul: the same weights without the activation rounding.
    Dequantized,
}

/// One decoder layer's tensors.
struct Layer {
    attn_norm: Tensor,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// A Llama-architecture GGUF model whose linears run through `QMatMul`.
pub struct QuantizedLlama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: QMatMul,
    cos: Tensor,
    sin: Tensor,
    path: PathBuf,
}

/// Reads tensors of one GGUF file by their llama.cpp names.
struct Reader<'a> {
    content: &'a Content,
    reader: BufReader<File>,
    path: &'a Path,
    device: &'a Device,
    kernel: GgufKernel,
}

impl Reader<'_> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::MissingTensor { name: name.into() });
        }
        self.content
            .tensor(&mut self.reader, name, self.device)
            .map_err(|e| file(self.path, format!("tensor {name:?}: {e}")))
    }

    fn dense(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        check_dims(self.path, name, q.shape().dims(), dims)?;
        q.dequantize(self.device)
            .map_err(|e| file(self.path, format!("tensor {name:?}: {e}")))
    }

    fn linear(&mut self, name: &str, dims: [usize; 2]) -> Result<QMatMul> {
        let q = self.qtensor(name)?;
        check_dims(self.path, name, q.shape().dims(), &dims)?;
        self.matmul(name, q)
    }

    fn matmul(&self, name: &str, q: QTensor) -> Result<QMatMul> {
        let err = |e: candle_core::Error| file(self.path, format!("tensor {name:?}: {e}"));
        match self.kernel {
            GgufKernel::Quantized => QMatMul::from_qtensor(q).map_err(err),
            GgufKernel::Dequantized => q.dequantize(self.device).map(QMatMul::Tensor).map_err(err),
        }
    }
}

fn check_dims(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(file(
            path,
            format!("tensor {name:?} has shape {got:?}, the metadata gives {want:?}"),
        ));
    }
    Ok(())
}

impl QuantizedLlama {
    /// Reads the GGUF file at `path` (architecture `llama`) onto `device`,
    /// its linears multiplied by `kernel`.
    pub fn from_gguf(path: impl AsRef<Path>, kernel: GgufKernel, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(f);
        let content = Content::read(&mut reader).map_err(|e| file(path, e))?;
        let cfg = config_from_gguf(&content, path)?;
        if cfg.arch != Architecture::Llama || cfg.qkv_bias {
            return Err(Error::Unsupported {
                what: format!("{}: {:?} through QMatMul", path.display(), cfg.arch),
                remedy: "only the llama architecture (no q/k/v biases) runs here; load the file with load_gguf".into(),
            });
        }
        let mut r = Reader {
            content: &content,
            reader,
            path,
            device,
            kernel,
        };
        let (d, f, q, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let embed = r.dense("token_embd.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: r.dense(&n("attn_norm"), &[d])?,
                q: r.linear(&n("attn_q"), [q, d])?,
                k: r.linear(&n("attn_k"), [kv, d])?,
                v: r.linear(&n("attn_v"), [kv, d])?,
                o: r.linear(&n("attn_output"), [d, q])?,
                ffn_norm: r.dense(&n("ffn_norm"), &[d])?,
                gate: r.linear(&n("ffn_gate"), [f, d])?,
                up: r.linear(&n("ffn_up"), [f, d])?,
                down: r.linear(&n("ffn_down"), [d, f])?,
            });
        }
        let norm = r.dense("output_norm.weight", &[d])?;
        // A tied head multiplies by the embedding's own blocks, as
        // candle-transformers does.
        let head_name = match cfg.tie_embeddings {
            true => "token_embd.weight",
            false => "output.weight",
        };
        let head = r.linear(head_name, [cfg.vocab_size, d])?;
        let (cos, sin) = rotary_tables(&cfg, device).map_err(|e| file(path, e))?;
        Ok(QuantizedLlama {
            cfg,
            embed,
            layers,
            norm,
            head,
            cos,
            sin,
            path: path.to_path_buf(),
        })
    }

    /// The decoder configuration read from the file's metadata.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Logits `[B, T, vocab]` of equal-length token rows.
    pub fn logits(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let t = batch.first().map_or(0, |r| r.len());
        if t == 0 || batch.iter().any(|r| r.len() != t) {
            return Err(Error::InvalidConfig {
                field: "token rows",
                value: format!("{} rows", batch.len()),
                reason: "rows must be non-empty and of equal length",
            });
        }
        if t > self.cos.dim(0).at_model()? {
            return Err(Error::InvalidConfig {
                field: "token rows",
                value: format!("{t} tokens"),
                reason: "longer than the rotary table (the file's context length)",
            });
        }
        if let Some(&tok) = batch
            .iter()
            .flat_map(|r| r.iter())
            .find(|&&x| x as usize >= self.cfg.vocab_size)
        {
            return Err(Error::InvalidConfig {
                field: "token id",
                value: tok.to_string(),
                reason: "not below the vocabulary size",
            });
        }
        // One row per task: vlmq runs candle's own kernels single-threaded
        // (`threads::prefer_sample_parallelism`), so the rows are what keeps
        // every core busy. Each row's logits do not depend on the other
        // rows, so the split changes no value.
        let rows = batch
            .par_iter()
            .map(|row| self.forward(std::slice::from_ref(row), t))
            .collect::<candle_core::Result<Vec<_>>>()
            .at_model()?;
        Tensor::cat(&rows, 0).at_model()
    }

    fn forward(&self, batch: &[&[u32]], t: usize) -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = batch.iter().flat_map(|r| r.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, batch.len() * t, self.embed.device())?;
        let mut h =
            self.embed
                .index_select(&ids, 0)?
                .reshape((batch.len(), t, self.cfg.hidden_size))?;
        let mask = causal_mask(t, h.device())?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let eps = self.cfg.rms_eps as f32;
        for l in &self.layers {
            let x = candle_nn::ops::rms_norm(&h, &l.attn_norm, eps)?;
            h = (h + self.attention(l, &x, &mask, &cos, &sin)?)?;
            let x = candle_nn::ops::rms_norm(&h, &l.ffn_norm, eps)?;
            let act = (candle_nn::ops::silu(&l.gate.forward(&x)?)? * l.up.forward(&x)?)?;
            h = (h + l.down.forward(&act)?)?;
        }
        let h = candle_nn::ops::rms_norm(&h, &self.norm, eps)?;
        self.head.forward(&h)
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads);
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
        // llama.cpp's q/k rows pair dimensions (2i, 2i + 1): interleaved rotary.
        let q = candle_nn::rotary_emb::rope_i(&heads(l.q.forward(x)?, nh)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&heads(l.k.forward(x)?, nkv)?, cos, sin)?;
        let v = heads(l.v.forward(x)?, nkv)?;
        let rep = nh / nkv;
        let expand = |y: Tensor| -> candle_core::Result<Tensor> {
            match rep {
                1 => Ok(y),
                _ => y
                    .unsqueeze(2)?
                    .expand((b, nkv, rep, t, hd))?
                    .reshape((b, nh, t, hd)),
            }
        };
        let (k, v) = (expand(k)?, expand(v)?.contiguous()?);
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let y = candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)?;
        l.o.forward(&y.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }

    /// The file this model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `[t, t]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (t, t), device)
}

/// cos/sin `[positions, head_dim / 2]` of `p theta_i`, `theta_i =
/// base^(-2i / head_dim)`, for the first 4096 positions (as
/// candle-transformers' table; evaluation windows are shorter).
fn rotary_tables(cfg: &LlamaConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    const POSITIONS: usize = 4096;
    let hd = cfg.head_dim;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, hd / 2), device)?;
    let pos = Tensor::arange(0u32, POSITIONS as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((POSITIONS, 1))?;
    let angles = pos.matmul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
