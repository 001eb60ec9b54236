//! PIL's 8-bit image resampling, reproduced to the last bit.
//!
//! transformers' PIL image backend resizes with `Image.resize(..., resample,
//! reducing_gap=None)`, so matching its `pixel_values` exactly means
//! matching Pillow's `Resample.c`. The algorithm, as implemented here:
//!
//! - two separable passes through an 8-bit intermediate, horizontal first
//!   (over only the source rows the vertical pass reads), except that the
//!   vertical pass goes first when the height shrinks by more than twice as
//!   many pixels as the width (Pillow 13's rule, found by comparing both
//!   orders with Pillow on 1374 random sizes where they differ); a pass whose
//!   size does not change is skipped, and an image already of the target
//!   size is returned unchanged;
//! - for output pixel `i` of a pass with `scale = in / out`, the filter is
//!   centred at `(i + 0.5) * scale` and stretched by `max(scale, 1)` (its
//!   support grows when shrinking, so it averages instead of aliasing); the
//!   taps run over the source pixels `[round(c - support), round(c +
//!   support))` clipped to the image, weighted by `filter((j - c + 0.5) /
//!   max(scale, 1))` and normalized to sum to one, in `f64`;
//! - the weights are then turned into fixed point with 22 fractional bits
//!   (each rounded half away from zero), and each output is the integer sum
//!   of `u8 * weight` plus one half, shifted back and clipped to `0..=255`.
//!
//! The fixed-point step is what makes the result differ from a float
//! resampler by one level on some pixels, hence this file.

use image::RgbImage;
use vlmq::{Error, Result};

/// Fractional bits of the fixed-point filter weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A PIL resampling filter (the convolution ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (Keys cubic with `a = -0.5`, support 2).
    Bicubic,
    /// `Image.LANCZOS` (3-lobe windowed sinc, support 3).
    Lanczos,
}

impl PilFilter {
    /// The filter for a `resample` code of a `preprocessor_config.json`
    /// (PIL's numbering: 1 LANCZOS, 2 BILINEAR, 3 BICUBIC); other codes
    /// (nearest, box, hamming) are not supported.
    pub fn from_pil_code(code: u64) -> Result<Self> {
        match code {
            1 => Ok(PilFilter::Lanczos),
            2 => Ok(PilFilter::Bilinear),
            3 => Ok(PilFilter::Bicubic),
            _ => Err(Error::InvalidConfig {
                field: "resample",
                value: code.to_string(),
                reason: "supported PIL filters are 1 (LANCZOS), 2 (BILINEAR), 3 (BICUBIC)",
            }),
        }
    }

    /// Half-width of the filter at scale 1.
    fn support(self) -> f64 {
        match self {
            PilFilter::Bilinear => 1.0,
            PilFilter::Bicubic => 2.0,
            PilFilter::Lanczos => 3.0,
        }
    }

    /// The filter's value at `x`.
    fn eval(self, x: f64) -> f64 {
        match self {
            PilFilter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            PilFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            PilFilter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// `sin(pi x) / (pi x)`, 1 at 0.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// The taps of one pass: for each output pixel, the first source index and
/// the fixed-point weights of the source pixels from there.
struct Taps {
    /// First source index per output pixel.
    start: Vec<usize>,
    /// Weights per output pixel, `ksize` each (unused tail entries are 0).
    weights: Vec<i32>,
    /// Taps per output pixel (the stride of `weights`).
    ksize: usize,
    /// Number of used taps per output pixel.
    len: Vec<usize>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
    fn new(in_size: usize, out_size: usize, filter: PilFilter) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        // Pillow multiplies by the reciprocal; dividing could round differently.
        let inv_filterscale = 1.0 / filterscale;
        for i in 0..out_size {
            let center = (i as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; the clamp at 0 makes the
            // truncation of a negative value irrelevant.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                *wx = filter.eval(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                total += *wx;
            }
            let row = &mut weights[i * ksize..i * ksize + n];
            for (k, &wx) in row.iter_mut().zip(&w[..n]) {
                let wx = if total != 0.0 { wx / total } else { wx };
                let fixed = wx * f64::from(1u32 << PRECISION_BITS);
                *k = if fixed < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            start.push(xmin);
            len.push(n);
        }
        Taps {
            start,
            weights,
            ksize,
            len,
        }
    }

    /// The fixed-point weighted sum of `pixel(j)` over the taps of output `i`,
    /// rounded and clipped to 8 bits.
    fn apply(&self, i: usize, pixel: impl Fn(usize) -> u8) -> u8 {
        let w = &self.weights[i * self.ksize..i * self.ksize + self.len[i]];
        let s = self.start[i];
        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
        for (j, &k) in w.iter().enumerate() {
            acc += i64::from(pixel(s + j)) * i64::from(k);
        }
        clip8(acc)
    }
}

/// Pillow's `clip8`: back from fixed point, clipped to `0..=255`.
fn clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PRECISION_BITS) << 8 {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Resizes an 8-bit RGB image to `width x height` exactly as PIL's
/// `Image.resize((width, height), filter)` does (no `reducing_gap`).
/// A zero target size is an [`Error::InvalidConfig`]; an image of size zero
/// is an [`Error::Empty`].
pub fn pil_resize(src: &RgbImage, width: u32, height: u32, filter: PilFilter) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidConfig {
            field: "resize target",
            value: format!("{width}x{height}"),
            reason: "both sides must be at least 1",
        });
    }
    let (in_w, in_h) = src.dimensions();
    if in_w == 0 || in_h == 0 {
        return Err(Error::Empty {
            what: "image to resize".into(),
        });
    }
    if (in_w, in_h) == (width, height) {
        return Ok(src.clone());
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let horiz = Taps::new(in_w, out_w, filter);
    let vert = Taps::new(in_h, out_h, filter);
    let raw = src.as_raw();
    // Pillow 13 runs the vertical pass first when the height shrinks by
    // more than twice as many pixels as the width does (or the width does
    // not shrink); the order changes the 8-bit intermediate, hence results.
    let vertical_first = out_h < in_h && (out_w >= in_w || in_h - out_h > 2 * (in_w - out_w));
    let out = if vertical_first {
        let mid = vertical_pass(raw, in_w, 0, &vert, 0..out_h);
        horizontal_pass(&mid, in_w, out_w, &horiz, 0..out_h)
    } else if in_w != out_w {
        // Only the source rows the vertical pass reads.
        let first = vert.start[0];
        let last = vert.start[out_h - 1] + vert.len[out_h - 1];
        let mid = horizontal_pass(raw, in_w, out_w, &horiz, first..last);
        if in_h == out_h {
            mid
        } else {
            vertical_pass(&mid, out_w, first, &vert, 0..out_h)
        }
    } else {
        vertical_pass(raw, in_w, 0, &vert, 0..out_h)
    };
    image_from(out_w, out_h, out)
}

/// Resamples the rows `rows` of an RGB buffer `in_w` wide to `out_w` wide.
fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    out_w: usize,
    taps: &Taps,
    rows: std::ops::Range<usize>,
) -> Vec<u8> {
    if in_w == out_w {
        return src[rows.start * in_w * 3..rows.end * in_w * 3].to_vec();
    }
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (out_row, y) in out.chunks_exact_mut(out_w * 3).zip(rows) {
        let src_row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = taps.apply(x, |j| src_row[j * 3 + c]);
            }
        }
    }
    out
}

/// Computes the output rows `rows` of the vertical pass over an RGB buffer
/// `w` wide whose first row is source row `row0`.
fn vertical_pass(
    src: &[u8],
    w: usize,
    row0: usize,
    taps: &Taps,
    rows: std::ops::Range<usize>,
) -> Vec<u8> {
    let stride = w * 3;
    let mut out = vec![0u8; rows.len() * stride];
    for (out_row, y) in out.chunks_exact_mut(stride).zip(rows) {
        for (i, v) in out_row.iter_mut().enumerate() {
            *v = taps.apply(y, |j| src[(j - row0) * stride + i]);
        }
    }
    out
}

/// Wraps a buffer of the right length as an image.
fn image_from(w: usize, h: usize, buf: Vec<u8>) -> Result<RgbImage> {
    RgbImage::from_raw(w as u32, h as u32, buf).ok_or_else(|| Error::ShapeMismatch {
        what: "resized image buffer".into(),
        expected: vec![h, w, 3],
        actual: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_halving_averages_pixel_pairs() {
        // Halving with the triangle filter stretched to support 2: output 0
        // is centred at source 1.0 and covers sources 0..3 (round(-1) clamped
        // to 0 .. round(3)) with weights tri((0.5-1)/2 .. ) = 0.75, 0.75, 0.25
        // -> normalized 3/7, 3/7, 1/7.
        let src = RgbImage::from_fn(4, 1, |x, _| image::Rgb([[10, 20, 30, 40][x as usize]; 3]));
        let out = pil_resize(&src, 2, 1, PilFilter::Bilinear).unwrap();
        // 10*3/7 + 20*3/7 + 30/7 = 17.14 -> 17; output 1 centred at 3: sources
        // 1..4, weights 0.25, 0.75, 0.75 -> 20/7 + 90/7 + 120/7 = 32.86 -> 33.
        assert_eq!(out.get_pixel(0, 0).0, [17; 3]);
        assert_eq!(out.get_pixel(1, 0).0, [33; 3]);
    }

    #[test]
    fn same_size_is_a_copy_and_bad_sizes_are_errors() {
        let src = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(pil_resize(&src, 3, 2, PilFilter::Lanczos).unwrap(), src);
        assert!(matches!(
            pil_resize(&src, 0, 2, PilFilter::Lanczos),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            PilFilter::from_pil_code(0),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            pil_resize(&RgbImage::new(0, 0), 2, 2, PilFilter::Bicubic),
            Err(Error::Empty { .. })
        ));
    }

    #[test]
    fn overshoot_is_clipped_not_wrapped() {
        // Lanczos rings around a hard edge; the ring beyond 255 / below 0
        // must clip (a wrap would turn 256 into 0).
        let src = RgbImage::from_fn(8, 1, |x, _| image::Rgb([if x < 4 { 0 } else { 255 }; 3]));
        let out = pil_resize(&src, 13, 1, PilFilter::Lanczos).unwrap();
        let row: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        // The edge falls at output 6.5; away from it every value stays on its side.
        assert!(row[..5].iter().all(|&v| v < 64), "{row:?}");
        assert!(row[8..].iter().all(|&v| v > 192), "{row:?}");
    }
}
