//! Bad inputs to the checkpoint writer and reader get typed errors (issue
//! 13; listed in docs/RELIABILITY.md).

mod pack_common;

use ndarray::Array2;
use pack_common::TempDir;
use vlmq::pack::{Checkpoint, CheckpointFormat, CheckpointWriter, DenseTensor};
use vlmq::{Bits, Error, QuantizedWeight};

fn weight(scale: f32) -> Result<QuantizedWeight, Error> {
    QuantizedWeight::new(
        Bits::new(4).unwrap(),
        true,
        Array2::from_shape_fn((32, 32), |(o, i)| ((o + i) % 16) as u8),
        Array2::from_elem((1, 32), scale),
        Array2::from_elem((1, 32), 8),
        vec![0; 32],
    )
}

#[test]
fn zero_and_negative_scales_are_refused() {
    for s in [0.0f32, -0.5] {
        assert!(
            matches!(
                weight(s),
                Err(Error::InvalidConfig {
                    field: "scales",
                    ..
                })
            ),
            "{s}"
        );
    }
    assert!(weight(0.5).is_ok());
}

#[test]
fn empty_layer_name_is_refused() {
    let mut w = CheckpointWriter::new();
    assert!(matches!(
        w.add_layer("", weight(0.5).unwrap(), None),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn passthrough_tensor_with_a_quantized_suffix_is_refused_at_add() {
    let t = || DenseTensor::F32(Array2::<f32>::zeros((2, 2)).into_dyn());
    let mut w = CheckpointWriter::new();
    for name in ["x.qweight", "layers.0.qzeros"] {
        assert!(
            matches!(w.add_tensor(name, t()), Err(Error::InvalidConfig { .. })),
            "{name}"
        );
    }
    w.add_tensor("x.weight", t()).unwrap();
}

#[test]
fn symmetric_v2_data_under_a_v1_config_is_detected() {
    // Written as v2, then the config claims v1: every zero point would read one
    // too high. Symmetric data makes that detectable (zeros must be 2^(b-1)).
    let dir = TempDir::new("v1-claims");
    let mut w = CheckpointWriter::new().with_format(CheckpointFormat::V2);
    w.add_layer("l", weight(0.5).unwrap(), None).unwrap();
    w.write(dir.path()).unwrap();
    for file in ["quantize_config.json", "config.json"] {
        let p = dir.path().join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("gptq_v2", "gptq")).unwrap();
    }
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert!(matches!(
        ck.layer("l"),
        Err(Error::CorruptCheckpoint { .. })
    ));
}
