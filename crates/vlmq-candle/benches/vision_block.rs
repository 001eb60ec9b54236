//! One vision block of each tower at a released model's width, over one
//! image's patches, random weights (f32, CPU):
//! - Qwen2-VL-2B's tower: width 1280, 16 heads, MLP 5120 (quick-GELU),
//!   2-D rotary attention; 1024 patches (a 448 x 448 image, patch 14);
//! - SmolVLM's SigLIP: width 768, 12 heads, MLP 3072 (tanh-GELU); 1024
//!   patches (a 512 x 512 frame, patch 16).
//!
//! Each group times the block's forward with input capture, its forward +
//! backward (VLMQ's importance pass: gradients at every linear output and
//! at the block input), and a plain candle matmul of the forward's FLOP
//! count, in the same run. One summary line per tower gives each pass's
//! rate as a fraction of the matmul's (the backward's FLOPs counted as the
//! forward's plus the input gradients': linears once more, attention
//! products twice more).

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use vlmq::{ndarray, GradientModel, QuantizableModel};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::{
    random_model, ClipLayerWeights, Connector, ImageGrid, LayerNorm, Linear, Merger, Qwen2VlConfig,
    Qwen2VlModel, QwenVisionWeights, QwenVlSample, SiglipWeights, SmolVlmConfig, SmolVlmModel,
    SmolVlmNaming, VisionBlock, VisionNorm, VlmHidden, VlmSample,
};

/// Patches of the one image.
const N: usize = 1024;

/// Deterministic pseudo-random tensor with entries in `[-scale, scale)`.
fn rand(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A linear `[out, inp]` with bias, weights scaled by `1/sqrt(inp)`.
fn linear(out: usize, inp: usize, seed: u64) -> Linear {
    Linear {
        weight: rand(&[out, inp], seed, 1.0 / (inp as f64).sqrt()),
        bias: Some(rand(&[out], seed + 1, 0.1)),
    }
}

fn layer_norm(d: usize) -> LayerNorm {
    LayerNorm {
        weight: Tensor::ones(d, DType::F32, &Device::Cpu).unwrap(),
        bias: Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap(),
    }
}

/// The tiny fixture config of `family` with `vision` merged into its
/// `vision_config` and `top` into the top level.
fn config(family: &str, vision: Value, top: Value) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(family)
        .join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    for (k, v) in vision.as_object().unwrap() {
        cfg["vision_config"][k] = v.clone();
    }
    for (k, v) in top.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg
}

/// Qwen2-VL-2B's vision width with one block, a tiny decoder, and a sample
/// holding one 32 x 32-patch image.
fn qwen() -> (Qwen2VlModel, QwenVlSample) {
    let raw = config(
        "qwen2_vl",
        json!({"depth": 1, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}),
        json!({}),
    );
    let cfg = Qwen2VlConfig::from_hf_json(&raw, "bench".as_ref()).unwrap();
    let v = cfg.vision.clone();
    let (d, f) = (v.width, v.mlp_width);
    let wide = d * v.merge_unit();
    let norm = || VisionNorm::Layer(layer_norm(d));
    let visual = QwenVisionWeights {
        patch_embed: rand(&[d, v.patch_values()], 1, 0.05),
        blocks: vec![VisionBlock {
            norm1: norm(),
            norm2: norm(),
            linears: vec![
                linear(3 * d, d, 2),
                linear(d, d, 4),
                linear(f, d, 6),
                linear(d, f, 8),
            ],
        }],
        merger: Merger {
            ln_q: norm(),
            linears: [linear(wide, wide, 10), linear(v.out_width, wide, 12)],
        },
    };
    let lm = random_model(&cfg.text, 3, DType::F32).unwrap();
    let grid = ImageGrid { t: 1, h: 32, w: 32 };
    let image = cfg.image_token_id;
    let mut tokens = vec![1u32, 300];
    tokens.extend(std::iter::repeat_n(
        image,
        grid.tokens(v.spatial_merge_size),
    ));
    tokens.extend([301, 20, 21, 2]);
    let pixels = rand(&[grid.patches(), v.patch_values()], 14, 1.0);
    let model = Qwen2VlModel::new(cfg, visual, lm).unwrap();
    (
        model,
        QwenVlSample::causal(tokens, Some(pixels), vec![grid]),
    )
}

/// SmolVLM's SigLIP width with one layer (512-pixel frames, patch 16,
/// pixel shuffle 4), a tiny decoder, and a sample of one frame.
fn smolvlm() -> (SmolVlmModel, VlmSample) {
    let raw = config(
        "smolvlm",
        json!({"num_hidden_layers": 1, "hidden_size": 768, "num_attention_heads": 12,
               "intermediate_size": 3072, "image_size": 512, "patch_size": 16}),
        json!({"scale_factor": 4}),
    );
    let cfg = SmolVlmConfig::from_hf_json(&raw, "bench".as_ref()).unwrap();
    let v = cfg.vision.clone();
    let (d, f) = (v.hidden_size, v.intermediate_size);
    let vision = SiglipWeights {
        patch_embedding: rand(&[d, 3, v.patch_size, v.patch_size], 1, 0.05),
        patch_bias: rand(&[d], 2, 0.1),
        position_embedding: rand(&[v.num_patches(), d], 3, 0.1),
        layers: vec![ClipLayerWeights {
            norm1: layer_norm(d),
            norm2: layer_norm(d),
            linears: [
                linear(d, d, 4),
                linear(d, d, 6),
                linear(d, d, 8),
                linear(d, d, 10),
                linear(f, d, 12),
                linear(d, f, 14),
            ],
        }],
        post_norm: layer_norm(d),
    };
    let proj = linear(cfg.text.hidden_size, cfg.connector_in(), 16);
    let connector = Connector {
        proj: Linear { bias: None, ..proj },
    };
    let lm = random_model(&cfg.text, 3, DType::F32).unwrap();
    let naming = SmolVlmNaming {
        vision: "model.vision_model.".into(),
        connector: "model.connector.".into(),
        lm: "model.text_model.".into(),
        lm_head: "lm_head.weight".into(),
    };
    let mut tokens = vec![1u32, 300];
    tokens.extend(std::iter::repeat_n(
        cfg.image_token_id,
        cfg.tokens_per_frame(),
    ));
    tokens.extend([300, 20, 21, 2]);
    let pixels = rand(&[1, 3, v.image_size, v.image_size], 18, 1.0);
    let model = SmolVlmModel::new(cfg, vision, connector, lm, naming, raw).unwrap();
    (model, VlmSample::causal(tokens, Some(pixels)))
}

/// Forward FLOPs of a block of width `d`, MLP width `f` over `N` tokens:
/// 2 per multiply-add of the four `d x d` and two `d x f` products and of
/// the two `N x N` attention products.
fn forward_flops(d: usize, f: usize) -> f64 {
    2.0 * (N * (4 * d * d + 2 * d * f) + 2 * N * N * d) as f64
}

/// Backward FLOPs on top of the forward: the input gradients of the linears
/// (once their forward) and of the attention products (twice theirs).
fn backward_flops(d: usize, f: usize) -> f64 {
    2.0 * (N * (4 * d * d + 2 * d * f) + 4 * N * N * d) as f64
}

/// Times one tower's block 0: criterion groups, then a summary line.
fn tower<M: GradientModel + QuantizableModel<Hidden = VlmHidden>>(
    cr: &mut Criterion,
    name: &str,
    m: &M,
    s: &M::Sample,
    d: usize,
    f: usize,
) {
    let VlmHidden::Vision(Some(x0)) = m.embed(s).unwrap() else {
        panic!("no vision stream")
    };
    assert_eq!(x0.dims(), [1, N, d], "{name}: patches");
    let x = VlmHidden::Vision(Some(rand(&[1, N, d], 21, 1.0)));
    let g = VlmHidden::Vision(Some(rand(&[1, N, d], 22, 1e-3)));
    let fwd = forward_flops(d, f);
    let bwd = fwd + backward_flops(d, f);
    // A plain [N, d] x [d, n] product with the forward's FLOPs.
    let n = (fwd / (2.0 * (N * d) as f64)).round() as usize;
    let a = rand(&[N, d], 23, 1.0);
    let b = rand(&[d, n], 24, 1.0);
    let forward = || {
        let mut sink = |_: &str, r: ndarray::ArrayView2<'_, f32>| {
            std::hint::black_box(r[[0, 0]]);
        };
        std::hint::black_box(m.block_forward(0, &x, s, Some(&mut sink)).unwrap());
    };
    let backward = || {
        let mut sink = |_: &str, r: ndarray::ArrayView2<'_, f32>| {
            std::hint::black_box(r[[0, 0]]);
        };
        std::hint::black_box(m.block_backward(0, &x, s, &g, Some(&mut sink)).unwrap());
    };
    let matmul = || {
        std::hint::black_box(a.matmul(&b).unwrap());
    };

    let mut group = cr.benchmark_group(format!("{name}_vision_block_{N}"));
    group.sample_size(10);
    group.bench_function("matmul_equal_flops", |bn| bn.iter(matmul));
    group.bench_function("forward_capture", |bn| bn.iter(forward));
    group.bench_function("forward_backward", |bn| bn.iter(backward));
    group.finish();

    let time = |f: &dyn Fn()| {
        f();
        let t = Instant::now();
        for _ in 0..3 {
            f();
        }
        t.elapsed().as_secs_f64() / 3.0
    };
    let (tm, tf, tb) = (time(&matmul), time(&forward), time(&backward));
    let rate = fwd / tm;
    println!(
        "{name} block ({d} wide, {N} patches): forward {:.1} GFLOP; matmul {:.1} GFLOP/s; \
         forward+capture {:.1} GFLOP/s ({:.0}% of matmul); forward+backward {:.1} GFLOP \
         at {:.1} GFLOP/s ({:.0}% of matmul)",
        fwd / 1e9,
        rate / 1e9,
        fwd / tf / 1e9,
        100.0 * fwd / tf / rate,
        bwd / 1e9,
        bwd / tb / 1e9,
        100.0 * bwd / tb / rate
    );
}

fn bench(cr: &mut Criterion) {
    let (m, s) = qwen();
    let v = m.config().vision.clone();
    tower(cr, "qwen2_vl_2b", &m, &s, v.width, v.mlp_width);
    let (m, s) = smolvlm();
    let v = m.config().vision.clone();
    tower(
        cr,
        "smolvlm_siglip",
        &m,
        &s,
        v.hidden_size,
        v.intermediate_size,
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
