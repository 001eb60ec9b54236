//! Softmax attention of the vision towers, run in pieces of a few heads
//! within each attention segment, and the tape its backward reads.
//!
//! Over one image's 1024 patches a whole score tensor is `heads x 1024 x
//! 1024` floats (50 MB for SigLIP's 12 heads): a fresh memory mapping per
//! call whose pages the kernel faults in and clears (12-15% of a SigLIP
//! block's time in its profile), then read back from memory by the
//! softmax. A piece holds at most [`PIECE_SCORES`] scores (a few MB), which
//! the allocator reuses and the softmax reads while they are still in
//! cache. Each head's arithmetic is the same in any piece, so the pieces
//! change no result.

use candle_core::Tensor;

/// The most scores (`heads x rows x rows`) one piece holds.
pub(crate) const PIECE_SCORES: usize = 1 << 21;

/// One piece: rows `[start, start + len)` of the sequence (an attention
/// segment) and heads `[h0, h0 + count)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub rows: (usize, usize),
    pub heads: (usize, usize),
}

/// What the attention backward reads: queries (unscaled), keys, values
/// `[heads, S, hd]`, and each piece with its probabilities `[count, len, len]`.
pub(crate) struct AttentionTape {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub pieces: Vec<(Piece, Tensor)>,
}

/// The pieces of `heads` heads over the segments `segs` (`(start, len)`),
/// each with at most `max_scores` scores (at least one head).
pub(crate) fn pieces(heads: usize, segs: &[(usize, usize)], max_scores: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    for &(start, len) in segs {
        let per_head = len.saturating_mul(len).max(1);
        let count = (max_scores / per_head).clamp(1, heads.max(1));
        let mut h0 = 0;
        while h0 < heads {
            let c = count.min(heads - h0);
            out.push(Piece {
                rows: (start, len),
                heads: (h0, c),
            });
            h0 += c;
        }
    }
    out
}

/// The part of `t: [heads, S, ..]` that piece `p` covers.
pub(crate) fn piece_of(t: &Tensor, p: &Piece) -> candle_core::Result<Tensor> {
    t.narrow(1, p.rows.0, p.rows.1)?
        .narrow(0, p.heads.0, p.heads.1)
}

/// Puts per-piece results `[count, len, ..]` back into `[heads, S, ..]`
/// (pieces in [`pieces`]' order: segments in order, heads in order within).
pub(crate) fn assemble(pieces: &[Piece], parts: Vec<Tensor>) -> candle_core::Result<Tensor> {
    let mut segments = Vec::new();
    let mut heads: Vec<Tensor> = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        heads.push(part);
        let last_of_segment = pieces.get(i + 1).is_none_or(|n| n.rows != pieces[i].rows);
        if last_of_segment {
            segments.push(Tensor::cat(&heads, 0)?);
            heads.clear();
        }
    }
    Tensor::cat(&segments, 1)
}

/// Softmax attention of `q, k, v: [heads, S, hd]` within each segment of
/// `segs` (non-empty, in order, covering `0..S`), scaled by `hd^-1/2`, in
/// pieces of at most `max_scores` scores: the output `[heads, S, hd]`, and
/// the [`AttentionTape`] when `keep` is set.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segs: &[(usize, usize)],
    max_scores: usize,
    keep: bool,
) -> candle_core::Result<(Tensor, Option<AttentionTape>)> {
    let (heads, _, hd) = q.dims3()?;
    // Scaling the queries costs `S x d` multiplications, the scores `S x S x heads`.
    let qs = (q * (1.0 / (hd as f64).sqrt()))?;
    let plan = pieces(heads, segs, max_scores);
    let mut parts = Vec::with_capacity(plan.len());
    let mut kept = Vec::new();
    for p in &plan {
        let scores = piece_of(&qs, p)?.matmul(&piece_of(k, p)?.t()?)?;
        let probs = crate::models::softmax::softmax_last_dim(&scores)?;
        parts.push(probs.matmul(&piece_of(v, p)?)?);
        if keep {
            kept.push((*p, probs));
        }
    }
    let att = assemble(&plan, parts)?;
    let tape = keep.then(|| AttentionTape {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        pieces: kept,
    });
    Ok((att, tape))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::backend::chain_rule::pieced_attention_backward;

    fn values(shape: &[usize], seed: u64) -> Tensor {
        crate::backend::fused::tests::values(shape, seed, 1.0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn pieces_cover_every_head_of_every_segment_within_the_bound() {
        let segs = [(0, 4), (4, 6), (10, 1)];
        let p = pieces(5, &segs, 40);
        // 4 x 4 = 16 scores a head: 2 heads a piece; 36: 1; 1: all 5.
        let counts: Vec<(usize, usize)> = p.iter().map(|p| (p.rows.0, p.heads.1)).collect();
        assert_eq!(
            counts,
            [
                (0, 2),
                (0, 2),
                (0, 1),
                (4, 1),
                (4, 1),
                (4, 1),
                (4, 1),
                (4, 1),
                (10, 5)
            ]
        );
        for s in segs {
            let heads: usize = p.iter().filter(|q| q.rows == s).map(|q| q.heads.1).sum();
            assert_eq!(heads, 5);
        }
    }

    /// Attention and its backward in many pieces give the same bits as in
    /// one piece per segment: each head's arithmetic is the same.
    #[test]
    fn pieces_change_no_result() {
        let (heads, s, hd) = (5, 10, 4);
        let segs = [(0, 4), (4, 6)];
        let (q, k, v) = (
            values(&[heads, s, hd], 1),
            values(&[heads, s, hd], 2),
            values(&[heads, s, hd], 3),
        );
        let g = values(&[heads, s, hd], 4);
        let run = |max: usize| {
            let (att, tape) = attention(&q, &k, &v, &segs, max, true).unwrap();
            let tape = tape.unwrap();
            (
                att,
                tape.pieces.len(),
                pieced_attention_backward(&tape, &g).unwrap(),
            )
        };
        let (att1, n1, (dq1, dk1, dv1)) = run(usize::MAX);
        let (att2, n2, (dq2, dk2, dv2)) = run(20);
        assert_eq!((n1, n2), (2, 10));
        assert_eq!(att2.dims(), [heads, s, hd]);
        for (a, b) in [(&att1, &att2), (&dq1, &dq2), (&dk1, &dk2), (&dv1, &dv2)] {
            assert_eq!(max_diff(a, b), 0.0);
        }
        // Segments attend only within themselves: the first segment's output
        // does not move when the second segment's keys do.
        let moved = Tensor::cat(
            &[
                &Tensor::zeros((heads, 4, hd), DType::F64, &Device::Cpu).unwrap(),
                &values(&[heads, 6, hd], 6),
            ],
            1,
        )
        .unwrap();
        let k2 = (&k + moved).unwrap();
        let (att3, _) = attention(&q, &k2, &v, &segs, 20, false).unwrap();
        let first = |t: &Tensor| t.narrow(1, 0, 4).unwrap();
        assert_eq!(max_diff(&first(&att3), &first(&att1)), 0.0);
        assert!(max_diff(&att3, &att1) > 1e-3);
    }
}
