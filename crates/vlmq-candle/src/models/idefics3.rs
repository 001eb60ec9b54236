//! The Idefics3 / SmolVLM connector: a pixel shuffle that trades spatial
//! resolution for width, then one linear projection to the text width.
//!
//! Pixel shuffle with scale `s` on a frame's `g x g` patch grid `[g*g, d]`:
//! output token `(i, j)` of the `(g/s) x (g/s)` grid (row-major) is the
//! concatenation, row by row, of the `s x s` patches
//! `(s*i + a, s*j + b)` for `a, b` in `0..s` (`b` fastest), `s*s*d` wide.
//! This is what transformers' reshape / permute chain computes
//! (`Idefics3Connector.pixel_shuffle`).
//!
//! Then `modality_projection.proj` (`[text hidden, s*s*d]`, no bias).

use candle_core::Tensor;
use vlmq::RowSink;

use crate::models::llama::forward::{linear, rows};
use crate::models::llama::weights::Linear;

/// The name of the connector's one linear (relative to `connector.`).
pub const CONNECTOR_LINEAR_NAMES: [&str; 1] = ["modality_projection.proj"];

/// The connector's parameters.
#[derive(Debug, Clone)]
pub struct Connector {
    /// `modality_projection.proj` `[text hidden, scale^2 * vision hidden]`.
    pub proj: Linear,
}

/// Pixel shuffle of `x: [N, g*g, d]` with scale `s` (`g` divisible by `s`):
/// `[N, (g/s)^2, s*s*d]`.
pub(crate) fn pixel_shuffle(x: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (n, p, d) = x.dims3()?;
    let g = (p as f64).sqrt().round() as usize;
    if g * g != p || s == 0 || !g.is_multiple_of(s) {
        return Err(candle_core::Error::Msg(format!(
            "pixel shuffle: {p} patches are not a square grid divisible by scale {s}"
        )));
    }
    let h = g / s;
    // [n, row, col-group, s*d]: each col-group holds s neighbouring patches of one row.
    let x = x.reshape((n, g, h, s * d))?;
    // [n, col-group, row, s*d] -> [n, col-group, row-group, s*s*d]: s rows stacked.
    let x = x
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, h, h, s * s * d))?;
    // Back to row-group major.
    x.transpose(1, 2)?
        .contiguous()?
        .reshape((n, h * h, s * s * d))
}

/// The connector on the vision tower's output `[N, g*g, d]`: image
/// features `[N, (g/s)^2, text hidden]`. `capture` receives the
/// projection's input rows; `probes` (one zero tensor) is added to its
/// output so a backward pass shows the gradient there.
pub(crate) fn connector_forward(
    c: &Connector,
    x: &Tensor,
    scale: usize,
    capture: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    let shuffled = pixel_shuffle(x, scale)?;
    if let Some(sink) = capture {
        sink.rows(CONNECTOR_LINEAR_NAMES[0], rows(&shuffled)?.view());
    }
    let y = linear(&shuffled, &c.proj)?;
    match probes.and_then(|p| p.first()) {
        Some(p) => y + p,
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shuffle_concatenates_each_two_by_two_block_row_by_row() {
        // A 4x4 grid of 1-wide patches numbered row-major.
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 16, 1))
            .unwrap();
        let y: Vec<Vec<f32>> = pixel_shuffle(&x, 2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want = vec![
            vec![0.0, 1.0, 4.0, 5.0],
            vec![2.0, 3.0, 6.0, 7.0],
            vec![8.0, 9.0, 12.0, 13.0],
            vec![10.0, 11.0, 14.0, 15.0],
        ];
        assert_eq!(y, want);
        assert!(pixel_shuffle(&x, 3).is_err());
    }
}
