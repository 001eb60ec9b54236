//! Adam with decoupled weight decay (AdamW) over a module's named parameters.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Zip};

use super::params::{Grads, Module};

/// AdamW: `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
/// `p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)`.
#[derive(Debug, Clone)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator floor.
    pub eps: f32,
    /// Decoupled weight decay (0 for plain Adam).
    pub weight_decay: f32,
    steps: i32,
    moments: BTreeMap<String, (ArrayD<f32>, ArrayD<f32>)>,
}

impl Adam {
    /// Adam with the usual defaults (`0.9, 0.999, 1e-8`) and no weight decay.
    pub fn new(lr: f32) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            steps: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Sets the decoupled weight decay.
    pub fn with_weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }

    /// Number of steps taken.
    pub fn steps(&self) -> i32 {
        self.steps
    }

    /// One update of every parameter of `module` that has a gradient in `grads`.
    pub fn step(&mut self, module: &mut dyn Module, grads: &Grads) {
        self.steps += 1;
        let (b1, b2, eps, lr, wd) = (self.beta1, self.beta2, self.eps, self.lr, self.weight_decay);
        let c1 = 1.0 - b1.powi(self.steps);
        let c2 = 1.0 - b2.powi(self.steps);
        let moments = &mut self.moments;
        module.visit_params_mut("", &mut |name, mut p| {
            let Some(g) = grads.get(name) else { return };
            if g.shape() != p.shape() {
                return;
            }
            let (m, v) = moments
                .entry(name.to_string())
                .or_insert_with(|| (ArrayD::zeros(p.raw_dim()), ArrayD::zeros(p.raw_dim())));
            Zip::from(&mut p)
                .and(m)
                .and(v)
                .and(g)
                .for_each(|p, m, v, &g| {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let update = (*m / c1) / ((*v / c2).sqrt() + eps);
                    *p -= lr * (update + wd * *p);
                });
        });
    }
}
