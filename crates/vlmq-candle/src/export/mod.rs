//! Writing quantized models: GPTQ checkpoints in the model's own HF layout
//! ([`write_gptq`], [`load_gptq_into`] for the Llama family; [`llava`] for
//! the LLaVA layout; [`ShardedGptqWriter`] block by block during a run),
//! and GGUF files whose weights were solved onto llama.cpp's block types
//! ([`gguf`]).

pub mod gguf;
mod llama;
pub mod llava;
mod sharded;

pub use llama::{load_gptq_into, write_gptq};
pub(crate) use llama::{read_checkpoint, write_checkpoint};
pub use sharded::ShardedGptqWriter;
