//! Softmax rows of the reference attention, with the core's vectorizable `exp`.

use vlmq::__private::exp_nonpositive;

/// In-place softmax of `row[..len]` (entries from `len` on are set to 0);
/// returns `false`, leaving the row zeroed, when `len == 0`.
pub(crate) fn softmax_prefix(row: &mut [f32], len: usize) -> bool {
    let (head, tail) = row.split_at_mut(len.min(row.len()));
    tail.fill(0.0);
    if head.is_empty() {
        return false;
    }
    let max = head.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in head.iter_mut() {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in head.iter_mut() {
        *v *= inv;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_zeroes_the_tail() {
        let mut row = [1.0f32, 3.0, -2.0, 7.0, 9.0];
        assert!(softmax_prefix(&mut row, 3));
        assert!((row[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(&row[3..], &[0.0, 0.0]);
        assert!(!softmax_prefix(&mut row, 0));
        assert_eq!(row, [0.0; 5]);
    }
}
