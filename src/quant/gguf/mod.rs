//! llama.cpp's GGUF block formats as quantization grids: which value each
//! code of a block decodes to (bit for bit as candle and llama.cpp decode
//! it), how a row's blocks are fitted, and their byte layout.
//!
//! Every format quantizes a row in blocks along the input dimension. The
//! column walk sees a block (or a K-quant sub-block) as one group whose grid
//! is a [`BlockGrid`]; the K-quants fit the scales of all sub-blocks of a
//! 256-column super-block together, since those scales are themselves
//! quantized against one f16 super-block scale.

mod candidates;
mod fit;
mod format;
mod grid;
mod pack;
mod rank;
mod search;
#[cfg(test)]
mod test_values;

pub use format::GgufType;
pub use grid::BlockGrid;
pub use pack::{decode_rows, encode_rows};

pub(crate) use fit::BlockFit;
