//! Turning [`Calibration`] data into the samples of each model family.
//!
//! A vision-language family joins with one `*_samples` function here:
//! text records and conversations drawn as [`draw`] does, conversations
//! rendered by the model's chat template ([`Inputs::template`]) and their
//! images, in [`Conversation::images`] order, through the family's image
//! processor (as [`llava_samples`] does with CLIP's).

use std::path::Path;

use tokenizers::Tokenizer;
use vlmq::{Error, Result};

use crate::eval::windows;
use crate::models::llava::sample::VlmSample;
use crate::process::calibration::{Calibration, CalibrationRecord};
use crate::process::chat_template::ChatTemplate;
use crate::process::conversation::Conversation;
use crate::process::image_input::{load_image, ClipImageProcessor};
use crate::process::tokenizer::encode;
use crate::recipe::CheckedRecipe;
use crate::{LlavaModel, IMAGE_MARKER};

/// `want` of `0..n` drawn by [`vlmq::sample_indices`] (in increasing
/// order); fewer than `want` is an error naming `origin` and `samples`.
pub(super) fn draw(
    n: usize,
    want: usize,
    seed: u64,
    origin: &Path,
    unit: &str,
) -> Result<Vec<usize>> {
    if n < want {
        return Err(Error::field(
            origin,
            "samples",
            format!(
                "the calibration data gives {n} {unit}, fewer than the {want} samples asked for"
            ),
        ));
    }
    Ok(vlmq::sample_indices(n, want, seed))
}

/// What every family's sample builder reads.
pub(super) struct Inputs<'a> {
    /// The model's tokenizer.
    pub tk: &'a Tokenizer,
    /// The calibration data.
    pub data: &'a Calibration,
    /// Where the data came from (named in errors).
    pub origin: &'a Path,
    /// The run's recipe (sample count, sequence length, seed).
    pub recipe: &'a CheckedRecipe,
    /// The model's chat template, loaded when the data are conversations.
    pub template: Option<&'a ChatTemplate>,
}

impl Inputs<'_> {
    /// The chat template, or an error naming the origin when the model has
    /// none (only asked for conversations).
    pub(super) fn template(&self) -> Result<&ChatTemplate> {
        self.template.ok_or_else(|| {
            Error::field(
                self.origin,
                "messages",
                "conversations need the model's chat template, and it has none",
            )
        })
    }
}

/// `text`'s tokens cut to `seq_len`; fewer than 2 tokens is `short()`.
fn tokens(
    tk: &Tokenizer,
    text: &str,
    seq_len: usize,
    short: impl Fn() -> Error,
) -> Result<Vec<u32>> {
    let mut t = encode(tk, text)?;
    t.truncate(seq_len);
    if t.len() < 2 {
        return Err(short());
    }
    Ok(t)
}

/// The token windows (text), token sequences (records, token samples) or
/// rendered conversations of the data, drawn per the recipe; images are refused
/// (text-only model).
pub(super) fn text_samples(
    src: &Inputs<'_>,
    mut tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let (r, origin) = (src.recipe, src.origin);
    let no_vision = "this model has no vision tower";
    match src.data {
        Calibration::Text(text) => {
            let all = windows(&encode(src.tk, text)?, r.seq_len());
            let unit = format!("windows of {} tokens", r.seq_len());
            let pick = draw(all.len(), r.samples(), r.seed(), origin, &unit)?;
            tick(pick.len(), pick.len())?;
            Ok(pick.into_iter().map(|i| all[i].clone()).collect())
        }
        Calibration::Records(recs) => {
            let pick = draw(recs.len(), r.samples(), r.seed(), origin, "records")?;
            let mut out = Vec::with_capacity(pick.len());
            for (k, &i) in pick.iter().enumerate() {
                let at = |key: &str| format!("record {}: {key}", i + 1);
                if !recs[i].images.is_empty() {
                    return Err(Error::field(origin, at("images"), no_vision));
                }
                out.push(tokens(src.tk, &recs[i].text, r.seq_len(), || {
                    Error::field(origin, at("text"), "gives fewer than 2 tokens")
                })?);
                tick(k + 1, pick.len())?;
            }
            Ok(out)
        }
        Calibration::Tokens(rows) => {
            let pick = draw(rows.len(), r.samples(), r.seed(), origin, "token samples")?;
            let mut out = Vec::with_capacity(pick.len());
            for (k, &i) in pick.iter().enumerate() {
                let row = &rows[i];
                let at = format!("sample {}", i + 1);
                if row.len() < 2 {
                    return Err(Error::field(origin, at, "has fewer than 2 tokens"));
                }
                let vocab = src.tk.get_vocab_size(true);
                if let Some(id) = row.iter().find(|&&id| id as usize >= vocab) {
                    return Err(Error::field(
                        origin,
                        at,
                        format!("token id {id} is not one of the tokenizer's {vocab}"),
                    ));
                }
                out.push(row[..row.len().min(r.seq_len())].to_vec());
                tick(k + 1, pick.len())?;
            }
            Ok(out)
        }
        Calibration::Conversations(convs) => {
            let template = src.template()?;
            let pick = draw(convs.len(), r.samples(), r.seed(), origin, "conversations")?;
            let mut out = Vec::with_capacity(pick.len());
            for (k, &i) in pick.iter().enumerate() {
                let c = &convs[i];
                if !c.images().is_empty() {
                    return Err(c.invalid(&c.image_field(0), no_vision));
                }
                let text = template.render(&c.messages, false)?;
                out.push(tokens(src.tk, &text, r.seq_len(), || {
                    c.invalid("messages", "renders to fewer than 2 tokens")
                })?);
                tick(k + 1, pick.len())?;
            }
            Ok(out)
        }
    }
}

/// LLaVA samples: text windows and token samples without images; records and conversations
/// with their images preprocessed for the vision tower.
pub(super) fn llava_samples(
    model: &LlavaModel,
    processor: &ClipImageProcessor,
    src: &Inputs<'_>,
    mut tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<VlmSample>> {
    let r = src.recipe;
    let mut out = Vec::new();
    match src.data {
        Calibration::Text(_) | Calibration::Tokens(_) => {
            let texts = text_samples(src, tick)?;
            out.extend(texts.into_iter().map(|t| VlmSample::causal(t, None)));
        }
        Calibration::Records(recs) => {
            let pick = draw(recs.len(), r.samples(), r.seed(), src.origin, "records")?;
            for (k, &i) in pick.iter().enumerate() {
                out.push(llava_record(model, src.tk, processor, &recs[i])?);
                tick(k + 1, pick.len())?;
            }
        }
        Calibration::Conversations(convs) => {
            let template = src.template()?;
            let pick = draw(
                convs.len(),
                r.samples(),
                r.seed(),
                src.origin,
                "conversations",
            )?;
            for (k, &i) in pick.iter().enumerate() {
                let c = &convs[i];
                out.push(llava_conversation(model, src.tk, processor, template, c)?);
                tick(k + 1, pick.len())?;
            }
        }
    }
    Ok(out)
}

fn llava_record(
    model: &LlavaModel,
    tk: &Tokenizer,
    processor: &ClipImageProcessor,
    rec: &CalibrationRecord,
) -> Result<VlmSample> {
    let pixels = if rec.images.is_empty() {
        None
    } else {
        let imgs = rec
            .images
            .iter()
            .map(load_image)
            .collect::<Result<Vec<_>>>()?;
        Some(processor.batch(&imgs, model.device())?)
    };
    model.prompt_sample(tk, &rec.text, pixels)
}

/// One conversation rendered by the chat template, which must write one
/// image marker per image part; errors name the conversation's line.
fn llava_conversation(
    model: &LlavaModel,
    tk: &Tokenizer,
    processor: &ClipImageProcessor,
    template: &ChatTemplate,
    c: &Conversation,
) -> Result<VlmSample> {
    let text = template.render(&c.messages, false)?;
    let images = c.images();
    let markers = text.matches(IMAGE_MARKER).count();
    if markers != images.len() {
        return Err(c.invalid(
            "messages",
            format!(
                "the chat template wrote {markers} {IMAGE_MARKER} markers for {} image parts",
                images.len()
            ),
        ));
    }
    let pixels = if images.is_empty() {
        None
    } else {
        let imgs = images
            .iter()
            .enumerate()
            .map(|(n, p)| load_image(p).map_err(|e| c.invalid(&c.image_field(n), e)))
            .collect::<Result<Vec<_>>>()?;
        Some(processor.batch(&imgs, model.device())?)
    };
    model.prompt_sample(tk, &text, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_is_seeded_sorted_and_distinct() {
        let p = Path::new("c.txt");
        let a = draw(100, 10, 7, p, "windows").unwrap();
        assert_eq!(a, draw(100, 10, 7, p, "windows").unwrap());
        assert_ne!(a, draw(100, 10, 8, p, "windows").unwrap());
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 10);
        let e = draw(3, 4, 0, p, "windows").unwrap_err().to_string();
        assert!(
            e.starts_with("c.txt: samples: the calibration data gives 3 windows"),
            "{e}"
        );
    }
}
