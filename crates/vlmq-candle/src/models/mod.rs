//! What the networks compute, one architecture per file or folder: the
//! Llama-family decoder, the CLIP vision tower and LLaVA.

pub(crate) mod clip;
pub(crate) mod llama;
pub(crate) mod llava;
pub(crate) mod qwen2_vl;
