//! One calibration conversation to one Qwen2-VL sample, as transformers'
//! `Qwen2VLProcessor` and the model's chat template make it (steps 1 and
//! 3 are shared with SmolVLM's prompts):
//! 1. the messages are rendered with the chat template (each image part
//!    becomes `<|vision_start|><|image_pad|><|vision_end|>`);
//! 2. each image is decoded, resized and cut into patches
//!    ([`process_image`]) and its `<|image_pad|>` repeated once per merged
//!    patch;
//! 3. the text is tokenized; tokens are tagged vision (image tokens),
//!    answer (inside an assistant message's content) or text, and the
//!    answer tokens are the sample's targets (VLMQ's answer-only task
//!    loss); a conversation without an assistant message targets its text
//!    tokens instead.
//!
//! Every problem names the conversation's file, line and field.

use candle_core::{DType, Device, Tensor};
use vlmq::Result;

use crate::models::qwen2_vl::{ImageGrid, QwenVlSample};
use crate::process::chat_template::ChatTemplate;
use crate::process::conversation::Conversation;
use crate::process::conversation_prompt::{conversation_tokens, PromptSpelling};
use crate::process::qwen2_vl_image::{process_image, Qwen2VlImageConfig};

/// The image placeholder of Qwen2-VL's chat template and processor.
pub const QWEN_IMAGE_TOKEN: &str = "<|image_pad|>";

/// What turning a conversation into a sample needs from the model.
#[derive(Debug, Clone, Copy)]
pub struct QwenPromptContext<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Its chat template.
    pub template: &'a ChatTemplate,
    /// The image processor's settings.
    pub images: &'a Qwen2VlImageConfig,
    /// The id of [`QWEN_IMAGE_TOKEN`].
    pub image_token_id: u32,
    /// Pixel values are made in this dtype on this device.
    pub dtype: DType,
    /// The device.
    pub device: &'a Device,
}

/// The sample of one conversation (see the module doc).
pub fn qwen_conversation_sample(
    ctx: &QwenPromptContext<'_>,
    conv: &Conversation,
) -> Result<QwenVlSample> {
    let spell = PromptSpelling {
        tokenizer: ctx.tokenizer,
        template: ctx.template,
        placeholder: QWEN_IMAGE_TOKEN,
        image_token_id: ctx.image_token_id,
        add_special_tokens: false,
    };
    let mut values = Vec::new();
    let mut grids: Vec<ImageGrid> = Vec::new();
    let tokens = conversation_tokens(&spell, conv, |img| {
        let (v, g) = process_image(img, ctx.images)?;
        values.extend(v);
        grids.push(g);
        Ok(QWEN_IMAGE_TOKEN.repeat(g.tokens(ctx.images.merge_size)))
    })?;
    let pixels = if grids.is_empty() {
        None
    } else {
        let rows = values.len() / ctx.images.patch_values();
        let t = Tensor::from_vec(values, (rows, ctx.images.patch_values()), ctx.device)
            .and_then(|t| t.to_dtype(ctx.dtype))
            .map_err(|e| conv.invalid("messages", e))?;
        Some(t)
    };
    QwenVlSample::answer_only(tokens.ids, &tokens.roles, pixels, grids)
}
