//! Trains the toy ViT-LLM on the synthetic VQA task and writes its weights.
//!
//! Run: `cargo run --release --example train_toy_vit_llm -- [--steps N] [--out PATH]`
//! (default output: `assets/toy_vit_llm.safetensors`).

use std::time::Instant;

use vlmq::nn::{save_safetensors, StoreDtype};
use vlmq::toy::{accuracy, build_model, examples, train, Split, ToyConfig, TrainConfig};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> vlmq::Result<()> {
    let seed = 7;
    let mut cfg = TrainConfig::default();
    if let Some(s) = arg("--steps") {
        cfg.steps = s.parse().expect("--steps takes a number");
    }
    let out = arg("--out").unwrap_or_else(|| "assets/toy_vit_llm.safetensors".into());
    let mut model = build_model(ToyConfig::default(), seed)?;
    let eval = examples(seed, Split::Eval, 0, 500);
    let start = Instant::now();
    let batch = cfg.batch;
    train(
        &mut model,
        cfg,
        |step| examples(seed, Split::Train, (step * batch) as u64, batch),
        &mut |step, loss| {
            if step % 50 == 0 {
                eprintln!(
                    "step {step:>5}  loss {loss:.4}  {:.0}s",
                    start.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    let acc = accuracy(&model, &eval)?;
    eprintln!(
        "held-out accuracy {:.2}% after {:.0}s",
        100.0 * acc,
        start.elapsed().as_secs_f64()
    );
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).map_err(|e| vlmq::Error::Io {
            path: dir.into(),
            source: e,
        })?;
    }
    save_safetensors(&model, &out, StoreDtype::F32)?;
    eprintln!("wrote {out}");
    Ok(())
}
