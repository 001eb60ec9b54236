//! What the `quantize` and `gguf_table` examples do with a calibration text:
//! cut its tokens into windows, keep the last ones for evaluation and draw
//! the calibration windows from the rest by the seed, the way the
//! `Quantizer` draws its samples (`vlmq::sample_indices`).

use std::path::Path;

use vlmq_candle::eval::windows;

/// A text's windows split into a calibration pool and held-out windows.
pub struct TextWindows {
    /// Every window of `window_len` tokens, in text order.
    pub all: Vec<Vec<u32>>,
    /// Windows `0..pool` are the calibration pool, the rest held out.
    pub pool: usize,
    /// The held-out windows (`all[pool..]`).
    pub eval_set: Vec<Vec<u32>>,
    /// The calibration windows drawn from the pool by the seed.
    pub calib_idx: Vec<usize>,
}

/// Splits `tokens` of the text `calib` and prints the split; an error when
/// the text has fewer than `eval_windows + windows` windows.
pub fn split(
    calib: &Path,
    tokens: &[u32],
    window_len: usize,
    windows_wanted: usize,
    eval_windows: usize,
    seed: u64,
) -> Result<TextWindows, Box<dyn std::error::Error>> {
    let all = windows(tokens, window_len);
    if all.len() < eval_windows + windows_wanted {
        return Err(format!(
            "{} tokens give {} windows of {window_len}, fewer than {eval_windows} eval + \
             {windows_wanted} calibration",
            tokens.len(),
            all.len(),
        )
        .into());
    }
    let pool = all.len() - eval_windows;
    let eval_set = all[pool..].to_vec();
    let calib_idx = vlmq::sample_indices(pool, windows_wanted, seed);
    eprintln!(
        "text {calib:?}: {} tokens, {} windows of {window_len}; eval = windows {pool}..{}; \
         calibration (seed {seed}) = {calib_idx:?}",
        tokens.len(),
        all.len(),
        all.len(),
    );
    Ok(TextWindows {
        all,
        pool,
        eval_set,
        calib_idx,
    })
}
