//! The streamed safetensors file against the in-memory serialization of
//! [`CheckpointWriter::write`], and its all-or-nothing write.

use std::path::PathBuf;

use half::{bf16, f16};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use serde_json::json;

use crate::config::Bits;
use crate::quant::QuantizedWeight;

use super::{CheckpointWriter, DenseTensor};

fn fresh(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vlmq-stream-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Two quantized layers (one with a bias) and dense tensors of every dtype,
/// one of them longer than a streamed piece (64 Ki values), so the pieces'
/// seams are inside the file.
fn writer(digests: bool) -> CheckpointWriter {
    let layer = |seed: usize| {
        QuantizedWeight::new(
            Bits::new(4).unwrap(),
            false,
            Array2::from_shape_fn((32, 64), |(o, i)| ((o * 5 + i * 3 + seed) % 16) as u8),
            Array2::from_shape_fn((2, 32), |(g, o)| 0.25 * (1 + g + o % 3) as f32),
            Array2::from_shape_fn((2, 32), |(g, o)| ((g + o + seed) % 16) as u8),
            (0..64).map(|i| i / 32).collect(),
        )
        .unwrap()
    };
    let mut w = CheckpointWriter::new()
        .with_model_config(json!({"model_type": "toy"}))
        .with_tensor_digests(digests);
    let bias = Array1::from_shape_fn(32, |o| o as f32 * 0.5 - 3.0).into_dyn();
    w.add_layer("b.q", layer(1), Some(DenseTensor::F32(bias)))
        .unwrap();
    w.add_layer("a.k", layer(2), None).unwrap();
    let long = ArrayD::from_shape_fn(IxDyn(&[70_001]), |i| (i[0] as f32).sin());
    w.add_tensor("embed", DenseTensor::F32(long)).unwrap();
    let h = ArrayD::from_shape_fn(IxDyn(&[3, 5]), |i| f16::from_f32((i[0] * 5 + i[1]) as f32));
    w.add_tensor("norm.h", DenseTensor::F16(h)).unwrap();
    let b = ArrayD::from_shape_fn(IxDyn(&[66_000]), |i| bf16::from_f32(i[0] as f32 / 7.0));
    w.add_tensor("head", DenseTensor::BF16(b)).unwrap();
    w
}

#[test]
fn the_streamed_file_has_the_bytes_of_the_in_memory_one() {
    for digests in [true, false] {
        let root = fresh(&format!("same-{digests}"));
        let w = writer(digests);
        w.write(root.join("whole")).unwrap();
        let shard = root.join("model-00001-of-00002.safetensors");
        let config = w.write_safetensors(&shard).unwrap();
        let want = std::fs::read(root.join("whole/model.safetensors")).unwrap();
        let got = std::fs::read(&shard).unwrap();
        assert!(want == got, "digests {digests}: the files differ");
        assert_eq!(config, w.quantize_config().unwrap());
        let configs = root.join("configs");
        std::fs::create_dir_all(&configs).unwrap();
        w.write_configs(&configs).unwrap();
        for f in ["config.json", "quantize_config.json"] {
            assert_eq!(
                std::fs::read(configs.join(f)).unwrap(),
                std::fs::read(root.join("whole").join(f)).unwrap(),
                "{f}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}

#[test]
fn a_full_disk_leaves_no_file_and_no_temporary() {
    let root = fresh("full");
    let shard = root.join("shard.safetensors");
    let w = writer(true);
    for free in [0, 1000, 200_000] {
        crate::fsutil::simulate_free_space(Some(free));
        let err = w.write_safetensors(&shard).unwrap_err();
        crate::fsutil::simulate_free_space(None);
        match err {
            crate::Error::Io { path, source } => {
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
                assert_eq!(path, shard, "the error names the file");
            }
            other => panic!("free {free}: {other}"),
        }
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "free {free}: something was left"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// The dense tensors of [`writer`] as little-endian bytes in one file after
/// a 13-byte prefix, and the same writer with them added as
/// [`FileTensor`](super::FileTensor)s pointing into that file.
fn file_backed(digests: bool, root: &std::path::Path) -> (CheckpointWriter, PathBuf) {
    let dense = writer(digests);
    let source = root.join("source.bin");
    let mut bytes = vec![7u8; 13];
    let mut w = CheckpointWriter::new()
        .with_model_config(json!({"model_type": "toy"}))
        .with_tensor_digests(digests);
    for (name, q, bias) in &dense.layers {
        w.add_layer(name, q.clone(), bias.clone()).unwrap();
    }
    let mut at = Vec::new();
    for (name, t) in &dense.tensors {
        at.push((
            name.clone(),
            bytes.len() as u64,
            t.dtype_name(),
            t.shape().to_vec(),
        ));
        bytes.extend(t.to_le_bytes());
    }
    std::fs::write(&source, &bytes).unwrap();
    for (name, start, dtype, shape) in at {
        let t = super::FileTensor::new(&source, start, dtype, &shape).unwrap();
        w.add_file_tensor(&name, t).unwrap();
    }
    (w, source)
}

/// Tensors copied from a file (the 70,001-value f32 one crosses a 1 MiB
/// piece) give the bytes of the same tensors held in memory, streamed or
/// written whole.
#[test]
fn file_tensors_are_copied_bit_for_bit() {
    for digests in [true, false] {
        let root = fresh(&format!("file-{digests}"));
        let (w, _) = file_backed(digests, &root);
        let dense = writer(digests);
        dense.write(root.join("want")).unwrap();
        w.write(root.join("got")).unwrap();
        let want = std::fs::read(root.join("want/model.safetensors")).unwrap();
        assert!(want == std::fs::read(root.join("got/model.safetensors")).unwrap());
        let shard = root.join("shard.safetensors");
        w.write_safetensors(&shard).unwrap();
        assert!(want == std::fs::read(&shard).unwrap(), "digests {digests}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// A source file that is too short is refused when the tensor is added,
/// and one cut short afterwards fails the write naming it, leaving nothing.
#[test]
fn a_short_source_file_is_an_error_naming_it() {
    let root = fresh("file-short");
    let (w, source) = file_backed(true, &root);
    let len = std::fs::metadata(&source).unwrap().len();
    let err = super::FileTensor::new(&source, len - 3, "F32", &[1]).unwrap_err();
    assert!(
        matches!(&err, crate::Error::Safetensors { path, .. } if path == &source),
        "{err}"
    );
    assert!(super::FileTensor::new(&source, 0, "I8", &[1]).is_err());
    std::fs::write(&source, vec![0u8; 20]).unwrap();
    let shard = root.join("out").join("shard.safetensors");
    std::fs::create_dir_all(shard.parent().unwrap()).unwrap();
    let err = w.write_safetensors(&shard).unwrap_err();
    assert!(
        matches!(&err, crate::Error::Io { path, .. } if path == &source),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(shard.parent().unwrap()).unwrap().count(),
        0
    );
    std::fs::remove_dir_all(&root).unwrap();
}
