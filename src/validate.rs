//! Input checks shared by the public entry points.

use ndarray::{ArrayBase, Data, Dimension};

use crate::error::{Error, Result};

/// Errors with the position of the first NaN or infinity in `a` (logical order).
pub(crate) fn check_finite<S, D>(what: &str, a: ArrayBase<S, D>) -> Result<()>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    if let Some(mem) = a.as_slice_memory_order() {
        // Fast path: a branch-free exponent test per chunk (vectorized); the
        // logical index below is only looked for when something is found.
        let non_finite = |c: &[f32]| {
            c.iter().fold(false, |acc, v| {
                acc | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
            })
        };
        if !mem.chunks(4096).any(non_finite) {
            return Ok(());
        }
    }
    if let Some(flat) = a.iter().position(|v| !v.is_finite()) {
        let mut index = vec![0; a.ndim()];
        let mut rest = flat;
        for (slot, &len) in index.iter_mut().zip(a.shape()).rev() {
            *slot = rest % len;
            rest /= len;
        }
        return Err(Error::NonFinite {
            what: what.to_string(),
            index,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    fn index_of(r: Result<()>) -> Vec<usize> {
        match r {
            Err(Error::NonFinite { index, .. }) => index,
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }

    #[test]
    fn finds_the_first_non_finite_entry_in_logical_order() {
        let mut a = Array2::<f32>::zeros((90, 100));
        assert!(check_finite("a", a.view()).is_ok());
        // Past the first 4096-element chunk, and in a transposed view, whose
        // memory order differs from its logical order.
        a[[70, 3]] = f32::NAN;
        a[[50, 80]] = f32::NEG_INFINITY;
        assert_eq!(index_of(check_finite("a", a.view())), vec![50, 80]);
        assert_eq!(index_of(check_finite("a", a.t())), vec![3, 70]);
        // A strided view that skips both takes the slow path and passes.
        assert!(check_finite("a", a.slice(s![..50, ..80])).is_ok());
        a[[2, 1]] = f32::INFINITY;
        assert_eq!(
            index_of(check_finite("a", a.slice(s![..;2, ..]))),
            vec![1, 1]
        );
        assert_eq!(
            index_of(check_finite("a", a.slice(s![..;2, 2..]))),
            vec![25, 78]
        );
    }
}
