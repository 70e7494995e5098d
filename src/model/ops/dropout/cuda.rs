//! The GPU launchers of LoRA's keyed dropout.

use crate::model::cuda::prelude::*;

/// An inverted-dropout mask of `shape` on `like`'s GPU and in its dtype (bf16 or f32): element i
/// is 1 / keep where the CPU's rule (`super::keyed_dropout_mask`) keeps it, else 0.
pub fn dropout_mask(shape: &Shape, key: u64, keep: f64, like: &Tensor) -> Result<Tensor> {
    super::check_mask_len(shape.elem_count())?;
    // A custom op needs an input: one element that places the mask's device and dtype.
    let anchor = Tensor::zeros(1, like.dtype(), like.device())?;
    let op = DropoutMask { shape: shape.clone(), key, threshold: super::keep_threshold(keep), keep };
    anchor.apply_op1_no_bwd(&op)
}

struct DropoutMask {
    shape: Shape,
    key: u64,
    threshold: u32,
    keep: f64,
}

impl candle_core::CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, x: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = self.shape.elem_count();
        let n64 = n as i64;
        let (lo, hi) = (self.key as u32, (self.key >> 32) as u32);
        let value = (1.0 / self.keep) as f32;
        let storage = match x.dtype() {
            DType::BF16 => {
                let out = unsafe { dev.alloc::<bf16>(n)? };
                launch!(dev, "dropout_mask_bf16", launch_elements(n), &out, &n64, &lo, &hi, &self.threshold, &value);
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            DType::F32 => {
                let out = unsafe { dev.alloc::<f32>(n)? };
                launch!(dev, "dropout_mask_f32", launch_elements(n), &out, &n64, &lo, &hi, &self.threshold, &value);
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            other => candle_core::bail!("dropout-mask: {other:?} (want bf16 or f32)"),
        };
        Ok((storage, self.shape.clone()))
    }
}

/// x * mask for bf16 x on the GPU, the mask of `dropout_mask` (same key and keep) drawn in the
/// same pass: no mask tensor is written or kept.
pub fn dropout_apply(x: &Tensor, key: u64, keep: f64) -> Result<Tensor> {
    let op = DropoutApply { key, threshold: super::keep_threshold(keep), keep };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

struct DropoutApply {
    key: u64,
    threshold: u32,
    keep: f64,
}

impl candle_core::CustomOp1 for DropoutApply {
    fn name(&self) -> &'static str {
        "dropout-apply"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = l.shape().elem_count();
        super::check_mask_len(n)?;
        let xv = view::<bf16>(x, l, "x")?;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n64, lo, hi) = (n as i64, self.key as u32, (self.key >> 32) as u32);
        // The mask's value rounded as a bf16 mask would hold it, so that the product is the same.
        let value = bf16::from_f64(1.0 / self.keep).to_f32();
        launch!(dev, "dropout_apply_bf16", launch_elements(n), &xv, &out, &n64, &lo, &hi, &self.threshold, &value);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

/// `acc += x * mask` in place, the mask of [`dropout_apply`] drawn in the same pass: `acc` must
/// be held by the caller alone (see [`add_matmul`]).
pub fn dropout_add(acc: &Tensor, x: &Tensor, key: u64, keep: f64) -> Result<()> {
    let op = DropoutApply { key, threshold: super::keep_threshold(keep), keep };
    acc.inplace_op2(&x.contiguous()?, &op)
}

impl candle_core::InplaceOp2 for DropoutApply {
    fn name(&self) -> &'static str {
        "dropout-add"
    }
    gpu_only!(inplace 2);
    fn cuda_fwd(&self, acc: &mut CudaStorage, al: &Layout, x: &CudaStorage, xl: &Layout) -> Result<()> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        if al.shape() != xl.shape() {
            return Err(disagree("dropout-add", &[al.shape(), xl.shape()]));
        }
        super::check_mask_len(n)?;
        let xv = view::<bf16>(x, xl, "x")?;
        let mut av = view_mut::<bf16>(acc, al, "the sum")?;
        let (n64, lo, hi) = (n as i64, self.key as u32, (self.key >> 32) as u32);
        let value = bf16::from_f64(1.0 / self.keep).to_f32();
        launch!(dev, "dropout_add_bf16", launch_elements(n), &xv, &mut av, &n64, &lo, &hi, &self.threshold, &value);
        Ok(())
    }
}
