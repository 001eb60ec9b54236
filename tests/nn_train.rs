//! A tiny decoder trained with Adam on a task that needs attention: at every
//! position, predict the sequence's first token. Chance level is `ln(vocab)`;
//! the test requires the loss to fall at least 20x (it falls ~700x).

use vlmq::nn::{Adam, BlockConfig, Grads, Rng, Sample, SequenceModel};

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
