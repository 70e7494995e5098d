//! The GPU launchers of the cross-entropy through the output head.

use crate::model::cuda::prelude::*;

/// Per row of bf16 logits (N, V) and u32 targets (N,): (loss, logsumexp) as f32 (N, 2), of the
/// logits capped by `softcap` where given (here and below).
pub fn cross_entropy_forward(logits: &Tensor, targets: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropyForward { cap: cap_arg(softcap) })
}

struct CrossEntropyForward {
    cap: f32,
}

impl candle_core::CustomOp2 for CrossEntropyForward {
    fn name(&self) -> &'static str {
        "cross-entropy-forward"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, t: &CudaStorage, tl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (n, v) = xl.shape().dims2()?;
        if tl.shape().elem_count() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", tl.shape().elem_count());
        }
        let (xv, tv) = (view::<bf16>(x, xl, "logits")?, view::<u32>(t, tl, "targets")?);
        let out = unsafe { dev.alloc::<f32>(n * 2)? };
        let v32 = v as i32;
        launch!(dev, "cross_entropy_forward_bf16", launch_rows(n), &xv, &tv, &out, &v32, &self.cap);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, 2))))
    }
}

/// Per row of bf16 logits (N, V) and u32 targets (N,): (loss, logsumexp) as f32 (N, 2), and the
/// logits replaced in place by softmax - onehot(target), in one kernel (V a multiple of 8; see
/// [`cross_entropy_fused_fits`]). `logits` must be held by the caller alone (see [`add_matmul`]).
/// Capped, the gradient is that of the uncapped logits.
pub fn cross_entropy_fused(logits: &Tensor, targets: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let op = CrossEntropyFused { stats: std::sync::Mutex::new(None), cap: cap_arg(softcap) };
    logits.inplace_op2(&targets.contiguous()?, &op)?;
    let (stats, dev) = op
        .stats
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("cross-entropy statistics poisoned".into()))?
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: the kernel did not run".into()))?;
    let n = stats.len() / 2;
    Ok(wrap(stats, &dev, Shape::from((n, 2))))
}

/// Whether [`cross_entropy_fused`] takes these logits.
pub fn cross_entropy_fused_fits(logits: &Tensor) -> bool {
    applies(logits)
        && logits.is_contiguous()
        && logits.layout().start_offset().is_multiple_of(8)
        && logits.dims2().is_ok_and(|(_, v)| v.is_multiple_of(8))
}

struct CrossEntropyFused {
    stats: std::sync::Mutex<Option<(CudaSlice<f32>, CudaDevice)>>,
    cap: f32,
}

impl candle_core::InplaceOp2 for CrossEntropyFused {
    fn name(&self) -> &'static str {
        "cross-entropy-fused"
    }
    gpu_only!(inplace 2);
    fn cuda_fwd(&self, x: &mut CudaStorage, xl: &Layout, t: &CudaStorage, tl: &Layout) -> Result<()> {
        let dev = x.device().clone();
        let (n, v) = xl.shape().dims2()?;
        if tl.shape().elem_count() != n || v % 8 != 0 || !packed8(v, &[xl]) {
            return Err(disagree(self.name(), &[xl.shape(), tl.shape()]));
        }
        let tv = view::<u32>(t, tl, "targets")?;
        let mut xv = view_mut::<bf16>(x, xl, "logits")?;
        let out = unsafe { dev.alloc::<f32>(n * 2)? };
        let v32 = v as i32;
        launch!(dev, "cross_entropy_fused_bf16", launch_rows(n), &mut xv, &tv, &out, &v32, &self.cap);
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("cross-entropy statistics poisoned".into()))? =
            Some((out, dev));
        Ok(())
    }
}

/// softmax(logits) - onehot(targets), bf16 (N, V), from the forward pass's (loss, lse) rows;
/// capped, times the cap's derivative.
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    stats: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let op = CrossEntropyBackward { cap: cap_arg(softcap) };
    logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &stats.contiguous()?, &op)
}

struct CrossEntropyBackward {
    cap: f32,
}

impl candle_core::CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }
    gpu_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        st: &CudaStorage,
        stl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (n, v) = xl.shape().dims2()?;
        let (xv, tv, sv) =
            (view::<bf16>(x, xl, "logits")?, view::<u32>(t, tl, "targets")?, view::<f32>(st, stl, "stats")?);
        let out = unsafe { dev.alloc::<bf16>(n * v)? };
        let v32 = v as i32;
        launch!(dev, "cross_entropy_backward_bf16", launch_rows(n), &xv, &tv, &sv, &out, &v32, &self.cap);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// `x * s` for bf16 x and an f32 scalar s, both on the GPU, in one pass (candle's broadcasting
/// product takes ten times as long).
pub fn scale_by(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&s.to_dtype(DType::F32)?.reshape(1)?, &ScaleBy)
}

struct ScaleBy;

impl candle_core::CustomOp2 for ScaleBy {
    fn name(&self) -> &'static str {
        "scale-by"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, s: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        let (xv, sv) = (view::<bf16>(x, xl, "x")?, view::<f32>(s, sl, "the scale")?);
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n64, packed) = (n as i64, packed8(n, &[xl]));
        let (cfg, packed) = (launch_elements(n / if packed { 8 } else { 1 }), packed as i32);
        launch!(dev, "scale_by_bf16", cfg, &xv, &sv, &out, &n64, &packed);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}
