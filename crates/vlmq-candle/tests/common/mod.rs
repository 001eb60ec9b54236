//! Helpers shared by this crate's integration tests.

// Each test binary includes this module and uses only some of its helpers.
#![allow(dead_code)]

use vlmq_candle::candle_core::{Result, Tensor};

/// llama.cpp's converter order of q/k rows, derived here from the rule
/// rather than taken from the loader so the tests check the loader against
/// an independent statement of it: within each head of `hd` rows, HF keeps
/// the two rotary halves apart (`[half 0 | half 1]`) and llama.cpp
/// interleaves them, so llama.cpp row `2 i + j` is HF row `j hd/2 + i`.
/// `to_hf` maps the other way. Works on `[out, in]` weights and `[out]` biases.
pub fn llama_cpp_qk_rows(w: &Tensor, heads: usize, to_hf: bool) -> Result<Tensor> {
    let out = w.dim(0)?;
    let hd = out / heads;
    let half = hd / 2;
    let mut pick = Vec::with_capacity(out);
    for h in 0..heads {
        for r in 0..hd {
            // Row r of the result in its head, and where it comes from.
            let from = if to_hf {
                let (j, i) = (r / half, r % half);
                2 * i + j
            } else {
                let (i, j) = (r / 2, r % 2);
                j * half + i
            };
            pick.push((h * hd + from) as u32);
        }
    }
    let idx = Tensor::from_vec(pick, out, w.device())?;
    w.index_select(&idx, 0)
}

/// The largest absolute difference between two f32 tensors of the same
/// shape (0 when they hold the same values).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}
