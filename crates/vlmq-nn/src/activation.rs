//! Elementwise activations: GELU (tanh approximation) and SiLU.

use ndarray::{Array2, ArrayView2, Zip};

use vlmq::error::{Error, Result};

/// An elementwise activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    Gelu,
    /// `x sigmoid(x)`.
    Silu,
}

/// What an activation's backward needs: its input.
#[derive(Debug, Clone)]
pub struct ActivationCache {
    input: Array2<f32>,
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_A: f32 = 0.044_715;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Activation {
    /// The activation of one value.
    pub fn value(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => 0.5 * x * (1.0 + (GELU_C * (x + GELU_A * x * x * x)).tanh()),
            Activation::Silu => x * sigmoid(x),
        }
    }

    /// The derivative at one value.
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => {
                let t = (GELU_C * (x + GELU_A * x * x * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
        }
    }

    /// Applies the activation without a cache.
    pub fn apply(self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        x.mapv(|v| self.value(v))
    }

    /// Forward pass: output and cache.
    pub fn forward(self, x: ArrayView2<'_, f32>) -> (Array2<f32>, ActivationCache) {
        (
            self.apply(x),
            ActivationCache {
                input: x.to_owned(),
            },
        )
    }

    /// Backward pass: `dL/dx = g * f'(x)`.
    pub fn backward(self, cache: &ActivationCache, g: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        if g.dim() != cache.input.dim() {
            return Err(Error::shape(
                "activation output gradient",
                cache.input.shape(),
                g.shape(),
            ));
        }
        let mut dx = g.to_owned();
        Zip::from(&mut dx)
            .and(&cache.input)
            .for_each(|d, &x| *d *= self.derivative(x));
        Ok(dx)
    }
}
