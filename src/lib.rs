#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
mod digest;
pub mod error;
pub mod fsutil;
pub mod hessian;
pub mod importance;
mod kill_point;
pub mod linalg;
pub mod lock;
pub mod pack;
pub mod pipeline;
pub mod quant;
pub mod rng;
pub mod solver;
mod validate;

pub use half;
pub use ndarray;
pub use safetensors;

pub use backend::{
    GradientModel, LinearInfo, Modality, QuantizableModel, RowSink, StageCarry, StageOutput,
    TokenInfo, WeightPerturbation,
};
pub use config::{
    Bits, Damping, GptqConfig, GroupFit, GroupSize, MseClip, QuantScheme, ScalePrecision,
};
pub use error::{Error, Result};
pub use hessian::{HessianAccumulator, LayerStatistics};
pub use importance::{GradientSaliency, Normalization, SampleSignals, TokenImportance};
pub use pack::{Checkpoint, CheckpointFormat, CheckpointWriter, PackedLinear};
pub use pipeline::{
    quantize_model, quantize_model_streaming, BlockSink, DeadLayerFallback, FinishedBlock,
    PipelineConfig, PipelineOutput, PipelineReport, Progress, ProgressControl, QuantMethod,
};
pub use quant::{quantize_rtn, GridFit, GridParams, QuantizedWeight};
pub use solver::{solve_layer, LayerSolution, Method, SolveReport};
