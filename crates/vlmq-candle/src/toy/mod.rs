//! The toy ViT-LLM of `vlmq-toy` (a `vlmq-nn` `SequenceModel` saved with
//! `vlmq_nn::save_safetensors`) as a candle model, so the toy's accuracy can
//! be reproduced on this backend (forward only). Test-only: it checks that
//! this crate's Llama forward agrees with the reference backend.
//!
//! Architecture (as `vlmq-nn`): patch embedding `patches W^T + b + pos`;
//! encoder blocks (LayerNorm with shift, eps 1e-5; bidirectional attention
//! with biases, `width / 16` heads; MLP `down(gelu_tanh(up(x)))` with
//! biases; pre-norm residuals); a one-linear projector; then the text
//! embeddings are appended after the projected vision tokens and Llama
//! blocks (RMSNorm eps 1e-5, half-split RoPE theta 1e4 over positions
//! `0..P+T`, causal attention, SwiGLU, no biases) run on the whole
//! sequence; final RMSNorm and an untied head.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use vlmq::{Error, Result};

use crate::error::{file, CandleResultExt};
use crate::models::clip::{layer_norm, LayerNorm};
use crate::models::llama::config::{Architecture, LlamaConfig};
use crate::models::llama::forward::{linear, Hooks};
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::{Linear, ModelWeights, TensorSource};

/// Width of one attention head in the toy (`vlmq_toy::ToyConfig::HEAD_DIM`).
const HEAD_DIM: usize = 16;

/// One encoder block of the toy's ViT.
#[derive(Debug, Clone)]
struct EncoderBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    /// q, k, v, o, up, down.
    linears: [Linear; 6],
}

/// The toy ViT-LLM in candle.
#[derive(Debug, Clone)]
pub struct ToyVitLlm {
    patch: Linear,
    pos: Tensor,
    encoder: Vec<EncoderBlock>,
    projector: Linear,
    lm: LlamaModel,
}

/// Maps the decoder's HF names onto the toy's names (`blocks.{offset + i}.*`).
struct ToyNames<'a> {
    map: &'a mut HashMap<String, Tensor>,
    offset: usize,
}

impl TensorSource for ToyNames<'_> {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let toy = match name {
            "model.embed_tokens.weight" => "embed.weight".to_string(),
            "model.norm.weight" => "final_norm.weight".to_string(),
            "lm_head.weight" => "head.proj.weight".to_string(),
            _ => {
                let Some(rest) = name.strip_prefix("model.layers.") else {
                    return Ok(None);
                };
                let (i, part) = rest.split_once('.').unwrap_or((rest, ""));
                let i: usize = i.parse().map_err(|_| Error::MissingTensor {
                    name: name.to_string(),
                })?;
                let part = match part {
                    "input_layernorm.weight" => "norm1.weight",
                    "post_attention_layernorm.weight" => "norm2.weight",
                    "self_attn.q_proj.weight" => "attn.q.weight",
                    "self_attn.k_proj.weight" => "attn.k.weight",
                    "self_attn.v_proj.weight" => "attn.v.weight",
                    "self_attn.o_proj.weight" => "attn.o.weight",
                    "mlp.gate_proj.weight" => "mlp.gate.weight",
                    "mlp.up_proj.weight" => "mlp.up.weight",
                    "mlp.down_proj.weight" => "mlp.down.weight",
                    _ => return Ok(None),
                };
                format!("blocks.{}.{part}", self.offset + i)
            }
        };
        self.map
            .remove(&toy)
            .map(|t| t.to_dtype(dtype))
            .transpose()
            .at_model()
    }
}

fn take(map: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    map.remove(name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })
}

fn lin(map: &mut HashMap<String, Tensor>, stem: &str) -> Result<Linear> {
    Ok(Linear {
        weight: take(map, &format!("{stem}.weight"))?,
        bias: Some(take(map, &format!("{stem}.bias"))?),
    })
}

impl ToyVitLlm {
    /// Loads a toy model file (f32 safetensors written by `vlmq_nn::save_safetensors`).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let mut map = candle_core::safetensors::load(path, device).map_err(|e| file(path, e))?;
        let projector_at = (0..)
            .take_while(|i| {
                map.contains_key(&format!("blocks.{i}.attn.q.weight"))
                    || map.contains_key(&format!("blocks.{i}.proj.weight"))
            })
            .find(|i| map.contains_key(&format!("blocks.{i}.proj.weight")))
            .ok_or_else(|| Error::MissingTensor {
                name: "blocks.N.proj.weight (the toy's projector)".into(),
            })?;
        let lm_layers = (projector_at + 1..)
            .take_while(|i| map.contains_key(&format!("blocks.{i}.attn.q.weight")))
            .count();
        let mut encoder = Vec::with_capacity(projector_at);
        for i in 0..projector_at {
            let p = format!("blocks.{i}.");
            let ln = |map: &mut HashMap<String, Tensor>, n: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: take(map, &format!("{p}{n}.weight"))?,
                    bias: take(map, &format!("{p}{n}.bias"))?,
                })
            };
            let norm1 = ln(&mut map, "norm1")?;
            let norm2 = ln(&mut map, "norm2")?;
            let mut ls = Vec::with_capacity(6);
            for n in ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"] {
                ls.push(lin(&mut map, &format!("{p}{n}"))?);
            }
            encoder.push(EncoderBlock {
                norm1,
                norm2,
                linears: ls.try_into().expect("six linears"),
            });
        }
        let patch = lin(&mut map, "patch_embed.proj")?;
        let pos = take(&mut map, "patch_embed.pos")?;
        let projector = lin(&mut map, &format!("blocks.{projector_at}.proj"))?;
        let embed = map
            .get("embed.weight")
            .ok_or_else(|| Error::MissingTensor {
                name: "embed.weight".into(),
            })?;
        let (vocab, d) = embed.dims2().at_model()?;
        let hidden = map
            .get(&format!("blocks.{}.mlp.up.weight", projector_at + 1))
            .map_or(Ok(2 * d), |t| t.dim(0).at_model())?;
        let cfg = LlamaConfig {
            arch: Architecture::Llama,
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: hidden,
            num_layers: lm_layers,
            num_heads: d / HEAD_DIM,
            num_kv_heads: d / HEAD_DIM,
            head_dim: HEAD_DIM,
            rope_theta: 1e4,
            rms_eps: 1e-5,
            tie_embeddings: false,
            qkv_bias: false,
        };
        let weights = ModelWeights::assemble(
            &cfg,
            &mut ToyNames {
                map: &mut map,
                offset: projector_at + 1,
            },
            DType::F32,
        )?;
        if !map.is_empty() {
            let mut left: Vec<&String> = map.keys().collect();
            left.sort();
            return Err(Error::CorruptCheckpoint {
                path: path.to_path_buf(),
                reason: format!("tensors not part of a toy ViT-LLM: {left:?}"),
            });
        }
        Ok(ToyVitLlm {
            patch,
            pos,
            encoder,
            projector,
            lm: LlamaModel::new(cfg, weights)?,
        })
    }

    fn encoder_block(&self, b: &EncoderBlock, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, s, d) = x.dims3()?;
        let nh = d / HEAD_DIM;
        let heads = |t: Tensor| {
            t.reshape((n, s, nh, HEAD_DIM))?
                .transpose(1, 2)?
                .contiguous()
        };
        let h = layer_norm(x, &b.norm1, 1e-5)?;
        let q = heads(linear(&h, &b.linears[0])?)?;
        let k = heads(linear(&h, &b.linears[1])?)?;
        let v = heads(linear(&h, &b.linears[2])?)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (HEAD_DIM as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let att = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, s, d))?;
        let x = (x + linear(&att, &b.linears[3])?)?;
        let h = layer_norm(&x, &b.norm2, 1e-5)?;
        let u = linear(&h, &b.linears[4])?.gelu()?;
        x + linear(&u, &b.linears[5])?
    }

    /// Logits `[P + T, vocab]` of one example: `patches: [P, patch_dim]`
    /// (flattened patches, as `VqaExample::patches`) then the question tokens.
    pub fn logits(&self, patches: &Tensor, tokens: &[u32]) -> Result<Tensor> {
        let p = patches.dim(0).at_model()?;
        if p > self.pos.dim(0).at_model()? || patches.rank() != 2 {
            return Err(Error::shape(
                "patches [P, patch_dim]",
                &[
                    self.pos.dim(0).at_model()?,
                    self.patch.weight.dim(1).at_model()?,
                ],
                patches.dims(),
            ));
        }
        let mut x = linear(&patches.unsqueeze(0).at_model()?, &self.patch)
            .and_then(|y| y.broadcast_add(&self.pos.narrow(0, 0, p)?))
            .at_model()?;
        for (i, b) in self.encoder.iter().enumerate() {
            x = self.encoder_block(b, &x).in_block(i)?;
        }
        let v = linear(&x, &self.projector).at_model()?;
        let text = self.lm.embed_batch(&[tokens])?;
        let mut h = Tensor::cat(&[&v, &text], 1).at_model()?;
        let pos = self.lm.positional(h.dim(1).at_model()?)?;
        for i in 0..self.lm.config().num_layers {
            h = self.lm.layer(i, &h, &pos, &mut Hooks::none())?;
        }
        self.lm.head_logits(&h, false)?.squeeze(0).at_model()
    }
}

#[cfg(test)]
mod tests;
