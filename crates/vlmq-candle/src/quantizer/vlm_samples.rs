//! Calibration samples of the families whose conversations go through a
//! prompt builder of `process` (Qwen2-VL / Qwen2.5-VL, SmolVLM): the drawn
//! conversations through the model's chat template and image processor
//! (answer-only targets); plain text and text records become text-only
//! samples with every token a target; records with images are refused
//! (these families take images in conversations).

use vlmq::{Error, Result};

use super::samples::{draw, text_samples, Inputs};
use crate::models::llava::sample::VlmSample;
use crate::models::qwen2_vl::{Qwen2VlModel, QwenVlSample};
use crate::models::smolvlm::SmolVlmModel;
use crate::process::calibration::Calibration;
use crate::process::chat_template::ChatTemplate;
use crate::process::conversation::Conversation;
use crate::process::qwen2_vl_image::Qwen2VlImageConfig;
use crate::process::qwen2_vl_prompt::{qwen_conversation_sample, QwenPromptContext};
use crate::process::smolvlm_image::SmolVlmImageProcessor;
use crate::process::smolvlm_prompt::{smolvlm_conversation_sample, SmolVlmPromptContext};

/// The samples of `src` for a family named `family`: `text` makes a
/// text-only sample of token ids, `conversation` a checked sample of one
/// conversation rendered with the model's chat template.
fn family_samples<S>(
    src: &Inputs<'_>,
    family: &str,
    text: impl Fn(Vec<u32>) -> S,
    mut conversation: impl FnMut(&ChatTemplate, &Conversation) -> Result<S>,
    mut tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<S>> {
    let r = src.recipe;
    let convs = match src.data {
        Calibration::Conversations(convs) => convs,
        Calibration::Records(recs) => {
            if let Some(i) = recs.iter().position(|rec| !rec.images.is_empty()) {
                return Err(Error::field(
                    src.origin,
                    format!("record {}: images", i + 1),
                    format!(
                        "a {family} model takes images in conversations ({{\"messages\": [...]}})"
                    ),
                ));
            }
            return Ok(text_samples(src, tick)?.into_iter().map(text).collect());
        }
        Calibration::Text(_) | Calibration::Tokens(_) => {
            return Ok(text_samples(src, tick)?.into_iter().map(text).collect());
        }
    };
    let template = src.template()?;
    let pick = draw(
        convs.len(),
        r.samples(),
        r.seed(),
        src.origin,
        "conversations",
    )?;
    let mut out = Vec::with_capacity(pick.len());
    for (k, &i) in pick.iter().enumerate() {
        out.push(conversation(template, &convs[i])?);
        tick(k + 1, pick.len())?;
    }
    Ok(out)
}

/// The Qwen2-VL samples of `src`, drawn per the recipe.
pub(super) fn qwen_samples(
    model: &Qwen2VlModel,
    images: &Qwen2VlImageConfig,
    src: &Inputs<'_>,
    tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<QwenVlSample>> {
    let text = |t| QwenVlSample::causal(t, None, Vec::new());
    family_samples(
        src,
        "Qwen2-VL",
        text,
        |template, c| {
            let ctx = QwenPromptContext {
                tokenizer: src.tk,
                template,
                images,
                image_token_id: model.config().image_token_id,
                dtype: model.dtype(),
                device: model.device(),
            };
            let s = qwen_conversation_sample(&ctx, c)?;
            model
                .check_sample(&s)
                .map_err(|e| c.invalid("messages", e))?;
            Ok(s)
        },
        tick,
    )
}

/// The SmolVLM samples of `src`, drawn per the recipe.
pub(super) fn smolvlm_samples(
    model: &SmolVlmModel,
    images: &SmolVlmImageProcessor,
    src: &Inputs<'_>,
    tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<VlmSample>> {
    let text = |t| VlmSample::causal(t, None);
    family_samples(
        src,
        "SmolVLM",
        text,
        |template, c| {
            let ctx = SmolVlmPromptContext {
                tokenizer: src.tk,
                template,
                images,
                image_token_id: model.config().image_token_id,
                dtype: model.dtype(),
                device: model.device(),
            };
            let s = smolvlm_conversation_sample(&ctx, c)?;
            model
                .check_sample(&s)
                .map_err(|e| c.invalid("messages", e))?;
            Ok(s)
        },
        tick,
    )
}
