//! [`LlamaModel`]: a Llama-family decoder held as candle tensors.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use crate::backend::llama_backward::head_loss_backward;
use crate::error::CandleResultExt;
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::forward::{layer_forward, rms_norm, Hooks, Positional};
use crate::models::llama::head::Head;
use crate::models::llama::positional::PositionalCache;
use crate::models::llama::store::{LayerSource, StreamedLayers};
use crate::models::llama::weights::{LayerWeights, ModelWeights, EMBED};

/// Target rows that go through the head together in the loss's backward
/// pass (a `[HEAD_ROWS, vocab]` block of logits at a time).
const HEAD_ROWS: usize = 64;

/// A decoder: configuration, parameters, device and compute dtype.
///
/// Its parameters are either all in memory ([`weights`](Self::weights))
/// or, for a model loaded with [`Residency::Disk`](crate::Residency::Disk),
/// read from the checkpoint when needed: the decoder layers one at a time,
/// a batch's embedding rows, and the head for each logits or loss call
/// (then `weights()` holds the final norm only).
///
/// Cloning is cheap (tensors are shared); replacing a weight in one clone
/// never changes another.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    cfg: LlamaConfig,
    weights: ModelWeights,
    device: Device,
    dtype: DType,
    streamed: Option<StreamedLayers>,
    positional: PositionalCache,
}

/// A decoder layer borrowed from a resident model or shared with a streamed
/// model's cache.
pub(crate) enum LayerRef<'a> {
    Resident(&'a LayerWeights),
    Streamed(Arc<LayerWeights>),
}

impl std::ops::Deref for LayerRef<'_> {
    type Target = LayerWeights;
    fn deref(&self) -> &LayerWeights {
        match self {
            LayerRef::Resident(l) => l,
            LayerRef::Streamed(l) => l,
        }
    }
}

impl LlamaModel {
    /// Wraps checked weights (all tensors must share one dtype and device;
    /// the embedding must be present).
    pub fn new(cfg: LlamaConfig, weights: ModelWeights) -> Result<Self> {
        let embed = weights
            .embed
            .as_ref()
            .ok_or_else(|| Error::MissingTensor { name: EMBED.into() })?;
        let (device, dtype) = (embed.device().clone(), embed.dtype());
        Self::build(cfg, weights, device, dtype, None)
    }

    fn build(
        cfg: LlamaConfig,
        weights: ModelWeights,
        device: Device,
        dtype: DType,
        streamed: Option<StreamedLayers>,
    ) -> Result<Self> {
        cfg.validate().map_err(|reason| Error::InvalidConfig {
            field: "LlamaConfig",
            value: reason,
            reason: "the decoder's sizes must be consistent",
        })?;
        Ok(LlamaModel {
            cfg,
            weights,
            device,
            dtype,
            streamed,
            positional: PositionalCache::default(),
        })
    }

    /// A model whose embedding rows, head and decoder layers come from
    /// `layers` on demand; `outer` holds the final norm only.
    pub(crate) fn streamed(
        cfg: LlamaConfig,
        outer: ModelWeights,
        layers: StreamedLayers,
    ) -> Result<Self> {
        let device = outer.norm.device().clone();
        let dtype = layers.dtype();
        Self::build(cfg, outer, device, dtype, Some(layers))
    }

    /// Decoder layer `i` (read from disk for a streamed model).
    pub(crate) fn layer_weights(&self, i: usize) -> Result<LayerRef<'_>> {
        if i >= self.cfg.num_layers {
            return Err(Error::Backend {
                block: i,
                layer: None,
                reason: format!("the model has {} layers", self.cfg.num_layers),
            });
        }
        match &self.streamed {
            Some(s) => s.layer(i).map(LayerRef::Streamed),
            None => self
                .weights
                .layers
                .get(i)
                .map(LayerRef::Resident)
                .ok_or_else(|| Error::Backend {
                    block: i,
                    layer: None,
                    reason: format!("the model holds {} layers", self.weights.layers.len()),
                }),
        }
    }

    /// Decoder layer `i` for writing (kept resident until released).
    pub(crate) fn layer_weights_mut(&mut self, i: usize) -> Result<&mut LayerWeights> {
        let n = self.cfg.num_layers;
        let missing = || Error::Backend {
            block: i,
            layer: None,
            reason: format!("the model has {n} layers"),
        };
        if i >= n {
            return Err(missing());
        }
        match &mut self.streamed {
            Some(s) => s.layer_mut(i),
            None => self.weights.layers.get_mut(i).ok_or_else(missing),
        }
    }

    /// Frees a streamed model's weights of the linears `names` of layer
    /// `i` (see [`StreamedLayers::drop_linears`]); nothing for a resident
    /// model, whose weights are the run's result.
    pub(crate) fn drop_streamed_linears(&mut self, i: usize, names: &[&str]) -> Result<()> {
        match &mut self.streamed {
            Some(s) => s.drop_linears(i, names),
            None => Ok(()),
        }
    }

    /// Drops a streamed model's copies of layer `i` (see
    /// [`StreamedLayers::release`]); nothing for a resident model.
    pub(crate) fn release_layer(&mut self, i: usize) {
        if let Some(s) = &mut self.streamed {
            s.release(i);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The parameters held in memory (for a model loaded with
    /// [`Residency::Disk`](crate::Residency::Disk), the final norm only).
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// Mutable parameters (shapes are the caller's responsibility; prefer
    /// [`set_linear_weight`](vlmq::QuantizableModel::set_linear_weight)).
    pub(crate) fn weights_mut(&mut self) -> &mut ModelWeights {
        &mut self.weights
    }

    /// The compute dtype (that of the layers; a streamed model's embedding
    /// and head are stored on disk in theirs and converted when read).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A streamed model's layer source.
    pub(crate) fn layer_source(&self) -> Option<Arc<LayerSource>> {
        self.streamed.as_ref().map(StreamedLayers::source)
    }

    /// Whether the decoder layers are read from disk on demand.
    pub fn is_streamed(&self) -> bool {
        self.streamed.is_some()
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A copy with every parameter converted to `dtype` (e.g. F64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if self.streamed.is_some() {
            return Err(Error::Unsupported {
                what: "converting a model whose layers stay on disk".into(),
                remedy: "load it with the wanted dtype instead".into(),
            });
        }
        let c = |t: &Tensor| t.to_dtype(dtype).at_model();
        let mut w = self.weights.clone();
        if let Some(e) = &w.embed {
            w.embed = Some(c(e)?);
        }
        w.norm = c(&w.norm)?;
        if let Some(h) = &w.lm_head {
            w.lm_head = Some(c(h)?);
        }
        for l in &mut w.layers {
            l.input_norm = c(&l.input_norm)?;
            l.post_norm = c(&l.post_norm)?;
            for lin in &mut l.linears {
                lin.weight = c(&lin.weight)?;
                if let Some(b) = &lin.bias {
                    lin.bias = Some(c(b)?);
                }
            }
        }
        Ok(LlamaModel {
            cfg: self.cfg.clone(),
            weights: w,
            device: self.device.clone(),
            dtype,
            streamed: None,
            positional: PositionalCache::default(),
        })
    }

    /// Checks a batch of token rows: non-empty, equal lengths, ids in the vocabulary.
    pub(crate) fn check_tokens(&self, batch: &[&[u32]]) -> Result<(usize, usize)> {
        let t = batch.first().map_or(0, |r| r.len());
        if t == 0 {
            return Err(Error::Empty {
                what: "token batch".into(),
            });
        }
        for (b, row) in batch.iter().enumerate() {
            if row.len() != t {
                return Err(Error::shape(format!("token row {b}"), &[t], &[row.len()]));
            }
            if let Some(&id) = row.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(Error::InvalidConfig {
                    field: "token id",
                    value: id.to_string(),
                    reason: "token ids must be below the vocabulary size",
                });
            }
        }
        Ok((batch.len(), t))
    }

    /// Input embeddings `[B, T, hidden]` of equal-length token rows (for a
    /// streamed model, only these rows are read from the checkpoint).
    pub fn embed_batch(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let (b, t) = self.check_tokens(batch)?;
        let flat: Vec<u32> = batch.iter().flat_map(|r| r.iter().copied()).collect();
        let rows = match (&self.weights.embed, &self.streamed) {
            (Some(embed), _) => {
                let ids = Tensor::from_vec(flat, b * t, &self.device).at_model()?;
                embed
                    .index_select(&ids, 0)
                    .and_then(|e| e.to_dtype(self.dtype))
                    .at_model()?
            }
            (None, Some(s)) => s.source().embedding_rows(&flat)?,
            (None, None) => return Err(Error::MissingTensor { name: EMBED.into() }),
        };
        rows.reshape((b, t, self.cfg.hidden_size)).at_model()
    }

    /// Positional tables for length `t`.
    pub(crate) fn positional(&self, t: usize) -> Result<Positional> {
        self.positional
            .get(&self.cfg, t, self.dtype(), &self.device)
            .at_model()
    }

    /// Runs layer `i` on `x: [B, T, hidden]`.
    pub(crate) fn layer(
        &self,
        i: usize,
        x: &Tensor,
        pos: &Positional,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        let l = self.layer_weights(i)?;
        layer_forward(&self.cfg, &l, x, pos, hooks).in_block(i)
    }

    /// The LM head (the embedding when tied) in the dtype it is stored in,
    /// its slices converted to the compute dtype as they are used; read
    /// from the checkpoint for a streamed model (not kept between calls;
    /// calls running at once share one copy).
    fn head(&self) -> Result<Head> {
        let held = self
            .weights
            .lm_head
            .as_ref()
            .or(self.weights.embed.as_ref());
        let stored = match (held, &self.streamed) {
            (Some(h), _) => Arc::new(h.clone()),
            (None, Some(s)) => s.source().head()?,
            (None, None) => return Err(Error::MissingTensor { name: EMBED.into() }),
        };
        Ok(Head::new(stored, self.dtype))
    }

    /// Bytes of embedding and head held in memory between uses (0 for a
    /// streamed model, which reads them from the checkpoint when needed).
    pub fn resident_table_bytes(&self) -> usize {
        [&self.weights.embed, &self.weights.lm_head]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Final norm then LM head: logits `[B, T, vocab]` from the last layer's output.
    pub fn head_logits(&self, h: &Tensor, differentiable: bool) -> Result<Tensor> {
        let head = self.head()?;
        let run = || -> candle_core::Result<Tensor> {
            let (b, t, d) = h.dims3()?;
            let n = rms_norm(h, &self.weights.norm, self.cfg.rms_eps, differentiable)?;
            head.logits(&n.reshape((b * t, d))?)?
                .reshape((b, t, self.cfg.vocab_size))
        };
        run().at_model()
    }

    /// Hidden states of a batch: the embeddings, then every layer's output
    /// (the last before the final norm).
    pub fn hidden_states(&self, batch: &[&[u32]]) -> Result<Vec<Tensor>> {
        let mut h = self.embed_batch(batch)?;
        let pos = self.positional(h.dim(1).at_model()?)?;
        let mut out = vec![h.clone()];
        for i in 0..self.cfg.num_layers {
            h = self.layer(i, &h, &pos, &mut Hooks::none())?;
            out.push(h.clone());
        }
        Ok(out)
    }

    /// Logits `[B, T, vocab]` of equal-length token rows (fused ops, no autograd).
    pub fn logits(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let hs = self.hidden_states(batch)?;
        self.head_logits(hs.last().expect("embeddings"), false)
    }

    /// Mean next-token cross-entropy of one row over positions `t >= 1`
    /// with `targets[t]` true, and its gradient with respect to the last
    /// layer's output `h: [1, T, hidden]`; `None` when no position is a
    /// target.
    ///
    /// Only the rows that predict a target (`t - 1` for each target `t`) go
    /// through the final norm and the head, [`HEAD_ROWS`] at a time, each
    /// chunk's gradient written out by hand (`head_loss_backward`: one fused
    /// softmax, no autograd graph over the logits) and added into its rows:
    /// the `[rows, vocab]` logits, softmax and gradients live for one chunk at
    /// a time, so memory does not grow with the sequence length, and with a
    /// task loss on a few answer tokens the other rows never reach the head.
    pub(crate) fn loss_and_grad_at(
        &self,
        h: &Tensor,
        tokens: &[u32],
        targets: &[bool],
    ) -> Result<Option<(f32, Tensor)>> {
        let rows: Vec<u32> = (1..tokens.len().min(targets.len()))
            .filter(|&t| targets[t])
            .map(|t| (t - 1) as u32)
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let head = self.head()?;
        let run = || -> candle_core::Result<(f64, Tensor)> {
            let h = h.detach().squeeze(0)?;
            let mut grad = h.zeros_like()?;
            let mut total = 0.0f64;
            for chunk in rows.chunks(HEAD_ROWS) {
                let idx = Tensor::from_vec(chunk.to_vec(), chunk.len(), &self.device)?;
                let next: Vec<u32> = chunk.iter().map(|&r| tokens[r as usize + 1]).collect();
                let part = head_loss_backward(
                    &h.index_select(&idx, 0)?,
                    &self.weights.norm,
                    self.cfg.rms_eps,
                    &head,
                    &next,
                    rows.len(),
                )?;
                grad = grad.index_add(&idx, &part.grad, 0)?;
                total += part.loss_sum;
            }
            Ok((total / rows.len() as f64, grad.unsqueeze(0)?))
        };
        let (loss, grad) = run().at_model()?;
        Ok(Some((loss as f32, grad)))
    }
}
