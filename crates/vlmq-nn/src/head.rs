//! Language-model head (a linear map to vocabulary logits) and cross-entropy.

use ndarray::{Array2, ArrayView2, ArrayViewD, ArrayViewMutD, Axis};

use super::linear::Linear;
use super::params::{join, Grads, Module};
use super::Rng;
use vlmq::error::{Error, Result};

/// Mean cross-entropy of `logits: [n, vocab]` against `targets` (one id per
/// row), and its gradient with respect to the logits.
pub fn cross_entropy(logits: ArrayView2<'_, f32>, targets: &[usize]) -> Result<(f32, Array2<f32>)> {
    let (n, v) = logits.dim();
    if targets.len() != n {
        return Err(Error::shape(
            "cross-entropy targets",
            &[n],
            &[targets.len()],
        ));
    }
    if n == 0 {
        return Err(Error::Empty {
            what: "cross-entropy targets".into(),
        });
    }
    if let Some(p) = targets.iter().position(|&t| t >= v) {
        return Err(Error::InvalidConfig {
            field: "target id",
            value: format!("{} at row {p}", targets[p]),
            reason: "target ids must be below the vocabulary size",
        });
    }
    let mut grad = logits.to_owned();
    let mut loss = 0.0f64;
    for (i, (mut row, &t)) in grad.axis_iter_mut(Axis(0)).zip(targets).enumerate() {
        let max = row.fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        row.mapv_inplace(|x| (x - max).exp());
        let sum = row.sum();
        loss += (sum.ln() + max - logits[[i, t]]) as f64;
        row.mapv_inplace(|e| e / sum / n as f32);
        row[t] -= 1.0 / n as f32;
    }
    Ok(((loss / n as f64) as f32, grad))
}

/// LM head: `logits = x W^T` with `W: [vocab, d]`; parameter `proj.weight`.
#[derive(Debug, Clone)]
pub struct LmHead {
    /// The output projection.
    pub proj: Linear,
}

impl LmHead {
    /// A randomly initialized head.
    pub fn init(rng: &mut Rng, d: usize, vocab: usize) -> Self {
        LmHead {
            proj: Linear::init(rng, d, vocab, false),
        }
    }

    /// Logits of every row of `x: [tokens, d]`.
    pub fn logits(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.proj.apply(x)
    }

    /// Mean cross-entropy over `targets` (`(position, token id)` pairs) and
    /// its gradient with respect to `x: [tokens, d]`; parameter gradients go
    /// under `prefix + "proj."` when `grads` is given.
    pub fn loss_and_grad(
        &self,
        x: ArrayView2<'_, f32>,
        targets: &[(usize, usize)],
        grads: Option<&mut Grads>,
        prefix: &str,
    ) -> Result<(f32, Array2<f32>)> {
        let t = x.nrows();
        if let Some(&(p, _)) = targets.iter().find(|(p, _)| *p >= t) {
            return Err(Error::shape("target position", &[t], &[p]));
        }
        let positions: Vec<usize> = targets.iter().map(|&(p, _)| p).collect();
        let ids: Vec<usize> = targets.iter().map(|&(_, id)| id).collect();
        let rows = x.select(Axis(0), &positions);
        let (logits, cache) = self.proj.forward(rows.view())?;
        let (loss, dlogits) = cross_entropy(logits.view(), &ids)?;
        let drows = self
            .proj
            .backward(&cache, dlogits.view(), grads, &join(prefix, "proj."))?;
        let mut dx = Array2::<f32>::zeros(x.dim());
        for (row, &p) in drows.rows().into_iter().zip(&positions) {
            let mut acc = dx.row_mut(p);
            acc += &row;
        }
        Ok((loss, dx))
    }
}

impl Module for LmHead {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        self.proj.visit_params(&join(prefix, "proj."), f);
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        self.proj.visit_params_mut(&join(prefix, "proj."), f);
    }
}
