//! Property tests: packing round-trips, checkpoint write -> read, and the
//! packed matmul against the dense matmul of the dequantized weight.

mod pack_common;

use half::f16;
use ndarray::{Array1, Array2};
use pack_common::TempDir;
use proptest::prelude::*;
use vlmq::__private::{
    pack_qweight, pack_qzeros, pack_stream, qzeros_v1_to_v2, qzeros_v2_to_v1, unpack_qweight,
    unpack_qzeros, unpack_stream,
};
use vlmq::pack::{Checkpoint, CheckpointFormat, CheckpointWriter, DenseTensor, PackedLinear};
use vlmq::{quantize_rtn, Bits, GroupSize, QuantScheme, QuantizedWeight};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

/// A random quantized weight: `out` and `in` multiples of 32 (so every width packs into
/// whole words), any group size dividing `in`, optional act-order shuffling of `g_idx`.
fn weight_strategy(widths: Vec<u32>) -> impl Strategy<Value = QuantizedWeight> {
    (
        prop::sample::select(widths),
        1usize..=3,
        1usize..=4,
        prop::sample::select(vec![0usize, 8, 16, 32]),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(b, out32, in32, gs, sym, act, seed)| {
            let bits = Bits::new(b).unwrap();
            let (out, inp) = (32 * out32, 32 * in32);
            let g = if gs == 0 { inp } else { gs };
            let groups = inp / g;
            let mut rng = seed;
            let mut next = move || {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 33) as u32
            };
            let maxq = bits.max_code();
            let codes = Array2::from_shape_simple_fn((out, inp), || (next() % (maxq + 1)) as u8);
            let zeros = Array2::from_shape_simple_fn((groups, out), || {
                if sym {
                    (maxq as u8).div_ceil(2)
                } else {
                    (next() % (maxq + 1)) as u8
                }
            });
            // f16-representable scales, as the solver produces.
            let scales = Array2::from_shape_simple_fn((groups, out), || {
                f16::from_f32((next() % 1000 + 1) as f32 * 1e-4).to_f32()
            });
            let mut g_idx: Vec<u32> = (0..inp).map(|i| (i / g) as u32).collect();
            if act {
                for i in (1..inp).rev() {
                    g_idx.swap(i, next() as usize % (i + 1));
                }
            }
            QuantizedWeight::new(bits, sym, codes, scales, zeros, g_idx).unwrap()
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stream_round_trips(b in 2u32..=8, words in 1usize..=6, seed in any::<u64>()) {
        let bits = Bits::new(b).unwrap();
        let n = 32 * words;
        let mask = bits.max_code() as u64;
        let vals: Vec<u8> = (0..n as u64).map(|k| ((seed.rotate_left(k as u32 % 64) ^ k.wrapping_mul(0x9E37)) & mask) as u8).collect();
        let packed = pack_stream(&vals, bits).unwrap();
        prop_assert_eq!(packed.len(), n * b as usize / 32);
        prop_assert_eq!(unpack_stream(&packed, bits).unwrap(), vals);
    }

    #[test]
    fn qweight_and_qzeros_round_trip(w in weight_strategy(vec![2, 3, 4, 5, 6, 7, 8])) {
        let bits = w.bits();
        let q = pack_qweight(w.codes(), bits).unwrap();
        prop_assert_eq!(q.dim(), (w.in_features() * bits.get() as usize / 32, w.out_features()));
        prop_assert_eq!(unpack_qweight(q.view(), bits).unwrap(), w.codes().to_owned());
        let z = pack_qzeros(w.zeros(), bits).unwrap();
        prop_assert_eq!(unpack_qzeros(z.view(), bits).unwrap(), w.zeros().to_owned());
        if matches!(bits.get(), 2 | 3 | 4 | 8) {
            let mut v1 = z.clone();
            qzeros_v2_to_v1(&mut v1, bits).unwrap();
            qzeros_v1_to_v2(&mut v1, bits).unwrap();
            prop_assert_eq!(v1, z);
        }
    }

    #[test]
    fn checkpoint_round_trips(w in weight_strategy(vec![2, 3, 4, 8]), v1 in any::<bool>()) {
        let dir = TempDir::new("roundtrip");
        let bias = Array1::from_shape_fn(w.out_features(), |o| o as f32 * 0.25 - 1.0);
        let mut writer = CheckpointWriter::new();
        if v1 {
            // Asymmetric v1 must be asked for; zero points of 0 then round-trip
            // through the word-wise (2/4/8 bits) or field-wise (3 bits) offset.
            writer = writer.with_format(CheckpointFormat::V1).with_asymmetric_v1(true);
        }
        writer.add_layer("blk.proj", w.clone(), Some(DenseTensor::F32(bias.clone().into_dyn()))).unwrap();
        writer.add_tensor("embed", DenseTensor::BF16(Array2::from_shape_fn((3, 5), |(a, b)| half::bf16::from_f32((a * 5 + b) as f32)).into_dyn())).unwrap();
        let cfg = writer.write(dir.path()).unwrap();
        prop_assert_eq!(cfg.sym, w.symmetric());
        let ck = Checkpoint::open(dir.path()).unwrap();
        prop_assert_eq!(ck.config(), &cfg);
        let back = ck.layer("blk.proj").unwrap();
        prop_assert_eq!(&back, &w);
        // Bit-exact dequantization.
        let (a, b) = (back.dequantize(), w.dequantize());
        prop_assert!(a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()));
        prop_assert_eq!(ck.bias("blk.proj").unwrap().unwrap().to_f32(), bias.into_dyn());
        prop_assert_eq!(ck.tensor_names(), vec!["embed"]);
        let is_bf16 = matches!(ck.tensor("embed").unwrap(), DenseTensor::BF16(_));
        prop_assert!(is_bf16, "embed keeps its dtype");
    }

    #[test]
    fn solver_output_round_trips(b in prop::sample::select(vec![2u32, 3, 4, 8]), g in prop::sample::select(vec![32usize, 64]), sym in any::<bool>(), seed in 0u32..1000) {
        let w = Array2::from_shape_fn((64, 128), |(o, i)| (((o * 131 + i * 71 + seed as usize * 7) % 97) as f32 / 48.0 - 1.0) * 0.1);
        let scheme = QuantScheme::new(Bits::new(b).unwrap()).with_group_size(GroupSize::new(g).unwrap()).with_symmetric(sym);
        let q = quantize_rtn(w.view(), &scheme).unwrap();
        let dir = TempDir::new("rtn");
        let mut writer = CheckpointWriter::new();
        writer.add_layer("l", q.clone(), None).unwrap();
        writer.write(dir.path()).unwrap();
        let back = Checkpoint::open(dir.path()).unwrap().layer("l").unwrap();
        prop_assert_eq!(back.dequantize(), q.dequantize());
    }

    #[test]
    fn packed_matmul_matches_dense(w in weight_strategy(vec![2, 3, 4, 5, 6, 7, 8]), tokens in 1usize..=4, seed in any::<u32>()) {
        let bias = Array1::from_shape_fn(w.out_features(), |o| (o % 7) as f32 - 3.0);
        let lin = PackedLinear::new(&w, Some(bias.clone())).unwrap();
        prop_assert_eq!(lin.to_quantized_weight().unwrap(), w.clone());
        let x = Array2::from_shape_fn((tokens, w.in_features()), |(t, i)| {
            (((i as u32).wrapping_mul(2654435761) ^ seed ^ (t as u32 * 97)) % 2001) as f32 / 1000.0 - 1.0
        });
        let dq = w.dequantize();
        let dense = x.dot(&dq.t()) + &bias;
        let y = lin.forward(x.view()).unwrap();
        for t in 0..tokens {
            let y1 = lin.gemv(x.row(t)).unwrap();
            for o in 0..w.out_features() {
                // Only the summation order differs (and the packed kernel factors the scale and
                // zero out of each group). Each rounding step errs by at most eps times the
                // running magnitude, which is bounded by sum |x| (|w| + |s z|) + |b|; n steps.
                let mag: f32 = x.row(t).iter().enumerate().map(|(i, xi)| {
                    let g = w.g_idx()[i] as usize;
                    let s = w.scales()[[g, o]];
                    xi.abs() * (s * f32::from(w.codes()[[o, i]]) + s * f32::from(w.zeros()[[g, o]]))
                }).sum::<f32>() + bias[o].abs();
                let tol = 2.0 * w.in_features() as f32 * f32::EPSILON * mag;
                prop_assert!((y[[t, o]] - dense[[t, o]]).abs() <= tol, "forward [{t},{o}] {} vs {}", y[[t, o]], dense[[t, o]]);
                prop_assert!((y1[o] - dense[[t, o]]).abs() <= tol, "gemv [{t},{o}] {} vs {}", y1[o], dense[[t, o]]);
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(32).unwrap());
    let w = Array2::from_shape_fn((256, 256), |(o, i)| {
        ((o * 37 + i * 11) % 101) as f32 / 50.0 - 1.0
    });
    let lin = PackedLinear::new(&quantize_rtn(w.view(), &scheme).unwrap(), None).unwrap();
    assert!(lin.uses_fast_kernel());
    let x = Array2::from_shape_fn((3, 256), |(t, i)| {
        ((t * 13 + i * 7) % 29) as f32 / 14.0 - 1.0
    });
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| (lin.gemv(x.row(0)).unwrap(), lin.forward(x.view()).unwrap()))
    };
    let (g1, f1) = run(1);
    for threads in [2, 3, 5] {
        let (g, f) = run(threads);
        assert!(g.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(f.iter().zip(&f1).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn odd_shapes_use_the_general_kernel() {
    // 37 inputs, groups of uneven size in scrambled order: nothing aligns to a block.
    let bits = Bits::new(4).unwrap();
    let g_idx: Vec<u32> = (0..37).map(|i| ((i * 7) % 3) as u32).collect();
    let codes = Array2::from_shape_fn((5, 37), |(o, i)| ((o + 3 * i) % 16) as u8);
    let scales = Array2::from_elem((3, 5), 0.125);
    let zeros = Array2::from_shape_fn((3, 5), |(g, o)| (g + o) as u8);
    let w = QuantizedWeight::new(bits, false, codes, scales, zeros, g_idx).unwrap();
    let lin = PackedLinear::new(&w, None).unwrap();
    assert!(!lin.uses_fast_kernel());
    let x = Array1::from_shape_fn(37, |i| i as f32 / 8.0);
    let y = lin.gemv(x.view()).unwrap();
    let dense = w.dequantize().dot(&x);
    // All values are multiples of 1/64 with small magnitudes: the sums are exact in f32.
    assert_eq!(y, dense);
    assert_eq!(lin.to_quantized_weight().unwrap(), w);
    assert!(lin.gemv(Array1::zeros(36).view()).is_err());
}

#[test]
fn ragged_groups_use_the_fast_kernel_where_aligned() {
    // 200 inputs in groups of 80 (80 + 80 + 40): at 2, 4 and 8 bits the block kernel takes the
    // whole blocks of every group that starts on a block, the general kernel the rest
    // (64, 64 + 32 and 80 + 80 + 32 inputs); results match the dense weight.
    for (b, fast) in [(2u32, 64usize), (4, 96), (8, 192)] {
        let bits = Bits::new(b).unwrap();
        let scheme = QuantScheme::new(bits).with_group_size(GroupSize::new(80).unwrap());
        let w = Array2::from_shape_fn((9, 200), |(o, i)| {
            ((o * 7 + i * 13) % 29) as f32 / 9.0 - 1.5
        });
        let q = quantize_rtn(w.view(), &scheme).unwrap();
        assert_eq!(q.groups(), 3);
        let lin = PackedLinear::new(&q, None).unwrap();
        assert_eq!(lin.fast_inputs(), fast, "{b} bits");
        assert!(!lin.uses_fast_kernel());
        assert_eq!(lin.to_quantized_weight().unwrap(), q);
        let x = Array1::from_shape_fn(200, |i| ((i * 5) % 11) as f32 / 4.0 - 1.0);
        let y = lin.gemv(x.view()).unwrap();
        let dense = q.dequantize();
        for o in 0..9 {
            let want: f32 = dense.row(o).iter().zip(&x).map(|(a, b)| a * b).sum();
            let mag: f32 = dense
                .row(o)
                .iter()
                .zip(&x)
                .map(|(a, b)| (a * b).abs())
                .sum();
            // Summation order only: bound by eps * n * sum |w x|.
            assert!(
                (y[o] - want).abs() <= 200.0 * f32::EPSILON * mag,
                "{b} bits row {o}"
            );
        }
    }
}
