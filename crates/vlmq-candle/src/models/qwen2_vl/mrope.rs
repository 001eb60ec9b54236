//! Multimodal RoPE (M-RoPE) of the Qwen2-VL language model: every token
//! has three positions (temporal, height, width), and the rotary
//! half-dimensions are split into `mrope_section` groups, each rotated by
//! one of the three.
//!
//! Position ids (transformers' `get_rope_index` for images): text tokens
//! count up, `(p, p, p)`; the `t * gh * gw` tokens of an image with merged
//! grid `(t, gh, gw)` starting at `s` get `(s + ti, s + row, s + col)`,
//! row-major; the token after the image continues at `s + max(t, gh, gw)`.
//! (Qwen2.5-VL scales the temporal index by seconds per frame for videos;
//! still images have one temporal patch, where both agree.)

use candle_core::{DType, Device, Tensor};
use vlmq::{Error, Result};

use super::grid::ImageGrid;
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::forward::Positional;

/// Three position rows (temporal, height, width) of one token row.
pub type MropePositions = [Vec<i64>; 3];

/// Position ids of one token row. Each run of `image_token` consumes the
/// next grid of `grids` (from `*next`) and must be exactly as long as its
/// merged token count.
pub(crate) fn rope_index(
    tokens: &[u32],
    image_token: u32,
    grids: &[ImageGrid],
    next: &mut usize,
    merge: usize,
) -> Result<MropePositions> {
    let mut out: MropePositions = [Vec::new(), Vec::new(), Vec::new()];
    let mut start = 0i64;
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] != image_token {
            for row in out.iter_mut() {
                row.push(start);
            }
            start += 1;
            i += 1;
            continue;
        }
        let g = *grids.get(*next).ok_or(Error::InvalidConfig {
            field: "image tokens",
            value: format!(
                "an image token run at position {i} beyond the {} images",
                grids.len()
            ),
            reason: "each run of image tokens needs its own image grid",
        })?;
        *next += 1;
        let n = g.tokens(merge);
        let run = tokens[i..]
            .iter()
            .take_while(|&&t| t == image_token)
            .count();
        if run != n {
            return Err(Error::InvalidConfig {
                field: "image tokens",
                value: format!(
                    "{run} image tokens at position {i} for a grid of {n} merged tokens"
                ),
                reason: "an image's token run must match its grid (t * h * w / merge^2)",
            });
        }
        let (gh, gw) = (g.h / merge, g.w / merge);
        for t in 0..g.t {
            for r in 0..gh {
                for c in 0..gw {
                    out[0].push(start + t as i64);
                    out[1].push(start + r as i64);
                    out[2].push(start + c as i64);
                }
            }
        }
        start += g.t.max(gh).max(gw) as i64;
        i += n;
    }
    Ok(out)
}

/// `max position + 1 - T` of a row (`rope_deltas`, used when generating).
pub fn rope_delta(p: &MropePositions) -> i64 {
    let t = p[0].len() as i64;
    p.iter().flatten().copied().max().map_or(0, |m| m + 1 - t)
}

/// The positional tables of a batch: cosines and sines `[B, 1, T, head_dim]`
/// where half-dimension `j` takes its position from the row of the section
/// it falls in, and the causal mask.
pub(crate) fn mrope_positional(
    cfg: &LlamaConfig,
    section: &[usize; 3],
    rows: &[MropePositions],
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Positional> {
    let hd = cfg.head_dim;
    let half = hd / 2;
    let t = rows.first().map_or(0, |r| r[0].len());
    let which: Vec<usize> = (0..3)
        .flat_map(|s| std::iter::repeat_n(s, section[s]))
        .collect();
    let inv: Vec<f64> = (0..half)
        .map(|j| cfg.rope_theta.powf(-2.0 * j as f64 / hd as f64))
        .collect();
    let mut cos = Vec::with_capacity(rows.len() * t * hd);
    let mut sin = Vec::with_capacity(rows.len() * t * hd);
    for r in rows {
        if r.iter().any(|axis| axis.len() != t) {
            return Err(candle_core::Error::Msg(
                "M-RoPE position rows of different lengths".into(),
            ));
        }
        for ((&a, &b), &c) in r[0].iter().zip(&r[1]).zip(&r[2]) {
            let tok = [a, b, c];
            let angles: Vec<(f64, f64)> = which
                .iter()
                .zip(&inv)
                .map(|(&axis, f)| (tok[axis] as f64 * f).sin_cos())
                .collect();
            for _ in 0..2 {
                for &(s, c) in &angles {
                    sin.push(s);
                    cos.push(c);
                }
            }
        }
    }
    let mut pos = Positional::new(cfg, t, dtype, dev)?;
    let shape = (rows.len(), 1, t, hd);
    pos.cos = Tensor::from_vec(cos, shape, dev)?.to_dtype(dtype)?;
    pos.sin = Tensor::from_vec(sin, shape, dev)?.to_dtype(dtype)?;
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_after_an_image_continues_at_its_longest_side() {
        // Grid 4 x 6 patches = 2 x 3 merged tokens.
        let g = [ImageGrid { t: 1, h: 4, w: 6 }];
        let toks = [5, 9, 9, 9, 9, 9, 9, 6];
        let p = rope_index(&toks, 9, &g, &mut 0, 2).unwrap();
        assert_eq!(p[0], vec![0, 1, 1, 1, 1, 1, 1, 4]);
        assert_eq!(p[1], vec![0, 1, 1, 1, 2, 2, 2, 4]);
        assert_eq!(p[2], vec![0, 1, 2, 3, 1, 2, 3, 4]);
        assert_eq!(rope_delta(&p), -3);
    }

    #[test]
    fn a_short_image_run_is_an_error() {
        let g = [ImageGrid { t: 1, h: 4, w: 6 }];
        assert!(rope_index(&[9, 9, 1], 9, &g, &mut 0, 2).is_err());
        assert!(rope_index(&[9; 6], 9, &[], &mut 0, 2).is_err());
    }
}
