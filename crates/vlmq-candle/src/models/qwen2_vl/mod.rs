//! Qwen2-VL and Qwen2.5-VL: a ViT with 2-D rotary attention over native
//! resolution patches, a 2x2 patch merger, and a Qwen2 decoder with
//! multimodal RoPE. Qwen2.5-VL differs in the tower only: RMSNorm, SwiGLU
//! MLP with biases, and windowed attention outside `fullatt_block_indexes`.

mod config;
mod grid;
mod model;
mod mrope;
mod sample;
pub(crate) mod vision;
pub(crate) mod vision_block;

pub use config::{Qwen2VlConfig, QwenVisionConfig, QwenVlVariant};
pub use grid::{image_cu_seqlens, vision_position_ids, window_index, ImageGrid};
pub use model::Qwen2VlModel;
pub use mrope::{rope_delta, MropePositions};
pub use sample::QwenVlSample;
pub use vision::{
    Merger, QwenVisionWeights, VisionBlock, VisionNorm, MERGER_LINEARS, QWEN2_5_VL_BLOCK_LINEARS,
    QWEN2_VL_BLOCK_LINEARS,
};

#[cfg(test)]
mod grad_tests;
