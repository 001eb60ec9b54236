//! The pipeline at real-model scale: a SmolLM2-135M-shaped decoder (30
//! blocks, width 576, 9 query / 3 KV heads, MLP 1536, vocabulary 49152)
//! with random weights, quantized with GPTQ or VLMQ on random token
//! windows. Prints seconds per block, the total and the peak resident
//! memory, so runs with different sample counts show what grows with them.
//!
//! ```text
//! cargo run --release -p vlmq-candle --example pipeline_scale -- \
//!     [--method gptq|vlmq|...] [--samples 128] [--tokens 512] [--blocks 30] \
//!     [--capture-tokens 8192] [--one-forward]
//! ```
//!
//! The model is built on the candle backend because it has the real
//! architecture (grouped KV heads, SwiGLU); the crate's reference backend
//! has neither. What grows with `--samples`: the block streams (one hidden
//! state per sample, `samples x tokens x 576 x 4` bytes; two for GPTAQ) and
//! nothing else: captured layer inputs and the importance pass's stored
//! hidden states are bounded by `--capture-tokens`.

use std::time::Instant;

use vlmq::{Bits, GptqConfig, GroupSize, PipelineConfig, QuantMethod, QuantScheme};
use vlmq_candle::candle_core::DType;
use vlmq_candle::{random_model, Architecture, LlamaConfig, TextSample};

/// Peak resident set size of this process in bytes (Linux `VmHWM`), when known.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut method, mut samples, mut tokens, mut blocks) = (QuantMethod::Gptq, 128, 512, 30);
    let mut capture = PipelineConfig::DEFAULT_CAPTURE_TOKENS;
    let mut one_forward = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--one-forward" {
            one_forward = true;
            continue;
        }
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--method" => method = v.parse()?,
            "--samples" => samples = v.parse()?,
            "--tokens" => tokens = v.parse()?,
            "--blocks" => blocks = v.parse()?,
            "--capture-tokens" => capture = v.parse()?,
            o => return Err(format!("unknown flag {o:?}").into()),
        }
    }
    let cfg = LlamaConfig {
        arch: Architecture::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: blocks,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100_000.0,
        rms_eps: 1e-5,
        tie_embeddings: true,
        qkv_bias: false,
    };
    let t0 = Instant::now();
    let mut model = random_model(&cfg, 7, DType::F32)?;
    let mut rng = vlmq::__private::SplitMix64::new(11);
    let calib: Vec<TextSample> = (0..samples)
        .map(|_| {
            TextSample::causal(
                (0..tokens)
                    .map(|_| rng.below(cfg.vocab_size) as u32)
                    .collect(),
            )
        })
        .collect();
    let rss_loaded = peak_rss();
    eprintln!(
        "model built in {:.1}s; peak RSS {:.0} MiB; {samples} samples x {tokens} tokens",
        t0.elapsed().as_secs_f64(),
        rss_loaded.unwrap_or(0) as f64 / 1048576.0
    );
    let scheme = QuantScheme::new(Bits::new(4)?).with_group_size(GroupSize::new(128)?);
    let pcfg = PipelineConfig::new(method, GptqConfig::new(scheme))
        .with_capture_tokens(capture)
        .with_true_sequential(!one_forward);
    let t = Instant::now();
    let mut seen = None;
    let out = vlmq::quantize_model(&mut model, &calib, &pcfg, |p| {
        // A block's layers are solved after its capture pass: the first
        // solved layer of each block marks the end of that block's capture.
        if p.stage == vlmq::pipeline::Stage::Quantize && seen != Some(p.block) {
            seen = Some(p.block);
            eprintln!(
                "block {:>2}: captured by {:>7.1}s",
                p.block,
                p.elapsed.as_secs_f64()
            );
        }
    })?;
    let total = t.elapsed().as_secs_f64();
    let per_block = (total - out.report.importance_seconds) / blocks.max(1) as f64;
    let line = serde_json::json!({
        "method": method.name(), "samples": samples, "tokens": tokens, "blocks": blocks,
        "capture_tokens": capture, "true_sequential": !one_forward,
        "importance_seconds": out.report.importance_seconds, "seconds_per_block": per_block,
        "total_seconds": total, "peak_rss_bytes": peak_rss(),
        "stream_bytes": samples * tokens * cfg.hidden_size * 4,
    });
    println!("{line}");
    Ok(())
}
