//! The optimizer step's GPU kernels: the global gradient norm and torch's AdamW over every
//! adapter variable, one launch each. The CPU's step is in `crate::train`.

#[cfg(feature = "cuda")]
pub mod cuda;
