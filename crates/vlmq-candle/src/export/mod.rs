//! Writing quantized models: GPTQ checkpoints in the model's own HF layout
//! ([`write_gptq`], [`load_gptq_into`] for the Llama family; [`llava`] for
//! the LLaVA layout; [`qwen2_vl`] for Qwen2-VL; [`smolvlm`] for SmolVLM; [`ShardedGptqWriter`] block by block during a run),
//! and GGUF files whose weights were solved onto llama.cpp's block types
//! ([`gguf`]; a whole Llama-family model: [`write_gguf_llama`]).

mod dense_parts;
pub mod gguf;
mod gguf_llama;
mod gguf_tokenizer;
mod llama;
pub mod llava;
pub mod qwen2_vl;
mod sharded;
pub mod smolvlm;

pub use gguf_llama::{gguf_name, write_gguf_llama};
pub(crate) use llama::{
    ignore_writes, read_checkpoint, write_checkpoint, write_checkpoint_styled, write_gptq_counted,
    DenseStyle, WriteTick,
};
pub use llama::{load_gptq_into, write_gptq};
pub use sharded::ShardedGptqWriter;
