//! Golden vectors for the GPTQ bit layout, and the checkpoints packed by the
//! Python ecosystem (GPTQModel 7.7.0) in `tests/fixtures/gptq-golden`.

mod pack_common;

use ndarray::{Array2, ArrayView2};
use pack_common::{fixtures, read_expected, Expected, TempDir};
use safetensors::Dtype;
use vlmq::__private::{pack_qzeros, pack_stream, qzeros_v2_to_v1, unpack_stream};
use vlmq::pack::{Checkpoint, CheckpointFormat, CheckpointWriter, DenseTensor, PackedLinear};
use vlmq::{Bits, Error, QuantizedWeight};

const LAYER: &str = "model.layers.0.mlp.down_proj";

fn bits(b: u32) -> Bits {
    Bits::new(b).unwrap()
}

#[test]
fn four_bit_codes_one_to_eight() {
    assert_eq!(
        pack_stream(&[1, 2, 3, 4, 5, 6, 7, 8], bits(4)).unwrap(),
        vec![0x8765_4321]
    );
    assert_eq!(
        unpack_stream(&[0x8765_4321], bits(4)).unwrap(),
        vec![1, 2, 3, 4, 5, 6, 7, 8]
    );
}

#[test]
fn two_bit_word() {
    // Codes 0,1,2,3 repeated: each byte is 0b11_10_01_00 = 0xE4 (value j at bits 2j..2j+2).
    let codes: Vec<u8> = (0..16).map(|k| (k % 4) as u8).collect();
    assert_eq!(pack_stream(&codes, bits(2)).unwrap(), vec![0xE4E4_E4E4]);
    // A lone 3 in the last slot lands in the top two bits.
    let mut last = vec![0u8; 16];
    last[15] = 3;
    assert_eq!(pack_stream(&last, bits(2)).unwrap(), vec![0xC000_0000]);
}

#[test]
fn eight_bit_word() {
    assert_eq!(
        pack_stream(&[0x12, 0x34, 0x56, 0x78], bits(8)).unwrap(),
        vec![0x7856_3412]
    );
}

#[test]
fn three_bit_words_straddle_at_values_10_and_21() {
    // Value 10 occupies stream bits 30..33: two bits at the top of word 0, one at the bottom of word 1.
    let mut v = vec![0u8; 32];
    v[10] = 7;
    assert_eq!(
        pack_stream(&v, bits(3)).unwrap(),
        vec![0xC000_0000, 0x1, 0x0]
    );
    // Value 21 occupies bits 63..66: one bit at the top of word 1, two at the bottom of word 2.
    let mut v = vec![0u8; 32];
    v[21] = 7;
    assert_eq!(
        pack_stream(&v, bits(3)).unwrap(),
        vec![0x0, 0x8000_0000, 0x3]
    );
    // Value 21 = 0b101: the low bit (1) tops word 1, the high bits (0b10) start word 2.
    v[21] = 5;
    assert_eq!(
        pack_stream(&v, bits(3)).unwrap(),
        vec![0x0, 0x8000_0000, 0x2]
    );
    // Value 0 = 5 and value 31 = 6 sit at the two ends of the three words.
    let mut v = vec![0u8; 32];
    v[0] = 5;
    v[31] = 6;
    assert_eq!(
        pack_stream(&v, bits(3)).unwrap(),
        vec![0x5, 0x0, 0xC000_0000]
    );
    // The worked example of the fixtures README (output 0, inputs 0-31 of the 3-bit layer).
    let codes = [
        3, 2, 6, 3, 2, 2, 5, 2, 4, 4, 2, 7, 3, 3, 3, 5, 3, 3, 4, 3, 1, 2, 5, 3, 2, 4, 3, 4, 4, 2,
        4, 2,
    ];
    let words = vec![0xa455_2793, 0x171b_adbe, 0x5148_e275];
    assert_eq!(pack_stream(&codes, bits(3)).unwrap(), words);
    assert_eq!(unpack_stream(&words, bits(3)).unwrap(), codes.to_vec());
}

#[test]
fn v1_word_wise_zero_offset_example() {
    // From the fixtures README: 4-bit, group 0, outputs 72-79.
    let zeros = Array2::from_shape_vec((1, 8), vec![8u8, 7, 9, 8, 6, 0, 9, 9]).unwrap();
    let mut q = pack_qzeros(zeros.view(), bits(4)).unwrap();
    assert_eq!(q[[0, 0]] as u32, 0x9906_8978);
    qzeros_v2_to_v1(&mut q, bits(4)).unwrap();
    assert_eq!(q[[0, 0]] as u32, 0x87f5_7867);
}

fn expected(b: u32) -> Expected {
    read_expected(&fixtures().join(format!("{b}bit")), LAYER)
}

fn checkpoint_dir(b: u32, version: u32) -> std::path::PathBuf {
    fixtures().join(format!("{b}bit/checkpoint_v{version}"))
}

fn assert_bit_exact(name: &str, got: ArrayView2<f32>, want: ArrayView2<f32>) {
    assert_eq!(got.dim(), want.dim(), "{name}: shape");
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{name}: weight {idx:?} is {g}, expected {w}"
        );
    }
}

#[test]
fn reader_reproduces_golden_layers_from_v1_and_v2() {
    for b in [2, 3, 4, 8] {
        let exp = expected(b);
        for version in [1, 2] {
            let ck = Checkpoint::open(checkpoint_dir(b, version)).unwrap();
            let tag = format!("{b}-bit v{version}");
            assert_eq!(ck.names(), vec![LAYER], "{tag}");
            let cfg = ck.config();
            assert_eq!(cfg.bits.get(), b);
            assert!(cfg.desc_act && !cfg.sym, "{tag}");
            let want_format = if version == 1 {
                CheckpointFormat::V1
            } else {
                CheckpointFormat::V2
            };
            assert_eq!(cfg.format, want_format, "{tag}");
            let layer = ck.layer(LAYER).unwrap();
            assert_eq!(layer.codes(), exp.codes.view(), "{tag}: codes");
            assert_eq!(layer.zeros(), exp.zeros.view(), "{tag}: zeros");
            assert!(
                layer.contiguous_group_size().is_none(),
                "{tag}: act-order g_idx expected"
            );
            assert_bit_exact(&tag, layer.dequantize().view(), exp.weight.view());
            let bias = ck.bias(LAYER).unwrap().expect("bias");
            assert!(matches!(bias, DenseTensor::F16(_)));
            let bias = bias.to_f32();
            assert_eq!(
                bias.as_slice().unwrap(),
                exp.bias.as_slice().unwrap(),
                "{tag}: bias"
            );
        }
    }
}

#[test]
fn v1_zero_borrow_is_undone_word_wise() {
    // Decoding v1 field by field would get some zeros wrong (the README counts 49/24/16);
    // the reader must agree with v2 everywhere, including those fields.
    for b in [2, 4, 8] {
        let v1 = Checkpoint::open(checkpoint_dir(b, 1))
            .unwrap()
            .layer(LAYER)
            .unwrap();
        let v2 = Checkpoint::open(checkpoint_dir(b, 2))
            .unwrap()
            .layer(LAYER)
            .unwrap();
        assert!(
            v2.zeros().iter().any(|&z| z == 0),
            "{b}-bit fixture should contain a zero point of 0"
        );
        assert_eq!(v1, v2);
    }
}

fn raw_bytes(ck: &Checkpoint, name: &str, dtype: Dtype) -> Vec<u8> {
    let r = ck.raw(name).unwrap();
    assert_eq!(r.dtype, dtype, "{name}");
    r.data.to_vec()
}

#[test]
fn writer_reproduces_golden_tensors_byte_for_byte() {
    for b in [2, 3, 4, 8] {
        let exp = expected(b);
        let golden = Checkpoint::open(checkpoint_dir(b, 2)).unwrap();
        let from_file = golden.layer(LAYER).unwrap();
        // Rebuild the weight from the expected codes and zeros; scales and g_idx come from the file.
        let w = QuantizedWeight::new(
            bits(b),
            false,
            exp.codes.clone(),
            from_file.scales().to_owned(),
            exp.zeros.clone(),
            from_file.g_idx().to_vec(),
        )
        .unwrap();
        let bias = golden.bias(LAYER).unwrap();
        let dir = TempDir::new("golden-write");
        // The whole file is compared below: without vlmq's tensor digests.
        let mut writer = CheckpointWriter::new().with_tensor_digests(false);
        writer.add_layer(LAYER, w.clone(), bias).unwrap();
        let cfg = writer.write(dir.path()).unwrap();
        assert_eq!(
            cfg.format,
            CheckpointFormat::V2,
            "asymmetric defaults to v2"
        );
        assert!(cfg.desc_act);
        let ours = Checkpoint::open(dir.path()).unwrap();
        for (suffix, dtype) in [
            ("qweight", Dtype::I32),
            ("qzeros", Dtype::I32),
            ("scales", Dtype::F16),
            ("g_idx", Dtype::I32),
            ("bias", Dtype::F16),
        ] {
            let name = format!("{LAYER}.{suffix}");
            assert_eq!(
                raw_bytes(&ours, &name, dtype),
                raw_bytes(&golden, &name, dtype),
                "{b}-bit {name}"
            );
        }
        // Asymmetric v1 is refused by default (the Python loaders refuse it from
        // writers other than GPTQModel), with an error that recommends v2.
        let mut v1 = CheckpointWriter::new().with_format(CheckpointFormat::V1);
        v1.add_layer(LAYER, w.clone(), None).unwrap();
        let dir1 = TempDir::new("golden-v1");
        let err = v1.write(dir1.path()).unwrap_err();
        assert!(
            matches!(err, Error::Unencodable { .. }) && err.to_string().contains("gptq_v2"),
            "{err}"
        );
        assert!(!dir1.path().join("model.safetensors").exists());
        // Asked for, v1 is written exactly as GPTQModel writes it, zero points of 0
        // included (word-wise borrow): the whole file equals the golden v1 file.
        let golden1 = checkpoint_dir(b, 1);
        let mut v1 = CheckpointWriter::new()
            .with_tensor_digests(false)
            .with_format(CheckpointFormat::V1)
            .with_asymmetric_v1(true);
        v1.add_layer(LAYER, w, golden.bias(LAYER).unwrap()).unwrap();
        v1.write(dir1.path()).unwrap();
        assert!(
            std::fs::read(dir1.path().join("model.safetensors")).unwrap()
                == std::fs::read(golden1.join("model.safetensors")).unwrap(),
            "{b}-bit v1 file differs from GPTQModel's"
        );
        assert!(
            std::fs::read(dir.path().join("model.safetensors")).unwrap()
                == std::fs::read(checkpoint_dir(b, 2).join("model.safetensors")).unwrap(),
            "{b}-bit v2 file differs from GPTQModel's"
        );
    }
}

#[test]
fn v1_encoding_matches_golden_qzeros() {
    // The v1 transform of the true zeros (word-wise for 2/4/8 bits, borrow included, and
    // field-wise for 3 bits) reproduces GPTQModel's v1 qzeros byte for byte.
    for b in [2, 3, 4, 8] {
        let golden = Checkpoint::open(checkpoint_dir(b, 1)).unwrap();
        let mut q = pack_qzeros(expected(b).zeros.view(), bits(b)).unwrap();
        qzeros_v2_to_v1(&mut q, bits(b)).unwrap();
        let ours: Vec<u8> = q.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            ours,
            raw_bytes(&golden, &format!("{LAYER}.qzeros"), Dtype::I32),
            "{b}-bit"
        );
    }
}

#[test]
fn v1_writer_round_trips_when_no_zero_is_zero() {
    // Raise every zero point of 0 to 1: the writer then accepts v1, stores the v1 transform
    // of those zeros, and the reader gives the same weight back.
    for b in [2, 3, 4, 8] {
        let golden = Checkpoint::open(checkpoint_dir(b, 1)).unwrap();
        let w = golden.layer(LAYER).unwrap();
        let zeros = w.zeros().mapv(|z| z.max(1));
        let w = QuantizedWeight::new(
            bits(b),
            false,
            w.codes().to_owned(),
            w.scales().to_owned(),
            zeros.clone(),
            w.g_idx().to_vec(),
        )
        .unwrap();
        let mut want = pack_qzeros(zeros.view(), bits(b)).unwrap();
        qzeros_v2_to_v1(&mut want, bits(b)).unwrap();
        let mut writer = CheckpointWriter::new()
            .with_format(CheckpointFormat::V1)
            .with_asymmetric_v1(true);
        writer.add_layer(LAYER, w.clone(), None).unwrap();
        let dir = TempDir::new("golden-v1-ok");
        assert_eq!(
            writer.write(dir.path()).unwrap().format,
            CheckpointFormat::V1
        );
        let ours = Checkpoint::open(dir.path()).unwrap();
        let got = raw_bytes(&ours, &format!("{LAYER}.qzeros"), Dtype::I32);
        let want: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(got, want, "{b}-bit");
        assert_eq!(
            raw_bytes(&ours, &format!("{LAYER}.qweight"), Dtype::I32),
            raw_bytes(&golden, &format!("{LAYER}.qweight"), Dtype::I32)
        );
        assert_eq!(ours.layer(LAYER).unwrap(), w);
    }
}

#[test]
fn packed_linear_on_golden_layers_matches_dense() {
    for b in [2, 3, 4, 8] {
        let exp = expected(b);
        let ck = Checkpoint::open(checkpoint_dir(b, 1)).unwrap();
        let lin = ck.packed_linear(LAYER).unwrap();
        let x = Array2::from_shape_fn((3, 512), |(t, i)| {
            ((t * 31 + i * 17) % 23) as f32 / 11.0 - 1.0
        });
        let y = lin.forward(x.view()).unwrap();
        let y1 = lin.gemv(x.row(0)).unwrap();
        let dense = x.dot(&exp.weight.t()) + &exp.bias;
        for t in 0..3 {
            for o in 0..256 {
                // Different summation order only: bound by eps * n * sum |x||w|.
                let mag: f32 = x
                    .row(t)
                    .iter()
                    .zip(exp.weight.row(o))
                    .map(|(a, w)| (a * w).abs())
                    .sum();
                let tol = 512.0 * f32::EPSILON * (mag + exp.bias[o].abs());
                assert!(
                    (y[[t, o]] - dense[[t, o]]).abs() <= tol,
                    "{b}-bit forward [{t}, {o}]"
                );
                if t == 0 {
                    assert!((y1[o] - dense[[0, o]]).abs() <= tol, "{b}-bit gemv [{o}]");
                }
            }
        }
        assert_eq!(lin.to_quantized_weight().unwrap(), ck.layer(LAYER).unwrap());
        let _ = PackedLinear::new(&ck.layer(LAYER).unwrap(), None).unwrap();
    }
}
