//! What a pipeline run reports and returns.

use std::collections::BTreeMap;
use std::fmt;

use crate::backend::Modality;
use crate::importance::ImportanceDiagnostics;
use crate::quant::QuantizedWeight;
use crate::solver::GgufSolution;

use super::config::QuantMethod;

/// Share of the Hessian trace contributed by each modality, before and
/// after importance weighting, and the mean factor per modality. Token `t`
/// contributes `alpha_t ||x_t||^2` to the trace.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TraceShares {
    /// Vision share of the trace with uniform weights.
    pub vision_before: f64,
    /// Vision share with the run's weights.
    pub vision_after: f64,
    /// Text share with uniform weights.
    pub text_before: f64,
    /// Text share with the run's weights.
    pub text_after: f64,
    /// Mean factor of valid vision tokens.
    pub mean_alpha_vision: f64,
    /// Mean factor of valid text tokens.
    pub mean_alpha_text: f64,
}

impl TraceShares {
    /// The shares and mean factors recorded by `d`.
    pub fn from_diagnostics(d: &ImportanceDiagnostics) -> Self {
        let mean_alpha = |m: Modality| {
            d.report()
                .iter()
                .find(|r| r.modality == m)
                .and_then(|r| r.alpha)
                .map_or(0.0, |a| a.mean)
        };
        TraceShares {
            vision_before: d.trace_share_before(Modality::Vision),
            vision_after: d.trace_share_after(Modality::Vision),
            text_before: d.trace_share_before(Modality::Text),
            text_after: d.trace_share_after(Modality::Text),
            mean_alpha_vision: mean_alpha(Modality::Vision),
            mean_alpha_text: mean_alpha(Modality::Text),
        }
    }
}

/// Facts about one quantized layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    /// Block index.
    pub block: usize,
    /// Block name.
    pub block_name: String,
    /// Layer name.
    pub layer: String,
    /// Bit width.
    pub bits: u32,
    /// Group size in the GPTQ convention (-1 = per channel).
    pub group_size: i64,
    /// Calibration tokens in the layer's statistics.
    pub tokens: usize,
    /// `tr((W - Q) H (W - Q)^T)` on the layer's (weighted) Hessian, when
    /// asked for ([`PipelineConfig::with_layer_objectives`](super::PipelineConfig::with_layer_objectives)).
    pub objective: Option<f64>,
    /// Objective on the unweighted Hessian (comparable across methods),
    /// when asked for.
    pub objective_unweighted: Option<f64>,
    /// Input columns whose Hessian diagonal is 0 (every calibration input
    /// zero or underflowing); they are quantized as 0, or the whole layer
    /// with round-to-nearest when all are dead and
    /// [`DeadLayerFallback::Rtn`](super::DeadLayerFallback::Rtn) is set.
    /// `None` when no calibration statistics were gathered (RTN without
    /// objectives never runs the calibration set through the layer).
    pub dead_columns: Option<usize>,
    /// Relative damping used (0 for RTN).
    pub damp_percent: f64,
    /// Seconds spent solving the layer.
    pub seconds: f64,
    /// Modality trace shares.
    pub shares: TraceShares,
}

/// The report of a whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineReport {
    /// The method.
    pub method: QuantMethod,
    /// One entry per quantized layer, in order.
    pub layers: Vec<LayerReport>,
    /// Seconds spent on the importance (gradient) pass.
    pub importance_seconds: f64,
    /// Seconds for the whole run.
    pub total_seconds: f64,
    /// CPU seconds (user + system, every thread of the process) used during
    /// the run; `None` where the platform gives no reading. Counts any other
    /// thread of the process that ran meanwhile.
    pub cpu_seconds: Option<f64>,
    /// The cores the process could run on (`available_parallelism`).
    pub cores: usize,
    /// Blocks restored from a saved state instead of being recomputed.
    pub resumed_blocks: usize,
}

impl PipelineReport {
    /// Sum of the per-layer unweighted objectives; `None` when they were
    /// not computed.
    pub fn total_objective(&self) -> Option<f64> {
        self.layers.iter().map(|l| l.objective_unweighted).sum()
    }

    /// How busy the cores were: CPU seconds / wall seconds / cores, so 1.0
    /// means every available core worked for the whole run. `None` without
    /// a CPU-time reading or for a run that took no measurable time.
    pub fn cpu_utilization(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (self.total_seconds > 0.0).then(|| cpu / self.total_seconds / self.cores.max(1) as f64)
    }

    /// The report as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "block": l.block, "block_name": l.block_name, "layer": l.layer,
                    "bits": l.bits, "group_size": l.group_size, "tokens": l.tokens,
                    "objective": l.objective, "objective_unweighted": l.objective_unweighted,
                    "damp_percent": l.damp_percent, "seconds": l.seconds,
                    "vision_trace_share_before": l.shares.vision_before,
                    "vision_trace_share_after": l.shares.vision_after,
                    "text_trace_share_before": l.shares.text_before,
                    "text_trace_share_after": l.shares.text_after,
                    "mean_alpha_vision": l.shares.mean_alpha_vision,
                    "mean_alpha_text": l.shares.mean_alpha_text,
                })
            })
            .collect();
        serde_json::json!({
            "method": self.method.name(),
            "importance_seconds": self.importance_seconds,
            "total_seconds": self.total_seconds,
            "cpu_seconds": self.cpu_seconds,
            "cores": self.cores,
            "cpu_utilization": self.cpu_utilization(),
            "resumed_blocks": self.resumed_blocks,
            "layers": layers,
        })
    }
}

impl fmt::Display for PipelineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<12} {:<10} {:>4} {:>6} {:>12} {:>12} {:>8} {:>13} {:>7}",
            "block",
            "layer",
            "bits",
            "group",
            "objective",
            "obj(unif.)",
            "damp",
            "vision share",
            "time"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "{:<12} {:<10} {:>4} {:>6} {:>12} {:>12} {:>8.3} {:>6.2}->{:<5.2} {:>6.3}s",
                l.block_name,
                l.layer,
                l.bits,
                l.group_size,
                objective_text(l.objective),
                objective_text(l.objective_unweighted),
                l.damp_percent,
                l.shares.vision_before,
                l.shares.vision_after,
                l.seconds
            )?;
        }
        write!(
            f,
            "{}: {} layers, importance pass {:.2}s, total {:.2}s",
            self.method,
            self.layers.len(),
            self.importance_seconds,
            self.total_seconds
        )?;
        match self.cpu_utilization() {
            Some(u) => write!(f, ", CPU {:.0}% of {} cores", 100.0 * u, self.cores),
            None => Ok(()),
        }
    }
}

/// An objective in the table: scientific notation, `-` when not computed.
fn objective_text(o: Option<f64>) -> String {
    o.map_or_else(|| "-".to_string(), |v| format!("{v:.4e}"))
}

/// The result of a run: the report and every layer's quantized weight, keyed
/// by `(block, layer name)` (the model itself holds the dequantized weights).
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    /// The run's report.
    pub report: PipelineReport,
    /// Quantized weights by `(block index, layer name)`.
    pub weights: BTreeMap<(usize, String), QuantizedWeight>,
    /// Layers solved onto a GGUF block type by `(block index, layer name)`
    /// (a run with [`PipelineConfig::with_gguf_type`](crate::PipelineConfig::with_gguf_type)).
    pub gguf: BTreeMap<(usize, String), GgufSolution>,
}
