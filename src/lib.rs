#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
mod digest;
pub mod error;
mod fastexp;
mod fsutil;
pub mod hessian;
pub mod importance;
mod kill_point;
mod linalg;
pub mod lock;
pub mod pack;
pub mod pipeline;
pub mod quant;
mod rng;
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
pub use fsutil::write_atomic as write_file_atomic;
pub use hessian::{HessianAccumulator, LayerStatistics};
pub use importance::{GradientSaliency, Normalization, SampleSignals, TokenImportance};
pub use pack::{Checkpoint, CheckpointFormat, CheckpointWriter, PackedLinear};
pub use pipeline::{
    quantize_model, quantize_model_streaming, BlockSink, DeadLayerFallback, FinishedBlock,
    PipelineConfig, PipelineOutput, PipelineReport, Progress, ProgressControl, QuantMethod,
};
pub use quant::{quantize_rtn, GridFit, GridParams, QuantizedWeight};
pub use rng::sample_indices;
pub use solver::{solve_layer, LayerSolution, Method, SolveReport};

/// Not part of the API: the helpers vlmq's companion crates (the reference
/// `vlmq-nn` backend, the toy task) and the test suites share with the core,
/// so that their products and random streams are the core's bit for bit.
/// Anything here may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::fastexp::exp_nonpositive;
    pub use crate::fsutil::{simulate_free_space, write_dir_atomic};
    pub use crate::linalg::{inverse_cholesky_upper, matmul, matmul_into};
    pub use crate::pack::bits::{
        pack_qweight, pack_qzeros, pack_stream, qzeros_v1_to_v2, qzeros_v2_to_v1, unpack_qweight,
        unpack_qzeros, unpack_stream,
    };
    pub use crate::rng::SplitMix64;
    pub use crate::solver::solve_layer_owned;
}
