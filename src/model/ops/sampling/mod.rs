//! The sampler's GPU kernels: top-k / top-p cuts and Gumbel-max draws from each row's logits,
//! keyed by (row, step) so that a row draws the same tokens whatever its batch. The CPU's draw,
//! with the same rule, is `crate::sample::sample_one`.

#[cfg(feature = "cuda")]
pub mod cuda;
