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
//! overwrites it: a copy of its strict lower triangle (half a matrix) is
//! kept while attempts remain. Peak: 1.5 matrices instead of 2.5.
//!
//! The arithmetic is the borrowed route's, operation for operation, so the
//! factor is the same bits (tested below, on both sides of the parallel
//! threshold).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::{MatMut, MatRef, Spec};
use ndarray::{s, Array2};
use rayon::prelude::*;

use super::cholesky::{checked_scale, damped_attempts, factor_par, InverseCholesky};
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
    // The diagonal before damping, and the strict lower triangle for
    // retries, column by column.
    let diag: Vec<f32> = (0..n).map(|j| buf[at(j + 1, j)]).collect();
    let backup = (damping.max_attempts() > 1).then(|| {
        let mut kept = Vec::with_capacity(n * n.saturating_sub(1) / 2);
        for j in 0..n {
            kept.extend_from_slice(&buf[at(j + 2, j)..at(n + 1, j)]);
        }
        kept
    });
    let par = factor_par(n);
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Spec::default()));
    let damped = damped_attempts(n, scale, damping, |attempt, damp| {
        if attempt > 1 {
            // Kept whenever a second attempt is allowed; without it the
            // attempt fails rather than factor an overwritten matrix.
            let Some(kept) = backup.as_ref() else {
                return false;
            };
            let mut from = 0;
            for j in 0..n {
                let len = n - 1 - j;
                buf[at(j + 2, j)..at(n + 1, j)].copy_from_slice(&kept[from..from + len]);
                from += len;
            }
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
        let factored = cholesky_in_place(
            a,
            Default::default(),
            par,
            MemStack::new(&mut scratch),
            Spec::default(),
        );
        if factored.is_err() {
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
    drop(backup);
    Ok(InverseCholesky {
        u: upper_factor(buf, n),
        damp_percent: damped.percent,
        damp_absolute: damped.absolute,
        attempts: damped.attempts,
    })
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

    /// A Hessian the first damping cannot factor: the retry restores the
    /// flipped matrix from the kept triangle and gives the borrowed
    /// route's factor.
    #[test]
    fn a_retry_from_the_kept_triangle_is_the_fresh_factor() {
        // Rank 10 of 41, shifted down by 3% of the mean diagonal: 1%
        // damping fails, 10% succeeds.
        let n = 41;
        let mut h = gram(n, 10, 0x9e37_79b9);
        let mean = h.diag().sum() / n as f32;
        for i in 0..n {
            h[[i, i]] -= 0.03 * mean;
        }
        assert!(same_as_borrowed(&h) > 1, "the first damping must fail");
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
