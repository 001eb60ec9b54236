//! Random-weight models for tests, benches and examples (deterministic per seed).

use candle_core::{DType, Device, Tensor};
use vlmq::Result;

use crate::error::CandleResultExt;
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::{LayerWeights, Linear, ModelWeights};

/// A small deterministic generator (SplitMix64) of normal samples.
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Box-Muller.
    fn sample(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn tensor(&mut self, shape: &[usize], mean: f64, std: f64) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (mean + std * self.sample()) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }
}

/// A model of `cfg` with random weights: matrices `N(0, 1/fan_in)`, norm
/// gains `1 + 0.2 N(0, 1)`, biases `0.1 N(0, 1)` (the hf-tiny fixtures'
/// recipe, so every parameter matters), embedding `N(0, 1)`.
pub fn random_model(cfg: &LlamaConfig, seed: u64, dtype: DType) -> Result<LlamaModel> {
    let mut r = Normal(seed);
    let mut build = || -> candle_core::Result<ModelWeights> {
        let d = cfg.hidden_size;
        let mut layers = Vec::new();
        for _ in 0..cfg.num_layers {
            let shapes = [
                (cfg.q_dim(), d, true),
                (cfg.kv_dim(), d, true),
                (cfg.kv_dim(), d, true),
                (d, cfg.q_dim(), false),
                (cfg.intermediate_size, d, false),
                (cfg.intermediate_size, d, false),
                (d, cfg.intermediate_size, false),
            ];
            let mut lin = Vec::new();
            for (o, i, qkv) in shapes {
                let weight = r.tensor(&[o, i], 0.0, 1.0 / (i as f64).sqrt())?;
                let bias = if qkv && cfg.qkv_bias {
                    Some(r.tensor(&[o], 0.0, 0.1)?)
                } else {
                    None
                };
                lin.push(Linear { weight, bias });
            }
            layers.push(LayerWeights {
                input_norm: r.tensor(&[d], 1.0, 0.2)?,
                post_norm: r.tensor(&[d], 1.0, 0.2)?,
                linears: lin.try_into().expect("seven"),
            });
        }
        let embed = r.tensor(&[cfg.vocab_size, d], 0.0, 1.0)?;
        let norm = r.tensor(&[d], 1.0, 0.2)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(r.tensor(&[cfg.vocab_size, d], 0.0, 1.0 / (d as f64).sqrt())?)
        };
        Ok(ModelWeights {
            embed: Some(embed),
            layers,
            norm,
            lm_head,
        })
    };
    let w = build().at_model()?;
    LlamaModel::new(cfg.clone(), w)?.to_dtype(dtype)
}
