//! Image input for the LLaVA model: decoding PNG / JPEG files and turning
//! RGB images into CLIP `pixel_values`, the way transformers'
//! `CLIPImageProcessor` does.
//!
//! The rule, per image:
//! 1. convert to 8-bit RGB;
//! 2. resize so the **shortest side** equals `shortest_edge`, keeping the
//!    aspect ratio (the long side becomes `floor(shortest_edge * long / short)`),
//!    with a bicubic filter (Catmull-Rom, `a = -0.5`, widened when
//!    downsampling, as PIL's `BICUBIC`), rounded back to 8 bits; an image
//!    already of that size is left untouched (as PIL does);
//! 3. **center crop** to `crop x crop` (top = `(h - crop) / 2`,
//!    left = `(w - crop) / 2`, integer division); an image smaller than the
//!    crop is zero-padded around its center first;
//! 4. scale by 1/255, then normalize each channel `(x - mean) / std` with
//!    CLIP's mean `(0.48145466, 0.4578275, 0.40821073)` and std
//!    `(0.26862954, 0.26130258, 0.27577711)`;
//! 5. lay out as `[3, crop, crop]` (channels first); a batch is `[N, 3, crop, crop]`.
//!
//! The resampling kernels of PIL and the `image` crate round differently,
//! so a resized image may differ from transformers' by one 8-bit level on
//! some pixels; without resizing the result is the same up to f32 rounding.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{imageops, RgbImage};
use vlmq::{Error, Result};

use crate::error::CandleResultExt;

/// CLIP's per-channel mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The settings of a CLIP image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// Target length of the shortest side after resizing.
    pub shortest_edge: usize,
    /// Side of the square center crop.
    pub crop: usize,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl ClipImageProcessor {
    /// CLIP's mean/std, resize and crop to `image_size` (the vision tower's input side).
    pub fn for_image_size(image_size: usize) -> Self {
        ClipImageProcessor {
            shortest_edge: image_size,
            crop: image_size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// Reads `preprocessor_config.json` (fields `size.shortest_edge`,
    /// `crop_size` (`height` or an integer), `image_mean`, `image_std`);
    /// missing fields fall back to `for_image_size(image_size)`.
    pub fn from_preprocessor_config(path: &Path, image_size: usize) -> Result<Self> {
        let v = crate::load::hf::read_json(path)?;
        let mut p = Self::for_image_size(image_size);
        let int = |x: Option<&serde_json::Value>| x.and_then(serde_json::Value::as_u64);
        if let Some(s) =
            int(v.get("size").and_then(|s| s.get("shortest_edge"))).or_else(|| int(v.get("size")))
        {
            p.shortest_edge = s as usize;
        }
        if let Some(c) = int(v.get("crop_size").and_then(|s| s.get("height")))
            .or_else(|| int(v.get("crop_size")))
        {
            p.crop = c as usize;
        }
        let triple = |k: &str| -> Result<Option<[f32; 3]>> {
            let Some(a) = v.get(k) else { return Ok(None) };
            let vals: Vec<f32> = a
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default();
            <[f32; 3]>::try_from(vals)
                .map(Some)
                .map_err(|_| Error::Json {
                    path: path.to_path_buf(),
                    reason: format!("{k} must be three numbers"),
                })
        };
        if let Some(m) = triple("image_mean")? {
            p.mean = m;
        }
        if let Some(s) = triple("image_std")? {
            p.std = s;
        }
        if p.shortest_edge == 0 || p.crop == 0 || p.std.iter().any(|&s| s.is_nan() || s == 0.0) {
            return Err(Error::Json {
                path: path.to_path_buf(),
                reason: format!("invalid image processor settings {p:?}"),
            });
        }
        Ok(p)
    }

    /// Resize (shortest side) and center crop, still 8-bit RGB.
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let s = self.shortest_edge;
        let (nw, nh) = if w <= h {
            (s, (s * h) / w.max(1))
        } else {
            ((s * w) / h.max(1), s)
        };
        let resized = if (nw, nh) == (w, h) {
            img.clone()
        } else {
            imageops::resize(img, nw as u32, nh as u32, imageops::FilterType::CatmullRom)
        };
        let c = self.crop;
        let mut out = RgbImage::new(c as u32, c as u32);
        // Offsets of the crop in the resized image (negative: padding).
        let top = (nh as i64 - c as i64).div_euclid(2);
        let left = (nw as i64 - c as i64).div_euclid(2);
        for y in 0..c as i64 {
            for x in 0..c as i64 {
                let (sy, sx) = (y + top, x + left);
                if (0..nh as i64).contains(&sy) && (0..nw as i64).contains(&sx) {
                    out.put_pixel(x as u32, y as u32, *resized.get_pixel(sx as u32, sy as u32));
                }
            }
        }
        out
    }

    /// `[3, crop, crop]` values of an already cropped image: `/255`, then normalized.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let n = (w * h) as usize;
        let mut out = vec![0.0f32; 3 * n];
        for (i, p) in img.pixels().enumerate() {
            for ch in 0..3 {
                let x = p.0[ch] as f32 / 255.0;
                out[ch * n + i] = (x - self.mean[ch]) / self.std[ch];
            }
        }
        out
    }

    /// The whole rule on one image: `[3, crop, crop]` values.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        self.normalize(&self.resize_and_crop(img))
    }

    /// `pixel_values: [N, 3, crop, crop]` of a batch of images.
    pub fn batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::Empty {
                what: "image batch".into(),
            });
        }
        let mut v = Vec::with_capacity(images.len() * 3 * self.crop * self.crop);
        for img in images {
            v.extend(self.preprocess(img));
        }
        Tensor::from_vec(v, (images.len(), 3, self.crop, self.crop), device).at_model()
    }
}

/// An RGB image from `h x w x 3` bytes (HWC order).
pub fn rgb_from_hwc(data: &[u8], h: usize, w: usize) -> Result<RgbImage> {
    if data.len() != h * w * 3 {
        return Err(Error::shape("HWC RGB bytes", &[h, w, 3], &[data.len()]));
    }
    RgbImage::from_raw(w as u32, h as u32, data.to_vec())
        .ok_or_else(|| Error::shape("HWC RGB bytes", &[h, w, 3], &[data.len()]))
}

/// Decodes a PNG or JPEG file into 8-bit RGB (the format is read from the
/// file's first bytes; alpha is dropped, grey is expanded).
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    Ok(img.to_rgb8())
}
