//! The Qwen2-VL / Qwen2.5-VL image processor (transformers'
//! `Qwen2VLImageProcessor`), after the resize:
//! 1. [`smart_resize`] picks the target size: each side rounded to a
//!    multiple of `patch * merge` (28), then scaled into
//!    `[min_pixels, max_pixels]` keeping the aspect ratio;
//! 2. the image is resized to it with PIL's 8-bit filter named by
//!    `resample` (bicubic by default; [`process_image`] calls
//!    [`pil_resize`], [`pixel_values_from_resized`] takes pixels resized
//!    elsewhere);
//! 3. values are rescaled (`u8 * factor`, in f64, rounded to f32) and
//!    normalized (`(x - mean) / std` in f32), channels first;
//! 4. the frame is repeated `temporal_patch_size` times and cut into
//!    patches ordered merge block by merge block (blocks row-major, the
//!    `merge x merge` patches of a block row-major), each flattened as
//!    (channel, frame, y, x).
//!
//! [`expand_image_tokens`] turns each `<|image_pad|>` of a prompt into one
//! token per merged patch.

use std::path::Path;

use serde_json::Value;
use vlmq::{Error, Result};

use image::RgbImage;

use crate::models::qwen2_vl::ImageGrid;
use crate::process::pil_resize::{pil_resize, PilFilter};

/// The image processor's settings (`preprocessor_config.json`, or
/// `processor_config.json`'s `image_processor`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlImageConfig {
    /// Fewest pixels after resizing (`size.shortest_edge` or `min_pixels`).
    pub min_pixels: usize,
    /// Most pixels after resizing (`size.longest_edge` or `max_pixels`).
    pub max_pixels: usize,
    /// Patch side.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Patches merged per side.
    pub merge_size: usize,
    /// Rescale factor (1/255).
    pub rescale_factor: f64,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// The resize filter (`resample`: PIL's 1 LANCZOS, 2 BILINEAR, 3 BICUBIC).
    pub resample: PilFilter,
}

/// CLIP's normalization, the processor's default.
const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Qwen2VlImageConfig {
    /// Reads the settings of a model directory: `preprocessor_config.json`
    /// if present, else `processor_config.json`'s `image_processor` object.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        let (path, v) = if pre.exists() {
            let v = crate::load::hf::read_json(&pre)?;
            (pre, v)
        } else {
            let p = dir.join("processor_config.json");
            let v = crate::load::hf::read_json(&p)?;
            let ip = v
                .get("image_processor")
                .cloned()
                .ok_or_else(|| bad(&p, "no image_processor object"))?;
            (p, ip)
        };
        Self::from_json(&v, &path)
    }

    /// Reads an image processor object (`path` only names errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let int = |keys: &[(&str, Option<&str>)], default: Option<usize>| -> Result<usize> {
            keys.iter()
                .find_map(|(k, sub)| {
                    let x = v.get(*k)?;
                    match sub {
                        Some(s) => x.get(*s),
                        None => Some(x),
                    }
                    .and_then(Value::as_u64)
                })
                .map(|x| x as usize)
                .or(default)
                .ok_or_else(|| bad(path, format!("image processor: missing {:?}", keys[0].0)))
        };
        let triple = |k: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None => Ok(default),
                Some(a) => a
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_f64().map(|x| x as f32))
                            .collect::<Option<Vec<_>>>()
                    })
                    .and_then(|a| a.try_into().ok())
                    .ok_or_else(|| bad(path, format!("image processor: {k} must hold 3 numbers"))),
            }
        };
        let cfg = Qwen2VlImageConfig {
            min_pixels: int(
                &[("min_pixels", None), ("size", Some("shortest_edge"))],
                None,
            )?,
            max_pixels: int(
                &[("max_pixels", None), ("size", Some("longest_edge"))],
                None,
            )?,
            patch_size: int(&[("patch_size", None)], Some(14))?,
            temporal_patch_size: int(&[("temporal_patch_size", None)], Some(2))?,
            merge_size: int(&[("merge_size", None)], Some(2))?,
            rescale_factor: v
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            mean: triple("image_mean", CLIP_MEAN.map(|x| x as f32))?,
            std: triple("image_std", CLIP_STD.map(|x| x as f32))?,
            resample: match v.get("resample") {
                None => PilFilter::Bicubic,
                Some(r) => r
                    .as_u64()
                    .ok_or_else(|| bad(path, "image processor: resample must be an integer"))
                    .and_then(|c| {
                        PilFilter::from_pil_code(c)
                            .map_err(|e| bad(path, format!("image processor: {e}")))
                    })?,
            },
        };
        if cfg.patch_size == 0
            || cfg.merge_size == 0
            || cfg.temporal_patch_size == 0
            || cfg.min_pixels > cfg.max_pixels
            || cfg.std.contains(&0.0)
        {
            return Err(bad(path, format!("inconsistent image processor {cfg:?}")));
        }
        Ok(cfg)
    }

    /// Values per patch row of `pixel_values` (`3 * temporal_patch_size * patch_size^2`).
    pub fn patch_values(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The side multiple of the resize (`patch_size * merge_size`).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// The target `(height, width)` of transformers' `smart_resize`: sides
/// rounded (half to even) to multiples of `factor`, then, if the area is
/// outside `[min_pixels, max_pixels]`, both scaled by the square root of the
/// area ratio, rounding down (too large) or up (too small) to multiples of
/// `factor`. Errors on an empty image or an aspect ratio above 200.
pub fn smart_resize(
    h: usize,
    w: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if h == 0 || w == 0 || factor == 0 || h.max(w) > 200 * h.min(w) {
        return Err(Error::InvalidConfig {
            field: "image size",
            value: format!("{h} x {w}"),
            reason: "the image must be non-empty with an aspect ratio of at most 200",
        });
    }
    let f = factor as f64;
    let (hf, wf) = (h as f64, w as f64);
    let round = |x: f64| ((x / f).round_ties_even() * f) as usize;
    let (mut hb, mut wb) = (round(hf), round(wf));
    if hb * wb > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = factor.max(((hf / beta / f).floor() * f) as usize);
        wb = factor.max(((wf / beta / f).floor() * f) as usize);
    } else if hb * wb < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = ((hf * beta / f).ceil() * f) as usize;
        wb = ((wf * beta / f).ceil() * f) as usize;
    }
    Ok((hb, wb))
}

/// `pixel_values` rows `[patches, 3 * temporal * patch * patch]` (flattened)
/// and the grid of one already-resized 8-bit RGB image (`rgb`: `h * w * 3`
/// bytes, row-major HWC; `h`, `w` multiples of `patch * merge`).
pub fn pixel_values_from_resized(
    rgb: &[u8],
    h: usize,
    w: usize,
    cfg: &Qwen2VlImageConfig,
) -> Result<(Vec<f32>, ImageGrid)> {
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    if rgb.len() != h * w * 3 {
        return Err(Error::shape("resized RGB image", &[h, w, 3], &[rgb.len()]));
    }
    if h == 0 || w == 0 || !h.is_multiple_of(cfg.factor()) || !w.is_multiple_of(cfg.factor()) {
        return Err(Error::InvalidConfig {
            field: "resized image size",
            value: format!("{h} x {w}"),
            reason: "both sides must be positive multiples of patch_size * merge_size",
        });
    }
    let norm: Vec<f32> = rgb
        .iter()
        .enumerate()
        .map(|(i, &u)| {
            let c = i % 3;
            let x = (u as f64 * cfg.rescale_factor) as f32;
            (x - cfg.mean[c]) / cfg.std[c]
        })
        .collect();
    let (gh, gw) = (h / p, w / p);
    let mut out = Vec::with_capacity(gh * gw * 3 * tp * p * p);
    for br in 0..gh / m {
        for bc in 0..gw / m {
            for ir in 0..m {
                for ic in 0..m {
                    let (y0, x0) = ((br * m + ir) * p, (bc * m + ic) * p);
                    for c in 0..3 {
                        for _ in 0..tp {
                            for y in 0..p {
                                for x in 0..p {
                                    out.push(norm[((y0 + y) * w + x0 + x) * 3 + c]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok((out, ImageGrid { t: 1, h: gh, w: gw }))
}

/// `pixel_values` rows and the grid of one 8-bit RGB image, as the
/// processor computes them: [`smart_resize`]'s size, [`pil_resize`] with
/// the configured filter, then [`pixel_values_from_resized`].
pub fn process_image(img: &RgbImage, cfg: &Qwen2VlImageConfig) -> Result<(Vec<f32>, ImageGrid)> {
    let (w, h) = img.dimensions();
    let (rh, rw) = smart_resize(
        h as usize,
        w as usize,
        cfg.factor(),
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    let too_big = || Error::InvalidConfig {
        field: "resized image size",
        value: format!("{rh} x {rw}"),
        reason: "a side does not fit in 32 bits",
    };
    let (tw, th) = (
        u32::try_from(rw).map_err(|_| too_big())?,
        u32::try_from(rh).map_err(|_| too_big())?,
    );
    let resized = pil_resize(img, tw, th, cfg.resample)?;
    pixel_values_from_resized(resized.as_raw(), rh, rw, cfg)
}

/// `text` with the `k`-th occurrence of `image_token` repeated once per
/// merged token of `grids[k]`; the counts must match.
pub fn expand_image_tokens(
    text: &str,
    image_token: &str,
    grids: &[ImageGrid],
    merge: usize,
) -> Result<String> {
    let parts: Vec<&str> = text.split(image_token).collect();
    if parts.len() != grids.len() + 1 {
        return Err(Error::InvalidConfig {
            field: "image tokens",
            value: format!(
                "{} {image_token} in the text for {} images",
                parts.len() - 1,
                grids.len()
            ),
            reason: "the prompt must hold one image token per image",
        });
    }
    let mut out = String::from(parts[0]);
    for (g, rest) in grids.iter().zip(&parts[1..]) {
        out.push_str(&image_token.repeat(g.tokens(merge)));
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_then_clamps_the_area() {
        // The fixtures' sizes: only rounding (half to even) applies.
        assert_eq!(smart_resize(50, 90, 28, 3136, 6272).unwrap(), (56, 84));
        assert_eq!(smart_resize(120, 50, 28, 3136, 6272).unwrap(), (112, 56));
        assert_eq!(smart_resize(42, 42, 28, 0, 1 << 20).unwrap(), (56, 56));
        // Too large: scaled down, floored; too small: scaled up, ceiled.
        assert_eq!(smart_resize(1000, 1000, 28, 3136, 6272).unwrap(), (56, 56));
        assert_eq!(smart_resize(30, 15, 28, 3136, 6272).unwrap(), (84, 56));
        assert!(smart_resize(1, 300, 28, 3136, 6272).is_err());
    }
}
