//! Input checks shared by the public entry points.

use ndarray::{ArrayBase, Data, Dimension};

use crate::error::{Error, Result};

/// Errors with the position of the first NaN or infinity in `a` (logical order).
pub(crate) fn check_finite<S, D>(what: &str, a: ArrayBase<S, D>) -> Result<()>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
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
