//! The toy ViT-LLM: a synthetic VQA task ([`task`]) and a small vision-language
//! model on the reference backend ([`model`]), used by the examples and tests
//! to show VLMQ against GPTQ on a model that low-bit quantization hurts.

pub mod model;
pub mod scores;
pub mod task;

pub use model::{accuracy, build_model, load_toy_model, to_sample, train, ToyConfig, TrainConfig};
pub use scores::AnswerScores;
pub use task::{
    example, example_with, examples, examples_with, Background, QuestionKind, Split, VqaExample,
};
