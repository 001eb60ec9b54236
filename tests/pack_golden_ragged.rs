//! GPTQModel checkpoints of a layer whose group size does not divide its
//! input width (576 inputs at group size 128: four groups of 128 and one of
//! 64, SmolLM2-135M's shape), read from `tests/fixtures/gptq-golden-ragged` (a copy of the shared golden fixture):
//! decoded bit-exactly and written back byte for byte, in v1 and v2.

mod pack_common;

use std::path::PathBuf;

use ndarray::Array2;
use pack_common::{read_expected, Expected, TempDir};
use vlmq::pack::{Checkpoint, CheckpointFormat, CheckpointWriter};
use vlmq::{Error, GroupSize};

const LAYER: &str = "model.layers.0.mlp.down_proj";
const OUT: usize = 256;
const IN: usize = 576;

fn root() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gptq-golden-ragged"
    ));
    assert!(
        p.join("README.md").is_file(),
        "missing fixture directory {} (the ragged GPTQModel checkpoints)",
        p.display()
    );
    p
}

fn dir(b: u32, version: u32) -> PathBuf {
    root().join(format!("{b}bit/checkpoint_v{version}"))
}

fn expected(b: u32) -> Expected {
    read_expected(&root().join(format!("{b}bit")), LAYER)
}

#[test]
fn ragged_layers_decode_bit_exactly_from_v1_and_v2() {
    for b in [3, 4] {
        let exp = expected(b);
        assert_eq!(exp.zeros.dim(), (5, OUT));
        for version in [1, 2] {
            let tag = format!("{b}-bit v{version}");
            let ck = Checkpoint::open(dir(b, version)).unwrap();
            assert_eq!(
                ck.config().group_size,
                GroupSize::new(128).unwrap(),
                "{tag}"
            );
            let w = ck.layer(LAYER).unwrap();
            assert_eq!(
                (w.out_features(), w.in_features(), w.groups()),
                (OUT, IN, 5)
            );
            assert_eq!(w.group_size(), GroupSize::new(128).unwrap(), "{tag}");
            assert!(w.contiguous_group_size().is_none(), "{tag}: act-order");
            // Every group holds 128 inputs but the last, which holds 64.
            let mut counts = [0usize; 5];
            for &g in w.g_idx() {
                counts[g as usize] += 1;
            }
            assert_eq!(counts, [128, 128, 128, 128, 64], "{tag}");
            assert_eq!(w.codes(), exp.codes.view(), "{tag}: codes");
            assert_eq!(w.zeros(), exp.zeros.view(), "{tag}: zeros");
            let dense = w.dequantize();
            for ((idx, g), e) in dense.indexed_iter().zip(exp.weight.iter()) {
                assert_eq!(g.to_bits(), e.to_bits(), "{tag}: weight {idx:?}");
            }
            let bias = ck.bias(LAYER).unwrap().expect("bias").to_f32();
            assert_eq!(bias.as_slice().unwrap(), exp.bias.as_slice().unwrap());
        }
    }
    // The 4-bit file has zero points of 0 (stored in v1 with the word-wise borrow).
    assert!(expected(4).zeros.iter().any(|&z| z == 0));
}

fn file_bytes(d: &std::path::Path) -> Vec<u8> {
    std::fs::read(d.join("model.safetensors")).unwrap()
}

#[test]
fn ragged_layers_write_back_byte_for_byte() {
    for b in [3, 4] {
        for version in [1, 2] {
            let tag = format!("{b}-bit v{version}");
            let golden = Checkpoint::open(dir(b, version)).unwrap();
            let w = golden.layer(LAYER).unwrap();
            let bias = golden.bias(LAYER).unwrap();
            let out = TempDir::new("ragged-write");
            let format = if version == 1 {
                CheckpointFormat::V1
            } else {
                CheckpointFormat::V2
            };
            // Byte for byte, header included: without vlmq's tensor digests.
            let mut writer = CheckpointWriter::new()
                .with_tensor_digests(false)
                .with_format(format)
                .with_asymmetric_v1(true);
            writer.add_layer(LAYER, w.clone(), bias).unwrap();
            let cfg = writer.write(out.path()).unwrap();
            assert_eq!(cfg.group_size.to_gptq(), 128, "{tag}");
            assert!(cfg.desc_act && !cfg.sym, "{tag}");
            // The whole safetensors file, header included, is GPTQModel's.
            assert!(
                file_bytes(out.path()) == file_bytes(&dir(b, version)),
                "{tag}: model.safetensors differs from GPTQModel's"
            );
            let back = Checkpoint::open(out.path()).unwrap();
            assert_eq!(back.layer(LAYER).unwrap(), w, "{tag}");
        }
    }
}

#[test]
fn asymmetric_v1_is_refused_unless_asked_for() {
    let golden = Checkpoint::open(dir(4, 2)).unwrap();
    let w = golden.layer(LAYER).unwrap();
    let mut writer = CheckpointWriter::new().with_format(CheckpointFormat::V1);
    writer.add_layer(LAYER, w.clone(), None).unwrap();
    let out = TempDir::new("ragged-v1-refused");
    let err = writer.write(out.path()).unwrap_err();
    assert!(
        matches!(err, Error::Unencodable { .. }) && err.to_string().contains("gptq_v2"),
        "{err}"
    );
    assert!(!out.path().join("model.safetensors").exists());
    // The default for an asymmetric layer is v2.
    let mut writer = CheckpointWriter::new();
    writer.add_layer(LAYER, w, None).unwrap();
    assert_eq!(
        writer.write(out.path()).unwrap().format,
        CheckpointFormat::V2
    );
}

#[test]
fn packed_linear_on_ragged_layers_matches_dense() {
    for b in [3, 4] {
        let exp = expected(b);
        let ck = Checkpoint::open(dir(b, 2)).unwrap();
        let lin = ck.packed_linear(LAYER).unwrap();
        let x = Array2::from_shape_fn((3, IN), |(t, i)| {
            ((t * 31 + i * 17) % 23) as f32 / 11.0 - 1.0
        });
        let y = lin.forward(x.view()).unwrap();
        let y1 = lin.gemv(x.row(0)).unwrap();
        let dense = x.dot(&exp.weight.t()) + &exp.bias;
        for t in 0..3 {
            for o in 0..OUT {
                // Different summation order only: bound by eps * n * sum |x||w|.
                let mag: f32 = x
                    .row(t)
                    .iter()
                    .zip(exp.weight.row(o))
                    .map(|(a, w)| (a * w).abs())
                    .sum();
                let tol = IN as f32 * f32::EPSILON * (mag + exp.bias[o].abs());
                assert!(
                    (y[[t, o]] - dense[[t, o]]).abs() <= tol,
                    "{b}-bit [{t}, {o}]"
                );
                if t == 0 {
                    assert!((y1[o] - dense[[0, o]]).abs() <= tol, "{b}-bit gemv [{o}]");
                }
            }
        }
        assert_eq!(lin.to_quantized_weight().unwrap(), ck.layer(LAYER).unwrap());
    }
}
