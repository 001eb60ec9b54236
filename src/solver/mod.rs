//! GPTQ-family solvers sharing one blocked column kernel.
//!
//! [`solve_layer`] quantizes one linear layer from its weight and the
//! [`LayerStatistics`](crate::hessian::LayerStatistics) of its calibration
//! inputs. The [`Method`] is data: plain GPTQ, or GPTAQ's asymmetric
//! correction; VLMQ is GPTQ (or GPTAQ) on importance-weighted statistics, so
//! it needs no code path of its own.

mod factor;
mod gguf;
mod gptaq;
mod kernel;
mod objective;
#[cfg(test)]
mod owned_tests;
mod plan;
mod report;
mod solve;
mod walk;

pub use factor::{inverse_factor_f64, solve_layer_with_factor};
pub use gguf::{solve_layer_gguf, GgufSolution};
pub use objective::{asymmetric_objective, hessian_objective};
pub use plan::{act_order_permutation, group_aware_permutation};
pub use report::{LayerSolution, SolveReport};
pub use solve::solve_layer_owned;
pub use solve::{solve_layer, Method};
