//! GPTQ-compatible packed weights: bit packing (2, 3, 4, 8 bits),
//! safetensors checkpoints in the Python ecosystem's layout (formats v1
//! `gptq` and v2 `gptq_v2`), and a linear layer that multiplies straight from
//! the packed codes. The byte-level layout is specified in `docs/FORMAT.md`.
//!
//! ```
//! use vlmq::pack::{Checkpoint, CheckpointWriter, PackedLinear};
//! # use vlmq::{Bits, QuantizedWeight};
//! # use ndarray::{Array1, Array2};
//! # let dir = std::env::temp_dir().join(format!("vlmq-doc-{}", std::process::id()));
//! let w = QuantizedWeight::new(
//!     Bits::new(4)?, false,
//!     Array2::from_shape_fn((32, 64), |(o, i)| ((o + i) % 16) as u8),
//!     Array2::from_elem((2, 32), 0.5), Array2::from_elem((2, 32), 3),
//!     (0..64).map(|i| i / 32).collect(),
//! )?;
//! let mut writer = CheckpointWriter::new();
//! writer.add_layer("proj", w.clone(), None)?;
//! writer.write(&dir)?;
//! let ck = Checkpoint::open(&dir)?;
//! assert_eq!(ck.layer("proj")?, w);
//! let y = PackedLinear::new(&w, None)?.gemv(Array1::ones(64).view())?;
//! assert_eq!(y.len(), 32);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), vlmq::Error>(())
//! ```

pub(crate) mod bits;
mod checkpoint_read;
mod checkpoint_write;
mod config_json;
mod digests;
mod file_tensor;
mod layer_encode;
mod packed_linear;
mod stream_write;
#[cfg(test)]
mod stream_write_tests;
mod tensor;
#[cfg(test)]
mod write_atomic_tests;

pub use checkpoint_read::{Checkpoint, RawTensor};
pub use checkpoint_write::CheckpointWriter;
pub use config_json::{CheckpointFormat, QuantizeConfig};
pub use digests::TENSOR_DIGESTS_KEY;
pub use file_tensor::FileTensor;
pub use packed_linear::PackedLinear;
pub use tensor::DenseTensor;
