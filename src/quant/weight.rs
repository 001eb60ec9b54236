//! The quantized form of one linear layer's weight.

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::config::{Bits, GroupSize};
use crate::error::{Error, Result};

/// A quantized weight `W[o, i] = scales[g_idx[i], o] * (codes[o, i] - zeros[g_idx[i], o])`.
///
/// Shapes: `codes` is `[out, in]` in natural column order, `scales` and
/// `zeros` are `[groups, out]`, `g_idx` has one group index per input column
/// (non-trivial under act-order). The weight also carries its group size
/// (the number of groups is `ceil(in / g)`; the last group may be shorter)
/// and whether its groups were fitted statically, so a checkpoint writer
/// does not have to guess them. The fields are checked against each other
/// on construction, so every `QuantizedWeight` can be dequantized and packed.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    bits: Bits,
    symmetric: bool,
    group_size: GroupSize,
    static_groups: bool,
    codes: Array2<u8>,
    scales: Array2<f32>,
    zeros: Array2<u8>,
    g_idx: Vec<u32>,
}

impl QuantizedWeight {
    /// Checks shapes, code and zero ranges, scales and `g_idx`, and builds the
    /// weight, inferring the group size: per channel for one group, else the
    /// number of inputs in group 0, which must imply `groups = ceil(in / g)`
    /// (use [`QuantizedWeight::grouped`] to state it instead).
    pub fn new(
        bits: Bits,
        symmetric: bool,
        codes: Array2<u8>,
        scales: Array2<f32>,
        zeros: Array2<u8>,
        g_idx: Vec<u32>,
    ) -> Result<Self> {
        // The group size is inferred from g_idx: an index out of range must
        // be named as such, not as a group-size mismatch.
        check_g_idx(&g_idx, scales.nrows())?;
        let group_size = if scales.nrows() <= 1 {
            GroupSize::PerChannel
        } else {
            GroupSize::new(g_idx.iter().filter(|&&g| g == 0).count())?
        };
        Self::grouped(bits, symmetric, group_size, codes, scales, zeros, g_idx)
    }

    /// Like [`QuantizedWeight::new`] with the group size given: the number of
    /// groups must be `group_size.groups_for(in)`.
    pub fn grouped(
        bits: Bits,
        symmetric: bool,
        group_size: GroupSize,
        codes: Array2<u8>,
        scales: Array2<f32>,
        zeros: Array2<u8>,
        g_idx: Vec<u32>,
    ) -> Result<Self> {
        let (out, inp) = codes.dim();
        let groups = scales.nrows();
        if inp > 0 && group_size.groups_for(inp)? != groups {
            return Err(Error::InvalidGroupSize {
                group_size: group_size.get().unwrap_or(inp),
                in_features: inp,
                reason:
                    "the number of groups (rows of scales) is not ceil(in_features / group_size)",
            });
        }
        if scales.ncols() != out {
            return Err(Error::shape(
                "scales [groups, out]",
                &[groups, out],
                scales.shape(),
            ));
        }
        if zeros.dim() != (groups, out) {
            return Err(Error::shape(
                "zeros [groups, out]",
                &[groups, out],
                zeros.shape(),
            ));
        }
        if g_idx.len() != inp {
            return Err(Error::shape("g_idx [in]", &[inp], &[g_idx.len()]));
        }
        if groups == 0 && inp > 0 {
            return Err(Error::Empty {
                what: "quantization groups".into(),
            });
        }
        let max_code = bits.max_code() as u8;
        if let Some(((o, i), _)) = codes.indexed_iter().find(|(_, &c)| c > max_code) {
            return Err(Error::InvalidConfig {
                field: "codes",
                value: format!("{} at [{o}, {i}]", codes[[o, i]]),
                reason: "code exceeds 2^bits - 1",
            });
        }
        if let Some(((g, o), _)) = zeros.indexed_iter().find(|(_, &z)| z > max_code) {
            return Err(Error::InvalidConfig {
                field: "zeros",
                value: format!("{} at [{g}, {o}]", zeros[[g, o]]),
                reason: "zero point exceeds 2^bits - 1",
            });
        }
        if let Some(((g, o), _)) = scales.indexed_iter().find(|(_, s)| !s.is_finite()) {
            return Err(Error::NonFinite {
                what: "scales".into(),
                index: vec![g, o],
            });
        }
        if let Some(((g, o), s)) = scales.indexed_iter().find(|(_, &s)| s <= 0.0) {
            return Err(Error::InvalidConfig {
                field: "scales",
                value: format!("{s} at [{g}, {o}]"),
                reason: "a scale must be positive",
            });
        }
        check_g_idx(&g_idx, groups)?;
        Ok(QuantizedWeight {
            bits,
            symmetric,
            group_size,
            static_groups: false,
            codes,
            scales,
            zeros,
            g_idx,
        })
    }

    /// Bit width.
    pub fn bits(&self) -> Bits {
        self.bits
    }

    /// Whether the grid was symmetric.
    pub fn symmetric(&self) -> bool {
        self.symmetric
    }

    /// The group size (per channel when there is one group over all inputs).
    pub fn group_size(&self) -> GroupSize {
        self.group_size
    }

    /// Whether the groups were fitted on the original weight before the
    /// solve (GPTQ's `static_groups`); metadata for checkpoint writers.
    pub fn static_groups(&self) -> bool {
        self.static_groups
    }

    /// Records whether the groups were fitted statically.
    pub fn with_static_groups(mut self, static_groups: bool) -> Self {
        self.static_groups = static_groups;
        self
    }

    /// The same weight with every scale rounded to the nearest f16 value (as
    /// the reference does when it packs), so it can be written to a
    /// checkpoint. Codes and zero points are kept; a scale that rounds to 0
    /// becomes the smallest positive f16 value. Fails with
    /// [`Error::Unencodable`] when a scale exceeds f16's range.
    pub fn with_f16_scales(mut self) -> Result<Self> {
        let min = half::f16::from_bits(1).to_f32();
        if let Some(((g, o), s)) = self
            .scales
            .indexed_iter()
            .find(|(_, &s)| half::f16::from_f32(s).is_infinite())
        {
            return Err(Error::Unencodable {
                what: format!("scale {s} at [{g}, {o}]"),
                reason: "it exceeds the largest f16 value".into(),
            });
        }
        self.scales
            .mapv_inplace(|s| half::f16::from_f32(s).to_f32().max(min));
        Ok(self)
    }

    /// Output features (rows of W).
    pub fn out_features(&self) -> usize {
        self.codes.nrows()
    }

    /// Input features (columns of W).
    pub fn in_features(&self) -> usize {
        self.codes.ncols()
    }

    /// Number of quantization groups.
    pub fn groups(&self) -> usize {
        self.scales.nrows()
    }

    /// Integer codes `[out, in]`.
    pub fn codes(&self) -> ArrayView2<'_, u8> {
        self.codes.view()
    }

    /// Scales `[groups, out]`.
    pub fn scales(&self) -> ArrayView2<'_, f32> {
        self.scales.view()
    }

    /// Zero points `[groups, out]`.
    pub fn zeros(&self) -> ArrayView2<'_, u8> {
        self.zeros.view()
    }

    /// Group of each input column.
    pub fn g_idx(&self) -> ArrayView1<'_, u32> {
        ArrayView1::from(&self.g_idx[..])
    }

    /// Columns per (full) group if columns are assigned to groups in order
    /// (`g_idx[i] = i / g`, the last group possibly shorter), else `None`
    /// (act-order).
    pub fn contiguous_group_size(&self) -> Option<usize> {
        let n = self.in_features();
        let g = self.group_size.columns_for(n).ok()?;
        self.g_idx
            .iter()
            .enumerate()
            .all(|(i, &gi)| gi as usize == i / g)
            .then_some(g)
    }

    /// The dense weight `[out, in]` these codes stand for.
    pub fn dequantize(&self) -> Array2<f32> {
        let (out, inp) = self.codes.dim();
        let mut w = Array2::<f32>::zeros((out, inp));
        for ((o, i), v) in w.indexed_iter_mut() {
            let g = self.g_idx[i] as usize;
            let code = f32::from(self.codes[[o, i]]);
            *v = self.scales[[g, o]] * (code - f32::from(self.zeros[[g, o]]));
        }
        w
    }
}

/// Every group index must name one of the `groups` rows of the scales.
fn check_g_idx(g_idx: &[u32], groups: usize) -> Result<()> {
    match g_idx.iter().position(|&g| g as usize >= groups) {
        Some(i) => Err(Error::InvalidConfig {
            field: "g_idx",
            value: format!("{} at input {i} (scales have {groups} groups)", g_idx[i]),
            reason: "group index out of range",
        }),
        None => Ok(()),
    }
}
