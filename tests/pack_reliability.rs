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

/// Reads every layer and passthrough tensor of the checkpoint in `dir`.
fn read_all(dir: &std::path::Path) -> Result<(), Error> {
    let ck = Checkpoint::open(dir)?;
    for name in ck.names() {
        ck.layer(name)?;
        ck.bias(name)?;
    }
    for name in ck.tensor_names() {
        ck.tensor(name)?;
    }
    Ok(())
}

/// Issue 13 item 12: every single-byte change of tensor data is refused by
/// the digest check (before digests, a flip that kept codes, zero points
/// and scales in range read back as a different weight); a file written
/// without digests (as other tools write them) still loads.
#[test]
fn tensor_data_flips_are_caught_by_the_digests() {
    let mut writer = CheckpointWriter::new();
    writer
        .add_layer("layer", weight(0.5).unwrap(), None)
        .unwrap();
    writer
        .add_tensor(
            "norm",
            DenseTensor::F32(Array2::from_elem((1, 8), 1.5).into_dyn()),
        )
        .unwrap();
    let dir = TempDir::new("digest-flip");
    writer.write(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    read_all(dir.path()).unwrap();
    let header = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&good[8..8 + header]).unwrap();
    assert!(text.contains(vlmq::pack::TENSOR_DIGESTS_KEY), "{text}");
    let data = 8 + header..good.len();
    assert!(data.len() > 500);
    let mut refused = 0;
    for (k, at) in data.clone().enumerate() {
        let mut bytes = good.clone();
        // Flip patterns vary with the position: one low bit, one high bit, all bits.
        bytes[at] ^= [0x01, 0x80, 0xff][k % 3];
        std::fs::write(&path, &bytes).unwrap();
        match read_all(dir.path()) {
            Err(Error::CorruptCheckpoint { reason, .. }) if reason.contains("digest") => {
                refused += 1
            }
            other => panic!("flip at byte {at}: {other:?}"),
        }
    }
    assert_eq!(refused, data.len());

    // Without digests the same file format loads, and a flip in a code goes unseen.
    let mut writer = CheckpointWriter::new().with_tensor_digests(false);
    writer
        .add_layer("layer", weight(0.5).unwrap(), None)
        .unwrap();
    let dir = TempDir::new("digest-none");
    writer.write(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&bytes[8..8 + header]).unwrap();
    assert!(!text.contains(vlmq::pack::TENSOR_DIGESTS_KEY), "{text}");
    read_all(dir.path()).unwrap();

    // Digests are deterministic: two writes give the same bytes.
    let again = TempDir::new("digest-again");
    let mut writer = CheckpointWriter::new();
    writer
        .add_layer("layer", weight(0.5).unwrap(), None)
        .unwrap();
    writer.write(again.path()).unwrap();
    let mut writer = CheckpointWriter::new();
    writer
        .add_layer("layer", weight(0.5).unwrap(), None)
        .unwrap();
    let other = TempDir::new("digest-again2");
    writer.write(other.path()).unwrap();
    assert_eq!(
        std::fs::read(again.path().join("model.safetensors")).unwrap(),
        std::fs::read(other.path().join("model.safetensors")).unwrap()
    );
}

/// `with_config_extras` adds model-specific keys to both config files, and
/// refuses at write time, before anything is written, an extra that would
/// replace a key the writer sets: a previous checkpoint stays as it was,
/// and the error names `quantize_config.json` and the key.
#[test]
fn config_extras_are_written_and_may_not_replace_the_writers_keys() {
    let dir = TempDir::new("extras");
    let ckpt = dir.path().join("ckpt");
    let extras = |k: &str, v: serde_json::Value| {
        let mut m = serde_json::Map::new();
        m.insert(k.to_string(), v);
        m
    };
    let mut w = CheckpointWriter::new().with_config_extras(extras(
        "block_name_to_quantize",
        serde_json::json!("model.layers"),
    ));
    w.add_layer("l", weight(0.5).unwrap(), None).unwrap();
    w.write(&ckpt).unwrap();
    for file in ["quantize_config.json", "config.json"] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join(file)).unwrap()).unwrap();
        let qc = if file == "config.json" {
            &v["quantization_config"]
        } else {
            &v
        };
        assert_eq!(qc["block_name_to_quantize"], "model.layers", "{file}");
        assert_eq!(qc["bits"], 4, "{file}");
    }
    let before = std::fs::read(ckpt.join("config.json")).unwrap();
    for key in [
        "bits",
        "group_size",
        "sym",
        "desc_act",
        "checkpoint_format",
        "meta",
    ] {
        let mut w = CheckpointWriter::new().with_config_extras(extras(key, 1.into()));
        w.add_layer("l", weight(0.25).unwrap(), None).unwrap();
        let e = w.write(&ckpt).unwrap_err();
        match &e {
            Error::InvalidField { path, field, .. } => {
                assert!(path.ends_with("ckpt/quantize_config.json"), "{e}");
                assert_eq!(field, key);
            }
            other => panic!("{key}: {other:?}"),
        }
        assert_eq!(std::fs::read(ckpt.join("config.json")).unwrap(), before);
        // A new directory is not created either.
        let fresh = dir.path().join(format!("new-{key}"));
        assert!(w.write(&fresh).is_err() && !fresh.exists(), "{key}");
    }
    assert_eq!(Checkpoint::open(&ckpt).unwrap().names(), ["l"]);
}
