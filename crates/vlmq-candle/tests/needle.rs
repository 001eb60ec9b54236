//! The long-context retrieval task: prompts are deterministic per seed, the
//! answer tokens are the only targets and decode to the answer, the context
//! is tagged `Other`, and held-out prompts never share prose with
//! calibration prompts.

// The task is experiment code of the needle_qa example, not of the library;
// the test reads the example's module. Scoring is not exercised here.
#[allow(dead_code)]
#[path = "../examples/needle/mod.rs"]
mod needle;

use needle::{needle_prompts, prose_sentences, NeedleOptions, ProseSplit};
use vlmq::Modality;
use vlmq_candle::tokenizer_from_file;

fn tokenizer() -> tokenizers::Tokenizer {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny/tokenizer/tokenizer.json"
    );
    tokenizer_from_file(path).expect("hf-tiny tokenizer fixture")
}

/// 200 distinct plain sentences, numbered in words so each is unique.
fn prose() -> String {
    let nouns = ["river", "garden", "library", "harbour", "valley"];
    let verbs = ["crossed", "watched", "painted", "visited", "described"];
    (0..200)
        .map(|i| {
            format!(
                "The traveller {} the quiet {} on day {} of the long journey north.",
                verbs[i % 5],
                nouns[(i / 5) % 5],
                ["one", "two", "three", "four", "five", "six", "seven", "eight"][(i / 25) % 8]
            ) + &" again".repeat(i % 3)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn prompts_are_deterministic_and_target_only_the_answer() {
    let tk = tokenizer();
    let text = prose();
    let opts = NeedleOptions {
        context_tokens: 80,
        distractors: 2,
    };
    let a = needle_prompts(&tk, &text, ProseSplit::Calibration, 6, 3, opts).unwrap();
    let b = needle_prompts(&tk, &text, ProseSplit::Calibration, 6, 3, opts).unwrap();
    let c = needle_prompts(&tk, &text, ProseSplit::Calibration, 6, 4, opts).unwrap();
    assert_eq!(a, b, "same seed, same prompts");
    assert_ne!(a, c, "another seed, other prompts");
    for p in &a {
        let n = p.sample.tokens.len();
        let targets: Vec<usize> = (0..n).filter(|&t| p.sample.targets[t]).collect();
        assert_eq!(targets, p.answer.clone().collect::<Vec<_>>());
        let answer = tk
            .decode(&p.sample.tokens[p.answer.clone()], false)
            .unwrap();
        assert_eq!(answer.trim(), p.answer_text);
        let modality = p.sample.modality.as_ref().expect("modalities");
        for (t, m) in modality.iter().enumerate() {
            let want = if p.context.contains(&t) {
                Modality::Other
            } else {
                Modality::Text
            };
            assert_eq!(*m, want, "token {t}");
        }
        let context = tk
            .decode(&p.sample.tokens[p.context.clone()], false)
            .unwrap();
        // The asked-about fact is in the context, with the question's name.
        let name = p.question.trim_end_matches('?').rsplit(' ').next().unwrap();
        assert!(
            context.contains(&format!("of {name} is {}.", p.answer_text)),
            "{context}"
        );
        assert!(p.context.len() >= 80 && p.answer.start > p.context.end);
    }
}

#[test]
fn held_out_prompts_use_other_sentences_and_literal_text_is_unquoted() {
    let tk = tokenizer();
    let text = prose();
    let all = prose_sentences(&text);
    assert_eq!(all.len(), 200);
    let cut = all.len() * 4 / 5;
    let opts = NeedleOptions {
        context_tokens: 40,
        distractors: 1,
    };
    let held = needle_prompts(&tk, &text, ProseSplit::HeldOut, 4, 0, opts).unwrap();
    for p in &held {
        let context = tk
            .decode(&p.sample.tokens[p.context.clone()], false)
            .unwrap();
        assert!(
            all[..cut].iter().all(|s| !context.contains(s.as_str())),
            "a calibration sentence in a held-out prompt"
        );
    }
    // Lines that are one string literal each, as in `pydoc_data/topics.py`.
    let literal = "           'The parser reads every line of the input file in order.\\n'\n           'Each statement then runs in the order it was written.\\n',\n";
    assert_eq!(
        prose_sentences(literal),
        [
            "The parser reads every line of the input file in order.",
            "Each statement then runs in the order it was written."
        ]
    );
}
