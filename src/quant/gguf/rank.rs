//! Ranking the candidates of the block search ([`super::search`]) in closed
//! form, and picking the one the search keeps.
//!
//! With a candidate's codes fixed, the weighted squared error of its own
//! least-squares scale (and minimum) is `sum w x^2` minus a gain computed
//! from the sums the candidate pass forms; `sum w x^2` is the same for every
//! candidate, so candidates compare by the gain alone (larger is better).
//! Every function here is branch-free per candidate, so the ranking of all
//! candidate slots runs as vector loops.

use super::candidates::SLOTS;
use super::search::LANES;

/// One candidate's closed-form fit: `d q + m` (signed codes: `m = 0`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Ranked {
    /// Whether the codes determine a fit (not all zero, or not all equal).
    pub valid: bool,
    /// The error the fit removes (meaningful when `valid`).
    pub gain: f32,
    /// The least-squares scale.
    pub d: f32,
    /// The least-squares minimum.
    pub m: f32,
}

/// Signed codes `q`: the weighted squared error of `s q` against `x` is
/// smallest at `s = xq / qq` (`xq = sum w x q`, `qq = sum w q^2`), where it
/// is `sum w x^2 - xq^2 / qq`: the gain is `xq (xq / qq)`. Not valid when no
/// code is non-zero.
#[inline(always)]
pub(super) fn signed_rank(xq: f32, qq: f32) -> Ranked {
    let d = xq / qq;
    Ranked {
        valid: qq > 0.0,
        gain: xq * d,
        d,
        m: 0.0,
    }
}

/// Weighted sums over a block for codes `q`: `sw = sum w`, `sx = sum w x`,
/// `sq = sum w q`, `sqq = sum w q^2`, `sqx = sum w q x`.
pub(super) struct AffineSums {
    pub sw: f32,
    pub sx: f32,
    pub sq: f32,
    pub sqq: f32,
    pub sqx: f32,
}

/// Affine codes `q`: the least-squares `(d, m)` of `d q + m` and its gain
/// `d sqx + m sx` (the error at the optimum is `sum w x^2` minus it). With
/// `nonpos_min`, a positive `m` is held at 0, which leaves the signed case
/// on `d q` ([`signed_rank`] of `sqx`, `sqq`). Not valid when the codes do
/// not determine `(d, m)` (all equal: `det <= 0`).
#[inline(always)]
pub(super) fn affine_rank(s: &AffineSums, nonpos_min: bool) -> Ranked {
    let det = s.sw * s.sqq - s.sq * s.sq;
    let d = (s.sw * s.sqx - s.sq * s.sx) / det;
    let m = (s.sqq * s.sx - s.sq * s.sqx) / det;
    // Not `det <= 0`: a NaN determinant is ranked (as a NaN gain).
    let solvable = det > 0.0 || det.is_nan();
    let held = signed_rank(s.sqx, s.sqq);
    if nonpos_min && m > 0.0 {
        Ranked {
            valid: solvable && held.valid,
            ..held
        }
    } else {
        Ranked {
            valid: solvable,
            gain: d * s.sqx + m * s.sx,
            d,
            m,
        }
    }
}

/// The slot the search keeps: scanning the slots in order, the first valid
/// one, then each later valid one whose gain is strictly larger than the
/// kept one's. Found without that scan's chain of dependent compares: the
/// largest gain of the valid slots (in [`LANES`] partial maxima; NaN
/// skipped; exact in any order), then the first valid slot that has it. A
/// NaN gain only wins as the first valid slot (no gain compares larger than
/// it, and it compares larger than none). `None` when no slot is valid.
#[inline(always)]
pub(super) fn best_slot(gain: &[f32; SLOTS], valid: &[bool; SLOTS]) -> Option<usize> {
    const { assert!(SLOTS.is_multiple_of(LANES)) };
    let first = valid.iter().position(|&v| v)?;
    if gain[first].is_nan() {
        return Some(first);
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let (gains, _) = gain.as_chunks::<LANES>();
    let (valids, _) = valid.as_chunks::<LANES>();
    for (gs, vs) in gains.iter().zip(valids) {
        for l in 0..LANES {
            let g = if vs[l] { gs[l] } else { f32::NEG_INFINITY };
            lanes[l] = larger(g, lanes[l]);
        }
    }
    let max = max_of_lanes(lanes);
    (first..SLOTS).find(|&c| valid[c] && gain[c] == max)
}

/// `a` if it is larger than `b`, else `b`.
#[inline(always)]
pub(super) fn larger(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The largest of [`LANES`] values that hold no NaN, in a tree of three
/// steps (the maximum of such values does not depend on the order).
#[inline(always)]
pub(super) fn max_of_lanes(m: [f32; LANES]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| larger(m[i], m[i + 4]));
    let q: [f32; 2] = std::array::from_fn(|i| larger(h[i], h[i + 2]));
    larger(q[0], q[1])
}

#[cfg(test)]
mod tests;
