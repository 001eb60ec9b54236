//! Fuzz-style tests: truncated, corrupted or inconsistent checkpoints must give
//! a typed error (never a panic, never a wrong answer).

mod pack_common;

use std::path::Path;

use half::f16;
use pack_common::{copy_dir, fixtures, TempDir};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use vlmq::pack::{Checkpoint, CheckpointWriter};
use vlmq::{Error, QuantizedWeight};

const LAYER: &str = "model.layers.0.mlp.down_proj";

/// A private copy of a golden checkpoint.
fn golden_copy(bits: u32, version: u32) -> TempDir {
    let dir = TempDir::new("corrupt");
    copy_dir(
        &fixtures().join(format!("{bits}bit/checkpoint_v{version}")),
        dir.path(),
    );
    dir
}

fn original(bits: u32, version: u32) -> QuantizedWeight {
    let dir = fixtures().join(format!("{bits}bit/checkpoint_v{version}"));
    Checkpoint::open(dir).unwrap().layer(LAYER).unwrap()
}

/// Opens `dir` and decodes the layer; any error along the way counts.
fn load(dir: &Path) -> Result<QuantizedWeight, Error> {
    Checkpoint::open(dir)?.layer(LAYER)
}

fn assert_err(dir: &Path, what: &str) -> Error {
    match load(dir) {
        Ok(_) => panic!("{what}: expected an error, the checkpoint loaded"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn tensors(dir: &Path) -> Tensors {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect()
}

fn save(dir: &Path, t: &Tensors) {
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

/// Applies `edit` to the tensors of a fresh 4-bit v2 copy and expects an error.
fn edited(what: &str, edit: impl FnOnce(&mut Tensors)) -> Error {
    let dir = golden_copy(4, 2);
    let mut t = tensors(dir.path());
    edit(&mut t);
    save(dir.path(), &t);
    assert_err(dir.path(), what)
}

fn get<'a>(t: &'a mut Tensors, suffix: &str) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
    let name = format!("{LAYER}.{suffix}");
    t.iter_mut().find(|x| x.0 == name).unwrap()
}

#[test]
fn truncation_at_any_offset_is_an_error() {
    for (bits, version) in [(4, 1), (3, 2)] {
        let dir = golden_copy(bits, version);
        let path = dir.path().join("model.safetensors");
        let full = std::fs::read(&path).unwrap();
        let header = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize + 8;
        let offsets = (0..header + 64)
            .chain((header..full.len()).step_by(61))
            .chain([full.len() - 1]);
        for cut in offsets.filter(|&c| c < full.len()) {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert_err(
                dir.path(),
                &format!("{bits}-bit v{version} truncated at {cut}"),
            );
        }
        // Trailing garbage is rejected as well.
        let mut longer = full.clone();
        longer.extend_from_slice(&[0; 4]);
        std::fs::write(&path, &longer).unwrap();
        assert_err(dir.path(), "trailing bytes");
    }
}

#[test]
fn header_byte_flips_error_or_leave_the_layer_intact() {
    let want = original(4, 1);
    let dir = golden_copy(4, 1);
    let path = dir.path().join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize + 8;
    let (mut errors, mut intact) = (0, 0);
    for pos in 0..header {
        for mask in [0x01u8, 0x20, 0xff] {
            let mut bytes = full.clone();
            bytes[pos] ^= mask;
            std::fs::write(&path, &bytes).unwrap();
            // A flip may hit something harmless (the metadata, a bias name): then the
            // layer must still decode to exactly the original weight.
            match load(dir.path()) {
                Err(_) => errors += 1,
                Ok(w) => {
                    assert_eq!(w, want, "flip {mask:#x} at {pos} changed the decoded layer");
                    intact += 1;
                }
            }
        }
    }
    assert!(
        errors > 10 * intact,
        "{errors} errors, {intact} harmless flips"
    );
}

#[test]
fn short_and_bogus_files() {
    let dir = golden_copy(4, 2);
    let path = dir.path().join("model.safetensors");
    for bytes in [
        vec![],
        vec![1, 2, 3],
        u64::MAX.to_le_bytes().to_vec(),
        [&16u64.to_le_bytes()[..], b"{\"a\":1}         "].concat(),
        [&2u64.to_le_bytes()[..], b"{}"].concat(),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        assert_err(dir.path(), &format!("bogus file {bytes:?}"));
    }
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        assert_err(dir.path(), "missing file"),
        Error::Io { .. }
    ));
}

#[test]
fn wrong_dtypes() {
    for (suffix, dtype) in [
        ("qweight", Dtype::F32),
        ("qweight", Dtype::U32),
        ("qzeros", Dtype::F32),
        ("g_idx", Dtype::U32),
        ("g_idx", Dtype::F32),
    ] {
        let e = edited(&format!("{suffix} as {dtype:?}"), |t| {
            get(t, suffix).1 = dtype
        });
        assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
    }
    // Same byte size, different width: F16 scales stored as BF16 or I16, f16 bias as U16.
    for (suffix, dtype) in [
        ("scales", Dtype::BF16),
        ("scales", Dtype::I16),
        ("bias", Dtype::U16),
    ] {
        let e = edited(&format!("{suffix} as {dtype:?}"), |t| {
            get(t, suffix).1 = dtype
        });
        assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
    }
    // F32 scales: twice the bytes, still the wrong dtype.
    edited("scales as F32", |t| {
        let s = get(t, "scales");
        s.1 = Dtype::F32;
        s.3 =
            s.3.chunks_exact(2)
                .flat_map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                .collect();
    });
}

/// Reshapes a tensor to `shape`, padding or cutting its bytes to fit.
fn reshape(t: &mut Tensors, suffix: &str, shape: Vec<usize>) {
    let x = get(t, suffix);
    let width = match x.1 {
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 4,
    };
    x.3.resize(shape.iter().product::<usize>() * width, 0);
    x.2 = shape;
}

#[test]
fn mismatched_shapes() {
    let cases: Vec<(&str, Vec<usize>)> = vec![
        ("qweight", vec![63, 256]),
        ("qweight", vec![64, 255]),
        ("qweight", vec![64 * 256]),
        ("qweight", vec![1, 64, 256]),
        ("qzeros", vec![7, 32]),
        ("qzeros", vec![8, 31]),
        ("qzeros", vec![8, 32, 1]),
        ("scales", vec![8, 255]),
        ("scales", vec![9, 256]),
        ("g_idx", vec![511]),
        ("g_idx", vec![512, 1]),
        ("bias", vec![255]),
    ];
    for (suffix, shape) in cases {
        let what = format!("{suffix} reshaped to {shape:?}");
        edited(&what, |t| reshape(t, suffix, shape.clone()));
    }
    // Zero-sized layer.
    edited("empty qweight", |t| {
        reshape(t, "qweight", vec![0, 256]);
    });
    // 3 bits: qweight rows must be a multiple of 3 words per 32 inputs.
    let dir = golden_copy(3, 2);
    let mut t = tensors(dir.path());
    reshape(&mut t, "qweight", vec![47, 256]);
    save(dir.path(), &t);
    assert_err(dir.path(), "3-bit qweight with 47 rows");
}

#[test]
fn missing_and_orphan_tensors() {
    for suffix in ["qzeros", "scales", "g_idx"] {
        let e = edited(&format!("without {suffix}"), |t| {
            t.retain(|x| x.0 != format!("{LAYER}.{suffix}"))
        });
        assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    }
    edited("orphan qzeros", |t| {
        let mut extra = get(t, "qzeros").clone();
        extra.0 = "other.qzeros".into();
        t.push(extra);
    });
}

#[test]
fn bad_contents() {
    let set_i32 = |t: &mut Tensors, suffix: &str, idx: usize, v: i32| {
        get(t, suffix).3[4 * idx..4 * idx + 4].copy_from_slice(&v.to_le_bytes());
    };
    edited("g_idx = groups", |t| set_i32(t, "g_idx", 5, 8));
    edited("g_idx = -1", |t| set_i32(t, "g_idx", 0, -1));
    edited("g_idx huge", |t| set_i32(t, "g_idx", 511, i32::MAX));
    for bad in [f16::NAN, f16::INFINITY, f16::NEG_INFINITY] {
        edited(&format!("scale {bad}"), |t| {
            get(t, "scales").3[10..12].copy_from_slice(&bad.to_le_bytes());
        });
    }
}

fn with_config(bits: u32, version: u32, edit: impl FnOnce(&mut Value)) -> TempDir {
    let dir = golden_copy(bits, version);
    let p = dir.path().join("quantize_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    dir
}

#[test]
fn inconsistent_config_json() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("bits 5", Box::new(|v| v["bits"] = json!(5))),
        ("bits 3 on a 4-bit file", Box::new(|v| v["bits"] = json!(3))),
        ("bits 8 on a 4-bit file", Box::new(|v| v["bits"] = json!(8))),
        ("bits 2 on a 4-bit file", Box::new(|v| v["bits"] = json!(2))),
        ("bits as string", Box::new(|v| v["bits"] = json!("4"))),
        ("bits negative", Box::new(|v| v["bits"] = json!(-4))),
        ("bits huge", Box::new(|v| v["bits"] = json!(1u64 << 40))),
        (
            "no bits",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("bits"))),
        ),
        ("group size 0", Box::new(|v| v["group_size"] = json!(0))),
        ("group size -2", Box::new(|v| v["group_size"] = json!(-2))),
        ("group size 32", Box::new(|v| v["group_size"] = json!(32))),
        ("group size 128", Box::new(|v| v["group_size"] = json!(128))),
        ("per channel", Box::new(|v| v["group_size"] = json!(-1))),
        (
            "group size float",
            Box::new(|v| v["group_size"] = json!(64.5)),
        ),
        (
            "quant_method awq",
            Box::new(|v| v["quant_method"] = json!("awq")),
        ),
        (
            "no quant_method",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("quant_method"))),
        ),
        (
            "format v3",
            Box::new(|v| v["checkpoint_format"] = json!("gptq_v3")),
        ),
        (
            "format disagreement",
            Box::new(|v| v["format"] = json!("gptq")),
        ),
        (
            "sym true on asymmetric zeros",
            Box::new(|v| v["sym"] = json!(true)),
        ),
        (
            "desc_act false with act-order g_idx",
            Box::new(|v| v["desc_act"] = json!(false)),
        ),
        (
            "desc_act string",
            Box::new(|v| v["desc_act"] = json!("true")),
        ),
        (
            "pack_dtype int16",
            Box::new(|v| v["pack_dtype"] = json!("int16")),
        ),
        (
            "static_groups number",
            Box::new(|v| v["static_groups"] = json!(1)),
        ),
        ("not an object", Box::new(|v| *v = json!([1, 2]))),
    ];
    for (what, edit) in cases {
        let dir = with_config(4, 2, edit);
        assert_err(dir.path(), what);
    }
    // Truncated JSON.
    let dir = golden_copy(4, 2);
    let p = dir.path().join("quantize_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    for cut in (0..text.len()).step_by(37) {
        std::fs::write(&p, &text[..cut]).unwrap();
        assert!(matches!(
            assert_err(dir.path(), "truncated json"),
            Error::Json { .. }
        ));
    }
}

#[test]
fn config_json_must_agree_with_quantize_config() {
    let dir = golden_copy(4, 2);
    let qc: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("quantize_config.json")).unwrap(),
    )
    .unwrap();
    let mut other = qc.clone();
    other["checkpoint_format"] = json!("gptq");
    other["format"] = json!("gptq");
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        json!({"model_type": "x", "quantization_config": other}).to_string(),
    )
    .unwrap();
    assert!(matches!(
        assert_err(dir.path(), "disagreeing config.json"),
        Error::Json { .. }
    ));
    std::fs::write(&cfg, "[]").unwrap();
    assert_err(dir.path(), "config.json not an object");
    // Agreeing config.json alone is enough.
    std::fs::write(&cfg, json!({"quantization_config": qc}).to_string()).unwrap();
    std::fs::remove_file(dir.path().join("quantize_config.json")).unwrap();
    assert_eq!(load(dir.path()).unwrap(), original(4, 2));
    std::fs::remove_file(&cfg).unwrap();
    assert!(matches!(
        assert_err(dir.path(), "no config at all"),
        Error::Json { .. }
    ));
}

#[test]
fn failed_write_leaves_no_partial_file() {
    // The writer replaces the whole directory (failure injection at every
    // step: src/pack/write_atomic_tests.rs). Here the target is a regular
    // file: the write fails, the file is untouched, nothing is left beside it.
    let w = original(4, 2);
    let dir = TempDir::new("atomic");
    let target = dir.path().join("ckpt");
    std::fs::write(&target, b"not a directory").unwrap();
    let mut writer = CheckpointWriter::new();
    writer.add_layer(LAYER, w, None).unwrap();
    assert!(writer.write(&target).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"not a directory");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "ckpt")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn writer_rejects_inconsistent_layers() {
    let w4 = original(4, 2);
    let w3 = original(3, 2);
    let mut writer = CheckpointWriter::new();
    writer.add_layer("a", w4.clone(), None).unwrap();
    writer.add_layer("b", w3, None).unwrap();
    assert!(matches!(
        writer.write(TempDir::new("mixed").path()),
        Err(Error::Unencodable { .. })
    ));
    let mut writer = CheckpointWriter::new();
    writer.add_layer("a", w4.clone(), None).unwrap();
    assert!(
        writer.add_layer("a", w4.clone(), None).is_err(),
        "duplicate layer name"
    );
    assert!(writer
        .add_tensor(
            "a.qweight",
            vlmq::pack::DenseTensor::F32(ndarray::ArrayD::zeros(vec![1]))
        )
        .is_err());
    let bad_bias = vlmq::pack::DenseTensor::F32(ndarray::ArrayD::zeros(vec![3]));
    assert!(matches!(
        writer.add_layer("c", w4, Some(bad_bias)),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        CheckpointWriter::new().write(TempDir::new("empty").path()),
        Err(Error::Empty { .. })
    ));
}
