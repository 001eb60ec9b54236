//! Dense linear algebra on faer: zero-copy views of ndarray arrays, a
//! deterministic parallel matrix product, symmetric Gram products, and the
//! damped inverse-Cholesky factor GPTQ needs.

mod cholesky;
mod cholesky_owned;
mod gram;
mod matmul;
mod view;

pub(crate) use cholesky::inverse_cholesky_upper_in_order;
pub use cholesky::{inverse_cholesky_upper, InverseCholesky};
pub(crate) use cholesky_owned::inverse_cholesky_upper_owned;
pub(crate) use gram::cross_into;
pub use gram::{gram_upper_into, Scalar};
pub use matmul::{matmul, matmul_into};
pub(crate) use view::{faer_mut, faer_ref};
