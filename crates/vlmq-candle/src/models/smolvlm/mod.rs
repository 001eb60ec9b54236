//! SmolVLM (Idefics3 layout): a SigLIP vision tower, the pixel-shuffle
//! connector and a Llama language model, as transformers'
//! `SmolVLMForConditionalGeneration` computes them.

pub(crate) mod config;
#[cfg(test)]
mod grad_tests;
pub(crate) mod model;

pub use config::SmolVlmConfig;
pub use model::{SmolVlmModel, SmolVlmNaming};
