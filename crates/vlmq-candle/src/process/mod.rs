//! Turning user inputs into model inputs: tokenizers, LLaVA prompts, CLIP,
//! Qwen2-VL and SmolVLM image preprocessing, PIL-exact resampling,
//! calibration conversations and chat templates (from a model directory or a
//! GGUF file), and conversations to Qwen2-VL and SmolVLM samples.

pub mod calibration;
pub mod chat_template;
mod chat_template_gguf;
pub mod conversation;
pub(crate) mod conversation_prompt;
pub mod image_input;
pub(crate) mod llava_prompt;
// PIL's resampling, reached by the tests that compare it with PIL's output.
#[doc(hidden)]
pub mod pil_resize;
pub mod qwen2_vl_image;
pub mod qwen2_vl_prompt;
pub mod smolvlm_image;
pub mod smolvlm_prompt;
pub(crate) mod tokenizer;
