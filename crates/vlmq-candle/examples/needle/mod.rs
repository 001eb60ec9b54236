//! A long-context retrieval task for testing VLMQ on real text-only weights.
//!
//! VLMQ's premise is that most calibration tokens are redundant for the task
//! (in a VLM, most vision tokens). This task recreates that premise with
//! prose: each prompt is several hundred tokens of unrelated English text
//! with three short facts inserted at sentence boundaries ("The home town of
//! Mira is Oslo."), followed by a question about one of them. The other two
//! facts are distractors with the same attribute and other names, so the
//! model has to find the right sentence. The reply restates the question
//! ("The home town of Mira is") and the target is the value alone.
//!
//! Prompts use the ChatML template of SmolLM2-Instruct:
//!
//! ```text
//! <|im_start|>user\n{context}\n\nQuestion: What is the {attribute} of {name}?<|im_end|>\n
//! <|im_start|>assistant\nThe {attribute} of {name} is{ value}.<|im_end|>
//! ```
//!
//! Context tokens are tagged [`Modality::Other`] and the rest
//! [`Modality::Text`], so the pipeline's trace shares report how much of each
//! layer's Hessian the context carries before and after importance
//! weighting. Only the value's tokens are targets of the task loss.
//!
//! Determinism: every choice comes from a [`SplitMix64`] seeded by the
//! caller; the same text, tokenizer, count and seed give the same prompts.

use std::ops::Range;

use tokenizers::Tokenizer;
use vlmq::__private::SplitMix64;
use vlmq::{Error, Modality, Result};
use vlmq_candle::candle_core::{self, DType, D};

use vlmq_candle::{encode, LlamaModel, TextSample};

const NAMES: [&str; 24] = [
    "Mira", "Tomas", "Elena", "Jonah", "Priya", "Oskar", "Lena", "Rafael", "Ingrid", "Kenji",
    "Amara", "Felix", "Sofia", "Dmitri", "Nadia", "Hugo", "Clara", "Mateo", "Yara", "Anton",
    "Leila", "Bruno", "Greta", "Idris",
];

/// (attribute, values): every value is one short common word.
const ATTRIBUTES: [(&str, [&str; 8]); 4] = [
    (
        "favourite colour",
        [
            "red", "blue", "green", "yellow", "purple", "orange", "black", "white",
        ],
    ),
    (
        "home town",
        [
            "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Dublin", "Oslo",
        ],
    ),
    (
        "pet",
        [
            "cat", "dog", "parrot", "rabbit", "horse", "goat", "turtle", "hamster",
        ],
    ),
    (
        "favourite fruit",
        [
            "apple", "banana", "cherry", "mango", "peach", "lemon", "grape", "plum",
        ],
    ),
];

/// Shape of the prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedleOptions {
    /// Prose tokens of context per prompt (the facts come on top).
    pub context_tokens: usize,
    /// Distractor facts (same attribute, other names and values) per prompt.
    pub distractors: usize,
}

impl Default for NeedleOptions {
    fn default() -> Self {
        NeedleOptions {
            context_tokens: 320,
            distractors: 2,
        }
    }
}

/// One prompt: the sample to run (answer tokens are its only targets) and
/// where its parts lie.
#[derive(Debug, Clone, PartialEq)]
pub struct NeedlePrompt {
    /// Tokens, targets (the answer) and modalities (context = `Other`).
    pub sample: TextSample,
    /// Positions of the answer's tokens.
    pub answer: Range<usize>,
    /// Positions of the context (prose and facts).
    pub context: Range<usize>,
    /// The question asked, for display.
    pub question: String,
    /// The expected answer (one word).
    pub answer_text: String,
}

/// Which part of the prose a set draws its context from: calibration and
/// held-out prompts never share a sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProseSplit {
    /// The first 80% of the sentences.
    Calibration,
    /// The last 20%.
    HeldOut,
}

/// Splits `prose` into clean English sentences: whitespace collapsed,
/// 40..=300 characters, at least 80% letters or spaces, no code or markup
/// markers. Deterministic; keeps the text's order.
///
/// Text stored as Python string literals, one piece per line (such as
/// CPython's `pydoc_data/topics.py`), is read as the prose it holds: a
/// line's enclosing quotes are dropped and `\n` escapes become spaces.
pub fn prose_sentences(prose: &str) -> Vec<String> {
    let unquoted: Vec<&str> = prose
        .lines()
        .map(|line| {
            let t = line.trim().trim_end_matches([',', '}']);
            let quoted = t.len() >= 2
                && ((t.starts_with('\'') && t.ends_with('\''))
                    || (t.starts_with('"') && t.ends_with('"')));
            if quoted {
                &t[1..t.len() - 1]
            } else {
                t
            }
        })
        .collect();
    let joined = unquoted.join(" ").replace("\\n", " ").replace("\\'", "'");
    let flat: String = joined.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.split_inclusive(". ")
        .map(str::trim)
        .filter(|s| (40..=300).contains(&s.len()) && s.ends_with('.'))
        .filter(|s| {
            let plain = s.chars().filter(|c| c.is_alphabetic() || *c == ' ').count();
            plain * 5 >= s.chars().count() * 4
                && !["::", ">>>", "``", "**", "\\n", "{", "}", "="]
                    .iter()
                    .any(|m| s.contains(m))
        })
        .map(str::to_string)
        .collect()
}

/// Builds `count` prompts from `prose` with the given seed (see the module
/// docs). Errors when the prose has too few usable sentences for the
/// requested context length.
pub fn needle_prompts(
    tk: &Tokenizer,
    prose: &str,
    split: ProseSplit,
    count: usize,
    seed: u64,
    opts: NeedleOptions,
) -> Result<Vec<NeedlePrompt>> {
    if opts.distractors + 1 > ATTRIBUTES[0].1.len() {
        return Err(Error::InvalidConfig {
            field: "distractors",
            value: opts.distractors.to_string(),
            reason: "at most 7 distractors (each fact needs its own value)",
        });
    }
    let all = prose_sentences(prose);
    let cut = all.len() * 4 / 5;
    let pool = match split {
        ProseSplit::Calibration => &all[..cut],
        ProseSplit::HeldOut => &all[cut..],
    };
    let lens: Vec<usize> = pool
        .iter()
        .map(|s| encode(tk, &format!(" {s}")).map(|t| t.len()))
        .collect::<Result<_>>()?;
    if lens.iter().sum::<usize>() < 2 * opts.context_tokens.max(1) {
        return Err(Error::InvalidConfig {
            field: "prose",
            value: format!("{} usable sentences", pool.len()),
            reason: "too little prose for the requested context length",
        });
    }
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| one_prompt(tk, pool, &lens, &mut rng, opts))
        .collect()
}

fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    rng.below(n)
}

/// `k` distinct indices below `n`.
fn distinct(rng: &mut SplitMix64, n: usize, k: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + pick(rng, n - i);
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

fn one_prompt(
    tk: &Tokenizer,
    pool: &[String],
    lens: &[usize],
    rng: &mut SplitMix64,
    opts: NeedleOptions,
) -> Result<NeedlePrompt> {
    let mut start = pick(rng, pool.len());
    let mut sentences: Vec<String> = Vec::new();
    let mut tokens = 0;
    while tokens < opts.context_tokens {
        sentences.push(pool[start].clone());
        tokens += lens[start];
        start = (start + 1) % pool.len();
    }
    let (attribute, values) = ATTRIBUTES[pick(rng, ATTRIBUTES.len())];
    let facts = opts.distractors + 1;
    let names = distinct(rng, NAMES.len(), facts);
    let vals = distinct(rng, values.len(), facts);
    for (&n, &v) in names.iter().zip(&vals) {
        let at = pick(rng, sentences.len() + 1);
        sentences.insert(
            at,
            format!("The {attribute} of {} is {}.", NAMES[n], values[v]),
        );
    }
    let name = NAMES[names[0]];
    let value = values[vals[0]];
    let question = format!("What is the {attribute} of {name}?");
    let pieces = [
        "<|im_start|>user\n".to_string(),
        sentences.join(" "),
        format!(
            "\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\nThe {attribute} of {name} is"
        ),
        format!(" {value}"),
        ".<|im_end|>".to_string(),
    ];
    let encoded: Vec<Vec<u32>> = pieces
        .iter()
        .map(|p| encode(tk, p))
        .collect::<Result<_>>()?;
    let bounds: Vec<usize> = encoded
        .iter()
        .scan(0, |acc, e| {
            *acc += e.len();
            Some(*acc)
        })
        .collect();
    let context = bounds[0]..bounds[1];
    let answer = bounds[2]..bounds[3];
    let ids: Vec<u32> = encoded.concat();
    let mut targets = vec![false; ids.len()];
    targets[answer.clone()].iter_mut().for_each(|t| *t = true);
    let modality = (0..ids.len())
        .map(|t| {
            if context.contains(&t) {
                Modality::Other
            } else {
                Modality::Text
            }
        })
        .collect();
    Ok(NeedlePrompt {
        sample: TextSample {
            tokens: ids,
            targets,
            modality: Some(modality),
        },
        answer,
        context,
        question,
        answer_text: value.to_string(),
    })
}

/// How well a model answers a prompt set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NeedleScore {
    /// Mean NLL (nats) per answer token.
    pub answer_nll: f64,
    /// Share of prompts whose every answer token is the greedy (arg-max)
    /// prediction, i.e. greedy decoding after the prompt yields the answer.
    pub exact_match: f64,
    /// Prompts scored.
    pub prompts: usize,
}

/// Scores `model` on `prompts` (one forward pass each, teacher-forced);
/// `progress(done, total)` after each prompt.
pub fn score_answers(
    model: &LlamaModel,
    prompts: &[NeedlePrompt],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<NeedleScore> {
    if prompts.is_empty() {
        return Err(Error::Empty {
            what: "question prompts".into(),
        });
    }
    let (mut nll, mut tokens, mut exact) = (0.0f64, 0usize, 0usize);
    for (i, p) in prompts.iter().enumerate() {
        if p.answer.start == 0 || p.answer.end > p.sample.tokens.len() {
            return Err(Error::InvalidConfig {
                field: "answer span",
                value: format!("{:?}", p.answer),
                reason: "the answer must follow at least one prompt token",
            });
        }
        // Only the positions that predict the answer go through the head.
        let hidden = model.hidden_states(&[&p.sample.tokens])?;
        let last = hidden.last().ok_or(Error::Empty {
            what: "hidden states".into(),
        })?;
        let (from, n) = (p.answer.start - 1, p.answer.len());
        let logits = model.head_logits(&last.narrow(1, from, n).map_err(at_model)?, false)?;
        let score = || -> candle_core::Result<(f64, bool)> {
            let lp =
                candle_nn::ops::log_softmax(&logits.squeeze(0)?.to_dtype(DType::F32)?, D::Minus1)?;
            let rows = lp.to_vec2::<f32>()?;
            let best = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let want = &p.sample.tokens[p.answer.clone()];
            let nll: f64 = rows
                .iter()
                .zip(want)
                .map(|(r, &w)| -f64::from(r[w as usize]))
                .sum();
            Ok((nll, best.as_slice() == want))
        };
        let (n, hit) = score().map_err(at_model)?;
        nll += n;
        tokens += p.answer.len();
        exact += usize::from(hit);
        progress(i + 1, prompts.len());
    }
    Ok(NeedleScore {
        answer_nll: nll / tokens as f64,
        exact_match: exact as f64 / prompts.len() as f64,
        prompts: prompts.len(),
    })
}

/// A candle failure while scoring, as the library reports failures outside
/// any block.
fn at_model(e: candle_core::Error) -> Error {
    Error::Backend {
        block: usize::MAX,
        layer: None,
        reason: format!("model end: {e}"),
    }
}
