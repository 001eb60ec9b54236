//! The check that a backend really installed a quantized weight, without
//! keeping the original weight beside the solve.
//!
//! A backend that ignores `set_linear_weight` would give a successful run of
//! a model that is not the quantized one (later blocks would calibrate on
//! full-precision inputs). The pipeline reads the weight back and compares
//! it with the original. Keeping the original for that comparison would
//! hold a third `out x in` matrix through the solve (180 MB for a 7B MLP
//! projection), so the comparison is made on fingerprints of the bits.

use ndarray::ArrayView2;

/// A 64-bit fingerprint of a matrix's shape and values, bit for bit (so
/// `-0.0` and `0.0`, or two NaN payloads, differ), in logical order: equal
/// matrices always have equal prints, different ones equal prints only by a
/// hash collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WeightPrint(u64);

impl WeightPrint {
    /// The print of `w`.
    pub(crate) fn of(w: ArrayView2<'_, f32>) -> Self {
        // One multiply-rotate step per value (a 64-bit mix in the style of
        // FxHash, then a final avalanche): fast on a 45M-value matrix, and
        // the check it serves is not adversarial.
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let (r, c) = w.dim();
        let mut h = (r as u64).wrapping_mul(K) ^ (c as u64);
        for &v in w.iter() {
            h = (h.rotate_left(5) ^ u64::from(v.to_bits())).wrapping_mul(K);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        WeightPrint(h)
    }
}

/// Whether the weight read back after installing `installed` is still the
/// original one (`original`'s print): the installed weight differs from the
/// original and the read-back is the original's bits. A backend may store
/// the weight rounded, so the read-back is not compared with `installed`.
pub(crate) fn left_in_place(
    original: WeightPrint,
    installed: ArrayView2<'_, f32>,
    read_back: ArrayView2<'_, f32>,
) -> bool {
    WeightPrint::of(installed) != original && WeightPrint::of(read_back) == original
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn sample(seed: u32) -> Array2<f32> {
        Array2::from_shape_fn((5, 7), |(i, j)| {
            ((i * 31 + j * 17 + seed as usize * 7) % 23) as f32 / 7.0 - 1.5
        })
    }

    #[test]
    fn prints_follow_the_bits_and_the_shape() {
        let a = sample(1);
        assert_eq!(WeightPrint::of(a.view()), WeightPrint::of(a.clone().view()));
        let mut b = a.clone();
        b[[4, 6]] = f32::from_bits(b[[4, 6]].to_bits() ^ 1);
        assert_ne!(WeightPrint::of(a.view()), WeightPrint::of(b.view()));
        let mut z = Array2::<f32>::zeros((2, 2));
        let zero = WeightPrint::of(z.view());
        z[[1, 0]] = -0.0;
        assert_ne!(zero, WeightPrint::of(z.view()));
        // The same values in another shape.
        let flat = Array2::from_shape_vec((7, 5), a.iter().copied().collect()).unwrap();
        assert_ne!(WeightPrint::of(a.view()), WeightPrint::of(flat.view()));
        // Logical order, not memory order.
        let t = a.t().to_owned();
        assert_eq!(WeightPrint::of(t.view()), WeightPrint::of(a.t()));
    }

    #[test]
    fn a_read_back_of_the_original_is_caught() {
        let (w, deq) = (sample(1), sample(2));
        let print = WeightPrint::of(w.view());
        assert!(left_in_place(print, deq.view(), w.view()));
        assert!(!left_in_place(print, deq.view(), deq.view()));
        // Stored rounded: neither the original nor the installed bits.
        let rounded = deq.mapv(|v| (v * 4.0).round() / 4.0 + 1e-3);
        assert!(!left_in_place(print, deq.view(), rounded.view()));
        // A weight the solve left unchanged is never an error.
        assert!(!left_in_place(print, w.view(), w.view()));
    }
}
