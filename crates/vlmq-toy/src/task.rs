//! A synthetic visual question answering task with the property VLMQ targets:
//! images made mostly of background patches (many near-identical vision
//! tokens) with a few small objects, and short templated questions whose
//! one-token answers need those objects.
//!
//! An image is a `GRID x GRID` grid of `PATCH x PATCH` RGB patches (one
//! vision token per patch). The background is one dull colour with faint
//! noise and, by default, faint achromatic clutter ([`Background`]); 2 to 5 objects each fill one patch with one of eight hues (with
//! their own saturation and brightness) in one of four shapes. Questions: the
//! colour of a shape and the shape of a colour (always about an object that is
//! unique in what the question names). Neighbouring hues are close, so the
//! answers need a precise reading of one or two object tokens among many
//! background tokens. Every sample is a pure function of `(seed, index)`.

use ndarray::Array2;
use vlmq::__private::SplitMix64;

/// Patches per side.
pub const GRID: usize = 8;
/// Pixels per patch side.
pub const PATCH: usize = 4;
/// Values per flattened patch (RGB).
pub const PATCH_DIM: usize = PATCH * PATCH * 3;
/// Vision tokens per image.
pub const VISION_TOKENS: usize = GRID * GRID;

/// Object colours: eight hues 45 degrees apart on the colour wheel. Each
/// object also draws its own saturation and brightness, so neighbouring hues
/// overlap in raw RGB distance and telling them apart takes a precise reading.
pub const COLORS: [&str; 8] = [
    "red", "orange", "lime", "green", "cyan", "azure", "violet", "pink",
];
/// Object shapes (4x4 masks).
pub const SHAPES: [&str; 4] = ["square", "cross", "diagonal", "ring"];
const MASKS: [[u8; 16]; 4] = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0],
    [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1],
];
/// Fewest and most objects in an image.
pub const OBJECTS: std::ops::RangeInclusive<usize> = 2..=5;

/// RGB of hue `h` (degrees) at saturation `s` and value `v` (HSV model).
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let channel = |n: f32| {
        let k = (n + h / 60.0) % 6.0;
        v * (1.0 - s * k.min(4.0 - k).clamp(0.0, 1.0))
    };
    [channel(5.0), channel(3.0), channel(1.0)]
}
/// Quadrant answers.
pub const QUADRANTS: [&str; 4] = ["top-left", "top-right", "bottom-left", "bottom-right"];

/// Token ids of the task's vocabulary. A question is one token that names
/// both what is asked and about which object (e.g. "colour of the cross"),
/// so answering takes one attention hop from the question to the object.
pub mod vocab {
    /// "what colour is the `<shape>`": 4 tokens, one per shape.
    pub const ASK_COLOR0: usize = 0;
    /// "what shape is the `<colour>` object": 8 tokens, one per colour.
    pub const ASK_SHAPE0: usize = 4;
    /// "where is the `<shape>`": 4 tokens, one per shape.
    pub const ASK_WHERE0: usize = 12;
    /// First colour answer (8 follow).
    pub const COLOR0: usize = 16;
    /// First shape answer (4 follow).
    pub const SHAPE0: usize = 24;
    /// First quadrant answer (4 follow).
    pub const QUAD0: usize = 28;
    /// Vocabulary size.
    pub const SIZE: usize = 32;
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

/// The task's draws on [`SplitMix64`] (integers by remainder, floats with 24 bits).
struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0.below_by_remainder(n)
    }
    fn uniform(&mut self) -> f32 {
        self.0.uniform_f32()
    }
}

#[derive(Clone, Copy)]
struct Object {
    cell: usize,
    color: usize,
    shape: usize,
    rgb: [f32; 3],
}

fn quadrant(cell: usize) -> usize {
    let (r, c) = (cell / GRID, cell % GRID);
    usize::from(r >= GRID / 2) * 2 + usize::from(c >= GRID / 2)
}

/// How the background patches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Background {
    /// One dull colour with faint pixel noise: background tokens are near
    /// duplicates of each other.
    Plain,
    /// The plain background plus, in every background patch, a faint
    /// achromatic copy of a random shape mask with random contrast (up to
    /// `CLUTTER_CONTRAST / 2` either way). Background tokens then differ from
    /// each other along the very features that shapes are read from, like the
    /// varied but uninformative vision tokens of real images, yet carry no
    /// colour and say nothing about the answer.
    #[default]
    Cluttered,
}

impl std::str::FromStr for Background {
    type Err = vlmq::error::Error;

    /// Parses `"plain"` or `"cluttered"` (e.g. a command-line flag).
    fn from_str(s: &str) -> vlmq::error::Result<Self> {
        match s {
            "plain" => Ok(Background::Plain),
            "cluttered" => Ok(Background::Cluttered),
            other => Err(vlmq::error::Error::InvalidConfig {
                field: "background",
                value: other.to_string(),
                reason: "expected plain or cluttered",
            }),
        }
    }
}

/// Peak-to-peak contrast of the achromatic clutter in [`Background::Cluttered`].
pub const CLUTTER_CONTRAST: f32 = 0.6;

/// Example `index` of `split` for dataset seed `seed`, with the default
/// ([`Background::Cluttered`]) background.
pub fn example(seed: u64, split: Split, index: u64) -> VqaExample {
    example_with(seed, split, index, Background::default())
}

/// Example `index` of `split` for dataset seed `seed` with the given
/// background. The scene, question and answer do not depend on the
/// background: the clutter is drawn from its own random stream.
pub fn example_with(seed: u64, split: Split, index: u64, background: Background) -> VqaExample {
    let mut stream =
        SplitMix64::from_state(seed ^ split.stream() ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    stream.next_u64();
    let clutter_state = stream.state() ^ 0x636C_7574_7465_7200;
    let mut rng = Rng(stream);
    let mut clutter = Rng(SplitMix64::from_state(clutter_state));
    loop {
        if let Some(ex) = try_example(&mut rng, &mut clutter, background) {
            return ex;
        }
    }
}

fn try_example(rng: &mut Rng, clutter: &mut Rng, background: Background) -> Option<VqaExample> {
    let n_obj = OBJECTS.start() + rng.below(OBJECTS.end() - OBJECTS.start() + 1);
    let mut objects: Vec<Object> = Vec::with_capacity(n_obj);
    while objects.len() < n_obj {
        let cell = rng.below(VISION_TOKENS);
        if objects.iter().any(|o| o.cell == cell) {
            continue;
        }
        let color = rng.below(COLORS.len());
        let hue = 360.0 * color as f32 / COLORS.len() as f32;
        objects.push(Object {
            cell,
            color,
            shape: rng.below(SHAPES.len()),
            rgb: hsv(hue, 0.7 + 0.3 * rng.uniform(), 0.7 + 0.3 * rng.uniform()),
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
        let (clutter_mask, contrast) = match (background, obj) {
            (Background::Cluttered, None) => (
                Some(MASKS[clutter.below(MASKS.len())]),
                CLUTTER_CONTRAST * (clutter.uniform() - 0.5),
            ),
            _ => (None, 0.0),
        };
        for p in 0..PATCH * PATCH {
            let on = obj.is_some_and(|o| MASKS[o.shape][p] == 1);
            let shade = if clutter_mask.is_some_and(|m| m[p] == 1) {
                contrast
            } else {
                0.0
            };
            for ch in 0..3 {
                let base = match (on, obj) {
                    (true, Some(o)) => o.rgb[ch],
                    _ => bg[ch] + shade,
                };
                row[p * 3 + ch] = base + 0.04 * (rng.uniform() - 0.5);
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

/// `count` consecutive examples of a split (default background).
pub fn examples(seed: u64, split: Split, start: u64, count: usize) -> Vec<VqaExample> {
    examples_with(seed, split, start, count, Background::default())
}

/// `count` consecutive examples of a split with the given background.
pub fn examples_with(
    seed: u64,
    split: Split,
    start: u64,
    count: usize,
    background: Background,
) -> Vec<VqaExample> {
    (0..count as u64)
        .map(|i| example_with(seed, split, start + i, background))
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
    fn background_names_parse() {
        assert_eq!("plain".parse::<Background>().unwrap(), Background::Plain);
        assert_eq!(
            "cluttered".parse::<Background>().unwrap(),
            Background::Cluttered
        );
        assert!(matches!(
            "busy".parse::<Background>(),
            Err(vlmq::error::Error::InvalidConfig {
                field: "background",
                ..
            })
        ));
    }

    #[test]
    fn hues_follow_the_hsv_model() {
        let close = |a: [f32; 3], b: [f32; 3]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(hsv(0.0, 1.0, 1.0), [1.0, 0.0, 0.0]));
        assert!(close(hsv(45.0, 1.0, 1.0), [1.0, 0.75, 0.0]));
        assert!(close(hsv(120.0, 1.0, 1.0), [0.0, 1.0, 0.0]));
        assert!(close(hsv(240.0, 0.5, 0.8), [0.4, 0.4, 0.8]));
        assert!(close(hsv(315.0, 1.0, 1.0), [1.0, 0.0, 0.75]));
    }

    #[test]
    fn clutter_changes_only_background_patches() {
        for i in 0..50 {
            let plain = example_with(4, Split::Train, i, Background::Plain);
            let busy = example_with(4, Split::Train, i, Background::Cluttered);
            assert_eq!((plain.question, plain.answer), (busy.question, busy.answer));
            let changed = plain
                .patches
                .outer_iter()
                .zip(busy.patches.outer_iter())
                .filter(|(a, b)| a != b)
                .count();
            // Object patches are untouched; (almost) every background patch
            // gets clutter (a zero-contrast draw is possible but rare).
            assert!(changed >= VISION_TOKENS - OBJECTS.end() - 2, "{changed}");
            assert!(changed <= VISION_TOKENS - OBJECTS.start());
            for (a, b) in plain.patches.iter().zip(busy.patches.iter()) {
                assert!((a - b).abs() <= CLUTTER_CONTRAST / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn most_tokens_are_background() {
        let ex = example_with(9, Split::Calibration, 0, Background::Plain);
        let bg = ex.patches.row(0).to_owned();
        let near = ex
            .patches
            .outer_iter()
            .filter(|r| (r - &bg).iter().all(|v| v.abs() < 0.05))
            .count();
        assert!(near >= VISION_TOKENS - OBJECTS.end());
    }
}
