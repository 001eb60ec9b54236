//! Element-wise kernels compiled for AVX-512 as well, chosen at run time.
//!
//! The crate is built for baseline x86-64, so the compiler gives its own
//! loops (softmax rows, activations, norms) 128-bit SSE2 vectors; candle
//! has no run-time dispatch for them either. [`widened!`] defines a kernel
//! entry that runs an `#[inline(always)]` body inside a function compiled
//! with `avx512f` when the CPU has it, so the body's loops use 512-bit
//! vectors there. Rust never fuses a multiply and an add on its own, so
//! both builds perform the same operations in the same order: the results
//! do not depend on the CPU.

/// `widened!(fn name(a: A, ..) = body;)` defines `fn name(a: A, ..)`, which
/// calls `body` (an `#[inline(always)]` function with the same arguments)
/// compiled with AVX-512 when the CPU supports it, and as built otherwise.
/// Everything `body` calls must be inlined too to be widened.
macro_rules! widened {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) = $body:path;) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($a: $t),*) {
                    $body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}

pub(crate) use widened;

#[cfg(test)]
mod tests {
    /// `x[i] * 3 + 1` into `out`.
    #[inline(always)]
    fn affine(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * 3.0 + 1.0;
        }
    }

    widened!(fn affine_wide(x: &[f32], out: &mut [f32]) = affine;);

    #[test]
    fn the_widened_entry_runs_the_body() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 4.0).collect();
        let mut out = vec![0.0; 37];
        affine_wide(&x, &mut out);
        let want: Vec<f32> = x.iter().map(|v| v * 3.0 + 1.0).collect();
        assert_eq!(out, want);
    }
}
