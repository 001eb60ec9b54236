//! Named parameters: visiting a module's tensors by name, and a gradient store.

use std::collections::BTreeMap;

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Dimension};

/// Something with named trainable parameters.
///
/// Names are `prefix + local name` (e.g. `"blocks.0.attn.q.weight"`); the
/// same names are used by [`Grads`], [`Adam`](super::Adam) and the
/// safetensors io. Parameters held in a non-dense form (a packed
/// [`LinearKernel`](super::LinearKernel)) are not visited.
pub trait Module {
    /// Calls `f(name, tensor)` for every parameter, in a fixed order.
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>));
    /// Calls `f(name, tensor)` for every parameter, mutably, in the same order.
    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>));

    /// Total number of scalar parameters.
    fn num_params(&self) -> usize {
        let mut n = 0;
        self.visit_params("", &mut |_, t| n += t.len());
        n
    }
}

/// Parameter gradients accumulated by name.
#[derive(Debug, Clone, Default)]
pub struct Grads {
    map: BTreeMap<String, ArrayD<f32>>,
}

impl Grads {
    /// An empty store.
    pub fn new() -> Self {
        Grads::default()
    }

    /// Adds `g` to the gradient of `name` (creating it at zero first).
    ///
    /// # Panics
    /// When an existing gradient of that name has a different shape (an
    /// internal invariant: every op accumulates the shape of its parameter).
    pub fn accumulate<D: Dimension>(&mut self, name: &str, g: ndarray::ArrayView<'_, f32, D>) {
        let g = g.into_dyn();
        match self.map.get_mut(name) {
            Some(acc) => {
                assert_eq!(acc.shape(), g.shape(), "gradient shape for {name}");
                *acc += &g;
            }
            None => {
                self.map.insert(name.to_string(), g.to_owned());
            }
        }
    }

    /// The gradient of `name`, if any was accumulated.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.map.get(name)
    }

    /// All gradients, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<f32>)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Scales every gradient by `s` (e.g. `1 / batch`).
    pub fn scale(&mut self, s: f32) {
        for v in self.map.values_mut() {
            v.mapv_inplace(|x| x * s);
        }
    }

    /// Removes every gradient.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Whether no gradient was accumulated.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// `prefix + name`.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + name.len());
    s.push_str(prefix);
    s.push_str(name);
    s
}

/// Reborrows an optional sink for a nested call, keeping the original usable.
pub(crate) fn reborrow<'a>(
    sink: &'a mut Option<&mut dyn vlmq::backend::RowSink>,
) -> Option<&'a mut dyn vlmq::backend::RowSink> {
    match sink {
        Some(s) => Some(&mut **s),
        None => None,
    }
}
