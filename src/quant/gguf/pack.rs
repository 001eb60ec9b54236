//! The byte layout of each block type: packing a solved layer row by row,
//! and decoding packed rows back to values.

use half::f16;
use ndarray::{Array2, ArrayView2};

use super::format::GgufType;
use super::grid::BlockGrid;
use crate::error::{Error, Result};
use crate::quant::cell::CellGrid;

/// Packs a solved layer: `codes` `[out, in]` and `grids` `[groups, out]`
/// (one per block or sub-block, as the solver returns them) into GGUF
/// blocks, row after row, little-endian.
///
/// Fails when the shapes disagree with each other or with the type's block
/// size, or when a code exceeds the type's largest code.
pub fn encode_rows(
    ty: GgufType,
    codes: ArrayView2<'_, u8>,
    grids: ArrayView2<'_, BlockGrid>,
) -> Result<Vec<u8>> {
    let (rows, cols) = codes.dim();
    ty.check_cols("codes", cols)?;
    let groups = cols / ty.group_cols();
    if grids.dim() != (groups, rows) {
        return Err(Error::shape("block grids", &[groups, rows], grids.shape()));
    }
    if let Some(((r, c), &q)) = codes
        .indexed_iter()
        .find(|(_, &q)| u32::from(q) > ty.max_code())
    {
        return Err(Error::Unencodable {
            what: format!("code {q} at [{r}, {c}]"),
            reason: format!("{ty} codes are at most {}", ty.max_code()),
        });
    }
    let per_block = ty.block_cols() / ty.group_cols();
    let mut out = Vec::with_capacity(rows * ty.row_bytes(cols));
    let mut q = vec![0u8; ty.block_cols()];
    let mut g = vec![BlockGrid::symmetric(f16::ONE, 0); per_block];
    for r in 0..rows {
        for b in 0..cols / ty.block_cols() {
            let c0 = b * ty.block_cols();
            for (t, v) in q.iter_mut().enumerate() {
                *v = codes[[r, c0 + t]];
            }
            for (t, v) in g.iter_mut().enumerate() {
                *v = grids[[b * per_block + t, r]];
            }
            encode_block(ty, &q, &g, &mut out);
        }
    }
    Ok(out)
}

fn encode_block(ty: GgufType, q: &[u8], g: &[BlockGrid], out: &mut Vec<u8>) {
    let le = |v: u16| v.to_le_bytes();
    match ty {
        GgufType::Q8_0 => {
            out.extend_from_slice(&le(g[0].d));
            out.extend(q.iter().map(|&c| (i16::from(c) - 128) as i8 as u8));
        }
        GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q5_0 => {
            out.extend_from_slice(&le(g[0].d));
            if ty == GgufType::Q4_1 {
                out.extend_from_slice(&le(g[0].dmin));
            }
            if ty == GgufType::Q5_0 {
                let qh = q
                    .iter()
                    .enumerate()
                    .fold(0u32, |a, (k, &c)| a | (u32::from(c >> 4) << k));
                out.extend_from_slice(&qh.to_le_bytes());
            }
            out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
        }
        GgufType::Q4K => {
            out.extend_from_slice(&le(g[0].d));
            out.extend_from_slice(&le(g[0].dmin));
            let mut scales = [0u8; 12];
            for (j, sub) in g.iter().enumerate() {
                let (sc, m) = (sub.sc as u8, sub.m);
                if j < 4 {
                    scales[j] |= sc & 63;
                    scales[j + 4] |= m & 63;
                } else {
                    scales[j - 4] |= (sc >> 4) << 6;
                    scales[j] |= (m >> 4) << 6;
                    scales[j + 4] = (sc & 0xF) | ((m & 0xF) << 4);
                }
            }
            out.extend_from_slice(&scales);
            for c in 0..4 {
                out.extend((0..32).map(|l| q[64 * c + l] | (q[64 * c + 32 + l] << 4)));
            }
        }
        GgufType::Q6K => {
            let mut ql = [0u8; 128];
            let mut qh = [0u8; 64];
            for h in 0..2 {
                for l in 0..32 {
                    let e = |k: usize| q[128 * h + 32 * k + l];
                    ql[64 * h + l] = (e(0) & 0xF) | ((e(2) & 0xF) << 4);
                    ql[64 * h + 32 + l] = (e(1) & 0xF) | ((e(3) & 0xF) << 4);
                    qh[32 * h + l] =
                        (e(0) >> 4) | ((e(1) >> 4) << 2) | ((e(2) >> 4) << 4) | ((e(3) >> 4) << 6);
                }
            }
            out.extend_from_slice(&ql);
            out.extend_from_slice(&qh);
            out.extend(g.iter().map(|sub| sub.sc as u8));
            out.extend_from_slice(&le(g[0].d));
        }
    }
}

/// Decodes packed rows (`rows` rows of `cols` columns of type `ty`) to
/// their values `[rows, cols]`, with the same f32 operations as candle's and
/// llama.cpp's dequantization.
pub fn decode_rows(ty: GgufType, bytes: &[u8], rows: usize, cols: usize) -> Result<Array2<f32>> {
    ty.check_cols("packed rows", cols)?;
    let expected = rows * ty.row_bytes(cols);
    if bytes.len() != expected {
        return Err(Error::shape(
            "packed GGUF rows (bytes)",
            &[expected],
            &[bytes.len()],
        ));
    }
    let mut out = Array2::<f32>::zeros((rows, cols));
    let mut q = vec![0u8; ty.block_cols()];
    let mut g = Vec::with_capacity(16);
    let values = out.as_slice_mut().expect("a fresh array is contiguous");
    for (block, dst) in bytes
        .chunks_exact(ty.block_bytes())
        .zip(values.chunks_exact_mut(ty.block_cols()))
    {
        decode_block(ty, block, &mut q, &mut g);
        let sub = ty.group_cols();
        for (t, v) in dst.iter_mut().enumerate() {
            *v = g[t / sub].value(q[t]);
        }
    }
    Ok(out)
}

fn decode_block(ty: GgufType, b: &[u8], q: &mut [u8], g: &mut Vec<BlockGrid>) {
    let half = |i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]]));
    g.clear();
    match ty {
        GgufType::Q8_0 => {
            for (c, &v) in q.iter_mut().zip(&b[2..34]) {
                *c = (i16::from(v as i8) + 128) as u8;
            }
            g.push(BlockGrid::symmetric(half(0), 128));
        }
        GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q5_0 => {
            let (start, high) = match ty {
                GgufType::Q4_1 => (4, 0u32),
                GgufType::Q5_0 => (6, u32::from_le_bytes([b[2], b[3], b[4], b[5]])),
                _ => (2, 0u32),
            };
            for j in 0..16 {
                let byte = b[start + j];
                let hi = |k: usize| (((high >> k) & 1) << 4) as u8;
                q[j] = (byte & 0xF) | hi(j);
                q[j + 16] = (byte >> 4) | hi(j + 16);
            }
            g.push(match ty {
                GgufType::Q4_1 => BlockGrid::affine(half(0), half(2)),
                GgufType::Q5_0 => BlockGrid::symmetric(half(0), 16),
                _ => BlockGrid::symmetric(half(0), 8),
            });
        }
        GgufType::Q4K => {
            let s = &b[4..16];
            for j in 0..8 {
                let (sc, m) = if j < 4 {
                    (s[j] & 63, s[j + 4] & 63)
                } else {
                    (
                        (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
                        (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                    )
                };
                g.push(BlockGrid::q4k(half(0), half(2), sc, m));
            }
            for c in 0..4 {
                for l in 0..32 {
                    let byte = b[16 + 32 * c + l];
                    q[64 * c + l] = byte & 0xF;
                    q[64 * c + 32 + l] = byte >> 4;
                }
            }
        }
        GgufType::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for h in 0..2 {
                for l in 0..32 {
                    let (lo0, lo1, hb) = (ql[64 * h + l], ql[64 * h + 32 + l], qh[32 * h + l]);
                    q[128 * h + l] = (lo0 & 0xF) | ((hb & 3) << 4);
                    q[128 * h + 32 + l] = (lo1 & 0xF) | (((hb >> 2) & 3) << 4);
                    q[128 * h + 64 + l] = (lo0 >> 4) | (((hb >> 4) & 3) << 4);
                    q[128 * h + 96 + l] = (lo1 >> 4) | (((hb >> 6) & 3) << 4);
                }
            }
            for &sc in &b[192..208] {
                g.push(BlockGrid::q6k(half(208), sc as i8));
            }
        }
    }
}
