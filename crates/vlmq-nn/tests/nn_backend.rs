//! `vlmq_nn` as a quantization backend: thread-count invariance, what the
//! row sinks see, weight replacement, packed-kernel plug-in, the block-local
//! perturbed source, and typed errors for bad input.

use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use vlmq::{Error, Modality, QuantizableModel, Result};
use vlmq_nn::*;

type Rows = BTreeMap<String, Array2<f32>>;

/// Forward + backward of one block; returns output, input gradient, sink rows and parameter gradients.
fn run_block(
    block: &TransformerBlock,
    x: &Array2<f32>,
    g: &Array2<f32>,
) -> (Array2<f32>, Array2<f32>, Rows, Rows, Vec<Vec<f32>>) {
    let mut inputs = Rows::new();
    let mut sink_in = |n: &str, r: ArrayView2<'_, f32>| {
        inputs.insert(n.to_string(), r.to_owned());
    };
    let (y, cache) = block.forward(x.view(), None, Some(&mut sink_in)).unwrap();
    let mut outputs = Rows::new();
    let mut sink_out = |n: &str, r: ArrayView2<'_, f32>| {
        outputs.insert(n.to_string(), r.to_owned());
    };
    let mut grads = Grads::new();
    let dx = block
        .backward(&cache, g.view(), Some(&mut grads), "", Some(&mut sink_out))
        .unwrap();
    let pg = grads
        .iter()
        .map(|(_, v)| v.iter().copied().collect())
        .collect();
    (y, dx, inputs, outputs, pg)
}

#[test]
fn block_results_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(11);
    let mut cfg = BlockConfig::decoder(128, 4, 344);
    cfg.n_kv_heads = 2;
    let block = TransformerBlock::init(&mut rng, cfg).unwrap();
    let x = rng.normal_matrix(160, 128, 1.0);
    let g = rng.normal_matrix(160, 128, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| run_block(&block, &x, &g))
    };
    let one = run(1);
    let two = run(2);
    assert_eq!(one.0, two.0, "forward output");
    assert_eq!(one.1, two.1, "input gradient");
    assert_eq!(one.2, two.2, "linear inputs");
    assert_eq!(one.3, two.3, "linear output gradients");
    assert_eq!(one.4, two.4, "parameter gradients");
}

#[test]
fn sinks_see_every_linear_with_the_right_shapes() {
    let mut rng = Rng::new(12);
    let block = TransformerBlock::init(&mut rng, BlockConfig::decoder(16, 4, 24)).unwrap();
    let x = rng.normal_matrix(5, 16, 1.0);
    let g = rng.normal_matrix(5, 16, 1.0);
    let (_, _, inputs, outputs, _) = run_block(&block, &x, &g);
    for info in block.linear_groups().into_iter().flatten() {
        assert_eq!(
            inputs[&info.name].dim(),
            (5, info.in_features),
            "{}",
            info.name
        );
        assert_eq!(
            outputs[&info.name].dim(),
            (5, info.out_features),
            "{}",
            info.name
        );
    }
    let (normed, _) = block.norm1.forward(x.view()).unwrap();
    assert_eq!(inputs["attn.q"], normed);
    assert_eq!(
        outputs["mlp.down"], g,
        "the MLP output gradient is the block output gradient"
    );
    let names: Vec<_> = block
        .linear_groups()
        .iter()
        .map(|grp| grp.iter().map(|i| i.name.clone()).collect::<Vec<_>>())
        .collect();
    assert_eq!(
        names,
        [
            vec!["attn.q", "attn.k", "attn.v"],
            vec!["attn.o"],
            vec!["mlp.gate", "mlp.up"],
            vec!["mlp.down"]
        ]
    );
}

/// A dense weight behind the kernel interface, as a packed linear would be.
struct DenseKernel(Array2<f32>);

impl LinearKernel for DenseKernel {
    fn in_features(&self) -> usize {
        self.0.ncols()
    }
    fn out_features(&self) -> usize {
        self.0.nrows()
    }
    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        Ok(vlmq::__private::matmul(x, self.0.t()))
    }
    fn dense_weight(&self) -> Result<Array2<f32>> {
        Ok(self.0.clone())
    }
}

#[test]
fn kernels_and_weight_replacement() {
    let mut rng = Rng::new(13);
    let mut model = SequenceModel::decoder(&mut rng, 9, 2, BlockConfig::decoder(8, 2, 12)).unwrap();
    let sample = Sample::text(vec![1, 2, 3, 4]).with_targets(vec![(3, 5)]);
    let reference = model.logits(&sample).unwrap();
    let w = model.linear_weight(1, "mlp.down").unwrap();
    if let Block::Transformer(b) = &mut model.blocks[1] {
        b.set_linear_kernel("mlp.down", Arc::new(DenseKernel(w.clone())))
            .unwrap();
        let err = b
            .set_linear_kernel("attn.q", Arc::new(DenseKernel(Array2::zeros((3, 8)))))
            .unwrap_err();
        assert!(
            matches!(&err, Error::ShapeMismatch { what, .. } if what.contains("attn.q")),
            "{err}"
        );
    }
    assert_eq!(model.logits(&sample).unwrap(), reference);
    assert_eq!(model.linear_weight(1, "mlp.down").unwrap(), w);

    let zeros = Array2::<f32>::zeros(w.dim());
    model
        .set_linear_weight(1, "mlp.down", zeros.view())
        .unwrap();
    assert_eq!(model.linear_weight(1, "mlp.down").unwrap(), zeros);
    assert_ne!(model.logits(&sample).unwrap(), reference);

    let err = model
        .set_linear_weight(0, "attn.o", Array2::<f32>::zeros((8, 7)).view())
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { what, expected, .. } if what.contains("blocks.0.attn.o") && expected == &vec![8, 8]),
        "{err}"
    );
    let err = model
        .set_linear_weight(0, "attn.x", zeros.view())
        .unwrap_err();
    assert!(
        matches!(&err, Error::Backend { block: 0, layer: Some(l), .. } if l == "attn.x"),
        "{err}"
    );
    let err = model.linear_weight(7, "attn.q").unwrap_err();
    assert!(matches!(err, Error::Backend { block: 7, .. }), "{err}");
}

#[test]
fn perturbed_source_is_zero_without_perturbation() {
    let mut rng = Rng::new(14);
    let block = TransformerBlock::init(&mut rng, BlockConfig::decoder(8, 2, 12)).unwrap();
    let x = rng.normal_matrix(6, 8, 1.0);
    let mut rows = Rows::new();
    let mut sink = |n: &str, r: ArrayView2<'_, f32>| {
        rows.insert(n.to_string(), r.to_owned());
    };
    let loss = block
        .perturbed_output_grads(x.view(), None, &|_, w| w.to_owned(), &mut sink)
        .unwrap();
    assert_eq!(loss, 0.0);
    assert!(rows.values().all(|r| r.iter().all(|&v| v == 0.0)));
    assert_eq!(rows.len(), 7);

    let rtn = |_: &str, w: ArrayView2<'_, f32>| w.mapv(|v| (v * 4.0).round() / 4.0);
    let mut rows = Rows::new();
    let mut sink = |n: &str, r: ArrayView2<'_, f32>| {
        rows.insert(n.to_string(), r.to_owned());
    };
    let loss = block
        .perturbed_output_grads(x.view(), None, &rtn, &mut sink)
        .unwrap();
    assert!(loss > 0.0);
    assert!(rows["mlp.down"].iter().any(|&v| v != 0.0));
}

#[test]
fn two_stage_token_info_and_bad_samples() {
    let mut rng = Rng::new(15);
    let vit = TransformerBlock::init(&mut rng, BlockConfig::encoder(6, 2, 10)).unwrap();
    let lm = TransformerBlock::init(&mut rng, BlockConfig::decoder(8, 2, 12)).unwrap();
    let proj = Projector {
        proj: Linear::init(&mut rng, 6, 8, true),
    };
    let blocks = vec![
        Block::Transformer(vit),
        Block::Projector(proj.clone()),
        Block::Transformer(lm),
    ];
    let model = SequenceModel::new(
        Some(PatchEmbedding::init(&mut rng, 5, 6, 4)),
        Embedding::init(&mut rng, 7, 8),
        blocks.clone(),
        Norm::new(NormKind::Rms, 8),
        LmHead::init(&mut rng, 8, 7),
    )
    .unwrap();
    let sample = Sample::text(vec![1, 2])
        .with_vision(Vision::Patches(rng.normal_matrix(3, 5, 1.0)))
        .with_valid(vec![true, false, true, true, true]);
    let vis = model.token_info(0, &sample);
    assert_eq!(vis.modality(), vec![Modality::Vision; 3]);
    assert_eq!(vis.valid(), vec![true, false, true]);
    let lm_info = model.token_info(2, &sample);
    assert_eq!(
        lm_info.modality(),
        [vec![Modality::Vision; 3], vec![Modality::Text; 2]].concat()
    );
    assert_eq!(model.embed(&sample).unwrap().dim(), (3, 6));
    let h = model
        .block_forward(1, &model.embed(&sample).unwrap(), &sample, None)
        .unwrap();
    assert_eq!(h.dim(), (5, 8));
    assert_eq!(model.linear_groups(1)[0][0].name, "proj");

    let bad_id =
        Sample::text(vec![1, 99]).with_vision(Vision::Patches(rng.normal_matrix(3, 5, 1.0)));
    assert!(matches!(
        model.forward(&bad_id).unwrap_err(),
        Error::InvalidConfig { .. }
    ));
    let bad_mask = sample.clone().with_valid(vec![true; 2]);
    assert!(matches!(
        model.forward(&bad_mask).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    let too_many = Sample::text(vec![1]).with_vision(Vision::Patches(rng.normal_matrix(5, 5, 1.0)));
    assert!(matches!(
        model.forward(&too_many).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    let bad_width =
        Sample::text(vec![1]).with_vision(Vision::Patches(rng.normal_matrix(2, 4, 1.0)));
    assert!(matches!(
        model.forward(&bad_width).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    let bad_target = sample.clone().with_targets(vec![(9, 1)]);
    assert!(matches!(
        model.loss(&bad_target).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));

    let mut two = blocks;
    two.push(Block::Projector(proj));
    let err = SequenceModel::new(
        None,
        Embedding::init(&mut rng, 7, 8),
        two,
        Norm::new(NormKind::Rms, 8),
        LmHead::init(&mut rng, 8, 7),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
}
