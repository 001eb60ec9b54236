//! The committed toy ViT-LLM (`assets/toy_vit_llm.safetensors`) on candle:
//! same answer logits as the reference backend (vlmq-nn) and the same
//! held-out accuracy.

use candle_core::{Device, Tensor};

use super::ToyVitLlm;
use vlmq_toy::{accuracy, examples, load_toy_model, to_sample, Split};

fn check(file: &str) {
    let path = format!("{}/../../assets/{file}", env!("CARGO_MANIFEST_DIR"));
    let path = path.as_str();
    assert!(std::path::Path::new(path).exists(), "{path} is missing");
    let reference = load_toy_model(path).unwrap();
    let ours = ToyVitLlm::load(path, &Device::Cpu).unwrap();
    // The 600 held-out examples of the toy's accuracy test (vlmq-toy/tests).
    let eval = examples(7, Split::Eval, 0, 600);
    let mut correct = 0usize;
    let mut worst = 0.0f32;
    for ex in &eval {
        let (p, f) = ex.patches.dim();
        let patches = Tensor::from_vec(
            ex.patches.iter().copied().collect::<Vec<f32>>(),
            (p, f),
            &Device::Cpu,
        )
        .unwrap();
        let tokens: Vec<u32> = ex.question.iter().map(|&t| t as u32).collect();
        let logits = ours.logits(&patches, &tokens).unwrap();
        let last: Vec<f32> = logits
            .narrow(0, logits.dim(0).unwrap() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = reference.logits(&to_sample(ex)).unwrap();
        let want = want.row(want.nrows() - 1);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = last
            .iter()
            .zip(want.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(d / scale);
        let arg = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        correct += usize::from(arg == ex.answer);
    }
    let acc = correct as f64 / eval.len() as f64;
    let want = accuracy(&reference, &eval).unwrap();
    eprintln!("{file} on candle: accuracy {acc} (reference {want}), worst rel answer-logit diff {worst:.2e}");
    // f32 on both sides with different summation orders (~1e-6); 1e-4 as
    // for the hf-tiny fixtures.
    assert!(worst < 1e-4, "answer logits differ by {worst:.2e} relative");
    // An example whose two best logits nearly tie could flip: allow one.
    assert!(
        (acc - want).abs() <= 1.0 / eval.len() as f64 + 1e-12,
        "{acc} vs {want}"
    );
}

#[test]
fn toy_models_give_the_reference_accuracy_on_candle() {
    check("toy_vit_llm.safetensors");
    check("toy_vit_llm_wide.safetensors");
}
