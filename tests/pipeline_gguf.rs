//! Pipeline runs onto GGUF block types: every layer gets its type (or
//! llama.cpp's fallback for its width), the model holds exactly what the
//! packed blocks decode to, calibration statistics drive the solve, and
//! the combinations GGUF cannot store are refused before any work.

use std::collections::BTreeMap;

use vlmq::ndarray::{Array2, ArrayView2};
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::quant::gguf::{decode_rows, GgufType};
use vlmq::solver::GgufSolution;
use vlmq::{
    Bits, Error, GptqConfig, LinearInfo, Modality, QuantScheme, QuantizableModel, Result, RowSink,
    TokenInfo,
};

/// `y = relu(x A^T) B^T` per block, with `A` 256 x 64 and `B` 64 x 256:
/// `up` is too narrow for K-quants, `down` takes them.
#[derive(Clone)]
struct Mlp {
    blocks: Vec<[Array2<f32>; 2]>,
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

/// A deterministic pseudo-random value in [-1, 1).
fn noise(i: usize, j: usize, s: usize) -> f32 {
    let h = (i as u64 * 0x9E37_79B9 + j as u64 * 0x85EB_CA6B + s as u64 * 0xC2B2_AE35)
        .wrapping_mul(0x2545_F491_4F6C_DD1D);
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn mlp() -> Mlp {
    let w = |m: usize, n: usize, s: usize| Array2::from_shape_fn((m, n), |(i, j)| noise(i, j, s));
    Mlp {
        blocks: (0..2)
            .map(|b| [w(256, 64, 2 * b), w(64, 256, 2 * b + 1)])
            .collect(),
    }
}

/// Correlated inputs (a shared component per token), so that error
/// feedback has something to exploit.
fn samples() -> Vec<Array2<f32>> {
    (0..6)
        .map(|s| {
            Array2::from_shape_fn((16, 64), |(t, f)| {
                noise(s, t, 99) * 2.0 + 0.3 * noise(t + 16 * s, f, 7)
            })
        })
        .collect()
}

fn config(method: QuantMethod, ty: GgufType) -> PipelineConfig {
    PipelineConfig::new(
        method,
        GptqConfig::new(QuantScheme::new(Bits::new(4).unwrap())),
    )
    .with_gguf_type(Some(ty))
}

fn run(cfg: &PipelineConfig) -> (Mlp, BTreeMap<(usize, String), GgufSolution>) {
    let mut m = mlp();
    let out = quantize_model(&mut m, &samples(), cfg, |_| {}).unwrap();
    assert!(out.weights.is_empty(), "a GGUF run stores no GPTQ weights");
    (m, out.gguf)
}

#[test]
fn every_layer_gets_its_type_and_the_model_holds_the_decoded_blocks() {
    let (m, gguf) = run(&config(QuantMethod::Gptq, GgufType::Q4K));
    assert_eq!(gguf.len(), 4);
    for ((b, layer), sol) in &gguf {
        // 64 input columns cannot hold a 256-column super-block.
        let want = if layer == "up" {
            GgufType::Q5_0
        } else {
            GgufType::Q4K
        };
        assert_eq!(sol.ty, want, "{b}/{layer}");
        let (rows, cols) = sol.dequantized.dim();
        let decoded = decode_rows(sol.ty, &sol.pack().unwrap(), rows, cols).unwrap();
        assert_eq!(decoded, sol.dequantized, "{b}/{layer}: packed blocks");
        assert_eq!(
            m.linear_weight(*b, layer).unwrap(),
            sol.dequantized,
            "{b}/{layer}: weight in the model"
        );
    }
}

/// Squared output error of block 0's `up` on the calibration inputs.
fn up_error(w: &Array2<f32>) -> f32 {
    let original = &mlp().blocks[0][0];
    samples()
        .iter()
        .map(|x| {
            let d = x.dot(&(w - original).t());
            d.iter().map(|v| v * v).sum::<f32>()
        })
        .sum()
}

#[test]
fn gptq_on_the_gguf_grid_uses_the_calibration_statistics() {
    for ty in [GgufType::Q4_0, GgufType::Q4_1] {
        let (_, gptq) = run(&config(QuantMethod::Gptq, ty));
        let (_, rtn) = run(&config(QuantMethod::Rtn, ty));
        let key = (0, "up".to_string());
        let (e_gptq, e_rtn) = (
            up_error(&gptq[&key].dequantized),
            up_error(&rtn[&key].dequantized),
        );
        // Error feedback on correlated inputs: well below rounding's error.
        assert!(e_gptq < 0.8 * e_rtn, "{ty}: GPTQ {e_gptq} vs RTN {e_rtn}");
        // RTN rounds every weight onto a block grid holding it: within one
        // step of the block's scale (the largest step is below range / 15).
        let w = &mlp().blocks[0][0];
        let worst = (&rtn[&key].dequantized - w)
            .iter()
            .fold(0f32, |a, v| a.max(v.abs()));
        assert!(worst < 2.0 / 15.0, "{ty}: RTN moved a weight by {worst}");
    }
}

#[test]
fn combinations_gguf_cannot_store_are_refused_before_any_work() {
    let field = |cfg: PipelineConfig| match quantize_model(&mut mlp(), &samples(), &cfg, |_| {}) {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let base = config(QuantMethod::Gptq, GgufType::Q4_0);
    let solver = *base.solver();
    let act_order = base
        .clone()
        .with_solver(solver.with_act_order(true).unwrap());
    assert_eq!(field(act_order), "act_order");
    let gar = base
        .clone()
        .with_solver(solver.with_act_group_aware(true).unwrap());
    assert_eq!(field(gar), "act_group_aware");
    let dir = std::env::temp_dir().join(format!("vlmq-gguf-state-{}", std::process::id()));
    assert_eq!(field(base.with_state_dir(&dir)), "state_dir");
    assert!(!dir.exists(), "nothing written for a refused run");
}
