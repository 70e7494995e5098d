//! The GPU launcher of a row gather (and its gradient's scatter).

use crate::model::cuda::prelude::*;

/// Rows of bf16 src (M, D) by a u32 index (N,): row i of the result is src row idx[i], or zeros
/// where idx[i] >= M. One pass of 16-byte loads, where candle's index_select takes one
/// element per thread; `take_rows_fits` says whether the shapes allow it.
pub fn take_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    src.contiguous()?.apply_op2_no_bwd(&idx.contiguous()?, &TakeRows)
}

/// Whether [`take_rows`] takes rows of `src` (bf16 on the GPU, D a multiple of 8).
pub fn take_rows_fits(src: &Tensor) -> bool {
    applies(src) && src.dims().len() == 2 && src.dim(1).is_ok_and(|d| d % 8 == 0)
}

struct TakeRows;

impl candle_core::CustomOp2 for TakeRows {
    fn name(&self) -> &'static str {
        "take-rows"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, s: &CudaStorage, sl: &Layout, i: &CudaStorage, il: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let (m, d) = sl.shape().dims2()?;
        let n = il.shape().elem_count();
        if d % 8 != 0 || !packed8(m * d, &[sl]) {
            return Err(disagree(self.name(), &[sl.shape(), il.shape()]));
        }
        let (sv, iv) = (view::<bf16>(s, sl, "rows")?, view::<u32>(i, il, "the index")?);
        let out = unsafe { dev.alloc::<bf16>(n * d)? };
        let (m64, n64, d32) = (m as i64, n as i64, d as i32);
        launch!(dev, "take_rows_bf16", launch_elements(n * d / 8), &sv, &m64, &iv, &out, &n64, &d32);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, d))))
    }
}
