//! Running the reference backend's linears straight from packed codes.

use ndarray::{Array2, ArrayView2};

use crate::LinearKernel;
use vlmq::error::Result;
use vlmq::pack::PackedLinear;

/// A [`PackedLinear`] (built without its bias: the backend's `Linear` adds
/// the bias) serves as the weight of an [`Linear`](crate::Linear):
/// `block.set_linear_kernel(name, Arc::new(packed))`.
impl LinearKernel for PackedLinear {
    fn in_features(&self) -> usize {
        PackedLinear::in_features(self)
    }

    fn out_features(&self) -> usize {
        PackedLinear::out_features(self)
    }

    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        PackedLinear::forward(self, x)
    }

    fn dense_weight(&self) -> Result<Array2<f32>> {
        Ok(self.to_quantized_weight()?.dequantize())
    }
}
