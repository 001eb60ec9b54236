//! Decoder layers kept in their source (on disk) and materialized one at a
//! time in the compute dtype: what lets a model larger than memory be
//! quantized block by block. The embedding and the head stay there too:
//! a batch's embedding rows and the head are read when a forward needs
//! them and dropped with the tensors built from them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};

use candle_core::{DType, Tensor};
use vlmq::{Error, Result};

use crate::error::CandleResultExt;

use super::config::LlamaConfig;
use super::weights::{assemble_layer, LayerWeights, TensorSource, EMBED, HEAD};

/// A source of decoder layers, embedding rows and the head: any
/// [`TensorSource`] (a checkpoint on disk) behind a lock, assembling one
/// layer at a time.
pub(crate) struct LayerSource {
    cfg: LlamaConfig,
    dtype: DType,
    source: Mutex<Box<dyn TensorSource + Send>>,
    /// The head while some call uses it: calls running at once (the
    /// samples of an importance chunk, one per core) share one copy.
    head: Mutex<Weak<Tensor>>,
}

impl std::fmt::Debug for LayerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerSource")
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl LayerSource {
    /// Layers of `cfg` read from `source` and converted to `dtype`.
    pub(crate) fn new(
        cfg: LlamaConfig,
        dtype: DType,
        source: Box<dyn TensorSource + Send>,
    ) -> Self {
        LayerSource {
            cfg,
            dtype,
            source: Mutex::new(source),
            head: Mutex::new(Weak::new()),
        }
    }

    /// The dtype `name` is stored in (the compute dtype when the source
    /// does not say).
    pub(crate) fn stored_dtype(&self, name: &str) -> DType {
        let src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        src.stored_dtype(name).unwrap_or(self.dtype)
    }

    /// Where `name`'s stored bytes lie, when they can be copied unchanged
    /// (see [`TensorSource::file_tensor`]).
    pub(crate) fn file_tensor(&self, name: &str) -> Result<Option<vlmq::pack::FileTensor>> {
        let src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        src.file_tensor(name)
    }

    /// The tensor `name` read from the source in the dtype it is stored in
    /// (the compute dtype when the source does not say), for exporters that
    /// need a layer's norms and biases without materializing the layer.
    pub(crate) fn stored_tensor(&self, name: &str) -> Result<Option<candle_core::Tensor>> {
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let dtype = src.stored_dtype(name).unwrap_or(self.dtype);
        src.get(name, dtype)
    }

    /// The embedding rows of `ids` (already checked against the
    /// vocabulary) in the compute dtype: `[ids.len(), hidden]`.
    pub(crate) fn embedding_rows(&self, ids: &[u32]) -> Result<candle_core::Tensor> {
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        src.rows(EMBED, ids, self.dtype)?
            .ok_or_else(|| Error::MissingTensor { name: EMBED.into() })
    }

    /// The LM head (the embedding when tied) read whole in the dtype it is
    /// stored in (a quantized GGUF head decoded to f32), or the copy a call
    /// running at the same time holds: it is freed when the last caller
    /// drops it, and read again by the next call.
    pub(crate) fn head(&self) -> Result<Arc<Tensor>> {
        let mut shared = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = shared.upgrade() {
            return Ok(h);
        }
        let name = if self.cfg.tie_embeddings { EMBED } else { HEAD };
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let stored = src.stored_dtype(name).unwrap_or(self.dtype);
        let h = Arc::new(
            src.get(name, stored)?
                .ok_or_else(|| Error::MissingTensor { name: name.into() })?,
        );
        *shared = Arc::downgrade(&h);
        Ok(h)
    }

    /// Layer `i` read from the source, shape-checked, in the compute dtype.
    fn materialize(&self, i: usize) -> Result<LayerWeights> {
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        assemble_layer(&self.cfg, i, &mut **src, self.dtype)
    }
}

/// The layers of a streamed model: the source, the one layer materialized
/// for reading, the layers whose weights were replaced (resident until
/// released) and the released ones.
#[derive(Debug)]
pub(crate) struct StreamedLayers {
    source: Arc<LayerSource>,
    current: Mutex<Option<(usize, Arc<LayerWeights>)>>,
    modified: BTreeMap<usize, Arc<LayerWeights>>,
    released: BTreeSet<usize>,
}

impl Clone for StreamedLayers {
    fn clone(&self) -> Self {
        StreamedLayers {
            source: self.source.clone(),
            current: Mutex::new(self.lock_current().clone()),
            modified: self.modified.clone(),
            released: self.released.clone(),
        }
    }
}

impl StreamedLayers {
    /// Nothing materialized yet.
    pub(crate) fn new(source: LayerSource) -> Self {
        StreamedLayers {
            source: Arc::new(source),
            current: Mutex::new(None),
            modified: BTreeMap::new(),
            released: BTreeSet::new(),
        }
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<(usize, Arc<LayerWeights>)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_live(&self, i: usize) -> Result<()> {
        if self.released.contains(&i) {
            return Err(Error::Backend {
                block: i,
                layer: None,
                reason: "this layer was quantized and released (its weights are in the \
                         pipeline's output, no longer in the model)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Layer `i`: its replaced weights when it has some, otherwise the
    /// materialized copy (read from the source when it is not the layer
    /// held now; the previous one is dropped). Callers on several threads
    /// asking for the same layer share one read.
    pub(crate) fn layer(&self, i: usize) -> Result<Arc<LayerWeights>> {
        self.check_live(i)?;
        if let Some(l) = self.modified.get(&i) {
            return Ok(l.clone());
        }
        let mut current = self.lock_current();
        if let Some((j, l)) = current.as_ref() {
            if *j == i {
                return Ok(l.clone());
            }
        }
        *current = None; // drop the old layer before reading the new one
        let l = Arc::new(self.source.materialize(i)?);
        *current = Some((i, l.clone()));
        Ok(l)
    }

    /// Layer `i` for writing: kept resident until [`release`](Self::release).
    pub(crate) fn layer_mut(&mut self, i: usize) -> Result<&mut LayerWeights> {
        if !self.modified.contains_key(&i) {
            let l = self.layer(i)?;
            // Moved, not shared: a replaced weight's old values are then
            // freed instead of living on in the read cache.
            let mut current = self.lock_current();
            if current.as_ref().is_some_and(|(j, _)| *j == i) {
                *current = None;
            }
            drop(current);
            self.modified.insert(i, l);
        }
        let l = self.modified.get_mut(&i).expect("inserted above");
        Ok(Arc::make_mut(l))
    }

    /// Frees the weights of the linears `names` of layer `i`, which the run
    /// will not use again (a true-sequential run past their stage). Each
    /// becomes an empty `[0, in]` tensor, so any later use is a shape
    /// error, never a silent result; the layer stays writable and is read
    /// again from the source only if it was never replaced.
    pub(crate) fn drop_linears(&mut self, i: usize, names: &[&str]) -> Result<()> {
        let l = self.layer_mut(i)?;
        for name in names {
            if let Some(lin) = l.linear_mut(name) {
                let inputs = lin.weight.dim(1).in_block(i)?;
                lin.weight = Tensor::zeros((0, inputs), lin.weight.dtype(), lin.weight.device())
                    .in_block(i)?;
            }
        }
        Ok(())
    }

    /// Drops layer `i`'s copies. A layer whose weights were replaced cannot
    /// be read again (the source holds the old values); an untouched one is
    /// read again from the source when asked for.
    pub(crate) fn release(&mut self, i: usize) {
        let mut current = self.lock_current();
        if current.as_ref().is_some_and(|(j, _)| *j == i) {
            *current = None;
        }
        drop(current);
        if self.modified.remove(&i).is_some() {
            self.released.insert(i);
        }
    }

    /// The source the layers are read from.
    pub(crate) fn source(&self) -> Arc<LayerSource> {
        self.source.clone()
    }

    /// The compute dtype of materialized layers.
    pub(crate) fn dtype(&self) -> DType {
        self.source.dtype
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::Device;

    use super::*;
    use crate::models::llama::config::Architecture;

    /// A source whose every read of a tensor is counted.
    struct Counted {
        reads: Arc<AtomicUsize>,
    }

    impl TensorSource for Counted {
        fn get(&mut self, _name: &str, dtype: DType) -> Result<Option<Tensor>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Tensor::ones((8, 4), dtype, &Device::Cpu)
                .map(Some)
                .in_block(0)
        }
    }

    /// Calls holding the head at once share one copy; once the last drops
    /// it, nothing is kept and the next call reads it again.
    #[test]
    fn calls_at_once_share_one_head_and_none_is_kept() {
        let cfg = LlamaConfig {
            arch: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 4,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 4,
            rope_theta: 1e4,
            rms_eps: 1e-5,
            tie_embeddings: true,
            qkv_bias: false,
        };
        let reads = Arc::new(AtomicUsize::new(0));
        let source = LayerSource::new(
            cfg,
            DType::F32,
            Box::new(Counted {
                reads: reads.clone(),
            }),
        );
        let a = source.head().unwrap();
        let b = source.head().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        drop((a, b));
        assert!(source.head.lock().unwrap().upgrade().is_none());
        let _c = source.head().unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }
}
