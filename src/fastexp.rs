//! A branch-free `exp` that the compiler vectorizes, for softmax rows: the
//! reference backend's attention and the candle backend's vision attention
//! share it (through [`crate::__private`]), so both compute the same bits.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody-Waite): `n * LN2_HI` is exact for |n| < 2^8.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding then subtracting 1.5 * 2^23 rounds an f32 of magnitude < 2^22 to
/// the nearest integer without a call (and without branches).
const ROUND: f32 = 12_582_912.0;
/// The bits of `ROUND + n` are `ROUND_BITS + n` for an integer `|n| < 2^22`.
const ROUND_BITS: u32 = 0x4B40_0000;

/// `e^x` for `x <= 0` (softmax arguments), relative error below 3e-7 (1.2e-7
/// truncation plus a few f32 roundings);
/// arguments below -87 return about 1e-38 (callers zero masked entries).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // The scale 2^n is built from the integer in `shifted`'s low bits
    // (n >= -126 here, so n + 127 is a normal exponent): integer arithmetic
    // that vectorizes, where `n as i32` compiles to a scalar saturating
    // conversion per element.
    let bits = shifted.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23;
    taylor(r) * f32::from_bits(bits)
}

/// Degree-6 Taylor polynomial of e^r on |r| <= ln2 / 2 (Horner form):
/// truncation error below (ln2 / 2)^7 / 7! ~ 1.2e-7 relative.
#[inline(always)]
fn taylor(r: f32) -> f32 {
    1.0 + r
        * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    /// The scale taken from the rounded value's bits is `2^n` for the `n`
    /// a plain conversion gives: the same bits for every argument.
    #[test]
    fn scale_bits_are_the_rounded_integers() {
        let by_conversion = |x: f32| {
            let x = x.max(-87.0);
            let n = (x * LOG2E + ROUND) - ROUND;
            let r = (x - n * LN2_HI) - n * LN2_LO;
            taylor(r) * f32::from_bits(((n as i32 + 127) as u32) << 23)
        };
        let mut x = -100.0f32;
        while x <= 0.0 {
            assert_eq!(
                exp_nonpositive(x).to_bits(),
                by_conversion(x).to_bits(),
                "x = {x}"
            );
            x += 0.0037;
        }
    }
}
