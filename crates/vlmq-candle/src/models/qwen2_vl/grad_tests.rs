//! The decoder's hand-written backward under M-RoPE against transformers'
//! gradient at decoder layer 1's input (`grad_layer1_input` of the
//! hf-tiny-vlm fixtures), for both families.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::{ImageGrid, Qwen2VlModel};
use crate::backend::llama_backward::layer_backward;
use crate::load::qwen2_vl::load_qwen2_vl_dir;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(name)
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.abs())
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f64>())
        .unwrap()
}

/// d (batch-mean next-token loss) / d (input of decoder layer 1).
fn grad_layer1_input(
    model: &Qwen2VlModel,
    batch: &[&[u32]],
    pixels: &Tensor,
    grids: &[ImageGrid],
) -> Tensor {
    let hs = model.hidden_states(batch, Some(pixels), grids).unwrap();
    let pos = model
        .positional(&model.rope_positions(batch, grids).unwrap())
        .unwrap();
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
    layer_backward(model.lm.config(), l1, &hs[1], &pos, &g_out)
        .unwrap()
        .input
}

fn check(name: &str) {
    let dir = fixture(name);
    let (model, _) = load_qwen2_vl_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let exp =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let rows: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let g: Vec<i64> = exp["image_grid_thw"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let grids: Vec<ImageGrid> = g
        .chunks(3)
        .map(|c| ImageGrid {
            t: c[0] as usize,
            h: c[1] as usize,
            w: c[2] as usize,
        })
        .collect();
    let ours = grad_layer1_input(&model, &batch, &exp["pixel_values"], &grids);
    let want = &exp["grad_layer1_input"];
    let err = max_abs(&(ours - want).unwrap()) / max_abs(want);
    eprintln!("{name} grad_layer1_input rel err {err:.2e}");
    // Same 1e-5 bound as the forward outputs: f32 on both sides.
    assert!(err < 1e-5, "{name}: {err:e}");
}

#[test]
fn qwen2_vl_layer1_input_gradient_matches_transformers() {
    check("qwen2_vl");
}

#[test]
fn qwen2_5_vl_layer1_input_gradient_matches_transformers() {
    check("qwen2_5_vl");
}
