//! The candidate passes of the block search ([`super::search`]) for every
//! candidate scale at once.
//!
//! Each candidate's sums are the fixed-order sums of [`super::search`]'s
//! `lane_sum`: element `i` goes to partial sum `i % LANES`, each partial
//! sum adds its elements in order starting from 0, the partial sums are
//! added in lane order, and the elements after the last whole chunk of
//! `LANES` are added last, one by one. Here the vector lanes run over the
//! candidates instead of the elements: one partial sum (one lane `l`) is
//! formed for all candidates side by side, then added to their totals. Every
//! candidate sees the same additions in the same order as a sum of its own,
//! so the results are bit for bit those of one `lane_sum` per candidate,
//! while the loops need no horizontal additions (which cost as much as the
//! sums themselves on a 32-value block) and each element's code is formed
//! once for all its sums. The candidate loops are as wide as the compiled
//! copy allows (8 lanes with AVX2, 16 with AVX-512).

use super::search::{clamp_code, round_even, LANES, STEPS};

/// Candidate scales per search (steps `-STEPS ..= STEPS`).
pub(super) const CANDIDATES: usize = 2 * STEPS as usize + 1;

/// Candidate slots: [`CANDIDATES`] rounded up to whole vectors of 8. The
/// slots past [`CANDIDATES`] repeat the last candidate and are not read.
pub(super) const SLOTS: usize = 24;

/// Per-candidate sums `sum w x q` and `sum w q^2` for signed codes
/// `q = round(clamp(iscale x, -nmax, nmax - 1))`, one per slot of `iscale`.
/// `x` and `w` have equal lengths.
#[inline(always)]
pub(super) fn signed_sums(
    x: &[f32],
    w: &[f32],
    iscale: &[f32; SLOTS],
    nmax: f32,
) -> ([f32; SLOTS], [f32; SLOTS]) {
    let code = |s: f32, v: f32| round_even(clamp_code(s * v, -nmax, nmax - 1.0));
    let mut xq = [0.0f32; SLOTS];
    let mut qq = [0.0f32; SLOTS];
    let (xc, xr) = x.as_chunks::<LANES>();
    let (wc, wr) = w.as_chunks::<LANES>();
    for l in 0..LANES {
        let mut lane_xq = [0.0f32; SLOTS];
        let mut lane_qq = [0.0f32; SLOTS];
        for (xs, ws) in xc.iter().zip(wc) {
            let (v, wt) = (xs[l], ws[l]);
            let wv = wt * v;
            for c in 0..SLOTS {
                let q = code(iscale[c], v);
                lane_xq[c] += wv * q;
                lane_qq[c] += wt * q * q;
            }
        }
        for c in 0..SLOTS {
            xq[c] += lane_xq[c];
            qq[c] += lane_qq[c];
        }
    }
    for (&v, &wt) in xr.iter().zip(wr) {
        let wv = wt * v;
        for c in 0..SLOTS {
            let q = code(iscale[c], v);
            xq[c] += wv * q;
            qq[c] += wt * q * q;
        }
    }
    (xq, qq)
}

/// Per-candidate sums `sum w q`, `sum w q^2` and `sum w q x` for affine
/// codes `q = round(clamp(iscale (x - lo), 0, nmax))`, one per slot of
/// `iscale`. `x` and `w` have equal lengths.
#[inline(always)]
pub(super) fn affine_sums(
    x: &[f32],
    w: &[f32],
    iscale: &[f32; SLOTS],
    lo: f32,
    nmax: f32,
) -> [[f32; SLOTS]; 3] {
    let code = |s: f32, v: f32| round_even(clamp_code(s * (v - lo), 0.0, nmax));
    let mut sq = [0.0f32; SLOTS];
    let mut sqq = [0.0f32; SLOTS];
    let mut sqx = [0.0f32; SLOTS];
    let (xc, xr) = x.as_chunks::<LANES>();
    let (wc, wr) = w.as_chunks::<LANES>();
    for l in 0..LANES {
        let mut lane_q = [0.0f32; SLOTS];
        let mut lane_qq = [0.0f32; SLOTS];
        let mut lane_qx = [0.0f32; SLOTS];
        for (xs, ws) in xc.iter().zip(wc) {
            let (v, wt) = (xs[l], ws[l]);
            for c in 0..SLOTS {
                let q = code(iscale[c], v);
                let wq = wt * q;
                lane_q[c] += wq;
                lane_qq[c] += wq * q;
                lane_qx[c] += wq * v;
            }
        }
        for c in 0..SLOTS {
            sq[c] += lane_q[c];
            sqq[c] += lane_qq[c];
            sqx[c] += lane_qx[c];
        }
    }
    for (&v, &wt) in xr.iter().zip(wr) {
        for c in 0..SLOTS {
            let q = code(iscale[c], v);
            let wq = wt * q;
            sq[c] += wq;
            sqq[c] += wq * q;
            sqx[c] += wq * v;
        }
    }
    [sq, sqq, sqx]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sum_i term(x_i, w_i)` in the search's fixed order, written out as
    /// plainly as possible: element `i` of the whole chunks goes to partial
    /// sum `i % LANES`, each partial sum starts at 0 and adds its elements
    /// in order, the partial sums are added in lane order, then the
    /// elements past the last whole chunk one by one.
    fn reference_sum(x: &[f32], w: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
        let whole = x.len() / LANES * LANES;
        let mut lanes = [0.0f32; LANES];
        for i in 0..whole {
            lanes[i % LANES] += term(x[i], w[i]);
        }
        let mut total = 0.0f32;
        for lane in lanes {
            total += lane;
        }
        for i in whole..x.len() {
            total += term(x[i], w[i]);
        }
        total
    }

    /// Blocks of every length up to 300 (whole chunks and remainders), with
    /// magnitudes from 1e-6 to 1e4, zeros, equal values and zero weights.
    fn blocks() -> Vec<(Vec<f32>, Vec<f32>)> {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut unif = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        (1..=300)
            .map(|len| {
                let amp = 10f32.powf(unif() * 10.0 - 6.0);
                let x = (0..len)
                    .map(|i| match len % 4 {
                        0 if i % 3 == 0 => 0.0,
                        1 => amp * (unif() - 0.3) * (unif() - 0.5),
                        2 => amp,
                        _ => amp * (unif() - 0.5),
                    })
                    .collect();
                let w = (0..len)
                    .map(|i| if i % 5 == 0 { 0.0 } else { 0.1 + unif() })
                    .collect();
                (x, w)
            })
            .collect()
    }

    fn slots(first: f32, step: f32) -> [f32; SLOTS] {
        std::array::from_fn(|c| first + step * c.min(CANDIDATES - 1) as f32)
    }

    /// Every sum of every block and candidate, in bits.
    #[inline(always)]
    fn all_sums(blocks: &[(Vec<f32>, Vec<f32>)]) -> Vec<u32> {
        let mut out = Vec::new();
        for (x, w) in blocks {
            let xm = x.iter().fold(1e-30f32, |a, v| a.max(v.abs()));
            let lo = x.iter().fold(0.0f32, |a, &v| a.min(v));
            let (xq, qq) = signed_sums(x, w, &slots(-7.1 / xm, -0.1 / xm), 8.0);
            let [sq, sqq, sqx] = affine_sums(x, w, &slots(14.1 / xm, 0.1 / xm), lo, 15.0);
            for sums in [xq, qq, sq, sqq, sqx] {
                out.extend(sums[..CANDIDATES].iter().map(|v| v.to_bits()));
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn all_sums_avx2(blocks: &[(Vec<f32>, Vec<f32>)]) -> Vec<u32> {
        all_sums(blocks)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn all_sums_avx512(blocks: &[(Vec<f32>, Vec<f32>)]) -> Vec<u32> {
        all_sums(blocks)
    }

    #[test]
    fn candidate_sums_are_one_fixed_order_sum_per_candidate() {
        let blocks = blocks();
        let mut expected = Vec::new();
        for (x, w) in &blocks {
            let xm = x.iter().fold(1e-30f32, |a, v| a.max(v.abs()));
            let lo = x.iter().fold(0.0f32, |a, &v| a.min(v));
            let signed = slots(-7.1 / xm, -0.1 / xm);
            let affine = slots(14.1 / xm, 0.1 / xm);
            let sq = |s: f32, v: f32| round_even(clamp_code(s * v, -8.0, 7.0));
            let aq = |s: f32, v: f32| round_even(clamp_code(s * (v - lo), 0.0, 15.0));
            let mut per_sum: [Vec<u32>; 5] = Default::default();
            for c in 0..CANDIDATES {
                let (s, a) = (signed[c], affine[c]);
                let sums = [
                    reference_sum(x, w, |v, wt| wt * v * sq(s, v)),
                    reference_sum(x, w, |v, wt| wt * sq(s, v) * sq(s, v)),
                    reference_sum(x, w, |v, wt| wt * aq(a, v)),
                    reference_sum(x, w, |v, wt| wt * aq(a, v) * aq(a, v)),
                    reference_sum(x, w, |v, wt| wt * aq(a, v) * v),
                ];
                for (dst, v) in per_sum.iter_mut().zip(sums) {
                    dst.push(v.to_bits());
                }
            }
            expected.extend(per_sum.into_iter().flatten());
        }
        assert_eq!(all_sums(&blocks), expected, "baseline copy");
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                assert_eq!(unsafe { all_sums_avx2(&blocks) }, expected, "AVX2 copy");
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                assert_eq!(
                    unsafe { all_sums_avx512(&blocks) },
                    expected,
                    "AVX-512 copy"
                );
            }
        }
    }
}
