//! Qwen2-VL / Qwen2.5-VL calibration samples: conversations through the
//! model's chat template and its image processor
//! ([`qwen_conversation_sample`]: answer-only targets); plain text and text
//! records become text-only samples with every token a target.

use vlmq::{Error, Result};

use super::samples::{draw, text_samples, Inputs};
use crate::models::qwen2_vl::{Qwen2VlModel, QwenVlSample};
use crate::process::calibration::Calibration;
use crate::process::qwen2_vl_image::Qwen2VlImageConfig;
use crate::process::qwen2_vl_prompt::{qwen_conversation_sample, QwenPromptContext};

/// The samples of `src` for `model`, drawn per the recipe.
pub(super) fn qwen_samples(
    model: &Qwen2VlModel,
    images: &Qwen2VlImageConfig,
    src: &Inputs<'_>,
    mut tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<QwenVlSample>> {
    let r = src.recipe;
    let convs = match src.data {
        Calibration::Conversations(convs) => convs,
        Calibration::Records(recs) => {
            if let Some(i) = recs.iter().position(|rec| !rec.images.is_empty()) {
                return Err(Error::field(
                    src.origin,
                    format!("record {}: images", i + 1),
                    "a Qwen2-VL model takes images in conversations ({\"messages\": [...]})",
                ));
            }
            let texts = text_samples(src, tick)?;
            return Ok(texts
                .into_iter()
                .map(|t| QwenVlSample::causal(t, None, Vec::new()))
                .collect());
        }
        Calibration::Text(_) => {
            let texts = text_samples(src, tick)?;
            return Ok(texts
                .into_iter()
                .map(|t| QwenVlSample::causal(t, None, Vec::new()))
                .collect());
        }
    };
    let ctx = QwenPromptContext {
        tokenizer: src.tk,
        template: src.template()?,
        images,
        image_token_id: model.config().image_token_id,
        dtype: model.dtype(),
        device: model.device(),
    };
    let pick = draw(
        convs.len(),
        r.samples(),
        r.seed(),
        src.origin,
        "conversations",
    )?;
    let mut out = Vec::with_capacity(pick.len());
    for (k, &i) in pick.iter().enumerate() {
        let c = &convs[i];
        let s = qwen_conversation_sample(&ctx, c)?;
        model
            .check_sample(&s)
            .map_err(|e| c.invalid("messages", e))?;
        out.push(s);
        tick(k + 1, pick.len())?;
    }
    Ok(out)
}
