//! A synthetic visual question answering task with the property VLMQ targets:
//! images made mostly of background patches (many near-identical vision
//! tokens) with a few small objects, and short templated questions whose
//! one-token answers need those objects.
//!
//! An image is a `GRID x GRID` grid of `PATCH x PATCH` RGB patches (one
//! vision token per patch). The background is one dull colour with faint
//! noise; 1 to 4 objects each fill one patch with a saturated colour in one
//! of four shapes. Questions: the colour of a shape, the shape of a colour,
//! and which quadrant a shape is in (always about an object that is unique
//! in what the question names). Every sample is a pure function of
//! `(seed, index)`.

use ndarray::Array2;

/// Patches per side.
pub const GRID: usize = 8;
/// Pixels per patch side.
pub const PATCH: usize = 4;
/// Values per flattened patch (RGB).
pub const PATCH_DIM: usize = PATCH * PATCH * 3;
/// Vision tokens per image.
pub const VISION_TOKENS: usize = GRID * GRID;

/// Object colours.
pub const COLORS: [&str; 6] = ["red", "green", "blue", "yellow", "cyan", "magenta"];
const RGB: [[f32; 3]; 6] = [
    [0.95, 0.1, 0.1],
    [0.1, 0.9, 0.15],
    [0.15, 0.2, 0.95],
    [0.95, 0.9, 0.1],
    [0.1, 0.9, 0.9],
    [0.9, 0.1, 0.9],
];
/// Object shapes (4x4 masks).
pub const SHAPES: [&str; 4] = ["square", "cross", "diagonal", "ring"];
const MASKS: [[u8; 16]; 4] = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0],
    [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1],
];
/// Quadrant answers.
pub const QUADRANTS: [&str; 4] = ["top-left", "top-right", "bottom-left", "bottom-right"];

/// Token ids of the task's vocabulary. A question is one token that names
/// both what is asked and about which object (e.g. "colour of the cross"),
/// so answering takes one attention hop from the question to the object.
pub mod vocab {
    /// "what colour is the `<shape>`": 4 tokens, one per shape.
    pub const ASK_COLOR0: usize = 0;
    /// "what shape is the `<colour>` object": 6 tokens, one per colour.
    pub const ASK_SHAPE0: usize = 4;
    /// "where is the `<shape>`": 4 tokens, one per shape.
    pub const ASK_WHERE0: usize = 10;
    /// First colour answer (6 follow).
    pub const COLOR0: usize = 14;
    /// First shape answer (4 follow).
    pub const SHAPE0: usize = 20;
    /// First quadrant answer (4 follow).
    pub const QUAD0: usize = 24;
    /// Vocabulary size.
    pub const SIZE: usize = 28;
}

/// The kind of a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuestionKind {
    /// Colour of a shape.
    ColorOf,
    /// Shape of a colour.
    ShapeOf,
    /// Quadrant of a shape.
    Where,
}

/// One VQA example: patches, question tokens and the answer token.
#[derive(Debug, Clone)]
pub struct VqaExample {
    /// Flattened patches `[VISION_TOKENS, PATCH_DIM]`.
    pub patches: Array2<f32>,
    /// Question tokens (one token; the answer is predicted at the last one).
    pub question: Vec<usize>,
    /// The answer token.
    pub answer: usize,
    /// The question kind.
    pub kind: QuestionKind,
}

/// The question kinds the dataset asks. `Where` stays in the vocabulary but
/// is not asked: the toy model (learned patch positions, rotary positions in
/// the language model) stayed at chance on it within the training budget,
/// while colour and shape questions were learned.
pub const ASKED: [QuestionKind; 2] = [QuestionKind::ColorOf, QuestionKind::ShapeOf];

/// Dataset splits; each draws from its own stream, so they never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training data.
    Train,
    /// Calibration data for quantization (and for choosing settings).
    Calibration,
    /// Held-out evaluation data (never used to choose anything).
    Eval,
}

impl Split {
    fn stream(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00_0000,
            Split::Calibration => 0x6361_6c69_6200_0000,
            Split::Eval => 0x6576_616c_0000_0000,
        }
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[derive(Clone, Copy)]
struct Object {
    cell: usize,
    color: usize,
    shape: usize,
}

fn quadrant(cell: usize) -> usize {
    let (r, c) = (cell / GRID, cell % GRID);
    usize::from(r >= GRID / 2) * 2 + usize::from(c >= GRID / 2)
}

/// Example `index` of `split` for dataset seed `seed`.
pub fn example(seed: u64, split: Split, index: u64) -> VqaExample {
    let mut rng = Rng(seed ^ split.stream() ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    rng.next();
    loop {
        if let Some(ex) = try_example(&mut rng) {
            return ex;
        }
    }
}

fn try_example(rng: &mut Rng) -> Option<VqaExample> {
    let n_obj = 1 + rng.below(4);
    let mut objects: Vec<Object> = Vec::with_capacity(n_obj);
    while objects.len() < n_obj {
        let cell = rng.below(VISION_TOKENS);
        if objects.iter().any(|o| o.cell == cell) {
            continue;
        }
        objects.push(Object {
            cell,
            color: rng.below(COLORS.len()),
            shape: rng.below(SHAPES.len()),
        });
    }
    let unique_shape = |s: usize| objects.iter().filter(|o| o.shape == s).count() == 1;
    let unique_color = |c: usize| objects.iter().filter(|o| o.color == c).count() == 1;
    let pick = objects[rng.below(n_obj)];
    let (kind, question, answer) = match ASKED[rng.below(ASKED.len())] {
        QuestionKind::ColorOf if unique_shape(pick.shape) => (
            QuestionKind::ColorOf,
            vec![vocab::ASK_COLOR0 + pick.shape],
            vocab::COLOR0 + pick.color,
        ),
        QuestionKind::ShapeOf if unique_color(pick.color) => (
            QuestionKind::ShapeOf,
            vec![vocab::ASK_SHAPE0 + pick.color],
            vocab::SHAPE0 + pick.shape,
        ),
        QuestionKind::Where if unique_shape(pick.shape) => (
            QuestionKind::Where,
            vec![vocab::ASK_WHERE0 + pick.shape],
            vocab::QUAD0 + quadrant(pick.cell),
        ),
        _ => return None,
    };
    let bg = [
        0.3 + 0.2 * rng.uniform(),
        0.3 + 0.2 * rng.uniform(),
        0.3 + 0.2 * rng.uniform(),
    ];
    let mut patches = Array2::<f32>::zeros((VISION_TOKENS, PATCH_DIM));
    for (cell, mut row) in patches.outer_iter_mut().enumerate() {
        let obj = objects.iter().find(|o| o.cell == cell);
        for p in 0..PATCH * PATCH {
            let on = obj.is_some_and(|o| MASKS[o.shape][p] == 1);
            for ch in 0..3 {
                let base = match (on, obj) {
                    (true, Some(o)) => RGB[o.color][ch],
                    _ => bg[ch],
                };
                row[p * 3 + ch] = base + 0.02 * (rng.uniform() - 0.5);
            }
        }
    }
    Some(VqaExample {
        patches,
        question,
        answer,
        kind,
    })
}

/// `count` consecutive examples of a split.
pub fn examples(seed: u64, split: Split, start: u64, count: usize) -> Vec<VqaExample> {
    (0..count as u64)
        .map(|i| example(seed, split, start + i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_split_disjoint() {
        let a = example(1, Split::Train, 5);
        let b = example(1, Split::Train, 5);
        assert_eq!(a.patches, b.patches);
        assert_eq!(a.question, b.question);
        let c = example(1, Split::Eval, 5);
        assert_ne!(a.patches, c.patches);
    }

    #[test]
    fn answers_are_consistent_with_questions() {
        for ex in examples(3, Split::Train, 0, 200) {
            assert_eq!(ex.question.len(), 1);
            let (asks, answers) = match ex.kind {
                QuestionKind::ColorOf => (
                    vocab::ASK_COLOR0..vocab::ASK_SHAPE0,
                    vocab::COLOR0..vocab::SHAPE0,
                ),
                QuestionKind::ShapeOf => (
                    vocab::ASK_SHAPE0..vocab::ASK_WHERE0,
                    vocab::SHAPE0..vocab::QUAD0,
                ),
                QuestionKind::Where => {
                    (vocab::ASK_WHERE0..vocab::COLOR0, vocab::QUAD0..vocab::SIZE)
                }
            };
            assert!(asks.contains(&ex.question[0]));
            assert!(answers.contains(&ex.answer));
        }
    }

    #[test]
    fn most_tokens_are_background() {
        let ex = example(9, Split::Calibration, 0);
        let bg = ex.patches.row(0).to_owned();
        let near = ex
            .patches
            .outer_iter()
            .filter(|r| (r - &bg).iter().all(|v| v.abs() < 0.05))
            .count();
        assert!(near >= VISION_TOKENS - 4);
    }
}
