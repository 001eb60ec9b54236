//! A [candle](https://github.com/huggingface/candle) backend for `vlmq`:
//! Llama-family decoders (Llama, SmolLM2, Qwen2) and LLaVA-style
//! vision-language models, loaded from Hugging Face
//! directories or llama.cpp GGUF files, run with candle on the CPU (or CUDA
//! with the `cuda` feature), implementing [`vlmq::QuantizableModel`] so the
//! GPTQ / GPTAQ / VLMQ pipeline can quantize real checkpoints.
//!
//! - [`load_model`] (either format), [`load_hf_dir`] / [`load_gguf`] give a
//!   [`LlamaModel`];
//! - [`load_llava_dir`] gives a [`LlavaModel`] (CLIP vision tower, projector,
//!   Llama-family LM), quantizable with [`VlmSample`]s; [`process::image_input`]
//!   turns PNG/JPEG files into CLIP `pixel_values`; [`export::llava`] writes
//!   its GPTQ checkpoint in the LLaVA layout;
//! - [`load_qwen2_vl_dir`] gives a [`Qwen2VlModel`] (Qwen2-VL and Qwen2.5-VL:
//!   native-resolution ViT with 2-D rotary attention, patch merger, Qwen2
//!   decoder with multimodal RoPE);
//! - [`load_smolvlm_dir`] gives a [`SmolVlmModel`] (SmolVLM / Idefics3:
//!   SigLIP tower, pixel-shuffle connector, Llama decoder);
//!   [`process::smolvlm_image`] is its image processor;
//! - [`tokenizer_from_file`] / [`tokenizer_from_gguf`] give a tokenizer;
//! - [`QuantizedLlama`] runs a Llama GGUF file through candle's quantized
//!   matmul (`QMatMul`), as candle's own quantized Llama does;
//! - [`eval`] measures perplexity and KL divergence from a reference model;
//! - [`export`] writes a GPTQ checkpoint in the model's own HF layout;
//!
//! Errors are [`vlmq::Error`] values (candle failures become
//! [`vlmq::Error::Backend`] or [`vlmq::Error::CorruptCheckpoint`]).

mod backend;
mod error;
pub mod eval;
pub mod export;
mod load;
mod models;
pub mod process;
mod quantizer;
mod random;
pub mod recipe;
mod threads;
#[cfg(test)]
mod toy;

pub use backend::llama::TextSample;
pub use load::checkpoint::{is_gptq_dir, load_gptq_dir};
pub use load::gguf::{config_from_gguf, load_gguf, load_gguf_with, read_gguf_content};
pub use load::hf::{load_hf_dir, load_hf_dir_with, safetensors_files, save_hf_dir};
pub use load::llava::load_llava_dir;
pub use load::options::{device_from_name, dtype_from_name, LoadOptions, Residency};
pub use load::qwen2_vl::{load_qwen2_vl_dir, QwenVlNaming};
pub use load::smolvlm::load_smolvlm_dir;
pub use load::{load_model, load_model_with};
pub use models::clip::{
    ClipLayerWeights, ClipVisionConfig, LayerNorm, VisionWeights, VISION_LINEAR_NAMES,
};
pub use models::idefics3::{Connector, CONNECTOR_LINEAR_NAMES};
pub use models::llama::config::{Architecture, LlamaConfig};
pub use models::llama::model::LlamaModel;
pub use models::llama::weights::{LayerWeights, Linear, ModelWeights, LINEAR_NAMES};
pub use models::llava::model::{
    LlavaConfig, LlavaModel, LlavaNaming, Projector, PROJECTOR_LINEAR_NAMES,
};
pub use models::llava::sample::{VlmHidden, VlmSample};
pub use models::quantized_llama::{GgufKernel, QuantizedLlama};
pub use models::qwen2_vl::{
    ImageGrid, Merger, MropePositions, Qwen2VlConfig, Qwen2VlModel, QwenVisionConfig,
    QwenVisionWeights, QwenVlSample, QwenVlVariant, VisionBlock, VisionNorm, MERGER_LINEARS,
    QWEN2_5_VL_BLOCK_LINEARS, QWEN2_VL_BLOCK_LINEARS,
};
// Qwen2-VL's position and window bookkeeping, reached by the tests that
// compare it with transformers' values.
#[doc(hidden)]
pub use models::qwen2_vl::{image_cu_seqlens, rope_delta, vision_position_ids, window_index};
pub use models::siglip::{SiglipVisionConfig, SiglipWeights};
pub use models::smolvlm::{SmolVlmConfig, SmolVlmModel, SmolVlmNaming};
pub use process::calibration::{Calibration, CalibrationRecord};
pub use process::llava_prompt::IMAGE_MARKER;
pub use process::tokenizer::{encode, tokenizer_from_file, tokenizer_from_gguf, tokenizers};
pub use quantizer::{Event, LoadedModel, Quantized, Quantizer, Stage};
pub use random::random_model;
pub use recipe::{CheckedRecipe, OutputFormat, Recipe};
pub use threads::prefer_sample_parallelism;

pub use candle_core;
