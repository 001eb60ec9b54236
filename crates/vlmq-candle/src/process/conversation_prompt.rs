//! The steps every vision-language family takes to turn one calibration
//! conversation into token ids with roles (the family supplies only what an
//! image becomes):
//! 1. the messages are rendered with the model's chat template, which
//!    writes one placeholder (`<image>`, `<|image_pad|>`, ...) per image part;
//! 2. each image is decoded and handed to the family's processor, which
//!    keeps its pixels and returns the text that replaces its placeholder
//!    (the image-token expansion);
//! 3. the expanded text is tokenized; tokens are tagged vision (the image
//!    token), answer (inside an assistant message's content) or text; a
//!    conversation without an assistant message tags its text as answer,
//!    so its targets are the text tokens (as for plain text calibration).
//!
//! Every problem names the conversation's file, line and field.

use image::RgbImage;
use tokenizers::Tokenizer;
use vlmq::Result;

use crate::process::chat_template::{ChatTemplate, TokenRole};
use crate::process::conversation::Conversation;
use crate::process::image_input::load_image;

/// How a family spells its prompts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PromptSpelling<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Its chat template.
    pub template: &'a ChatTemplate,
    /// What the template writes for one image part.
    pub placeholder: &'a str,
    /// The id of the image token the expansion repeats.
    pub image_token_id: u32,
    /// Whether the tokenizer adds its special tokens (as the family's
    /// processor calls it).
    pub add_special_tokens: bool,
}

/// A conversation's token ids and one role per token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PromptTokens {
    /// Token ids after the image-token expansion.
    pub ids: Vec<u32>,
    /// One role per id.
    pub roles: Vec<TokenRole>,
}

/// The tokens of `conv` (see the module doc); `image` is called once per
/// image in order and returns the text that replaces its placeholder.
pub(crate) fn conversation_tokens(
    spell: &PromptSpelling<'_>,
    conv: &Conversation,
    mut image: impl FnMut(&RgbImage) -> Result<String>,
) -> Result<PromptTokens> {
    let rendered = spell
        .template
        .render_with_spans(&conv.messages)
        .map_err(|e| conv.invalid("messages", e))?;
    let mut reps = Vec::new();
    for (n, path) in conv.images().into_iter().enumerate() {
        let text = load_image(path)
            .and_then(|img| image(&img))
            .map_err(|e| conv.invalid(&conv.image_field(n), e))?;
        reps.push(text);
    }
    let expanded = rendered
        .expand(spell.placeholder, &reps)
        .map_err(|e| conv.invalid("messages", e))?;
    let enc = spell
        .tokenizer
        .encode(expanded.text.as_str(), spell.add_special_tokens)
        .map_err(|e| conv.invalid("messages", format!("tokenizer: {e}")))?;
    let ids = enc.get_ids().to_vec();
    if ids.len() < 2 {
        return Err(conv.invalid("messages", "gives fewer than 2 tokens"));
    }
    let mut roles = expanded.token_roles(&ids, enc.get_offsets(), spell.image_token_id);
    if !roles.contains(&TokenRole::Answer) {
        for r in roles.iter_mut().filter(|r| **r == TokenRole::Text) {
            *r = TokenRole::Answer;
        }
    }
    Ok(PromptTokens { ids, roles })
}
