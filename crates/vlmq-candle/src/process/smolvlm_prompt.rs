//! One calibration conversation to one SmolVLM sample, as transformers'
//! `SmolVLMProcessor` and the model's chat template make it (steps 1 and 3
//! are shared with Qwen2-VL's prompts):
//! 1. the messages are rendered with the chat template (each image part
//!    becomes `<image>`);
//! 2. each image is decoded and cut into frames (crops plus the global
//!    frame, [`SmolVlmImageProcessor::frames`]) and its `<image>` replaced by
//!    the processor's expansion ([`SmolVlmImageProcessor::image_prompt`]:
//!    `<fake_token_around_image>`, `<row_r_col_c>` / `<global-img>` and
//!    `image_seq_len` `<image>` tokens per frame);
//! 3. the text is tokenized as the processor does (special tokens added as
//!    the tokenizer's post-processor says); tokens are tagged vision
//!    (`<image>`), answer (inside an assistant message's content) or text,
//!    and the answer tokens are the sample's targets (VLMQ's answer-only
//!    task loss); a conversation without an assistant message targets its
//!    text tokens instead.
//!
//! The sample's pixels are the real frames `[N, 3, side, side]` in
//! `<image>` order (no padding frames: a sample is one conversation).
//! Every problem names the conversation's file, line and field.

use candle_core::{DType, Device, Tensor};
use vlmq::Result;

use crate::models::llava::sample::VlmSample;
use crate::process::chat_template::ChatTemplate;
use crate::process::conversation::Conversation;
use crate::process::conversation_prompt::{conversation_tokens, PromptSpelling};
use crate::process::smolvlm_image::SmolVlmImageProcessor;

/// The image placeholder of SmolVLM's chat template and processor.
pub const SMOLVLM_IMAGE_TOKEN: &str = "<image>";

/// What turning a conversation into a sample needs from the model.
#[derive(Debug, Clone, Copy)]
pub struct SmolVlmPromptContext<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Its chat template.
    pub template: &'a ChatTemplate,
    /// The image processor.
    pub images: &'a SmolVlmImageProcessor,
    /// The id of [`SMOLVLM_IMAGE_TOKEN`].
    pub image_token_id: u32,
    /// Pixel values are made in this dtype on this device.
    pub dtype: DType,
    /// The device.
    pub device: &'a Device,
}

/// The sample of one conversation (see the module doc).
pub fn smolvlm_conversation_sample(
    ctx: &SmolVlmPromptContext<'_>,
    conv: &Conversation,
) -> Result<VlmSample> {
    let spell = PromptSpelling {
        tokenizer: ctx.tokenizer,
        template: ctx.template,
        placeholder: SMOLVLM_IMAGE_TOKEN,
        image_token_id: ctx.image_token_id,
        add_special_tokens: true,
    };
    let mut values = Vec::new();
    let mut frames = 0;
    let tokens = conversation_tokens(&spell, conv, |img| {
        let f = ctx.images.frames(img)?;
        for frame in &f.frames {
            values.extend(ctx.images.normalize(frame));
        }
        frames += f.frames.len();
        Ok(ctx.images.image_prompt(f.rows, f.cols))
    })?;
    let pixels = if frames == 0 {
        None
    } else {
        let side = ctx.images.frame_side;
        let t = Tensor::from_vec(values, (frames, 3, side, side), ctx.device)
            .and_then(|t| t.to_dtype(ctx.dtype))
            .map_err(|e| conv.invalid("messages", e))?;
        Some(t)
    };
    VlmSample::answer_only(tokens.ids, &tokens.roles, pixels)
}
