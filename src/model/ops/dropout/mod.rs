//! LoRA's dropout of an adapter's input, drawn from a key where it is applied: element i of the
//! input is kept when a hash of (key, i) falls below 1 - p, so no mask is stored between the
//! forward and backward passes, and a seed gives the same mask on the CPU and the GPU.

use candle_core::{Result, Shape, Tensor};

#[cfg(feature = "cuda")]
pub mod cuda;

/// LoRA dropout of one input, by key: the mask is drawn where it is applied (see
/// [`keyed_dropout_mask`]), so none is stored.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub key: u64,
    pub keep: f64,
}

impl Dropout {
    /// t * mask for a t of the input's shape (not differentiable: for hand-written rules). On the
    /// GPU in bf16 one kernel draws and applies the mask.
    pub fn apply(&self, t: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::model::cuda::applies(t) {
            return cuda::dropout_apply(t, self.key, self.keep);
        }
        t.mul(&keyed_dropout_mask(t.shape(), self.key, self.keep, t)?)
    }

    /// sum + t * mask; on the GPU in bf16 one kernel adds in place (`sum` must then be held by the
    /// caller alone).
    pub fn add_applied(&self, sum: Tensor, t: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::model::cuda::applies(&sum) && sum.is_contiguous() {
            cuda::dropout_add(&sum, t, self.key, self.keep)?;
            return Ok(sum);
        }
        sum + self.apply(t)?
    }
}

/// The inverted-dropout mask of `shape` keyed `key`, on `like`'s device and in its dtype: element
/// i is 1 / keep when 24 bits of a hash of (key, i) fall below keep * 2^24, else 0.
pub fn keyed_dropout_mask(shape: &Shape, key: u64, keep: f64, like: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if like.device().is_cuda() {
        return cuda::dropout_mask(shape, key, keep, like);
    }
    let n = shape.elem_count();
    check_mask_len(n)?;
    let threshold = keep_threshold(keep);
    let value = (1.0 / keep) as f32;
    let mut mask = vec![0f32; n];
    crate::model::cpu::chunks_on_pool(&mut mask, 1 << 14, |first, part| {
        for (i, m) in part.iter_mut().enumerate() {
            if keeps(key, (first + i) as u32, threshold) {
                *m = value;
            }
        }
    });
    Tensor::from_vec(mask, shape, like.device())?.to_dtype(like.dtype())
}

/// A dropout mask hashes its elements' indices as 32-bit numbers.
pub(crate) fn check_mask_len(n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        candle_core::bail!("dropout mask of {n} elements: at most 2^32 per tensor");
    }
    Ok(())
}

/// Elements are kept when 24 bits of their hash fall below this: keep * 2^24.
pub(crate) fn keep_threshold(keep: f64) -> u32 {
    (keep * (1u64 << 24) as f64).round() as u32
}

/// Whether element i of the mask keyed `key` is kept (the rule of dropout.cu's `dropout_mask`).
fn keeps(key: u64, i: u32, threshold: u32) -> bool {
    let stream = mix32(key as u32 ^ mix32((key >> 32) as u32));
    (mix32(stream.wrapping_add(mix32(i))) >> 8) < threshold
}

/// A 32-bit integer hash with good avalanche (the "lowbias32" constants), as in common.cuh.
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}
