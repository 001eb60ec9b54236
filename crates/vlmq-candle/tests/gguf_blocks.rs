//! Every GGUF block type packed by vlmq decodes, through candle's own
//! dequantization, to exactly the values vlmq's solver chose.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use ndarray::Array2;
use vlmq::__private::SplitMix64;
use vlmq::hessian::HessianAccumulator;
use vlmq::quant::gguf::GgufType;
use vlmq::solver::solve_layer_gguf;
use vlmq::{Bits, GptqConfig, GroupFit, Method, QuantScheme};

fn candle_dtype(ty: GgufType) -> GgmlDType {
    match ty {
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4_0 => GgmlDType::Q4_0,
        GgufType::Q4_1 => GgmlDType::Q4_1,
        GgufType::Q5_0 => GgmlDType::Q5_0,
        GgufType::Q4K => GgmlDType::Q4K,
        GgufType::Q6K => GgmlDType::Q6K,
    }
}

fn normal(rng: &mut SplitMix64) -> f32 {
    let u1 = rng.uniform_f64().max(1e-300);
    let u2 = rng.uniform_f64();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[test]
fn candle_decodes_vlmq_blocks_to_the_solved_values() {
    let (m, n) = (20, 512);
    let mut rng = SplitMix64::new(7);
    // Weights of mixed magnitude (sub-blocks far apart exercise the K-quant
    // sub-scales), inputs with per-feature scales over a decade.
    let w = Array2::from_shape_fn((m, n), |(_, j)| {
        let scale = if (j / 32) % 3 == 0 { 0.5 } else { 0.02 };
        scale * normal(&mut rng)
    });
    let feature: Vec<f32> = (0..n).map(|j| 0.3 + (j % 10) as f32 / 3.0).collect();
    let x = Array2::from_shape_fn((2 * n, n), |(_, j)| feature[j] * normal(&mut rng));
    let mut acc = HessianAccumulator::<f32>::new(n);
    acc.add(x.view(), None).unwrap();
    let stats = acc.finish().unwrap();
    for ty in GgufType::ALL {
        for fit in [GroupFit::BlockStart, GroupFit::Updated] {
            let cfg = GptqConfig::new(QuantScheme::new(Bits::new(4).unwrap())).with_group_fit(fit);
            let sol = solve_layer_gguf(w.view(), &stats, &cfg, Method::Gptq, ty).unwrap();
            let bytes = sol.pack().unwrap();
            let q = qtensor_from_ggml(candle_dtype(ty), &bytes, vec![m, n], &Device::Cpu).unwrap();
            let back: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            for (r, row) in back.iter().enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    assert_eq!(
                        v.to_bits(),
                        sol.dequantized[[r, c]].to_bits(),
                        "{ty} {fit:?} [{r}, {c}]: candle {v} vs vlmq {}",
                        sol.dequantized[[r, c]]
                    );
                }
            }
        }
    }
}
