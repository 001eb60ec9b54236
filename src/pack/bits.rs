//! Packing integer codes into 32-bit words, GPTQ style.
//!
//! Every bit width uses one little-endian bit stream over consecutive words:
//! value `k` occupies stream bits `b*k .. b*k + b`, so value `j` of a word
//! sits at bits `[b*j, b*j + b)` for 2, 4 and 8 bits, and for 3 bits 32 values
//! fill three words in the `10|1|10|1|10` pattern (values 10 and 21 straddle a
//! word boundary). `qweight` runs this stream along the input dimension (one
//! stream per output column) and `qzeros` along the output dimension (one
//! stream per group).

use ndarray::{Array2, ArrayView2};

use crate::config::Bits;
use crate::error::{Error, Result};

/// Number of 32-bit words holding `len` values of `bits` bits, or `None`
/// when the values do not fill a whole number of words.
pub fn words_for(len: usize, bits: Bits) -> Option<usize> {
    let total = len.checked_mul(bits.get() as usize)?;
    (total % 32 == 0).then_some(total / 32)
}

/// Number of values held by `words` words of `bits` bits, or `None` when the
/// words do not hold a whole number of values.
pub fn values_for(words: usize, bits: Bits) -> Option<usize> {
    let total = words.checked_mul(32)?;
    let b = bits.get() as usize;
    (total % b == 0).then_some(total / b)
}

/// Reads value `k` of the bit stream in `words`.
///
/// The caller guarantees `b * (k + 1) <= 32 * words.len()`.
#[inline]
pub(crate) fn field(words: &[u32], bits: u32, k: usize) -> u32 {
    let pos = k * bits as usize;
    let w = pos / 32;
    let off = (pos % 32) as u32;
    let lo = u64::from(words[w]);
    let window = if off + bits > 32 {
        lo | (u64::from(words[w + 1]) << 32)
    } else {
        lo
    };
    ((window >> off) as u32) & ((1u32 << bits) - 1)
}

/// ORs value `v` (already masked to `bits` bits) into field `k` of `words`.
///
/// The caller guarantees `b * (k + 1) <= 32 * words.len()`.
#[inline]
pub(crate) fn put_field(words: &mut [u32], bits: u32, k: usize, v: u32) {
    let pos = k * bits as usize;
    let w = pos / 32;
    let off = (pos % 32) as u32;
    let shifted = u64::from(v) << off;
    words[w] |= shifted as u32;
    if off + bits > 32 {
        words[w + 1] |= (shifted >> 32) as u32;
    }
}

/// Packs `values` into a little-endian bit stream of `bits`-bit fields.
///
/// Fails with [`Error::Unencodable`] when a value does not fit in `bits` bits
/// or the values do not fill a whole number of words.
///
/// ```
/// # use vlmq::{Bits, __private::pack_stream};
/// let words = pack_stream(&[1, 2, 3, 4, 5, 6, 7, 8], Bits::new(4)?)?;
/// assert_eq!(words, vec![0x8765_4321]);
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn pack_stream(values: &[u8], bits: Bits) -> Result<Vec<u32>> {
    let b = bits.get();
    let n_words = words_for(values.len(), bits).ok_or_else(|| Error::Unencodable {
        what: format!("{} values of {b} bits", values.len()),
        reason: "the values must fill a whole number of 32-bit words".into(),
    })?;
    let max = bits.max_code();
    let mut words = vec![0u32; n_words];
    for (k, &v) in values.iter().enumerate() {
        let v = u32::from(v);
        if v > max {
            return Err(Error::Unencodable {
                what: format!("value {v} at position {k}"),
                reason: format!("does not fit in {b} bits"),
            });
        }
        put_field(&mut words, b, k, v);
    }
    Ok(words)
}

/// Unpacks every value of the bit stream in `words`.
///
/// Fails with [`Error::Unencodable`] when the words do not hold a whole
/// number of values (for 3 bits: the word count must be a multiple of 3).
pub fn unpack_stream(words: &[u32], bits: Bits) -> Result<Vec<u8>> {
    let b = bits.get();
    let n = values_for(words.len(), bits).ok_or_else(|| Error::Unencodable {
        what: format!("{} words of {b}-bit values", words.len()),
        reason: "the words do not hold a whole number of values".into(),
    })?;
    Ok((0..n).map(|k| field(words, b, k) as u8).collect())
}

/// Packs codes `[out, in]` into `qweight` `[in * b / 32, out]`, the stream of
/// each output column running down the rows.
pub fn pack_qweight(codes: ArrayView2<'_, u8>, bits: Bits) -> Result<Array2<i32>> {
    let (out, inp) = codes.dim();
    let rows = words_for(inp, bits).ok_or_else(|| Error::Unencodable {
        what: format!("qweight with {inp} input features at {} bits", bits.get()),
        reason: "input features * bits must be a multiple of 32".into(),
    })?;
    let mut q = Array2::<i32>::zeros((rows, out));
    let mut column = vec![0u8; inp];
    for o in 0..out {
        for (dst, &c) in column.iter_mut().zip(codes.row(o)) {
            *dst = c;
        }
        let words = pack_stream(&column, bits)?;
        for (r, w) in words.into_iter().enumerate() {
            q[[r, o]] = w as i32;
        }
    }
    Ok(q)
}

/// Unpacks `qweight` `[in * b / 32, out]` into codes `[out, in]`.
pub fn unpack_qweight(qweight: ArrayView2<'_, i32>, bits: Bits) -> Result<Array2<u8>> {
    let (rows, out) = qweight.dim();
    let inp = values_for(rows, bits).ok_or_else(|| Error::Unencodable {
        what: format!("qweight with {rows} rows at {} bits", bits.get()),
        reason: "rows * 32 must be a multiple of the bit width".into(),
    })?;
    let mut codes = Array2::<u8>::zeros((out, inp));
    let mut column = vec![0u32; rows];
    for o in 0..out {
        for (dst, &w) in column.iter_mut().zip(qweight.column(o)) {
            *dst = w as u32;
        }
        for (i, c) in codes.row_mut(o).iter_mut().enumerate() {
            *c = field(&column, bits.get(), i) as u8;
        }
    }
    Ok(codes)
}

/// Packs zero points `[groups, out]` into `qzeros` `[groups, out * b / 32]`
/// with the true zero values (format v2).
pub fn pack_qzeros(zeros: ArrayView2<'_, u8>, bits: Bits) -> Result<Array2<i32>> {
    let (groups, out) = zeros.dim();
    let cols = words_for(out, bits).ok_or_else(|| Error::Unencodable {
        what: format!("qzeros with {out} output features at {} bits", bits.get()),
        reason: "output features * bits must be a multiple of 32".into(),
    })?;
    let mut q = Array2::<i32>::zeros((groups, cols));
    for g in 0..groups {
        let row: Vec<u8> = zeros.row(g).to_vec();
        for (c, w) in pack_stream(&row, bits)?.into_iter().enumerate() {
            q[[g, c]] = w as i32;
        }
    }
    Ok(q)
}

/// Unpacks `qzeros` `[groups, out * b / 32]` holding true zero values
/// (format v2) into zero points `[groups, out]`.
pub fn unpack_qzeros(qzeros: ArrayView2<'_, i32>, bits: Bits) -> Result<Array2<u8>> {
    let (groups, cols) = qzeros.dim();
    let out = values_for(cols, bits).ok_or_else(|| Error::Unencodable {
        what: format!("qzeros with {cols} columns at {} bits", bits.get()),
        reason: "columns * 32 must be a multiple of the bit width".into(),
    })?;
    let mut zeros = Array2::<u8>::zeros((groups, out));
    for g in 0..groups {
        let words: Vec<u32> = qzeros.row(g).iter().map(|&w| w as u32).collect();
        for (o, z) in zeros.row_mut(g).iter_mut().enumerate() {
            *z = field(&words, bits.get(), o) as u8;
        }
    }
    Ok(zeros)
}

/// The constant the GPTQ v1 format subtracts from each whole packed `qzeros`
/// word: `sum_j 2^(b*j)` (`0x55555555`, `0x11111111`, `0x01010101` for 2, 4
/// and 8 bits). `None` for widths whose v1 offset is applied field by field
/// (3 bits) or that the format does not define.
pub fn v1_word_offset(bits: Bits) -> Option<u32> {
    match bits.get() {
        2 => Some(0x5555_5555),
        4 => Some(0x1111_1111),
        8 => Some(0x0101_0101),
        _ => None,
    }
}

/// Converts true-zero `qzeros` (v2) into the v1 encoding in place: word-wise
/// subtraction of `v1_word_offset` for 2, 4 and 8 bits, field-wise
/// `(zero - 1) mod 2^b` for 3 bits.
pub fn qzeros_v2_to_v1(qzeros: &mut Array2<i32>, bits: Bits) -> Result<()> {
    shift_qzeros(qzeros, bits, false)
}

/// Converts v1 `qzeros` into true zeros (v2) in place, the inverse of
/// [`qzeros_v2_to_v1`].
pub fn qzeros_v1_to_v2(qzeros: &mut Array2<i32>, bits: Bits) -> Result<()> {
    shift_qzeros(qzeros, bits, true)
}

fn shift_qzeros(qzeros: &mut Array2<i32>, bits: Bits, add: bool) -> Result<()> {
    if let Some(k) = v1_word_offset(bits) {
        for w in qzeros.iter_mut() {
            let u = *w as u32;
            *w = if add {
                u.wrapping_add(k)
            } else {
                u.wrapping_sub(k)
            } as i32;
        }
        return Ok(());
    }
    if bits.get() != 3 {
        return Err(Error::Unencodable {
            what: format!("{}-bit zero points", bits.get()),
            reason: "the GPTQ v1 format defines only 2, 3, 4 and 8 bits".into(),
        });
    }
    let mut zeros = unpack_qzeros(qzeros.view(), bits)?;
    let m = bits.max_code() as u8;
    zeros.mapv_inplace(|z| {
        if add {
            z.wrapping_add(1) & m
        } else {
            z.wrapping_sub(1) & m
        }
    });
    *qzeros = pack_qzeros(zeros.view(), bits)?;
    Ok(())
}

/// Fails unless `bits` is one of the widths the GPTQ checkpoint format
/// defines (2, 3, 4, 8).
pub(crate) fn check_checkpoint_bits(bits: Bits) -> Result<()> {
    match bits.get() {
        2 | 3 | 4 | 8 => Ok(()),
        b => Err(Error::Unencodable {
            what: format!("{b}-bit weights"),
            reason: "GPTQ checkpoints support only 2, 3, 4 and 8 bits".into(),
        }),
    }
}
