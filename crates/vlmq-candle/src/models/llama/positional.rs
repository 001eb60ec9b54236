//! Rotary tables and the causal mask for one sequence length, and the
//! model's cache of the last ones built.
//!
//! Every sample of a calibration set usually has the same length, and the
//! pipeline asks for the tables once per sample and block: building them
//! (a `pow` and a `sin_cos` per entry, a `T x T` mask) took about 6% of a
//! SmolLM2 GPTQ run before the cache.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::models::llama::config::LlamaConfig;

/// Cosine and sine tables `[T, head_dim]` (the half angles repeated twice,
/// HF's half-split layout) and the causal mask `[T, T]` for one length.
#[derive(Debug, Clone)]
pub(crate) struct Positional {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) mask: Tensor,
}

impl Positional {
    /// Tables for positions `0..t` (angles computed in f64, then cast to `dtype`).
    pub(crate) fn new(
        cfg: &LlamaConfig,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let hd = cfg.head_dim;
        let half = hd / 2;
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for p in 0..t {
            let row: Vec<(f64, f64)> = (0..half)
                .map(|i| {
                    let inv = cfg.rope_theta.powf(-2.0 * i as f64 / hd as f64);
                    (p as f64 * inv).sin_cos()
                })
                .collect();
            for _ in 0..2 {
                for &(s, c) in &row {
                    sin.push(s);
                    cos.push(c);
                }
            }
        }
        let mask: Vec<f64> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Positional {
            cos: Tensor::from_vec(cos, (t, hd), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (t, hd), dev)?.to_dtype(dtype)?,
            mask: Tensor::from_vec(mask, (t, t), dev)?.to_dtype(dtype)?,
        })
    }
}

/// The tables of the last length and dtype asked for, shared by every
/// thread of a model (a calibration set of equal-length samples builds
/// them once). Holds one entry, so memory does not grow with the number of
/// distinct lengths; the entry is the same value [`Positional::new`] gives.
#[derive(Default)]
pub(crate) struct PositionalCache {
    last: Mutex<Option<(usize, DType, Arc<Positional>)>>,
}

impl PositionalCache {
    /// The tables for `t` positions in `dtype` on `dev`, built on a miss.
    pub(crate) fn get(
        &self,
        cfg: &LlamaConfig,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Positional> {
        if let Some((lt, ld, p)) = &*self.lock() {
            if *lt == t && *ld == dtype {
                return Ok(Positional::clone(p));
            }
        }
        let fresh = Positional::new(cfg, t, dtype, dev)?;
        *self.lock() = Some((t, dtype, Arc::new(fresh.clone())));
        Ok(fresh)
    }

    /// The entry, also after a panic elsewhere poisoned the lock (the
    /// entry is written whole, so it is never half-updated).
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(usize, DType, Arc<Positional>)>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A clone starts empty: the cache is a speed-up, not part of the value.
impl Clone for PositionalCache {
    fn clone(&self) -> Self {
        PositionalCache::default()
    }
}

impl std::fmt::Debug for PositionalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.lock().as_ref().map(|(t, _, _)| *t);
        f.debug_struct("PositionalCache")
            .field("length", &len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::llama::config::Architecture;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            arch: Architecture::Llama,
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rope_theta: 1e4,
            rms_eps: 1e-5,
            tie_embeddings: true,
            qkv_bias: false,
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap()
    }

    fn assert_same(a: &Positional, b: &Positional) {
        assert_eq!(a.cos.dims(), b.cos.dims());
        assert_eq!(a.mask.dims(), b.mask.dims());
        assert_eq!(a.cos.dtype(), b.cos.dtype());
        for (x, y) in [(&a.cos, &b.cos), (&a.sin, &b.sin), (&a.mask, &b.mask)] {
            assert_eq!(values(x), values(y));
        }
    }

    /// Whatever order lengths and dtypes are asked in, the cache answers
    /// what a fresh build gives: a key that ignored the length or the dtype
    /// would hand back the previous tables.
    #[test]
    fn cached_tables_equal_fresh_ones_across_lengths_and_dtypes() {
        let (cfg, dev) = (cfg(), Device::Cpu);
        let cache = PositionalCache::default();
        for (t, dtype) in [
            (5, DType::F32),
            (5, DType::F32),
            (7, DType::F32),
            (5, DType::F32),
            (5, DType::F64),
            (5, DType::F32),
        ] {
            let cached = cache.get(&cfg, t, dtype, &dev).unwrap();
            assert_same(&cached, &Positional::new(&cfg, t, dtype, &dev).unwrap());
        }
    }
}
