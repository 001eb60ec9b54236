//! The SmolVLM / Idefics3 image processor, as transformers' PIL backend
//! (`SmolVLMImageProcessorPil`) computes it, and the processor's image-token
//! expansion.
//!
//! Per image (8-bit RGB), with `L = size.longest_edge` and
//! `M = max_image_size.longest_edge` from the processor config:
//! 1. resize so the longest edge is `L`, the other `int(L * ratio)` rounded
//!    up to even (an image larger than 4096 on a side is first brought under
//!    it the same way, without the rounding);
//! 2. resize to multiples of `M`: the longest edge up to the next multiple,
//!    the other `int(edge / ratio)` (ratio of the step-1 image) up to the
//!    next multiple;
//! 3. if larger than `M x M`, cut `rows x cols` crops of `ceil(side / n)`
//!    row-major and append the step-2 image resized to `M x M` (the global
//!    frame); otherwise the image itself is the only frame (`rows = cols = 0`).
//!    Without `do_image_splitting` the step-1 image is resized to `M x M`;
//! 4. each frame: `f32(f64(u8) * rescale_factor)`, then `(x - mean) / std` in
//!    `f32`, channels first.
//!
//! All resizing is [`pil_resize`] with the config's `resample` (LANCZOS for
//! the released models). A batch packs each sample's frames, padded with
//! all-zero frames (mask 0) to the largest count.
//!
//! Token expansion (per image, `n = image_seq_len` image tokens per frame):
//! each crop is `<fake_token_around_image><row_r_col_c>` + `n x <image>`, a
//! newline after each row, then `\n<fake_token_around_image><global-img>` +
//! `n x <image>` + `<fake_token_around_image>`; an unsplit image is just the
//! global part without the leading newline.

use std::path::Path;

use image::RgbImage;
use serde_json::Value;
use vlmq::{Error, Result};

use super::pil_resize::{pil_resize, PilFilter};

/// transformers' cap on either side before the longest-edge resize.
const MAX_IMAGE_SIDE: usize = 4096;

/// The settings of a SmolVLM image processor (and the processor's token count).
#[derive(Debug, Clone, PartialEq)]
pub struct SmolVlmImageProcessor {
    /// `size.longest_edge`: the longest side after step 1.
    pub longest_edge: usize,
    /// `max_image_size.longest_edge`: the side of every frame.
    pub frame_side: usize,
    /// The resampling filter.
    pub filter: PilFilter,
    /// Whether large images are tiled into crops.
    pub split: bool,
    /// Whether step 1 runs.
    pub resize: bool,
    /// The 8-bit to float factor (1/255).
    pub rescale_factor: f64,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// `<image>` tokens per frame.
    pub image_seq_len: usize,
}

/// One image's frames and its crop grid.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFrames {
    /// The crops row-major, then the global frame; each `frame_side` square.
    pub frames: Vec<RgbImage>,
    /// Crop rows (0 when the image was not split).
    pub rows: usize,
    /// Crop columns (0 when the image was not split).
    pub cols: usize,
}

impl SmolVlmImageProcessor {
    /// Reads the image processor of a model directory: the `image_processor`
    /// object and `image_seq_len` of `processor_config.json`, or
    /// `preprocessor_config.json` (then `image_seq_len` must be passed via
    /// the processor config or defaults to the released models' 64).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let processor = dir.join("processor_config.json");
        let (path, cfg, seq_len) = if processor.is_file() {
            let v = read_json(&processor)?;
            let seq = v.get("image_seq_len").and_then(Value::as_u64);
            match v.get("image_processor") {
                Some(ip) => (processor, ip.clone(), seq),
                None => (processor, v.clone(), seq),
            }
        } else {
            let p = dir.join("preprocessor_config.json");
            let v = read_json(&p)?;
            (p, v, None)
        };
        Self::from_config(&cfg, seq_len.unwrap_or(64) as usize, &path)
    }

    /// Reads the fields of an image-processor config object (`path` names
    /// the file in errors).
    pub fn from_config(cfg: &Value, image_seq_len: usize, path: &Path) -> Result<Self> {
        let edge = |key: &str| -> Result<usize> {
            cfg.get(key)
                .and_then(|s| s.get("longest_edge"))
                .and_then(Value::as_u64)
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::field(
                        path,
                        format!("{key}.longest_edge"),
                        "missing or not a positive integer",
                    )
                })
        };
        let flag = |key: &str| cfg.get(key).and_then(Value::as_bool).unwrap_or(true);
        let triple = |key: &str| -> Result<[f32; 3]> {
            let Some(a) = cfg.get(key) else {
                return Ok([0.5; 3]);
            };
            let vals: Vec<f32> = a
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_f64)
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default();
            vals.try_into()
                .map_err(|_| Error::field(path, key, "not a list of 3 numbers"))
        };
        let resample = cfg.get("resample").and_then(Value::as_u64).unwrap_or(1);
        let filter =
            PilFilter::from_pil_code(resample).map_err(|e| Error::field(path, "resample", e))?;
        let std = triple("image_std")?;
        if std.contains(&0.0) {
            return Err(Error::field(path, "image_std", "a standard deviation is 0"));
        }
        Ok(SmolVlmImageProcessor {
            longest_edge: edge("size")?,
            frame_side: edge("max_image_size")?,
            filter,
            split: flag("do_image_splitting"),
            resize: flag("do_resize"),
            rescale_factor: cfg
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            mean: triple("image_mean")?,
            std,
            image_seq_len,
        })
    }

    /// Steps 1-3: the frames of one image.
    pub fn frames(&self, img: &RgbImage) -> Result<ImageFrames> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::Empty {
                what: "image".into(),
            });
        }
        let m = self.frame_side;
        let sized = |img: &RgbImage, w: usize, h: usize| -> Result<RgbImage> {
            pil_resize(img, w as u32, h as u32, self.filter)
        };
        let step1 = if self.resize {
            let (h1, w1) = longest_edge_size(h, w, self.longest_edge);
            sized(img, w1, h1)?
        } else {
            img.clone()
        };
        if !self.split {
            return Ok(ImageFrames {
                frames: vec![sized(&step1, m, m)?],
                rows: 0,
                cols: 0,
            });
        }
        let (w1, h1) = (step1.width() as usize, step1.height() as usize);
        let (h2, w2) = multiple_size(h1, w1, m);
        let step2 = sized(&step1, w2, h2)?;
        if h2 <= m && w2 <= m {
            return Ok(ImageFrames {
                frames: vec![step2],
                rows: 0,
                cols: 0,
            });
        }
        let (rows, cols) = (h2.div_ceil(m), w2.div_ceil(m));
        let (ch, cw) = (h2.div_ceil(rows), w2.div_ceil(cols));
        let mut frames = Vec::with_capacity(rows * cols + 1);
        for r in 0..rows {
            for c in 0..cols {
                let (x, y) = (c * cw, r * ch);
                let crop = image::imageops::crop_imm(
                    &step2,
                    x as u32,
                    y as u32,
                    (cw.min(w2 - x)) as u32,
                    (ch.min(h2 - y)) as u32,
                );
                frames.push(crop.to_image());
            }
        }
        frames.push(sized(&step2, m, m)?);
        Ok(ImageFrames { frames, rows, cols })
    }

    /// Step 4: one frame as `[3, side, side]` channels-first floats.
    pub fn normalize(&self, frame: &RgbImage) -> Vec<f32> {
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        let mut out = vec![0f32; 3 * w * h];
        for (i, p) in frame.pixels().enumerate() {
            for c in 0..3 {
                let x = (f64::from(p.0[c]) * self.rescale_factor) as f32;
                out[c * w * h + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// The text that replaces one `<image>` of the prompt for an image with
    /// this crop grid.
    pub fn image_prompt(&self, rows: usize, cols: usize) -> String {
        let tokens = "<image>".repeat(self.image_seq_len);
        let global =
            format!("<fake_token_around_image><global-img>{tokens}<fake_token_around_image>");
        if rows == 0 && cols == 0 {
            return global;
        }
        let mut s = String::new();
        for r in 1..=rows {
            for c in 1..=cols {
                s.push_str(&format!(
                    "<fake_token_around_image><row_{r}_col_{c}>{tokens}"
                ));
            }
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&global);
        s
    }
}

/// The processor's outputs for a batch of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct SmolVlmBatch {
    /// Token ids per sample, after image-token expansion.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B, max_frames, 3, side, side]` row-major; padding frames are 0.
    pub pixel_values: Vec<f32>,
    /// `[B, max_frames, side, side]`: 1 on real frames, 0 on padding frames.
    pub pixel_attention_mask: Vec<u8>,
    /// Real frames per sample.
    pub frames_per_sample: Vec<usize>,
    /// Frames per sample after padding.
    pub max_frames: usize,
    /// Frame side.
    pub side: usize,
}

impl SmolVlmImageProcessor {
    /// The processor call: each text's `<image>` markers (one per image of
    /// that sample, in order) expanded, tokenized (special tokens added as
    /// the tokenizer's post-processor says), and the frames packed.
    pub fn process_batch(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        texts: &[&str],
        images: &[Vec<RgbImage>],
    ) -> Result<SmolVlmBatch> {
        if texts.len() != images.len() {
            return Err(Error::shape(
                "texts vs image lists",
                &[texts.len()],
                &[images.len()],
            ));
        }
        let side = self.frame_side;
        let mut input_ids = Vec::with_capacity(texts.len());
        let mut per_sample = Vec::with_capacity(texts.len());
        for (b, (text, imgs)) in texts.iter().zip(images).enumerate() {
            let pieces: Vec<&str> = text.split("<image>").collect();
            if pieces.len() != imgs.len() + 1 {
                return Err(Error::shape(
                    format!("<image> markers vs images of sample {b}"),
                    &[imgs.len()],
                    &[pieces.len() - 1],
                ));
            }
            let mut expanded = pieces[0].to_string();
            let mut frames = Vec::new();
            for (img, rest) in imgs.iter().zip(&pieces[1..]) {
                let f = self.frames(img)?;
                expanded.push_str(&self.image_prompt(f.rows, f.cols));
                expanded.push_str(rest);
                frames.extend(f.frames);
            }
            let enc =
                tokenizer
                    .encode(expanded.as_str(), true)
                    .map_err(|e| Error::Unencodable {
                        what: format!("prompt of sample {b}"),
                        reason: e.to_string(),
                    })?;
            input_ids.push(enc.get_ids().to_vec());
            per_sample.push(frames);
        }
        let max_frames = per_sample.iter().map(Vec::len).max().unwrap_or(0);
        let frame_len = 3 * side * side;
        let mut pixel_values = vec![0f32; texts.len() * max_frames * frame_len];
        let mut pixel_attention_mask = vec![0u8; texts.len() * max_frames * side * side];
        for (b, frames) in per_sample.iter().enumerate() {
            for (f, frame) in frames.iter().enumerate() {
                let at = (b * max_frames + f) * frame_len;
                pixel_values[at..at + frame_len].copy_from_slice(&self.normalize(frame));
                let at = (b * max_frames + f) * side * side;
                pixel_attention_mask[at..at + side * side].fill(1);
            }
        }
        Ok(SmolVlmBatch {
            input_ids,
            pixel_values,
            pixel_attention_mask,
            frames_per_sample: per_sample.iter().map(Vec::len).collect(),
            max_frames,
            side,
        })
    }
}

/// Step 1's size `(h, w)`: longest edge `max_len`, the other scaled and
/// rounded up to even, after the 4096 cap.
fn longest_edge_size(h: usize, w: usize, max_len: usize) -> (usize, usize) {
    let (mut h, mut w) = (h, w);
    let ratio = w as f64 / h as f64;
    if w >= h && w > MAX_IMAGE_SIDE {
        w = MAX_IMAGE_SIDE;
        h = (w as f64 / ratio) as usize;
    } else if h > w && h > MAX_IMAGE_SIDE {
        h = MAX_IMAGE_SIDE;
        w = (h as f64 * ratio) as usize;
    }
    let (h, w) = (h.max(1), w.max(1));
    let ratio = w as f64 / h as f64;
    let (mut h2, mut w2);
    if w >= h {
        w2 = max_len;
        h2 = (w2 as f64 / ratio) as usize;
        if !h2.is_multiple_of(2) {
            h2 += 1;
        }
    } else {
        h2 = max_len;
        w2 = (h2 as f64 * ratio) as usize;
        if !w2.is_multiple_of(2) {
            w2 += 1;
        }
    }
    (h2.max(1), w2.max(1))
}

/// Step 2's size `(h, w)`: both sides up to multiples of `m`.
fn multiple_size(h: usize, w: usize, m: usize) -> (usize, usize) {
    let ratio = w as f64 / h as f64;
    if w >= h {
        let w2 = w.div_ceil(m) * m;
        let h2 = ((w2 as f64 / ratio) as usize).div_ceil(m) * m;
        (h2.max(m), w2)
    } else {
        let h2 = h.div_ceil(m) * m;
        let w2 = ((h2 as f64 * ratio) as usize).div_ceil(m) * m;
        (h2, w2.max(m))
    }
}

/// A JSON file.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_transformers_rules() {
        // From the fixture README: 50x90 -> 36x64 -> 64x64; 120x50 -> 64x26 -> 64x32.
        assert_eq!(longest_edge_size(50, 90, 64), (36, 64));
        assert_eq!(longest_edge_size(120, 50, 64), (64, 26));
        assert_eq!(multiple_size(36, 64, 32), (64, 64));
        assert_eq!(multiple_size(64, 26, 32), (64, 32));
        // The 4096 cap applies before the longest-edge resize.
        assert_eq!(longest_edge_size(10, 8192, 2048), (2, 2048));
    }
}
