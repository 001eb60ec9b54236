//! One block's (or K-quant sub-block's) grid, with the header fields it is
//! packed from.

use half::f16;

use crate::quant::cell::CellGrid;

/// The grid of one row over one GGUF block (or K-quant sub-block).
///
/// A code `q` decodes to `scale * (q - zero) - min`, computed in f32 exactly
/// as candle's (and llama.cpp's) dequantization computes it for the type:
/// `scale` is the f16 block scale (`d`, or `d * sc` for the K-quants, one
/// rounded f32 product), `min` is 0, `-m` (Q4_1) or `dmin * m` (Q4_K), and
/// `q - zero` is an exact small integer. The header fields are the packed
/// values the grid was built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockGrid {
    /// Step between codes (the effective sub-block scale).
    pub scale: f32,
    /// Subtracted after scaling.
    pub min: f32,
    /// The code that stands for `-min` (0 for the formats with a minimum).
    pub zero: u8,
    /// f16 bits of the (super-)block scale `d`.
    pub d: u16,
    /// f16 bits of the super-block minimum scale `dmin` (Q4_K), or of the
    /// block minimum `m` (Q4_1); 0 otherwise.
    pub dmin: u16,
    /// The quantized sub-block scale (K-quants; 0 otherwise).
    pub sc: i8,
    /// The quantized sub-block minimum (Q4_K; 0 otherwise).
    pub m: u8,
    inv: f32,
}

impl BlockGrid {
    /// A grid from its parts (`inv`, the reciprocal used to pick codes, is
    /// derived; a zero scale maps every value to the zero code).
    pub(crate) fn new(scale: f32, min: f32, zero: u8, header: Header) -> Self {
        let inv = if scale != 0.0 && scale.is_finite() {
            1.0 / scale
        } else {
            0.0
        };
        BlockGrid {
            scale,
            min,
            zero,
            d: header.d.to_bits(),
            dmin: header.dmin.to_bits(),
            sc: header.sc,
            m: header.m,
            inv,
        }
    }

    /// A Q8_0, Q4_0 or Q5_0 block grid with scale `d` and zero code `zero`.
    pub(crate) fn symmetric(d: f16, zero: u8) -> Self {
        Self::new(
            d.to_f32(),
            0.0,
            zero,
            Header {
                d,
                ..Header::default()
            },
        )
    }

    /// A Q4_1 block grid: `d q + m`.
    pub(crate) fn affine(d: f16, m: f16) -> Self {
        Self::new(
            d.to_f32(),
            -m.to_f32(),
            0,
            Header {
                d,
                dmin: m,
                ..Header::default()
            },
        )
    }

    /// A Q4_K sub-block grid: `(d sc) q - dmin m`.
    pub(crate) fn q4k(d: f16, dmin: f16, sc: u8, m: u8) -> Self {
        Self::new(
            d.to_f32() * f32::from(sc),
            dmin.to_f32() * f32::from(m),
            0,
            Header {
                d,
                dmin,
                sc: sc as i8,
                m,
            },
        )
    }

    /// A Q6_K sub-block grid: `(d sc) (q - 32)`.
    pub(crate) fn q6k(d: f16, sc: i8) -> Self {
        Self::new(
            d.to_f32() * f32::from(sc),
            0.0,
            32,
            Header {
                d,
                sc,
                ..Header::default()
            },
        )
    }
}

/// The packed fields a grid comes from.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Header {
    pub d: f16,
    pub dmin: f16,
    pub sc: i8,
    pub m: u8,
}

impl CellGrid for BlockGrid {
    /// The nearest code: `round((w + min) / scale) + zero`, clamped (the
    /// reciprocal is used, so a value exactly between two codes may go
    /// either way; the decoded value is always `value(code)`).
    #[inline]
    fn code(&self, w: f32, max_code: u32) -> u8 {
        let q = ((w + self.min) * self.inv).round_ties_even() + f32::from(self.zero);
        q.clamp(0.0, max_code as f32) as u8
    }

    #[inline]
    fn value(&self, code: u8) -> f32 {
        self.scale * (i32::from(code) - i32::from(self.zero)) as f32 - self.min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decode_by_each_formula() {
        let d = f16::from_f32(0.013);
        let m = f16::from_f32(-0.07);
        let g = BlockGrid::affine(d, m);
        for q in 0..16u8 {
            assert_eq!(g.value(q), f32::from(q) * d.to_f32() + m.to_f32());
        }
        let dmin = f16::from_f32(0.07);
        let g = BlockGrid::q4k(d, dmin, 37, 5);
        let (d1, m1) = (d.to_f32() * 37.0, dmin.to_f32() * 5.0);
        for q in 0..16u8 {
            assert_eq!(g.value(q), d1 * f32::from(q) - m1);
        }
        let g = BlockGrid::q6k(d, -90);
        for q in 0..64u8 {
            assert_eq!(g.value(q), d.to_f32() * -90.0 * (f32::from(q) - 32.0));
        }
    }

    #[test]
    fn code_picks_the_nearest_value() {
        let g = BlockGrid::symmetric(f16::from_f32(0.5), 8);
        assert_eq!(g.code(1.1, 15), 10);
        assert_eq!(g.code(-100.0, 15), 0);
        assert_eq!(g.code(100.0, 15), 15);
        let zero = BlockGrid::q6k(f16::from_f32(0.5), 0);
        assert_eq!(zero.code(3.0, 63), 32);
        assert_eq!(zero.value(32), 0.0);
    }
}
