//! The LM head applied a slice of its vocabulary rows at a time.
//!
//! The head is held in the dtype it is stored in, and each slice is
//! converted to the compute dtype only while it is multiplied: a 7B
//! model's bf16 head is 262 MB, where the whole head in f32 would be 524 MB
//! more (plus the bf16 copy it was converted from). Resident and streamed
//! models run these same products over the same slices, so their logits,
//! losses and gradients agree bit for bit.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::backend::linear_op::matmul_weight_t;

/// Vocabulary rows converted and multiplied together: 64 MiB of a 4096-wide
/// head in f32.
const HEAD_SLICE: usize = 4096;

/// The LM head `[vocab, hidden]` (the embedding when tied) in its stored
/// dtype, with the compute dtype its slices are converted to.
pub(crate) struct Head {
    stored: Arc<Tensor>,
    dtype: DType,
}

impl Head {
    /// `stored`, used in `dtype`.
    pub(crate) fn new(stored: Arc<Tensor>, dtype: DType) -> Self {
        Head { stored, dtype }
    }

    /// `(first row, rows)` of each slice, in order.
    fn slices(&self) -> candle_core::Result<Vec<(usize, usize)>> {
        let vocab = self.stored.dim(0)?;
        Ok((0..vocab)
            .step_by(HEAD_SLICE)
            .map(|start| (start, HEAD_SLICE.min(vocab - start)))
            .collect())
    }

    /// Rows `start..start + len` in the compute dtype.
    fn slice(&self, start: usize, len: usize) -> candle_core::Result<Tensor> {
        self.stored.narrow(0, start, len)?.to_dtype(self.dtype)
    }

    /// The logits `x head^T`: `[rows, vocab]` from `x: [rows, hidden]`
    /// (differentiable with respect to `x` when `x` tracks gradients).
    pub(crate) fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let parts = self
            .slices()?
            .into_iter()
            .map(|(start, len)| matmul_weight_t(x, &self.slice(start, len)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// `p head`: `[rows, hidden]` from `p: [rows, vocab]`, the slices'
    /// products added in vocabulary order.
    pub(crate) fn times(&self, p: &Tensor) -> candle_core::Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (start, len) in self.slices()? {
            let part = p.narrow(1, start, len)?.matmul(&self.slice(start, len)?)?;
            sum = Some(match sum {
                Some(s) => (s + part)?,
                None => part,
            });
        }
        sum.ok_or_else(|| candle_core::Error::Msg("the LM head has no rows".into()))
    }

    /// The rows `ids` (a `u32` tensor) in the compute dtype.
    pub(crate) fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.stored.index_select(ids, 0)?.to_dtype(self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fused::tests::values;
    use candle_core::Device;

    fn tensor(rows: usize, cols: usize, seed: u64) -> Tensor {
        values(&[rows, cols], seed, 0.5)
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Over a vocabulary of several slices and a ragged last one, a bf16
    /// head gives the products of its f32 conversion taken whole, up to the
    /// order of the sums (a few roundings of the largest one), and exactly
    /// its rows.
    #[test]
    fn sliced_products_match_the_whole_head() {
        let (vocab, hidden, rows) = (2 * HEAD_SLICE + 37, 24, 5);
        let stored = tensor(vocab, hidden, 1).to_dtype(DType::BF16).unwrap();
        let whole = stored.to_dtype(DType::F32).unwrap();
        let head = Head::new(Arc::new(stored), DType::F32);
        let x = tensor(rows, hidden, 2);
        let logits = head.logits(&x).unwrap();
        assert_eq!(logits.dims(), &[rows, vocab]);
        let want = x.matmul(&whole.t().unwrap()).unwrap();
        // The matrix product may order a logit's sum over the hidden width
        // differently for a slice than for the whole head: each of the 24
        // terms is at most 0.5 * 0.5, so a few roundings of a sum below 6.
        let bound = 8.0 * f32::EPSILON * (hidden as f32 * 0.25);
        assert!(max_abs_diff(&logits, &want) <= bound);
        let p = tensor(rows, vocab, 3);
        let got = head.times(&p).unwrap();
        let want = p.matmul(&whole).unwrap();
        // Each term is at most 0.5 * 0.5 in magnitude.
        let scale = (vocab as f32) * 0.25;
        assert!(max_abs_diff(&got, &want) <= 8.0 * f32::EPSILON * scale);
        let ids = Tensor::new(&[0u32, 4096, 8228], &Device::Cpu).unwrap();
        let picked = head.rows(&ids).unwrap();
        assert_eq!(
            max_abs_diff(&picked, &whole.index_select(&ids, 0).unwrap()),
            0.0
        );
    }
}
