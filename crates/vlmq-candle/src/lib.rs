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
//!   Llama-family LM), quantizable with [`VlmSample`]s; [`image_input`]
//!   turns PNG/JPEG files into CLIP `pixel_values`; [`llava_export`] writes
//!   its GPTQ checkpoint in the LLaVA layout;
//! - [`tokenizer_from_file`] / [`tokenizer_from_gguf`] give a tokenizer;
//! - [`eval`] measures perplexity and KL divergence from a reference model;
//! - [`export`] writes a GPTQ checkpoint in the model's own HF layout;
//! - [`needle`] builds the long-context retrieval task used to test VLMQ on
//!   real text-only weights.
//!
//! Errors are [`vlmq::Error`] values (candle failures become
//! [`vlmq::Error::Backend`] or [`vlmq::Error::CorruptCheckpoint`]).

mod backend;
mod config;
mod error;
pub mod eval;
pub mod export;
mod forward;
pub mod image_input;
mod layer_backward;
mod linear_op;
mod llava;
mod llava_backend;
pub mod llava_export;
mod llava_grad;
mod llava_prompt;
mod llava_sample;
mod load;
mod load_gguf;
mod load_hf;
mod load_llava;
mod model;
pub mod needle;
mod random;
mod tokenizer;
pub mod toy;
mod vision;
mod weights;

pub use backend::TextSample;
pub use config::{Architecture, LlamaConfig};
pub use llava::{LlavaConfig, LlavaModel, LlavaNaming, Projector, PROJECTOR_LINEAR_NAMES};
pub use llava_prompt::IMAGE_MARKER;
pub use llava_sample::{VlmHidden, VlmSample};
pub use load::load_model;
pub use load_gguf::{config_from_gguf, hf_name, load_gguf, permute_qk, read_gguf_content};
pub use load_hf::{load_hf_dir, safetensors_files, save_hf_dir};
pub use load_llava::load_llava_dir;
pub use model::LlamaModel;
pub use random::random_model;
pub use tokenizer::{encode, tokenizer_from_file, tokenizer_from_gguf, tokenizers};
pub use vision::{
    ClipLayerWeights, ClipVisionConfig, LayerNorm, VisionWeights, VISION_LINEAR_NAMES,
};
pub use weights::{LayerWeights, Linear, ModelWeights, LINEAR_NAMES};

pub use candle_core;

#[cfg(test)]
mod grad_tests;
