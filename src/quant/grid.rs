//! Fitting one row's grid over a group of columns, and mapping values to codes.

use ndarray::ArrayView2;

use crate::config::{QuantScheme, ScalePrecision};
use crate::error::{Error, Result};

/// Scale and integer zero point of one output row within one group.
///
/// Code of a value `w`: `clamp(round(w / scale) + zero, 0, max_code)` (round
/// half to even, as the reference does); its value: `scale * (code - zero)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridParams {
    /// Step between neighbouring codes (> 0; representable in f16 unless
    /// the scheme solves with [`ScalePrecision::F32`]).
    pub scale: f32,
    /// Integer zero point in `0..=max_code`.
    pub zero: u8,
}

impl GridParams {
    /// The integer code of `w` on this grid.
    #[inline]
    pub fn code(&self, w: f32, max_code: u32) -> u8 {
        let q = (w / self.scale).round_ties_even() + f32::from(self.zero);
        q.clamp(0.0, max_code as f32) as u8
    }

    /// The real value a code stands for.
    #[inline]
    pub fn value(&self, code: u8) -> f32 {
        self.scale * (f32::from(code) - f32::from(self.zero))
    }

    /// `value(code(w))`.
    #[inline]
    pub fn quantize(&self, w: f32, max_code: u32) -> f32 {
        self.value(self.code(w, max_code))
    }
}

/// Fits [`GridParams`] to a row of values under a [`QuantScheme`].
#[derive(Debug, Clone, Copy)]
pub struct GridFit {
    scheme: QuantScheme,
    max_code: u32,
}

impl GridFit {
    /// A fitter for `scheme`.
    pub fn new(scheme: QuantScheme) -> Self {
        GridFit {
            scheme,
            max_code: scheme.bits().max_code(),
        }
    }

    /// The largest code of the scheme.
    pub fn max_code(&self) -> u32 {
        self.max_code
    }

    /// Fits the grid to `values` (one output row, one group of columns).
    ///
    /// Asymmetric: the range `[min, max]` is widened to include 0, `scale =
    /// (max - min) / max_code`, `zero = round(-min / scale)`. Symmetric:
    /// `scale = 2 max|w| / max_code`, `zero = (max_code + 1) / 2`. An all-zero
    /// row uses the range `[-1, 1]`. With [`ScalePrecision::F16`] (the
    /// default) scales are rounded up to f16 precision so a GPTQ checkpoint
    /// (f16 scales) reproduces the solver's weights exactly; with
    /// [`ScalePrecision::F32`] the f32 scale is used as is.
    ///
    /// The symmetric range differs from the reference's in one case: for a
    /// group with no negative value the reference keeps the range minimum at
    /// 0 (`scale = max / max_code`) while centering the zero point, which
    /// clips every value above about `max / 2`; this fit always uses the
    /// symmetric range `[-max|w|, max|w|]`, which represents the whole group.
    /// With MSE clip search, the range is shrunk on a grid and the fit with
    /// the lowest `sum |q - w|^norm` is kept.
    pub fn fit(&self, values: &[f32]) -> GridParams {
        let (mut lo, mut hi) = (0.0f32, 0.0f32);
        for &v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if self.scheme.symmetric() {
            hi = hi.max(-lo);
            lo = -hi;
        }
        if lo == 0.0 && hi == 0.0 {
            lo = -1.0;
            hi = 1.0;
        }
        let best = self.params_for_range(lo, hi);
        let Some(mse) = self.scheme.mse() else {
            return best;
        };
        let mut best = best;
        let mut best_err = f32::INFINITY;
        let steps = (mse.max_shrink() * mse.grid() as f32) as u32;
        for k in 0..steps {
            let p = 1.0 - k as f32 / mse.grid() as f32;
            let cand = self.params_for_range(p * lo, p * hi);
            let err: f32 = values
                .iter()
                .map(|&v| (cand.quantize(v, self.max_code) - v).abs().powf(mse.norm()))
                .sum();
            if err < best_err {
                best_err = err;
                best = cand;
            }
        }
        best
    }

    fn params_for_range(&self, lo: f32, hi: f32) -> GridParams {
        let raw = (hi - lo) / self.max_code as f32;
        let scale = match self.scheme.scale_precision() {
            ScalePrecision::F16 => f16_representable(raw),
            ScalePrecision::F32 => raw.max(f32::MIN_POSITIVE),
        };
        let zero = if self.scheme.symmetric() {
            self.max_code.div_ceil(2)
        } else {
            ((-lo / scale)
                .round_ties_even()
                .clamp(0.0, self.max_code as f32)) as u32
        };
        GridParams {
            scale,
            zero: zero as u8,
        }
    }
}

/// Checks that every group of `w` (`[out, in]`, groups of `g` consecutive
/// columns, the last possibly shorter) gets a scale its precision can hold.
/// With f16 scales: a range so wide that its scale exceeds f16's largest
/// value would be clamped (every weight badly wrong), and a non-zero range
/// whose scale is below f16's smallest positive value would round every
/// weight to zero; both errors recommend [`ScalePrecision::F32`]. With f32
/// scales the same two limits apply at f32's range: a range that overflows
/// f32, or a non-zero range whose scale is below the smallest normal f32
/// (subnormal weights, which the grid would turn into zeros). All are
/// [`Error::Unencodable`] errors naming the output and the group.
pub(crate) fn check_scales(w: ArrayView2<'_, f32>, scheme: &QuantScheme, g: usize) -> Result<()> {
    if g == 0 {
        return Ok(());
    }
    let max_code = scheme.bits().max_code() as f32;
    let f16 = scheme.scale_precision() == ScalePrecision::F16;
    let (largest, smallest, advice) = if f16 {
        (
            half::f16::MAX.to_f32(),
            half::f16::from_bits(1).to_f32(),
            "; solve with ScalePrecision::F32",
        )
    } else {
        (f32::MAX, f32::MIN_POSITIVE, "; rescale the weights")
    };
    let precision = if f16 { "f16" } else { "f32" };
    for (o, row) in w.outer_iter().enumerate() {
        for (k, start) in (0..row.len()).step_by(g).enumerate() {
            let (mut lo, mut hi) = (0.0f32, 0.0f32);
            for &v in row.iter().skip(start).take(g) {
                lo = lo.min(v);
                hi = hi.max(v);
            }
            let range = if scheme.symmetric() {
                2.0 * hi.max(-lo)
            } else {
                hi - lo
            };
            let scale = range / max_code;
            let problem = if scale > largest || !scale.is_finite() {
                "so large that their scale exceeds the largest"
            } else if range > 0.0 && scale < smallest {
                "so small that their scale is below the smallest (every weight would become 0)"
            } else {
                continue;
            };
            return Err(Error::Unencodable {
                what: format!("weights of output {o}, group {k} (range {range:e})"),
                reason: format!("{problem} {precision} scale{advice}"),
            });
        }
    }
    Ok(())
}

/// Rounds a positive scale up to the next f16 value (within f16's positive
/// finite range), so the stored grid still spans the fitted range: rounding to
/// nearest could shrink it and clip the extreme weights.
fn f16_representable(scale: f32) -> f32 {
    let min = half::f16::from_bits(1).to_f32();
    let max = half::f16::MAX.to_f32();
    let scale = scale.clamp(min, max);
    let mut h = half::f16::from_f32(scale);
    if h.to_f32() < scale {
        h = half::f16::from_bits(h.to_bits() + 1);
    }
    h.to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Bits, QuantScheme};

    #[test]
    fn asymmetric_grid_covers_range_and_zero() {
        let fit = GridFit::new(QuantScheme::new(Bits::new(2).unwrap()));
        let p = fit.fit(&[0.5, 1.0, 1.5]);
        // range widened to [0, 1.5]: scale 0.5, zero 0
        assert_eq!(p.scale, 0.5);
        assert_eq!(p.zero, 0);
        assert_eq!(p.code(1.5, 3), 3);
        assert_eq!(p.quantize(1.0, 3), 1.0);
    }

    #[test]
    fn symmetric_grid_is_centered() {
        let fit = GridFit::new(QuantScheme::new(Bits::new(4).unwrap()).with_symmetric(true));
        let p = fit.fit(&[-3.0, 1.0]);
        assert_eq!(p.zero, 8);
        assert_eq!(p.scale, f16_representable(6.0 / 15.0));
    }

    #[test]
    fn all_zero_row_gets_unit_range() {
        let fit = GridFit::new(QuantScheme::new(Bits::new(8).unwrap()));
        let p = fit.fit(&[0.0; 4]);
        assert!(p.scale > 0.0);
        assert_eq!(p.quantize(0.0, 255), 0.0);
    }

    #[test]
    fn ties_round_to_even() {
        let p = GridParams {
            scale: 1.0,
            zero: 0,
        };
        assert_eq!(p.code(2.5, 15), 2);
        assert_eq!(p.code(3.5, 15), 4);
    }

    #[test]
    fn mse_search_never_increases_error() {
        let vals: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 20.0) / 7.0)
            .collect();
        let base = QuantScheme::new(Bits::new(3).unwrap());
        let plain = GridFit::new(base).fit(&vals);
        let clip = GridFit::new(base.with_mse(Default::default())).fit(&vals);
        let err = |p: GridParams| -> f32 {
            vals.iter()
                .map(|&v| (p.quantize(v, 7) - v).abs().powf(2.4))
                .sum()
        };
        assert!(err(clip) <= err(plain));
    }
}
