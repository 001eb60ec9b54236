//! The decoder's hand-written backward on SmolVLM's merged embeddings
//! against transformers' gradient at decoder layer 1's input
//! (`grad_layer1_input` of the hf-tiny-vlm `smolvlm` fixture).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::SmolVlmModel;
use crate::backend::llama_backward::layer_backward;
use crate::load::smolvlm::load_smolvlm_dir;

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.abs())
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f64>())
        .unwrap()
}

#[test]
fn layer1_input_gradient_matches_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-vlm/smolvlm");
    let model = load_smolvlm_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let exp =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let rows: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let frames = SmolVlmModel::real_frames(&exp["pixel_values"])
        .unwrap()
        .unwrap();
    let hs = model.hidden_states(&batch, Some(&frames)).unwrap();
    let pos = model.lm.positional(rows[0].len()).unwrap();
    // The fixture's labels: every token but <image>.
    let img = model.config().image_token_id;
    let targets: Vec<Vec<bool>> = batch
        .iter()
        .map(|r| r.iter().map(|&t| t != img).collect())
        .collect();
    let counts: Vec<usize> = targets
        .iter()
        .map(|t| t.iter().skip(1).filter(|&&b| b).count())
        .collect();
    let total: usize = counts.iter().sum();
    let mut grads = Vec::new();
    for (b, row) in batch.iter().enumerate() {
        let h = hs[2].narrow(0, b, 1).unwrap();
        let (_, g) = model
            .lm
            .loss_and_grad_at(&h, row, &targets[b])
            .unwrap()
            .unwrap();
        // Each row's loss is its own mean; the reference averages over the batch.
        grads.push((g * (counts[b] as f64 / total as f64)).unwrap());
    }
    let g_out = Tensor::cat(&grads, 0).unwrap();
    let l1 = &model.lm.weights().layers[1];
    let ours = layer_backward(model.lm.config(), l1, &hs[1], &pos, &g_out)
        .unwrap()
        .input;
    let want = &exp["grad_layer1_input"];
    let err = max_abs(&(ours - want).unwrap()) / max_abs(want);
    eprintln!("smolvlm grad_layer1_input rel err {err:.2e}");
    // Same 1e-5 bound as the forward outputs: f32 on both sides.
    assert!(err < 1e-5, "{err:e}");
}
