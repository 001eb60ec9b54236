//! What `vlmq` needs from each model: [`vlmq::QuantizableModel`] (capture,
//! weights) and [`vlmq::GradientModel`] (the task loss and the block
//! backward) for the Llama-family decoder, LLaVA, Qwen2-VL and SmolVLM.

pub(crate) mod activation;
pub(crate) mod chain_rule;
pub(crate) mod fused;
#[cfg(test)]
mod grad_tests;
pub(crate) mod linear_op;
pub(crate) mod llama;
pub(crate) mod llama_backward;
pub(crate) mod llava;
pub(crate) mod llava_grad;
pub(crate) mod llava_stages;
pub(crate) mod qwen2_vl;
pub(crate) mod qwen2_vl_grad;
pub(crate) mod qwen_vision_backward;
pub(crate) mod row_add;
pub(crate) mod smolvlm;
pub(crate) mod smolvlm_grad;
pub(crate) mod text_stage;
#[cfg(test)]
mod vision_grad_tests;
pub(crate) mod vit_backward;
pub(crate) mod wide;
