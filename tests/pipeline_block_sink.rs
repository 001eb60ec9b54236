//! The per-block completion hook: `quantize_model_streaming` hands each
//! block to the sink as soon as it is final, then lets the model release
//! it, and never runs a released block again; a resumed run hands the
//! restored blocks to the sink too.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use vlmq::ndarray::{Array2, ArrayView2};
use vlmq::pipeline::{quantize_model, quantize_model_streaming, PipelineConfig, QuantMethod};
use vlmq::{
    Bits, Error, FinishedBlock, GptqConfig, LinearInfo, Modality, QuantScheme, QuantizableModel,
    QuantizedWeight, Result, RowSink, TokenInfo,
};

/// `y = relu(x A^T) B^T` per block that refuses to run a released block and
/// logs every release.
struct Mlp {
    blocks: Vec<[Array2<f32>; 2]>,
    released: Vec<usize>,
}

impl QuantizableModel for Mlp {
    type Sample = Array2<f32>;
    type Hidden = Array2<f32>;
    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    fn linear_groups(&self, b: usize) -> Vec<Vec<LinearInfo>> {
        let [up, down] = &self.blocks[b];
        vec![
            vec![LinearInfo::new("up", up.ncols(), up.nrows())],
            vec![LinearInfo::new("down", down.ncols(), down.nrows())],
        ]
    }
    fn token_info(&self, _: usize, x: &Array2<f32>) -> TokenInfo {
        TokenInfo::uniform(Modality::Text, x.nrows())
    }
    fn embed(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        Ok(x.clone())
    }
    fn block_forward(
        &self,
        b: usize,
        x: &Array2<f32>,
        _: &Array2<f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        if self.released.contains(&b) {
            return Err(Error::Backend {
                block: b,
                layer: None,
                reason: "block already released".into(),
            });
        }
        let [up, down] = &self.blocks[b];
        let h = x.dot(&up.t()).mapv(|v| v.max(0.0));
        if let Some(s) = sink {
            s.rows("up", x.view());
            s.rows("down", h.view());
        }
        Ok(h.dot(&down.t()))
    }
    fn linear_weight(&self, b: usize, layer: &str) -> Result<Array2<f32>> {
        Ok(self.blocks[b][usize::from(layer == "down")].clone())
    }
    fn set_linear_weight(&mut self, b: usize, layer: &str, w: ArrayView2<'_, f32>) -> Result<()> {
        self.blocks[b][usize::from(layer == "down")].assign(&w);
        Ok(())
    }
    fn release_block(&mut self, block: usize) -> Result<()> {
        self.released.push(block);
        Ok(())
    }
}

fn mlp(blocks: usize) -> Mlp {
    let w = |m: usize, n: usize, s: usize| {
        Array2::from_shape_fn((m, n), |(i, j)| {
            (((i * 7 + j * 3 + s * 5) % 11) as f32 - 5.0) / 8.0
        })
    };
    Mlp {
        blocks: (0..blocks)
            .map(|b| [w(12, 8, b), w(8, 12, b + 1)])
            .collect(),
        released: Vec::new(),
    }
}

fn samples() -> Vec<Array2<f32>> {
    (0..4)
        .map(|s| {
            Array2::from_shape_fn((6, 8), |(t, f)| {
                (((s * 13 + t * 5 + f * 7) % 9) as f32 - 4.0) / 3.0
            })
        })
        .collect()
}

fn config() -> PipelineConfig {
    PipelineConfig::new(
        QuantMethod::Gptq,
        GptqConfig::new(QuantScheme::new(Bits::new(3).unwrap())),
    )
}

type Weights = BTreeMap<(usize, String), QuantizedWeight>;

/// Runs the streaming driver, returning what the sink saw (block indices in
/// arrival order and every layer) and the model's releases at each arrival.
fn stream(model: &mut Mlp, cfg: &PipelineConfig) -> Result<(Vec<usize>, Weights)> {
    let mut order = Vec::new();
    let mut got = BTreeMap::new();
    let mut sink = |block: FinishedBlock| -> Result<()> {
        order.push(block.index);
        assert_eq!(block.name, format!("block.{}", block.index));
        for (layer, qw) in block.layers {
            got.insert((block.index, layer), qw);
        }
        Ok(())
    };
    let out = quantize_model_streaming(model, &samples(), cfg, &mut sink, |_| {})?;
    assert!(out.weights.is_empty(), "the sink owns the weights");
    assert_eq!(out.report.layers.len(), got.len());
    Ok((order, got))
}

#[test]
fn the_sink_sees_each_block_once_in_order_then_the_model_releases_it() {
    let expected = quantize_model(&mut mlp(3), &samples(), &config(), |_| {}).unwrap();
    let mut model = mlp(3);
    let (order, got) = stream(&mut model, &config()).unwrap();
    assert_eq!(order, vec![0, 1, 2]);
    assert_eq!(model.released, vec![0, 1, 2]);
    assert_eq!(got, expected.weights);
}

#[test]
fn a_sink_error_stops_the_run_before_the_release() {
    let mut model = mlp(3);
    let mut sink = |block: FinishedBlock| -> Result<()> {
        if block.index == 1 {
            return Err(Error::Empty {
                what: "disk space".into(),
            });
        }
        Ok(())
    };
    let err =
        quantize_model_streaming(&mut model, &samples(), &config(), &mut sink, |_| {}).unwrap_err();
    assert!(matches!(err, Error::Empty { .. }), "{err}");
    assert_eq!(model.released, vec![0]);
}

#[test]
fn a_resumed_run_hands_the_restored_blocks_to_the_sink() {
    let dir = std::env::temp_dir().join(format!("vlmq-test-sink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = config().with_state_dir(&dir);
    let (_, expected) = stream(&mut mlp(3), &config()).unwrap();
    let err = quantize_model(&mut mlp(3), &samples(), &cfg, |p| {
        if p.block == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    let mut model = mlp(3);
    let (order, got) = stream(&mut model, &cfg).unwrap();
    assert_eq!(order, vec![0, 1, 2]);
    assert_eq!(got, expected);
    std::fs::remove_dir_all(&dir).unwrap();
}
