//! One entry point for a model and its tokenizer, whatever the format.

pub(crate) mod checkpoint;
pub(crate) mod disk;
pub(crate) mod gguf;
pub(crate) mod gguf_check;
pub(crate) mod gguf_source;
pub(crate) mod hf;
pub(crate) mod llava;
pub(crate) mod options;
pub(crate) mod progress;
pub(crate) mod qwen2_vl;
pub(crate) mod smolvlm;

use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;
use vlmq::Result;

use crate::load::gguf::{load_gguf_counted, read_gguf_content};
use crate::load::hf::load_hf_dir_counted;
use crate::load::options::LoadOptions;
use crate::load::progress::{ignore, LoadTick};
use crate::models::llama::model::LlamaModel;
use crate::process::tokenizer::{tokenizer_from_file, tokenizer_from_gguf};

/// Loads a model and its tokenizer from `path`: a `.gguf` file (weights
/// dequantized, tokenizer from its metadata) or a Hugging Face directory
/// (`config.json`, safetensors, `tokenizer.json`).
pub fn load_model(
    path: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaModel, Tokenizer)> {
    let opts = LoadOptions::default()
        .with_dtype(dtype)
        .with_device(device.clone());
    load_model_with(path, &opts)
}

/// [`load_model`] with every loader setting: device, compute dtype and
/// where the decoder layers live ([`Residency`](crate::Residency)).
pub fn load_model_with(
    path: impl AsRef<Path>,
    opts: &LoadOptions,
) -> Result<(LlamaModel, Tokenizer)> {
    load_model_counted(path.as_ref(), opts, &mut ignore)
}

/// [`load_model_with`], each tensor read reported to `tick`.
pub(crate) fn load_model_counted(
    path: &Path,
    opts: &LoadOptions,
    tick: LoadTick<'_>,
) -> Result<(LlamaModel, Tokenizer)> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let content = read_gguf_content(path)?;
        Ok((
            load_gguf_counted(path, opts, tick)?,
            tokenizer_from_gguf(&content, path)?,
        ))
    } else {
        Ok((
            load_hf_dir_counted(path, opts, tick)?,
            tokenizer_from_file(path.join("tokenizer.json"))?,
        ))
    }
}
