//! The SmolVLM backend in the vlmq pipeline (hf-tiny-vlm `smolvlm/`
//! fixture): the blocks' forward chain equals the model's logits, GPTQ and
//! VLMQ on the LM, every block quantizable, and the SmolVLM-layout GPTQ
//! checkpoint written and read back through `PackedLinear` reproducing the
//! in-memory quantized logits.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayView2;
use vlmq::{
    Bits, Checkpoint, GptqConfig, GradientModel, GroupSize, Modality, PipelineConfig, QuantMethod,
    QuantScheme, QuantizableModel,
};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::export::smolvlm::{load_smolvlm_gptq_into, write_smolvlm_gptq};
use vlmq_candle::{load_smolvlm_dir, tokenizer_from_file, SmolVlmModel, VlmHidden, VlmSample};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-vlm/smolvlm")
}

fn expected() -> HashMap<String, Tensor> {
    vlmq_candle::candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The fixture's batch: token rows and the real frames (5 for row 0, 8 for row 1).
fn batch() -> (Vec<Vec<u32>>, Tensor) {
    let exp = expected();
    let rows = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let frames = SmolVlmModel::real_frames(&exp["pixel_values"])
        .unwrap()
        .unwrap();
    (rows, frames)
}

/// The two fixture rows as samples (each with its own frames), a padded
/// copy of row 0 and a text-only sample.
fn samples(model: &SmolVlmModel) -> Vec<VlmSample> {
    let (rows, frames) = batch();
    let id = model.config().image_token_id;
    let f0 = frames.narrow(0, 0, 5).unwrap();
    let f1 = frames.narrow(0, 5, 8).unwrap();
    vec![
        VlmSample::causal(rows[0].clone(), Some(f0.clone())).without_image_targets(id),
        VlmSample::causal(rows[1].clone(), Some(f1)).without_image_targets(id),
        VlmSample::causal(rows[0].clone(), Some(f0))
            .without_image_targets(id)
            .padded(5, 0),
        VlmSample::causal(rows[0][..6].to_vec(), None),
    ]
}

fn scheme() -> GptqConfig {
    GptqConfig::new(
        QuantScheme::new(Bits::new(4).unwrap())
            .with_group_size(GroupSize::new(32).unwrap())
            .with_symmetric(true),
    )
}

fn lcg(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn tensor(h: &VlmHidden) -> &Tensor {
    match h {
        VlmHidden::Vision(Some(t)) | VlmHidden::Text(t) => t,
        VlmHidden::Vision(None) => panic!("no vision stream"),
    }
}

fn wrap_like(h: &VlmHidden, t: Tensor) -> VlmHidden {
    match h {
        VlmHidden::Text(_) => VlmHidden::Text(t),
        VlmHidden::Vision(_) => VlmHidden::Vision(Some(t)),
    }
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn vision_and_connector_backward_match_finite_differences() {
    let m = load_smolvlm_dir(dir(), DType::F64, &Device::Cpu).unwrap();
    let s = &samples(&m)[1];
    let x0 = m.embed(s).unwrap();
    let x1 = m.block_forward(0, &x0, s, None).unwrap();
    let x2 = m.block_forward(1, &x1, s, None).unwrap();
    // Blocks 0 and 1 (SigLIP layers) and 2 (connector, into the LM stream).
    for (b, x) in [(0usize, &x0), (1, &x1), (2, &x2)] {
        let y = m.block_forward(b, x, s, None).unwrap();
        let g = lcg(tensor(&y).dims(), 1 + b as u64);
        let gy = wrap_like(&y, g.clone());
        let mut seen = Vec::new();
        let mut sink = |name: &str, rows: ArrayView2<'_, f32>| {
            seen.push((name.to_string(), rows.dim()));
        };
        let gx = m.block_backward(b, x, s, &gy, Some(&mut sink)).unwrap();
        let names: Vec<String> = m
            .linear_groups(b)
            .into_iter()
            .flatten()
            .map(|l| l.name)
            .collect();
        assert_eq!(
            seen.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            names
        );
        let rows_expected = m.token_info(b, s).len();
        assert!(seen.iter().all(|(_, (r, _))| *r == rows_expected));
        let d = lcg(tensor(x).dims(), 10 + b as u64);
        let eps = 1e-5;
        let f = |sign: f64| {
            let xs = wrap_like(x, (tensor(x) + (&d * (sign * eps)).unwrap()).unwrap());
            dot(tensor(&m.block_forward(b, &xs, s, None).unwrap()), &g)
        };
        let fd = (f(1.0) - f(-1.0)) / (2.0 * eps);
        let an = dot(tensor(&gx), &d);
        // f64 central difference: truncation ~eps^2, rounding ~1e-16/eps;
        // but candle's backward of its tanh-GELU uses 6-digit constants
        // (0.797885, 0.0356774, ...), so the analytic side of a SigLIP
        // layer carries a relative error of order 1e-6.
        assert!(
            (fd - an).abs() <= 1e-5 * an.abs().max(1.0),
            "block {b}: fd {fd} vs analytic {an}"
        );
    }
}

/// d (batch-mean loss) / d (input of vision layer 0) through every block's
/// backward, against transformers' `grad_vision_block0_input`.
#[test]
fn vision_input_gradient_matches_transformers() {
    let m = load_smolvlm_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let ss = samples(&m);
    // The fixture's loss is one mean over both rows' label positions.
    let counts: Vec<usize> = ss[..2]
        .iter()
        .map(|s| s.targets.iter().skip(1).filter(|&&t| t).count())
        .collect();
    let total: usize = counts.iter().sum();
    let mut grads = Vec::new();
    for (s, &c) in ss[..2].iter().zip(&counts) {
        let mut hs = vec![m.embed(s).unwrap()];
        for b in 0..m.num_blocks() {
            let next = m.block_forward(b, hs.last().unwrap(), s, None).unwrap();
            hs.push(next);
        }
        let (_, mut g) = m.loss_and_grad(hs.last().unwrap(), s).unwrap().unwrap();
        for b in (0..m.num_blocks()).rev() {
            g = m.block_backward(b, &hs[b], s, &g, None).unwrap();
        }
        grads.push((tensor(&g) * (c as f64 / total as f64)).unwrap());
    }
    let ours = Tensor::cat(&grads, 0).unwrap();
    let want = &expected()["grad_vision_block0_input"];
    let err = f64::from(common::max_abs_diff(&ours, want))
        / f64::from(common::max_abs_diff(want, &want.zeros_like().unwrap()));
    eprintln!("smolvlm grad_vision_block0_input rel err {err:.2e}");
    // f32 on both sides through 2 decoder layers, the connector and 2 SigLIP
    // layers: rounding stays far below 1e-5; a wrong backward is O(1).
    assert!(err < 1e-5, "{err:e}");
}

#[test]
fn blocks_chain_to_the_model_forward_and_tag_tokens() {
    let model = load_smolvlm_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let ss = samples(&model);
    let s = &ss[1];
    let mut h = model.embed(s).unwrap();
    for b in 0..model.num_blocks() {
        h = model.block_forward(b, &h, s, None).unwrap();
    }
    let VlmHidden::Text(last) = h else {
        panic!("the last block must give the text stream")
    };
    let (rows, frames) = batch();
    let want = model
        .hidden_states(&[&rows[1]], Some(&frames.narrow(0, 5, 8).unwrap()))
        .unwrap();
    // The same operations in the same order: identical.
    assert_eq!(common::max_abs_diff(&last, want.last().unwrap()), 0.0);

    assert_eq!(model.num_blocks(), 2 + 1 + 2);
    assert_eq!(model.block_name(2), "model.connector");
    assert_eq!(model.block_name(3), "model.text_model.layers.0");
    let vis = model.token_info(0, s);
    assert_eq!(vis.len(), 8 * 16);
    assert_eq!(vis.mask(Modality::Vision).sum(), (8 * 16) as f32);
    let con = model.token_info(2, s);
    assert_eq!(con.len(), 8 * 4);
    let lm = model.token_info(3, &ss[2]);
    let id = model.config().image_token_id;
    for (t, &tok) in ss[2].tokens.iter().enumerate() {
        let want = if tok == id {
            Modality::Vision
        } else {
            Modality::Text
        };
        assert_eq!(lm.modality()[t], want);
        assert_eq!(lm.valid()[t], t < rows[0].len());
    }
    // A frame count that does not match the <image> tokens is refused.
    let bad = VlmSample::causal(rows[0].clone(), Some(frames.narrow(0, 0, 4).unwrap()));
    assert!(model.embed(&bad).is_err());
}

#[test]
fn lm_only_gptq_and_vlmq_checkpoints_roundtrip() {
    let orig = load_smolvlm_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let (rows, frames) = batch();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let tk = tokenizer_from_file(dir().join("tokenizer.json")).unwrap();
    for method in [QuantMethod::Gptq, QuantMethod::Vlmq] {
        let mut model = orig.clone();
        let ss = samples(&model);
        let cfg = PipelineConfig::new(method, scheme()).with_blocks(model.lm_only());
        let q = vlmq::quantize_model(&mut model, &ss, &cfg, |_| {}).unwrap();
        // 2 LM layers x 7 linears; the tower and connector untouched.
        assert_eq!(q.weights.len(), 14, "{method}");
        assert!(q.weights.keys().all(|(b, _)| *b >= 3));
        assert_eq!(
            model.linear_weight(2, "modality_projection.proj").unwrap(),
            orig.linear_weight(2, "modality_projection.proj").unwrap()
        );

        let tmp =
            std::env::temp_dir().join(format!("vlmq-smolvlm-ckpt-{method}-{}", std::process::id()));
        write_smolvlm_gptq(&model, &q, Some(&tk), &tmp).unwrap();
        let ck = Checkpoint::open(&tmp).unwrap();
        assert!(ck
            .names()
            .contains(&"model.text_model.layers.1.self_attn.q_proj"));
        assert_eq!(ck.names().len(), 14);
        for n in [
            "model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "model.vision_model.embeddings.patch_embedding.bias",
            "model.vision_model.post_layernorm.weight",
            "model.connector.modality_projection.proj.weight",
            "model.text_model.embed_tokens.weight",
            "model.text_model.norm.weight",
        ] {
            assert!(ck.tensor_names().contains(&n), "{n} missing");
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["quantization_config"]["bits"], 4);
        assert_eq!(config["model_type"], "smolvlm");

        let mut back = orig.clone();
        assert_eq!(load_smolvlm_gptq_into(&mut back, &tmp).unwrap(), 14);
        std::fs::remove_dir_all(&tmp).unwrap();
        let want = model.logits(&batch, Some(&frames)).unwrap();
        // The packed kernel reproduces the dequantized weights up to f32
        // rounding of scale * (code - zero).
        let d = common::max_abs_diff(&back.logits(&batch, Some(&frames)).unwrap(), &want);
        assert!(d < 1e-4, "{method}: read-back logits differ by {d}");
        let d0 = common::max_abs_diff(&orig.logits(&batch, Some(&frames)).unwrap(), &want);
        assert!(d0 > 1e-3, "{method}: quantization changed nothing ({d0})");
    }
}

#[test]
fn every_block_is_quantizable() {
    let mut model = load_smolvlm_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let ss = samples(&model);
    let cfg = PipelineConfig::new(QuantMethod::Vlmq, scheme());
    let q = vlmq::quantize_model(&mut model, &ss, &cfg, |_| {}).unwrap();
    // 2 vision layers x 6 + connector 1 + 2 LM layers x 7.
    assert_eq!(q.weights.len(), 27);
    let w = model.linear_weight(0, "mlp.fc1").unwrap();
    assert!(w.iter().all(|v| v.is_finite()));
}
