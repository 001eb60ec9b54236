//! A tiny residual model with the full backend (base trait and gradient
//! extension), written with public `vlmq` items only.
//!
//! Block: `h = tanh(x A^T)`, `y = x + h B^T`, with groups `[a]` then `[b]`.
//! Loss: `1/2 sum ||y_t - target_t||^2` over the target rows of a sample.

use ndarray::{Array2, ArrayView2};
use vlmq::backend::{GradientModel, LinearInfo, Modality, QuantizableModel, RowSink, TokenInfo};
use vlmq::Error;

use super::{weight, Rng};

#[derive(Clone)]
pub struct Block {
    /// First linear `[hidden, d]`.
    pub a: Array2<f32>,
    /// Second linear `[d, hidden]`.
    pub b: Array2<f32>,
}

/// One calibration sample: rows, token info, targets `(token, values)`.
pub struct Sample {
    pub x: Array2<f32>,
    pub info: TokenInfo,
    pub targets: Vec<(usize, Vec<f32>)>,
}

/// The tiny residual model.
pub struct TinyModel {
    pub blocks: Vec<Block>,
    /// Fail in `block_forward` of this block while capturing (simulates an interruption).
    pub fail_at: Option<usize>,
    /// Hide a layer from `linear_weight`.
    pub hide_layer: bool,
    /// `set_linear_weight` succeeds without changing anything (a broken backend).
    pub ignore_sets: bool,
}

impl TinyModel {
    pub fn new(seed: u64, d: usize, hidden: usize, blocks: usize) -> Self {
        let mut rng = Rng::new(seed);
        let blocks = (0..blocks)
            .map(|_| Block {
                a: weight(&mut rng, hidden, d) * (1.0 / (d as f32).sqrt()),
                b: weight(&mut rng, d, hidden) * (1.0 / (hidden as f32).sqrt()),
            })
            .collect();
        TinyModel {
            blocks,
            fail_at: None,
            hide_layer: false,
            ignore_sets: false,
        }
    }
}

impl QuantizableModel for TinyModel {
    type Sample = Sample;
    type Hidden = Array2<f32>;

    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn block_name(&self, block: usize) -> String {
        format!("tiny.{block}")
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        let bl = &self.blocks[block];
        vec![
            vec![LinearInfo::new("a", bl.a.ncols(), bl.a.nrows())],
            vec![LinearInfo::new("b", bl.b.ncols(), bl.b.nrows())],
        ]
    }

    fn token_info(&self, _: usize, sample: &Sample) -> TokenInfo {
        sample.info.clone()
    }

    fn embed(&self, sample: &Sample) -> vlmq::Result<Array2<f32>> {
        Ok(sample.x.clone())
    }

    fn block_forward(
        &self,
        block: usize,
        x: &Array2<f32>,
        _: &Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        // Fails only where the pipeline captures inputs, i.e. while quantizing.
        if self.fail_at == Some(block) && sink.is_some() {
            return Err(Error::Cancelled);
        }
        let bl = &self.blocks[block];
        if x.ncols() != bl.a.ncols() {
            // A careless backend: it shows the rows it got and fails later.
            if let Some(s) = sink {
                s.rows("a", x.view());
            }
            return Ok(x.clone());
        }
        let h = x.dot(&bl.a.t()).mapv(f32::tanh);
        if let Some(s) = sink {
            s.rows("a", x.view());
            s.rows("b", h.view());
        }
        Ok(x + &h.dot(&bl.b.t()))
    }

    fn linear_weight(&self, block: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        let bl = &self.blocks[block];
        match layer {
            "a" if !self.hide_layer => Ok(bl.a.clone()),
            "b" => Ok(bl.b.clone()),
            _ => Err(Error::Backend {
                block,
                layer: Some(layer.into()),
                reason: "no such layer".into(),
            }),
        }
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        if self.ignore_sets {
            return Ok(());
        }
        let bl = &mut self.blocks[block];
        let slot = match layer {
            "a" => &mut bl.a,
            "b" => &mut bl.b,
            _ => {
                return Err(Error::Backend {
                    block,
                    layer: Some(layer.into()),
                    reason: "no such layer".into(),
                })
            }
        };
        if slot.dim() != w.dim() {
            return Err(Error::Backend {
                block,
                layer: Some(layer.into()),
                reason: "shape".into(),
            });
        }
        slot.assign(&w);
        Ok(())
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = Sample, Hidden = Array2<f32>>> {
        Some(self)
    }
}

impl GradientModel for TinyModel {
    fn block_backward(
        &self,
        block: usize,
        x: &Array2<f32>,
        _: &Sample,
        gy: &Array2<f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        let bl = &self.blocks[block];
        let h = x.dot(&bl.a.t()).mapv(f32::tanh);
        let gh = gy.dot(&bl.b);
        let ga = &gh * &h.mapv(|v| 1.0 - v * v);
        if let Some(s) = sink {
            s.rows("b", gy.view());
            s.rows("a", ga.view());
        }
        Ok(gy + &ga.dot(&bl.a))
    }

    fn hidden_rows(&self, h: &Array2<f32>) -> vlmq::Result<Array2<f32>> {
        Ok(h.clone())
    }

    fn loss_and_grad(
        &self,
        y: &Array2<f32>,
        sample: &Sample,
    ) -> vlmq::Result<Option<(f32, Array2<f32>)>> {
        if sample.targets.is_empty() {
            return Ok(None);
        }
        let mut g = Array2::zeros(y.dim());
        let mut loss = 0.0;
        for (t, target) in &sample.targets {
            for (j, &v) in target.iter().enumerate() {
                let d = y[[*t, j]] - v;
                loss += 0.5 * d * d;
                g[[*t, j]] = d;
            }
        }
        Ok(Some((loss, g)))
    }
}

/// Samples of 12 vision tokens (near duplicates) and 4 text tokens, the last of which has a target.
pub fn samples(seed: u64, n: usize, d: usize) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let base: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
            let x = Array2::from_shape_fn((16, d), |(t, j)| {
                if t < 12 {
                    base[j] + 0.05 * rng.normal()
                } else {
                    rng.normal()
                }
            });
            let mut modality = vec![Modality::Vision; 12];
            modality.extend([Modality::Text; 4]);
            let target = (0..d).map(|_| rng.normal()).collect();
            Sample {
                x,
                info: TokenInfo::new(modality),
                targets: vec![(15, target)],
            }
        })
        .collect()
}

/// Every weight of the model, block by block (`a`, then `b`).
pub fn all_weights(m: &TinyModel) -> Vec<Array2<f32>> {
    m.blocks
        .iter()
        .flat_map(|b| [b.a.clone(), b.b.clone()])
        .collect()
}
