//! The candidate search every block and sub-block scale goes through,
//! written from the method of llama.cpp's importance-matrix quantizers (not
//! its code): a few candidate scales around the range-based one; each
//! candidate's codes ranked in closed form by the weighted squared error
//! their own least-squares scale (and minimum) leaves; the best candidate
//! rounded as the format stores it, re-coded, and kept if it beats the
//! range-based scale. Sums run in fixed-order interleaved lanes, so the
//! results are the same on every CPU and thread count; the candidate passes
//! form every candidate's sums at once ([`super::candidates`]), in that
//! same order.

use super::candidates::{affine_sums, signed_sums, CANDIDATES, SLOTS};
use super::rank::{affine_rank, best_slot, larger, max_of_lanes, signed_rank, AffineSums};

/// Candidate offsets (in tenths of a code) around the range-based scale.
pub(super) const STEPS: i32 = 9;

/// Interleaved partial sums per sum: element `i` goes to lane `i % LANES`.
pub(super) const LANES: usize = 8;

/// One sum over a block, `f(x_i, w_i)` giving element `i`'s term: it runs
/// in [`LANES`] interleaved partial sums, added in lane order at the end.
/// The order is fixed (no dependence on threads or CPU), and unlike one
/// running sum, which is a single chain of dependent additions, the
/// compiler vectorizes it. One sum per call on purpose: with several sums
/// in one loop (one closure returning an array) the compiler paired the
/// sums of one element in a vector instead of the lanes (docs/PERFORMANCE.md).
/// The search uses it for the sums outside the candidate passes; those
/// follow the same order for all candidates at once. `x` and `w` have equal
/// lengths.
#[inline(always)]
fn lane_sum(x: &[f32], w: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (xc, xr) = x.as_chunks::<LANES>();
    let (wc, wr) = w.as_chunks::<LANES>();
    for (xs, ws) in xc.iter().zip(wc) {
        for l in 0..LANES {
            acc[l] += f(xs[l], ws[l]);
        }
    }
    let mut out = acc.iter().sum::<f32>();
    for (&v, &wt) in xr.iter().zip(wr) {
        out += f(v, wt);
    }
    out
}

/// `x` rounded to the nearest integer, ties to even, for `|x| <= 2^22`
/// (callers clamp to the code range first, which commutes with rounding
/// since the bounds are integers). Adding and removing `1.5 * 2^23` leaves
/// the float adder to do the rounding: the same result as
/// `f32::round_ties_even`, but plain arithmetic the compiler vectorizes,
/// where the baseline x86-64 target turns `round_ties_even` into a library
/// call per value (the candidate search rounds each weight ~20 times).
#[inline(always)]
pub(super) fn round_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// `x` clamped to `[lo, hi]`: `f32::clamp`'s result for every `x`, NaN
/// included, but two compares and selects with no check that `lo <= hi`
/// (`f32::clamp` asserts it, and that panic path kept the candidate loops
/// from being vectorized). Callers pass code bounds with `lo < hi`.
#[inline(always)]
pub(super) fn clamp_code(x: f32, lo: f32, hi: f32) -> f32 {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// The first value of largest magnitude in `x` (NaNs skipped), or 0 when
/// every value is 0. The largest magnitude is found in [`LANES`] partial
/// maxima (exact in any order: magnitudes carry no sign), then the first
/// value that has it: the result of folding `x` with "keep the new value
/// if its magnitude is strictly larger", without that fold's chain of
/// dependent compares and selects.
#[inline(always)]
fn largest_magnitude(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (chunks, rest) = x.as_chunks::<LANES>();
    for xs in chunks {
        for (m, &v) in lanes.iter_mut().zip(xs) {
            *m = larger(v.abs(), *m);
        }
    }
    let amax = rest
        .iter()
        .fold(max_of_lanes(lanes), |m, &v| larger(v.abs(), m));
    if amax == 0.0 {
        return 0.0;
    }
    // The first value with that magnitude, a chunk of [`LANES`] at a time.
    for xs in chunks {
        let mut hits = 0u32;
        for (l, v) in xs.iter().enumerate() {
            hits |= u32::from(v.abs() == amax) << l;
        }
        if hits != 0 {
            return xs[hits.trailing_zeros() as usize % LANES];
        }
    }
    rest.iter()
        .copied()
        .find(|v| v.abs() == amax)
        .unwrap_or(0.0)
}

/// The scale `s` of `s q`, `q` in `-nmax ..= nmax - 1`, minimizing the
/// weighted squared error after `round`. Candidates map the value of
/// largest magnitude onto `-(nmax + step / 10)`; each candidate's codes are
/// ranked in closed form by the error their own least-squares scale leaves
/// ([`signed_rank`]), and only the best one is rounded and re-coded, against
/// the range-based scale. Returns 0 for an all-zero block.
#[inline(always)]
pub(super) fn fit_signed(x: &[f32], w: &[f32], nmax: f32, round: impl Fn(f32) -> f32) -> f32 {
    let xm = largest_magnitude(x);
    if xm == 0.0 {
        return 0.0;
    }
    let iscale = candidate_slots(|step| -(nmax + 0.1 * step as f32) / xm);
    let (xq, qq) = signed_sums(x, w, &iscale, nmax);
    let (mut gain, mut scale, mut valid) = ([0.0f32; SLOTS], [0.0f32; SLOTS], [false; SLOTS]);
    for c in 0..SLOTS {
        let r = signed_rank(xq[c], qq[c]);
        (gain[c], scale[c], valid[c]) = (r.gain, r.d, r.valid);
    }
    // The slots past the last candidate repeat it: they tie with it and
    // never win, since only a strictly larger gain replaces the kept one.
    let best = best_slot(&gain, &valid).map(|c| scale[c]);
    let range = round(xm / -nmax);
    let Some(s) = best else {
        return range;
    };
    let s = round(s);
    if signed_error(x, w, nmax, s) < signed_error(x, w, nmax, range) {
        s
    } else {
        range
    }
}

/// The inverse scale of every candidate step, `-STEPS ..= STEPS` in order,
/// from `iscale(step)`; the slots past [`CANDIDATES`] repeat the last one.
#[inline(always)]
fn candidate_slots(iscale: impl Fn(i32) -> f32) -> [f32; SLOTS] {
    let mut out = [0.0f32; SLOTS];
    for (c, s) in out.iter_mut().enumerate() {
        *s = iscale(c.min(CANDIDATES - 1) as i32 - STEPS);
    }
    out
}

/// The `(d, m)` of `d q + m`, `q` in `0 ..= nmax`, minimizing the weighted
/// squared error after `round` (with `nonpos_min`, `m <= 0`). Candidates
/// spread the range over `nmax + step / 10` codes; each candidate's codes
/// are ranked in closed form by the error their own least-squares `(d, m)`
/// leaves ([`affine_rank`]), and only the best is rounded and re-coded,
/// against the range-based `(d, m)`.
#[inline(always)]
pub(super) fn fit_affine(
    x: &[f32],
    w: &[f32],
    nmax: f32,
    nonpos_min: bool,
    round: impl Fn(f32) -> f32,
) -> (f32, f32) {
    let mut lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if nonpos_min {
        lo = lo.min(0.0);
    }
    if hi <= lo {
        return (0.0, round(lo));
    }
    let sw = lane_sum(x, w, |_, wt| wt);
    let sx = lane_sum(x, w, |v, wt| wt * v);
    let iscale = candidate_slots(|step| (nmax + 0.1 * step as f32) / (hi - lo));
    let [sq, sqq, sqx] = affine_sums(x, w, &iscale, lo, nmax);
    let (mut gain, mut dm, mut valid) =
        ([0.0f32; SLOTS], [(0.0f32, 0.0f32); SLOTS], [false; SLOTS]);
    for c in 0..SLOTS {
        let sums = AffineSums {
            sw,
            sx,
            sq: sq[c],
            sqq: sqq[c],
            sqx: sqx[c],
        };
        let r = affine_rank(&sums, nonpos_min);
        (gain[c], dm[c], valid[c]) = (r.gain, (r.d, r.m), r.valid);
    }
    // The slots past the last candidate never win (as in `fit_signed`).
    let best = best_slot(&gain, &valid).map(|c| dm[c]);
    let range = (round((hi - lo) / nmax), round(lo));
    let Some((d, m)) = best else {
        return range;
    };
    let dm = (round(d), round(m));
    if affine_error(x, w, nmax, dm) < affine_error(x, w, nmax, range) {
        dm
    } else {
        range
    }
}

/// The weighted squared error `sum w (s q - x)^2` of scale `s` after
/// re-coding (`q = round(clamp(x / s))`, through the reciprocal); infinite
/// for a zero or non-finite scale.
#[inline(always)]
fn signed_error(x: &[f32], w: &[f32], nmax: f32, s: f32) -> f32 {
    if s == 0.0 || !s.is_finite() {
        return f32::INFINITY;
    }
    let inv = 1.0 / s;
    lane_sum(x, w, |v, wt| {
        let q = round_even(clamp_code(v * inv, -nmax, nmax - 1.0));
        wt * (s * q - v) * (s * q - v)
    })
}

/// The weighted squared error `sum w (d q + m - x)^2` of `(d, m)` after
/// re-coding (`q = round(clamp((x - m) / d))`, through the reciprocal);
/// infinite unless `d` is positive and finite.
#[inline(always)]
fn affine_error(x: &[f32], w: &[f32], nmax: f32, (d, m): (f32, f32)) -> f32 {
    if d <= 0.0 || !d.is_finite() {
        return f32::INFINITY;
    }
    let inv = 1.0 / d;
    lane_sum(x, w, |v, wt| {
        let q = round_even(clamp_code((v - m) * inv, 0.0, nmax));
        wt * (d * q + m - v) * (d * q + m - v)
    })
}

#[cfg(test)]
mod tests;
