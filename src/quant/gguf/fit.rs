//! Fitting one row's block grids, weighted by per-column importance.
//!
//! Each block scale goes through the candidate search of [`super::search`]
//! (llama.cpp's importance-matrix method). The K-quants fit every sub-block
//! this way, then quantize the sub-block scales against one f16
//! super-block scale.

use half::f16;

use super::format::GgufType;
use super::grid::BlockGrid;
use super::search::{fit_affine, fit_signed};
use crate::quant::cell::RowFit;

/// The fit of one GGUF type, as the column walk uses it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockFit {
    ty: GgufType,
}

impl BlockFit {
    /// The fit for `ty`.
    pub(crate) fn new(ty: GgufType) -> Self {
        BlockFit { ty }
    }
}

impl RowFit for BlockFit {
    type Grid = BlockGrid;

    fn max_code(&self) -> u32 {
        self.ty.max_code()
    }

    fn placeholder(&self) -> BlockGrid {
        BlockGrid::symmetric(f16::ONE, 0)
    }

    // Inlined (with the fits below) into the column walk, so the fit is
    // compiled for the walk's AVX2 copy too.
    #[inline(always)]
    fn fit_span(&self, values: &[f32], importance: &[f32], out: &mut [BlockGrid]) {
        let mut weights = [0.0f32; 256];
        let weights = &mut weights[..values.len()];
        weights.copy_from_slice(importance);
        match self.ty {
            GgufType::Q8_0 => out[0] = fit_q8_0(values),
            GgufType::Q4_0 | GgufType::Q5_0 => {
                let zero = self.ty.zero_code().unwrap_or(8);
                uniform_if_zero(weights);
                let d = fit_signed(values, weights, f32::from(zero), round_f16);
                out[0] = BlockGrid::symmetric(to_f16(d), zero);
            }
            GgufType::Q4_1 => {
                uniform_if_zero(weights);
                let (d, m) = fit_affine(values, weights, 15.0, false, round_f16);
                out[0] = BlockGrid::affine(to_f16(d), to_f16(m));
            }
            GgufType::Q4K => fit_q4k(values, weights, out),
            GgufType::Q6K => fit_q6k(values, weights, out),
        }
    }
}

/// Q8_0: `d = max|x| / 127`, rounded up to f16 so the largest value keeps
/// its code (llama.cpp's Q8_0 uses no importance either).
fn fit_q8_0(values: &[f32]) -> BlockGrid {
    let amax = values.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let raw = amax / 127.0;
    let mut d = to_f16(raw);
    if d.to_f32() < raw && d != f16::MAX {
        d = f16::from_bits(d.to_bits() + 1);
    }
    BlockGrid::symmetric(d, 128)
}

/// Q4_K: every 32-column sub-block gets `d_j q - o_j` (`o_j >= 0`), then
/// `d = max d_j / 63` and `dmin = max o_j / 63` in f16 and each sub-block's
/// 6-bit `sc_j = round(d_j / d)`, `m_j = round(o_j / dmin)`.
#[inline(always)]
fn fit_q4k(values: &[f32], weights: &mut [f32], out: &mut [BlockGrid]) {
    let mut scales = [0.0f32; 8];
    let mut offsets = [0.0f32; 8];
    for (j, (x, w)) in values.chunks(32).zip(weights.chunks_mut(32)).enumerate() {
        uniform_if_zero(w);
        let (d, m) = fit_affine(x, w, 15.0, true, |v| v);
        scales[j] = d;
        offsets[j] = -m;
    }
    let d = super_scale(scales.iter().fold(0.0f32, |a, &s| a.max(s)) / 63.0);
    let dmin = super_scale(offsets.iter().fold(0.0f32, |a, &s| a.max(s)) / 63.0);
    for (j, g) in out.iter_mut().enumerate() {
        let sc = sub_scale(scales[j], d, 0.0, 63.0) as u8;
        let m = sub_scale(offsets[j], dmin, 0.0, 63.0) as u8;
        *g = BlockGrid::q4k(d, dmin, sc, m);
    }
}

/// Q6_K: every 16-column sub-block gets a signed scale `s_j` (codes -32..31),
/// then `d = s_max / -128` in f16 (`s_max` the scale of largest magnitude,
/// mapped onto -128 as llama.cpp does) and each `sc_j = round(s_j / d)`.
#[inline(always)]
fn fit_q6k(values: &[f32], weights: &mut [f32], out: &mut [BlockGrid]) {
    let mut scales = [0.0f32; 16];
    for (j, (x, w)) in values.chunks(16).zip(weights.chunks_mut(16)).enumerate() {
        uniform_if_zero(w);
        scales[j] = fit_signed(x, w, 32.0, |v| v);
    }
    let s_max = scales
        .iter()
        .fold(0.0f32, |a, &s| if s.abs() > a.abs() { s } else { a });
    let d = super_scale(s_max / -128.0);
    for (g, &s) in out.iter_mut().zip(&scales) {
        *g = BlockGrid::q6k(d, sub_scale(s, d, -128.0, 127.0) as i8);
    }
}

/// A super-block scale in f16 (nearest; a non-zero value never becomes 0).
fn super_scale(v: f32) -> f16 {
    let h = to_f16(v);
    if h.to_f32() == 0.0 && v != 0.0 {
        f16::from_bits(1).copysign(f16::from_f32(v))
    } else {
        h
    }
}

/// `round(s / d)` clamped to `[lo, hi]` (0 when `d` is 0).
fn sub_scale(s: f32, d: f16, lo: f32, hi: f32) -> f32 {
    let d = d.to_f32();
    if d == 0.0 {
        return 0.0;
    }
    (s / d).round_ties_even().clamp(lo, hi)
}

/// `v` in f16, saturated to f16's finite range.
fn to_f16(v: f32) -> f16 {
    let max = f16::MAX.to_f32();
    f16::from_f32(v.clamp(-max, max))
}

/// `v` rounded as an f16 scale stores it.
fn round_f16(v: f32) -> f32 {
    to_f16(v).to_f32()
}

/// Weights that are all zero (a span of dead columns) become uniform.
fn uniform_if_zero(w: &mut [f32]) {
    if w.iter().all(|&v| v <= 0.0) {
        w.fill(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::cell::CellGrid;
    use crate::quant::gguf::test_values::row;

    fn weighted_err(g: &BlockGrid, x: &[f32], w: &[f32], max: u32) -> f32 {
        x.iter()
            .zip(w)
            .map(|(&v, &wt)| wt * (g.value(g.code(v, max)) - v).powi(2))
            .sum()
    }

    #[test]
    fn search_beats_the_range_scale() {
        let x = row(32, 3);
        let w: Vec<f32> = (0..32).map(|i| 1.0 + (i % 5) as f32).collect();
        let mut out = [BlockFit::new(GgufType::Q4_0).placeholder()];
        BlockFit::new(GgufType::Q4_0).fit_span(&x, &w, &mut out);
        let xm = x
            .iter()
            .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        let plain = BlockGrid::symmetric(to_f16(xm / -8.0), 8);
        assert!(weighted_err(&out[0], &x, &w, 15) <= weighted_err(&plain, &x, &w, 15));
    }

    #[test]
    fn importance_moves_the_fit_toward_heavy_columns() {
        let x = row(32, 11);
        let flat = vec![1.0f32; 32];
        let mut heavy = flat.clone();
        for v in heavy.iter_mut().take(4) {
            *v = 1000.0;
        }
        let fit = BlockFit::new(GgufType::Q4_1);
        let (mut a, mut b) = ([fit.placeholder()], [fit.placeholder()]);
        fit.fit_span(&x, &flat, &mut a);
        fit.fit_span(&x, &heavy, &mut b);
        let err4 = |g: &BlockGrid| weighted_err(g, &x[..4], &flat[..4], 15);
        assert!(err4(&b[0]) <= err4(&a[0]));
    }

    #[test]
    fn k_quant_sub_scales_fit_their_sub_blocks() {
        let mut x = row(256, 5);
        for v in x[32..64].iter_mut() {
            *v *= 0.05;
        }
        let w = vec![1.0f32; 256];
        let fit = BlockFit::new(GgufType::Q4K);
        let mut out = [fit.placeholder(); 8];
        fit.fit_span(&x, &w, &mut out);
        assert!(out[1].scale < out[0].scale / 4.0);
        assert!(out.iter().all(|g| g.d == out[0].d && g.dmin == out[0].dmin));
        let fit = BlockFit::new(GgufType::Q6K);
        let mut out6 = [fit.placeholder(); 16];
        fit.fit_span(&x, &w, &mut out6);
        // Two more bits: the 6-bit fit's error is far below the 4-bit fit's
        // (16x in step size squared; 4x leaves room for the sub-scale rounding).
        let err4: f32 = (0..8)
            .map(|j| weighted_err(&out[j], &x[32 * j..32 * j + 32], &w[..32], 15))
            .sum();
        let err6: f32 = (0..16)
            .map(|j| weighted_err(&out6[j], &x[16 * j..16 * j + 16], &w[..16], 63))
            .sum();
        assert!(err6 * 4.0 < err4, "{err6} vs {err4}");
    }

    /// FNV-1a over the bits of every grid the fit gives on fixed spans of
    /// every type: magnitudes 1e-3 to 1e3, shifted and centred values, and
    /// flat, varied, partly zero and all-zero importance.
    #[inline(always)]
    fn fitted_grid_hash() -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for ty in GgufType::ALL {
            let fit = BlockFit::new(ty);
            let cols = ty.block_cols();
            let mut out = vec![fit.placeholder(); cols / ty.group_cols()];
            for seed in 0..48u32 {
                let amp = 10f32.powi(seed as i32 % 7 - 3);
                let shift = if seed % 3 == 0 { 0.4 * amp } else { 0.0 };
                let x: Vec<f32> = row(cols, seed).iter().map(|v| v * amp + shift).collect();
                let w: Vec<f32> = (0..cols)
                    .map(|i| match seed % 4 {
                        0 => 1.0,
                        1 => 0.25 + (i * 7 % 11) as f32,
                        2 if i % 3 == 0 => 0.0,
                        2 => 1.0 + (i % 5) as f32,
                        _ => 0.0,
                    })
                    .collect();
                fit.fit_span(&x, &w, &mut out);
                for g in &out {
                    for v in [
                        g.scale.to_bits(),
                        g.min.to_bits(),
                        u32::from(g.zero),
                        u32::from(g.d),
                        u32::from(g.dmin),
                        u32::from(g.sc as u8),
                        u32::from(g.m),
                    ] {
                        h = (h ^ u64::from(v)).wrapping_mul(0x100_0000_01b3);
                    }
                }
            }
        }
        h
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn fitted_grid_hash_avx2() -> u64 {
        fitted_grid_hash()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn fitted_grid_hash_avx512() -> u64 {
        fitted_grid_hash()
    }

    /// The fitted grids are pinned bit for bit, in every compiled copy of
    /// the fit. The value was recorded from the fit that made the GGUF table
    /// of docs/RESULTS-REAL.md (main at 59c530d); the fit has been made
    /// faster since without moving a bit. A change to the candidates, to
    /// the order of any sum or to the f16 rounding changes it, and with it
    /// that table: such a change needs the table re-run.
    #[test]
    fn fitted_grids_are_pinned_bit_for_bit() {
        const PINNED: u64 = 0x7dc3_63d9_d372_1027;
        assert_eq!(fitted_grid_hash(), PINNED, "baseline copy");
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                assert_eq!(unsafe { fitted_grid_hash_avx2() }, PINNED, "AVX2 copy");
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                assert_eq!(unsafe { fitted_grid_hash_avx512() }, PINNED, "AVX-512 copy");
            }
        }
    }
}
