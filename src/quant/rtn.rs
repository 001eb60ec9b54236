//! Round-to-nearest: every weight rounded on a grid fitted to the original weight.

use ndarray::{Array2, ArrayView2};

use crate::config::QuantScheme;
use crate::error::Result;
use crate::quant::grid::check_scales;
use crate::quant::{GridFit, QuantizedWeight};
use crate::validate::check_finite;

/// Quantizes `w` (`[out, in]`) by rounding each value to the nearest point of
/// its group's grid, the baseline every solver is compared with.
///
/// ```
/// use ndarray::array;
/// use vlmq::{quantize_rtn, Bits, QuantScheme};
/// let w = array![[0.1f32, -0.4, 0.3, 0.9]];
/// let q = quantize_rtn(w.view(), &QuantScheme::new(Bits::new(8)?))?;
/// let back = q.dequantize();
/// assert!((back[[0, 3]] - 0.9).abs() < 0.01);
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn quantize_rtn(w: ArrayView2<'_, f32>, scheme: &QuantScheme) -> Result<QuantizedWeight> {
    check_finite("weight", w)?;
    let (out, inp) = w.dim();
    let g = scheme.group_size().columns_for(inp)?;
    let groups = scheme.group_size().groups_for(inp)?;
    check_scales(w, scheme, g)?;
    let fit = GridFit::new(*scheme);
    let max_code = fit.max_code();
    let mut codes = Array2::<u8>::zeros((out, inp));
    let mut scales = Array2::<f32>::zeros((groups, out));
    let mut zeros = Array2::<u8>::zeros((groups, out));
    let mut row = vec![0.0f32; g];
    for o in 0..out {
        for gi in 0..groups {
            // The last group of a ragged layer is shorter.
            let cols = gi * g..((gi + 1) * g).min(inp);
            let vals = &mut row[..cols.len()];
            for (v, c) in vals.iter_mut().zip(cols.clone()) {
                *v = w[[o, c]];
            }
            let p = fit.fit(vals);
            scales[[gi, o]] = p.scale;
            zeros[[gi, o]] = p.zero;
            for (&v, c) in vals.iter().zip(cols) {
                codes[[o, c]] = p.code(v, max_code);
            }
        }
    }
    let g_idx = (0..inp).map(|i| (i / g) as u32).collect();
    QuantizedWeight::grouped(
        scheme.bits(),
        scheme.symmetric(),
        scheme.group_size(),
        codes,
        scales,
        zeros,
        g_idx,
    )
}
