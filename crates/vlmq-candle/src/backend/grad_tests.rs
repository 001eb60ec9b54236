//! Finite-difference checks (f64) of the block backward, the probe
//! gradients at every linear output and the loss gradient.

use candle_core::{DType, Device, Tensor};
use ndarray::Array2;
use vlmq::{GradientModel, QuantizableModel};

use crate::models::llama::config::{Architecture, LlamaConfig};
use crate::models::llama::forward::{layer_forward, Hooks};
use crate::models::llama::weights::LINEAR_NAMES;
use crate::random::random_model;
use crate::{LlamaModel, TextSample};

fn tiny(bias: bool) -> LlamaConfig {
    LlamaConfig {
        arch: if bias {
            Architecture::Qwen2
        } else {
            Architecture::Llama
        },
        vocab_size: 23,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        rope_theta: 1e4,
        rms_eps: 1e-5,
        tie_embeddings: !bias,
        qkv_bias: bias,
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic values from a tiny LCG: enough for directions.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
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

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `sum(layer(x; probes) * g)`.
fn objective(m: &LlamaModel, block: usize, x: &Tensor, probes: &[Tensor], g: &Tensor) -> f64 {
    let pos = m.positional(x.dim(1).unwrap()).unwrap();
    let mut hooks = Hooks {
        capture: None,
        probes: Some(probes),
    };
    let y = layer_forward(m.config(), &m.weights().layers[block], x, &pos, &mut hooks).unwrap();
    dot(&y, g)
}

fn check_block(bias: bool) {
    let m = random_model(&tiny(bias), 7, DType::F64).unwrap();
    let t = 6;
    let s = TextSample::causal((0..t as u32).map(|i| (i * 5) % 23).collect());
    let x = randn(&[1, t, 16], 1);
    let g = randn(&[1, t, 16], 2);
    let mut seen: Vec<(String, Array2<f32>)> = Vec::new();
    let mut sink = |name: &str, rows: ndarray::ArrayView2<'_, f32>| {
        seen.push((name.to_string(), rows.to_owned()));
    };
    // f64 analytic gradients (the sink sees them as f32, so probes are checked
    // against the f64 run below instead).
    let gx = m.block_backward(1, &x, &s, &g, Some(&mut sink)).unwrap();
    assert_eq!(
        seen.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        LINEAR_NAMES.to_vec()
    );
    let zeros: Vec<Tensor> = m.weights().layers[1]
        .linears
        .iter()
        .map(|l| Tensor::zeros((1, t, l.weight.dim(0).unwrap()), DType::F64, &Device::Cpu).unwrap())
        .collect();
    let eps = 1e-5;
    let d = randn(&[1, t, 16], 3);
    let fd = (objective(&m, 1, &(&x + (&d * eps).unwrap()).unwrap(), &zeros, &g)
        - objective(&m, 1, &(&x - (&d * eps).unwrap()).unwrap(), &zeros, &g))
        / (2.0 * eps);
    let an = dot(&gx, &d);
    assert!(
        (fd - an).abs() <= 1e-7 * an.abs().max(1.0),
        "input: fd {fd} vs {an}"
    );
    for (i, (name, rows)) in seen.iter().enumerate() {
        let dir = randn(zeros[i].dims(), 10 + i as u64);
        let mut plus = zeros.clone();
        let mut minus = zeros.clone();
        plus[i] = (&dir * eps).unwrap();
        minus[i] = (&dir * -eps).unwrap();
        let fd = (objective(&m, 1, &x, &plus, &g) - objective(&m, 1, &x, &minus, &g)) / (2.0 * eps);
        let gp = Tensor::from_vec(
            rows.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            dir.dims(),
            &Device::Cpu,
        )
        .unwrap();
        let an = dot(&gp, &dir);
        // The sink rows are f32: relative 1e-6 covers their rounding.
        assert!(
            (fd - an).abs() <= 1e-6 * an.abs().max(1.0),
            "{name}: fd {fd} vs {an}"
        );
    }
}

#[test]
fn block_backward_matches_finite_differences() {
    check_block(false);
    check_block(true);
}

#[test]
fn loss_gradient_matches_finite_differences() {
    // 150 tokens: the head runs over several chunks of target rows.
    for (bias, t) in [(false, 7), (true, 7), (false, 150)] {
        let m = random_model(&tiny(bias), 9, DType::F64).unwrap();
        let mut s = TextSample::causal((0..t as u32).map(|i| (i * 7 + 3) % 23).collect());
        s.targets[2] = false;
        let h = randn(&[1, t, 16], 4);
        let (value, g) = m.loss_and_grad(&h, &s).unwrap().unwrap();
        let d = randn(&[1, t, 16], 5);
        let eps = 1e-5;
        // The loss from the full logits (every row through the head), written
        // independently of `loss_and_grad`'s row-selecting, chunked head.
        let loss = |h: &Tensor| {
            let logits = m.head_logits(h, false).unwrap().squeeze(0).unwrap();
            let lp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
            let lp = lp.to_vec2::<f64>().unwrap();
            let picked: Vec<f64> = (1..t)
                .filter(|&i| s.targets[i])
                .map(|i| lp[i - 1][s.tokens[i] as usize])
                .collect();
            -picked.iter().sum::<f64>() / picked.len() as f64
        };
        // The loss is returned as f32: equal to the f64 value to f32 rounding.
        let full = loss(&h);
        assert!(
            (f64::from(value) - full).abs() <= 1e-6 * full.abs().max(1.0),
            "loss {value} vs {full}"
        );
        let fd = (loss(&(&h + (&d * eps).unwrap()).unwrap())
            - loss(&(&h - (&d * eps).unwrap()).unwrap()))
            / (2.0 * eps);
        let an = dot(&g, &d);
        assert!(
            (fd - an).abs() <= 1e-7 * an.abs().max(1.0),
            "loss: fd {fd} vs {an}"
        );
    }
}

#[test]
fn capture_shows_every_linear_input_in_group_order() {
    let m = random_model(&tiny(false), 3, DType::F32).unwrap();
    let s = TextSample::causal(vec![1, 2, 3, 4]);
    let x = m.embed(&s).unwrap();
    let mut seen = Vec::new();
    let mut sink = |name: &str, rows: ndarray::ArrayView2<'_, f32>| {
        seen.push((name.to_string(), rows.dim()));
    };
    m.block_forward(0, &x, &s, Some(&mut sink)).unwrap();
    let want: Vec<(String, (usize, usize))> = LINEAR_NAMES
        .iter()
        .map(|n| {
            let w = m.linear_weight(0, n).unwrap();
            (n.to_string(), (4, w.ncols()))
        })
        .collect();
    assert_eq!(seen, want);
}
