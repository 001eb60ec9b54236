//! The inverse Cholesky factor of a Hessian the caller gives up, computed in
//! the Hessian's own allocation, grown by one row.
//!
//! For an 11008-wide layer every `n x n` f32 matrix is 485 MB. The borrowed
//! route ([`super::cholesky`]) builds the flipped matrix in a matrix of its
//! own and writes the inverse factor into a third. Here one buffer of
//! `n (n + 1)` values holds them in turn. Seen as a column-major
//! `(n + 1) x n` matrix `B` (`B(r, c)` at `r + c (n + 1)`), and as a
//! row-major `n x (n + 1)` matrix `Q` (`Q[r, c]` at `r (n + 1) + c`, so
//! `Q[r, c] = B(c, r)`):
//!
//! 1. the flipped, ordered, damped matrix `A` and then its Cholesky factor
//!    `L` occupy rows `1..=n` of `B`, column-major as in the borrowed route:
//!    `A(i, j) = B(i + 1, j)`. faer reads and writes its lower triangle
//!    (`B`'s strict lower triangle) and uses its upper one as scratch;
//! 2. `L` is copied to `Q`'s lower triangle, row-major: `Q[i, j] = L(i, j)`,
//!    `j <= i` (entries of `B` on or above its diagonal: the copy reads and
//!    writes disjoint entries);
//! 3. faer's triangular inverse reads that copy and writes `L^-1` through a
//!    view with both axes reversed, `X(i, j)` at `n (n + 1) - 1 - i (n + 1)
//!    - j`, that is `Q[n - 1 - i, n - j]`: for `i >= j` a column of `Q`
//!    right of its row, never an entry of the copy. Entry `(r, c)` of
//!    `U = J L^-1 J` is then `Q[r, c + 1]`: `U` is `Q` without its first
//!    column, rows of `n` contiguous values.
//!
//! The layouts are chosen for the bits: faer's factor depends on neither
//! strides nor alignment, but its triangular inverse gives other roundings
//! unless the output is written through a reversed row-major view, as the
//! borrowed route writes it; the input's layout does not matter.
//!
//! Damping retries need the undamped matrix again, and the factorization
//! overwrites its lower triangle. faer's LLT factorization writes only the
//! lower triangle, except inside the diagonal blocks of its unblocked
//! kernel (row batches at most four vectors wide), where it also writes a
//! few entries just above the diagonal. So the flipped matrix's strict
//! upper triangle, its transpose, survives a failed attempt outside a band
//! along the diagonal: the band is kept ([`RetrySource`], `n x 128` values
//! instead of the half matrix a copy of the triangle would take), and a
//! fingerprint of the rest checks that it did survive before the lower
//! triangle is rebuilt from it. Peak: one matrix and a column, instead of
//! 2.5 matrices for the borrowed route.
//!
//! The arithmetic is the borrowed route's, operation for operation, so the
//! factor is the same bits (tested below, on both sides of the parallel
//! threshold).

use faer::{MatMut, MatRef};
use ndarray::{s, Array2};
use rayon::prelude::*;

use super::cholesky::{checked_scale, damped_attempts, InverseCholesky, LowerFactor};
use crate::config::Damping;
use crate::error::Result;

/// [`super::inverse_cholesky_upper_in_order`] of a Hessian the caller gives
/// up: the same factor, bit for bit, retries included, computed in `h`'s
/// allocation (see the module's documentation).
pub(crate) fn inverse_cholesky_upper_owned(
    h: Array2<f32>,
    perm: Option<&[usize]>,
    damping: &Damping,
) -> Result<InverseCholesky> {
    let n = h.nrows();
    let scale = checked_scale(h.view(), perm)?;
    // Position p of the flipped ordered matrix is row and column
    // flip[p] of h.
    let flip: Vec<usize> = (0..n)
        .map(|p| perm.map_or(n - 1 - p, |perm| perm[n - 1 - p]))
        .collect();
    let mut buf = row_major_vec(h);
    permute_symmetric(&mut buf, n, &flip);
    spread_columns(&mut buf, n);
    let at = |r: usize, c: usize| r + c * (n + 1);
    // The diagonal before damping, and what a retry needs.
    let diag: Vec<f32> = (0..n).map(|j| buf[at(j + 1, j)]).collect();
    let retry = (damping.max_attempts() > 1).then(|| RetrySource::keep(&buf, n));
    let mut llt = LowerFactor::new(n);
    let par = llt.par;
    let damped = damped_attempts(n, scale, damping, |attempt, damp| {
        // Kept whenever a second attempt is allowed; without it, or when
        // the upper triangle did not survive (a factorization that
        // succeeded but gave a non-finite inverse has overwritten it with
        // the factor's copy), the attempt fails rather than factor an
        // overwritten matrix.
        if attempt > 1 && !retry.as_ref().is_some_and(|r| r.restore(&mut buf, n)) {
            return false;
        }
        for (j, d) in diag.iter().enumerate() {
            buf[at(j + 1, j)] = (f64::from(*d) + damp) as f32;
        }
        let ptr = buf.as_mut_ptr();
        // SAFETY: `buf` holds `n (n + 1)` values. The factor's view starts
        // at offset 1 with column stride `n + 1`: its last entry is at
        // `1 + (n - 1) + (n - 1)(n + 1) = n (n + 1) - 1`. No other view of
        // `buf` is alive while it is used.
        let a = unsafe { MatMut::from_raw_parts_mut(ptr.add(1), n, n, 1, (n + 1) as isize) };
        if !llt.factor(a) {
            return false;
        }
        copy_factor_row_major(&mut buf, n);
        let ptr = buf.as_mut_ptr();
        // SAFETY: both views lie in `buf`: the copy's last entry is
        // `Q[n - 1, n - 1] < n (n + 1)`, the reversed view's first is the
        // buffer's last. The triangular inverse reads only the lower
        // triangle of `l` (`Q[r, c]`, `c <= r`) and writes only the lower
        // triangle of `x` (`Q[r, c]`, `c > r`, module documentation): no
        // entry is read through one view and written through the other.
        let (l, x) = unsafe {
            (
                MatRef::from_raw_parts(ptr, n, n, (n + 1) as isize, 1),
                MatMut::from_raw_parts_mut(ptr.add(n * (n + 1) - 1), n, n, -((n + 1) as isize), -1),
            )
        };
        faer::linalg::triangular_inverse::invert_lower_triangular(x, l, par);
        // Row r of U's upper triangle is Q[r, r + 1..=n], contiguous.
        (0..n).all(|r| {
            let row = &buf[r * (n + 2) + 1..(r + 1) * (n + 1)];
            row[0] > 0.0 && row.iter().all(|v| v.is_finite())
        })
    })?;
    drop(retry);
    Ok(InverseCholesky {
        u: upper_factor(buf, n),
        damp_percent: damped.percent,
        damp_absolute: damped.absolute,
        attempts: damped.attempts,
    })
}

/// Entries above the diagonal of the flipped matrix that a factorization
/// may write (module documentation): faer's row batches are at most four
/// 512-bit vectors (64 f32) wide; the band is twice that.
const BAND: usize = 128;

/// What a damping retry rebuilds the undamped flipped matrix from (rows
/// `1..=n` of the column-major buffer, as laid out before the first
/// attempt): the strict upper triangle's entries within [`BAND`] of the
/// diagonal, and a fingerprint of the others.
struct RetrySource {
    band: Vec<f32>,
    outside: u64,
}

impl RetrySource {
    /// Keeps the band and fingerprints the rest of the upper triangle.
    fn keep(buf: &[f32], n: usize) -> Self {
        let mut band = Vec::with_capacity(n * BAND.min(n));
        for j in 0..n {
            band.extend_from_slice(&buf[Self::band_of(j, n)]);
        }
        RetrySource {
            band,
            outside: Self::fingerprint_outside(buf, n),
        }
    }

    /// Column `j`'s band entries (rows `j - BAND ..j` of the matrix).
    fn band_of(j: usize, n: usize) -> std::ops::Range<usize> {
        let col = 1 + j * (n + 1);
        col + j.saturating_sub(BAND)..col + j
    }

    /// A fingerprint of the strict upper triangle outside the band.
    fn fingerprint_outside(buf: &[f32], n: usize) -> u64 {
        let mut h = 0x243f_6a88_85a3_08d3u64;
        for j in BAND..n {
            let col = 1 + j * (n + 1);
            for &v in &buf[col..col + j - BAND] {
                h = (h.rotate_left(5) ^ u64::from(v.to_bits())).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
        }
        h
    }

    /// Puts the band back, checks the rest of the upper triangle is
    /// unchanged, and mirrors the upper triangle into the lower one (the
    /// diagonal is the caller's). `false` when the upper triangle changed.
    fn restore(&self, buf: &mut [f32], n: usize) -> bool {
        let mut from = 0;
        for j in 0..n {
            let cols = Self::band_of(j, n);
            let len = cols.len();
            buf[cols].copy_from_slice(&self.band[from..from + len]);
            from += len;
        }
        if Self::fingerprint_outside(buf, n) != self.outside {
            return false;
        }
        // A(i, j) = A(j, i) for i > j, in 64 x 64 tiles.
        const TILE: usize = 64;
        let s = n + 1;
        for j0 in (0..n).step_by(TILE) {
            for i0 in (j0..n).step_by(TILE) {
                for j in j0..(j0 + TILE).min(n) {
                    for i in i0.max(j + 1)..(i0 + TILE).min(n) {
                        buf[i + 1 + j * s] = buf[j + 1 + i * s];
                    }
                }
            }
        }
        true
    }
}

/// `h`'s values in row-major order, in its own allocation when it has the
/// standard layout (a copy otherwise).
fn row_major_vec(h: Array2<f32>) -> Vec<f32> {
    if h.is_standard_layout() {
        let (values, offset) = h.into_raw_vec_and_offset();
        if offset.unwrap_or(0) == 0 {
            return values;
        }
        return values[offset.unwrap_or(0)..].to_vec();
    }
    h.iter().copied().collect()
}

/// Reorders the symmetric row-major `n x n` matrix in `buf` in place to
/// `M[i, j] = H[order[i], order[j]]`: rows by following the permutation's
/// cycles with one spare row, then each row through a copy of itself.
fn permute_symmetric(buf: &mut [f32], n: usize, order: &[usize]) {
    let mut spare = vec![0f32; n];
    let mut placed = vec![false; n];
    for start in 0..n {
        if placed[start] {
            continue;
        }
        spare.copy_from_slice(&buf[start * n..(start + 1) * n]);
        let mut k = start;
        loop {
            placed[k] = true;
            let from = order[k];
            if from == start {
                buf[k * n..(k + 1) * n].copy_from_slice(&spare);
                break;
            }
            buf.copy_within(from * n..(from + 1) * n, k * n);
            k = from;
        }
    }
    buf.par_chunks_mut(n.max(1)).for_each_init(
        || vec![0f32; n],
        |copy, row| {
            copy.copy_from_slice(row);
            for (v, &from) in row.iter_mut().zip(order) {
                *v = copy[from];
            }
        },
    );
}

/// Moves the column-major `n x n` matrix in `buf` (column stride `n`) to
/// rows `1..=n` of a column-major `(n + 1) x n` one, growing the allocation
/// by `n` values (in place for large buffers: the allocator remaps them).
fn spread_columns(buf: &mut Vec<f32>, n: usize) {
    buf.reserve_exact(n);
    buf.resize(n * (n + 1), 0.0);
    // From the last column: each moves right, past every column not yet moved.
    for j in (0..n).rev() {
        buf.copy_within(j * n..(j + 1) * n, j * (n + 1) + 1);
    }
}

/// Copies the factor `L` from rows `1..=n` of the column-major `B` to the
/// lower triangle of the row-major `Q` (`Q[i, j] = B(i + 1, j)`, `j <= i`),
/// in 64 x 64 tiles: one side is read down columns, the other written
/// along rows.
fn copy_factor_row_major(buf: &mut [f32], n: usize) {
    const TILE: usize = 64;
    let s = n + 1;
    for j0 in (0..n).step_by(TILE) {
        for i0 in (j0..n).step_by(TILE) {
            for j in j0..(j0 + TILE).min(n) {
                for i in i0.max(j)..(i0 + TILE).min(n) {
                    buf[i * s + j] = buf[i + 1 + j * s];
                }
            }
        }
    }
}

/// `U` from the buffer holding `L^-1` (module documentation): `Q` without
/// its first column, its strict lower triangle (the copy of `L`) cleared.
fn upper_factor(mut buf: Vec<f32>, n: usize) -> Array2<f32> {
    for r in 1..n {
        let row = 1 + r * (n + 1);
        buf[row..row + r].fill(0.0);
    }
    Array2::from_shape_vec((n, n + 1), buf)
        .expect("n (n + 1) values")
        .slice_move(s![.., 1..])
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::linalg::inverse_cholesky_upper_in_order;

    /// Uniform values in [-0.5, 0.5) from a fixed seed.
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// The Gram matrix of `rows` random rows of width `n`, columns scaled
    /// differently so the order matters.
    fn gram(n: usize, rows: usize, seed: u64) -> Array2<f32> {
        let mut next = uniform(seed);
        let x = Array2::from_shape_fn((rows, n), |(_, j)| next() * (1 + j % 7) as f32);
        x.t().dot(&x)
    }

    /// Checks the owned factor against the borrowed one, bit for bit, in
    /// the natural order and in a scrambled one, and that the owned factor
    /// has a clean lower triangle and rows `n + 1` apart (the buffer's).
    fn same_as_borrowed(h: &Array2<f32>) -> u32 {
        let n = h.nrows();
        let perm: Vec<usize> = (0..n).map(|i| (i * 7 + 3) % n).collect();
        let damping = Damping::default();
        let mut attempts = 0;
        for order in [None, Some(perm.as_slice())] {
            let want = inverse_cholesky_upper_in_order(h.view(), order, &damping).unwrap();
            let got = inverse_cholesky_upper_owned(h.clone(), order, &damping).unwrap();
            assert_eq!(got.attempts, want.attempts, "n {n}");
            assert_eq!(got.damp_absolute, want.damp_absolute, "n {n}");
            assert!(
                got.u == want.u,
                "n {n}, order {:?}: factors differ",
                order.is_some()
            );
            assert!((1..n).all(|i| (0..i).all(|j| got.u[[i, j]] == 0.0)));
            if n > 1 {
                assert_eq!(got.u.strides(), &[n as isize + 1, 1]);
            }
            attempts = got.attempts;
        }
        attempts
    }

    /// Sizes through faer's recursive blocks (and 7 coprime to the
    /// scrambled order's step, so the order is a permutation).
    #[test]
    fn the_owned_factor_is_the_borrowed_factor_bit_for_bit() {
        for (n, seed) in [
            (1, 1),
            (2, 2),
            (17, 3),
            (96, 4),
            (401, 5),
            (701, 7),
            (1100, 8),
        ] {
            let h = gram(n, 3 * n + 2, seed);
            assert_eq!(same_as_borrowed(&h), 1);
        }
    }

    /// Above the parallel threshold, on pools of 1 and 3 threads: faer's
    /// parallel inverse writes both halves of the buffer at once.
    #[test]
    fn the_owned_factor_is_the_borrowed_factor_on_threads() {
        let h = gram(1601, 1700, 6);
        for threads in [1, 3] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| assert_eq!(same_as_borrowed(&h), 1));
        }
    }

    /// Rank 10 of `n`, shifted down by 3% of the mean diagonal: 1%
    /// damping fails, 10% succeeds.
    fn needs_a_retry(n: usize) -> Array2<f32> {
        let mut h = gram(n, 10, 0x9e37_79b9);
        let mean = h.diag().sum() / n as f32;
        for i in 0..n {
            h[[i, i]] -= 0.03 * mean;
        }
        h
    }

    /// A Hessian the first damping cannot factor: the retry rebuilds the
    /// flipped matrix from the kept band and the surviving upper triangle,
    /// and gives the borrowed route's factor, below and through faer's
    /// recursive blocks and above the parallel threshold.
    #[test]
    fn a_retry_from_the_upper_triangle_is_the_fresh_factor() {
        for n in [41, 300, 1100] {
            assert!(
                same_as_borrowed(&needs_a_retry(n)) > 1,
                "n {n}: the first damping must fail"
            );
        }
        let h = needs_a_retry(1601);
        for threads in [1, 3] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| assert!(same_as_borrowed(&h) > 1));
        }
    }

    /// The retry source on a buffer laid out as before an attempt: the band
    /// and the lower triangle come back after being overwritten, and a
    /// change to the upper triangle outside the band is caught.
    #[test]
    fn the_retry_source_rebuilds_the_lower_triangle_and_catches_a_changed_upper_one() {
        let n = 300;
        let h = gram(n, 320, 11);
        let mut buf = row_major_vec(h.clone());
        spread_columns(&mut buf, n);
        let original = buf.clone();
        let kept = RetrySource::keep(&buf, n);
        let at = |r: usize, c: usize| r + c * (n + 1);
        // What a failed attempt may leave: the lower triangle and the band
        // overwritten.
        for j in 0..n {
            for i in j.saturating_sub(BAND)..n {
                if i != j {
                    buf[at(i + 1, j)] = f32::NAN;
                }
            }
        }
        assert!(kept.restore(&mut buf, n));
        assert!(buf
            .iter()
            .zip(&original)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // An entry above the band changed: no rebuild.
        buf[at(5, 5 + BAND + 1)] += 1.0;
        assert!(!kept.restore(&mut buf, n));
    }

    /// Without attempts left to retry, nothing is kept, and a Hessian the
    /// single damping cannot factor is an error, as for the borrowed route.
    #[test]
    fn a_single_attempt_keeps_no_copy_and_fails_cleanly() {
        let n = 41;
        let mut h = gram(n, 10, 0x9e37_79b9);
        let mean = h.diag().sum() / n as f32;
        for i in 0..n {
            h[[i, i]] -= 0.03 * mean;
        }
        let once = Damping::new(0.01, 10.0, 1).unwrap();
        let borrowed = inverse_cholesky_upper_in_order(h.view(), None, &once);
        let owned = inverse_cholesky_upper_owned(h, None, &once);
        assert!(matches!(borrowed, Err(Error::IndefiniteHessian { .. })));
        assert!(matches!(owned, Err(Error::IndefiniteHessian { .. })));
    }
}
