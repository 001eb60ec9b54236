//! Small models trained with Adam on learnable synthetic tasks. Chance level
//! is `ln(8) = 2.08`; each test requires the loss to fall at least 20x (both
//! fall by more than 500x in a fraction of a second).
//!
//! - A tiny decoder learns a task that needs attention: at every position,
//!   predict the sequence's first token.
//! - A ViT-LLM (encoder block, projector, decoder block) learns to name the
//!   class encoded in its image patches.

use vlmq_nn::{Adam, BlockConfig, Grads, Rng, Sample, SequenceModel};

const VOCAB: usize = 8;
const LEN: usize = 6;

fn sample(rng: &mut Rng) -> Sample {
    let tokens: Vec<usize> = (0..LEN).map(|_| rng.below(VOCAB)).collect();
    let targets = (1..LEN).map(|p| (p, tokens[0])).collect();
    Sample::text(tokens).with_targets(targets)
}

fn mean_loss(model: &SequenceModel, samples: &[Sample]) -> f32 {
    samples.iter().map(|s| model.loss(s).unwrap()).sum::<f32>() / samples.len() as f32
}

#[test]
fn tiny_decoder_learns_to_recall_the_first_token() {
    let mut rng = Rng::new(7);
    let mut model =
        SequenceModel::decoder(&mut rng, VOCAB, 1, BlockConfig::decoder(16, 2, 32)).unwrap();
    let eval: Vec<Sample> = (0..64).map(|_| sample(&mut rng)).collect();
    let before = mean_loss(&model, &eval);
    let mut adam = Adam::new(1e-2).with_weight_decay(1e-4);
    let batch = 8;
    for _ in 0..400 {
        let mut grads = Grads::new();
        for _ in 0..batch {
            model.loss_and_grads(&sample(&mut rng), &mut grads).unwrap();
        }
        grads.scale(1.0 / batch as f32);
        adam.step(&mut model, &grads);
    }
    let after = mean_loss(&model, &eval);
    println!(
        "loss before {before:.4}, after {after:.4}, factor {:.1}",
        before / after
    );
    assert!(before > 1.5, "initial loss {before} should be near ln(8)");
    assert!(
        after * 20.0 < before,
        "loss fell only from {before} to {after}"
    );
}

/// A ViT encoder block, a projector and a causal LM block, trained to name
/// the class encoded in the image patches at the answer position.
#[test]
fn tiny_vision_language_model_learns_to_read_the_image() {
    use vlmq_nn::{
        Block, Embedding, LmHead, Norm, NormKind, PatchEmbedding, Projector, TransformerBlock,
        Vision,
    };
    let mut rng = Rng::new(3);
    let (patches, patch_dim, classes) = (4, 6, 4);
    let blocks = vec![
        Block::Transformer(
            TransformerBlock::init(&mut rng, BlockConfig::encoder(12, 2, 24)).unwrap(),
        ),
        Block::Projector(Projector {
            proj: vlmq_nn::Linear::init(&mut rng, 12, 16, true),
        }),
        Block::Transformer(
            TransformerBlock::init(&mut rng, BlockConfig::decoder(16, 2, 32)).unwrap(),
        ),
    ];
    let mut model = SequenceModel::new(
        Some(PatchEmbedding::init(&mut rng, patch_dim, 12, patches)),
        Embedding::init(&mut rng, VOCAB, 16),
        blocks,
        Norm::new(NormKind::Rms, 16),
        LmHead::init(&mut rng, 16, VOCAB),
    )
    .unwrap();
    let make = |rng: &mut Rng| {
        let class = rng.below(classes);
        let mut pixels = rng.normal_matrix(patches, patch_dim, 0.3);
        pixels.column_mut(class).mapv_inplace(|v| v + 1.0);
        let question = rng.below(2);
        Sample::text(vec![question, 2])
            .with_vision(Vision::Patches(pixels))
            .with_targets(vec![(patches + 1, 4 + class)])
    };
    let eval: Vec<Sample> = (0..64).map(|_| make(&mut rng)).collect();
    let before = mean_loss(&model, &eval);
    let mut adam = Adam::new(1e-2);
    for _ in 0..300 {
        let mut grads = Grads::new();
        for _ in 0..8 {
            model.loss_and_grads(&make(&mut rng), &mut grads).unwrap();
        }
        grads.scale(1.0 / 8.0);
        adam.step(&mut model, &grads);
    }
    let after = mean_loss(&model, &eval);
    println!(
        "vlm loss before {before:.4}, after {after:.4}, factor {:.1}",
        before / after
    );
    assert!(
        after * 5.0 < before,
        "loss fell only from {before} to {after}"
    );
}
