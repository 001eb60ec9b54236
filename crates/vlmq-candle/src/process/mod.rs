//! Turning user inputs into model inputs: tokenizers, LLaVA prompts, CLIP
//! and Qwen2-VL image preprocessing, PIL-exact resampling, calibration
//! conversations and chat templates.

pub mod calibration;
pub mod chat_template;
pub mod conversation;
pub mod image_input;
pub(crate) mod llava_prompt;
pub mod pil_resize;
pub mod qwen2_vl_image;
pub mod qwen2_vl_prompt;
pub mod smolvlm_image;
pub(crate) mod tokenizer;
