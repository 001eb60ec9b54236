//! Turning user inputs into model inputs: tokenizers, LLaVA prompts and
//! CLIP image preprocessing.

pub mod calibration;
pub mod image_input;
pub(crate) mod llava_prompt;
pub(crate) mod tokenizer;
