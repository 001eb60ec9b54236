//! A [candle](https://github.com/huggingface/candle) backend for `vlmq`:
//! Llama-family decoders (Llama, SmolLM2, Qwen2) loaded from Hugging Face
//! directories or llama.cpp GGUF files, run with candle on the CPU (or CUDA
//! with the `cuda` feature), implementing [`vlmq::QuantizableModel`] so the
//! GPTQ / GPTAQ / VLMQ pipeline can quantize real checkpoints.
//!
//! - [`load_model`] (either format), [`load_hf_dir`] / [`load_gguf`] give a
//!   [`LlamaModel`];
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
mod load;
mod load_gguf;
mod load_hf;
mod model;
pub mod needle;
mod random;
mod tokenizer;
mod weights;

pub use backend::TextSample;
pub use config::{Architecture, LlamaConfig};
pub use load::load_model;
pub use load_gguf::{config_from_gguf, hf_name, load_gguf, permute_qk, read_gguf_content};
pub use load_hf::{load_hf_dir, safetensors_files, save_hf_dir};
pub use model::LlamaModel;
pub use random::random_model;
pub use tokenizer::{encode, tokenizer_from_file, tokenizer_from_gguf, tokenizers};
pub use weights::{LayerWeights, Linear, ModelWeights, LINEAR_NAMES};

pub use candle_core;

#[cfg(test)]
mod grad_tests;
