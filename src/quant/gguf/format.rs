//! The GGUF block types vlmq writes and their sizes.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A GGUF (ggml) block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufType {
    /// Blocks of 32: f16 scale `d`, 32 signed bytes; `d * q`.
    Q8_0,
    /// Blocks of 32: f16 scale `d`, 4-bit codes; `d * (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d` and minimum `m`, 4-bit codes; `d * q + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 5-bit codes; `d * (q - 16)`.
    Q5_0,
    /// Super-blocks of 256: f16 `d` and `dmin`, eight sub-blocks of 32 with
    /// 6-bit scale `sc` and minimum `m`, 4-bit codes; `d sc q - dmin m`.
    Q4K,
    /// Super-blocks of 256: f16 `d`, sixteen sub-blocks of 16 with an 8-bit
    /// signed scale `sc`, 6-bit codes; `d sc (q - 32)`.
    Q6K,
}

impl GgufType {
    /// Every type, in ggml's numbering order.
    pub const ALL: [GgufType; 6] = [
        GgufType::Q4_0,
        GgufType::Q4_1,
        GgufType::Q5_0,
        GgufType::Q8_0,
        GgufType::Q4K,
        GgufType::Q6K,
    ];

    /// ggml's type id, as written in a GGUF tensor header.
    pub fn ggml_id(self) -> u32 {
        match self {
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q5_0 => 6,
            GgufType::Q8_0 => 8,
            GgufType::Q4K => 12,
            GgufType::Q6K => 14,
        }
    }

    /// llama.cpp's lower-case name (`q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4_1 => "q4_1",
            GgufType::Q5_0 => "q5_0",
            GgufType::Q4K => "q4_k",
            GgufType::Q6K => "q6_k",
        }
    }

    /// Columns per (super-)block: the unit packed together and, for the
    /// K-quants, fitted together.
    pub fn block_cols(self) -> usize {
        match self {
            GgufType::Q4K | GgufType::Q6K => 256,
            _ => 32,
        }
    }

    /// Columns sharing one scale (a block, or a K-quant sub-block).
    pub fn group_cols(self) -> usize {
        match self {
            GgufType::Q4K => 32,
            GgufType::Q6K => 16,
            _ => 32,
        }
    }

    /// Bytes of one packed (super-)block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgufType::Q8_0 => 34,
            GgufType::Q4_0 => 18,
            GgufType::Q4_1 => 20,
            GgufType::Q5_0 => 22,
            GgufType::Q4K => 144,
            GgufType::Q6K => 210,
        }
    }

    /// The largest code.
    pub fn max_code(self) -> u32 {
        match self {
            GgufType::Q8_0 => 255,
            GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q4K => 15,
            GgufType::Q5_0 => 31,
            GgufType::Q6K => 63,
        }
    }

    /// The code that stands for 0 in the symmetric formats (`None` for the
    /// formats with a minimum).
    pub(crate) fn zero_code(self) -> Option<u8> {
        match self {
            GgufType::Q8_0 => Some(128),
            GgufType::Q4_0 => Some(8),
            GgufType::Q5_0 => Some(16),
            GgufType::Q6K => Some(32),
            GgufType::Q4_1 | GgufType::Q4K => None,
        }
    }

    /// Nominal bits per weight of the codes (8, 4, 5 or 6), without the
    /// block headers.
    pub fn code_bits(self) -> u8 {
        (self.max_code() + 1).trailing_zeros() as u8
    }

    /// The type llama.cpp's quantizer gives a tensor of `cols` input
    /// columns when `self` is asked for: K-quants need rows of whole
    /// 256-column super-blocks, so narrower or ragged rows fall back to a
    /// 32-column type (Q4_K to Q5_0, Q6_K to Q8_0), as llama.cpp does.
    pub fn for_cols(self, cols: usize) -> GgufType {
        match self {
            GgufType::Q4K if !cols.is_multiple_of(256) => GgufType::Q5_0,
            GgufType::Q6K if !cols.is_multiple_of(256) => GgufType::Q8_0,
            t => t,
        }
    }

    /// Bytes of a row of `cols` columns.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_cols() * self.block_bytes()
    }

    /// Checks that rows of `cols` columns split into whole blocks.
    pub fn check_cols(self, what: &str, cols: usize) -> Result<()> {
        if cols == 0 || !cols.is_multiple_of(self.block_cols()) {
            return Err(Error::Unsupported {
                what: format!("{what}: {cols} input columns as GGUF {self}"),
                remedy: format!(
                    "{self} needs a positive multiple of {} columns; pick a 32-column type (q4_0, q4_1, q5_0, q8_0) for this tensor",
                    self.block_cols()
                ),
            });
        }
        Ok(())
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GgufType {
    type Err = Error;

    /// Parses llama.cpp's names, any case (`q4_k`, `Q6_K`, `q8_0`).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        GgufType::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| Error::InvalidConfig {
                field: "gguf type",
                value: s.to_string(),
                reason: "expected one of q8_0, q4_0, q4_1, q5_0, q4_k, q6_k",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in GgufType::ALL {
            assert_eq!(t.name().parse::<GgufType>().unwrap(), t);
            assert_eq!(t.name().to_uppercase().parse::<GgufType>().unwrap(), t);
        }
        assert!("q3_k".parse::<GgufType>().is_err());
    }

    #[test]
    fn ragged_rows_are_refused() {
        assert!(GgufType::Q4K.check_cols("w", 576).is_err());
        assert!(GgufType::Q4_0.check_cols("w", 576).is_ok());
        assert!(GgufType::Q4_0.check_cols("w", 0).is_err());
    }
}
