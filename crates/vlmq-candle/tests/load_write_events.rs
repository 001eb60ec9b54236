//! Counted progress of loading and writing: `Stage::Load` events count the
//! bytes of the weight files read (HF safetensors and GGUF), `Stage::Write`
//! events the checkpoint's tensors plus the write to disk; both arrive one
//! per tensor, never go back, end at `done == total`, and a `Break` cancels
//! with nothing written.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use vlmq::Error;
use vlmq_candle::candle_core::quantized::GgmlDType;
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::export::write_gguf_llama;
use vlmq_candle::{
    load_hf_dir, Calibration, Event, LoadOptions, LoadedModel, Quantized, Quantizer, Recipe, Stage,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny/llama")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vlmq-events-{}-{name}", std::process::id()))
}

/// The events of `stage` that `run` reports, in order.
fn events_of(stage: Stage, run: impl FnOnce(&mut dyn FnMut(&Event))) -> Vec<Event> {
    let mut seen = Vec::new();
    run(&mut |e: &Event| {
        if e.stage == stage {
            seen.push(e.clone());
        }
    });
    seen
}

/// Counted: one total throughout, `done` never going back, at least
/// `min_steps` distinct counts, the last at `done == total`.
fn assert_counted(events: &[Event], total: usize, min_steps: usize) {
    assert!(events.iter().all(|e| e.total == total), "{events:?}");
    assert!(events.windows(2).all(|w| w[0].done <= w[1].done));
    let mut counts: Vec<usize> = events.iter().map(|e| e.done).collect();
    counts.dedup();
    assert!(counts.len() >= min_steps, "only {counts:?} of {total}");
    assert_eq!(events.last().map(|e| e.done), Some(total));
}

fn load(path: &Path, on: &mut dyn FnMut(&Event)) -> Quantizer {
    Quantizer::from_pretrained_with_events(path, &LoadOptions::default(), |e| {
        on(e);
        ControlFlow::Continue(())
    })
    .unwrap()
}

fn file_size(p: &Path) -> usize {
    std::fs::metadata(p).unwrap().len() as usize
}

/// hf-tiny's Llama quantized on a few windows of made-up text.
fn quantized() -> Quantized {
    let text = "the model reads text and writes more text every day ".repeat(40);
    let recipe = Recipe {
        samples: 2,
        seq_len: 16,
        group_size: 16,
        ..Recipe::default()
    }
    .check("test".as_ref())
    .unwrap();
    Quantizer::from_pretrained(fixture())
        .unwrap()
        .calibrate(Calibration::Text(text), "text")
        .unwrap()
        .quantize(&recipe, |_| ControlFlow::Continue(()))
        .unwrap()
}

#[test]
fn loading_an_hf_directory_counts_the_safetensors_bytes_per_tensor() {
    let dir = fixture();
    let seen = events_of(Stage::Load, |on| {
        load(&dir, on);
    });
    let total = file_size(&dir.join("model.safetensors"));
    // hf-tiny's Llama stores 20 tensors (2 blocks of 9, the embedding and
    // the final norm; the head is tied): the start and one count per tensor.
    assert_counted(&seen, total, 21);
}

#[test]
fn loading_a_gguf_file_counts_its_bytes_per_tensor() {
    let gguf = tmp("load.gguf");
    let model = load_hf_dir(fixture(), DType::F32, &Device::Cpu).unwrap();
    write_gguf_llama(
        &model,
        &BTreeMap::new(),
        Some(&fixture()),
        GgmlDType::F32,
        &gguf,
    )
    .unwrap();
    let seen = events_of(Stage::Load, |on| {
        load(&gguf, on);
    });
    assert_counted(&seen, file_size(&gguf), 21);
    std::fs::remove_file(&gguf).unwrap();
}

#[test]
fn writing_a_gptq_checkpoint_counts_its_tensors_and_the_write() {
    let q = quantized();
    let out = tmp("write");
    let seen = events_of(Stage::Write, |on| {
        q.save_with_events(&out, |e| {
            on(e);
            ControlFlow::Continue(())
        })
        .unwrap();
    });
    let LoadedModel::Llama(m) = q.model() else {
        panic!("hf-tiny's Llama is a Llama");
    };
    let tensors = m.weights().named_tensors().len();
    assert_counted(&seen, tensors + 1, tensors + 1);
    assert!(out.join("model.safetensors").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_break_cancels_a_load_and_a_write_before_anything_is_written() {
    let err = Quantizer::from_pretrained_with_events(fixture(), &LoadOptions::default(), |e| {
        if e.done > 0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .err();
    assert!(matches!(err, Some(Error::Cancelled)), "{err:?}");

    let q = quantized();
    let out = tmp("cancelled");
    let err = q
        .save_with_events(&out, |e| {
            if e.done + 1 == e.total {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .err();
    assert!(matches!(err, Some(Error::Cancelled)), "{err:?}");
    assert!(!out.exists(), "a cancelled write leaves no output");
}
