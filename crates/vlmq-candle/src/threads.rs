//! How candle's CPU kernels share the cores with vlmq's pipeline.

/// Keeps candle's element-wise CPU kernels on the thread that calls them,
/// unless the user has set `CANDLE_NUM_THREADS`.
///
/// vlmq's pipeline already runs calibration samples in parallel on rayon's
/// pool, and matrix products use that pool too. candle 0.11 also splits
/// every large element-wise operation over a second pool of its own, whose
/// caller spins until the pool's threads are done; with both pools on the
/// same cores the spinning was 9% of a SmolLM2-135M GPTQ run's profile, and
/// with this setting the run used 13% less CPU time and wrote the same
/// bytes (docs/PERFORMANCE.md). Matrix products keep their parallelism.
///
/// Call it first thing in `main`, before any thread starts: it sets the
/// process environment variable `CANDLE_NUM_THREADS` to 1, which candle
/// reads once, when its pool first starts.
pub fn prefer_sample_parallelism() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
