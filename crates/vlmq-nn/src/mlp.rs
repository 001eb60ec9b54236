//! Feed-forward blocks: plain `down(act(up(x)))` and gated (SwiGLU-style)
//! `down(act(gate(x)) * up(x))`.

use ndarray::{Array2, ArrayView2, ArrayViewD, ArrayViewMutD};

use super::activation::{Activation, ActivationCache};
use super::linear::{Linear, LinearCache};
use super::params::{join, reborrow, Grads, Module};
use super::Rng;
use vlmq::backend::RowSink;
use vlmq::error::Result;

/// A feed-forward block. Its linears are called `mlp.gate` (gated only),
/// `mlp.up` and `mlp.down`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection `[hidden, d]`; present for a gated MLP.
    pub gate: Option<Linear>,
    /// Up projection `[hidden, d]`.
    pub up: Linear,
    /// Down projection `[d, hidden]`.
    pub down: Linear,
    /// The activation (applied to the gate when gated, to `up` otherwise).
    pub act: Activation,
}

/// Everything [`Mlp::backward`] needs.
#[derive(Debug, Clone)]
pub struct MlpCache {
    input: LinearCache,
    act: ActivationCache,
    act_out: Option<Array2<f32>>,
    up_out: Option<Array2<f32>>,
    down: LinearCache,
}

/// What computing the hidden activations leaves for the backward pass.
struct HiddenParts {
    input: LinearCache,
    act: ActivationCache,
    act_out: Option<Array2<f32>>,
    up_out: Option<Array2<f32>>,
}

impl Mlp {
    /// A randomly initialized MLP (`gated` selects the SwiGLU form).
    pub fn init(
        rng: &mut Rng,
        d: usize,
        hidden: usize,
        gated: bool,
        act: Activation,
        bias: bool,
    ) -> Self {
        Mlp {
            gate: gated.then(|| Linear::init(rng, d, hidden, bias)),
            up: Linear::init(rng, d, hidden, bias),
            down: Linear::init(rng, hidden, d, bias),
            act,
        }
    }

    /// The linear called `name` (`"gate"`, `"up"` or `"down"`).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        match name {
            "gate" => self.gate.as_ref(),
            "up" => Some(&self.up),
            "down" => Some(&self.down),
            _ => None,
        }
    }

    /// Mutable access to the linear called `name`.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        match name {
            "gate" => self.gate.as_mut(),
            "up" => Some(&mut self.up),
            "down" => Some(&mut self.down),
            _ => None,
        }
    }

    /// Forward pass over `x: [tokens, d]`; `sink` sees the inputs of its linears.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        mut sink: Option<&mut dyn RowSink>,
    ) -> Result<(Array2<f32>, MlpCache)> {
        let (h, parts) = self.hidden_parts(x, reborrow(&mut sink))?;
        if let Some(s) = sink {
            s.rows("mlp.down", h.view());
        }
        let (y, down) = self.down.forward(h.view())?;
        let HiddenParts {
            input,
            act,
            act_out,
            up_out,
        } = parts;
        Ok((
            y,
            MlpCache {
                input,
                act,
                act_out,
                up_out,
                down,
            },
        ))
    }

    /// The hidden activations (the input of `mlp.down`) over `x`, exactly
    /// as [`forward`](Self::forward) computes them; `sink` sees the inputs
    /// of `mlp.gate` and `mlp.up`.
    pub fn hidden(
        &self,
        x: ArrayView2<'_, f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        Ok(self.hidden_parts(x, sink)?.0)
    }

    /// Applies `mlp.down` to hidden activations.
    pub fn project_down(&self, h: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.down.apply(h)
    }

    /// The hidden activations and what the backward pass needs of them.
    fn hidden_parts(
        &self,
        x: ArrayView2<'_, f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<(Array2<f32>, HiddenParts)> {
        if let Some(s) = sink {
            if self.gate.is_some() {
                s.rows("mlp.gate", x);
            }
            s.rows("mlp.up", x);
        }
        let (up, input) = self.up.forward(x)?;
        let (h, act, act_out, up_out) = match &self.gate {
            Some(gate) => {
                let g = gate.apply(x)?;
                let (a, act) = self.act.forward(g.view());
                (&a * &up, act, Some(a), Some(up))
            }
            None => {
                let (a, act) = self.act.forward(up.view());
                (a, act, None, None)
            }
        };
        Ok((
            h,
            HiddenParts {
                input,
                act,
                act_out,
                up_out,
            },
        ))
    }

    /// Backward pass: returns `dL/dx`; `sink` sees the gradients at the
    /// outputs of `mlp.down`, then `mlp.gate` and `mlp.up`. Parameter
    /// gradients go under `prefix + "mlp.{gate,up,down}."`.
    pub fn backward(
        &self,
        cache: &MlpCache,
        g: ArrayView2<'_, f32>,
        mut grads: Option<&mut Grads>,
        prefix: &str,
        mut sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        if let Some(s) = sink.as_deref_mut() {
            s.rows("mlp.down", g);
        }
        let dh = self.down.backward(
            &cache.down,
            g,
            grads.as_deref_mut(),
            &join(prefix, "mlp.down."),
        )?;
        match (&self.gate, &cache.act_out, &cache.up_out) {
            (Some(gate), Some(a), Some(up)) => {
                let dgate = self.act.backward(&cache.act, (&dh * up).view())?;
                let dup = &dh * a;
                if let Some(s) = sink {
                    s.rows("mlp.gate", dgate.view());
                    s.rows("mlp.up", dup.view());
                }
                let mut dx = gate.backward(
                    &cache.input,
                    dgate.view(),
                    grads.as_deref_mut(),
                    &join(prefix, "mlp.gate."),
                )?;
                dx +=
                    &self
                        .up
                        .backward(&cache.input, dup.view(), grads, &join(prefix, "mlp.up."))?;
                Ok(dx)
            }
            _ => {
                let dup = self.act.backward(&cache.act, dh.view())?;
                if let Some(s) = sink {
                    s.rows("mlp.up", dup.view());
                }
                self.up
                    .backward(&cache.input, dup.view(), grads, &join(prefix, "mlp.up."))
            }
        }
    }
}

impl Module for Mlp {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        if let Some(g) = &self.gate {
            g.visit_params(&join(prefix, "mlp.gate."), f);
        }
        self.up.visit_params(&join(prefix, "mlp.up."), f);
        self.down.visit_params(&join(prefix, "mlp.down."), f);
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        if let Some(g) = &mut self.gate {
            g.visit_params_mut(&join(prefix, "mlp.gate."), f);
        }
        self.up.visit_params_mut(&join(prefix, "mlp.up."), f);
        self.down.visit_params_mut(&join(prefix, "mlp.down."), f);
    }
}
