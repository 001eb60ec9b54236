//! A GGUF file's tensors read by HF name when the model asks for them:
//! whole tensors dequantized (the q/k rows of the `llama` architecture put
//! back in HF order) or only some rows of one (an embedding lookup).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use crate::error::file;
use crate::load::gguf::permute_qk;
use crate::load::progress::LoadTick;
use crate::models::llama::config::{Architecture, LlamaConfig};
use crate::models::llama::weights::{select_rows, TensorSource};

/// A GGUF file's tensors by HF name: each read (and dequantized) when asked
/// for, so a model can keep its layers in the file until it needs them.
pub(crate) struct GgufSource {
    pub(crate) content: Content,
    pub(crate) reader: BufReader<File>,
    pub(crate) by_hf: HashMap<String, String>,
    pub(crate) path: PathBuf,
    pub(crate) device: Device,
    pub(crate) cfg: LlamaConfig,
}

impl TensorSource for GgufSource {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(g) = self.by_hf.get(name) else {
            return Ok(None);
        };
        let q = self
            .content
            .tensor(&mut self.reader, g, &self.device)
            .map_err(|e| file(&self.path, format!("tensor {g:?}: {e}")))?;
        let mut t = q
            .dequantize(&self.device)
            .map_err(|e| file(&self.path, e))?;
        if self.cfg.arch == Architecture::Llama {
            let heads = if name.contains("self_attn.q_proj") {
                Some(self.cfg.num_heads)
            } else if name.contains("self_attn.k_proj") {
                Some(self.cfg.num_kv_heads)
            } else {
                None
            };
            if let Some(h) = heads {
                if t.dim(0).map_err(|e| file(&self.path, e))? % (2 * h) != 0 {
                    return Err(Error::shape(
                        format!("rows of {g:?} (per head pairs)"),
                        &[2 * h],
                        t.dims(),
                    ));
                }
                t = permute_qk(&t, h, true).map_err(|e| file(&self.path, e))?;
            }
        }
        t.to_dtype(dtype).map(Some).map_err(|e| file(&self.path, e))
    }

    fn rows(&mut self, name: &str, ids: &[u32], dtype: DType) -> Result<Option<Tensor>> {
        let Some(g) = self.by_hf.get(name).cloned() else {
            return Ok(None);
        };
        if name.contains("self_attn.q_proj") || name.contains("self_attn.k_proj") {
            // Permuted on reading: rows of the stored tensor are not the
            // model's rows.
            let t = self.get(name, dtype)?;
            return t.map(|t| select_rows(&t, ids)).transpose();
        }
        let t = self.read_rows(&g, ids)?;
        t.to_dtype(dtype).map(Some).map_err(|e| file(&self.path, e))
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        let info = self.content.tensor_infos.get(self.by_hf.get(name)?)?;
        Some(match info.ggml_dtype {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        })
    }
}

impl GgufSource {
    /// Rows `ids` of the 2-D tensor `g` (GGUF name) dequantized, each row's
    /// blocks read on their own: blocks dequantize independently, so the
    /// rows have the values of the whole tensor dequantized.
    fn read_rows(&mut self, g: &str, ids: &[u32]) -> Result<Tensor> {
        let bad = |reason: String| file(&self.path, format!("tensor {g:?}: {reason}"));
        let info = self
            .content
            .tensor_infos
            .get(g)
            .ok_or_else(|| Error::MissingTensor { name: g.into() })?;
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        let [rows, width] = dims[..] else {
            return Err(bad(format!("rows asked of a {}-D tensor", dims.len())));
        };
        if let Some(id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(bad(format!("row {id} asked of {rows} rows")));
        }
        let block = dtype.block_size().max(1);
        if width % block != 0 {
            // llama.cpp (and candle's quantizer) keep every row a whole
            // number of blocks.
            return Err(bad(format!("rows of {width} values in blocks of {block}")));
        }
        let row = width / block * dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let mut bytes = vec![0u8; ids.len() * row];
        for (&id, out) in ids.iter().zip(bytes.chunks_exact_mut(row.max(1))) {
            self.reader
                .seek(SeekFrom::Start(start + id as u64 * row as u64))
                .and_then(|_| self.reader.read_exact(out))
                .map_err(|e| Error::io(&self.path, e))?;
        }
        qtensor_from_ggml(dtype, &bytes, vec![ids.len(), width], &self.device)
            .and_then(|q| q.dequantize(&self.device))
            .map_err(|e| bad(e.to_string()))
    }

    /// The bytes the tensor of HF name `name` takes in the file (0 when
    /// absent).
    fn stored_bytes(&self, name: &str) -> u64 {
        let Some(info) = self
            .by_hf
            .get(name)
            .and_then(|g| self.content.tensor_infos.get(g))
        else {
            return 0;
        };
        let blocks = info.shape.elem_count() / info.ggml_dtype.block_size().max(1);
        (blocks as u64).saturating_mul(info.ggml_dtype.type_size() as u64)
    }
}

/// A [`GgufSource`] that reports the bytes of each tensor read.
pub(crate) struct CountedGguf<'a, 'b> {
    pub(crate) src: &'a mut GgufSource,
    pub(crate) tick: LoadTick<'b>,
    pub(crate) done: u64,
    pub(crate) total: u64,
}

impl TensorSource for CountedGguf<'_, '_> {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let t = self.src.get(name, dtype)?;
        if t.is_some() {
            self.done = self.done.saturating_add(self.src.stored_bytes(name));
            (self.tick)(self.done.min(self.total), self.total)?;
        }
        Ok(t)
    }
}
