//! Size checks of configurations read from files: the loaders and the
//! forward multiply a configuration's sizes (element counts, byte counts,
//! expected shapes), so a corrupt file must be refused before a product
//! overflows.

/// Whether a tensor of `dims` is addressable at the widest dtype read
/// (8 bytes an element, f64): its byte count fits in an `isize`.
pub(crate) fn addressable(dims: &[usize]) -> bool {
    dims.iter()
        .try_fold(8usize, |bytes, &d| bytes.checked_mul(d))
        .is_some_and(|b| isize::try_from(b).is_ok())
}

/// The first of `tensors` (named dimensions) that is not [`addressable`],
/// as "name a * name b".
pub(crate) fn first_too_large(tensors: &[&[(&str, usize)]]) -> Option<String> {
    tensors.iter().find_map(|dims| {
        let sizes: Vec<usize> = dims.iter().map(|(_, d)| *d).collect();
        (!addressable(&sizes)).then(|| {
            let named: Vec<String> = dims.iter().map(|(k, d)| format!("{k} {d}")).collect();
            named.join(" * ")
        })
    })
}
