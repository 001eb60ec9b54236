//! # vlmq
//!
//! Hessian-based post-training weight quantization for vision-language
//! models: GPTQ, GPTAQ and VLMQ (importance-weighted GPTQ, arXiv 2508.03351).
//!
//! VLMQ gives each calibration token an importance factor `alpha_t` and
//! solves GPTQ's column-by-column problem with the enhanced Hessian
//! `H = (2/N) X diag(alpha) X^T`, so the quantization error is spent where the
//! model's loss is sensitive rather than on redundant vision tokens.
//!
//! See `docs/ALGORITHMS.md` for the math as implemented and
//! `docs/ARCHITECTURE.md` for the module map.
//!
#![doc = include_str!("../README.md")]

pub mod backend;
pub mod config;
pub mod error;
pub mod hessian;
pub mod importance;
pub mod linalg;
pub mod nn;
pub mod pack;
pub mod pipeline;
pub mod quant;
pub mod solver;
pub mod toy;
mod validate;

pub use backend::{LinearInfo, Modality, QuantizableModel, RowSink, TokenInfo, WeightPerturbation};
pub use config::{Bits, Damping, GptqConfig, GroupSize, MseClip, QuantScheme};
pub use error::{Error, Result};
pub use hessian::{HessianAccumulator, LayerStatistics};
pub use importance::{GradientSaliency, Normalization, SampleSignals, TokenImportance};
pub use pack::{Checkpoint, CheckpointFormat, CheckpointWriter, PackedLinear};
pub use pipeline::{quantize_model, PipelineConfig, PipelineReport, Progress, QuantMethod};
pub use quant::{quantize_rtn, GridFit, GridParams, QuantizedWeight};
pub use solver::{solve_layer, LayerSolution, Method, SolveReport};
