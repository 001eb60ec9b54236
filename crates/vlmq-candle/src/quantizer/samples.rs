//! Turning [`Calibration`] data into the samples of each model family.

use std::path::Path;

use vlmq::{Error, Result};

use crate::eval::windows;
use crate::models::llava::sample::VlmSample;
use crate::process::calibration::{Calibration, CalibrationRecord};
use crate::process::image_input::{load_image, ClipImageProcessor};
use crate::process::tokenizer::encode;
use crate::recipe::CheckedRecipe;
use crate::LlavaModel;

/// `want` of `0..n` drawn by a seeded Fisher-Yates shuffle, in increasing
/// order; fewer than `want` is an error naming `origin` and `samples`.
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
    let mut rng = vlmq::rng::SplitMix64::from_state(seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v.truncate(want);
    v.sort_unstable();
    Ok(v)
}

/// The token windows (text) or token sequences (records) of `data`, drawn
/// per the recipe; records with images are refused (text-only model).
pub(super) fn text_samples(
    tk: &tokenizers::Tokenizer,
    data: &Calibration,
    origin: &Path,
    r: &CheckedRecipe,
    mut tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    match data {
        Calibration::Text(text) => {
            let all = windows(&encode(tk, text)?, r.seq_len());
            let unit = format!("windows of {} tokens", r.seq_len());
            let pick = draw(all.len(), r.samples(), r.seed(), origin, &unit)?;
            tick(pick.len(), pick.len())?;
            Ok(pick.into_iter().map(|i| all[i].clone()).collect())
        }
        Calibration::Records(recs) => {
            let pick = draw(recs.len(), r.samples(), r.seed(), origin, "records")?;
            let mut out = Vec::with_capacity(pick.len());
            for (k, &i) in pick.iter().enumerate() {
                if !recs[i].images.is_empty() {
                    return Err(Error::field(
                        origin,
                        format!("record {}: images", i + 1),
                        "this model has no vision tower",
                    ));
                }
                let mut t = encode(tk, &recs[i].text)?;
                t.truncate(r.seq_len());
                if t.len() < 2 {
                    return Err(Error::field(
                        origin,
                        format!("record {}: text", i + 1),
                        "gives fewer than 2 tokens",
                    ));
                }
                out.push(t);
                tick(k + 1, pick.len())?;
            }
            Ok(out)
        }
    }
}

/// LLaVA samples: text windows without images, records with their images
/// preprocessed for the vision tower.
pub(super) fn llava_samples(
    model: &LlavaModel,
    tk: &tokenizers::Tokenizer,
    processor: &ClipImageProcessor,
    data: &Calibration,
    origin: &Path,
    r: &CheckedRecipe,
    mut tick: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<VlmSample>> {
    let Calibration::Records(recs) = data else {
        let texts = text_samples(tk, data, origin, r, tick)?;
        return Ok(texts
            .into_iter()
            .map(|t| VlmSample::causal(t, None))
            .collect());
    };
    let pick = draw(recs.len(), r.samples(), r.seed(), origin, "records")?;
    let mut out = Vec::with_capacity(pick.len());
    for (k, &i) in pick.iter().enumerate() {
        out.push(llava_record(model, tk, processor, &recs[i])?);
        tick(k + 1, pick.len())?;
    }
    Ok(out)
}

fn llava_record(
    model: &LlavaModel,
    tk: &tokenizers::Tokenizer,
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
