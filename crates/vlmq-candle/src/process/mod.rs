//! Turning user inputs into model inputs: tokenizers, LLaVA prompts and
//! CLIP and Qwen2-VL image preprocessing.

pub mod calibration;
pub mod image_input;
pub(crate) mod llava_prompt;
pub mod qwen2_vl_image;
pub(crate) mod tokenizer;
