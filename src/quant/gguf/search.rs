//! The candidate search every block and sub-block scale goes through,
//! written from the method of llama.cpp's importance-matrix quantizers (not
//! its code): a few candidate scales around the range-based one; each
//! candidate's codes ranked in closed form by the weighted squared error
//! their own least-squares scale (and minimum) leaves; the best candidate
//! rounded as the format stores it, re-coded, and kept if it beats the
//! range-based scale. Sums run in fixed-order interleaved lanes, so the
//! results are the same on every CPU and thread count.

/// Candidate offsets (in tenths of a code) around the range-based scale.
const STEPS: i32 = 9;

/// Interleaved partial sums per sum: element `i` goes to lane `i % LANES`.
const LANES: usize = 8;

/// One sum over a block, `f(x_i, w_i)` giving element `i`'s term: it runs
/// in [`LANES`] interleaved partial sums, added in lane order at the end.
/// The order is fixed (no dependence on threads or CPU), and unlike one
/// running sum, which is a single chain of dependent additions, the
/// compiler vectorizes it. One sum per call on purpose: with several sums
/// in one loop (one closure returning an array) the compiler paired the
/// sums of one element in a vector instead of the lanes, and the candidate
/// search ran about 4 times slower (docs/PERFORMANCE.md). `x` and `w` have
/// equal lengths.
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
fn round_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// `x` clamped to `[lo, hi]`: `f32::clamp`'s result for every `x`, NaN
/// included, but two compares and selects with no check that `lo <= hi`
/// (`f32::clamp` asserts it, and that panic path kept the candidate loops
/// from being vectorized). Callers pass code bounds with `lo < hi`.
#[inline(always)]
fn clamp_code(x: f32, lo: f32, hi: f32) -> f32 {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// The scale `s` of `s q`, `q` in `-nmax ..= nmax - 1`, minimizing the
/// weighted squared error after `round`. Candidates map the value of
/// largest magnitude onto `-(nmax + step / 10)`; each candidate's codes are
/// ranked in closed form by the error their own least-squares scale leaves
/// ([`signed_gain`]), and only the best one is rounded and re-coded, against
/// the range-based scale. Returns 0 for an all-zero block.
#[inline(always)]
pub(super) fn fit_signed(x: &[f32], w: &[f32], nmax: f32, round: impl Fn(f32) -> f32) -> f32 {
    let xm = x
        .iter()
        .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    if xm == 0.0 {
        return 0.0;
    }
    let err = |s: f32| -> f32 {
        if s == 0.0 || !s.is_finite() {
            return f32::INFINITY;
        }
        let inv = 1.0 / s;
        lane_sum(x, w, |v, wt| {
            let q = round_even(clamp_code(v * inv, -nmax, nmax - 1.0));
            wt * (s * q - v) * (s * q - v)
        })
    };
    let mut best: Option<(f32, f32)> = None;
    for step in -STEPS..=STEPS {
        let iscale = -(nmax + 0.1 * step as f32) / xm;
        let code = |v: f32| round_even(clamp_code(iscale * v, -nmax, nmax - 1.0));
        let xq = lane_sum(x, w, |v, wt| wt * v * code(v));
        let qq = lane_sum(x, w, |v, wt| {
            let q = code(v);
            wt * q * q
        });
        if let Some(gain) = signed_gain(xq, qq) {
            if best.is_none_or(|(g, _)| gain > g) {
                best = Some((gain, xq / qq));
            }
        }
    }
    let range = round(xm / -nmax);
    match best {
        Some((_, s)) if err(round(s)) < err(range) => round(s),
        _ => range,
    }
}

/// With codes `q` fixed, the weighted squared error of `s q` against `x` is
/// smallest at `s = xq / qq` (`xq = sum w x q`, `qq = sum w q^2`), where it
/// is `sum w x^2 - xq^2 / qq`. The first term is the same for every
/// candidate, so candidates compare by the gain `xq^2 / qq` alone (larger is
/// better); `None` when no code is non-zero.
#[inline(always)]
fn signed_gain(xq: f32, qq: f32) -> Option<f32> {
    (qq > 0.0).then(|| xq * (xq / qq))
}

/// The `(d, m)` of `d q + m`, `q` in `0 ..= nmax`, minimizing the weighted
/// squared error after `round` (with `nonpos_min`, `m <= 0`). Candidates
/// spread the range over `nmax + step / 10` codes; each candidate's codes
/// are ranked in closed form by the error their own least-squares `(d, m)`
/// leaves ([`affine_fit`]), and only the best is rounded and re-coded,
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
    let err = |d: f32, m: f32| -> f32 {
        if d <= 0.0 || !d.is_finite() {
            return f32::INFINITY;
        }
        let inv = 1.0 / d;
        lane_sum(x, w, |v, wt| {
            let q = round_even(clamp_code((v - m) * inv, 0.0, nmax));
            wt * (d * q + m - v) * (d * q + m - v)
        })
    };
    let sw = lane_sum(x, w, |_, wt| wt);
    let sx = lane_sum(x, w, |v, wt| wt * v);
    let mut best: Option<(f32, (f32, f32))> = None;
    for step in -STEPS..=STEPS {
        let iscale = (nmax + 0.1 * step as f32) / (hi - lo);
        let code = |v: f32| round_even(clamp_code(iscale * (v - lo), 0.0, nmax));
        let sq = lane_sum(x, w, |v, wt| wt * code(v));
        let sqq = lane_sum(x, w, |v, wt| {
            let q = code(v);
            wt * q * q
        });
        let sqx = lane_sum(x, w, |v, wt| wt * code(v) * v);
        let sums = AffineSums {
            sw,
            sx,
            sq,
            sqq,
            sqx,
        };
        if let Some((gain, dm)) = affine_fit(&sums, nonpos_min) {
            if best.is_none_or(|(g, _)| gain > g) {
                best = Some((gain, dm));
            }
        }
    }
    let range = (round((hi - lo) / nmax), round(lo));
    match best {
        Some((_, (d, m))) if err(round(d), round(m)) < err(range.0, range.1) => {
            (round(d), round(m))
        }
        _ => range,
    }
}

/// Weighted sums over a block for codes `q`: `sw = sum w`, `sx = sum w x`,
/// `sq = sum w q`, `sqq = sum w q^2`, `sqx = sum w q x`.
struct AffineSums {
    sw: f32,
    sx: f32,
    sq: f32,
    sqq: f32,
    sqx: f32,
}

/// The least-squares `(d, m)` of `d q + m` for fixed codes (with
/// `nonpos_min`, `m` held at 0 when it would be positive) and its gain: the
/// weighted squared error is `sum w x^2` minus the gain, so candidates
/// compare by the gain alone (larger is better). `None` when the codes do
/// not determine `(d, m)` (all equal).
#[inline(always)]
fn affine_fit(s: &AffineSums, nonpos_min: bool) -> Option<(f32, (f32, f32))> {
    let det = s.sw * s.sqq - s.sq * s.sq;
    if det <= 0.0 {
        return None;
    }
    let d = (s.sw * s.sqx - s.sq * s.sx) / det;
    let m = (s.sqq * s.sx - s.sq * s.sqx) / det;
    if nonpos_min && m > 0.0 {
        // m = 0: the signed case's closed form on `d q`.
        return signed_gain(s.sqx, s.sqq).map(|g| (g, (s.sqx / s.sqq, 0.0)));
    }
    // At the optimum the error is sum w x^2 - (d sqx + m sx).
    Some((d * s.sqx + m * s.sx, (d, m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8;
                (h % 2001) as f32 / 1000.0 - 1.0 + if i % 7 == 0 { 0.3 } else { 0.0 }
            })
            .collect()
    }

    #[test]
    fn round_even_is_round_ties_even_on_the_code_range() {
        let mut x = -300.0f32;
        while x <= 300.0 {
            for v in [x, x + 0.5, x + 0.499_999_97, x + 0.500_000_06, x + 0.25] {
                // == treats -0 and +0 as equal: the sign of a zero code
                // changes no sum the fit forms.
                assert_eq!(round_even(v), v.round_ties_even(), "{v}");
            }
            x += 1.0;
        }
    }

    #[test]
    fn lane_sum_adds_every_element_once() {
        // 19 elements: two full chunks of 8 and a remainder of 3.
        let x: Vec<f32> = (1..=19).map(|i| i as f32).collect();
        let w = vec![2.0f32; 19];
        assert_eq!(lane_sum(&x, &w, |v, wt| v * wt), 2.0 * 190.0);
        assert_eq!(lane_sum(&x, &w, |_, wt| wt), 38.0);
    }

    /// `sum w (d q + m - x)^2` for the codes `q` and a given `(d, m)`.
    fn error_with_codes(x: &[f32], w: &[f32], q: &[f32], d: f32, m: f32) -> f64 {
        x.iter()
            .zip(w)
            .zip(q)
            .map(|((&v, &wt), &c)| f64::from(wt) * (f64::from(d * c + m) - f64::from(v)).powi(2))
            .sum()
    }

    #[test]
    fn closed_form_gains_are_the_error_their_fit_removes() {
        let x = row(32, 7);
        let w: Vec<f32> = (0..32).map(|i| 0.5 + (i % 3) as f32).collect();
        let total: f64 = x
            .iter()
            .zip(&w)
            .map(|(&v, &wt)| f64::from(wt * v * v))
            .sum();
        // Signed codes.
        let q: Vec<f32> = x
            .iter()
            .map(|&v| (v * 7.3).round().clamp(-8.0, 7.0))
            .collect();
        let xq: f32 = x
            .iter()
            .zip(&w)
            .zip(&q)
            .map(|((&v, &wt), &c)| wt * v * c)
            .sum();
        let qq: f32 = w.iter().zip(&q).map(|(&wt, &c)| wt * c * c).sum();
        let gain = signed_gain(xq, qq).unwrap();
        let direct = error_with_codes(&x, &w, &q, xq / qq, 0.0);
        // f32 sums of 32 terms: a relative error of a few 1e-6 of the total.
        assert!(
            (total - f64::from(gain) - direct).abs() < 1e-5 * total,
            "{gain} {direct}"
        );
        // Affine codes, free minimum and held at 0.
        for (shift, nonpos) in [(0.0, false), (0.0, true), (1.5, true)] {
            let xs: Vec<f32> = x.iter().map(|&v| v + shift).collect();
            let q: Vec<f32> = xs
                .iter()
                .map(|&v| ((v + 1.0) * 7.0).round().clamp(0.0, 15.0))
                .collect();
            let sum = |f: &dyn Fn(f32, f32, f32) -> f32| -> f32 {
                xs.iter()
                    .zip(&w)
                    .zip(&q)
                    .map(|((&v, &wt), &c)| f(v, wt, c))
                    .sum()
            };
            let sums = AffineSums {
                sw: sum(&|_, wt, _| wt),
                sx: sum(&|v, wt, _| wt * v),
                sq: sum(&|_, wt, c| wt * c),
                sqq: sum(&|_, wt, c| wt * c * c),
                sqx: sum(&|v, wt, c| wt * c * v),
            };
            let (gain, (d, m)) = affine_fit(&sums, nonpos).unwrap();
            assert!(!nonpos || m <= 0.0);
            let total: f64 = xs
                .iter()
                .zip(&w)
                .map(|(&v, &wt)| f64::from(wt * v * v))
                .sum();
            let direct = error_with_codes(&xs, &w, &q, d, m);
            assert!(
                (total - f64::from(gain) - direct).abs() < 1e-5 * total,
                "{gain} {direct}"
            );
        }
    }

    #[test]
    fn the_search_keeps_the_candidate_with_the_least_error() {
        // The closed-form ranking picks the same candidate as computing
        // every candidate's least-squares error directly.
        let mut searched = 0;
        for seed in 0..20 {
            let x = row(32, seed);
            let w: Vec<f32> = (0..32)
                .map(|i| 1.0 + ((i * seed as usize) % 7) as f32)
                .collect();
            let xm = x
                .iter()
                .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let mut brute = (f64::INFINITY, 0.0f32);
            for step in -STEPS..=STEPS {
                let iscale = -(8.0 + 0.1 * step as f32) / xm;
                let q: Vec<f32> = x
                    .iter()
                    .map(|&v| round_even((iscale * v).clamp(-8.0, 7.0)))
                    .collect();
                // The scale the fit computes for these codes (same sums).
                let code = |v: f32| round_even((iscale * v).clamp(-8.0, 7.0));
                let xq = lane_sum(&x, &w, |v, wt| wt * v * code(v));
                let qq = lane_sum(&x, &w, |v, wt| wt * code(v) * code(v));
                let e = error_with_codes(&x, &w, &q, xq / qq, 0.0);
                if e < brute.0 {
                    brute = (e, xq / qq);
                }
            }
            let got = fit_signed(&x, &w, 8.0, |v| v);
            let range = xm / -8.0;
            // Unrounded scales: the fit returns the brute-force winner unless
            // the range-based scale re-codes to a lower error.
            assert!(
                got == brute.1 || got == range,
                "seed {seed}: {got} vs {}",
                brute.1
            );
            searched += usize::from(got == brute.1 && got != range);
        }
        // The search is not idle: it beats the range scale on most blocks.
        assert!(searched >= 10, "{searched} of 20");
    }
}
