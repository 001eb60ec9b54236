//! The one-call API's GGUF output: which layers a GGUF file can hold,
//! where the file goes, and writing it from either kind of source.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use vlmq::pipeline::PipelineOutput;
use vlmq::{Error, PipelineConfig, QuantizableModel, Result};

use crate::export::gguf::requantize_gguf;
use crate::export::{gguf_name, write_gguf_llama};
use crate::LlamaModel;

/// Leaves dense every linear whose input width is not a multiple of 32 (no
/// GGUF block type holds its rows; llama.cpp stores such tensors in f16,
/// vlmq keeps them in f32).
pub(crate) fn keep_narrow_layers_dense(m: &LlamaModel, mut cfg: PipelineConfig) -> PipelineConfig {
    for b in 0..m.num_blocks() {
        let name = m.block_name(b);
        for l in m.linear_groups(b).into_iter().flatten() {
            if !l.in_features.is_multiple_of(32) {
                cfg = cfg.with_layer_override(format!("{name}/{}", l.name), None);
            }
        }
    }
    cfg
}

/// The file a GGUF save writes: `dir` when it ends in `.gguf`, else
/// `dir/model.gguf` (the directory is created).
pub(crate) fn gguf_path(dir: &Path) -> Result<PathBuf> {
    if dir.extension().is_some_and(|e| e == "gguf") {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    Ok(dir.join("model.gguf"))
}

/// Writes `output`'s GGUF layers of `m` to `dst`: a `.gguf` source is
/// copied with the solved layers replaced (its metadata and other tensors
/// as they are); a Hugging Face directory gives derived metadata, its
/// tokenizer and the other tensors in f32.
pub(crate) fn save(
    m: &LlamaModel,
    output: &PipelineOutput,
    source: &Path,
    dst: &Path,
) -> Result<()> {
    if source.extension().is_some_and(|e| e == "gguf") {
        let mut solved = HashMap::new();
        for ((b, layer), sol) in &output.gguf {
            let hf = format!("{}.{layer}.weight", m.block_name(*b));
            let name = gguf_name(&hf).ok_or_else(|| Error::MissingTensor { name: hf.clone() })?;
            solved.insert(name, sol.clone());
        }
        return requantize_gguf(source, dst, &solved);
    }
    write_gguf_llama(m, &output.gguf, Some(source), GgmlDType::F32, dst)
}
