//! The block-by-block quantization driver.
//!
//! [`quantize_model`] takes any [`QuantizableModel`](crate::QuantizableModel)
//! and its calibration samples and, block by block: runs the calibration
//! streams, accumulates the (importance-weighted) Hessian of every input
//! group, solves the group's layers in true-sequential order and writes the
//! quantized weights back. True-sequential capture runs the backend's
//! staged forward ([`QuantizableModel::block_stage`](crate::QuantizableModel::block_stage)):
//! one stage per group, and the last stage's result feeds the next block, so
//! a backend that implements it runs each block once per sample. When
//! the method needs importance factors, one block-wise backward pass of the
//! task loss through the full-precision model comes first.

mod block;
mod capture;
mod config;
mod context;
mod cpu_time;
mod driver;
mod gguf;
mod inputs;
mod pass;
mod plan;
mod progress;
mod report;
mod report_json;
mod saliency;
mod sink;
mod stages;
mod state;
mod task_loss;
mod trim;
mod weight_check;

pub use config::{
    BlockSelection, DeadLayerFallback, GradientSource, ImportanceOptions, PipelineConfig,
    QuantMethod,
};
pub use driver::{quantize_model, quantize_model_streaming};
pub use inputs::{input_statistics, GroupStatistics};
pub use progress::{Progress, ProgressControl, Stage};
pub use report::{LayerReport, PipelineOutput, PipelineReport, TraceShares};
pub use saliency::SaliencyMaps;
pub use sink::{BlockSink, FinishedBlock};
