//! A reference transformer backend on ndarray: forward and backward passes
//! (vector-Jacobian products) for every op a small vision-language model
//! needs, Adam(W) training, safetensors parameter io, and a model type that
//! implements [`QuantizableModel`](vlmq::QuantizableModel).
//!
//! Conventions shared by every op:
//!
//! - One sample at a time: activations are `Array2<f32>` of shape
//!   `[tokens, features]`; a linear computes `y = x W^T + b` with `W` of
//!   shape `[out, in]`.
//! - `forward` returns the output and a cache; `backward` consumes the cache
//!   and the output gradient, returns the input gradient and (when given a
//!   [`Grads`] store) accumulates parameter gradients under the parameter's
//!   full name (`prefix + local name`). Dropping a cache frees its memory.
//! - Every matrix product goes through the core's own product (the one
//!   `vlmq`'s `PackedLinear` uses), so results
//!   are bit-identical whatever the rayon thread count.
//! - Bad input to a public function returns a typed [`Error`](vlmq::Error).

mod activation;
mod adam;
mod attention;
mod block;
mod embedding;
mod fastexp;
mod head;
mod init;
mod io;
mod linear;
mod mlp;
mod model;
mod norm;
mod packed_kernel;
mod params;
mod rope;
mod sample;
mod stages;

pub use activation::{Activation, ActivationCache};
pub use adam::Adam;
pub use attention::{Attention, AttentionCache, AttentionConfig};
pub use block::{BlockCache, BlockConfig, TransformerBlock};
pub use embedding::{Embedding, PatchEmbedding};
pub use head::{cross_entropy, LmHead};
pub use init::Rng;
pub use io::{
    load_safetensors, load_safetensors_bytes, save_safetensors, save_safetensors_bytes, StoreDtype,
};
pub use linear::{Linear, LinearCache, LinearKernel, LinearWeight};
pub use mlp::{Mlp, MlpCache};
pub use model::{Block, Projector, SequenceModel};
pub use norm::{LayerNorm, Norm, NormCache, NormKind, RmsNorm};
pub use params::{Grads, Module};
pub use rope::Rope;
pub use sample::{Sample, Vision};
