//! A GPTQ-only backend written as another crate would write it: only the
//! base trait, only public `vlmq` items (the backend is the first 60 lines).

use vlmq::ndarray::{Array2, ArrayView2};
use vlmq::{LinearInfo, Modality, QuantizableModel, Result, RowSink, TokenInfo};

/// `y = relu(x A^T) B^T` per block; linears `up` then `down`.
pub struct Mlp {
    pub blocks: Vec<[Array2<f32>; 2]>,
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
}

// ---- the tests ---------------------------------------------------------

use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::{Bits, Damping, Error, GptqConfig, QuantScheme};

fn mlp(d: usize, hidden: usize, blocks: usize) -> Mlp {
    let w = |m: usize, n: usize, s: usize| {
        Array2::from_shape_fn((m, n), |(i, j)| {
            (((i * 7 + j * 3 + s * 5) % 11) as f32 - 5.0) / 8.0
        })
    };
    Mlp {
        blocks: (0..blocks)
            .map(|b| [w(hidden, d, b), w(d, hidden, b + 1)])
            .collect(),
    }
}

fn samples(n: usize, tokens: usize, d: usize) -> Vec<Array2<f32>> {
    (0..n)
        .map(|s| {
            Array2::from_shape_fn((tokens, d), |(t, f)| {
                (((s * 13 + t * 5 + f * 7) % 9) as f32 - 4.0) / 3.0
            })
        })
        .collect()
}

fn gptq(bits: u32) -> GptqConfig {
    GptqConfig::new(QuantScheme::new(Bits::new(bits).unwrap()))
}

#[test]
fn gptq_runs_on_a_base_only_backend_and_writes_the_weights_back() {
    let mut model = mlp(8, 16, 2);
    let cfg = PipelineConfig::new(QuantMethod::Gptq, gptq(3));
    let out = quantize_model(&mut model, &samples(4, 6, 8), &cfg, |_| {}).unwrap();
    assert_eq!(out.report.layers.len(), 4);
    for ((b, layer), qw) in &out.weights {
        assert_eq!(model.linear_weight(*b, layer).unwrap(), qw.dequantize());
    }
    // GPTAQ and RTN need nothing more either.
    for method in [QuantMethod::Gptaq, QuantMethod::Rtn] {
        let cfg = PipelineConfig::new(method, gptq(3));
        quantize_model(&mut mlp(8, 16, 2), &samples(4, 6, 8), &cfg, |_| {}).unwrap();
    }
}

#[test]
fn vlmq_with_gradients_on_a_base_only_backend_is_refused_before_any_work() {
    let mut model = mlp(8, 16, 1);
    let before = model.blocks.clone();
    let cfg = PipelineConfig::new(QuantMethod::Vlmq, gptq(3));
    let err = quantize_model(&mut model, &samples(2, 4, 8), &cfg, |_| {}).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("GradientModel") && text.contains("Some(self)"),
        "{text}"
    );
    assert_eq!(model.blocks, before, "nothing was quantized");
    // A scorer that needs no gradients works on the base trait alone.
    let scorer = vlmq::importance::ModalityWeights::new(0.5, 1.0, 1.0).unwrap();
    let cfg = cfg.with_importance(vlmq::pipeline::ImportanceOptions::default().with_scorer(scorer));
    quantize_model(&mut model, &samples(2, 4, 8), &cfg, |_| {}).unwrap();
}

/// Inputs whose two features are always equal (`0` or `2`) give the exactly
/// singular Hessian `[[4, 4], [4, 4]]` (every product is exact in f32); with
/// a damping of `1e-9` of the mean diagonal the damped diagonal still rounds
/// to 4, so every factorization attempt fails.
#[test]
fn an_indefinite_hessian_keeps_its_type_under_the_layer_context() {
    let mut model = Mlp {
        blocks: vec![[Array2::eye(2), Array2::eye(2)]],
    };
    let data: Vec<Array2<f32>> = (0..2)
        .map(|_| Array2::from_shape_fn((4, 2), |(t, _)| if t % 2 == 0 { 2.0 } else { 0.0 }))
        .collect();
    let solver = gptq(4).with_damping(Damping::new(1e-9, 1.5, 3).unwrap());
    let cfg = PipelineConfig::new(QuantMethod::Gptq, solver);
    let err = quantize_model(&mut model, &data, &cfg, |_| {}).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InBlock { block: 0, layer: Some(l), .. } if l == "up"
        ),
        "{err}"
    );
    assert!(
        matches!(
            err.root(),
            Error::IndefiniteHessian {
                dim: 2,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    // The message names the place and the remedy's knob (the damping).
    let text = err.to_string();
    assert!(
        text.contains("block.0") && text.contains("up") && text.contains("damping"),
        "{text}"
    );
}
