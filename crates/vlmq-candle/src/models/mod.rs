//! What the networks compute, one architecture per file or folder: the
//! Llama-family decoder, the CLIP and SigLIP vision towers, LLaVA,
//! Qwen2-VL, SmolVLM with its Idefics3 connector, and a Llama run from a
//! GGUF file through candle's quantized matmul.

pub(crate) mod attention;
pub(crate) mod clip;
pub(crate) mod idefics3;
pub(crate) mod llama;
pub(crate) mod llava;
pub(crate) mod quantized_llama;
pub(crate) mod qwen2_vl;
pub(crate) mod siglip;
pub(crate) mod sizes;
pub(crate) mod smolvlm;
pub(crate) mod softmax;
pub(crate) mod vision_ops;
pub(crate) mod vit_encoder;
