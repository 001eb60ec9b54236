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
//! Two GEMV kernels: a vectorizable one for 2, 4 and 8 bits when every group
//! boundary falls on a block of four words (it unpacks the same field of four
//! consecutive words with one shift, against a copy of `x` shuffled to match),
//! and a general one (any width, any boundaries) that extracts field by field.
//! Rows are split over rayon tasks; each row is computed by one task in a
//! fixed order, so results do not depend on the thread count.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use crate::config::Bits;
use crate::error::{Error, Result};
use crate::quant::QuantizedWeight;

use super::bits::{field, put_field};

/// Words unpacked together by the fast kernel.
const LANES: usize = 4;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// A quantized linear layer that multiplies straight from packed codes.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    bits: Bits,
    symmetric: bool,
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
    fast: bool,
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
        let fast = match b {
            2 | 4 | 8 => {
                let block = LANES * (32 / b) as usize;
                bounds.iter().all(|&x| x % block == 0)
            }
            _ => false,
        };
        Ok(PackedLinear {
            bits: weight.bits(),
            symmetric: weight.symmetric(),
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
            fast,
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

    /// Whether the vectorized GEMV kernel applies (2, 4 or 8 bits with group
    /// boundaries on multiples of `4 * 32 / bits` inputs after sorting).
    pub fn uses_fast_kernel(&self) -> bool {
        self.fast
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
        QuantizedWeight::new(
            self.bits,
            self.symmetric,
            codes,
            scales,
            zeros,
            self.g_idx.clone(),
        )
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
        let xs = if self.fast {
            shuffle(&xp, (32 / b) as usize)
        } else {
            Vec::new()
        };
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, yo) in chunk.iter_mut().enumerate() {
                    let o = c * ROWS_PER_TASK + k;
                    let row = self.row_words(o);
                    let sc = &self.scales[o * self.groups..(o + 1) * self.groups];
                    let ze = &self.zeros[o * self.groups..(o + 1) * self.groups];
                    let mut acc = 0f32;
                    for g in 0..self.groups {
                        let (a, e) = (self.bounds[g], self.bounds[g + 1]);
                        let dot = match (self.fast, b) {
                            (true, 2) => dot_fast::<2>(row, &xs, a, e),
                            (true, 4) => dot_fast::<4>(row, &xs, a, e),
                            (true, 8) => dot_fast::<8>(row, &xs, a, e),
                            _ => dot_general(row, b, &xp, a, e),
                        };
                        acc += sc[g] * (dot - ze[g] * xsum[g]);
                    }
                    *yo = acc + self.bias.as_ref().map_or(0.0, |bv| bv[o]);
                }
            });
        Ok(Array1::from(y))
    }

    /// A batch of tokens: `y = x W^T + b` for `x` of shape `[tokens, in]`,
    /// returning `[tokens, out]`. One token goes through [`PackedLinear::gemv`];
    /// larger batches dequantize each output row once into a scratch buffer
    /// and take its dot product with every token.
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
        let b = self.bits.get();
        let mut yt = vec![0f32; self.out * t];
        if t > 0 {
            yt.par_chunks_mut(t).enumerate().for_each_init(
                || vec![0f32; self.inp],
                |w, (o, yrow)| {
                    let row = self.row_words(o);
                    for g in 0..self.groups {
                        let s = self.scales[o * self.groups + g];
                        let z = self.zeros[o * self.groups + g];
                        for (j, wj) in w
                            .iter_mut()
                            .enumerate()
                            .take(self.bounds[g + 1])
                            .skip(self.bounds[g])
                        {
                            *wj = s * (field(row, b, j) as f32 - z);
                        }
                    }
                    let bias = self.bias.as_ref().map_or(0.0, |bv| bv[o]);
                    for (ti, yv) in yrow.iter_mut().enumerate() {
                        *yv = dot(w, &xp[ti * self.inp..(ti + 1) * self.inp]) + bias;
                    }
                },
            );
        }
        Ok(Array2::from_shape_fn((t, self.out), |(ti, o)| {
            yt[o * t + ti]
        }))
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

/// `sum_{i in a..e} code_i x_i` for `B` in {2, 4, 8}, with `a` and `e` on
/// block boundaries and `xs` shuffled by [`shuffle`].
#[inline]
fn dot_fast<const B: u32>(row: &[u32], xs: &[f32], a: usize, e: usize) -> f32 {
    let v = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    let mut acc = [[0f32; LANES]; 4];
    let words = &row[a / v..e / v];
    let xs = &xs[a..e];
    for (w, xb) in words.chunks_exact(LANES).zip(xs.chunks_exact(LANES * v)) {
        for (k, xk) in xb.chunks_exact(LANES).enumerate() {
            let sh = B * k as u32;
            let acc = &mut acc[k % 4];
            for j in 0..LANES {
                acc[j] += ((w[j] >> sh) & mask) as i32 as f32 * xk[j];
            }
        }
    }
    let mut total = [0f32; LANES];
    for a in &acc {
        for j in 0..LANES {
            total[j] += a[j];
        }
    }
    (total[0] + total[1]) + (total[2] + total[3])
}

/// `sum_{i in a..e} code_i x_i` for any width and boundaries.
fn dot_general(row: &[u32], b: u32, x: &[f32], a: usize, e: usize) -> f32 {
    (a..e).map(|i| field(row, b, i) as f32 * x[i]).sum()
}

/// Dot product with eight independent partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}
