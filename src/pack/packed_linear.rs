//! A linear layer `y = x W^T + b` computed straight from packed codes.
//!
//! Internal layout: each output row keeps its codes as one bit stream of
//! `ceil(in * bits / 32)` words (the transpose of `qweight`, so a row is
//! contiguous), with the inputs sorted by group. Under act-order that sort is
//! a permutation of the input columns, applied to `x` once per call, which
//! makes every group a contiguous run. Per group `g` of row `o`:
//! `y_o += scale[g, o] * (sum_{i in g} code_i x_i - zero[g, o] * sum_{i in g} x_i)`,
//! with the group sums of `x` computed once per token.
//!
//! GEMV kernels: for 2, 4 and 8 bits, a block kernel that unpacks the same
//! field of four consecutive words with one shift against a copy of `x`
//! shuffled to match (an AVX2 build chosen at run time, else a portable one),
//! used for every group that starts on a block of four words, over the whole
//! blocks it holds; a general kernel (any width, any boundaries) that
//! extracts field by field does the rest (3 bits, unaligned groups, and the
//! tail of a ragged group).
//! Rows are split over rayon tasks; each row is computed by one task in a
//! fixed order, so results do not depend on the thread count. The AVX2 and
//! portable kernels sum in different orders, so results may differ in the
//! last bits between CPUs with and without AVX2. Figures: `docs/PERFORMANCE.md`.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use crate::config::{Bits, GroupSize};
use crate::error::{Error, Result};
use crate::quant::QuantizedWeight;

use super::bits::{field, put_field};

/// Words unpacked together by the fast kernel.
const LANES: usize = 4;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 16;
/// Below this many weights a batched forward dequantizes on the calling thread.
const SERIAL_WORK: usize = 1 << 20;

/// A quantized linear layer that multiplies straight from packed codes.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    bits: Bits,
    symmetric: bool,
    group_size: GroupSize,
    static_groups: bool,
    out: usize,
    inp: usize,
    groups: usize,
    g_idx: Vec<u32>,
    perm: Option<Vec<u32>>,
    bounds: Vec<usize>,
    words_per_row: usize,
    words: Vec<u32>,
    scales: Vec<f32>,
    zeros: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// Per group: the end of the prefix the block kernel handles (equal to
    /// the group start when it handles none).
    fast_end: Vec<usize>,
}

impl PackedLinear {
    /// Packs `weight` (any bit width 2..=8, any `g_idx`) with an optional
    /// bias of `out_features` values.
    pub fn new(weight: &QuantizedWeight, bias: Option<Array1<f32>>) -> Result<Self> {
        let (out, inp, groups) = (weight.out_features(), weight.in_features(), weight.groups());
        let b = weight.bits().get();
        if let Some(bv) = &bias {
            if bv.len() != out {
                return Err(Error::shape("bias [out]", &[out], &[bv.len()]));
            }
        }
        let g_idx: Vec<u32> = weight.g_idx().to_vec();
        let mut bounds = vec![0usize; groups + 1];
        for &g in &g_idx {
            bounds[g as usize + 1] += 1;
        }
        for g in 0..groups {
            bounds[g + 1] += bounds[g];
        }
        let sorted = g_idx.windows(2).all(|w| w[0] <= w[1]);
        let perm = (!sorted).then(|| {
            let mut next = bounds.clone();
            let mut p = vec![0u32; inp];
            for (i, &g) in g_idx.iter().enumerate() {
                p[next[g as usize]] = i as u32;
                next[g as usize] += 1;
            }
            p
        });
        let words_per_row = (inp * b as usize).div_ceil(32);
        let mut words = vec![0u32; out * words_per_row];
        let codes = weight.codes();
        if words_per_row > 0 {
            for (o, row) in words.chunks_mut(words_per_row).enumerate() {
                for j in 0..inp {
                    let i = perm.as_ref().map_or(j, |p| p[j] as usize);
                    put_field(row, b, j, u32::from(codes[[o, i]]));
                }
            }
        }
        let scales = weight.scales().t().iter().copied().collect();
        let zeros = weight.zeros().t().iter().map(|&z| f32::from(z)).collect();
        let fast_end = bounds
            .windows(2)
            .map(|w| match b {
                2 | 4 | 8 => {
                    let block = LANES * (32 / b) as usize;
                    if w[0] % block == 0 {
                        w[0] + (w[1] - w[0]) / block * block
                    } else {
                        w[0]
                    }
                }
                _ => w[0],
            })
            .collect();
        Ok(PackedLinear {
            bits: weight.bits(),
            symmetric: weight.symmetric(),
            group_size: weight.group_size(),
            static_groups: weight.static_groups(),
            out,
            inp,
            groups,
            g_idx,
            perm,
            bounds,
            words_per_row,
            words,
            scales,
            zeros,
            bias: bias.map(|v| v.to_vec()),
            fast_end,
        })
    }

    /// Bit width.
    pub fn bits(&self) -> Bits {
        self.bits
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_deref().map(ArrayView1::from)
    }

    /// Whether the vectorized GEMV kernel handles every input (2, 4 or 8
    /// bits with group boundaries on multiples of `4 * 32 / bits` inputs after
    /// sorting). When it is false, [`PackedLinear::fast_inputs`] tells how
    /// many inputs it still handles.
    pub fn uses_fast_kernel(&self) -> bool {
        self.fast_inputs() == self.inp
    }

    /// How many inputs (per output) the vectorized GEMV kernel handles; the
    /// general kernel does the rest.
    pub fn fast_inputs(&self) -> usize {
        self.fast_end
            .iter()
            .zip(&self.bounds)
            .map(|(&e, &a)| e - a)
            .sum()
    }

    /// Bytes held by the packed codes, scales and zero points.
    pub fn memory_bytes(&self) -> usize {
        4 * (self.words.len() + self.scales.len() + self.zeros.len())
    }

    /// The quantized weight these packed codes stand for (exact inverse of
    /// [`PackedLinear::new`]).
    pub fn to_quantized_weight(&self) -> Result<QuantizedWeight> {
        let b = self.bits.get();
        let mut codes = Array2::<u8>::zeros((self.out, self.inp));
        for o in 0..self.out {
            let row = self.row_words(o);
            for j in 0..self.inp {
                let i = self.perm.as_ref().map_or(j, |p| p[j] as usize);
                codes[[o, i]] = field(row, b, j) as u8;
            }
        }
        let scales = Array2::from_shape_fn((self.groups, self.out), |(g, o)| {
            self.scales[o * self.groups + g]
        });
        let zeros = Array2::from_shape_fn((self.groups, self.out), |(g, o)| {
            self.zeros[o * self.groups + g] as u8
        });
        Ok(QuantizedWeight::grouped(
            self.bits,
            self.symmetric,
            self.group_size,
            codes,
            scales,
            zeros,
            self.g_idx.clone(),
        )?
        .with_static_groups(self.static_groups))
    }

    fn row_words(&self, o: usize) -> &[u32] {
        &self.words[o * self.words_per_row..(o + 1) * self.words_per_row]
    }

    /// `x` reordered into the internal (group-sorted) input order.
    fn permuted(&self, x: ArrayView1<'_, f32>) -> Vec<f32> {
        match &self.perm {
            Some(p) => p.iter().map(|&i| x[i as usize]).collect(),
            None => x.iter().copied().collect(),
        }
    }

    /// One token: `y = W x + b` for `x` of length `in_features`.
    pub fn gemv(&self, x: ArrayView1<'_, f32>) -> Result<Array1<f32>> {
        if x.len() != self.inp {
            return Err(Error::shape("gemv input [in]", &[self.inp], &[x.len()]));
        }
        let xp = self.permuted(x);
        let xsum: Vec<f32> = self
            .bounds
            .windows(2)
            .map(|w| xp[w[0]..w[1]].iter().sum())
            .collect();
        let mut y = vec![0f32; self.out];
        let b = self.bits.get();
        let xs = if self.fast_inputs() > 0 {
            shuffle(&xp, (32 / b) as usize)
        } else {
            Vec::new()
        };
        let avx2 = has_avx2();
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, yo) in chunk.iter_mut().enumerate() {
                    let o = c * ROWS_PER_TASK + k;
                    *yo = self.gemv_row(o, &xs, &xp, &xsum, avx2);
                }
            });
        Ok(Array1::from(y))
    }

    /// Output `o` of the GEMV: per group, the packed dot product corrected by
    /// the zero point, times the scale; plus the bias.
    #[inline(always)]
    fn gemv_row(&self, o: usize, xs: &[f32], xp: &[f32], xsum: &[f32], avx2: bool) -> f32 {
        let row = self.row_words(o);
        let b = self.bits.get();
        let sc = &self.scales[o * self.groups..(o + 1) * self.groups];
        let ze = &self.zeros[o * self.groups..(o + 1) * self.groups];
        let mut acc = 0f32;
        for g in 0..self.groups {
            let (a, f, e) = (self.bounds[g], self.fast_end[g], self.bounds[g + 1]);
            let fast = match (f > a, b) {
                (true, 2) => dot_fast::<2, 16>(row, xs, a, f, avx2),
                (true, 4) => dot_fast::<4, 8>(row, xs, a, f, avx2),
                (true, 8) => dot_fast::<8, 4>(row, xs, a, f, avx2),
                _ => 0.0,
            };
            let dot = if f < e {
                fast + dot_general(row, b, xp, f, e)
            } else {
                fast
            };
            acc += sc[g] * (dot - ze[g] * xsum[g]);
        }
        acc + self.bias.as_ref().map_or(0.0, |bv| bv[o])
    }

    /// A batch of tokens: `y = x W^T + b` for `x` of shape `[tokens, in]`,
    /// returning `[tokens, out]`. One token goes through [`PackedLinear::gemv`];
    /// larger batches dequantize the weight once per call (each output row by
    /// one task, into a temporary `[out, in]` buffer that is dropped on return)
    /// and multiply all tokens with it in one deterministic matrix product.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (t, n) = x.dim();
        if n != self.inp {
            return Err(Error::shape(
                "forward input [tokens, in]",
                &[t, self.inp],
                &[t, n],
            ));
        }
        if t == 1 {
            let y = self.gemv(x.row(0))?;
            return Ok(y.insert_axis(ndarray::Axis(0)));
        }
        let mut xp = Vec::with_capacity(t * self.inp);
        for row in x.rows() {
            xp.extend(self.permuted(row));
        }
        // Dequantize the rows (in the kernel's input order) once per call, each
        // row by one task, then one deterministic matrix product for all tokens.
        let b = self.bits.get();
        let mut w = Array2::<f32>::zeros((self.out, self.inp));
        let dequantize_row = |(o, mut wrow): (usize, ndarray::ArrayViewMut1<'_, f32>)| {
            let row = self.row_words(o);
            for g in 0..self.groups {
                let s = self.scales[o * self.groups + g];
                let z = self.zeros[o * self.groups + g];
                for j in self.bounds[g]..self.bounds[g + 1] {
                    wrow[j] = s * (field(row, b, j) as f32 - z);
                }
            }
        };
        if self.out * self.inp < SERIAL_WORK {
            w.outer_iter_mut().enumerate().for_each(dequantize_row);
        } else {
            w.outer_iter_mut()
                .into_par_iter()
                .enumerate()
                .for_each(dequantize_row);
        }
        let xp = Array2::from_shape_vec((t, self.inp), xp).expect("t rows of inp values");
        let mut y = crate::linalg::matmul(xp.view(), w.t());
        if let Some(bias) = &self.bias {
            y += &ndarray::ArrayView1::from(&bias[..]);
        }
        Ok(y)
    }
}

/// Reorders `x` in blocks of `LANES * v` inputs so that field `k` of the
/// `LANES` words of a block meets `xs[block + LANES * k .. + LANES]`.
fn shuffle(x: &[f32], v: usize) -> Vec<f32> {
    let block = LANES * v;
    let mut xs = vec![0f32; x.len().div_ceil(block) * block];
    for (src, dst) in x.chunks(block).zip(xs.chunks_mut(block)) {
        for (idx, &val) in src.iter().enumerate() {
            let (j, k) = (idx / v, idx % v);
            dst[k * LANES + j] = val;
        }
    }
    xs
}

/// `sum_{i in a..e} code_i x_i` for `B` in {2, 4, 8} (`V = 32 / B` values per
/// word), with `a` and `e` on block boundaries and `xs` shuffled by
/// [`shuffle`]. Uses the AVX2 kernel when `avx2` is set (checked by the
/// caller with [`has_avx2`]), else the portable one.
#[inline(always)]
fn dot_fast<const B: u32, const V: usize>(
    row: &[u32],
    xs: &[f32],
    a: usize,
    e: usize,
    avx2: bool,
) -> f32 {
    let words = &row[a / V..e / V];
    let xs = &xs[a..e];
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller checked at run time that the CPU supports AVX2.
        return unsafe { avx2_kernel::dot::<B, V>(words, xs) };
    }
    let _ = avx2;
    dot_portable::<B, V>(words, xs)
}

/// Portable kernel: field `k` of four consecutive words is taken with one
/// uniform shift and meets `xs[4k .. 4k + 4]`; two accumulator sets halve the
/// dependency chain.
fn dot_portable<const B: u32, const V: usize>(words: &[u32], xs: &[f32]) -> f32 {
    let mask = (1u32 << B) - 1;
    let mut even = [0f32; LANES];
    let mut odd = [0f32; LANES];
    for (w, xb) in words.chunks_exact(LANES).zip(xs.chunks_exact(LANES * V)) {
        let w = [w[0], w[1], w[2], w[3]];
        for (k, x2) in xb.chunks_exact(2 * LANES).enumerate() {
            let (s0, s1) = (2 * B * k as u32, 2 * B * k as u32 + B);
            for j in 0..LANES {
                even[j] += ((w[j] >> s0) & mask) as i32 as f32 * x2[j];
                odd[j] += ((w[j] >> s1) & mask) as i32 as f32 * x2[LANES + j];
            }
        }
    }
    (even[0] + odd[0] + even[1] + odd[1]) + (even[2] + odd[2] + even[3] + odd[3])
}

#[cfg(target_arch = "x86_64")]
mod avx2_kernel {
    use std::arch::x86_64::*;

    use super::LANES;

    /// AVX2 kernel: a 256-bit register holds the four words of a block and
    /// the same words shifted right by `B`, so lane `j` exposes field
    /// `2p + j / 4` of word `j % 4` and meets the eight contiguous floats
    /// `xs[8p .. 8p + 8]`; after each step the register shifts right by `2B`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot<const B: u32, const V: usize>(words: &[u32], xs: &[f32]) -> f32 {
        let mask = _mm256_set1_epi32(((1u32 << B) - 1) as i32);
        let one_field = _mm_cvtsi32_si128(B as i32);
        let two_fields = _mm_cvtsi32_si128(2 * B as i32);
        let mut acc = [_mm256_setzero_ps(); 2];
        for (w, xb) in words.chunks_exact(LANES).zip(xs.chunks_exact(LANES * V)) {
            // SAFETY: `w` holds exactly 4 u32 (16 bytes); unaligned load.
            let w4 = unsafe { _mm_loadu_si128(w.as_ptr().cast()) };
            let mut cur = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(w4),
                _mm_srl_epi32(w4, one_field),
            );
            for (p, x8) in xb.chunks_exact(2 * LANES).enumerate() {
                // SAFETY: `x8` holds exactly 8 f32 (32 bytes); unaligned load.
                let x = unsafe { _mm256_loadu_ps(x8.as_ptr()) };
                let v = _mm256_cvtepi32_ps(_mm256_and_si256(cur, mask));
                acc[p % 2] = _mm256_add_ps(acc[p % 2], _mm256_mul_ps(v, x));
                cur = _mm256_srl_epi32(cur, two_fields);
            }
        }
        let mut lanes = [0f32; 2 * LANES];
        // SAFETY: `lanes` holds exactly 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1])) };
        ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    }
}

/// `sum_{i in a..e} code_i x_i` for any width and boundaries.
fn dot_general(row: &[u32], b: u32, x: &[f32], a: usize, e: usize) -> f32 {
    (a..e).map(|i| field(row, b, i) as f32 * x[i]).sum()
}

/// Whether the AVX2 build of the GEMV row kernel can run on this CPU.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both fast kernels against a plain field-by-field sum. Codes and inputs are
    /// small multiples of powers of two, so every partial sum is exact in f32 and the
    /// kernels must agree exactly whatever their summation order.
    fn check<const B: u32, const V: usize>() {
        let n_words = 4 * 6;
        let words: Vec<u32> = (0..n_words as u32)
            .map(|i| i.wrapping_mul(0x9E37_79B9) ^ 0x5A5A_1234)
            .collect();
        let n = n_words * V;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 / 4.0 - 1.5).collect();
        let want: f32 = (0..n).map(|i| field(&words, B, i) as f32 * x[i]).sum();
        let xs = shuffle(&x, V);
        assert_eq!(
            dot_portable::<B, V>(&words, &xs),
            want,
            "portable, {B} bits"
        );
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 support was just checked.
            let got = unsafe { avx2_kernel::dot::<B, V>(&words, &xs) };
            assert_eq!(got, want, "avx2, {B} bits");
        }
    }

    #[test]
    fn pack_fast_kernels_match_field_by_field_sum() {
        check::<2, 16>();
        check::<4, 8>();
        check::<8, 4>();
    }
}
