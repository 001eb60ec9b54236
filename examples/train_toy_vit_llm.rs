//! Trains the toy ViT-LLM on the synthetic VQA task and writes its weights.
//!
//! Run: `cargo run --release --example train_toy_vit_llm -- [--steps N] [--lr X]
//! [--init PATH --offset STEPS] [--save-every N] [--background plain|cluttered]
//! [--width D] [--vit-blocks N] [--lm-blocks N] [--out PATH]` (default output:
//! `assets/toy_vit_llm.safetensors`). `--width` sets both model widths (MLP
//! hidden 2D, D/16 heads) and the block flags the depths; the defaults are
//! [`ToyConfig::default`]. `--init` continues from saved weights, whose sizes it
//! reads from the file; `--offset` skips the training batches the
//! earlier run used; `--background` picks the image background for training
//! and the printed held-out accuracy (default: cluttered).

use std::time::Instant;

use vlmq_nn::{save_safetensors, StoreDtype};
use vlmq_toy::{
    accuracy, build_model, examples_with, load_toy_model, train, Background, Split, ToyConfig,
    TrainConfig,
};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The model sizes: the defaults, changed by `--width`, `--vit-blocks` and
/// `--lm-blocks`.
fn sizes_from_flags() -> ToyConfig {
    let num = |name: &str, default: usize| {
        arg(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
    };
    let base = ToyConfig::default();
    ToyConfig::with_width(
        num("--width", base.d_lm),
        num("--vit-blocks", base.vit_blocks),
        num("--lm-blocks", base.lm_blocks),
    )
}

fn main() -> vlmq::Result<()> {
    let seed = 7;
    let mut cfg = TrainConfig::default();
    if let Some(s) = arg("--steps") {
        cfg.steps = s.parse().expect("--steps takes a number");
    }
    let out = arg("--out").unwrap_or_else(|| "assets/toy_vit_llm.safetensors".into());
    if let Some(lr) = arg("--lr") {
        cfg.lr = lr.parse().expect("--lr takes a number");
    }
    let mut model = match arg("--init") {
        Some(init) => load_toy_model(&init)?,
        None => build_model(sizes_from_flags(), seed)?,
    };
    // Continuing a run draws fresh training examples after the ones already seen.
    let offset: usize = arg("--offset").map_or(0, |o| o.parse().expect("--offset takes a number"));
    let background: Background =
        arg("--background").map_or(Ok(Background::default()), |b| b.parse())?;
    let eval = examples_with(seed, Split::Eval, 0, 500, background);
    let start = Instant::now();
    let batch = cfg.batch;
    let save_every: usize =
        arg("--save-every").map_or(0, |v| v.parse().expect("--save-every takes a number"));
    let mut losses = Vec::new();
    let mut snapshot_error = None;
    train(
        &mut model,
        cfg,
        |step| {
            let start = ((offset + step) * batch) as u64;
            examples_with(seed, Split::Train, start, batch, background)
        },
        &mut |step, loss, m| {
            losses.push(loss);
            if step % 50 == 49 {
                let mean = losses[losses.len() - 50..].iter().sum::<f32>() / 50.0;
                eprintln!(
                    "step {:>5}  mean loss of the last 50 steps {mean:.4}  {:.0}s",
                    step + 1,
                    start.elapsed().as_secs_f64()
                );
            }
            if save_every > 0 && (step + 1) % save_every == 0 {
                if let Err(e) = save_safetensors(m, &out, StoreDtype::F32) {
                    snapshot_error.get_or_insert(e);
                }
            }
        },
    )?;
    if let Some(e) = snapshot_error {
        return Err(e);
    }
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
