//! Finite-difference checks (f64) of the hand-written vision block
//! backward passes: the pre-LN ViT encoder layer (CLIP's quick-GELU,
//! SigLIP's tanh-GELU) and the Qwen2-VL / Qwen2.5-VL tower block (LayerNorm
//! or RMSNorm, quick-GELU or SwiGLU, 2-D rotary, attention segments), at
//! the block input and at every linear's output. Norm gains and shifts are
//! random, not 1 and 0, so a dropped gain or shift term shows.

use candle_core::{DType, Device, Tensor};

use crate::backend::chain_rule::BlockGradients;
use crate::backend::qwen_vision_backward::vision_block_backward;
use crate::backend::vit_backward::encoder_layer_backward;
use crate::models::clip::{ClipLayerWeights, LayerNorm};
use crate::models::llama::weights::Linear;
use crate::models::qwen2_vl::vision::{rotary_tables, VisionBlock, VisionNorm, VisionPositions};
use crate::models::qwen2_vl::vision_block::block_forward;
use crate::models::qwen2_vl::QwenVisionConfig;
use crate::models::vision_ops::MlpAct;
use crate::models::vit_encoder::{encoder_layer_forward, EncoderShape};

/// Deterministic values in `[-1, 1)` from a small LCG, times `scale`, plus `shift`.
fn lcg(shape: &[usize], seed: u64, scale: f64, shift: f64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale + shift
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn linear(out: usize, inp: usize, seed: u64) -> Linear {
    Linear {
        weight: lcg(&[out, inp], seed, 1.0 / (inp as f64).sqrt(), 0.0),
        bias: Some(lcg(&[out], seed + 1, 0.2, 0.0)),
    }
}

fn layer_norm(d: usize, seed: u64) -> LayerNorm {
    LayerNorm {
        weight: lcg(&[d], seed, 0.3, 1.0),
        bias: lcg(&[d], seed + 1, 0.3, 0.0),
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

/// Checks `grads` of `sum(f(x, probes) * g)` against central differences
/// along random directions, at the input and at each linear output
/// (perturbed through the probes, zero tensors of `outs`' shapes).
fn check(
    label: &str,
    f: &dyn Fn(&Tensor, &[Tensor]) -> Tensor,
    x: &Tensor,
    g: &Tensor,
    outs: &[Vec<usize>],
    grads: &BlockGradients,
) {
    let zeros: Vec<Tensor> = outs
        .iter()
        .map(|s| Tensor::zeros(s.as_slice(), DType::F64, &Device::Cpu).unwrap())
        .collect();
    let objective = |x: &Tensor, p: &[Tensor]| dot(&f(x, p), g);
    // f64 central differences: truncation ~eps^2 times the third derivative
    // (O(1) here), rounding ~1e-16 / eps; both below 1e-9, while a missing
    // chain-rule term moves the gradient by O(1e-2) or more.
    let eps = 1e-5;
    let tol = |an: f64| 1e-7 * an.abs().max(1.0);
    let d = lcg(x.dims(), 99, 1.0, 0.0);
    let fd = (objective(&(x + (&d * eps).unwrap()).unwrap(), &zeros)
        - objective(&(x - (&d * eps).unwrap()).unwrap(), &zeros))
        / (2.0 * eps);
    let an = dot(&grads.input, &d);
    assert!((fd - an).abs() <= tol(an), "{label} input: fd {fd} vs {an}");
    assert_eq!(grads.linear_outputs.len(), outs.len(), "{label}");
    for (i, gi) in grads.linear_outputs.iter().enumerate() {
        let dir = lcg(&outs[i], 100 + i as u64, 1.0, 0.0);
        let mut plus = zeros.clone();
        let mut minus = zeros.clone();
        plus[i] = (&dir * eps).unwrap();
        minus[i] = (&dir * -eps).unwrap();
        let fd = (objective(x, &plus) - objective(x, &minus)) / (2.0 * eps);
        let an = dot(&gi.reshape(outs[i].as_slice()).unwrap(), &dir);
        assert!(
            (fd - an).abs() <= tol(an),
            "{label} linear {i}: fd {fd} vs {an}"
        );
    }
}

/// An encoder layer of width `d`, MLP width `f`.
fn encoder_weights(d: usize, f: usize) -> ClipLayerWeights {
    ClipLayerWeights {
        norm1: layer_norm(d, 1),
        norm2: layer_norm(d, 3),
        linears: [
            linear(d, d, 5),
            linear(d, d, 7),
            linear(d, d, 9),
            linear(d, d, 11),
            linear(f, d, 13),
            linear(d, f, 15),
        ],
    }
}

fn encoder_case(act: MlpAct) {
    let (n, s, d, f, nh) = (2, 5, 8, 12, 2);
    let l = encoder_weights(d, f);
    let shape = EncoderShape {
        num_heads: nh,
        eps: 1e-6,
        act,
    };
    let x = lcg(&[n, s, d], 20, 1.0, 0.0);
    let g = lcg(&[n, s, d], 21, 1.0, 0.0);
    let grads = encoder_layer_backward(&shape, &l, &x, &g).unwrap();
    let outs: Vec<Vec<usize>> = l
        .linears
        .iter()
        .map(|q| vec![n, s, q.weight.dim(0).unwrap()])
        .collect();
    let fwd =
        |x: &Tensor, p: &[Tensor]| encoder_layer_forward(&shape, &l, x, None, Some(p)).unwrap();
    check(&format!("{act:?}"), &fwd, &x, &g, &outs, &grads);
}

#[test]
fn clip_encoder_layer_backward_matches_finite_differences() {
    encoder_case(MlpAct::QuickGelu);
}

#[test]
fn siglip_encoder_layer_backward_matches_finite_differences() {
    encoder_case(MlpAct::GeluTanh);
}

/// A Qwen vision block of width 16 (2 heads of 8) over 10 patches in two
/// images (4 and 6 patches) and four windows; `qwen2_5` picks RMSNorm and
/// SwiGLU.
fn qwen_case(qwen2_5: bool, windowed: bool) {
    let (d, f, s) = (16, 24, 10);
    let cfg = QwenVisionConfig {
        width: d,
        mlp_width: f,
        depth: 1,
        num_heads: 2,
        out_width: 8,
        patch_size: 14,
        temporal_patch_size: 2,
        spatial_merge_size: 2,
        in_channels: 3,
        rope_theta: 1e4,
        window_size: 0,
        full_attention_blocks: Vec::new(),
    };
    let norm = |seed: u64| {
        if qwen2_5 {
            VisionNorm::Rms(lcg(&[d], seed, 0.3, 1.0))
        } else {
            VisionNorm::Layer(layer_norm(d, seed))
        }
    };
    let mut linears = vec![linear(3 * d, d, 5), linear(d, d, 7)];
    if qwen2_5 {
        linears.extend([linear(f, d, 9), linear(f, d, 11), linear(d, f, 13)]);
    } else {
        linears.extend([linear(f, d, 9), linear(d, f, 13)]);
    }
    let b = VisionBlock {
        norm1: norm(1),
        norm2: norm(3),
        linears,
    };
    let grid: Vec<[usize; 2]> = (0..s).map(|i| [i / 3, (i * 2) % 5]).collect();
    let (cos, sin) = rotary_tables(&cfg, &grid, DType::F64, &Device::Cpu).unwrap();
    let pos = VisionPositions {
        cos,
        sin,
        images: vec![0, 4, 10],
        windows: vec![0, 2, 4, 4, 7, 10],
    };
    let x = lcg(&[1, s, d], 20, 1.0, 0.0);
    let g = lcg(&[1, s, d], 21, 1.0, 0.0);
    let grads = vision_block_backward(&cfg, &b, &x, &pos, windowed, &g).unwrap();
    let outs: Vec<Vec<usize>> = b
        .linears
        .iter()
        .map(|q| vec![1, s, q.weight.dim(0).unwrap()])
        .collect();
    let fwd = |x: &Tensor, p: &[Tensor]| {
        block_forward(&cfg, &b, x, &pos, windowed, None, Some(p)).unwrap()
    };
    let label = format!("qwen2_5 {qwen2_5}, windowed {windowed}");
    check(&label, &fwd, &x, &g, &outs, &grads);
}

#[test]
fn qwen2_vl_block_backward_matches_finite_differences() {
    qwen_case(false, false);
}

#[test]
fn qwen2_5_vl_block_backward_matches_finite_differences() {
    qwen_case(true, true);
    qwen_case(true, false);
}

/// The backward's kernels split work over rayon's threads (the fused
/// element-wise kernels, the matrix products): 1 and 3 threads give the
/// same bits.
#[test]
fn encoder_backward_is_independent_of_the_thread_count() {
    let (n, s, d, f) = (2, 64, 32, 64);
    let l = encoder_weights(d, f);
    let shape = EncoderShape {
        num_heads: 4,
        eps: 1e-6,
        act: MlpAct::GeluTanh,
    };
    let x = lcg(&[n, s, d], 20, 1.0, 3.0);
    let g = lcg(&[n, s, d], 21, 1.0, 0.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let grads = encoder_layer_backward(&shape, &l, &x, &g).unwrap();
            let mut all = vec![grads.input];
            all.extend(grads.linear_outputs);
            all.iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .collect::<Vec<_>>()
        })
    };
    assert!(run(1) == run(3));
}
