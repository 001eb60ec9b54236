//! Issue 13 item 16: fuzzing the files `vlmq` reads (checkpoint bytes,
//! config JSON, resume-state files) with mutated copies of valid files.
//! Every outcome must be a value or a typed error: a panic fails the
//! property, and a hang would stall the test (every read is bounded by the
//! file size, so none is expected).
//!
//! Cases per property: `VLMQ_FUZZ_CASES` (default 256, a few seconds in the
//! test profile). The long run (10,000 cases per property) is:
//!
//! ```text
//! VLMQ_FUZZ_CASES=10000 cargo test -p vlmq --test fuzz_inputs -- --nocapture
//! ```

mod common;

use std::path::{Path, PathBuf};

use common::tiny::{samples, TinyModel};
use ndarray::Array2;
use proptest::prelude::*;
use vlmq::pack::{Checkpoint, CheckpointWriter, DenseTensor};
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::{Bits, GptqConfig, GroupSize, QuantScheme, QuantizedWeight};

fn cases() -> u32 {
    std::env::var("VLMQ_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Xor(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(p, b)| Edit::Xor(p, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        1 => any::<usize>().prop_map(Edit::Delete),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..6)
}

/// Applies `edits`; positions fall in the first `focus` bytes half of the
/// time (the header, where structure lives), anywhere otherwise.
fn mutate(bytes: &[u8], edits: &[Edit], focus: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for (k, e) in edits.iter().enumerate() {
        if b.is_empty() {
            break;
        }
        let span = if k % 2 == 0 {
            focus.min(b.len())
        } else {
            b.len()
        };
        let at = |p: usize| p % span.max(1);
        match *e {
            Edit::Xor(p, x) => {
                let i = at(p);
                b[i] ^= x;
            }
            Edit::Set(p, x) => {
                let i = at(p);
                b[i] = x;
            }
            Edit::Insert(p, x) => {
                let i = at(p);
                b.insert(i, x);
            }
            Edit::Delete(p) => {
                let i = at(p);
                b.remove(i);
            }
            Edit::Truncate(p) => {
                let i = at(p);
                b.truncate(i);
            }
        }
    }
    b
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid checkpoint: one asymmetric 4-bit layer with a bias, one passthrough tensor.
fn write_checkpoint(dir: &Path, digests: bool) {
    let w = QuantizedWeight::new(
        Bits::new(4).unwrap(),
        false,
        Array2::from_shape_fn((16, 32), |(o, i)| ((o * 5 + i * 3) % 16) as u8),
        Array2::from_shape_fn((2, 16), |(g, o)| ((1 + (g + o) % 4) as f32) / 128.0),
        Array2::from_shape_fn((2, 16), |(g, o)| ((g + o) % 16) as u8),
        (0..32).map(|i| (i / 16) as u32).collect(),
    )
    .unwrap();
    let bias = DenseTensor::F32(ndarray::Array1::from_elem(16, 0.5).into_dyn());
    let mut wr = CheckpointWriter::new().with_tensor_digests(digests);
    wr.add_layer("model.layer", w, Some(bias)).unwrap();
    wr.add_tensor(
        "model.norm",
        DenseTensor::F32(Array2::from_elem((1, 8), 1.0).into_dyn()),
    )
    .unwrap();
    wr.write(dir).unwrap();
}

/// Opens and reads everything; only the absence of panics matters.
fn read_all(dir: &Path) {
    let Ok(ck) = Checkpoint::open(dir) else {
        return;
    };
    for name in ck.names() {
        if let Ok(w) = ck.layer(name) {
            let _ = w.dequantize();
        }
        let _ = ck.bias(name);
        if let Ok(p) = ck.packed_linear(name) {
            let _ = p.gemv(ndarray::Array1::ones(p.in_features()).view());
        }
    }
    for name in ck.tensor_names() {
        let _ = ck.tensor(name);
    }
}

fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn mutated_checkpoint_bytes_never_panic() {
    for digests in [false, true] {
        let good = temp(&format!("ck-good-{digests}"));
        write_checkpoint(&good, digests);
        let bytes = std::fs::read(good.join("model.safetensors")).unwrap();
        let focus = header_len(&bytes);
        let work = temp(&format!("ck-work-{digests}"));
        for f in ["quantize_config.json", "config.json"] {
            std::fs::copy(good.join(f), work.join(f)).unwrap();
        }
        proptest!(config(), |(e in edits())| {
            std::fs::write(work.join("model.safetensors"), mutate(&bytes, &e, focus)).unwrap();
            read_all(&work);
        });
        for d in [good, work] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}

#[test]
fn mutated_config_json_never_panics() {
    let good = temp("cfg-good");
    write_checkpoint(&good, false);
    let work = temp("cfg-work");
    std::fs::copy(
        good.join("model.safetensors"),
        work.join("model.safetensors"),
    )
    .unwrap();
    let qc = std::fs::read(good.join("quantize_config.json")).unwrap();
    let mc = std::fs::read(good.join("config.json")).unwrap();
    proptest!(config(), |(e in edits(), which in 0u8..3)| {
        // Mutate one config or the other, or drop one and mutate the other.
        let (q, m) = match which {
            0 => (Some(mutate(&qc, &e, qc.len())), Some(mc.clone())),
            1 => (Some(qc.clone()), Some(mutate(&mc, &e, mc.len()))),
            _ => (None, Some(mutate(&mc, &e, mc.len()))),
        };
        for (name, content) in [("quantize_config.json", q), ("config.json", m)] {
            let path = work.join(name);
            match content {
                Some(c) => std::fs::write(&path, c).unwrap(),
                None => { let _ = std::fs::remove_file(&path); }
            }
        }
        read_all(&work);
    });
    for d in [good, work] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// FNV-1a 64, as the state manifest records it (to fix up checksums so the
/// mutated bytes reach the parsers behind the checksum check).
fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[test]
fn mutated_resume_state_files_never_panic() {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    let good = temp("state-good");
    let cfg = |dir: &Path| {
        PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme)).with_state_dir(dir)
    };
    let data = samples(4, 2, 16);
    quantize_model(
        &mut TinyModel::new(3, 16, 24, 2),
        &data,
        &cfg(&good),
        |_| {},
    )
    .unwrap();
    let files = [
        "manifest.json",
        "block_0.safetensors",
        "block_0.json",
        "block_1.safetensors",
        "block_1.json",
    ];
    let originals: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(good.join(f)).unwrap())
        .collect();
    let work = temp("state-work");
    proptest!(config(), |(e in edits(), which in 0usize..5, fix_checksum in any::<bool>())| {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let mut contents = originals.clone();
        let focus = if files[which].ends_with(".safetensors") {
            header_len(&contents[which])
        } else {
            contents[which].len()
        };
        contents[which] = mutate(&contents[which], &e, focus);
        if fix_checksum && which > 0 {
            let manifest = String::from_utf8_lossy(&contents[0]).into_owned();
            let old = fnv_hex(&originals[which]);
            let new = fnv_hex(&contents[which]);
            contents[0] = manifest.replace(&old, &new).into_bytes();
        }
        for (f, c) in files.iter().zip(&contents) {
            std::fs::write(work.join(f), c).unwrap();
        }
        let _ = quantize_model(&mut TinyModel::new(3, 16, 24, 2), &data, &cfg(&work), |_| {});
    });
    for d in [good, work] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
